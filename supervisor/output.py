"""Worker output as log events: service, generation, worker, pid, stream, line.

Each worker slot owns two pipes (stdout, stderr) for its whole life, so a
respawned process writes into the same ones and an in-place upgrade hands
them over. A reader task per pipe turns what arrives into ``worker_output``
events, one per line. Bounds, so a worker that floods never slows the
daemon or another worker:

- a line longer than ``MAX_LINE`` bytes is cut (the event says how much);
- each pipe holds ``PIPE_BUFFER`` bytes; the reader empties it as fast as it
  can, so a writer waits only as long as one read;
- at most ``RATE`` lines a second per stream become events (``BURST`` at
  once); the rest are read and dropped, and ``worker_output_dropped`` says
  how many, at most once a second.

stdout lines are info, stderr lines warning, unless a line starts with an
sd-daemon priority prefix (``<3>`` .. ``<7>``), which then decides.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import trio

log = structlog.get_logger("supervisor.worker")

MAX_LINE = 8192
PIPE_BUFFER = 65536
RATE = 200.0  # lines per second per stream
BURST = 2000
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

    def take(self) -> bool:
        now = trio.current_time()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def level_of(line: str, stream: str) -> tuple[int, str]:
    """(logging level, the line without a leading sd-daemon ``<N>`` prefix)."""
    if len(line) >= 3 and line[0] == "<" and line[2] == ">" and line[1] in _LEVELS:
        return _LEVELS[line[1]], line[3:]
    return _DEFAULT[stream], line


async def relay(pipe: Pipe, pid: Callable[[], int | None]) -> None:
    """Turn ``pipe``'s lines into events until cancelled (it owns no fd: the slot does)."""
    bucket = Bucket()
    pending = b""
    dropped = 0
    last_report = trio.current_time()
    fd = pipe.read
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, PIPE_BUFFER)
        except BlockingIOError:
            # Idle: wait for more, but not past the time to report what was dropped.
            with trio.move_on_at(last_report + 1.0 if dropped else float("inf")):
                await trio.lowlevel.wait_readable(fd)
            chunk = b""
        else:
            if not chunk:  # every writer closed (not while the slot holds one)
                await trio.sleep_forever()
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) > MAX_LINE:  # no newline yet, but too long to hold
            lines.append(pending)
            pending = b""
        for raw in lines:
            if bucket.take():
                _emit(pipe.stream, raw, pid())
            else:
                dropped += 1
        now = trio.current_time()
        if dropped and now - last_report >= 1.0:
            log.warning("worker_output_dropped", stream=pipe.stream, lines=dropped, rate=RATE)
            dropped, last_report = 0, now
        await trio.lowlevel.checkpoint()


def _emit(stream: str, raw: bytes, pid: int | None) -> None:
    cut = len(raw) - MAX_LINE
    text = raw[:MAX_LINE].decode(errors="replace").rstrip("\r")
    level, text = level_of(text, stream)
    fields: dict[str, object] = {"stream": stream, "line": text, "pid": pid}
    if cut > 0:
        fields["truncated"] = cut
    log.log(level, "worker_output", **fields)
