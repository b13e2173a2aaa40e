"""Lifecycles as enums with allowed transitions, a waitable value, and backoff.

Words borrowed from supervisord (STARTING, RUNNING, BACKOFF, STOPPING,
EXITED, FATAL), not its one-second tick: callers await a state instead of
polling it.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import trio

from supervisor.errors import TransitionError

T = TypeVar("T")


class WorkerState(enum.Enum):
    """Where one worker slot is in its life."""

    STARTING = "STARTING"  # process spawned, health check not yet passed
    RUNNING = "RUNNING"  # health check passed, serving
    BACKOFF = "BACKOFF"  # died unexpectedly; waiting before the respawn
    STOPPING = "STOPPING"  # stop_signal sent, waiting for exit (then SIGKILL)
    EXITED = "EXITED"  # stopped on purpose; terminal
    FATAL = "FATAL"  # failed to start, or died too often in a row; terminal


_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset(
        {WorkerState.RUNNING, WorkerState.BACKOFF, WorkerState.STOPPING, WorkerState.FATAL}
    ),
    WorkerState.RUNNING: frozenset({WorkerState.BACKOFF, WorkerState.STOPPING, WorkerState.FATAL}),
    WorkerState.BACKOFF: frozenset({WorkerState.STARTING, WorkerState.STOPPING}),
    WorkerState.STOPPING: frozenset({WorkerState.EXITED}),
    WorkerState.EXITED: frozenset(),
    WorkerState.FATAL: frozenset(),
}


def check_transition(old: WorkerState, new: WorkerState) -> None:
    """Raise ``TransitionError`` unless ``old -> new`` is allowed."""
    if new not in _ALLOWED[old]:
        raise TransitionError(f"worker state {old.value} -> {new.value} is not allowed")


class Watched(Generic[T]):
    """A value tasks can wait on: ``await w.wait_for(lambda v: v is READY)``.

    Each change wakes every waiter, who re-checks its own predicate, so no
    transition is missed and nobody polls. An observer (``observing``) is
    called with each new value as it is set: it must not block.
    """

    def __init__(self, value: T) -> None:
        self._value = value
        self._changed: trio.Event | None = None  # made when someone waits
        self._observers: list[Callable[[T], None]] = []

    @property
    def value(self) -> T:
        return self._value

    def set(self, value: T) -> None:
        if value == self._value:
            return
        self._value = value
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        for observer in self._observers:
            observer(value)

    async def wait_for(self, predicate: Callable[[T], bool]) -> T:
        """Return the first value (current or future) for which ``predicate`` holds."""
        while not predicate(self._value):
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()
        return self._value

    @contextlib.contextmanager
    def observing(self, observer: Callable[[T], None]) -> Iterator[None]:
        """Call ``observer`` with every value set while inside."""
        self._observers.append(observer)
        try:
            yield
        finally:
            self._observers.remove(observer)
