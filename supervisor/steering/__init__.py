"""Steering: which member of a reuseport group gets each new connection.

Two backends implement one policy (``base.SteeringGroup``): ``ebpf``
(``REUSEPORT_SOCKARRAY`` + a ``SELECT_OR_MIGRATE`` program; needs CAP_BPF)
and ``cbpf`` (a classic program over an exact model of the group's order;
unprivileged). ``Steering`` holds one service's groups, all of one backend.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence

from supervisor.steering.base import Backend, Exported, ListenerCounts, Role, SteeringGroup
from supervisor.steering.classic import CbpfGroup
from supervisor.steering.ebpf import EbpfGroup
from supervisor.values import ListenAddress


def backend_group(backend: Backend, address: ListenAddress) -> SteeringGroup:
    """A new group of ``backend`` for ``address``.

    Raises:
        KernelFeatureMissing, SteeringError: eBPF objects could not be created.
    """
    return EbpfGroup(address) if backend == "ebpf" else CbpfGroup(address)


__all__ = ["Backend", "Exported", "ListenerCounts", "Role", "Steering", "SteeringGroup"]


class Steering:
    """The groups of one service, by address. Groups appear as listeners join,
    or are taken over from an earlier image; ``close()`` releases what the
    backend holds.

    eBPF maps and programs are not put in systemd's fd store: they all share
    one anonymous inode, and the store keeps one fd of an inode only. After
    a crash a new program replaces the old one in the kernel instead.
    """

    def __init__(
        self,
        backend: Backend = "cbpf",
        make: Callable[[Backend, ListenAddress], SteeringGroup] | None = None,
    ) -> None:
        self.backend = backend
        self._make = make or backend_group
        self._groups: dict[ListenAddress, SteeringGroup] = {}

    def group(self, address: ListenAddress) -> SteeringGroup:
        """The group of ``address``, created on first use.

        Raises:
            KernelFeatureMissing, SteeringError: eBPF objects could not be created.
        """
        if address not in self._groups:
            self._groups[address] = self._make(self.backend, address)
        return self._groups[address]

    def adopt_ebpf(
        self, address: ListenAddress, objects: Mapping[str, int], members: Sequence[socket.socket]
    ) -> list[socket.socket]:
        """Take over the eBPF steering of ``address`` from ``objects`` (fds by name);
        return the ``members`` that must ``join`` still.

        Raises:
            SteeringError: an object is not what it should be (all fds are closed).
        """
        group = EbpfGroup(address, adopt=objects)
        try:
            unslotted = group.adopt_members(members)
        except BaseException:
            group.close(detach=False)
            raise
        self._groups[address] = group
        return unslotted

    def adopt_cbpf(
        self, address: ListenAddress, ordered: Sequence[tuple[socket.socket, Role]]
    ) -> None:
        """Take over the classic steering of ``address``: its members in socks[] order."""
        group = CbpfGroup(address)
        group.adopt_members(ordered)
        self._groups[address] = group

    def groups(self) -> list[SteeringGroup]:
        return list(self._groups.values())

    def items(self) -> list[tuple[ListenAddress, SteeringGroup]]:
        return list(self._groups.items())

    def close(self, *, preserve: bool = False) -> None:
        """Release the groups. ``preserve``: leave the kernel steering as it is
        (for the next daemon, after a restart: its listeners stay in the store)."""
        for group in self._groups.values():
            group.close(detach=not preserve)
        self._groups.clear()
