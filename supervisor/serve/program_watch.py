"""The steering self-test: is the program of each group still ours?

A reuseport program belongs to the whole group, and any member's
``SO_ATTACH_REUSEPORT_EBPF`` replaces it: a worker that attaches its own
(nginx's QUIC module does) takes the group's steering from us without a
word. Standby listeners would then receive connections before their health
check, and a retirement would migrate by another program's rules.

So every ``interval`` one probe SYN is pinned to an active listener of the
serving generation: our program counts every pinned SYN it steers, so a
probe that connects but is not counted was steered by someone else's. Then
the processes holding the group's sockets are searched for the
SK_REUSEPORT program they hold (the one that replaced ours, most likely),
the replacement is reported as an error naming them, and our program is
attached again at once: steering is never left blind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import trio

from supervisor.errors import SupervisorError
from supervisor.kernel import members
from supervisor.serve.census import Known
from supervisor.serve.generation import Generation
from supervisor.serve.health import pinned_connector
from supervisor.serve.listener import Listener
from supervisor.steering import Role

log = structlog.get_logger("supervisor.serve.program_watch")
PROBE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Replaced:
    """One replacement of our program, as found and repaired."""

    address: str
    by: str  # who holds an SK_REUSEPORT program, or that nobody visible does
    repaired: bool
    error: str | None = None

    def describe(self) -> str:
        fix = "ours attached again" if self.repaired else f"ours NOT attached again: {self.error}"
        return f"{self.address}: the steering program was replaced ({self.by}); {fix}"


async def watch_programs(
    serving: Callable[[], Generation | None],
    interval: float,
    found: Callable[[Replaced], None],
) -> None:
    """Check the serving generation's groups every ``interval`` seconds, forever.
    ``serving`` gives None while a rollout changes the groups: no check then."""
    while True:
        await trio.sleep(interval)
        generation = serving()
        if generation is not None:
            for replaced in await check_generation(generation, serving):
                found(replaced)


async def check_generation(
    generation: Generation, serving: Callable[[], Generation | None]
) -> list[Replaced]:
    """Probe one active listener of each of ``generation``'s eBPF groups (a
    group without counters, classic BPF's, cannot tell)."""
    probed: dict[int, Listener] = {}
    for lst in generation.listeners:
        if lst.tcp and lst.role is Role.ACTIVE:
            probed.setdefault(id(lst.group), lst)
    out = []
    for lst in probed.values():
        if serving() is not generation or lst.role is not Role.ACTIVE:
            break  # a rollout began: the groups are changing under us
        replaced = await _check(lst, generation, serving)
        if replaced is not None:
            out.append(replaced)
    return out


async def _check(
    lst: Listener, generation: Generation, serving: Callable[[], Generation | None]
) -> Replaced | None:
    address = str(lst.address)
    try:
        before = lst.counts()
        if before is None:
            return None
        with trio.move_on_after(PROBE_TIMEOUT) as timeout:
            stream = await pinned_connector(lst)()
        if timeout.cancelled_caught:
            log.warning("steering_self_test_inconclusive", address=address, reason="timeout")
            return None
        with contextlib.suppress(OSError, trio.BrokenResourceError):
            await stream.aclose()
        if serving() is not generation or lst.role is not Role.ACTIVE:
            return None  # a rollout began while we probed
        after = lst.counts()
    except (OSError, SupervisorError) as exc:  # seam: the probe's connect (trio raises OSError)
        log.warning("steering_self_test_inconclusive", address=address, error=str(exc))
        return None
    if after is None or after.probes > before.probes:
        return None
    by = _holders_of_programs(generation, lst)
    try:
        lst.group.take_over(lst.sock)
    except SupervisorError as exc:
        replaced = Replaced(address, by, repaired=False, error=str(exc))
    else:
        replaced = Replaced(address, by, repaired=True)
    log.error(
        "steering_program_replaced",
        address=address,
        by=by,
        repaired=replaced.repaired,
        error=replaced.error,
    )
    return replaced


def _holders_of_programs(generation: Generation, lst: Listener) -> str:
    """Who holds an SK_REUSEPORT program among the processes holding the group's sockets."""
    inodes = [os.fstat(m.fileno()).st_ino for m in lst.group.members if m.fileno() >= 0]
    holding = {h.pid: h for held in members.holders(inodes).values() for h in held}
    known = Known.of([generation])
    named = []
    for pid, ids in sorted(members.reuseport_programs(holding).items()):
        worker = known.worker_of(pid)
        which = "" if worker is None else f", worker {worker[1]} of generation {worker[0]}"
        programs = ", ".join(map(str, ids))
        named.append(f"{holding[pid]}{which} holds SK_REUSEPORT program id {programs}")
    return "; ".join(named) or "no process holding its sockets holds an SK_REUSEPORT program"
