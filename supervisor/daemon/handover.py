"""The daemon's side of an in-place upgrade: before the exec, and after it.

Before (old image), one upgrade at a time: callers who ask meanwhile share
it, reloads asked for meanwhile wait for it (and are carried across the
exec, with their clients), and it waits for the reloads under way. Then the
new code is checked, the control socket paused (clients wait in its
backlog), the state written and the new image exec'd. If anything before
the exec fails, the upgrade is refused with the reason and nothing changed.

After (new image), once every service is adopted: the upgrade's callers get
the result on the connections the old image accepted, and the reloads that
waited are carried out.
"""

from __future__ import annotations

import contextlib
import os
import socket
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
import trio

from supervisor import __version__
from supervisor.control import protocol
from supervisor.control.requests import Reload, Reply, Upgrade
from supervisor.daemon import signals, upgrade
from supervisor.errors import UpgradeRefused
from supervisor.handoff import state
from supervisor.handoff.ledger import Ledger
from supervisor.handoff.state import ClientDoc, DaemonDoc
from supervisor.reports import Adopted, UpgradeResult

if TYPE_CHECKING:
    from supervisor.daemon.daemon import Daemon, UpgradeRun

log = structlog.get_logger("supervisor.daemon.handover")

FORWARD_PASSES = 5


def _tell(run: UpgradeRun, message: dict[str, Any]) -> None:
    for caller in run.callers:
        if caller.reply is not None:
            with contextlib.suppress(
                trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                caller.reply.send_nowait(message)


def park(run: UpgradeRun, request: Reload) -> None:
    """A reload asked for during the upgrade waits for it. One without a client
    (a signal, a watched file) is parked once per target: a second would roll
    out the same config again, and a burst of SIGHUPs must not grow the list."""
    if request.reply is None and any(
        parked.reply is None and parked.service == request.service for parked in run.parked
    ):
        log.debug("reload_coalesced", source=request.source, service=request.service)
        return
    run.parked.append(request)
    log.debug("reload_parked", source=request.source, service=request.service)
    if request.reply is not None:
        with contextlib.suppress(
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            request.reply.send_nowait(protocol.progress("waiting for the upgrade under way"))


async def run_upgrade(daemon: Daemon, root: trio.Nursery) -> None:
    """Upgrade ``daemon`` in place; returns only if the upgrade was refused."""
    run = daemon.upgrade
    assert run is not None
    assert daemon.control is not None
    reason = "the daemon is shutting down"
    try:
        log.info("upgrade_requested", callers=[c.source for c in run.callers])
        if daemon.busy():
            _tell(run, protocol.progress("waiting for the reload under way"))
        await daemon.reloads_finished()
        entry = upgrade.entry_point()
        _tell(run, protocol.progress(f"checking the new code: {entry[0]} --check"))
        draft = state.encode(export(daemon, run, with_clients=False))
        checked = await upgrade.check_new_code(entry, draft)
        log.info("upgrade_checked", output=checked)
        _tell(run, protocol.progress("new code checked; handing over"))
        await daemon.control.pause()
        # From here a signal stays pending in the kernel and reaches the new
        # image (the mask and pending signals survive execve). One the old
        # image's handler took already is turned into a request first, and
        # absorbed into the document: otherwise the exec would drop it.
        with signals.blocked():
            await _signals_forwarded()
            _absorb(daemon, run)
            document = export(daemon, run)
            daemon.notifier.reload_started()
            environ = {**os.environ, **daemon.notifier.environment()}
            error = upgrade.execute(entry, document, environ)  # returns only if it failed
        daemon.notifier.reload_finished(daemon.summary())
        reason = f"exec {entry[0]} failed: {error}"
    except UpgradeRefused as exc:
        reason = str(exc)
    finally:
        log.error("upgrade_refused", reason=reason)
        answer = protocol.error("upgrade refused", [reason], software=__version__)
        for caller in run.callers:
            if caller.reply is not None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    async with caller.reply:
                        await caller.reply.send(answer)
        daemon.upgrade = None
        daemon.control.resume()
        for request in run.parked:
            daemon.start_reload(root, request)


async def _signals_forwarded() -> None:
    """Let the signal forwarder turn what its receiver holds into requests.

    With the mask on, nothing new arrives, and what did arrive has made the
    forwarder runnable already: one pass takes the signal, one sends the
    request, one lets the request loop park it. A few scheduler passes are
    enough (trio.testing.wait_all_tasks_blocked would be exact, but importing
    trio.testing costs the daemon 9.6 MiB of RSS)."""
    for _ in range(FORWARD_PASSES):
        await trio.lowlevel.checkpoint()


def _absorb(daemon: Daemon, run: UpgradeRun) -> None:
    """Requests that reached the channel but not the loop yet: theirs is this upgrade."""
    for request in daemon.take_waiting():
        if isinstance(request, Upgrade):
            run.callers.append(request)
        elif isinstance(request, Reload):
            park(run, request)
        else:  # a shutdown: back on the channel, for after a refused upgrade
            daemon.send_nowait(request)


def export(daemon: Daemon, run: UpgradeRun, *, with_clients: bool = True) -> DaemonDoc:
    """The whole daemon as the state document (services idle: no rollout runs).
    Every fd that crosses goes in one ledger, and the document names it."""
    assert daemon.control_sock is not None
    ledger = Ledger()
    clients: list[ClientDoc] = []
    pending: list[ClientDoc] = []
    if with_clients:
        clients += [
            ClientDoc(
                connection=ledger.put(f"client/{i}", caller.connection),
                command="upgrade",
                source=caller.source,
            )
            for i, caller in enumerate(run.callers)
            if caller.connection is not None
        ]
        for i, request in enumerate(run.parked):
            item = ClientDoc(
                connection=None
                if request.connection is None
                else ledger.put(f"parked/{i}", request.connection),
                command="restart" if request.keep_config else "reload",
                service=request.service,
                reason=request.reason,
                source=request.source,
            )
            (clients if request.connection is not None else pending).append(item)
    metrics_sock = daemon.metrics_sock
    services = [svc.export(ledger) for svc in daemon.services.values()]
    return DaemonDoc(
        software=__version__,
        config_path=str(daemon.config_path),
        supervisor=daemon.config.supervisor.model_dump(mode="json"),
        control=ledger.put("control", daemon.control_sock.fileno()),
        metrics_socket=None
        if metrics_sock is None
        else ledger.put("metrics", metrics_sock.fileno()),
        started_at=daemon.started_at,
        upgrade_requested_at=run.requested_at,
        upgrades=daemon.upgrades + 1,
        services=services,
        clients=clients,
        pending=pending,
        watch_seen=daemon.watch_seen,
        last_reload=daemon.last_reload,
        metrics=daemon.tally.export(),
        stopped={name: off.export() for name, off in daemon.stopped.items()},
        ledger=ledger.entries(),
    )


def finish(daemon: Daemon, root: trio.Nursery) -> None:
    """In the new image, every service adopted: answer the upgrade's callers, then
    carry out the reloads that waited for it."""
    handed = daemon.handed
    assert handed is not None
    assert daemon.control is not None
    result = _result(daemon).wire()
    daemon.last_upgrade = result
    daemon.tally.upgrades += 1
    log.info("upgrade_finished", **result)
    for client, fd in handed.clients:
        if client.command == "upgrade":
            root.start_soon(
                _answer, fd, protocol.result(message="upgrade succeeded", upgrade=result)
            )
    for client, fd in handed.clients:
        if client.command != "upgrade":
            daemon.control.adopt(fd, partial(_reload_for, client))
    for client in handed.pending:
        # Started here, not sent on the request channel: nothing reads it yet,
        # and it is bounded.
        daemon.start_reload(root, _reload_for(client, None))


def _reload_for(client: ClientDoc, reply: Reply | None) -> Reload:
    """The reload (or restart) a client asked for before the upgrade."""
    restart = client.command == "restart"
    return Reload(client.source, client.service, client.reason, reply, keep_config=restart)


def _result(daemon: Daemon) -> UpgradeResult:
    handed = daemon.handed
    assert handed is not None
    took = [svc.inherited for svc in daemon.services.values() if svc.inherited is not None]
    return UpgradeResult(
        from_version=handed.software,
        to_version=__version__,
        pid=os.getpid(),
        duration=round(upgrade.monotonic() - handed.requested_at, 4),
        adopted=Adopted(
            services=len(took),
            listeners=sum(t.listeners for t in took),
            workers=sum(t.workers for t in took),
        ),
        restarted=sum(t.restarted for t in took),
        problems=[p for t in took for p in t.problems],
    )


async def _answer(fd: int, message: dict[str, Any]) -> None:
    raw = socket.socket(fileno=fd)
    raw.set_inheritable(False)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(protocol.encode(message))
