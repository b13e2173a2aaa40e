"""eBPF steering of one reuseport group (needs CAP_BPF; KERNEL.md section 3).

Members sit in a ``REUSEPORT_SOCKARRAY`` by identity (a slot each), so no
index model is needed and the program stays attached across membership
changes. The program is loaded as ``SELECT_OR_MIGRATE``, which enables
migration for the group even with ``tcp_migrate_req=0``:

- a SYN from a pinned source port goes to its pinned slot (health probes);
- any other SYN goes to an active slot, ``hash % n`` over the active table;
- a migrating request goes to an active slot only, never to another
  retiring one; with no active slot it is refused (SK_DROP);
- SYNs and migrations are counted per slot.

The active table is double-buffered in an ARRAY map: the supervisor writes
the idle bank, then flips one word, so the program never sees a half-written
table.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import structlog

from supervisor.errors import KernelFeatureMissing
from supervisor.kernel import bpf
from supervisor.kernel.ebpf_asm import (
    MAP_LOOKUP_ELEM,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    R8,
    R9,
    R10,
    SK_SELECT_REUSEPORT,
    Asm,
)
from supervisor.kernel.sockets import socket_cookie
from supervisor.steering import Role
from supervisor.values import ListenAddress

log = structlog.get_logger("supervisor.steering")
ObjT = TypeVar("ObjT", bound=bpf.BpfObject)
SO_ATTACH_REUSEPORT_EBPF = 52
SLOTS = 1024  # members of one group at once (two generations of up to 512 workers)
BANK = SLOTS + 1  # one bank: [n, slot_0 .. slot_{n-1}]
# Counters: per slot [3*slot + kind], kind 0 = client SYNs, 1 = migrations in,
# 2 = pinned probe SYNs; then two for the whole group.
PER_SLOT = 3
NO_TARGET_SYN = PER_SLOT * SLOTS  # a SYN the program left to the kernel's hash
NO_TARGET_MIGRATION = PER_SLOT * SLOTS + 1  # a migration refused (no active slot)
_SK_DROP, _SK_PASS = 0, 1
# struct sk_reuseport_md offsets
_MD_DATA, _MD_DATA_END, _MD_HASH, _MD_MIGRATING_SK = 0, 8, 32, 48


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def port_key(sport: int) -> bytes:
    """The pin key: the source port as the program loads it (network order u16)."""
    return _u32(int.from_bytes(sport.to_bytes(2, "big"), "little"))


def _lookup(a: Asm, map_fd: int, key_reg: int, stack: int, miss: str) -> None:
    """r0 = &map[key_reg] (or jump to ``miss``)."""
    a.stxw(R10, stack, key_reg)
    a.ld_map_fd(R1, map_fd)
    a.mov_reg(R2, R10)
    a.add_imm(R2, stack)
    a.call(MAP_LOOKUP_ELEM)
    a.jeq_imm(R0, 0, miss)


def _count(a: Asm, counters_fd: int, key_reg: int, done: str) -> None:
    _lookup(a, counters_fd, key_reg, -12, done)
    a.mov_imm(R1, 1)
    a.atomic_add64(R0, 0, R1)


def build_program(socks_fd: int, table_fd: int, pins_fd: int, counters_fd: int) -> bytes:
    a = Asm()
    a.mov_reg(R6, R1)  # r6 = ctx
    a.mov_imm(R8, 0)  # r8: 0 a SYN, 1 a migration, 2 a pinned SYN (a scalar, unlike the pointer)
    a.ldxdw(R1, R6, _MD_MIGRATING_SK)
    a.jeq_imm(R1, 0, "syn")
    a.mov_imm(R8, 1)
    a.ja("select")
    _pinned_port(a, pins_fd)
    _active_slot(a, table_fd)
    _select_and_count(a, socks_fd, counters_fd)
    return a.assemble()


def _pinned_port(a: Asm, pins_fd: int) -> None:
    """A SYN from a pinned source port: r7 = its slot, jump to "chosen"."""
    a.label("syn")
    a.ldxdw(R2, R6, _MD_DATA)
    a.ldxdw(R3, R6, _MD_DATA_END)
    a.mov_reg(R4, R2)
    a.add_imm(R4, 2)
    a.jgt_reg(R4, R3, "select")
    a.ldxh(R7, R2, 0)  # the transport header starts with the source port
    _lookup(a, pins_fd, R7, -4, "select")
    a.ldxw(R7, R0, 0)
    a.mov_imm(R8, 2)
    a.ja("chosen")


def _active_slot(a: Asm, table_fd: int) -> None:
    """r7 = active[hash % n] from the live bank; "no_active" when n == 0."""
    a.label("select")
    a.mov_imm(R9, 0)
    _lookup(a, table_fd, R9, -16, "fallback")
    a.ldxw(R9, R0, 0)
    a.mul_imm(R9, BANK)
    a.add_imm(R9, 1)
    _lookup(a, table_fd, R9, -16, "fallback")
    a.ldxw(R7, R0, 0)
    a.jeq_imm(R7, 0, "no_active")
    a.ldxw(R1, R6, _MD_HASH)
    a.mod_reg(R1, R7)
    a.add_reg(R1, R9)
    a.add_imm(R1, 1)
    a.mov_reg(R9, R1)
    _lookup(a, table_fd, R9, -16, "fallback")
    a.ldxw(R7, R0, 0)


def _select_and_count(a: Asm, socks_fd: int, counters_fd: int) -> None:
    a.label("chosen")  # r7 = slot
    a.stxw(R10, -8, R7)
    a.mov_reg(R1, R6)
    a.ld_map_fd(R2, socks_fd)
    a.mov_reg(R3, R10)
    a.add_imm(R3, -8)
    a.mov_imm(R4, 0)
    a.call(SK_SELECT_REUSEPORT)
    a.jne_imm(R0, 0, "fallback")
    a.mul_imm(R7, PER_SLOT)
    a.add_reg(R7, R8)  # the slot's SYN, migration or pinned counter
    _count(a, counters_fd, R7, "pass")
    a.ja("pass")
    a.label("no_active")
    a.jne_imm(R8, 1, "fallback")
    a.mov_imm(R7, NO_TARGET_MIGRATION)
    _count(a, counters_fd, R7, "drop")
    a.label("drop")
    a.mov_imm(R0, _SK_DROP)
    a.exit()
    a.label("fallback")
    a.mov_imm(R7, NO_TARGET_SYN)
    _count(a, counters_fd, R7, "pass")
    a.label("pass")
    a.mov_imm(R0, _SK_PASS)
    a.exit()


def available() -> bool:
    """Can this process load the steering program (CAP_BPF, a kernel with SK_REUSEPORT)?"""
    try:
        group = EbpfGroup(ListenAddress("tcp", "127.0.0.1", 1))
    except (OSError, KernelFeatureMissing) as exc:
        log.info("ebpf_unavailable", reason=str(exc))
        return False
    group.close()
    return True


class EbpfGroup:
    """The eBPF steering of one group; ``close()`` releases its maps and program."""

    def __init__(self, address: ListenAddress) -> None:
        self.address = address
        self.attaches = 0
        self._slots: dict[socket.socket, int] = {}
        self._roles: dict[socket.socket, Role] = {}
        self._retiring_since: dict[socket.socket, tuple[int, int]] = {}  # counts then
        self._bank = 0
        self._attached = False
        self._objects: list[bpf.BpfObject] = []
        try:
            self._socks = self._own(
                bpf.Map(bpf.MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, SLOTS, "sv_socks")
            )
            self._table = self._own(bpf.Map(bpf.MAP_TYPE_ARRAY, 4, 4, 1 + 2 * BANK, "sv_table"))
            self._pins = self._own(bpf.Map(bpf.MAP_TYPE_HASH, 4, 4, 256, "sv_pins"))
            self._counters = self._own(
                bpf.Map(bpf.MAP_TYPE_ARRAY, 4, 8, PER_SLOT * SLOTS + 2, "sv_count")
            )
            code = build_program(self._socks.fd, self._table.fd, self._pins.fd, self._counters.fd)
            self._program = self._own(
                bpf.Program(
                    code, bpf.PROG_TYPE_SK_REUSEPORT, bpf.SK_REUSEPORT_SELECT_OR_MIGRATE, "sv_steer"
                )
            )
        except BaseException:
            self.close()
            raise

    def _own(self, obj: ObjT) -> ObjT:
        self._objects.append(obj)
        return obj

    def close(self) -> None:
        for obj in self._objects:
            obj.close()
        self._objects.clear()

    @property
    def members(self) -> list[socket.socket]:
        return sorted(self._slots, key=self._slots.__getitem__)

    def role(self, sock: socket.socket) -> Role | None:
        return self._roles.get(sock)

    def index(self, sock: socket.socket) -> int:
        return self._slots[sock]

    def join(self, sock: socket.socket, role: Role) -> None:
        """Put ``sock`` (listening) in a free slot; attach the program to a new group."""
        slot = min(set(range(SLOTS)) - set(self._slots.values()))
        self._socks.update(_u32(slot), struct.pack("<Q", sock.fileno()))
        for key in range(
            PER_SLOT * slot, PER_SLOT * slot + PER_SLOT
        ):  # a reused slot starts afresh
            self._counters.update(_u32(key), struct.pack("<Q", 0))
        self._slots[sock] = slot
        self._roles[sock] = role
        if not self._attached:
            sock.setsockopt(
                socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, struct.pack("<i", self._program.fd)
            )
            self._attached = True
            self.attaches += 1

    def leave(self, sock: socket.socket) -> None:
        syns, migrations, probes = self.counts(sock)
        since = self._retiring_since.pop(sock, None)
        log.info(
            "steering_member_left",
            address=str(self.address),
            cookie=socket_cookie(sock) if sock.fileno() >= 0 else None,
            role=self._roles[sock].value,
            syns=syns,
            migrations_in=migrations,
            probes=probes,
            syns_while_retiring=None if since is None else syns - since[0],
            migrations_while_retiring=None if since is None else migrations - since[1],
        )
        slot = self._slots.pop(sock)
        del self._roles[sock]
        self._socks.delete(_u32(slot))  # already gone after shutdown/close: fine
        if not self._slots:
            self._attached = False  # the kernel group dies with its last member

    def set_role(self, socks: Iterable[socket.socket], role: Role) -> None:
        for sock in socks:
            self._roles[sock] = role

    def apply(self, exclude: Collection[socket.socket] = ()) -> None:
        """Publish the active table: write the idle bank, then flip to it."""
        active = [
            slot
            for sock, slot in sorted(self._slots.items(), key=lambda item: item[1])
            if self._roles[sock] is Role.ACTIVE and sock not in exclude
        ]
        bank = 1 - self._bank
        base = 1 + bank * BANK
        for i, slot in enumerate(active):
            self._table.update(_u32(base + 1 + i), _u32(slot))
        self._table.update(_u32(base), _u32(len(active)))
        self._table.update(_u32(0), _u32(bank))
        self._bank = bank
        for sock, role in self._roles.items():  # count from the flip on
            if role is Role.RETIRING and sock not in self._retiring_since:
                syns, migrations, _ = self.counts(sock)
                self._retiring_since[sock] = (syns, migrations)

    def shutdown(self, sock: socket.socket) -> None:
        """``shutdown(SHUT_RDWR)``: the program migrates its queue to active slots."""
        sock.shutdown(socket.SHUT_RDWR)
        self.leave(sock)

    @contextmanager
    def pinned(self, sock: socket.socket, host: str, sport: int) -> Iterator[None]:  # noqa: ARG002
        """While inside, SYNs from source port ``sport`` go to ``sock``.

        Matched on the port alone: with migration always on for this group, a
        stranger's connection caught by a pin is moved, not lost, if the
        pinned listener closes.
        """
        self._pins.update(port_key(sport), _u32(self._slots[sock]))
        try:
            yield
        finally:
            self._pins.delete(port_key(sport))

    def counts(self, sock: socket.socket) -> tuple[int, int, int]:
        """(client SYNs steered to ``sock``, requests migrated to it, probe SYNs)."""
        base = PER_SLOT * self._slots[sock]
        return self._counter(base), self._counter(base + 1), self._counter(base + 2)

    def _counter(self, key: int) -> int:
        raw = self._counters.lookup(_u32(key))
        return 0 if raw is None else int(struct.unpack("<Q", raw)[0])

    def refused_migrations(self) -> int:
        return self._counter(NO_TARGET_MIGRATION)
