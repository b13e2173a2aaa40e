"""Steering: which member of a reuseport group gets each new connection.

Two backends implement one policy (``base.SteeringGroup``): ``ebpf``
(``REUSEPORT_SOCKARRAY`` + a ``SELECT_OR_MIGRATE`` program; needs CAP_BPF)
and ``cbpf`` (a classic program over an exact model of the group's order;
unprivileged). ``Steering`` holds one service's groups, all of one backend.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence

from supervisor.fdstore import NO_STORE, FdStore, object_name
from supervisor.steering.base import Backend, ListenerCounts, Role, SteeringGroup
from supervisor.steering.cbpf import CbpfGroup
from supervisor.steering.ebpf import EbpfGroup
from supervisor.values import ListenAddress


def backend_group(backend: Backend, address: ListenAddress) -> SteeringGroup:
    """A new group of ``backend`` for ``address``.

    Raises:
        KernelFeatureMissing, SteeringError: eBPF objects could not be created.
    """
    return EbpfGroup(address) if backend == "ebpf" else CbpfGroup(address)


__all__ = ["Backend", "ListenerCounts", "Role", "Steering", "SteeringGroup"]


class Steering:
    """The groups of one service, by address. Groups appear as listeners join,
    or are taken over from an earlier image; ``close()`` releases what the
    backend holds. eBPF maps and programs are kept in systemd's fd store
    (when there is one) beside the listeners they steer."""

    def __init__(
        self,
        backend: Backend = "cbpf",
        make: Callable[[Backend, ListenAddress], SteeringGroup] | None = None,
        store: FdStore = NO_STORE,
        service: str = "",
    ) -> None:
        self.backend = backend
        self._make = make or backend_group
        self._store = store
        self.service = service
        self._groups: dict[ListenAddress, SteeringGroup] = {}
        self._stored: dict[ListenAddress, list[str]] = {}

    def group(self, address: ListenAddress) -> SteeringGroup:
        """The group of ``address``, created on first use.

        Raises:
            KernelFeatureMissing, SteeringError: eBPF objects could not be created.
        """
        if address not in self._groups:
            group = self._make(self.backend, address)
            self._groups[address] = group
            if isinstance(group, EbpfGroup):
                self._keep(address, group)
        return self._groups[address]

    def _keep(self, address: ListenAddress, group: EbpfGroup) -> None:
        names = []
        for kind, fd in group.objects().items():
            name = object_name(self.service, address.fd_name, kind)
            self._store.keep(name, [fd])
            names.append(name)
        self._stored[address] = names

    def adopt_ebpf(
        self,
        address: ListenAddress,
        objects: Mapping[str, int],
        members: Sequence[socket.socket],
        *,
        stored: bool,
    ) -> list[socket.socket]:
        """Take over the eBPF steering of ``address`` from ``objects`` (fds by name);
        return the ``members`` that must ``join`` still. ``stored``: the objects
        are in the fd store already (else they are put there).

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
        if stored:
            self._stored[address] = [
                object_name(self.service, address.fd_name, kind) for kind in objects
            ]
        else:
            self._keep(address, group)
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
        and its objects in the fd store (for the next daemon, after a restart)."""
        for address, group in self._groups.items():
            group.close(detach=not preserve)
            if not preserve:
                for name in self._stored.get(address, []):
                    self._store.drop(name)
        self._groups.clear()
        self._stored.clear()
