"""The seam between worker slots and real processes.

``WorkerSlot`` only sees ``Spawner`` and ``ProcessHandle``; tests of its
logic pass fakes, tests of behaviour pass ``ProcessSpawner``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from supervisor.kernel.proc import ChildProcess, resolve_credentials, spawn
from supervisor.plan import WorkerPlan


class ProcessHandle(Protocol):
    """What a slot needs of a process."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def close(self) -> None: ...


class Spawner(Protocol):
    """Start the process of ``plan`` with ``fds`` as its listeners (3, 4, ...)."""

    def __call__(
        self, plan: WorkerPlan, fds: Sequence[int], notify_socket: str | None
    ) -> ProcessHandle: ...


class ProcessSpawner:
    """Spawns real workers: base environment + the plan's + NOTIFY_SOCKET."""

    def __init__(self, base_environment: Mapping[str, str]) -> None:
        self._base = dict(base_environment)

    def __call__(
        self, plan: WorkerPlan, fds: Sequence[int], notify_socket: str | None
    ) -> ChildProcess:
        env = {**self._base, **dict(plan.environment)}
        if notify_socket is not None:
            env["NOTIFY_SOCKET"] = notify_socket
        return spawn(
            plan.argv,
            env=env,
            fds=fds,
            cwd=plan.working_directory,
            credentials=resolve_credentials(plan.user, plan.group),
        )
