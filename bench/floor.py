"""The least CPU a trio supervisor spends per worker per reload: a floor.

``python bench/floor.py --workers 64 --reloads 10 --rounds 4`` (root; it
enters a private network namespace of its own).

A reload here does only the kernel's part of what supervisord does for each
worker, through the same calls, and nothing else. For each new worker it
opens an SO_REUSEPORT listener, a NOTIFY_SOCKET and two output pipes, starts
the worker through ``fastspawn`` (``posix_spawn``, ``sh``, ``setpriv``),
opens its pidfd and reads its ``READY=1``. For each old worker it sends the
stop signal, shuts the listener down, waits on the pidfd, reaps and closes.
Each worker has one task. There is no eBPF, no health gate beyond
``READY=1``, no state, no logging and no control socket.

Each round runs supervisord on the same tiny workers first, then the floor,
so the machine's drift falls on both. The CPU is each process's own, user
plus system (``/proc/PID/stat``; the children's is not counted), per reload
per worker. The difference between the two is the supervisor's machinery
(its tasks, states, eBPF, health gate, reports), not the kernel work. A
floor reload's duration runs from the first new worker's start to the last
old worker reaped. The scale section of ``bench/run.py`` runs ``measure``
after each of its rows.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import signal
import socket
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.systems import Supervised  # noqa: E402
from supervisor.kernel import fastspawn  # noqa: E402
from supervisor.kernel.proc import ChildProcess  # noqa: E402
from tests.support.procs import TINY, cpu_seconds, enter_private_netns  # noqa: E402

PORT = 8080
_names = itertools.count()


class Batch:
    """Counts workers of one generation as they get ready, then as they exit."""

    def __init__(self, n: int) -> None:
        self.n, self.ready, self.gone = n, 0, 0
        self.all_ready, self.all_gone, self.stop = trio.Event(), trio.Event(), trio.Event()

    def one_ready(self) -> None:
        self.ready += 1
        if self.ready == self.n:
            self.all_ready.set()

    def one_gone(self) -> None:
        self.gone += 1
        if self.gone == self.n:
            self.all_gone.set()


def _listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    return sock


async def worker(setpriv: str, env: dict[str, str], batch: Batch) -> None:
    """One worker's life: start, READY=1, wait for the stop, stop, reap."""
    lst = _listener(PORT)
    name = f"floor-{os.getpid()}-{next(_names)}"
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    bound.bind("\0" + name)  # abstract: no file system, nothing to block on
    notify = trio.socket.from_stdlib_socket(bound)
    out, err = os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC)
    try:
        pid = fastspawn.spawn(
            setpriv,
            TINY,
            env={**env, "NOTIFY_SOCKET": "@" + name},
            fds=[lst.fileno()],
            cwd=None,
            death_signal=signal.SIGKILL,
            stdout=out[1],
            stderr=err[1],
            nofile=None,
        )
        proc = ChildProcess(pid)
        while not (await notify.recv(4096)).startswith(b"READY=1"):
            pass
        batch.one_ready()
        await batch.stop.wait()
        proc.send_signal(signal.SIGTERM)
        lst.shutdown(socket.SHUT_RDWR)
        await proc.wait()
    finally:
        lst.close()
        notify.close()
        for fd in (*out, *err):
            os.close(fd)
    batch.one_gone()


@dataclass
class Measured:
    """CPU per reload per worker, and each reload's duration (s)."""

    cpu_per_worker: float
    durations: list[float]


async def reloads(workers: int, count: int) -> Measured:
    """Start ``workers``, then reload ``count`` times."""
    setpriv = fastspawn.available()
    if setpriv is None:
        raise SystemExit("fastspawn is not available here (/bin/sh, setpriv --pdeathsig)")
    env = {**os.environ, "LISTEN_FDS": "1"}

    async def generation(nursery: trio.Nursery) -> Batch:
        batch = Batch(workers)
        for _ in range(workers):
            nursery.start_soon(worker, setpriv, env, batch)
        await batch.all_ready.wait()
        return batch

    durations = []
    async with trio.open_nursery() as nursery:
        current = await generation(nursery)
        before = cpu_seconds(os.getpid())
        for _ in range(count):
            began = trio.current_time()
            new = await generation(nursery)
            current.stop.set()
            await current.all_gone.wait()
            durations.append(trio.current_time() - began)
            current = new
        spent = cpu_seconds(os.getpid()) - before
        current.stop.set()
    return Measured(spent / count / workers, durations)


def measure(workers: int, count: int) -> Measured:
    """The floor at ``workers``, with the soft fd limit raised as supervisord raises its own."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        return trio.run(reloads, workers, count)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def supervised(workers: int, count: int) -> Measured:
    """supervisord on the same workers, measured the same way (not a floor)."""
    with tempfile.TemporaryDirectory() as tmp:
        sup = Supervised(Path(tmp), PORT, workers, "auto", "migrate", command=TINY)
        sup.start()
        try:
            before = cpu_seconds(sup.pid)
            done = [sup.reload() for _ in range(count)]
            spent = cpu_seconds(sup.pid) - before
        finally:
            sup.stop()
    failed = sum(not r.ok for r in done)
    if failed:
        raise SystemExit(f"{failed} of supervisord's reloads failed")
    return Measured(spent / count / workers, [r.seconds for r in done])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    enter_private_netns("the floor")
    rows: dict[str, list[Measured]] = {"supervisord": [], "floor": []}
    for _ in range(args.rounds):
        rows["supervisord"].append(supervised(args.workers, args.reloads))
        rows["floor"].append(measure(args.workers, args.reloads))
        print(", ".join(f"{name} {_line([runs[-1]])}" for name, runs in rows.items()), flush=True)
    print(f"{args.rounds} rounds of {args.reloads} reloads of {args.workers} workers:")
    for name, runs in rows.items():
        print(f"{name}: {_line(runs)}")


def _line(runs: list[Measured]) -> str:
    cpu = [r.cpu_per_worker * 1000 for r in runs]
    took = [statistics.median(r.durations) * 1000 for r in runs]
    low, high = min(cpu), max(cpu)
    return (
        f"CPU per reload per worker {statistics.median(cpu):.3f} ms ({low:.3f}-{high:.3f}),"
        f" reload p50 {statistics.median(took):.0f} ms ({min(took):.0f}-{max(took):.0f})"
    )


if __name__ == "__main__":
    main()
