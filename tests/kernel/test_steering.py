"""The steering model and its cBPF program, against the real kernel."""

from __future__ import annotations

import errno
import os
import select
import socket
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from supervisor.config.schema import MAX_WORKERS
from supervisor.kernel import cbpf
from supervisor.kernel.sockets import ListenerOptions, open_listener
from supervisor.kernel.sysctl import MIGRATE_REQ, set_migrate_req
from supervisor.steering import Role
from supervisor.steering.classic import CbpfGroup, build_program
from supervisor.steering.ebpf_program import SLOTS
from supervisor.values import parse_listen
from tests.conftest import HOST_NETNS_INODE
from tests.support.harness import free_port

pytestmark = [pytest.mark.kernel, pytest.mark.slow]
# Returns the low byte of the source port: connecting from port 256*r + k
# reveals which socket sits at index k of the listening section.
INDEX_BY_SPORT = [
    cbpf.Insn(cbpf.LDX_B_MSH, k=cbpf.SKF_NET_OFF),
    cbpf.Insn(cbpf.LD_H_IND, k=cbpf.SKF_NET_OFF),
    cbpf.Insn(0x54, k=0xFF),  # A &= 0xff
    cbpf.Insn(cbpf.RET_A),
]


@pytest.fixture
def migrate_req() -> Iterator[None]:
    original = MIGRATE_REQ.read_text()
    yield
    MIGRATE_REQ.write_text(original)


Who = Callable[[int, list[socket.socket], int], socket.socket | None]


def who_accepts(port: int, socks: list[socket.socket], sport: int) -> socket.socket | None:
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    client.bind(("127.0.0.1", sport))
    client.connect(("127.0.0.1", port))
    ready, _, _ = select.select(socks, [], [], 2)
    client.close()
    for sock in ready:
        try:
            sock.accept()[0].close()
        except OSError as exc:  # a shut-down listener is readable, accept() says EINVAL
            if exc.errno != errno.EINVAL:
                raise
            continue
        return sock
    return None


def who_receives(port: int, socks: list[socket.socket], sport: int) -> socket.socket | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        client.bind(("127.0.0.1", sport))
        client.sendto(b"which", ("127.0.0.1", port))
    ready, _, _ = select.select(socks, [], [], 2)
    for sock in ready:
        sock.recv(16)
    return ready[0] if len(ready) == 1 else None


class Rounds:
    def __init__(self) -> None:
        self.round = 100

    def kernel_order(
        self, port: int, group: CbpfGroup, live: list[socket.socket], who: Who = who_accepts
    ) -> list[socket.socket]:
        """Ask the kernel which socket is at each index (then restore our program)."""
        cbpf.attach(group.members[0], INDEX_BY_SPORT)
        self.round += 1
        order = []
        for k in range(len(group.members)):
            sock = who(port, live, 256 * self.round + k)
            assert sock is not None
            order.append(sock)
        group.apply()
        return order


class Scripted:
    """A group on a free port whose members a test adds, removes and checks."""

    def __init__(self, scheme: str, who: Who) -> None:
        self.port = free_port()
        self.address = parse_listen(f"{scheme}127.0.0.1:{self.port}")
        self.group = CbpfGroup(self.address)
        self.rounds = Rounds()
        self.live: list[socket.socket] = []
        self.who = who

    def add(self) -> socket.socket:
        sock = open_listener(self.address, ListenerOptions())
        self.group.join(sock, Role.ACTIVE)
        self.live.append(sock)
        return sock

    def check(self) -> None:
        """The model's order is the kernel's (closed sockets left out)."""
        self.live[:] = [s for s in self.live if s.fileno() >= 0]
        order = self.rounds.kernel_order(self.port, self.group, self.live, self.who)
        assert order == self.group.members

    def close(self) -> None:
        for sock in self.live:
            sock.close()


def test_model_matches_kernel_through_listen_shutdown_close(migrate_req: None) -> None:
    script = Scripted("", who_accepts)
    group, listen, check = script.group, script.add, script.check

    set_migrate_req(0)
    l0, l1, l2, l3 = (listen() for _ in range(4))
    check()
    group.shutdown(l1)  # detached (no migration): swap with last
    check()
    l4 = listen()
    check()
    set_migrate_req(1)
    group.shutdown(l0)  # into the closed section: the listening section still swaps
    check()
    l1.close()
    l0.close()  # closing closed-section members changes nothing we model
    check()
    l5 = listen()
    group.shutdown(l4)
    check()
    # a close() that drops the last reference also leaves: the model is told
    group.leave(l2)
    l2.close()
    check()
    assert group.members == [l5, l3]
    script.close()


def test_model_matches_kernel_for_datagram_members() -> None:
    """A UDP member leaves its group only when its last reference closes."""
    script = Scripted("udp://", who_receives)
    group, bind, check = script.group, script.add, script.check
    l0, l1, _l2, _l3 = (bind() for _ in range(4))
    check()
    group.discard(l1)
    check()
    bind()
    group.discard(l0)
    check()
    assert len(group.members) == 3
    script.close()


def test_standby_gets_nothing_but_its_pinned_probes() -> None:
    port = free_port()
    address = parse_listen(f"127.0.0.1:{port}")
    group = CbpfGroup(address)
    socks = []
    for role in (Role.ACTIVE, Role.ACTIVE, Role.STANDBY, Role.ACTIVE, Role.STANDBY):
        sock = open_listener(address, ListenerOptions(backlog=4096))
        group.join(sock, role)
        socks.append(sock)
    group.apply()
    counts: Counter[int] = Counter()
    for _ in range(1500):
        with socket.create_connection(("127.0.0.1", port)):
            ready, _, _ = select.select(socks, [], [], 2)
            for sock in ready:
                sock.accept()[0].close()
                counts[socks.index(sock)] += 1
    assert set(counts) == {0, 1, 3}, counts
    assert max(counts.values()) / min(counts.values()) < 1.3, counts
    # A probe pinned by its exact source address and port reaches the standby.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    with group.pinned(socks[4], "127.0.0.1", probe.getsockname()[1]):
        probe.connect(("127.0.0.1", port))
    ready, _, _ = select.select(socks, [], [], 2)
    assert ready == [socks[4]]
    probe.close()
    for sock in socks:
        sock.close()


def test_program_shapes() -> None:
    v4 = build_program(socket.AF_INET, [0, 2], [(0x7F000001, 40000, 1)])
    assert v4[-1] == cbpf.Insn(cbpf.RET_K, k=2)
    assert cbpf.Insn(cbpf.RET_K, k=1) in v4
    empty = build_program(socket.AF_INET6, [], [])
    assert empty[-1].k == 0xFFFF
    with pytest.raises(ValueError, match="1 to 4096"):
        cbpf.encode([])


def test_the_session_runs_in_its_own_network_namespace() -> None:
    # So the sysctl writes above never touch the host.
    assert os.stat("/proc/self/ns/net").st_ino != HOST_NETNS_INODE


def test_the_worker_limit_fits_both_steering_backends() -> None:
    # A reload holds two generations of MAX_WORKERS in one group: the eBPF
    # sockarray must have a slot for each, and the classic program with every
    # listener active and every one pinned by a probe must fit BPF_MAXINSNS.
    assert 2 * MAX_WORKERS <= SLOTS
    worst = build_program(socket.AF_INET6, list(range(MAX_WORKERS)), [(0, 0, 0)] * MAX_WORKERS)
    assert len(worst) <= 4096
