"""``supervisord``: the daemon's entry point and its request loop.

Signals and control commands arrive as typed requests on one channel and
are handled one at a time. Services live in one nursery; the control server
and the signal forwarder in the root nursery around it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import structlog
import trio

from supervisor import __version__, logs
from supervisor.capabilities import Capabilities, check, detect, prepare
from supervisor.config import Config
from supervisor.control import protocol
from supervisor.control.access import Access
from supervisor.control.server import ControlServer, bound_control_socket
from supervisor.errors import ConfigError, SupervisorError, leaves
from supervisor.kernel import sysctl
from supervisor.loader import environment_for_workers, load_config
from supervisor.plan import describe, plan_config, plan_rollout
from supervisor.reloads import ServiceDirectory, handle_reload, reload_summary
from supervisor.requests import Reload, Request, Shutdown
from supervisor.service import Service, ServiceEnv
from supervisor.spawner import ProcessSpawner, Spawner
from supervisor.status import DaemonStatus, Status
from supervisor.systemd import SystemdNotifier
from supervisor.watch import WatchSpec, watch_services

log = structlog.get_logger("supervisor.daemon")

_SHUTDOWN_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class Daemon:
    """The running daemon: its services and the channel that drives them."""

    def __init__(
        self,
        config: Config,
        config_path: Path,
        spawner: Spawner,
        caps: Capabilities,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or SystemdNotifier(None)
        self._last_reload: str | None = None
        self._reloaded = trio.Event()  # set (and replaced) after every reload
        self.config_path = config_path
        self._caps = caps
        self._env = ServiceEnv(spawner, self.capabilities)
        self.services = {
            name: Service(name, service, self._env) for name, service in config.services.items()
        }
        self._send, self._receive = trio.open_memory_channel[Request](128)
        self._started_at = trio.current_time()
        self._ready = False  # every service's first generation is serving
        self._services_nursery: trio.Nursery | None = None

    def capabilities(self) -> Capabilities:
        """Cached detection, with the migration sysctl re-read (someone may set it).

        A read that fails (out of fds, say) keeps the last value: no caller
        (status among them) may fail for it.
        """
        try:
            self._caps = replace(self._caps, migrate_req=sysctl.migrate_req())
        except SupervisorError as exc:
            log.warning("sysctl_unreadable", error=str(exc))
        return self._caps

    def load_checked(self) -> Config:
        """The config file, validated against the schema, this host and this kernel.

        Raises:
            ConfigError: listing every issue.
        """
        config = load_config(self.config_path)
        issues = list(check(config, self.capabilities()))
        if issues:
            raise ConfigError(str(self.config_path), issues)
        return config

    def directory(self) -> ServiceDirectory:
        return ServiceDirectory(
            services=self.services,
            load=self.load_checked,
            current=lambda: self.config,
            start=self._start_service,
            stop=self._stop_service,
        )

    async def _start_service(self, name: str, config: Config) -> None:
        assert self._services_nursery is not None
        service = Service(name, config.services[name], self._env)
        await self._services_nursery.start(self._run_service, service)

    async def _run_service(
        self, service: Service, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run one service; it is listed from its start until it has stopped."""
        self.services[service.name] = service
        try:
            await service.run(task_status=task_status)
        finally:
            if self.services.get(service.name) is service:
                del self.services[service.name]

    async def _stop_service(self, name: str) -> None:
        service = self.services[name]
        service.request_stop()
        await service.stopped.wait()

    def status(self) -> Status:
        return Status(
            daemon=DaemonStatus(
                pid=os.getpid(),
                version=__version__,
                config=str(self.config_path),
                uptime=round(trio.current_time() - self._started_at, 3),
            ),
            services={name: svc.snapshot() for name, svc in self.services.items()},
        )

    async def run(self) -> None:
        """Serve until a shutdown request; return once every worker is reaped.

        Raises:
            RolloutAborted: a service could not start (the others are stopped first).
            ControlError: the control socket could not be set up.
        """
        section = self.config.supervisor
        with bound_control_socket(
            section.control_socket, section.control_socket_mode, section.control_socket_group
        ) as sock:
            try:
                await self._run_with(sock)
            except* SupervisorError as group:
                # Nurseries wrap what they raise; callers get the first error itself.
                for exc in leaves(group):
                    log.error("daemon_failed", reason=str(exc))
                raise leaves(group)[0] from None
        log.info("daemon_stopped")

    async def _run_with(self, sock: socket.socket) -> None:
        section = self.config.supervisor
        async with trio.open_nursery() as root:
            startup = trio.CancelScope()
            root.start_soon(self._forward_signals, startup)
            root.start_soon(self.notifier.keep_watchdog)
            control = ControlServer(self._send, self.status, Access.from_config(section))
            await root.start(self._serve_control, control, sock, root.cancel_scope)
            log.info("control_socket_ready", path=str(section.control_socket))
            shutdown = await self._serve_services(startup, root)
            if shutdown is not None and shutdown.reply is not None:
                async with shutdown.reply:
                    await shutdown.reply.send(protocol.result(message="all services stopped"))
            control.close()

    @staticmethod
    async def _serve_control(
        control: ControlServer,
        sock: socket.socket,
        root: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the control socket; once it is closed, end the daemon's other tasks."""
        await control.serve(sock, task_status=task_status)
        root.cancel()

    async def _serve_services(
        self, startup: trio.CancelScope, root: trio.Nursery
    ) -> Shutdown | None:
        shutdown: Shutdown | None = None
        async with trio.open_nursery() as services:
            self._services_nursery = services
            with startup:
                await self._start_all(services)
            if startup.cancelled_caught:
                log.info("startup_interrupted")
            else:
                self._ready = True
                log.info("daemon_ready", services=list(self.services))
                self.notifier.ready(self.summary())
                root.start_soon(self._keep_watching)
                shutdown = await self._request_loop(root)
            self.notifier.stopping()
            root.start_soon(self._escalate, services.cancel_scope)
            for service in list(self.services.values()):
                service.request_stop()
        return shutdown

    async def _start_all(self, nursery: trio.Nursery) -> None:
        async with trio.open_nursery() as starter:
            for service in list(self.services.values()):
                starter.start_soon(nursery.start, self._run_service, service)

    async def _request_loop(self, root: trio.Nursery) -> Shutdown:
        """Take requests one at a time. A reload runs as its own task (services
        serialize their rollouts), so the loop stays free to take the next."""
        async for request in self._receive:
            if isinstance(request, Shutdown):
                log.info("shutdown_requested", source=request.source)
                self.notifier.stopping()
                return request
            root.start_soon(self._reload, request)
        raise AssertionError("the request channel never closes while the daemon runs")

    async def _reload(self, request: Reload) -> None:
        self.notifier.reload_started()
        answer: dict[str, object] = {"ok": False, "message": "the reload was cut short"}
        try:
            answer = await handle_reload(self.directory(), request)
        finally:
            self._last_reload = reload_summary(answer)
            self.notifier.reload_finished(self.summary())
            self._reloaded.set()
            self._reloaded = trio.Event()

    def watch_specs(self) -> dict[str, WatchSpec]:
        return {
            name: WatchSpec(tuple(svc.config.watch), svc.config.watch_debounce)
            for name, svc in self.services.items()
            if svc.config.watch
        }

    async def _keep_watching(self) -> None:
        """Watch the services' ``watch`` paths; re-arm when a reload changed them."""
        while True:
            specs = self.watch_specs()
            async with trio.open_nursery() as nursery:
                if specs:
                    await nursery.start(watch_services, specs, self._reload_on_change)
                while self.watch_specs() == specs:
                    await self._reloaded.wait()
                nursery.cancel_scope.cancel()

    async def _reload_on_change(self, service: str, paths: Sequence[Path]) -> None:
        names = ", ".join(str(path) for path in paths)
        await self._send.send(
            Reload(source="watch", service=service, reason=f"watched files changed: {names}")
        )

    def summary(self) -> str:
        """One line for systemd's ``STATUS=``: generations, then the last reload."""
        services = ", ".join(
            f"{name} generation {svc.current.number if svc.current else 0} {svc.state().value}"
            for name, svc in self.services.items()
        )
        last = f"; last reload {self._last_reload}" if self._last_reload else ""
        return f"{services}{last}"

    async def _forward_signals(self, startup: trio.CancelScope) -> None:
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*signals) as received:
            async for signum in received:
                name = signal.Signals(signum).name
                if signum in _SHUTDOWN_SIGNALS and not self._ready:
                    # A stop during start-up must not wait for ready_timeout.
                    log.info("shutdown_requested", source=name)
                    self.notifier.stopping()
                    startup.cancel()
                elif signum in _SHUTDOWN_SIGNALS:
                    await self._send.send(Shutdown(source=name))
                else:
                    await self._send.send(Reload(source=name))

    async def _escalate(self, services: trio.CancelScope) -> None:
        """While stopping: a second stop request kills the workers at once."""
        async for request in self._receive:
            if isinstance(request, Shutdown):
                log.warning("shutdown_escalated", source=request.source, action="SIGKILL")
                services.cancel()
                if request.reply is not None:
                    await request.reply.aclose()
            elif request.reply is not None:
                async with request.reply:
                    await request.reply.send(protocol.error("the daemon is shutting down"))


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="supervisord",
        description="Zero-downtime process supervisor (runs in the foreground).",
    )
    parser.add_argument("-c", "--config", type=Path, required=True, help="config file (TOML)")
    parser.add_argument(
        "--check", action="store_true", help="validate the config, print the plan, exit"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def _check(path: Path, config: Config) -> None:
    """``--check``: every issue (exit 2), or the plan and the retirement paths (exit 0)."""
    caps = detect(config.supervisor.steering)
    if config.supervisor.tcp_migrate_req == "enable" and os.access(sysctl.MIGRATE_REQ, os.W_OK):
        caps = replace(caps, migrate_req=1)  # what the daemon would switch on at start
    issues = list(check(config, caps))
    if issues:
        print(ConfigError(str(path), issues), file=sys.stderr)
        sys.exit(2)
    print(f"{path}: OK")
    plans = plan_config(config)
    print("\n".join(describe(plans)))
    for plan in plans:
        # What reloading this very config would do, on this host.
        print("\n".join(plan_rollout(plan, plan.config, plan.generation + 1, caps).describe()))
    print(f"capabilities: {caps.describe()}")
    sys.exit(0)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``supervisord``. Exit 0 on a clean stop, 1 on failure, 2 on bad config."""
    args = _parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    if args.check:
        _check(args.config, config)
    logs.configure(config.supervisor.log_format, config.supervisor.log_level)
    caps = prepare(config.supervisor)
    issues = list(check(config, caps))
    if issues:
        print(ConfigError(str(args.config), issues), file=sys.stderr)
        sys.exit(2)
    notifier = SystemdNotifier.from_environment(os.environ)
    spawner = ProcessSpawner(environment_for_workers(os.environ))
    try:
        trio.run(_run, config, args.config.resolve(), spawner, caps, notifier)
    except SupervisorError as exc:
        print(f"supervisord: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


async def _run(
    config: Config,
    config_path: Path,
    spawner: Spawner,
    caps: Capabilities,
    notifier: SystemdNotifier,
) -> None:
    await Daemon(config, config_path, spawner, caps, notifier).run()


if __name__ == "__main__":
    main()
