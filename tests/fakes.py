"""Test doubles for worker slots: fake processes driven by the test."""

from __future__ import annotations

import signal
from collections.abc import Sequence

import trio

from supervisor.plan import WorkerPlan


class FakeProcess:
    """A process that exits when the test says, or on a signal it does not ignore."""

    def __init__(self, pid: int, ignores: frozenset[int] = frozenset()) -> None:
        self.pid = pid
        self._code: int | None = None
        self._exited = trio.Event()
        self.signals: list[int] = []
        self.ignores = ignores
        self.closed = False

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
        self.signals.append(sig)
        if sig == signal.SIGKILL or sig not in self.ignores:
            self.exit(-sig)

    def close(self) -> None:
        if self._code is None:
            self.exit(-signal.SIGKILL)
        self.closed = True


class FakeSpawner:
    """Records every spawn; each new process is announced on ``spawned``."""

    def __init__(self, ignores: frozenset[int] = frozenset(), fail: OSError | None = None) -> None:
        self.processes: list[FakeProcess] = []
        self.ignores = ignores
        self.fail = fail
        self._send, self.spawned = trio.open_memory_channel[FakeProcess](100)

    def __call__(
        self, plan: WorkerPlan, fds: Sequence[int], notify_socket: str | None
    ) -> FakeProcess:
        if self.fail is not None:
            raise self.fail
        proc = FakeProcess(1000 + len(self.processes), self.ignores)
        self.processes.append(proc)
        self._send.send_nowait(proc)
        return proc
