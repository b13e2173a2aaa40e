"""sock_diag: half-open handshakes, and a drain that waits for them.

Handshakes are held half-open with a tc filter on loopback (in the test's
private network namespace) that drops pure ACKs to the port: the server
keeps a request socket until the client's first data segment brings the
ACK along (docs/kernel.md §1).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import pytest
import trio

from supervisor.kernel import diag
from supervisor.kernel.sockets import ListenerOptions, open_listener, socket_cookie
from supervisor.serve.listener import Listener
from supervisor.serve.retire import Retirement, drain_tcp
from supervisor.steering import Role
from supervisor.steering.classic import CbpfGroup
from supervisor.values import ListenAddress, parse_listen
from tests.support.harness import free_port, wait_until

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


class Filters:
    """``hold(port)``: drop pure ACKs to ``port`` until ``release()``."""

    def __init__(self) -> None:
        self.active = False

    def __call__(self, port: int) -> None:
        # cBPF on the ingress of lo (the MAC header is pushed back: +14):
        # TCP, destination port, flags == ACK only -> TC_ACT_SHOT.
        code = f"8,48 0 0 23,21 0 5 6,40 0 0 36,21 0 3 {port},48 0 0 47,21 0 1 16,6 0 0 2,6 0 0 0"
        subprocess.run(["tc", "qdisc", "add", "dev", "lo", "clsact"], check=True)
        self.active = True
        ingress = ["tc", "filter", "add", "dev", "lo", "ingress", "protocol", "ip", "prio", "1"]
        subprocess.run([*ingress, "bpf", "da", "bytecode", code], check=True)

    def release(self) -> None:
        if self.active:
            subprocess.run(["tc", "qdisc", "del", "dev", "lo", "clsact"], check=True)
            self.active = False


@pytest.fixture
def hold_handshakes() -> Iterator[Filters]:
    filters = Filters()
    yield filters
    filters.release()


def half_open(address: ListenAddress, count: int) -> list[socket.socket]:
    """Clients whose handshake the server has not seen complete (their ACK was dropped)."""
    return [socket.create_connection(address.sockaddr, timeout=5) for _ in range(count)]


def test_pending_handshakes_are_seen_until_they_complete(hold_handshakes: Filters) -> None:
    address = parse_listen(f"127.0.0.1:{free_port()}")
    other = parse_listen(f"127.0.0.1:{free_port()}")
    with open_listener(address, ListenerOptions()) as sock, open_listener(other, ListenerOptions()):
        hold_handshakes(address.port)
        clients = half_open(address, 3)
        pending = diag.pending_handshakes(address)
        assert len(pending) == 3
        assert socket_cookie(sock) not in pending, "request sockets have cookies of their own"
        assert diag.pending_handshakes(other) == frozenset()
        hold_handshakes.release()
        for client in clients:
            client.sendall(b"x")  # carries the ACK: the request becomes a connection
        wait_until(lambda: not diag.pending_handshakes(address), 5, "the handshakes to end")
        sock.settimeout(5)
        for _ in clients:
            sock.accept()[0].close()
        for client in clients:
            client.close()


async def test_drain_waits_for_the_handshakes_pending_at_cutover(hold_handshakes: Filters) -> None:
    address = parse_listen(f"127.0.0.1:{free_port()}")
    group = CbpfGroup(address)
    old = open_listener(address, ListenerOptions())
    group.join(old, Role.ACTIVE)
    new = open_listener(address, ListenerOptions())
    group.join(new, Role.STANDBY)
    group.apply()
    hold_handshakes(address.port)
    clients = half_open(address, 3)  # all to old, the only active member
    group.set_role([old], Role.RETIRING)
    group.set_role([new], Role.ACTIVE)
    group.apply()
    retiring = Listener(0, address, old, socket_cookie(old), group)
    result = Retirement(path="drain", why="test")
    # The queue is empty, but three handshakes for it are still under way.
    with trio.move_on_after(0.5) as early:
        await drain_tcp([retiring], trio.current_time() + 30, result)
    assert early.cancelled_caught, "the drain must not end while handshakes are pending"
    assert result.handshakes_at_cutover == 3
    hold_handshakes.release()
    for client in clients:
        client.sendall(b"x")

    async def old_worker() -> None:  # accepts what completes onto the old listener
        accepted = 0
        while accepted < len(clients):
            await trio.lowlevel.wait_readable(old)
            old.accept()[0].close()
            accepted += 1

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(old_worker)
            assert await drain_tcp([retiring], trio.current_time() + 30, result)
    assert retiring.queued() == 0
    for sock in (old, new, *clients):
        sock.close()
