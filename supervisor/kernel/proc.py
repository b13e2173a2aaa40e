"""Child processes: spawn (``fastspawn``, or the launcher), wait and signal by pidfd.

Why not ``trio.lowlevel.open_process``: it forks from a worker thread, and
the kernel sends ``PR_SET_PDEATHSIG`` when the *thread* that forked the
child exits, which trio's idle thread cache does after a few seconds. So we
fork from the trio thread itself (``subprocess.Popen`` with vfork is a few
milliseconds) and wait on a pidfd, as trio does internally.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import pwd
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
import trio

from supervisor.kernel import fastspawn, launch

LAUNCHER = Path(launch.__file__).resolve()
EXIT_LAUNCH_FAILED = 127
REAP_GRACE = 2.0  # after SIGKILL, how long ``aclose`` waits before reaping in the background
_UNKNOWN_STATUS = 255 << 8  # an exit status for a child someone else reaped
log = structlog.get_logger("supervisor.proc")


@dataclass(frozen=True)
class Credentials:
    """Numeric ids a worker runs as; ``None`` fields keep the supervisor's."""

    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None


def resolve_credentials(user: str | None, group: str | None) -> Credentials:
    """Look up ``user``/``group`` names.

    Raises:
        KeyError: an unknown user or group (the loader checks this first).
    """
    if user is None and group is None:
        return Credentials()
    gid = grp.getgrnam(group).gr_gid if group is not None else None
    if user is None:
        return Credentials(gid=gid, groups=())
    entry = pwd.getpwnam(user)
    gid = entry.pw_gid if gid is None else gid
    return Credentials(uid=entry.pw_uid, gid=gid, groups=tuple(os.getgrouplist(user, gid)))


_NR_PIDFD_GETFD = 438  # the same number on every architecture (asm-generic)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), or
    None if it is gone. With the pid it names one process: a pid can be reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[19])


WORKER_NOFILE = "SUPERVISOR_WORKER_NOFILE"  # carried across an upgrade's exec


def raise_fd_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit (systemd
    leaves services at 1024 soft; 512 workers need some 3,600 fds) and return
    the soft limit its workers get back: the one it started with, or, in the
    image an upgrade exec'd, the one the first image started with."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    carried = os.environ.get(WORKER_NOFILE, "")
    original = int(carried) if carried.isdigit() else soft
    os.environ[WORKER_NOFILE] = str(original)
    if soft < hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return original


def thread_schedstat() -> tuple[float, float] | None:
    """The calling thread's CPU time and its time runnable but waiting for a
    CPU (seconds, since it started; ``/proc/thread-self/schedstat``), or None
    where the kernel does not keep them (no ``CONFIG_SCHED_INFO``)."""
    try:
        ran, waited, _ = Path("/proc/thread-self/schedstat").read_text().split()
    except (OSError, ValueError):
        return None
    return int(ran) / 1e9, int(waited) / 1e9


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def adopt_child(pid: int, started: int | None) -> ChildProcess | None:
    """Our child ``pid``, if it is still the process that started at ``started``
    and not yet reaped; None if it is gone or is someone else now."""
    if parent_of(pid) != os.getpid() or start_time(pid) != started:
        return None
    try:
        return ChildProcess(pid)
    except OSError:
        return None


def fd_of(pid: int, target: int) -> int:
    """A duplicate of fd ``target`` of process ``pid`` (pidfd_getfd, Linux 5.6+):
    how a listener the supervisor lost can be taken back from its worker.

    Raises:
        OSError: the process is gone, has no such fd, or we may not (ptrace rules).
    """
    pidfd = os.pidfd_open(pid)
    try:
        fd = int(_libc.syscall(_NR_PIDFD_GETFD, pidfd, target, 0))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {target}): {os.strerror(err)}")
        return fd
    finally:
        os.close(pidfd)


def describe_exit(returncode: int) -> str:
    """``exited with status 1`` or ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class ChildProcess:
    """A child of this process, watched through a pidfd; owned by whoever made it.

    ``wait`` reaps it (any number of tasks may wait: a lock lets one watch
    the pidfd at a time, so a waiter that is cancelled hands over to the
    next). ``aclose`` ends it: SIGKILL, then a bounded shielded wait. No
    method blocks the trio thread: a child that does not die at once (stuck
    in D state, say) is reaped by a background task when it does.
    """

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self._popen = popen
        self._pidfd: int | None = os.pidfd_open(pid)
        self._returncode: int | None = None
        self._lock = trio.Lock()

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def _reap(self) -> bool:
        """Reap the child if it has exited (never blocks); True once reaped."""
        if self._returncode is not None:
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # not (or no longer) ours to reap
            pid, status = self.pid, _UNKNOWN_STATUS
        if pid == 0:
            return False
        self._returncode = os.waitstatus_to_exitcode(status)
        if self._popen is not None:
            self._popen.returncode = self._returncode  # so Popen never reaps the pid again
        self._close_pidfd()
        return True

    async def wait(self) -> int:
        """Wait for the child to exit and reap it; return its exit status."""
        async with self._lock:
            while not self._reap():
                assert self._pidfd is not None
                await trio.lowlevel.wait_readable(self._pidfd)
        assert self._returncode is not None
        return self._returncode

    def send_signal(self, sig: int) -> None:
        """Signal the child unless it is already reaped (pidfd: no pid-reuse race)."""
        if self._pidfd is None or self._returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    async def aclose(self, grace: float = REAP_GRACE) -> None:
        """Kill the child if it still runs, and reap it (shielded, at most ``grace``
        seconds; after that a background task reaps it when it finally exits)."""
        if self._reap():
            return
        self.send_signal(signal.SIGKILL)
        with trio.CancelScope(shield=True), trio.move_on_after(grace):
            await self.wait()
        self.close()

    def close(self) -> None:
        """Release the child without blocking: a child not yet reaped is
        killed, and reaped by a background task once it has exited."""
        if self._reap():
            return
        self.send_signal(signal.SIGKILL)
        trio.lowlevel.spawn_system_task(self._reap_later)

    async def _reap_later(self) -> None:
        await self.wait()
        log.warning("child_reaped_late", child=self.pid, exit=describe_exit(self._returncode or 0))


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    fds: Sequence[int],
    cwd: Path | None = None,
    credentials: Credentials = Credentials(),
    death_signal: int = signal.SIGKILL,
    stdout: int | None = None,
    stderr: int | None = None,
    nofile: int | None = None,
    via: Literal["auto", "launcher"] = "auto",
) -> ChildProcess:
    """Start ``argv`` with ``fds`` as 3, 4, ... in the child.

    The child gets its own session (a Ctrl-C on the supervisor's terminal
    reaches only the supervisor, which then stops workers in order), stdin
    from /dev/null, and the supervisor's stdout and stderr unless
    ``stdout`` or ``stderr`` name other fds. A worker that keeps the
    supervisor's credentials starts through ``fastspawn`` where the system
    allows it, any other (or ``via="launcher"``) through the Python launcher.

    Raises:
        OSError: the child could not be started (fork, fd limits).
    """
    setpriv = fastspawn.available() if via == "auto" and credentials == Credentials() else None
    popen: subprocess.Popen[bytes] | None = None
    if setpriv is not None:
        pid = fastspawn.spawn(
            setpriv,
            argv,
            env=env,
            fds=fds,
            cwd=cwd,
            death_signal=death_signal,
            stdout=stdout,
            stderr=stderr,
            nofile=nofile,
        )
    else:
        spec = launch.encode(
            list(argv),
            fds=list(fds),
            parent=os.getpid(),
            pdeathsig=int(death_signal),
            uid=credentials.uid,
            gid=credentials.gid,
            groups=None if credentials.groups is None else list(credentials.groups),
            cwd=None if cwd is None else str(cwd),
            nofile=nofile,
        )
        popen = subprocess.Popen(
            [sys.executable, "-I", "-S", str(LAUNCHER), *spec],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=tuple(fds),
            start_new_session=True,
        )
        pid = popen.pid
    try:
        return ChildProcess(pid, popen)
    except OSError:  # no pidfd (out of fds): the child never ran our code yet
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)  # just SIGKILLed: exits at once
        if popen is not None:
            popen.returncode = os.waitstatus_to_exitcode(status)  # Popen must not reap it again
        raise


@dataclass(frozen=True)
class CommandResult:
    """How a short command (a preflight, an exec probe) ended, and the tail of its output."""

    returncode: int
    output: str


async def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None = None,
    credentials: Credentials = Credentials(),
    fds: Sequence[int] = (),
    limit: int = 4000,
    nofile: int | None = None,
) -> CommandResult:
    """Run ``argv`` as ``spawn`` starts a worker (so with ``credentials`` and
    ``cwd``), stdout and stderr captured together; keep the last ``limit`` bytes.

    The caller bounds the time: on cancellation the command is killed and reaped.

    Raises:
        OSError: it could not be started at all.
    """
    read_end, write_end = os.pipe()
    try:
        proc = spawn(
            argv,
            env=env,
            fds=fds,
            cwd=cwd,
            credentials=credentials,
            stdout=write_end,
            stderr=write_end,
            nofile=nofile,
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    output = bytearray()
    try:
        async with trio.lowlevel.FdStream(read_end) as stream:
            while chunk := await stream.receive_some(65536):
                output += chunk
                del output[:-limit]
        code = await proc.wait()
    finally:
        await proc.aclose()
    return CommandResult(code, output.decode(errors="replace"))


def children(pid: int | str = "self") -> set[int]:
    """The pids of a process's children (of every thread), reaped or not; none
    if it is gone."""
    out: set[int] = set()
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            out.update(int(child) for child in (task / "children").read_text().split())
    return out


def family(pid: int, limit: int = 4096) -> set[int]:
    """``pid`` and every descendant of it (nginx's master and its workers)."""
    found, todo = {pid}, [pid]
    while todo and len(found) < limit:
        for child in children(todo.pop()) - found:
            found.add(child)
            todo.append(child)
    return found


def reap_strays(known: set[int], grace: float = 1.0) -> list[int]:
    """Kill and reap every child not in ``known``; the pids it reaped.

    For an in-place upgrade's new image, before it spawns anything: a command
    the old image ran (an exec probe, a preflight) is its child now, and no
    one would ever wait for it (a zombie per upgrade). It is ours and not
    reaped, so its pid cannot have been reused: SIGKILL goes to the right
    process. One that does not die within ``grace`` is left.
    """
    strays = children() - known
    for pid in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    reaped = []
    deadline = time.monotonic() + grace
    for pid in sorted(strays):
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done or time.monotonic() > deadline:
                reaped += [pid] if done else []
                break
            time.sleep(0.001)  # SIGKILLed: gone in a moment
    return reaped
