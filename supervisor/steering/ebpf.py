"""eBPF steering of one reuseport group (needs CAP_BPF; docs/kernel.md §3).

Members sit in a ``REUSEPORT_SOCKARRAY`` by identity (a slot each), so no
index model is needed and the program stays attached across membership
changes. The program (``ebpf_program``) is loaded as ``SELECT_OR_MIGRATE``,
which enables migration for the group even with ``tcp_migrate_req=0``, and
sends migrating requests only to active members.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import os
import socket
import struct
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import structlog

from supervisor.errors import SteeringError, SupervisorError, translated
from supervisor.kernel import bpf
from supervisor.kernel.sockets import socket_cookie
from supervisor.steering.base import Exported, ListenerCounts, Role
from supervisor.steering.ebpf_program import (
    BANK,
    COUNTERS,
    NO_TARGET_MIGRATION,
    NO_TARGET_SYN,
    PER_SLOT,
    REFUSED_MIGRATION,
    SLOTS,
    build_program,
    port_key,
    u32,
    u64,
)
from supervisor.values import ListenAddress

log = structlog.get_logger("supervisor.steering")
ObjT = TypeVar("ObjT", bound=bpf.BpfObject)
# name -> (type, key size, value size, entries, kernel name); see ebpf_program
_MAPS = {
    "socks": (bpf.MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, SLOTS, "sv_socks"),
    "table": (bpf.MAP_TYPE_ARRAY, 4, 4, 1 + 2 * BANK, "sv_table"),
    "pins": (bpf.MAP_TYPE_HASH, 4, 4, 256, "sv_pins"),
    "refuse": (bpf.MAP_TYPE_HASH, 8, 4, SLOTS, "sv_refuse"),
    "counters": (bpf.MAP_TYPE_ARRAY, 4, 8, COUNTERS, "sv_count"),
}


def _missing(kind: str) -> NoReturn:
    raise OSError(errno.EBADF, f"the {kind} was not handed over")


def available() -> bool:
    """Can this process load the steering program (CAP_BPF, a kernel with SK_REUSEPORT)?"""
    try:
        group = EbpfGroup(ListenAddress("tcp", "127.0.0.1", 1))
    except SupervisorError as exc:
        log.info("ebpf_unavailable", reason=str(exc))
        return False
    group.close()
    return True


class EbpfGroup:
    """The eBPF steering of one group; ``close()`` releases its maps and program.

    Every kernel failure surfaces as ``SteeringError`` (``KernelFeatureMissing``
    where the privilege is missing). A method that fails leaves the kernel
    as it was: ``apply`` writes the idle bank and flips to it last.
    """

    def __init__(self, address: ListenAddress, adopt: Mapping[str, int] | None = None) -> None:
        """Create the maps and load the program; or, with ``adopt`` (object name to
        fd, as ``objects()`` gives them), take over those an earlier image made,
        each checked to be the map or program it should be.

        Raises:
            SteeringError: an object could not be created, or an adopted fd is
                not what it should be (every fd given is closed then).
            KernelFeatureMissing: no CAP_BPF.
        """
        self.address = address
        self.attaches = 0
        self._slots: dict[socket.socket, int] = {}
        self._roles: dict[socket.socket, Role] = {}
        self._retiring_since: dict[socket.socket, ListenerCounts] = {}  # counts at the flip
        self._refused: dict[socket.socket, int] = {}  # cookie, while in the refuse map
        self._bank = 0
        self._attached = False
        self._freed: list[int] = []  # a heap of slots free below _high
        self._high = 0  # slots from here on were never used
        self._objects: list[bpf.BpfObject] = []
        given = dict(adopt or {})
        try:
            verb = "adopt" if adopt is not None else "create"
            with translated(SteeringError, f"{verb} the eBPF steering of {address}"):

                def make(kind: str) -> bpf.Map:
                    if adopt is not None and given.get(kind, -1) < 0:
                        _missing(kind)
                    map_type, key, value, entries, name = _MAPS[kind]
                    made = bpf.Map(map_type, key, value, entries, name, adopt=given.get(kind))
                    given.pop(kind, None)  # owned by ``made`` from now on
                    return self._own(made)

                self._socks, self._table = make("socks"), make("table")
                self._pins, self._refuse = make("pins"), make("refuse")
                self._counters = make("counters")
                maps = {kind: getattr(self, f"_{kind}").fd for kind in _MAPS}
                program = given.get("program")
                if adopt is not None and (program is None or program < 0):
                    _missing("program")
                loaded = bpf.Program(
                    build_program(maps) if program is None else b"",
                    bpf.PROG_TYPE_SK_REUSEPORT,
                    bpf.SK_REUSEPORT_SELECT_OR_MIGRATE,
                    "sv_steer",
                    adopt=program,
                )
                given.pop("program", None)
                self._program = self._own(loaded)
        except BaseException:
            for fd in given.values():
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self.close()
            raise

    def objects(self) -> dict[str, int]:
        """The fds of the maps and the program, by name: what an upgrade carries,
        for ``EbpfGroup(address, adopt=...)``."""
        out = {kind: getattr(self, f"_{kind}").fd for kind in _MAPS}
        out["program"] = self._program.fd
        return out

    def export(self) -> Exported:
        return Exported(objects=self.objects())

    def adopt_members(self, members: Iterable[socket.socket]) -> list[socket.socket]:
        """Take over ``members`` (listening sockets) from the adopted maps: each
        one's slot by its cookie, its role from the live table (active, or else
        standby), refusals from the refuse map; stale probe pins are deleted and
        the program is attached again through a member (it may not be the
        group's any more). Returns the members found in no slot (to ``join``).

        Raises:
            SteeringError: the maps could not be read.
        """
        by_cookie = {socket_cookie(sock): sock for sock in members}
        with translated(SteeringError, f"read the adopted steering of {self.address}"):
            for slot in range(SLOTS):
                raw = self._socks.lookup(u32(slot))
                if raw is None:
                    continue
                sock = by_cookie.get(int(struct.unpack("<Q", raw)[0]))
                if sock is None:  # a socket we were not given: it takes no part
                    self._socks.delete(u32(slot))
                    continue
                self._slots[sock] = slot
            bank_raw = self._table.lookup(u32(0))
            self._bank = 0 if bank_raw is None else struct.unpack("<I", bank_raw)[0]
            base = 1 + self._bank * BANK
            count_raw = self._table.lookup(u32(base))
            count = 0 if count_raw is None else struct.unpack("<I", count_raw)[0]
            active = set()
            for i in range(min(count, SLOTS)):
                raw = self._table.lookup(u32(base + 1 + i))
                if raw is not None:
                    active.add(struct.unpack("<I", raw)[0])
            for sock, slot in self._slots.items():
                self._roles[sock] = Role.ACTIVE if slot in active else Role.STANDBY
            taken = set(self._slots.values())
            self._high = max(taken, default=-1) + 1
            self._freed = [slot for slot in range(self._high) if slot not in taken]
            refused = {int(struct.unpack("<Q", key)[0]) for key in self._refuse.all_keys()}
            for cookie in refused:
                if cookie in by_cookie and by_cookie[cookie] in self._slots:
                    self._refused[by_cookie[cookie]] = cookie
                else:
                    self._refuse.delete(u64(cookie))
            for key in self._pins.all_keys():
                self._pins.delete(key)
            if self._slots:
                bpf.attach_reuseport(next(iter(self._slots)), self._program)
                self._attached = True
        return [sock for sock in by_cookie.values() if sock not in self._slots]

    def _own(self, obj: ObjT) -> ObjT:
        self._objects.append(obj)
        return obj

    def close(self, *, detach: bool = True) -> None:
        """Release the maps and the program. A member that is still listening
        (none should be) gets the kernel's plain hashing back: the group would
        otherwise keep running the program on tables nobody updates; unless
        ``detach`` is False (the listeners stay for whoever adopts them next:
        systemd's fd store keeps the maps too). Never raises."""
        live = [sock for sock in self._slots if sock.fileno() >= 0]
        if live and detach:
            try:
                bpf.detach_reuseport(live[0])
            except OSError as exc:
                log.warning("steering_detach_failed", address=str(self.address), error=str(exc))
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
        """Put ``sock`` (listening) in a free slot; attach the program to a new group.

        Raises:
            SteeringError: the slot could not be filled or the program attached;
                the model is unchanged and the slot is freed again.
        """
        slot = self._free_slot()
        try:
            with translated(SteeringError, f"add a listener of {self.address} to its steering"):
                self._socks.update(u32(slot), u64(sock.fileno()))
                for key in range(PER_SLOT * slot, PER_SLOT * (slot + 1)):  # a reused slot
                    self._counters.update(u32(key), u64(0))  # starts counting afresh
                if not self._attached:
                    bpf.attach_reuseport(sock, self._program)
        except SteeringError:
            with contextlib.suppress(OSError):
                self._socks.delete(u32(slot))
            self._release_slot(slot)
            raise
        self._slots[sock] = slot
        self._roles[sock] = role
        if not self._attached:
            self._attached = True
            self.attaches += 1

    def take_over(self, sock: socket.socket) -> None:
        """Make this group's program the kernel group's (through ``sock``, a member
        of it that need not be in our socket array): the program it replaces,
        and that program's maps, are released by the kernel.

        Raises:
            SteeringError: the kernel refused the attach.
        """
        with translated(SteeringError, f"attach the steering program of {self.address}"):
            bpf.attach_reuseport(sock, self._program)
        self._attached = True
        self.attaches += 1

    def _free_slot(self) -> int:
        """The lowest slot no member holds: a freed one, or the next never used."""
        if self._freed:
            return heapq.heappop(self._freed)
        if self._high >= SLOTS:
            raise SteeringError(
                f"add a listener of {self.address}", OSError(28, f"all {SLOTS} slots are taken")
            )
        self._high += 1
        return self._high - 1

    def _release_slot(self, slot: int) -> None:
        heapq.heappush(self._freed, slot)

    def leave(self, sock: socket.socket) -> None:
        """Forget ``sock`` (it left the kernel's group); log what the program
        counted for it. The model changes first and cleaning the maps is best
        effort: the kernel membership has changed already. Never raises."""
        since = self._retiring_since.pop(sock, None)
        slot = self._slots.pop(sock)
        self._release_slot(slot)
        role = self._roles.pop(sock)
        cookie = self._refused.pop(sock, None)
        now: ListenerCounts | None = None
        own_cookie: int | None = None
        try:
            now = self._slot_counts(slot)
            self._socks.delete(u32(slot))  # already gone after shutdown/close: fine
            if cookie is not None:
                self._refuse.delete(u64(cookie))
            own_cookie = socket_cookie(sock) if sock.fileno() >= 0 else None
        except (OSError, SupervisorError) as exc:
            log.warning("steering_leave_unclean", address=str(self.address), error=str(exc))
        log.info(
            "steering_member_left",
            address=str(self.address),
            cookie=own_cookie,
            role=role.value,
            syns=None if now is None else now.syns,
            migrations_in=None if now is None else now.migrated_in,
            probes=None if now is None else now.probes,
            syns_while_retiring=None if since is None or now is None else now.syns - since.syns,
            migrations_while_retiring=None
            if since is None or now is None
            else now.migrated_in - since.migrated_in,
        )
        if not self._slots:
            self._attached = False  # the kernel group dies with its last member

    def set_role(self, socks: Iterable[socket.socket], role: Role) -> None:
        for sock in socks:
            self._roles[sock] = role

    def apply(self, exclude: Collection[socket.socket] = ()) -> None:
        """Publish the active table: write the idle bank, then flip to it.

        Raises:
            SteeringError: the kernel keeps the table it had (the flip is last).
        """
        active = [
            slot
            for sock, slot in sorted(self._slots.items(), key=lambda item: item[1])
            if self._roles[sock] is Role.ACTIVE and sock not in exclude
        ]
        bank = 1 - self._bank
        base = 1 + bank * BANK
        with translated(SteeringError, f"publish the steering table of {self.address}"):
            for i, slot in enumerate(active):
                self._table.update(u32(base + 1 + i), u32(slot))
            self._table.update(u32(base), u32(len(active)))
            self._table.update(u32(0), u32(bank))
        self._bank = bank
        for sock, role in self._roles.items():  # count from the flip on
            if role is Role.RETIRING and sock not in self._retiring_since:
                with contextlib.suppress(SteeringError):
                    self._retiring_since[sock] = self.counts(sock)

    def shutdown(self, sock: socket.socket) -> None:
        """``shutdown(SHUT_RDWR)``: the program migrates its queue to active slots.

        Raises:
            SteeringError: the kernel refused; ``sock`` is still a member.
        """
        with translated(SteeringError, f"shut down a listener of {self.address}"):
            sock.shutdown(socket.SHUT_RDWR)
        self.leave(sock)

    def discard(self, sock: socket.socket) -> None:
        """Free ``sock``'s slot, then close it (its last reference)."""
        self.leave(sock)
        sock.close()

    @contextmanager
    def pinned(self, sock: socket.socket, host: str, sport: int) -> Iterator[None]:  # noqa: ARG002
        """While inside, SYNs from source port ``sport`` go to ``sock``.

        Matched on the port alone: with migration always on for this group, a
        stranger's connection caught by a pin is moved, not lost, if the
        pinned listener closes.

        Raises:
            SteeringError: the pin could not be set.
        """
        with translated(SteeringError, f"pin a probe to a listener of {self.address}"):
            self._pins.update(port_key(sport), u32(self._slots[sock]))
        try:
            yield
        finally:
            try:
                self._pins.delete(port_key(sport))
            except OSError as exc:  # a stale pin only steers that one source port
                log.warning("steering_unpin_failed", address=str(self.address), error=str(exc))

    def refuse_migration(self, sock: socket.socket) -> bool:
        """From now on the program drops requests migrating away from ``sock``.

        Raises:
            SteeringError: the refusal could not be recorded.
        """
        with translated(SteeringError, f"refuse migrations of a listener of {self.address}"):
            cookie = socket_cookie(sock)
            self._refuse.update(u64(cookie), u32(1))
        self._refused[sock] = cookie
        return True

    def counts(self, sock: socket.socket) -> ListenerCounts:
        """What the program counted for ``sock``. Raises SteeringError."""
        with translated(SteeringError, f"read the steering counters of {self.address}"):
            return self._slot_counts(self._slots[sock])

    def _slot_counts(self, slot: int) -> ListenerCounts:
        base = PER_SLOT * slot
        return ListenerCounts(self._counter(base), self._counter(base + 1), self._counter(base + 2))

    def unsteered_syns(self) -> int:
        """SYNs the program left to the kernel's hash (no active slot could be
        selected): any member, ours or not, may have received them."""
        with translated(SteeringError, f"read the steering counters of {self.address}"):
            return self._counter(NO_TARGET_SYN)

    def dropped_migrations(self) -> tuple[int, int]:
        """Migrations the program dropped: (no active member, refused by settings)."""
        with translated(SteeringError, f"read the steering counters of {self.address}"):
            return self._counter(NO_TARGET_MIGRATION), self._counter(REFUSED_MIGRATION)

    def _counter(self, key: int) -> int:
        raw = self._counters.lookup(u32(key))
        return 0 if raw is None else int(struct.unpack("<Q", raw)[0])
