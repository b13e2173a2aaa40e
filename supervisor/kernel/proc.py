"""Child processes: spawn through the launcher, wait by pidfd, signal by pidfd.

Why not ``trio.lowlevel.open_process``: it forks from a worker thread, and
the kernel sends ``PR_SET_PDEATHSIG`` when the *thread* that forked the
child exits, which trio's idle thread cache does after a few seconds. So we
fork from the trio thread itself (``subprocess.Popen`` with vfork is a few
milliseconds) and wait on a pidfd, as trio does internally.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

LAUNCHER = Path(__file__).resolve().parent.parent / "launch.py"
EXIT_LAUNCH_FAILED = 127


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


def describe_exit(returncode: int) -> str:
    """``exited with status 1`` or ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class ChildProcess:
    """A spawned child, owned by whoever spawned it: ``close()`` after ``wait()``."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._pidfd: int | None = os.pidfd_open(popen.pid)
        self._exited = trio.Event()
        self._waiting = False

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        """Wait for the child to exit and reap it; return its exit status.

        Any number of tasks may wait; the first one watches the pidfd.
        """
        if self._waiting:
            await self._exited.wait()
        else:
            self._waiting = True
            try:
                if self._popen.returncode is None and self._pidfd is not None:
                    await trio.lowlevel.wait_readable(self._pidfd)
                self._popen.wait()
                self._close_pidfd()
                self._exited.set()
            finally:
                self._waiting = self._exited.is_set()
        code = self._popen.returncode
        assert code is not None
        return code

    def send_signal(self, sig: int) -> None:
        """Signal the child unless it is already reaped (pidfd: no pid-reuse race)."""
        if self._pidfd is None or self._popen.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def close(self) -> None:
        """Release the pidfd. A child not yet reaped is killed and reaped first."""
        if self._popen.returncode is None:
            self.send_signal(signal.SIGKILL)
            self._popen.wait()
        self._close_pidfd()


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    fds: Sequence[int],
    cwd: Path | None = None,
    credentials: Credentials = Credentials(),
    death_signal: int = signal.SIGKILL,
    stdout: int | None = None,
) -> ChildProcess:
    """Start ``argv`` through the launcher with ``fds`` as 3, 4, ... in the child.

    The child gets its own session (a Ctrl-C on the supervisor's terminal
    reaches only the supervisor, which then stops workers in order), stdin
    from /dev/null, and the supervisor's stderr and (unless ``stdout`` names
    another fd) stdout.

    Raises:
        OSError: the launcher itself could not be started (fork, fd limits).
    """
    spec = {
        "argv": list(argv),
        "fds": list(fds),
        "parent": os.getpid(),
        "pdeathsig": int(death_signal),
        "uid": credentials.uid,
        "gid": credentials.gid,
        "groups": None if credentials.groups is None else list(credentials.groups),
        "cwd": None if cwd is None else str(cwd),
    }
    popen = subprocess.Popen(
        [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(spec)],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        pass_fds=tuple(fds),
        start_new_session=True,
    )
    try:
        return ChildProcess(popen)
    except OSError:
        popen.kill()
        popen.wait()
        raise
