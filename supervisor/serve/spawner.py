"""The seam between worker slots and real processes.

``WorkerSlot`` only sees ``Spawner`` and ``ProcessHandle``; tests of its
logic pass fakes, tests of behaviour pass ``ProcessSpawner``. Everything a
service runs goes through the spawner with the service's identity: its
workers, and the short commands (preflight, exec health checks) run as the
service's user and group, with its environment and working directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from supervisor.errors import StartFailed, translated
from supervisor.kernel.files import ensure_directory
from supervisor.kernel.proc import (
    ChildProcess,
    CommandResult,
    Credentials,
    resolve_credentials,
    run_command,
    spawn,
)
from supervisor.plan.plan import WorkerPlan

_FOR_WORKERS_ONLY = ("LISTEN_FDS", "LISTEN_FDNAMES")


class ProcessHandle(Protocol):
    """What a slot needs of a process."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    async def aclose(self) -> None: ...


class Spawner(Protocol):
    """Start the process of ``plan`` with ``fds`` as its listeners (3, 4, ...) and
    ``output`` (stdout, stderr) as its 1 and 2 (None: the daemon's own)."""

    def __call__(
        self,
        plan: WorkerPlan,
        fds: Sequence[int],
        notify_socket: str | None,
        output: tuple[int, int] | None = None,
    ) -> ProcessHandle:
        """Raises StartFailed if the process cannot be started (never OSError)."""

    async def run_command(self, plan: WorkerPlan, argv: Sequence[str]) -> CommandResult:
        """Run a short command as the service would run ``plan``'s worker (no
        listeners). The caller bounds the time. Raises StartFailed if it
        cannot start."""


class ProcessSpawner:
    """Spawns real processes: base environment + the plan's (+ NOTIFY_SOCKET)."""

    def __init__(self, base_environment: Mapping[str, str], nofile: int | None = None) -> None:
        self._base = dict(base_environment)
        self._nofile = nofile  # the soft RLIMIT_NOFILE children get (see raise_fd_limit)

    def __call__(
        self,
        plan: WorkerPlan,
        fds: Sequence[int],
        notify_socket: str | None,
        output: tuple[int, int] | None = None,
    ) -> ChildProcess:
        env = {**self._base, **dict(plan.environment)}
        if notify_socket is not None:
            env["NOTIFY_SOCKET"] = notify_socket
        stdout, stderr = output or (None, None)
        with translated(StartFailed, plan.argv[0]):  # the seam: what the kernel refused
            return spawn(
                plan.argv,
                env=env,
                fds=fds,
                cwd=plan.working_directory,
                credentials=_prepared(plan),
                stdout=stdout,
                stderr=stderr,
                nofile=self._nofile,
            )

    async def run_command(self, plan: WorkerPlan, argv: Sequence[str]) -> CommandResult:
        env = {**self._base, **dict(plan.environment)}
        for name in _FOR_WORKERS_ONLY:
            env.pop(name, None)
        with translated(StartFailed, argv[0]):
            return await run_command(
                argv,
                env=env,
                cwd=plan.working_directory,
                credentials=_prepared(plan),
                nofile=self._nofile,
            )


def _prepared(plan: WorkerPlan) -> Credentials:
    """The credentials ``plan`` runs with, once its state directory exists.

    Raises:
        OSError: the state directory cannot be made (the spawn fails as a
            program that cannot start does, naming the path).
    """
    credentials = resolve_credentials(plan.user, plan.group)
    if plan.state_directory is not None:
        ensure_directory(plan.state_directory, credentials.uid, credentials.gid)
    return credentials
