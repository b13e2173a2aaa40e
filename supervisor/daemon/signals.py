"""Signals: which ones are requests, which are ignored, and the start-up window.

Signals become the same typed requests the control socket produces (STYLE:
"signals and control commands are the same thing"):

| signal | request |
|---|---|
| SIGTERM, SIGINT | ``Shutdown`` (a second one kills the workers at once) |
| SIGHUP | ``Reload`` of every service |
| SIGUSR2 | ``Upgrade`` in place |
| SIGUSR1 | ``Reopen``: each service's ``reopen_signal`` goes to its workers |

No other signal an operator or a tool may send kills the daemon by accident:
every one whose default action is to terminate (SIGALRM, SIGVTALRM, SIGPROF,
SIGIO, SIGXCPU, SIGXFSZ, SIGSTKFLT, SIGPWR and the real-time signals) is
logged and ignored. SIGQUIT, SIGABRT and the fault signals keep their default
(a core dump is what whoever sends them wants). SIGPIPE stays ignored, as
Python sets it.

A handler installed by Python is reset to the default by ``execve``, so the
new image of an in-place upgrade would die of a SIGHUP that came while it
imports and adopts. ``blocked()`` blocks every signal here across the exec
(the mask survives it, and so do pending signals); ``forward`` unblocks them
once its receiver is in place, and the pending ones are delivered then.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterator

import structlog
import trio

from supervisor.control.requests import Reload, Reopen, Request, Shutdown, Upgrade

log = structlog.get_logger("supervisor.daemon.signals")

SHUTDOWN = frozenset({signal.SIGTERM, signal.SIGINT})
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2, signal.SIGUSR1)
IGNORED = (
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGXCPU,
    signal.SIGXFSZ,
    signal.SIGSTKFLT,
    signal.SIGPWR,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)
ALL = (*HANDLED, *IGNORED)


def request_for(signum: int) -> Request | None:
    """The request a signal stands for; None for one that is only logged."""
    source = name(signum)
    if signum in SHUTDOWN:
        return Shutdown(source=source)
    if signum == signal.SIGHUP:
        return Reload(source=source)
    if signum == signal.SIGUSR2:
        return Upgrade(source=source)
    if signum == signal.SIGUSR1:
        return Reopen(source=source)
    return None


def name(signum: int) -> str:
    """``SIGHUP``; ``SIGRTMIN+3`` for a real-time signal."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"


def block() -> set[int | signal.Signals]:
    """Block every signal of ``ALL`` until ``forward`` is ready; returns the mask before."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, ALL)


@contextlib.contextmanager
def blocked() -> Iterator[None]:
    """Block every signal of ``ALL`` (around an ``execve``); the mask before is
    put back when the block ends (the exec failed and the old image goes on)."""
    before = block()
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


async def forward(
    handle: Callable[[Request], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Turn signals into requests, for ever. Ready once every signal here has a
    handler and is unblocked (signals that came before are delivered then).

    Args:
        handle: awaited with each request, in the order the signals came.
    """
    with trio.open_signal_receiver(*ALL) as received:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, ALL)
        task_status.started()
        async for signum in received:
            request = request_for(signum)
            if request is None:
                log.warning("signal_ignored", signal=name(signum))
                continue
            await handle(request)
