"""Learn the kernel's ``socks[]`` order of a reuseport group we did not build.

Classic BPF steers by index into the group's listening section, so its model
must know the order of every member (docs/kernel.md §2). After a crash the
daemon gets its listeners back from systemd's fd store, still in their group,
in an order nobody remembers. This module asks the kernel: for each index k
it attaches a program that sends every new connection to ``socks[k]``,
connects once, and sees which listener's accept queue grew. Every SYN goes to
``socks[k]`` while that program is attached, so a real client's connection
can only add to the same queue; a handshake begun before (under the old
program) may complete meanwhile and make two queues grow, which is retried.

The probe connection is closed at once and stays queued: the worker that is
started on that listener accepts it and reads end-of-file. Only TCP groups
are discovered (a datagram probe would reach a worker as a datagram).

The queues may be full: clients kept connecting while nobody accepted (the
daemon and its workers dead). A probe's SYN to a full queue is dropped, so
every member is given room for the probes first, by listen() again with a
larger backlog, and its backlog back afterwards. Nothing queued is lost
either way: a smaller backlog only refuses what comes next.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Sequence

from supervisor.errors import KernelError, SteeringError, translated
from supervisor.kernel import cbpf
from supervisor.kernel.cbpf import Insn
from supervisor.kernel.sockets import QueueDepth, accept_queue
from supervisor.values import ListenAddress, connect_address

ATTEMPTS = 5
CONNECT_TIMEOUT = 1.0
# Room over what is queued, for our probes and the clients that a probe's
# program sends to the same member meanwhile (capped by net.core.somaxconn).
PROBE_ROOM = 64


def socks_order(address: ListenAddress, members: Sequence[socket.socket]) -> list[socket.socket]:
    """``members`` (every listening member of the group of ``address``, TCP, all
    held by us, none accepting yet) in the kernel's ``socks[]`` order.

    Raises:
        SteeringError: the order could not be established (a member we do not
            hold, a queue already at net.core.somaxconn, a kernel refusal); the caller must not
            steer by index then.
    """
    with (
        translated(SteeringError, f"learn the order of {address}"),
        _deferred_accept_off(members),
        _room_for_probes(members),
    ):
        order = [_member_at(address, members, index) for index in range(len(members))]
    if len(set(map(id, order))) != len(members):
        raise SteeringError(
            f"learn the order of {address}", OSError(0, "a member answered at two indices")
        )
    return order


def _member_at(
    address: ListenAddress, members: Sequence[socket.socket], index: int
) -> socket.socket:
    with translated(SteeringError, f"learn the order of {address}"):
        cbpf.attach(members[0], [Insn(cbpf.RET_K, k=index)])
        for _ in range(ATTEMPTS):
            before = [_queued(sock) for sock in members]
            with socket.create_connection(connect_address(address), CONNECT_TIMEOUT):
                pass
            grew = [sock for sock, was in zip(members, before, strict=True) if _queued(sock) > was]
            if len(grew) == 1:
                return grew[0]
        raise OSError(0, f"no single listener took index {index} in {ATTEMPTS} tries")


def _queued(sock: socket.socket) -> int:
    return _depth(sock).queued


def _depth(sock: socket.socket) -> QueueDepth:
    try:
        return accept_queue(sock)
    except KernelError as exc:
        raise OSError(exc.errno, str(exc)) from exc


@contextlib.contextmanager
def _deferred_accept_off(members: Sequence[socket.socket]) -> Iterator[None]:
    """TCP_DEFER_ACCEPT keeps a data-less probe out of the queue: off meanwhile."""
    saved = [sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) for sock in members]
    try:
        for sock, seconds in zip(members, saved, strict=True):
            if seconds:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 0)
        yield
    finally:
        for sock, seconds in zip(members, saved, strict=True):
            if seconds:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, seconds)


@contextlib.contextmanager
def _room_for_probes(members: Sequence[socket.socket]) -> Iterator[None]:
    """Each member's backlog at least ``PROBE_ROOM`` over its queue meanwhile."""
    depths = [_depth(sock) for sock in members]
    raised = []
    try:
        for sock, depth in zip(members, depths, strict=True):
            if depth.queued + PROBE_ROOM > depth.limit:
                sock.listen(depth.queued + PROBE_ROOM)
                raised.append((sock, depth.limit))
        yield
    finally:
        for sock, limit in raised:
            sock.listen(limit)
