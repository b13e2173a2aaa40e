"""Steering: which member of a reuseport group gets each new connection.

Two backends implement one policy (``base.SteeringGroup``): ``ebpf``
(``REUSEPORT_SOCKARRAY`` + a ``SELECT_OR_MIGRATE`` program; needs CAP_BPF)
and ``cbpf`` (a classic program over an exact model of the group's order;
unprivileged). ``Steering`` holds one service's groups, all of one backend.
"""

from __future__ import annotations

from collections.abc import Callable

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
    """The groups of one service, by address. Groups appear as listeners join;
    ``close()`` releases what the backend holds."""

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

    def groups(self) -> list[SteeringGroup]:
        return list(self._groups.values())

    def close(self) -> None:
        for group in self._groups.values():
            group.close()
        self._groups.clear()
