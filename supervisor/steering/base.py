"""What every steering backend offers: member roles and the group interface.

A *group* is the kernel's reuseport group of one address. Its members are
listeners the supervisor created; each has a role, and the group's program
decides from the roles which member gets each new connection:

- ``ACTIVE`` members share new connections;
- ``STANDBY`` members get none, except health probes pinned to them (a
  candidate generation, or a worker being respawned);
- ``RETIRING`` members get none, and (eBPF) receive no migrated request.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Collection, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

from supervisor.values import ListenAddress

Backend = Literal["ebpf", "cbpf"]


class Role(enum.Enum):
    ACTIVE = "active"
    STANDBY = "standby"
    RETIRING = "retiring"


@dataclass(frozen=True)
class ListenerCounts:
    """What the eBPF program counted for one listener since it joined."""

    syns: int  # client SYNs steered to it
    migrated_in: int  # requests migrated to it from a retiring listener
    probes: int  # SYNs of health probes pinned to it


@dataclass(frozen=True)
class Exported:
    """What a group hands to the next image: its eBPF objects (fds by name),
    or its classic members in the kernel's ``socks[]`` order, with roles."""

    objects: dict[str, int] | None = None
    order: list[tuple[socket.socket, Role]] | None = None


class SteeringGroup(Protocol):
    """What generations and retirement need of a group's steering, either backend.

    Every method that changes membership must run right after the kernel
    operation it records (``listen()``, ``shutdown()``), with no await in
    between: the single trio thread serializes them.
    """

    address: ListenAddress
    attaches: int

    @property
    def members(self) -> list[socket.socket]: ...

    def role(self, sock: socket.socket) -> Role | None: ...

    def index(self, sock: socket.socket) -> int: ...

    def join(self, sock: socket.socket, role: Role) -> None:
        """Record ``sock``, which has just called ``listen()`` (bind for UDP)."""

    def leave(self, sock: socket.socket) -> None:
        """Record that ``sock`` left the group (its last reference closed)."""

    def set_role(self, socks: Iterable[socket.socket], role: Role) -> None:
        """Change roles in the model; ``apply()`` publishes them."""

    def apply(self, exclude: Collection[socket.socket] = ()) -> None:
        """Publish the roles to the kernel (``exclude``: treat as not active)."""

    def shutdown(self, sock: socket.socket) -> None:
        """``shutdown(SHUT_RDWR)`` a TCP member: it leaves, its queue migrates
        where migration is on, and its holders' ``accept()`` fails with EINVAL."""

    def discard(self, sock: socket.socket) -> None:
        """Close a member nobody else holds (a UDP member leaves only then)."""

    def pinned(self, sock: socket.socket, host: str, sport: int) -> AbstractContextManager[None]:
        """While inside, connections from (host, sport) go to ``sock``."""

    def refuse_migration(self, sock: socket.socket) -> bool:
        """Never migrate a request away from ``sock``; False if this backend cannot."""

    def counts(self, sock: socket.socket) -> ListenerCounts | None:
        """Per-listener counters, or None if this backend keeps none."""

    def export(self) -> Exported:
        """What the next image needs to take this group over."""

    def take_over(self, sock: socket.socket) -> None:
        """Make this group's program the kernel group's, through ``sock`` (a
        member of it), replacing the program an earlier daemon attached."""

    def close(self, *, detach: bool = True) -> None:
        """Release what the backend holds (the kernel group keeps its program);
        ``detach``: also give the group the kernel's plain hashing back."""
