"""Cutover and retirement of an old generation (KERNEL.md sections 1, 5, 6).

``promote`` steers new connections to the candidate only. ``retire`` then
takes the old generation out of service:

- *migrate*: after a short pause (the kernel race of KERNEL.md section 1,
  item 4: a handshake completing during close is reset; measured: none once
  the listener had been steered away 10 ms before), ``shutdown(SHUT_RDWR)``
  of each old listener; the kernel moves its accept queue and half-open
  requests to active listeners of its group. Then the old workers stop.
- *drain* (no migration): the old workers keep accepting until every old
  listener's queue is empty and a handshake grace has passed (or
  ``drain_timeout``); then shutdown, then the old workers stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
import trio

from supervisor.capabilities import RetirePath
from supervisor.generation import Generation, Listener
from supervisor.steering import Role, SteeringGroup

log = structlog.get_logger("supervisor.retire")

STEER_PAUSE = 0.01  # steered away this long before shutdown: closes the kernel race
HANDSHAKE_GRACE = 1.2  # drain: a lost SYN-ACK is retransmitted after 1 s
QUEUE_POLL = 0.01  # the kernel offers no event for "accept queue empty"


@dataclass
class Retirement:
    """What retiring a generation cost, measured at the listeners."""

    path: RetirePath
    queued_at_cutover: int = 0
    listeners: list[dict[str, object]] = field(default_factory=list)
    left_at_shutdown: int = 0  # still queued when shut down: migrated, or lost without a target
    unmovable: list[str] = field(default_factory=list)
    drain_timed_out: bool = False


def promote(candidate: Generation, old: Generation) -> None:
    """Steer every new connection to ``candidate``; ``old`` gets none from now on."""
    groups: dict[int, SteeringGroup] = {}
    for lst in old.listeners:
        if lst.in_group:
            lst.group.set_role([lst.sock], Role.RETIRING)
            groups[id(lst.group)] = lst.group
    for lst in candidate.listeners:
        lst.group.set_role([lst.sock], Role.ACTIVE)
        groups[id(lst.group)] = lst.group
    for group in groups.values():
        group.apply()


async def retire(old: Generation, path: RetirePath, drain_timeout: float) -> Retirement:
    """Take ``old`` (already steered away) out of service; return once its workers are reaped."""
    await trio.sleep(STEER_PAUSE)
    tcp = [lst for lst in old.listeners if lst.tcp and lst.in_group]
    result = Retirement(path=path)
    for lst in tcp:
        queued = lst.queued()
        result.queued_at_cutover += queued
        result.listeners.append(
            {"address": str(lst.address), "cookie": lst.cookie, "queued": queued}
        )
    if path == "drain":
        result.drain_timed_out = not await _drained(tcp, drain_timeout)
    for lst in tcp:
        _shut_down(lst, result)
    log.info(
        "generation_retiring",
        path=path,
        queued_at_cutover=result.queued_at_cutover,
        left_at_shutdown=result.left_at_shutdown,
    )
    await old.stop()
    return result


def _shut_down(lst: Listener, result: Retirement) -> None:
    left = lst.queued()
    result.left_at_shutdown += left
    has_target = any(lst.group.role(s) is Role.ACTIVE for s in lst.group.members)
    if left and not has_target:
        result.unmovable.append(
            f"{lst.address}: {left} queued connection(s) could not be moved: "
            "no listener remains on that address"
        )
    lst.group.shutdown(lst.sock)


async def _drained(listeners: list[Listener], limit: float) -> bool:
    """Wait until every queue is empty and the grace has passed; False after ``limit``."""
    start = trio.current_time()
    with trio.move_on_after(limit):
        while True:
            grace_over = trio.current_time() - start >= HANDSHAKE_GRACE
            if grace_over and all(lst.queued() == 0 for lst in listeners):
                return True
            await trio.sleep(QUEUE_POLL)
    return False
