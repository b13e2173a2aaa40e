"""The SK_REUSEPORT program of eBPF steering, and the layout of its maps.

Loaded as ``SELECT_OR_MIGRATE`` (docs/kernel.md §3), it runs for every
new SYN and for every request the kernel migrates away from a listener
that was shut down:

- a SYN from a pinned source port goes to its pinned slot (health probes);
- any other SYN goes to an active slot, ``hash % n`` over the active table;
  if that slot's listener is gone (shut down or closed while still in the
  table), the next active slot is tried, and so on (``RETRIES``); a SYN is
  left to the kernel's hash (which may pick any member of the group, one
  nobody placed included) only when no active slot can take it;
- a migrating request from a listener whose cookie is in the refuse map is
  dropped (its settings differ from every active listener's);
- any other migrating request goes to an active slot only, never to another
  retiring one; with no active slot it is dropped;
- SYNs, migrations and probe SYNs are counted per slot, refusals per group.

Maps (created by the group, passed in by fd):

``socks``    REUSEPORT_SOCKARRAY, slot -> listener.
``table``    ARRAY u32: word 0 is the live bank (0 or 1); bank b starts at
             ``1 + b*BANK``: ``[n, slot_0 .. slot_{n-1}]``. Double-buffered:
             the supervisor writes the idle bank, then flips word 0, so the
             program never reads a half-written table.
``pins``     HASH source port (as loaded: network order in a u32) -> slot.
``refuse``   HASH listener cookie (u64) -> 1.
``counters`` ARRAY u64: ``PER_SLOT*slot + kind`` (kind 0 client SYNs,
             1 migrations in, 2 probe SYNs), then the group counters.
"""

from __future__ import annotations

import struct

from supervisor.kernel.ebpf_asm import (
    GET_SOCKET_COOKIE,
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

SLOTS = 1024  # members of one group at once (two generations of up to 512 workers)
BANK = SLOTS + 1
PER_SLOT = 3
KIND_SYN, KIND_MIGRATION, KIND_PROBE = 0, 1, 2
NO_TARGET_SYN = PER_SLOT * SLOTS  # a SYN the program left to the kernel's hash
NO_TARGET_MIGRATION = NO_TARGET_SYN + 1  # a migration dropped: no active slot
REFUSED_MIGRATION = NO_TARGET_SYN + 2  # a migration dropped: settings differ
COUNTERS = NO_TARGET_SYN + 3
_SK_DROP, _SK_PASS = 0, 1
RETRIES = 32  # active slots tried after the chosen one failed, before the kernel's hash
_N, _FIRST, _POSITION, _TRIES = -32, -40, -48, -56  # stack slots of the active-table walk
# struct sk_reuseport_md offsets
_MD_DATA, _MD_DATA_END, _MD_HASH, _MD_SK, _MD_MIGRATING_SK = 0, 8, 32, 40, 48


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def port_key(sport: int) -> bytes:
    """The pin key: the source port as the program loads it (network order u16)."""
    return u32(int.from_bytes(sport.to_bytes(2, "big"), "little"))


def _lookup(
    a: Asm, map_fd: int, key_reg: int, stack: int, miss: str, *, wide: bool = False
) -> None:
    """r0 = &map[key_reg] (key stored at r10+stack, 4 or 8 bytes), or jump to ``miss``."""
    if wide:
        a.stxdw(R10, stack, key_reg)
    else:
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


def build_program(maps: dict[str, int]) -> bytes:
    """The program's instructions, with ``maps`` (name -> fd) baked in."""
    a = Asm()
    a.mov_reg(R6, R1)  # r6 = ctx
    a.mov_imm(R8, KIND_SYN)  # r8 = the kind of counter (a scalar, unlike the pointers)
    a.ldxdw(R1, R6, _MD_MIGRATING_SK)
    a.jeq_imm(R1, 0, "syn")
    a.mov_imm(R8, KIND_MIGRATION)
    _refused(a, maps["refuse"], maps["counters"])  # ends in "drop" or "select"
    _pinned_port(a, maps["pins"])
    _active_slot(a, maps["table"])
    _select_and_count(a, maps["socks"], maps["counters"])
    return a.assemble()


def _refused(a: Asm, refuse_fd: int, counters_fd: int) -> None:
    """A migration away from a listener in the refuse map: count it, drop it."""
    a.ldxdw(R1, R6, _MD_SK)  # the listener being shut down
    a.call(GET_SOCKET_COOKIE)
    a.mov_reg(R7, R0)
    _lookup(a, refuse_fd, R7, -24, "select", wide=True)
    a.mov_imm(R7, REFUSED_MIGRATION)
    _count(a, counters_fd, R7, "drop")
    a.ja("drop")


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
    a.mov_imm(R8, KIND_PROBE)
    a.ja("chosen")


def _active_slot(a: Asm, table_fd: int) -> None:
    """r7 = active[hash % n] from the live bank; "no_active" when n == 0.

    The bank's n, the index of its first slot, the position tried and the
    tries so far stay on the stack for "retry"."""
    a.label("select")
    a.mov_imm(R9, 0)
    _lookup(a, table_fd, R9, -16, "fallback")
    a.ldxw(R9, R0, 0)
    a.mul_imm(R9, BANK)
    a.add_imm(R9, 1)
    _lookup(a, table_fd, R9, -16, "fallback")
    a.ldxw(R7, R0, 0)
    a.jeq_imm(R7, 0, "no_active")
    a.stxdw(R10, _N, R7)
    a.add_imm(R9, 1)
    a.stxdw(R10, _FIRST, R9)
    a.ldxw(R1, R6, _MD_HASH)
    a.mod_reg(R1, R7)
    a.stxdw(R10, _POSITION, R1)
    a.mov_imm(R2, 0)
    a.stxdw(R10, _TRIES, R2)
    a.label("try")  # r1 = the position in the active table
    a.add_reg(R1, R9)
    a.mov_reg(R9, R1)
    _lookup(a, table_fd, R9, -16, "fallback")
    a.ldxw(R7, R0, 0)
    a.ja("chosen")


def _retry(a: Asm) -> None:
    """The active slot chosen could not be selected (its listener was shut
    down or closed while still in the table): try the next one, and so on
    around the table, up to ``RETRIES`` times. Never the kernel's hash while
    an active slot can take it: that could pick any member of the group,
    one nobody placed included."""
    a.label("retry")
    a.ldxdw(R1, R10, _TRIES)
    a.add_imm(R1, 1)
    a.stxdw(R10, _TRIES, R1)
    a.jge_imm(R1, RETRIES, "fallback")
    a.ldxdw(R2, R10, _N)
    a.jge_reg(R1, R2, "fallback")
    a.ldxdw(R1, R10, _POSITION)
    a.add_imm(R1, 1)
    a.jgt_reg(R2, R1, "wrapped")
    a.mov_imm(R1, 0)
    a.label("wrapped")
    a.stxdw(R10, _POSITION, R1)
    a.ldxdw(R9, R10, _FIRST)
    a.ja("try")


def _select_and_count(a: Asm, socks_fd: int, counters_fd: int) -> None:
    a.label("chosen")  # r7 = slot
    a.stxw(R10, -8, R7)
    a.mov_reg(R1, R6)
    a.ld_map_fd(R2, socks_fd)
    a.mov_reg(R3, R10)
    a.add_imm(R3, -8)
    a.mov_imm(R4, 0)
    a.call(SK_SELECT_REUSEPORT)
    a.jne_imm(R0, 0, "unselected")
    a.mul_imm(R7, PER_SLOT)
    a.add_reg(R7, R8)  # the slot's SYN, migration or probe counter
    _count(a, counters_fd, R7, "pass")
    a.ja("pass")
    a.label("unselected")  # a pinned probe's listener is gone: steer it as any SYN
    a.jne_imm(R8, KIND_PROBE, "retry")
    a.mov_imm(R8, KIND_SYN)
    a.ja("select")
    _retry(a)
    a.label("no_active")
    a.jne_imm(R8, KIND_MIGRATION, "fallback")
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
