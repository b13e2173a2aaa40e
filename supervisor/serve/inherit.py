"""What a starting service does with what it took over (``takeover``), in
two steps around its first generation:

- before it starts: every inherited socket is put in its group's model
  (``take_steering``): the eBPF objects adopted or replaced, the classic
  order carried or learned from the kernel. This is the one place that
  decides which inherited socket is a member;
- once it serves: what no slot took is shut down as a retirement shuts
  down an old generation's listeners (``retire_leftovers``).
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable, Iterator, Sequence

import structlog
import trio

from supervisor.config.schema import ServiceConfig
from supervisor.errors import (
    AdoptionKind,
    KernelError,
    SteeringError,
    SupervisorError,
    translated,
)
from supervisor.handoff.fdstore import FdStore
from supervisor.kernel.sockets import accept_queue
from supervisor.serve.listener import AdoptedListener, Listener
from supervisor.serve.retire import Retirement, shut_down
from supervisor.serve.takeover import AdoptedSteering, Takeover, addresses
from supervisor.steering import Role, Steering, SteeringGroup
from supervisor.steering.discover import socks_order
from supervisor.values import ListenAddress

log = structlog.get_logger("supervisor.serve.inherit")

TAKEOVER_TIMEOUT = 2.0  # a replaced program's old socket array lets go within this


async def take_steering(
    steering: Steering, found: Takeover, store: FdStore, config: ServiceConfig
) -> None:
    """Put every inherited socket in its group's model before the generation starts:
    adopt the group's eBPF objects (or replace them), or its classic order
    (carried, or learned from the kernel). This is the one place that decides
    which inherited socket is a member; the generation then only gives
    members their role. A socket that cannot be modelled is closed, reported
    and no longer inherited (its slot binds a new one). Leftovers on an
    address the config no longer has get no group: they are shut down once
    the generation serves."""
    for address in addresses(found) & set(config.listen):
        members = [i for (a, _), i in found.listeners.items() if a == address]
        leftovers = [i for a, i in found.leftovers if a == address]
        handover = found.groups.get(address, AdoptedSteering())
        if steering.backend == "ebpf":
            await _take_ebpf(
                steering, address, [*members, *leftovers], handover, found=found, store=store
            )
        else:
            _take_cbpf(
                steering, address, members, leftovers, handover=handover, found=found, store=store
            )
        for inherited in leftovers:
            if inherited.sock.fileno() >= 0:
                steering.group(address).set_role([inherited.sock], Role.RETIRING)


async def _take_ebpf(
    steering: Steering,
    address: ListenAddress,
    inherited: list[AdoptedListener],
    handover: AdoptedSteering,
    *,
    found: Takeover,
    store: FdStore,
) -> None:
    socks = [i.sock for i in inherited]
    if handover.ebpf is not None:
        try:
            unslotted = steering.adopt_ebpf(address, handover.ebpf, socks)
        except SteeringError as exc:
            found.note(
                "steering_made_anew",
                f"the steering of {address} could not be taken over ({exc}): made anew",
            )
        else:
            waiting = [i for i in inherited if i.sock in set(unslotted)]
            await _join_all(steering.group(address), waiting, found, store)
            return
    # New maps and a new program. The old program is still the group's, and
    # its socket array holds these sockets (a socket sits in one array only):
    # attach ours first, and the kernel lets the old array go.
    group = steering.group(address)
    if socks:
        try:
            group.take_over(socks[0])
        except SteeringError as exc:
            found.note(
                "steering_not_replaced",
                f"the steering of {address} could not be replaced: {exc}",
            )
    await _join_all(group, inherited, found, store)


async def _join_all(
    group: SteeringGroup, joining: Sequence[AdoptedListener], found: Takeover, store: FdStore
) -> None:
    """Join each of ``joining``; one that cannot is dropped. One shut down
    already (its worker was FATAL) stays out of the group: it takes no
    connection, and the kernel refuses it a place."""
    for item in joining:
        if not _listening(item.sock):
            continue
        failure = await _join_when_free(group, item.sock)
        if failure is not None:
            why = f"it could not join its steering ({failure})"
            _drop(group.address, [item], found, store, why, kind="steering_join_failed")


def _listening(sock: socket.socket) -> bool:
    try:
        return sock.type == socket.SOCK_DGRAM or accept_queue(sock).listening
    except SupervisorError:
        return False


async def _join_when_free(group: SteeringGroup, sock: socket.socket) -> SteeringError | None:
    """Join ``sock``, retrying while an old socket array still holds it (EBUSY);
    the last failure if it could not."""
    failure: SteeringError | None = None
    with trio.move_on_after(TAKEOVER_TIMEOUT):
        while True:
            try:
                group.join(sock, Role.STANDBY)
            except SteeringError as exc:
                failure = exc
                if exc.errno != errno.EBUSY:
                    break
                await trio.sleep(0.01)
            else:
                return None
    return failure


def _take_cbpf(
    steering: Steering,
    address: ListenAddress,
    members: list[AdoptedListener],
    leftovers: list[AdoptedListener],
    *,
    handover: AdoptedSteering,
    found: Takeover,
    store: FdStore,
) -> None:
    everyone = [*members, *leftovers]
    by_cookie = {i.cookie: i.sock for i in everyone}
    roles = {i.sock: Role.RETIRING for i in leftovers}
    order: list[socket.socket] | None = None
    if handover.order is not None and {c for c, _ in handover.order} <= set(by_cookie):
        order = [by_cookie[c] for c, _ in handover.order]
        roles.update({by_cookie[c]: r for c, r in handover.order if by_cookie[c] not in roles})
    elif address.proto == "tcp":
        try:
            order = socks_order(address, [i.sock for i in everyone])
        except SteeringError as exc:
            found.note(
                "order_unknown", f"the classic BPF order of {address} could not be learned: {exc}"
            )
    if order is None:
        _drop(address, everyone, found, store, "its steering order is unknown")
        return
    steering.adopt_cbpf(address, [(sock, roles.get(sock, Role.ACTIVE)) for sock in order])


def _drop(
    address: ListenAddress,
    inherited: Iterable[AdoptedListener],
    found: Takeover,
    store: FdStore,
    why: str,
    *,
    kind: AdoptionKind = "listener_closed",
) -> None:
    gone = {id(i) for i in inherited}
    found.listeners = {k: i for k, i in found.listeners.items() if id(i) not in gone}
    found.leftovers = [(a, i) for a, i in found.leftovers if id(i) not in gone]
    for item in inherited:
        found.note(kind, f"{address}: inherited listener {item.name} closed: {why}")
        store.drop(item.name)
        item.sock.close()


@contextlib.contextmanager
def _problem(result: Retirement, step: str) -> Iterator[None]:
    try:
        yield
    except SupervisorError as exc:
        result.problem(step, exc)


def retire_leftovers(
    steering: Steering, found: Takeover, store: FdStore, *, migrates: bool
) -> list[str]:
    """Shut down what was inherited and not taken (another generation's listeners,
    an address or worker the config no longer has), now that the new
    generation serves, as a retirement shuts down an old generation's
    listeners (``retire.shut_down``): the kernel migrates their queues to
    its active listeners where it can (``migrates``), and resets them where
    it cannot. Returns a line for each, with what it cost."""
    groups = dict(steering.items())
    result = Retirement(path="migrate" if migrates else "drain", why="inherited, not taken")
    lines = []
    for address, item in found.leftovers:
        if item.sock.fileno() < 0:
            continue
        group = groups.get(address)
        queued, moved = 0, False
        if group is not None and group.role(item.sock) is not None:
            lst = Listener(item.worker, address, item.sock, item.cookie, group, item.name, store)
            moved = migrates and lst.active_peers() > 0
            if lst.tcp:
                queued = shut_down(lst, result)
            else:
                with _problem(result, f"close of {address} ({item.name})"):
                    lst.discard()
        else:  # an address no longer served: nothing can take its queue
            with _problem(result, f"shutdown of {address} ({item.name})"):
                if address.proto == "tcp":
                    queued = accept_queue(item.sock).queued
                    with translated(KernelError, "shutdown"):
                        item.sock.shutdown(socket.SHUT_RDWR)
            store.drop(item.name)
        item.sock.close()
        fate = "moved to the new listeners" if moved else "reset: nothing can take them here"
        lines.append(f"{item.name}: {queued} queued connection(s) {fate}" if queued else item.name)
        log.info("inherited_listener_retired", name=item.name, queued=queued, moved=moved)
    for problem in result.problems:
        found.note("shutdown_failed", problem)
    return lines
