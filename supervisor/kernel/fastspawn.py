"""Worker start without a Python launcher: ``posix_spawn``, ``sh``, ``setpriv``.

A worker start must do four things in the child, after the fork and before
the worker's own program: move the listener fds to 3, 4, ...; set
``LISTEN_PID`` to the child's own pid; set the parent-death signal; lower
the soft fd limit and change directory if asked. The Python launcher
(``supervisor/kernel/launch.py``) does them in a fresh interpreter, which costs
10.5 ms of CPU per start against 1 ms for ``/usr/bin/true``. On cores that
serve the load, a reload's CPU is taken from serving: with 4 nginx workers,
a reload cost the machine 100 ms of CPU with the launcher and 55 ms this
way (``nginx -s reload``: 30), and p99 while reloading fell from 9.8 to 4.7 ms
(``nginx -s reload``: 4.7).

Here the C library does the first part: ``posix_spawn`` (a vfork, no copy of
the daemon's memory) with file actions that ``dup2`` each listener to its
number (two passes, so no target clobbers a source not yet moved), stdin
from /dev/null, the output pipes, a new session, default signal handling.
It runs ``/bin/sh``, which sets ``LISTEN_PID=$$`` (``exec`` keeps the pid),
lowers the fd limit, changes directory and execs util-linux's ``setpriv
--pdeathsig``, which sets the death signal and execs a second ``sh`` that
checks that its parent is still the supervisor (a check before the death
signal is set cannot see a death after it) and execs the worker. A
failed step exits 127 with its reason on stderr, as the launcher does. The
second ``sh`` costs about 0.9 ms of CPU per start (3.5 against 4.4 ms for a
``/bin/true`` worker here, 3 interleaved runs of 300 starts).

Only for workers that keep the supervisor's credentials. The death signal is
cleared by a change of credentials, so it must be set after one, and that
ordering is the launcher's. Without ``/bin/sh`` or a ``setpriv`` that has
``--pdeathsig`` (util-linux 2.33+), ``available()`` is None and the launcher
serves.

``posix_spawn`` closes nothing: the child gets every fd not marked
close-on-exec. Python makes its own fds close-on-exec. Fds the process
inherited from its parent may not be, so the first call marks every fd
from 3 up close-on-exec (``_seal_inherited``).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

SH = "/bin/sh"
# $1: the supervisor's pid, $2: the soft RLIMIT_NOFILE or "", $3: the working
# directory or "", $4: the death signal's name, $5: setpriv, $6: PARENT_CHECK, then
# the worker's argv. Only LISTEN_PID is added to the worker's environment.
SCRIPT = (
    "LISTEN_PID=$$; export LISTEN_PID; "
    'if [ -n "$2" ]; then ulimit -S -n "$2" || exit 127; fi; '
    'if [ -n "$3" ]; then cd "$3" || exit 127; fi; '
    "ppid=$1 sig=$4 setpriv=$5 check=$6; shift 6; "
    'exec "$setpriv" --pdeathsig "$sig" -- /bin/sh -c "$check" sh "$ppid" "$@"'
)
# The parent check, run by a second sh after setpriv set the death signal:
# a check in the first sh read $PPID when that sh started, so a supervisor
# that died between then and the signal's setting left an orphan holding its
# listeners (seen: 3 of 23 SIGKILLs during a 256-worker spawn burst). This
# sh's $PPID is read after the signal was set: either the parent is still
# ours, and its death will kill the worker, or it is gone already. The
# launcher does the same (prctl, then getppid()).
PARENT_CHECK = (
    '[ "$PPID" = "$1" ] || { echo "supervisor-launch: the supervisor exited while this '
    'worker was starting" >&2; exit 127; }; shift; exec "$@"'
)


@functools.cache
def available() -> str | None:
    """The path of a ``setpriv`` that sets a death signal, if this system has
    one and ``/bin/sh``; None otherwise (checked once, by running it)."""
    setpriv = shutil.which("setpriv", path=os.defpath + ":/usr/sbin:/sbin")
    if setpriv is None or not os.access(SH, os.X_OK):
        return None
    try:
        done = subprocess.run(
            [setpriv, "--pdeathsig", "KILL", "--", "/bin/true"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return setpriv if done.returncode == 0 else None


def spawn(
    setpriv: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    fds: Sequence[int],
    cwd: Path | None,
    death_signal: int,
    stdout: int | None,
    stderr: int | None,
    nofile: int | None,
) -> int:
    """Start ``argv`` with ``fds`` as 3, 4, ...; return its pid (see the module).

    Raises:
        OSError: ``posix_spawn`` failed (out of fds or processes).
    """
    _seal_inherited()
    floor = max([*fds, 2 + len(fds)]) + 1  # above every source and every target
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_DUP2, devnull, 0)]
        if stdout is not None:
            actions.append((os.POSIX_SPAWN_DUP2, stdout, 1))
        if stderr is not None:
            actions.append((os.POSIX_SPAWN_DUP2, stderr, 2))
        actions += [(os.POSIX_SPAWN_DUP2, src, floor + i) for i, src in enumerate(fds)]
        for i in range(len(fds)):
            actions.append((os.POSIX_SPAWN_DUP2, floor + i, 3 + i))
            actions.append((os.POSIX_SPAWN_CLOSE, floor + i))
        args = [
            str(os.getpid()),
            "" if nofile is None else str(nofile),
            "" if cwd is None else str(cwd),
            signal.Signals(death_signal).name.removeprefix("SIG"),
            setpriv,
            PARENT_CHECK,
        ]
        return os.posix_spawn(
            SH,
            ["sh", "-c", SCRIPT, "sh", *args, *argv],
            dict(env),
            file_actions=actions,
            setsid=True,
            setsigmask=(),
            # Python ignores SIGPIPE and SIGXFSZ; a worker starts with the defaults.
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    finally:
        os.close(devnull)


@functools.cache
def _seal_inherited() -> None:
    """Mark every fd from 3 up close-on-exec, once per process (see the module)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # listdir's own fd, closed by now
                continue
