"""Processes for the benchmark: children of a pid, waiting for pids to end,
and READY=1 notifications from workers the benchmark starts itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "supervisor.demo"]
# A worker that starts in milliseconds (scale, soak, the floor).
TINY = [sys.executable, "-I", "-S", str(ROOT / "bench" / "tiny_worker.py")]
POLL = 0.005  # the benchmark's own waits; the supervisor does not poll like this


def enter_private_netns(why: str) -> None:
    """Run the rest of this program as root in a network namespace of its own,
    loopback up: re-exec under ``unshare -n`` unless that was done already."""
    if os.geteuid() != 0:
        raise SystemExit(f"{why} needs root (a private network namespace)")
    if os.environ.get("BENCH_IN_NETNS") != "1":
        env = {**os.environ, "BENCH_IN_NETNS": "1"}
        os.execvpe("unshare", ["unshare", "-n", sys.executable, *sys.argv], env)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name: state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> set[int]:
    """The live (non-zombie) children of ``pid``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat(entry)
        except OSError:
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.add(int(entry))
    return found


def state(pid: int) -> str:
    """The one-letter state of ``pid`` (R, S, D, T, Z, ...). Raises OSError if gone."""
    return _stat(pid)[0]


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie nobody has reaped yet."""
    try:
        return state(pid) != "Z"
    except OSError:
        return False


def wait_for(done: Callable[[], bool], timeout: float, what: str) -> None:
    """For state owned by the kernel or another process, with no event to await
    (used by the tests too)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL)


def wait_gone(pids: Iterable[int], timeout: float = 60) -> None:
    left = set(pids)
    wait_for(lambda: not {p for p in left if alive(p)}, timeout, f"pids {sorted(left)} to exit")


def cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy since boot, all cores (/proc/stat:
    user, nice, system, irq, softirq, steal; not idle or iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for {pid}")


def settled_fd_count(pid: int) -> int:
    """The fewest fds of ``pid`` over 0.5 s: a reload's answer reaches us a moment
    before the daemon closes that control connection, so one reading may count it."""
    counts = []
    for _ in range(10):
        counts.append(len(os.listdir(f"/proc/{pid}/fd")))
        time.sleep(0.05)
    return min(counts)


def zombies(pid: int) -> list[str]:
    """``pid stat`` of each zombie child of ``pid``."""
    out = subprocess.run(
        ["ps", "-o", "pid=,stat=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return [line.strip() for line in out.splitlines() if line.split()[1].startswith("Z")]


class ReadyWatch:
    """An abstract-namespace NOTIFY_SOCKET; ``wait(n)`` for n READY=1 datagrams."""

    def __init__(self, name: str) -> None:
        self.address = f"@bench-{os.getpid()}-{name}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.address[1:])

    def wait(self, count: int, timeout: float = 60) -> None:
        self._sock.settimeout(timeout)
        seen = 0
        while seen < count:
            if b"READY=1" in self._sock.recv(4096).split(b"\n"):
                seen += 1

    def close(self) -> None:
        self._sock.close()


class SelfBound:
    """Workers that each bind their own SO_REUSEPORT listener (or share one fd)."""

    def __init__(self, port: int, workers: int, name: str, share_fd: int | None = None) -> None:
        self.port, self.workers, self.share_fd = port, workers, share_fd
        self.ready = ReadyWatch(name)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> list[subprocess.Popen[bytes]]:
        where = (
            ["--fd", str(self.share_fd)] if self.share_fd else ["--bind", f"127.0.0.1:{self.port}"]
        )
        env = {**os.environ, "NOTIFY_SOCKET": self.ready.address, "PYTHONPATH": str(ROOT)}
        fresh = [
            subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "selfbind.py"), *where, "--", *DEMO],
                env=env,
                pass_fds=(self.share_fd,) if self.share_fd else (),
            )
            for _ in range(self.workers)
        ]
        self.ready.wait(self.workers)
        return fresh

    @staticmethod
    def stop(procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)

    def close(self) -> None:
        self.stop(self.procs)
        self.ready.close()
