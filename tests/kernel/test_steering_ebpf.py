"""eBPF steering against the real kernel: standby admission, pinned probes,
per-listener counters, and the migration policy (SELECT_OR_MIGRATE with
``tcp_migrate_req=0``: the program alone enables migration)."""

from __future__ import annotations

import select
import socket
from collections import Counter
from collections.abc import Iterator

import pytest

from supervisor.kernel import netstat
from supervisor.kernel.sockets import ListenerOptions, open_listener
from supervisor.steering import Role
from supervisor.steering.ebpf import EbpfGroup
from supervisor.values import ListenAddress

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


@pytest.fixture
def group(address: ListenAddress) -> Iterator[EbpfGroup]:
    steering = EbpfGroup(address)
    yield steering
    steering.close()


def members(group: EbpfGroup, roles: list[Role]) -> list[socket.socket]:
    socks = []
    for role in roles:
        sock = open_listener(group.address, ListenerOptions(backlog=4096))
        group.join(sock, role)
        socks.append(sock)
    group.apply()
    return socks


def queue_clients(address: ListenAddress, count: int) -> list[socket.socket]:
    """Connections that complete their handshake and wait, unaccepted, with a byte sent."""
    clients = []
    for _ in range(count):
        client = socket.create_connection(address.sockaddr, timeout=5)
        client.sendall(b"x")
        clients.append(client)
    return clients


def accept_all(sock: socket.socket) -> list[bytes]:
    sock.settimeout(0.5)
    got: list[bytes] = []
    while True:
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            return got
        with conn:
            conn.settimeout(5)
            got.append(conn.recv(1))


def test_standby_gets_nothing_but_its_probes_and_counters_match(group: EbpfGroup) -> None:
    roles = [Role.ACTIVE, Role.ACTIVE, Role.STANDBY, Role.ACTIVE, Role.STANDBY]
    socks = members(group, roles)
    accepted: Counter[int] = Counter()
    for _ in range(600):
        with socket.create_connection(group.address.sockaddr, timeout=5):
            ready, _, _ = select.select(socks, [], [], 2)
            for sock in ready:
                sock.accept()[0].close()
                accepted[socks.index(sock)] += 1
    assert set(accepted) == {0, 1, 3}, accepted
    assert max(accepted.values()) / min(accepted.values()) < 1.4, accepted
    for i, sock in enumerate(socks):
        counts = group.counts(sock)
        assert counts.syns == accepted[i], (i, counts, accepted)
        assert counts.probes == counts.migrated_in == 0
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    with group.pinned(socks[4], "127.0.0.1", probe.getsockname()[1]):
        probe.connect(group.address.sockaddr)
    ready, _, _ = select.select(socks, [], [], 2)
    assert ready == [socks[4]]
    assert group.counts(socks[4]).probes == 1
    assert group.counts(socks[4]).syns == 0
    probe.close()
    for sock in socks:
        sock.close()


def test_migrations_go_to_active_listeners_never_to_a_retiring_one(group: EbpfGroup) -> None:
    a, b, c, d = members(group, [Role.ACTIVE, Role.ACTIVE, Role.STANDBY, Role.STANDBY])
    clients = queue_clients(group.address, 40)
    queued_a = group.counts(a).syns
    assert queued_a > 0 and group.counts(b).syns > 0
    group.set_role([a, b], Role.RETIRING)
    group.set_role([c, d], Role.ACTIVE)
    group.apply()
    before = netstat.read()
    group.shutdown(a)  # b is still listening: the kernel's own hash could pick it
    assert group.counts(b).migrated_in == 0
    assert group.counts(c).migrated_in + group.counts(d).migrated_in == queued_a
    group.shutdown(b)
    assert group.counts(c).migrated_in + group.counts(d).migrated_in == 40
    payloads = accept_all(c) + accept_all(d)
    assert payloads == [b"x"] * 40, "every queued connection moved with its data"
    moved = netstat.delta(before, netstat.read())
    assert moved["TCPMigrateReqSuccess"] == 40
    assert moved["TCPMigrateReqFailure"] == 0
    for sock in (a, b, c, d, *clients):
        sock.close()


def test_with_no_active_listener_a_migration_is_dropped_not_misplaced(
    group: EbpfGroup,
) -> None:
    a, standby = members(group, [Role.ACTIVE, Role.STANDBY])
    clients = queue_clients(group.address, 10)
    assert group.counts(a).syns == 10
    group.set_role([a], Role.RETIRING)
    group.apply()
    before = netstat.read()
    group.shutdown(a)
    assert group.dropped_migrations() == (10, 0)
    assert netstat.delta(before, netstat.read())["TCPMigrateReqFailure"] == 10
    assert accept_all(standby) == [], "the standby candidate got nothing"
    for client in clients:
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        client.close()
    for sock in (a, standby):
        sock.close()


def test_refused_migration_is_dropped_and_counted(group: EbpfGroup) -> None:
    """A listener whose settings differ from the active ones never hands over."""
    old, new = members(group, [Role.ACTIVE, Role.STANDBY])
    clients = queue_clients(group.address, 5)
    group.set_role([old], Role.RETIRING)
    group.set_role([new], Role.ACTIVE)
    group.apply()
    assert group.refuse_migration(old)
    group.shutdown(old)
    assert group.dropped_migrations() == (0, 5)
    assert group.counts(new).migrated_in == 0
    assert accept_all(new) == []
    for sock in (old, new, *clients):
        sock.close()
