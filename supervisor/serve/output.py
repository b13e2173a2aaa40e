"""Worker output as log events: service, generation, worker, pid, stream, line.

Each worker slot owns two pipes (stdout, stderr) for its whole life, so a
respawned process writes into the same ones and an in-place upgrade hands
them over. One reader per generation (``OutputHub``) turns what arrives on
any of them into ``worker_output`` events, one per line. Bounds, so a worker
that floods never slows the daemon or another worker:

- a line longer than ``MAX_LINE`` bytes is cut (the event says how much);
- each pipe holds ``PIPE_BUFFER`` bytes; the reader empties it as fast as it
  can, so a writer waits only as long as one read;
- at most ``RATE`` lines a second per stream become events (``BURST`` at
  once); the rest are read and dropped (counted by ``bytes.count``, not
  split one by one), and ``worker_output_dropped`` says how many, at most
  once a second;
- at most ``BYTE_RATE`` bytes a second per stream are read at all
  (``BYTE_BURST`` at once). A stream over it is left unread until its budget
  allows another full read: its pipe fills and the worker waits in its own
  ``write()``, and the daemon spends nothing on it meanwhile. A worker that
  printed empty lines as fast as it could (``yes ''``) once held the daemon
  at 100% of a core, reading and splitting them.

stdout lines are info, stderr lines warning, unless a line starts with an
sd-daemon priority prefix (``<3>`` .. ``<7>``), which then decides.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import structlog
import trio

log = structlog.get_logger("supervisor.serve.worker")

MAX_LINE = 8192
PIPE_BUFFER = 65536
RATE = 200.0  # lines per second per stream
BURST = 2000
BYTE_RATE = 4 << 20  # bytes per second per stream
BYTE_BURST = 16 << 20
F_SETPIPE_SZ = 1031
_LEVELS = {"0": 50, "1": 50, "2": 50, "3": 40, "4": 30, "5": 20, "6": 20, "7": 10}
_DEFAULT = {"stdout": 20, "stderr": 30}


@dataclass
class Pipe:
    """One stream: the end the worker writes and the end we read."""

    stream: str
    read: int
    write: int


def open_pipes() -> tuple[Pipe, Pipe]:
    """A stdout and a stderr pipe, bounded, close-on-exec (the spawner passes the
    write ends as the child's 1 and 2).

    Raises:
        OSError: out of fds.
    """
    pipes = []
    try:
        for stream in ("stdout", "stderr"):
            read, write = os.pipe()
            pipes.append(Pipe(stream, read, write))
            with contextlib.suppress(OSError):  # the default is this size already
                fcntl.fcntl(write, F_SETPIPE_SZ, PIPE_BUFFER)
    except BaseException:
        for pipe in pipes:
            os.close(pipe.read)
            os.close(pipe.write)
        raise
    return pipes[0], pipes[1]


class Bucket:
    """A token bucket: ``take()`` is True while the rate allows one more line."""

    def __init__(self, rate: float = RATE, burst: int = BURST) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = trio.current_time()

    def _refill(self) -> None:
        now = trio.current_time()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def allowance(self) -> int:
        """How many ``take()`` would allow now (nothing is taken)."""
        self._refill()
        return max(0, int(self.tokens))

    def take(self) -> bool:
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def spend(self, amount: int) -> float:
        """Take ``amount`` (into debt if need be); the seconds until ``PIPE_BUFFER``
        tokens are there again (0 if they are)."""
        self._refill()
        self.tokens -= amount
        return max(0.0, (PIPE_BUFFER - self.tokens) / self.rate)


def level_of(line: str, stream: str) -> tuple[int, str]:
    """(logging level, the line without a leading sd-daemon ``<N>`` prefix)."""
    if len(line) >= 3 and line[0] == "<" and line[2] == ">" and line[1] in _LEVELS:
        return _LEVELS[line[1]], line[3:]
    return _DEFAULT[stream], line


class _Reader:
    """One pipe's state in the hub: its partial line, its rate, what it dropped."""

    def __init__(self, pipe: Pipe, worker: int, pid: Callable[[], int | None]) -> None:
        self.pipe, self.worker, self.pid = pipe, worker, pid
        self.bucket = Bucket()
        self.bytes = Bucket(BYTE_RATE, BYTE_BURST)
        self.pending = b""
        self.dropped = 0
        self.last_report = trio.current_time()

    def read(self) -> float | None:
        """Read what the pipe holds (one read) into events. None at end of file;
        else how long to leave the pipe unread (its byte budget is spent)."""
        try:
            chunk = os.read(self.pipe.read, PIPE_BUFFER)
        except BlockingIOError:
            return 0.0
        if not chunk:  # every writer closed (not while the slot holds one)
            return None
        pause = self.bytes.spend(len(chunk))
        # Split off no more lines than may become events; count the rest in C.
        allowed = self.bucket.allowance()
        parts = (self.pending + chunk).split(b"\n", allowed)
        lines, rest = parts[:-1], parts[-1]
        if len(parts) > allowed:  # ``rest`` may hold more lines, all beyond the rate
            head, sep, tail = rest.rpartition(b"\n")
            if sep:
                self.dropped += head.count(b"\n") + 1
                rest = tail
        self.pending = rest
        if len(self.pending) > MAX_LINE:  # no newline yet, but too long to hold
            lines.append(self.pending)
            self.pending = b""
        for raw in lines:
            if self.bucket.take():
                _emit(self.pipe.stream, raw, self.worker, self.pid())
            else:
                self.dropped += 1
        return pause

    def report(self, now: float) -> None:
        """Say how many lines were dropped, at most once a second."""
        if self.dropped and now - self.last_report >= 1.0:
            log.warning(
                "worker_output_dropped",
                worker=self.worker,
                stream=self.pipe.stream,
                lines=self.dropped,
                rate=RATE,
            )
            self.dropped, self.last_report = 0, now


class OutputHub:
    """Turns the lines of every pipe it watches into events, from one task.

    A generation has one: its slots ``watch`` their pipes and ``unwatch`` them
    before closing them, and ``run`` reads whatever is readable, through an
    epoll set of its own. One task for all, instead of a task per pipe, which
    cost each worker two tasks, two cancel scopes and their wakeups at every
    start and stop. The hub owns no pipe, only its epoll set, which exists
    while the hub is entered (``with hub:``).
    """

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._readers: dict[int, _Reader] = {}
        self._dropping: set[_Reader] = set()  # readers with lines to report
        self._paused: dict[_Reader, float] = {}  # out of the epoll set until then

    def __enter__(self) -> Self:
        self._epoll = select.epoll()
        return self

    def __exit__(self, *exc: object) -> None:
        self._poller().close()
        self._epoll = None

    def _poller(self) -> select.epoll:
        if self._epoll is None:
            raise RuntimeError("the output hub is used outside its `with` block")
        return self._epoll

    def watch(self, pipe: Pipe, worker: int, pid: Callable[[], int | None]) -> None:
        """Relay ``pipe`` (its lines carry ``worker`` and the pid ``pid()`` gives).

        Raises:
            OSError: the epoll set is full (out of memory).
        """
        os.set_blocking(pipe.read, False)
        self._poller().register(pipe.read, select.EPOLLIN)
        self._readers[pipe.read] = _Reader(pipe, worker, pid)

    def unwatch(self, pipe: Pipe) -> None:
        """Stop relaying ``pipe``, after one last read of what it holds."""
        reader = self._readers.pop(pipe.read, None)
        if reader is None:
            return
        if self._paused.pop(reader, None) is None:
            with contextlib.suppress(OSError):  # closed behind our back: epoll let go already
                self._poller().unregister(pipe.read)
        self._read(reader)
        reader.report(reader.last_report + 1.0)
        self._dropping.discard(reader)

    async def run(self) -> None:
        """Relay until cancelled."""
        epoll = self._poller()
        while True:
            due = min(
                [r.last_report + 1.0 for r in self._dropping] + list(self._paused.values()),
                default=float("inf"),
            )
            with trio.move_on_at(due):
                await trio.lowlevel.wait_readable(epoll.fileno())
            for fd, _ in epoll.poll(0):
                reader = self._readers.get(fd)
                if reader is None:
                    continue
                pause = self._read(reader)
                if pause is None:  # nothing more comes: its writers are gone
                    with contextlib.suppress(OSError):
                        epoll.unregister(fd)
                    self._readers.pop(fd)
                    continue
                if pause > 0:  # over its byte budget: unread until it may read again
                    epoll.unregister(fd)
                    self._paused[reader] = trio.current_time() + pause
                if reader.dropped:
                    self._dropping.add(reader)
            now = trio.current_time()
            for reader, until in list(self._paused.items()):
                if until <= now:
                    del self._paused[reader]
                    epoll.register(reader.pipe.read, select.EPOLLIN)
            for reader in list(self._dropping):
                reader.report(now)
                if not reader.dropped:
                    self._dropping.discard(reader)
            await trio.lowlevel.checkpoint()

    @staticmethod
    def _read(reader: _Reader) -> float | None:
        """``reader.read()``; a pipe that fails is logged and given up, so one
        worker's pipe never takes the generation's other workers' output down."""
        try:
            return reader.read()
        except OSError as exc:  # seam: a worker's pipe; one bad pipe is given up
            log.error(
                "worker_output_failed",
                worker=reader.worker,
                stream=reader.pipe.stream,
                error=str(exc),
            )
            return None


def _emit(stream: str, raw: bytes, worker: int, pid: int | None) -> None:
    cut = len(raw) - MAX_LINE
    text = raw[:MAX_LINE].decode(errors="replace").rstrip("\r")
    level, text = level_of(text, stream)
    fields: dict[str, object] = {"worker": worker, "stream": stream, "line": text, "pid": pid}
    if cut > 0:
        fields["truncated"] = cut
    log.log(level, "worker_output", **fields)
