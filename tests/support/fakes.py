"""Test doubles: fake processes driven by the test, and a fake steering group.

They stand in for the real things only in the fast tier, where the logic
(lifecycles, rollout rules, stop ordering) is under test; the kernel tier
runs real processes and real BPF.
"""

from __future__ import annotations

import errno
import signal
import socket
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager

import trio

from supervisor.errors import StartFailed, SteeringError
from supervisor.kernel.proc import CommandResult
from supervisor.plan.plan import WorkerPlan
from supervisor.steering import Backend, Exported, ListenerCounts, Role
from supervisor.values import ListenAddress


class FakeProcess:
    """A process that exits when the test says, or on a signal it does not ignore."""

    def __init__(self, pid: int, plan: WorkerPlan, ignores: frozenset[int] = frozenset()) -> None:
        self.pid = pid
        self.plan = plan
        self._code: int | None = None
        self._exited = trio.Event()
        self.signals: list[int] = []
        self.ignores = ignores
        self.closed = False
        self.on_signal: Callable[[], None] | None = None  # called before each signal lands

    @property
    def returncode(self) -> int | None:
        return self._code

    def exit(self, code: int) -> None:
        if self._code is None:
            self._code = code
            self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self._code is not None
        return self._code

    def send_signal(self, sig: int) -> None:
        if self.on_signal is not None:
            self.on_signal()
        self.signals.append(sig)
        if sig == signal.SIGKILL or sig not in self.ignores:
            self.exit(-sig)

    async def aclose(self) -> None:
        if self._code is None:
            self.exit(-signal.SIGKILL)
        self.closed = True


class FakeSpawner:
    """Records every spawn; each new process is announced on ``spawned``.

    ``commands`` answers ``run_command`` (preflight, exec checks): the exit
    status for each argv[0], 0 by default; every call is recorded in ``ran``.
    """

    def __init__(self, ignores: frozenset[int] = frozenset(), fail: OSError | None = None) -> None:
        self.processes: list[FakeProcess] = []
        self.ignores = ignores
        self.fail = fail
        self.commands: dict[str, int] = {}
        self.ran: list[tuple[str, tuple[str, ...]]] = []
        self._send, self.spawned = trio.open_memory_channel[FakeProcess](1000)

    def __call__(
        self,
        plan: WorkerPlan,
        fds: Sequence[int],
        notify_socket: str | None,
        output: tuple[int, int] | None = None,
    ) -> FakeProcess:
        if self.fail is not None:  # as the real spawner does: our error, never OSError
            raise StartFailed(plan.argv[0], self.fail)
        proc = FakeProcess(1000 + len(self.processes), plan, self.ignores)
        self.processes.append(proc)
        self._send.send_nowait(proc)
        return proc

    async def run_command(self, plan: WorkerPlan, argv: Sequence[str]) -> CommandResult:
        self.ran.append((plan.label, tuple(argv)))
        await trio.sleep(0.01)
        code = self.commands.get(argv[0], 0)
        return CommandResult(code, f"{argv[0]} said {code}")

    def live(self, generation: int | None = None) -> list[FakeProcess]:
        return [
            p
            for p in self.processes
            if p.returncode is None and generation in (None, p.plan.generation)
        ]


class FakeGroup:
    """A steering group that keeps roles in memory and can be told to fail.

    ``fail[operation] = n`` makes the next ``n`` calls of that operation
    (``join``, ``apply``, ``shutdown``, ``pinned``, ``refuse``, ``counts``)
    raise ``SteeringError`` as the real groups do. ``published`` is what the
    "kernel" holds: the roles at the last successful ``apply``. Shutdown is
    real (the sockets are real listeners), so queues behave.
    """

    def __init__(self, backend: Backend, address: ListenAddress) -> None:
        self.backend = backend
        self.address = address
        self.attaches = 0
        self._members: list[socket.socket] = []
        self._roles: dict[socket.socket, Role] = {}
        self.published: dict[socket.socket, Role] = {}
        self.fail: Counter[str] = Counter()
        self.calls: list[str] = []
        self.closed = False

    def _maybe_fail(self, operation: str) -> None:
        self.calls.append(operation)
        if self.fail[operation] > 0:
            self.fail[operation] -= 1
            raise SteeringError(f"fake {operation}", OSError(errno.ENOMEM, "injected"))

    @property
    def members(self) -> list[socket.socket]:
        return list(self._members)

    def role(self, sock: socket.socket) -> Role | None:
        return self._roles.get(sock)

    def index(self, sock: socket.socket) -> int:
        return self._members.index(sock)

    def join(self, sock: socket.socket, role: Role) -> None:
        self._maybe_fail("join")
        self._members.append(sock)
        self._roles[sock] = role

    def leave(self, sock: socket.socket) -> None:
        self._members.remove(sock)
        del self._roles[sock]
        self.published.pop(sock, None)

    def set_role(self, socks: Iterable[socket.socket], role: Role) -> None:
        for sock in socks:
            self._roles[sock] = role

    def apply(self, exclude: Collection[socket.socket] = ()) -> None:
        self._maybe_fail("apply")
        self.published = {s: r for s, r in self._roles.items() if s not in exclude}
        self.attaches += 1

    def shutdown(self, sock: socket.socket) -> None:
        self._maybe_fail("shutdown")
        sock.shutdown(socket.SHUT_RDWR)
        self.leave(sock)

    def discard(self, sock: socket.socket) -> None:
        self.leave(sock)
        sock.close()

    @contextmanager
    def pinned(self, sock: socket.socket, host: str, sport: int) -> Iterator[None]:
        self._maybe_fail("pinned")
        yield

    def refuse_migration(self, sock: socket.socket) -> bool:
        self._maybe_fail("refuse")
        return True

    def counts(self, sock: socket.socket) -> ListenerCounts | None:
        self._maybe_fail("counts")
        return ListenerCounts(0, 0, 0)

    def export(self) -> Exported:
        return Exported(order=[(sock, self._roles[sock]) for sock in self._members])

    def take_over(self, sock: socket.socket) -> None:
        self._maybe_fail("take_over")

    def close(self, *, detach: bool = True) -> None:
        self.closed = True

    def active(self) -> list[socket.socket]:
        """Members the "kernel" steers new connections to."""
        return [s for s, r in self.published.items() if r is Role.ACTIVE]


class FakeGroups:
    """A group factory for ``ServiceEnv.groups`` that remembers what it made."""

    def __init__(self) -> None:
        self.made: dict[ListenAddress, FakeGroup] = {}
        self.fail_next: Counter[str] = Counter()  # armed on the next group made

    def __call__(self, backend: Backend, address: ListenAddress) -> FakeGroup:
        group = FakeGroup(backend, address)
        group.fail.update(self.fail_next)
        self.fail_next.clear()
        self.made[address] = group
        return group

    def arm(self, operation: str, times: int = 1) -> None:
        """Make every existing group fail ``operation`` the next ``times`` calls."""
        for group in self.made.values():
            group.fail[operation] += times

    def calls(self) -> list[str]:
        return [call for group in self.made.values() for call in group.calls]
