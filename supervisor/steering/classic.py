"""Classic BPF steering (unprivileged): an exact model of the group's socks[].

The supervisor creates every member of its groups, so it can model the
kernel's ``socks[]`` listening section exactly (docs/kernel.md §2):
``listen()`` appends; leaving (``shutdown()``, or the last ``close()``)
moves the last member into the hole. Members moved to the closed section by
a migrating shutdown are no longer indexable by a program, so the model
drops them too. From the model and each member's role it builds a classic
BPF program and attaches it after every change:

- ``ACTIVE`` members share new connections by a hash of (source address,
  source port);
- ``STANDBY`` members get none, except probes pinned to them by their exact
  (source address, source port);
- ``RETIRING`` members get none.

A member appended by ``listen()`` is never chosen by the program attached
before it joined (that program only returns the indices it knew), so a new
candidate is standby from its first instant.

A classic program cannot drop and is not consulted for migration: with
``tcp_migrate_req=1`` the kernel migrates by its own hash over the listening
section, and it cannot refuse a migration.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import structlog

from supervisor.errors import SteeringError, translated
from supervisor.kernel import cbpf
from supervisor.kernel.cbpf import Insn
from supervisor.steering.base import Exported, ListenerCounts, Role
from supervisor.values import ListenAddress

log = structlog.get_logger("supervisor.steering")

_NET = cbpf.SKF_NET_OFF
_GOLDEN = 0x9E3779B1  # multiplicative hashing constants (Knuth; murmur3's fmix)
_MIX = 0x85EBCA6B
KERNEL_HASH = 0xFFFF  # an index past the end: the kernel picks by its own hash


@dataclass(frozen=True)
class Pin:
    """Connections from exactly this (source address, source port) go to ``sock``."""

    saddr: int  # the last 32 bits of the source address, as the program loads them
    sport: int
    sock: socket.socket


def address_word(host: str) -> int:
    """The 32-bit word the program loads for a source address (its last 4 bytes)."""
    return int.from_bytes(ipaddress.ip_address(host).packed[-4:], "big")


def _prologue(family: socket.AddressFamily) -> list[Insn]:
    """M[0] = source address word, M[1] = source port."""
    if family == socket.AF_INET:
        return [
            Insn(cbpf.LD_W_ABS, k=_NET + 12),
            Insn(cbpf.ST, k=0),
            Insn(cbpf.LDX_B_MSH, k=_NET),  # X = IPv4 header length, options included
            Insn(cbpf.LD_H_IND, k=_NET),
            Insn(cbpf.ST, k=1),
        ]
    # IPv6: the transport header follows the fixed 40-byte header unless an
    # extension header intervenes; then use port 0 (only the hash changes).
    return [
        Insn(cbpf.LD_W_ABS, k=_NET + 20),
        Insn(cbpf.ST, k=0),
        Insn(cbpf.LD_B_ABS, k=_NET + 6),
        Insn(cbpf.JMP_JEQ_K, jt=2, jf=0, k=socket.IPPROTO_TCP),
        Insn(cbpf.JMP_JEQ_K, jt=1, jf=0, k=socket.IPPROTO_UDP),
        Insn(cbpf.JMP_JA, k=2),
        Insn(cbpf.LD_H_ABS, k=_NET + 40),
        Insn(cbpf.JMP_JA, k=1),
        Insn(cbpf.LD_IMM, k=0),
        Insn(cbpf.ST, k=1),
    ]


def build_program(
    family: socket.AddressFamily, active: list[int], pins: Iterable[tuple[int, int, int]]
) -> list[Insn]:
    """The group's program: pins first, then a hash over ``active`` indices.

    ``pins`` are ``(saddr_word, sport, index)``. With no active index the
    program returns an index past the end (the kernel's own hash).
    """
    program = _prologue(family)
    for saddr, sport, index in pins:
        program += [
            Insn(cbpf.LD_MEM, k=1),
            Insn(cbpf.JMP_JEQ_K, jt=0, jf=3, k=sport),
            Insn(cbpf.LD_MEM, k=0),
            Insn(cbpf.JMP_JEQ_K, jt=0, jf=1, k=saddr),
            Insn(cbpf.RET_K, k=index),
        ]
    if not active:
        return [*program, Insn(cbpf.RET_K, k=KERNEL_HASH)]
    program += [
        Insn(cbpf.LD_MEM, k=1),
        Insn(cbpf.ALU_MUL_K, k=_GOLDEN),
        Insn(cbpf.LDX_MEM, k=0),
        Insn(cbpf.ALU_XOR_X),
        Insn(cbpf.ALU_MUL_K, k=_MIX),
        Insn(cbpf.ALU_RSH_K, k=16),
        Insn(cbpf.ALU_MOD_K, k=len(active)),
    ]
    for slot, index in enumerate(active[:-1]):
        program += [Insn(cbpf.JMP_JEQ_K, jt=0, jf=1, k=slot), Insn(cbpf.RET_K, k=index)]
    return [*program, Insn(cbpf.RET_K, k=active[-1])]


class CbpfGroup:
    """The model and classic program of one reuseport group (one address).

    Every method that changes membership must run right after the kernel
    operation it models, with no await in between: the model is exact only
    while changes are serialized, which the single trio thread guarantees.
    """

    def __init__(self, address: ListenAddress) -> None:
        self.address = address
        self._members: list[socket.socket] = []  # the kernel's listening section, in order
        self._roles: dict[socket.socket, Role] = {}
        self._pins: dict[int, Pin] = {}
        self._tokens = itertools.count()
        self.attaches = 0

    def close(self, *, detach: bool = True) -> None:
        """Nothing to release: the kernel group holds the program."""

    def refuse_migration(self, sock: socket.socket) -> bool:  # noqa: ARG002
        """A classic program is not asked about migrations: it cannot refuse one."""
        return False

    def counts(self, sock: socket.socket) -> ListenerCounts | None:  # noqa: ARG002
        """A classic program keeps no counters."""
        return None

    @property
    def members(self) -> list[socket.socket]:
        return list(self._members)

    def role(self, sock: socket.socket) -> Role | None:
        return self._roles.get(sock)

    def index(self, sock: socket.socket) -> int:
        return self._members.index(sock)

    def join(self, sock: socket.socket, role: Role) -> None:
        """Record ``sock``, which has just called ``listen()`` (bind for UDP)."""
        self._members.append(sock)
        self._roles[sock] = role

    def adopt_members(self, ordered: Sequence[tuple[socket.socket, Role]]) -> None:
        """Take over members already in the kernel's group, given in its
        ``socks[]`` order (an upgrade carries the order; after a crash
        ``discover.socks_order`` learns it). ``apply()`` then publishes."""
        self._members = [sock for sock, _ in ordered]
        self._roles = dict(ordered)

    def export(self) -> Exported:
        """The model: members in the kernel's order, with their roles."""
        return Exported(order=[(sock, self._roles[sock]) for sock in self._members])

    def take_over(self, sock: socket.socket) -> None:
        """Nothing to do now: ``apply()`` attaches this group's classic program,
        replacing whatever program the kernel group had."""

    def leave(self, sock: socket.socket) -> None:
        """Record that ``sock`` left the listening section: the last member moves
        into its place (``__reuseport_detach_sock``)."""
        i = self._members.index(sock)
        self._members[i] = self._members[-1]
        self._members.pop()
        del self._roles[sock]
        self._pins = {t: p for t, p in self._pins.items() if p.sock is not sock}

    def set_role(self, socks: Iterable[socket.socket], role: Role) -> None:
        for sock in socks:
            self._roles[sock] = role

    def program(self, exclude: Collection[socket.socket] = ()) -> list[Insn]:
        active = [
            i
            for i, sock in enumerate(self._members)
            if self._roles[sock] is Role.ACTIVE and sock not in exclude
        ]
        pins = [(p.saddr, p.sport, self._members.index(p.sock)) for p in self._pins.values()]
        return build_program(self.address.family, active, pins)

    def apply(self, exclude: Collection[socket.socket] = ()) -> None:
        """Attach the program for the current model (through any member).

        Raises:
            SteeringError: the kernel refused it and keeps the program it had.
        """
        through = next((sock for sock in self._members if sock.fileno() >= 0), None)
        if through is not None:
            with translated(SteeringError, f"attach the steering program of {self.address}"):
                cbpf.attach(through, self.program(exclude))
            self.attaches += 1

    def shutdown(self, sock: socket.socket) -> None:
        """``shutdown(SHUT_RDWR)`` a TCP member: it leaves the group (its queue
        migrates where migration is on), and its holders' ``accept()`` fails
        with EINVAL."""
        self._leave_by(sock, lambda: sock.shutdown(socket.SHUT_RDWR), "shut down")

    def discard(self, sock: socket.socket) -> None:
        """Close a member whose last other holder is gone: a datagram socket
        leaves the group only when its last reference closes."""
        self._leave_by(sock, sock.close, "close")

    def _leave_by(self, sock: socket.socket, operation: Callable[[], None], what: str) -> None:
        """Run ``operation`` (which takes ``sock`` out of the kernel's group).

        The last member will move into ``sock``'s index: a program excluding
        both is attached first, so nothing is steered by a stale index while
        the kernel and the model disagree.

        Raises:
            SteeringError: only from ``operation`` (``sock`` is still a
                member, nothing changed). Once it left, the model follows the
                kernel whatever happens: a program that cannot be attached
                before or after is logged, and the next ``apply`` publishes
                the model (the one in place sends a stale index at worst to
                another member of the group, never nowhere).
        """
        last = self._members[-1]
        keeps_one = any(
            self._roles[s] is Role.ACTIVE and s not in (sock, last) for s in self._members
        )
        if keeps_one:
            self._try_apply(exclude=(sock, last))
        with translated(SteeringError, f"{what} a listener of {self.address}"):
            operation()
        self.leave(sock)
        self._try_apply()

    def _try_apply(self, exclude: Collection[socket.socket] = ()) -> None:
        try:
            self.apply(exclude)
        except SteeringError as exc:
            log.error("steering_program_stale", address=str(self.address), error=str(exc))

    @contextmanager
    def pinned(self, sock: socket.socket, host: str, sport: int) -> Iterator[None]:
        """While inside, connections from (host, sport) go to ``sock``."""
        token = next(self._tokens)
        self._pins[token] = Pin(address_word(host), sport, sock)
        try:
            self.apply()
        except SteeringError:
            del self._pins[token]
            raise
        try:
            yield
        finally:
            if self._pins.pop(token, None) is not None:
                try:
                    self.apply()
                except SteeringError as exc:  # the stale pin steers only that source port
                    log.warning("steering_unpin_failed", address=str(self.address), error=str(exc))
