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
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import structlog
import trio

from supervisor import __version__
from supervisor.control import protocol
from supervisor.control.requests import Reload, Reply, Request, Upgrade
from supervisor.control.server import ControlServer
from supervisor.daemon import signals, upgrade
from supervisor.daemon.switch import Stopped
from supervisor.daemon.systemd import SystemdNotifier
from supervisor.errors import UpgradeRefused
from supervisor.handoff import state
from supervisor.handoff.ledger import Ledger
from supervisor.handoff.state import ClientDoc, DaemonDoc
from supervisor.reports import Adopted, UpgradeResult
from supervisor.serve.service import TakeoverSummary

log = structlog.get_logger("supervisor.daemon.handover")

FORWARD_PASSES = 5


@dataclass
class Predecessor:
    """What the image before an in-place upgrade left to this one: its state
    document, and what this image took from the document's ledger for itself."""

    document: DaemonDoc
    control: socket.socket | None  # None: lost in the handover, bound anew
    metrics_sock: socket.socket | None
    clients: list[tuple[ClientDoc, int]]  # each with its connection's fd
    stopped: dict[str, Stopped] = field(default_factory=dict)


@dataclass
class UpgradeRun:
    """The upgrade under way: who asked, and the reloads that wait for it."""

    callers: list[Upgrade]
    parked: list[Reload] = field(default_factory=list)
    requested_at: float = field(default_factory=upgrade.monotonic)


class UpgradeHost(Protocol):
    """What an upgrade needs of the daemon, before the exec and after it."""

    upgrade: UpgradeRun | None
    control: ControlServer | None
    notifier: SystemdNotifier
    handed: Predecessor | None  # in the new image: what the old one left

    def busy(self) -> bool: ...

    async def reloads_finished(self) -> None: ...

    def take_waiting(self) -> list[Request]: ...

    def send_nowait(self, request: Request) -> None: ...

    def start_reload(self, root: trio.Nursery, request: Reload) -> None: ...

    def summary(self) -> str: ...

    def export(
        self,
        ledger: Ledger,
        requested_at: float,
        clients: list[ClientDoc],
        pending: list[ClientDoc],
    ) -> DaemonDoc:
        """The whole daemon as the state document; every fd goes in ``ledger``."""

    def adopted(self) -> list[TakeoverSummary]:
        """What each service took over at this image's start."""

    def upgraded(self, result: dict[str, Any]) -> None:
        """Record a finished upgrade (for ``status`` and the metrics)."""


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


async def run_upgrade(daemon: UpgradeHost, root: trio.Nursery) -> None:
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


def _absorb(daemon: UpgradeHost, run: UpgradeRun) -> None:
    """Requests that reached the channel but not the loop yet: theirs is this upgrade."""
    for request in daemon.take_waiting():
        if isinstance(request, Upgrade):
            run.callers.append(request)
        elif isinstance(request, Reload):
            park(run, request)
        else:  # a shutdown: back on the channel, for after a refused upgrade
            daemon.send_nowait(request)


def export(daemon: UpgradeHost, run: UpgradeRun, *, with_clients: bool = True) -> DaemonDoc:
    """The state document: the daemon's, with the run's waiting clients
    (services idle: no rollout runs). Every fd goes in one ledger."""
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
    return daemon.export(ledger, run.requested_at, clients, pending)


def finish(daemon: UpgradeHost, root: trio.Nursery) -> None:
    """In the new image, every service adopted: answer the upgrade's callers, then
    carry out the reloads that waited for it."""
    handed = daemon.handed
    assert handed is not None
    assert daemon.control is not None
    result = _result(handed.document, daemon.adopted()).wire()
    daemon.upgraded(result)
    log.info("upgrade_finished", **result)
    for client, fd in handed.clients:
        if client.command == "upgrade":
            root.start_soon(
                _answer, fd, protocol.result(message="upgrade succeeded", upgrade=result)
            )
    for client, fd in handed.clients:
        if client.command != "upgrade":
            daemon.control.adopt(fd, partial(_reload_for, client))
    for client in handed.document.pending:
        # Started here, not sent on the request channel: nothing reads it yet,
        # and it is bounded.
        daemon.start_reload(root, _reload_for(client, None))


def _reload_for(client: ClientDoc, reply: Reply | None) -> Reload:
    """The reload (or restart) a client asked for before the upgrade."""
    restart = client.command == "restart"
    return Reload(client.source, client.service, client.reason, reply, keep_config=restart)


def _result(document: DaemonDoc, took: list[TakeoverSummary]) -> UpgradeResult:
    return UpgradeResult(
        from_version=document.software,
        to_version=__version__,
        pid=os.getpid(),
        duration=round(upgrade.monotonic() - document.upgrade_requested_at, 4),
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
