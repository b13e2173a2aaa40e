"""``supervisord``: the daemon and its request loop.

Signals and control commands arrive as typed requests on one channel and
are handled one at a time. Services live in one nursery; the control server
and the signal forwarder in the root nursery around it. An upgrade
(``handover``) is one more request: reloads that arrive meanwhile wait for
it, and it waits for the reloads under way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from supervisor import __version__
from supervisor.config.loader import load_config
from supervisor.config.schema import Config, ServiceConfig
from supervisor.control import protocol
from supervisor.control.access import Access
from supervisor.control.requests import (
    Reload,
    Reopen,
    Reply,
    Request,
    Shutdown,
    Signal,
    Switch,
    Upgrade,
)
from supervisor.control.server import ControlServer, bound_control_socket
from supervisor.control.watch import WatchSpec, watch_services
from supervisor.daemon import handover, signals
from supervisor.daemon.handover import Predecessor, UpgradeRun
from supervisor.daemon.reloads import (
    CONFIG_REJECTED,
    Answered,
    Checked,
    ServiceDirectory,
    handle_reload,
)
from supervisor.daemon.switch import Stopped, switch
from supervisor.daemon.systemd import SystemdNotifier
from supervisor.daemon.upgrade import monotonic
from supervisor.errors import ConfigError, SupervisorError, leaves
from supervisor.handoff.fdstore import NO_STORE, FdStore
from supervisor.handoff.ledger import Ledger
from supervisor.handoff.state import ClientDoc, DaemonDoc
from supervisor.kernel import sysctl
from supervisor.observe import expiry, metrics, metrics_http
from supervisor.plan.capabilities import Capabilities, check
from supervisor.serve.service import Service, ServiceEnv, TakeoverSummary
from supervisor.serve.spawner import Spawner
from supervisor.serve.takeover import Takeover
from supervisor.status import DaemonStatus, Status
from supervisor.values import Served

log = structlog.get_logger("supervisor.daemon")


class Daemon:
    """The running daemon: its services and the channel that drives them."""

    def __init__(
        self,
        config: Config,
        config_path: Path,
        spawner: Spawner,
        caps: Capabilities,
        notifier: SystemdNotifier | None = None,
        *,
        store: FdStore = NO_STORE,
        inheritances: dict[str, Takeover] | None = None,
        handed: Predecessor | None = None,
        refused: str | None = None,
    ) -> None:
        self.config = config
        # Why the file was refused at start, when the store's last good config
        # runs instead (said in STATUS= until a reload of the file succeeds).
        self.refused = refused
        self.notifier = notifier or SystemdNotifier(None)
        self.store = store
        self.handed = handed
        before = None if handed is None else handed.document
        self._last_reload: str | None = None if before is None else before.last_reload
        self._reloaded = trio.Event()  # set (and replaced) after every reload
        self.config_path = config_path
        self._caps = caps
        self.tally = metrics.Tally() if before is None else metrics.Tally.restore(before.metrics)
        self._env = ServiceEnv(
            spawner,
            self.capabilities,
            store=store,
            on_rollout=self.tally.rollout,
            steering_check=config.supervisor.steering_check,
        )
        inheritances = inheritances or {}
        # Stopped by `supervisorctl stop`, until `start` (see switch.py).
        self.stopped: dict[str, Stopped] = {} if handed is None else dict(handed.stopped)
        self.services = {
            name: Service(name, service, self._env, inheritances.get(name))
            for name, service in config.services.items()
            if name not in self.stopped
        }
        self._send, self._receive = trio.open_memory_channel[Request](128)
        self.started_at = monotonic() if before is None else before.started_at
        self.upgrades = 0 if before is None else before.upgrades
        self.last_upgrade: dict[str, Any] | None = None
        self.watch_seen: dict[str, dict[str, str | None]] = (
            {} if before is None else {k: dict(v) for k, v in before.watch_seen.items()}
        )
        self._ready = False  # every service's first generation is serving
        self._services_nursery: trio.Nursery | None = None
        self.control: ControlServer | None = None
        self.control_sock: socket.socket | None = None  # the listening control socket
        self.metrics_sock: socket.socket | None = None  # metrics_listen's, if configured
        self.upgrade: UpgradeRun | None = None
        self._reloads = 0  # reload (and stop, start) tasks under way
        self._reloads_done = trio.Event()

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

    def load_checked(self) -> Checked:
        """The config file, validated against the schema, this host and this
        kernel; with the capabilities and certificates it was judged on (a
        reload decides with these: one read of each per reload).

        Raises:
            ConfigError: listing every issue.
        """
        certificates: dict[str, Served] = {}
        config = load_config(self.config_path, certificates=certificates)
        caps = self.capabilities()
        issues = list(check(config, caps))
        if issues:
            raise ConfigError(str(self.config_path), issues)
        return Checked(config, caps, certificates)

    def directory(self) -> ServiceDirectory:
        return ServiceDirectory(
            services=self.services,
            load=self.load_checked,
            current=lambda: self.config,
            start=self._start_service,
            stop=self.stop_service,
            stopped=lambda: self.stopped,
        )

    async def _start_service(self, name: str, config: Config) -> None:
        await self.start_service(name, config.services[name])

    async def start_service(
        self, name: str, config: ServiceConfig, *, first_generation: int = 1
    ) -> None:
        """Run a service (new in the file, or started again); return once it serves.

        Raises:
            SupervisorError: its first generation could not start.
        """
        assert self._services_nursery is not None
        service = Service(name, config, self._env, first_generation=first_generation)
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

    async def stop_service(self, name: str) -> None:
        """Stop every generation of a service; return once it has stopped."""
        service = self.services[name]
        service.request_stop()
        await service.stopped.wait()

    def status(self) -> Status:
        return Status(
            daemon=DaemonStatus(
                pid=os.getpid(),
                version=__version__,
                config=str(self.config_path),
                uptime=round(monotonic() - self.started_at, 3),
                upgrades=self.upgrades,
                last_upgrade=self.last_upgrade,
                fd_store=self.store.enabled,
            ),
            services={
                **{name: svc.snapshot() for name, svc in self.services.items()},
                **{name: off.snapshot(name) for name, off in self.stopped.items()},
            },
        )

    async def run(self) -> None:
        """Serve until a shutdown request; return once every worker is reaped.

        Raises:
            RolloutAborted: a service could not start (the others are stopped first).
            ControlError: the control socket could not be set up.
        """
        with self._control_socket() as sock:
            try:
                await self._run_with(sock)
            except* SupervisorError as group:
                # Nurseries wrap what they raise; callers get the first error itself.
                for exc in leaves(group):
                    log.error("daemon_failed", reason=str(exc))
                raise leaves(group)[0] from None
        log.info("daemon_stopped")

    @contextlib.contextmanager
    def _control_socket(self) -> Iterator[socket.socket]:
        section = self.config.supervisor
        inherited = None if self.handed is None else self.handed.control
        if inherited is None:
            with bound_control_socket(
                section.control_socket, section.control_socket_mode, section.control_socket_group
            ) as sock:
                yield sock
            return
        try:  # the earlier image bound it: clients waited in its backlog meanwhile
            yield inherited
        finally:
            inherited.close()
            with contextlib.suppress(FileNotFoundError):
                section.control_socket.unlink()

    def metrics_text(self, form: metrics.Format = "prometheus", *, textfile: bool = True) -> str:
        """Everything in ``form``. ``textfile``: for ``supervisorctl metrics``
        and node_exporter's textfile collector, whose own process_* metrics
        ours must not collide with (named ``PREFIX_process_*`` there).
        ``exposition`` is imported at the first call (its docstring: 12 MB)."""
        from supervisor.observe import exposition  # noqa: PLC0415

        return exposition.render(self.tally, self.services, form, textfile=textfile)

    def metrics_served(self, form: metrics.Format = "prometheus") -> str:
        """For ``GET /metrics`` at ``metrics_listen``."""
        return self.metrics_text(form, textfile=False)

    async def _run_with(self, sock: socket.socket) -> None:
        section = self.config.supervisor
        self.control_sock = sock
        with self._metrics_socket() as metrics_sock:
            self.metrics_sock = metrics_sock
            async with trio.open_nursery() as root:
                startup = trio.CancelScope()
                # Before anything is spawned: the new image of an upgrade starts
                # with these signals blocked, and its children must not.
                await root.start(signals.forward, partial(self._on_signal, startup))
                root.start_soon(self.notifier.keep_watchdog)
                control = ControlServer(
                    self._send, self.status, Access.from_config(section), self.metrics_text
                )
                self.control = control
                await root.start(self._serve_control, control, sock, root.cancel_scope)
                log.info("control_socket_ready", path=str(section.control_socket))
                if metrics_sock is not None:
                    await root.start(metrics_http.serve, metrics_sock, self.metrics_served)
                    log.info("metrics_ready", address=str(section.metrics_listen))
                await self._serve(startup, root, control)

    @contextlib.contextmanager
    def _metrics_socket(self) -> Iterator[socket.socket | None]:
        """metrics_listen's socket: bound, or the one an upgrade handed over."""
        address = self.config.supervisor.metrics_listen
        sock = None if self.handed is None else self.handed.metrics_sock
        if sock is None and address is not None:
            sock = metrics_http.bind(address)
        try:
            yield sock
        finally:
            if sock is not None:
                sock.close()

    async def _serve(
        self, startup: trio.CancelScope, root: trio.Nursery, control: ControlServer
    ) -> None:
        shutdown = await self._serve_services(startup, root)
        if shutdown is not None and shutdown.reply is not None:
            async with shutdown.reply:
                await shutdown.reply.send(protocol.result(message="all services stopped"))
        control.close()
        root.cancel_scope.cancel()  # the metrics endpoint ends with the control socket

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
                self._remember_config()
                self.notifier.ready(self.summary())
                if self.handed is not None:
                    handover.finish(self, root)
                root.start_soon(self._keep_watching)
                root.start_soon(
                    expiry.warn_daily, lambda: self.services, self.config.supervisor.tls_warn_before
                )
                shutdown = await self._request_loop(root)
            self.notifier.stopping()
            root.start_soon(self._escalate, services.cancel_scope)
            for service in list(self.services.values()):
                # With an fd store, a restart's next daemon takes the listeners over.
                service.request_stop(preserve=self.store.enabled)
        return shutdown

    async def _start_all(self, nursery: trio.Nursery) -> None:
        async with trio.open_nursery() as starter:
            for service in list(self.services.values()):
                starter.start_soon(nursery.start, self._run_service, service)

    async def _request_loop(self, root: trio.Nursery) -> Shutdown:
        """Take requests one at a time. A reload runs as its own task (services
        serialize their rollouts), so the loop stays free to take the next;
        while an upgrade runs, reloads wait for it."""
        async for request in self._receive:
            if isinstance(request, Shutdown):
                log.info("shutdown_requested", source=request.source)
                self.notifier.stopping()
                return request
            if isinstance(request, Reopen):
                self.reopen(request)
            elif isinstance(request, Signal):
                self.signal(request)
            elif isinstance(request, Switch):
                self._switch_soon(root, request)
            elif isinstance(request, Upgrade):
                if self.upgrade is not None:
                    self.upgrade.callers.append(request)
                else:
                    self.upgrade = UpgradeRun([request])
                    root.start_soon(handover.run_upgrade, self, root)
            elif self.upgrade is not None:
                handover.park(self.upgrade, request)
            else:
                self.start_reload(root, request)
        raise AssertionError("the request channel never closes while the daemon runs")

    def reopen(self, request: Reopen) -> None:
        """Each service's ``reopen_signal`` to every worker it runs (logrotate's
        SIGUSR1); a service without one is left alone."""
        having = {
            name: signal.Signals[service.config.reopen_signal]
            for name, service in self.services.items()
            if service.config.reopen_signal is not None
        }
        log.info("reopen_requested", source=request.source, services=list(having))
        for name, sig in having.items():
            pids = self.services[name].signal_workers(sig)
            log.info("reopen_forwarded", service=name, signal=sig.name, workers=len(pids))

    def signal(self, request: Signal) -> None:
        """``supervisorctl signal``: the signal to a service's workers; the answer
        names the pids it went to."""
        service = self.services.get(request.service)
        if service is None:
            answer = protocol.error(f"no service named {request.service!r}")
        else:
            sig = signal.Signals[request.signal]
            pids = service.signal_workers(sig, request.worker)
            log.info(
                "signal_sent",
                source=request.source,
                service=request.service,
                signal=sig.name,
                worker=request.worker,
                pids=pids,
            )
            if pids:
                answer = protocol.result(
                    message=f"{request.service}: {sig.name} sent to {len(pids)} worker(s)",
                    service=request.service,
                    signal=sig.name,
                    pids=pids,
                )
            else:
                which = (
                    "no worker runs"
                    if request.worker is None
                    else (f"no worker {request.worker} runs")
                )
                answer = protocol.error(f"{request.service}: {which}: nothing was sent")
        _answer(request.reply, answer)

    def _switch_soon(self, root: trio.Nursery, request: Switch) -> None:
        """A stop or start runs as its own task, counted as a reload is, so an
        upgrade waits for it; one asked for during an upgrade is refused."""
        if self.upgrade is not None:
            _answer(request.reply, protocol.error("an upgrade is under way: try again after it"))
            return
        self._reloads += 1

        async def run() -> None:
            try:
                answer = await switch(self, request)
            finally:
                self._reload_task_done()
            self.notifier.send(STATUS=self.summary())
            self._remember_config()
            _answer(request.reply, answer)

        root.start_soon(run)

    def start_reload(self, root: trio.Nursery, request: Reload) -> None:
        self._reloads += 1
        root.start_soon(self._reload, request)

    def take_waiting(self) -> list[Request]:
        """Requests already on the channel, not yet taken (for an upgrade's handover)."""
        out = []
        while True:
            try:
                out.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return out

    def busy(self) -> bool:
        """A reload or a rollout is under way or waiting."""
        return bool(self._reloads) or not all(svc.idle for svc in self.services.values())

    async def reloads_finished(self) -> None:
        """Return once no reload (and no rollout of any service) is under way."""
        while self.busy():
            if self._reloads:
                await self._reloads_done.wait()
            else:
                for service in list(self.services.values()):
                    await service.wait_idle()

    async def _reload(self, request: Reload) -> None:
        self.notifier.reload_started()
        answered = Answered({"ok": False, "message": "the reload was cut short"})
        try:
            answered = await handle_reload(self.directory(), request)
        finally:
            answer = answered.answer
            if answer.get("ok"):
                self.refused = None  # the file loaded
            elif answer.get("error") == CONFIG_REJECTED:  # no rollout ran to count it
                self.tally.refused([request.service] if request.service else self.services)
            self._remember_config()
            self._last_reload = answered.summary()
            self.notifier.reload_finished(self.summary())
            self._reloaded.set()
            self._reloaded = trio.Event()
            self._reload_task_done()

    def _reload_task_done(self) -> None:
        self._reloads -= 1
        if not self._reloads:
            self._reloads_done.set()
            self._reloads_done = trio.Event()

    @property
    def last_reload(self) -> str | None:
        return self._last_reload

    def watch_specs(self) -> dict[str, WatchSpec]:
        return {
            name: WatchSpec(
                tuple(svc.config.watch),
                svc.config.watch_debounce,
                self.watch_seen.setdefault(name, {}),
            )
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
            [
                f"{name} generation {svc.current.number if svc.current else 0} {svc.state().value}"
                for name, svc in self.services.items()
            ]
            + [f"{name} STOPPED" for name in self.stopped]
        )
        last = f"; last reload {self._last_reload}" if self._last_reload else ""
        refused = f"; running the last good config, the file was refused: {self.refused}"
        return f"{services}{last}{refused if self.refused else ''}"

    def running_config(self) -> Config:
        """The config that runs: each service's as its serving generation has it."""
        services = {name: off.config for name, off in self.stopped.items()}
        services.update({name: svc.config for name, svc in self.services.items()})
        return self.config.model_copy(update={"services": services})

    def _remember_config(self) -> None:
        """Keep the running config in systemd's store (a restart whose file is
        broken runs it instead of exiting, which would release the store). Without
        a store, nothing to serialize at every reload."""
        if self.store.enabled:
            self.store.keep_config(self.running_config().model_dump_json().encode())

    def send_nowait(self, request: Request) -> None:
        self._send.send_nowait(request)

    def export(
        self,
        ledger: Ledger,
        requested_at: float,
        clients: list[ClientDoc],
        pending: list[ClientDoc],
    ) -> DaemonDoc:
        """The whole daemon as the state document, with the upgrade's waiting
        ``clients`` and ``pending`` reloads; every fd goes in ``ledger``."""
        assert self.control_sock is not None
        metrics_sock = self.metrics_sock
        services = [svc.export(ledger) for svc in self.services.values()]
        return DaemonDoc(
            software=__version__,
            config_path=str(self.config_path),
            supervisor=self.config.supervisor.model_dump(mode="json"),
            control=ledger.put("control", self.control_sock.fileno()),
            metrics_socket=None
            if metrics_sock is None
            else ledger.put("metrics", metrics_sock.fileno()),
            started_at=self.started_at,
            upgrade_requested_at=requested_at,
            upgrades=self.upgrades + 1,
            services=services,
            clients=clients,
            pending=pending,
            watch_seen=self.watch_seen,
            last_reload=self.last_reload,
            metrics=self.tally.export(),
            stopped={name: off.export() for name, off in self.stopped.items()},
            ledger=ledger.entries(),
        )

    def adopted(self) -> list[TakeoverSummary]:
        return [svc.inherited for svc in self.services.values() if svc.inherited is not None]

    def upgraded(self, result: dict[str, Any]) -> None:
        self.last_upgrade = result
        self.tally.upgrades += 1

    async def _on_signal(self, startup: trio.CancelScope, request: Request) -> None:
        if isinstance(request, Shutdown) and not self._ready:
            # A stop during start-up must not wait for ready_timeout.
            log.info("shutdown_requested", source=request.source)
            self.notifier.stopping()
            startup.cancel()
        else:
            await self._send.send(request)

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


def _answer(reply: Reply | None, answer: dict[str, Any]) -> None:
    """The one answer to a request that takes no time to carry out."""
    if reply is not None:
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
            reply.send_nowait(answer)
        reply.close()
