"""``supervisord``'s command line, and the three ways a daemon starts.

- fresh: the config file, every listener bound, every worker spawned;
- after a crash or ``systemctl restart`` (systemd's fd store passed
  ``LISTEN_FDS``): the stored listeners are taken over, so nothing queued on
  them was lost, and the workers are spawned on them;
- after an in-place upgrade (``--state-fd``, from the previous image):
  everything is taken over, nothing is bound or spawned that exists.

``--check`` validates a config file (exit 2 on any issue); with
``--state-fd`` it checks that this code can take over from a state document
(an upgrade runs it on the new code before it execs).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import pkgutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import structlog
import trio
from pydantic import ValidationError

from supervisor import __version__
from supervisor.config.loader import (
    check_host,
    environment_for_workers,
    host_warnings,
    issues_from_validation,
    load_config,
)
from supervisor.config.schema import Config, ServiceConfig, SupervisorSection
from supervisor.control import completion
from supervisor.daemon import signals, upgrade
from supervisor.daemon.daemon import Daemon
from supervisor.daemon.handover import Predecessor
from supervisor.daemon.switch import Stopped
from supervisor.daemon.systemd import SystemdNotifier
from supervisor.errors import ConfigError, FdLost, StateError, SupervisorError
from supervisor.handoff import fdstore
from supervisor.handoff.ledger import Ledger
from supervisor.handoff.state import DaemonDoc
from supervisor.kernel import proc, sysctl
from supervisor.kernel.proc import raise_fd_limit
from supervisor.observe import logs
from supervisor.plan.capabilities import Capabilities, check, detect, prepare
from supervisor.plan.plan import describe, plan_config, plan_rollout
from supervisor.serve import takeover
from supervisor.serve.spawner import ProcessSpawner

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
T = TypeVar("T")


log = structlog.get_logger("supervisor.daemon.startup")


def get_parser() -> argparse.ArgumentParser:
    """The command line (the man page and the shell completions are made from it)."""
    parser = argparse.ArgumentParser(
        prog="supervisord",
        description="Zero-downtime process supervisor (runs in the foreground). SIGHUP "
        "reloads every service, SIGUSR2 upgrades the daemon in place, SIGUSR1 sends each "
        "service's reopen_signal to its workers, SIGTERM and SIGINT stop it gracefully.",
        epilog="Exit status: 0 a clean stop, or --check passed; 1 it could not start (a "
        "listener could not be bound, a first worker failed, the control socket is in use); "
        "2 a bad config, every error printed as FILE: field.path: reason.",
    )
    parser.add_argument("-c", "--config", type=Path, required=True, help="config file (TOML)")
    parser.add_argument(
        "--check", action="store_true", help="validate the config, print the plan, exit"
    )
    parser.add_argument(
        upgrade.STATE_FD_FLAG,
        dest="state_fd",
        type=int,
        metavar="FD",
        help="(an upgrade passes this) take over from the state document at FD",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    completion.add_option(parser)
    return parser


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return get_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Exit 0 on a clean stop, 1 on failure, 2 on bad config."""
    try:
        _main(argv)
    except BrokenPipeError:  # `supervisord --check | head`: the reader left
        quiet_stdout()
        sys.exit(EXIT_FAILED)


def quiet_stdout() -> None:
    """Point stdout at /dev/null, so the exit does not fail flushing it again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _main(argv: Sequence[str] | None) -> None:
    args = _parse_args(argv)
    if args.state_fd is not None:
        if args.check:
            sys.exit(_check_state(args.state_fd))
        _continue_upgrade(args.state_fd)
        return
    if args.check:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            sys.exit(EXIT_CONFIG)
        sys.exit(_check(args.config, config))
    stored = fdstore.received(os.environ)
    config, refused = _config_or_last_good(args.config, stored)
    # Until the daemon's handlers are in place (signals.forward unblocks them),
    # a SIGHUP or SIGUSR1 waits instead of killing a daemon that is starting.
    # An upgrade's new image arrives with them blocked already.
    signals.block()
    logs.configure(config.supervisor.log_format, config.supervisor.log_level)
    caps = prepare(config.supervisor)
    issues = list(check(config, caps))
    if issues:
        print(ConfigError(str(args.config), issues), file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if refused is not None:
        log.error("config_file_refused", path=str(args.config), issues=refused, running="last good")
    for warning in host_warnings(config):
        log.warning("config_warning", warning=warning)
    notifier = SystemdNotifier.from_environment(os.environ)
    store = _store(config.supervisor, notifier)
    inheritances = _recover(config, stored, store)
    nofile = raise_fd_limit()
    spawner = ProcessSpawner(environment_for_workers(os.environ), nofile)
    _serve(
        lambda: Daemon(
            config,
            args.config.resolve(),
            spawner,
            caps,
            notifier,
            store=store,
            inheritances=inheritances,
            refused=None if refused is None else refused[0],
        )
    )


def _config_or_last_good(
    path: Path, stored: list[fdstore.StoredFd]
) -> tuple[Config, list[str] | None]:
    """The config file's; or, if it is refused and systemd's store kept the config
    the last daemon ran, that one and the file's issues (exit 2 without one).

    A restart with a broken file once exited 2, and the unit's stop released
    the store: every queued connection reset, the service down.
    """
    kept = fdstore.kept_config(stored)
    stored[:] = [item for item in stored if item.name != fdstore.CONFIG_NAME]
    try:
        return load_config(path), None
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        if kept is None:
            sys.exit(EXIT_CONFIG)
        try:
            last = Config.model_validate_json(kept)
        except ValidationError as invalid:
            print(f"supervisord: the stored config is no use either: {invalid}", file=sys.stderr)
            sys.exit(EXIT_CONFIG)
        print(f"supervisord: {path} refused: running the last good config", file=sys.stderr)
        return last, [f"{issue.location or path}: {issue.message}" for issue in exc.issues]


def _store(section: SupervisorSection, notifier: SystemdNotifier) -> fdstore.FdStore:
    return fdstore.FdStore(notifier.address if section.fd_store == "auto" else None)


# A reload makes and drops some 2,000 objects a worker; at the default
# thresholds (700, 10, 10) that ran 1.5 full collections a reload at 512
# workers, 207 ms of CPU of 1,285. At these: none, and 0.96 s a reload in
# all (measured with gc.callbacks). Refcounting still frees what is not cyclic.
GC_THRESHOLDS = (10_000, 10, 10)


def _serve(make: Callable[[], Daemon]) -> None:
    async def run() -> None:
        await make().run()

    gc.set_threshold(*GC_THRESHOLDS)

    try:
        trio.run(run)
    except SupervisorError as exc:
        print(f"supervisord: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    sys.exit(EXIT_OK)


def _recover(
    config: Config, stored: Sequence[fdstore.StoredFd], store: fdstore.FdStore
) -> dict[str, takeover.Takeover]:
    """What systemd's fd store handed back, sorted by service; what no service
    takes (a service the config no longer has, a name not ours) is closed
    and removed from the store."""
    if not stored:
        return {}
    takeover.log.info("fd_store_received", names=[item.name for item in stored])
    unique: dict[str, fdstore.StoredFd] = {}
    for item in stored:
        if item.name in unique:  # the store keeps fds by inode, not by name
            os.close(item.fd)
            takeover.log.warning("stored_fd_closed", name=item.name, reason="a second of that name")
        else:
            unique[item.name] = item
    ledger = Ledger.stored({name: item.fd for name, item in unique.items()})
    kept = list(unique.values())
    out = {
        name: takeover.from_store(name, svc, kept, ledger) for name, svc in config.services.items()
    }
    for name in ledger.close_untaken():
        store.drop(name)
        takeover.log.warning("stored_fd_closed", name=name, reason="no service takes it")
    return {name: found for name, found in out.items() if found.listeners or found.leftovers}


def _check(path: Path, config: Config) -> int:
    """``--check``: every issue (exit 2), or the plan and the retirement paths (exit 0)."""
    caps = detect(config.supervisor.steering)
    if config.supervisor.tcp_migrate_req == "enable" and os.access(sysctl.MIGRATE_REQ, os.W_OK):
        caps = replace(caps, migrate_req=1)  # what the daemon would switch on at start
    issues = list(check(config, caps))
    if issues:
        print(ConfigError(str(path), issues), file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: OK")
    for warning in host_warnings(config):
        print(f"warning: {warning}")
    plans = plan_config(config)
    print("\n".join(describe(plans)))
    for plan in plans:
        # What reloading this very config would do, on this host.
        print("\n".join(plan_rollout(plan, plan.config, plan.generation + 1, caps).describe()))
    print(f"capabilities: {caps.describe()}")
    return EXIT_OK


def _stopped_of(document: DaemonDoc) -> dict[str, Stopped]:
    """The services the previous image had stopped (``supervisorctl stop``).

    Raises:
        ConfigError: this code's schema refuses one's config.
    """
    try:
        return {name: Stopped.restore(data) for name, data in document.stopped.items()}
    except ValidationError as exc:
        raise ConfigError("a stopped service's config", issues_from_validation(exc)) from exc


def _config_of(document: DaemonDoc) -> Config:
    """The config the previous image ran (its stopped services' too), validated
    by this code's schema.

    Raises:
        ConfigError: this code's schema refuses it.
    """
    try:
        return Config(
            supervisor=SupervisorSection.model_validate(document.supervisor),
            services={
                **{name: off["config"] for name, off in document.stopped.items()},
                **{svc.name: ServiceConfig.model_validate(svc.config) for svc in document.services},
            },
        )
    except ValidationError as exc:
        raise ConfigError("the running config", issues_from_validation(exc)) from exc


def _check_state(fd: int) -> int:
    """``--check --state-fd``: can this code take over from that document?

    Also imports every module of the package: the new image imports some of
    them only later (the metrics exposition at the first scrape, tls at a reload), and
    a broken one found there costs everything the exec put at stake.
    """
    broken = _import_everything()
    if broken:
        print(f"supervisord {__version__}: cannot take over: {broken}", file=sys.stderr)
        return EXIT_FAILED
    try:
        document = upgrade.read_document(fd)
        config = _config_of(document)
        _stopped_of(document)
    except (StateError, ConfigError) as exc:
        print(f"supervisord {__version__}: cannot take over: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    issues = list(check_host(config))
    if issues:
        print(ConfigError("the running config", issues), file=sys.stderr)
        return EXIT_CONFIG
    names = ", ".join(svc.name for svc in document.services)
    print(
        f"supervisord {__version__}: can take over from {document.software} "
        f"(state version {document.version}; services {names})"
    )
    return EXIT_OK


def _import_everything() -> str | None:
    """Import every module of this package; the first that fails, and why."""
    import supervisor  # noqa: PLC0415

    for module in pkgutil.walk_packages(supervisor.__path__, "supervisor."):
        if module.name.endswith("__main__"):
            continue  # running it is not importing it
        try:
            importlib.import_module(module.name)
        except Exception as exc:  # noqa: BLE001  (any failure means: do not exec this code)
            return f"module {module.name} does not import: {type(exc).__name__}: {exc}"
    return None


def _continue_upgrade(fd: int) -> None:
    """The new image: take over from the previous one."""
    try:
        document = upgrade.read_document(fd)
        ledger = Ledger.received(document.ledger)  # first: before anything takes an fd
        config = _config_of(document)
        stopped = _stopped_of(document)
    except (StateError, ConfigError) as exc:
        # The old image is gone: with an fd store systemd restarts us and the
        # listeners are recovered from it; without, this costs what a crash does.
        print(f"supervisord: cannot continue the upgrade: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    logs.configure(config.supervisor.log_format, config.supervisor.log_level)
    if lost := ledger.lost():
        upgrade.log.warning("upgrade_fds_lost", fds=lost)
    # Before anything is spawned: a child that is not a worker of the document
    # is a command the old image ran (an exec probe, a preflight).
    if strays := proc.reap_strays(document.pids()):
        upgrade.log.info("upgrade_strays_reaped", pids=strays)
    caps: Capabilities = detect(config.supervisor.steering)
    notifier = SystemdNotifier.from_environment(os.environ)
    store = _store(config.supervisor, notifier)
    inheritances = {
        svc.name: takeover.from_upgrade(svc, config.services[svc.name], ledger)
        for svc in document.services
    }
    handed = Predecessor(
        document=document,
        control=_taken(document.control, ledger.take_socket),
        metrics_sock=_taken(document.metrics_socket, ledger.take_socket),
        clients=[
            (client, taken)
            for client in document.clients
            if (taken := _taken(client.connection, ledger.take_fd)) is not None
        ],
        stopped=stopped,
    )
    if untaken := ledger.close_untaken():
        upgrade.log.warning("upgrade_fds_untaken", names=untaken)
    nofile = raise_fd_limit()
    spawner = ProcessSpawner(environment_for_workers(os.environ), nofile)
    _serve(
        lambda: Daemon(
            config,
            Path(document.config_path),
            spawner,
            caps,
            notifier,
            store=store,
            inheritances=inheritances,
            handed=handed,
        )
    )


def _taken(name: str | None, take: Callable[[str], T]) -> T | None:
    """What the daemon itself takes from the ledger (its control and metrics
    sockets, its waiting clients' connections); None if it was lost: a
    socket is bound anew, a client gets no answer."""
    if name is None:
        return None
    try:
        return take(name)
    except FdLost as exc:
        upgrade.log.warning("upgrade_fd_lost", name=name, why=exc.why)
        return None
