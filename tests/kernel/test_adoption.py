"""Taking over steering that an earlier image (or a crashed daemon) left in the kernel.

eBPF: the maps and the program are handed over by fd; the new owner reads
slots, roles and refusals back from the maps and steers on without a gap.
Classic BPF: the group's ``socks[]`` order is carried by an upgrade, or
learned by probing after a crash; the learned order matches the kernel's.
"""

from __future__ import annotations

import os
import select
import socket
from collections import Counter

import pytest

from supervisor.errors import SteeringError
from supervisor.kernel import bpf, cbpf
from supervisor.kernel.sockets import ListenerOptions, accept_queue, open_listener
from supervisor.steering import Role
from supervisor.steering.classic import CbpfGroup, build_program
from supervisor.steering.discover import socks_order
from supervisor.steering.ebpf import EbpfGroup
from supervisor.steering.ebpf_program import port_key, u32
from supervisor.values import ListenAddress

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def listeners(address: ListenAddress, count: int) -> list[socket.socket]:
    return [open_listener(address, ListenerOptions(backlog=4096)) for _ in range(count)]


def spread(address: ListenAddress, socks: list[socket.socket], count: int) -> Counter[int]:
    """Connect ``count`` times; which of ``socks`` accepted each."""
    got: Counter[int] = Counter()
    for _ in range(count):
        with socket.create_connection(address.sockaddr, timeout=5):
            ready, _, _ = select.select(socks, [], [], 2)
            for sock in ready:
                sock.accept()[0].close()
                got[socks.index(sock)] += 1
    return got


def pins_of(handed: dict[str, int]) -> bpf.Map:
    return bpf.Map(bpf.MAP_TYPE_HASH, 4, 4, 256, "pins", adopt=os.dup(handed["pins"]))


def test_ebpf_steering_is_adopted_from_its_fds(address: ListenAddress) -> None:
    old = EbpfGroup(address)
    socks = listeners(address, 3)
    for sock, role in zip(socks, [Role.ACTIVE, Role.ACTIVE, Role.STANDBY], strict=True):
        old.join(sock, role)
    old.apply()
    old.refuse_migration(socks[1])
    before = {i: old.counts(s).syns for i, s in enumerate(socks)}
    assert sum(spread(address, socks, 60).values()) == 60
    handed = {name: os.dup(fd) for name, fd in old.objects().items()}  # what exec keeps
    with pins_of(handed) as pins:  # a probe cut short by the exec leaves its pin behind
        pins.update(port_key(40000), u32(2))
    old.close(detach=False)  # the old image is gone; the kernel keeps everything

    new = EbpfGroup(address, adopt=handed)
    assert new.adopt_members(socks) == []
    assert [new.role(s) for s in socks] == [Role.ACTIVE, Role.ACTIVE, Role.STANDBY]
    assert new.counts(socks[0]).syns >= before[0], "the counters carried on"
    got = spread(address, socks, 200)
    assert set(got) == {0, 1}, got
    assert sum(new.counts(s).syns for s in socks[:2]) >= 260
    with pins_of(handed) as pins:
        assert pins.all_keys() == [], "the stale pin was deleted"
    new.set_role([socks[2]], Role.ACTIVE)
    new.set_role(socks[:2], Role.RETIRING)
    new.apply()
    assert set(spread(address, socks, 30)) == {2}
    new.shutdown(socks[0])
    assert new.dropped_migrations()[1] == 0
    new.close()
    for sock in socks:
        sock.close()


def test_an_adopted_fd_that_is_not_the_map_is_refused(address: ListenAddress) -> None:
    group = EbpfGroup(address)
    handed = {name: os.dup(fd) for name, fd in group.objects().items()}
    group.close()
    os.close(handed["table"])
    decoy = socket.socket()
    handed["table"] = decoy.detach()  # a socket where the table map should be
    with pytest.raises(SteeringError, match="adopt the eBPF steering") as caught:
        EbpfGroup(address, adopt=handed)
    assert "is socket:" in str(caught.value) and "not a BPF map" in str(caught.value)
    other = EbpfGroup(address)
    without = {k: os.dup(v) for k, v in other.objects().items() if k != "program"}
    other.close()
    with pytest.raises(SteeringError, match="the program was not handed over"):
        EbpfGroup(address, adopt=without)


def test_the_classic_order_is_learned_from_the_kernel(address: ListenAddress) -> None:
    """After joins and a leave that moved a member, probing finds the model's order."""
    model = CbpfGroup(address)
    socks = listeners(address, 5)
    for sock in socks:
        model.join(sock, Role.ACTIVE)
    model.shutdown(socks[1])  # the last member moves into index 1
    socks[1].close()
    live = [s for i, s in enumerate(socks) if i != 1]
    cbpf.attach(live[0], build_program(address.family, [0], []))  # some stale program
    scrambled = [live[2], live[0], live[3], live[1]]
    learned = socks_order(address, scrambled)
    assert learned == model.members, "the kernel's order, whatever order we held them in"
    assert sum(accept_queue(s).queued for s in live) == 4, "one probe connection per index"
    for sock in live:
        sock.close()


def test_the_classic_order_is_learned_with_every_accept_queue_full(
    address: ListenAddress,
) -> None:
    """A probe's SYN to a full queue is dropped: each member gets room for the
    probes meanwhile, and its own backlog back."""
    model = CbpfGroup(address)
    socks = [open_listener(address, ListenerOptions(backlog=1)) for _ in range(3)]
    for sock in socks:
        model.join(sock, Role.ACTIVE)
    clients = []
    for index in range(3):  # fill each queue (backlog + 1), steering by index
        cbpf.attach(socks[0], [cbpf.Insn(cbpf.RET_K, k=index)])
        clients += [socket.create_connection(address.sockaddr, timeout=5) for _ in range(2)]
    assert all(accept_queue(s).queued > accept_queue(s).limit for s in socks), "full"
    try:
        assert socks_order(address, socks[::-1]) == model.members
        assert [accept_queue(s).limit for s in socks] == [1, 1, 1], "backlogs restored"
        assert sum(accept_queue(s).queued for s in socks) == 6 + 3, "nothing dropped"
    finally:
        for sock in [*clients, *socks]:
            sock.close()
