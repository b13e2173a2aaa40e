"""Retirement of an old generation that no longer gets new connections
(docs/kernel.md §1, §4). Cutover (``cutover.promote``) comes first.

- *migrate*: after a short pause (the kernel race of docs/kernel.md §1:
  a handshake completing during close is reset; measured: none once
  the listener had been steered away 10 ms before), the old workers get
  their stop signal, then each old listener is ``shutdown(SHUT_RDWR)``; the
  kernel moves its accept queue and half-open requests to active listeners
  of its group (the supervisor's own reference keeps each queue alive
  while a worker closes its copy). Signal first: a worker that closes its
  listeners on its stop signal never sees ``accept()`` fail. nginx, which
  does, otherwise retries a failing ``accept()`` at once until it handles
  the signal: 16,219 "accept4() failed (22: Invalid argument)" alerts in 3
  reloads of 4 workers without load (1,293 signal-first), and the
  supervisor's CPU to relay them.
- *drain* (no migration, or the listeners' settings changed): the old
  workers keep accepting until every old listener's accept queue is empty
  and every handshake that was pending on its address at cutover has
  ended (sock_diag), or ``drain_timeout``; then, as above, the stop signal
  and the shutdown.

Datagram (UDP) listeners cannot migrate: on either path their old workers
keep reading until the old sockets' receive queues are empty.

The candidate already serves when retirement begins, so nothing here may
fail the rollout: a kernel read or a shutdown that fails becomes a line in
``problems``, the step falls back to what still works (the grace period
instead of sock_diag, the workers' own close instead of our shutdown), and
the old workers are stopped all the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio

from supervisor.errors import DiagError, SupervisorError
from supervisor.kernel import diag
from supervisor.kernel.proc import thread_schedstat
from supervisor.plan.capabilities import RetirePath
from supervisor.serve.generation import Generation
from supervisor.serve.listener import Listener
from supervisor.steering import ListenerCounts

log = structlog.get_logger("supervisor.serve.retire")

STEER_PAUSE = 0.01  # steered away this long before shutdown: closes the kernel race
HANDSHAKE_GRACE = 1.2  # drain without sock_diag: a lost SYN-ACK is retransmitted after 1 s
POLL = 0.01  # the kernel offers no event for "accept queue empty"
STABLE_POLLS = 2  # a child can be between its request's end and the queue for an instant


@dataclass
class Retirement:
    """What retiring a generation cost, measured at the listeners."""

    path: RetirePath
    why: str
    queued_at_cutover: int = 0
    handshakes_at_cutover: int = 0  # half-open on the old addresses (all listeners of the port)
    listeners: list[dict[str, object]] = field(default_factory=list)
    drained: int = 0  # queued at cutover and accepted by the old workers before shutdown
    left_at_shutdown: int = 0  # still queued when shut down: migrated, or lost without a target
    datagrams_left: int = 0  # bytes still unread in old datagram sockets at the deadline
    unmovable: list[str] = field(default_factory=list)
    drain_timed_out: bool = False
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # kernel failures met on the way
    drain_seconds: float = 0.0  # waiting for the old workers to empty their queues
    # From the old workers' stop signal (their listeners are shut down right after)
    # to the last one reaped, less the supervisor thread's own CPU meanwhile.
    stop_seconds: float = 0.0

    def problem(self, step: str, exc: SupervisorError) -> None:
        """Record a failure once (a failing read in a poll loop fails every poll)."""
        line = f"{step}: {exc}"
        if line not in self.problems:
            log.error("retirement_problem", step=step, error=str(exc))
            self.problems.append(line)


def _queued(lst: Listener, result: Retirement, step: str) -> int:
    try:
        return lst.queued()
    except SupervisorError as exc:
        result.problem(step, exc)
        return 0


async def retire(
    old: Generation, path: RetirePath, why: str, drain_timeout: float, *, refuse: bool = False
) -> Retirement:
    """Take ``old`` (already steered away) out of service; return once its workers are reaped.

    ``refuse``: the new listeners' settings differ, so no request may migrate
    to them (the program drops such migrations where the backend can).
    Never raises a ``SupervisorError``: failures are in ``problems``.
    """
    deadline = trio.current_time() + STEER_PAUSE + drain_timeout
    await trio.sleep(STEER_PAUSE)
    tcp = [lst for lst in old.listeners if lst.tcp and lst.in_group]
    udp = [lst for lst in old.listeners if not lst.tcp and lst.in_group]
    result = Retirement(path=path, why=why)
    for lst in tcp:
        queued = _queued(lst, result, "accept queue at cutover")
        result.queued_at_cutover += queued
        result.listeners.append(
            {"address": str(lst.address), "cookie": lst.cookie, "queued": queued}
        )
    if refuse:
        _refuse_migrations(tcp, result)
    drain_start = trio.current_time()
    if path == "drain":
        result.drain_timed_out = not await drain_tcp(tcp, deadline, result)
    result.datagrams_left = await drain_udp(udp, deadline, result)
    result.drain_seconds = trio.current_time() - drain_start
    stopping_from, ran = trio.current_time(), thread_schedstat()
    await old.signal_stop()
    for lst in tcp:
        shut_down(lst, result)
    result.drained = result.queued_at_cutover - min(
        result.left_at_shutdown, result.queued_at_cutover
    )
    log.info(
        "generation_retiring",
        path=path,
        why=why,
        queued_at_cutover=result.queued_at_cutover,
        handshakes_at_cutover=result.handshakes_at_cutover,
        left_at_shutdown=result.left_at_shutdown,
        datagrams_left=result.datagrams_left,
        problems=result.problems,
    )
    await old.stop()
    now = thread_schedstat()
    own = 0.0 if ran is None or now is None else now[0] - ran[0]
    result.stop_seconds = max(0.0, trio.current_time() - stopping_from - own)
    return result


def _refuse_migrations(tcp: list[Listener], result: Retirement) -> None:
    refused = []
    for lst in tcp:
        try:
            refused.append(lst.refuse_migration())
        except SupervisorError as exc:
            result.problem("refuse migrations", exc)
            refused.append(False)
    if not all(refused):
        result.notes.append(
            "migrations could not be refused (classic BPF cannot, or the kernel failed): "
            "connections still queued at drain_timeout move to the new listeners if "
            "migration is on, else are reset"
        )


def shut_down(lst: Listener, result: Retirement) -> int:
    """Shut ``lst`` down; if the kernel refuses, its workers' exit and our close
    take it out of the group instead (its queue migrates then, where it can).
    Returns how many connections were still queued on it. Also what retires
    a listener a start took over and no slot took (``inherit``)."""
    left = _queued(lst, result, "accept queue at shutdown")
    result.left_at_shutdown += left
    if left and not lst.active_peers():
        result.unmovable.append(
            f"{lst.address}: {left} queued connection(s) could not be moved: "
            "no listener remains on that address"
        )
    try:
        lst.shutdown()
    except SupervisorError as exc:
        result.problem(f"shutdown of {lst.address} (cookie {lst.cookie})", exc)
    return left


async def _until_stable(done: Callable[[], bool], deadline: float) -> bool:
    """Poll ``done`` until it holds STABLE_POLLS times in a row; False at ``deadline``."""
    stable = 0
    with trio.move_on_at(deadline):
        while stable < STABLE_POLLS:
            stable = stable + 1 if done() else 0
            if stable < STABLE_POLLS:
                await trio.sleep(POLL)
        return True
    return False


def _queues_empty(listeners: list[Listener], result: Retirement) -> bool:
    return all(_queued(lst, result, "accept queue while draining") == 0 for lst in listeners)


async def drain_tcp(listeners: list[Listener], deadline: float, result: Retirement) -> bool:
    """Wait until the old queues are empty and the handshakes pending at cutover ended.

    No new request can be created for a listener that is steered away; the
    eBPF counters prove it, and where the kernel's hash fallback did send a
    SYN to one after all, its handshake is awaited too. If sock_diag fails
    at any point, the rest of the drain waits for the grace period instead.
    """
    addresses = {lst.address for lst in listeners}
    try:
        pending = {address: set(diag.pending_handshakes(address)) for address in addresses}
    except DiagError as exc:
        result.problem("handshakes at cutover", exc)
        return await _drain_by_grace(listeners, deadline, result)
    result.handshakes_at_cutover = sum(len(cookies) for cookies in pending.values())
    syns = {lst.cookie: _counts(lst, result) for lst in listeners}

    def drained() -> bool:
        for lst in listeners:
            now = _counts(lst, result)
            if now != syns[lst.cookie]:  # steered here after all: wait for it too
                syns[lst.cookie] = now
                pending[lst.address] |= diag.pending_handshakes(lst.address)
        for address in [a for a, cookies in pending.items() if cookies]:
            pending[address] &= diag.pending_handshakes(address)
        return not any(pending.values()) and _queues_empty(listeners, result)

    try:
        return await _until_stable(drained, deadline)
    except DiagError as exc:
        result.problem("handshakes while draining", exc)
        return await _drain_by_grace(listeners, deadline, result)


def _counts(lst: Listener, result: Retirement) -> ListenerCounts | None:
    try:
        return lst.counts()
    except SupervisorError as exc:
        result.problem("steering counters while draining", exc)
        return None


async def _drain_by_grace(listeners: list[Listener], deadline: float, result: Retirement) -> bool:
    log.warning("handshakes_unobservable", grace=HANDSHAKE_GRACE)
    grace_over = trio.current_time() + HANDSHAKE_GRACE
    return await _until_stable(
        lambda: trio.current_time() >= grace_over and _queues_empty(listeners, result), deadline
    )


async def drain_udp(listeners: list[Listener], deadline: float, result: Retirement) -> int:
    """Wait until the old datagram sockets are read empty; return bytes left at ``deadline``."""

    def unread() -> int:
        total = 0
        for lst in listeners:
            try:
                total += lst.unread()
            except SupervisorError as exc:
                result.problem("datagram queue while draining", exc)
        return total

    if listeners:
        await _until_stable(lambda: unread() == 0, deadline)
    return unread() if listeners else 0
