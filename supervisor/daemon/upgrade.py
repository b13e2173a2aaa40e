"""In-place upgrade: the daemon re-executes its own entry point, keeping its pid.

The old image proves the new code can start (``--check --state-fd``: the
new entry point reads the state document of the current version and checks
the config it carries), writes the state into a sealed memfd, marks every fd
the state names as inheritable (only now: Python's fds are close-on-exec),
and ``execv``s from the main thread (``PR_SET_PDEATHSIG`` fires when the
*thread* that forked a worker dies: exec from any other thread would kill
the workers). The pid stays, so the workers stay its children and systemd's
``MAINPID`` is unchanged. The new image adopts everything and binds or
spawns nothing that exists.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog
import trio

from supervisor.errors import StateError, UpgradeRefused
from supervisor.handoff import state
from supervisor.handoff.state import DaemonDoc
from supervisor.kernel import fds
from supervisor.kernel.proc import run_command

log = structlog.get_logger("supervisor.daemon.upgrade")

CHECK_TIMEOUT = 30.0
STATE_FD_FLAG = "--state-fd"


def monotonic() -> float:
    """CLOCK_MONOTONIC seconds: the same clock in both images (trio's is not)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def entry_point() -> list[str]:
    """The argv that starts this daemon again: its entry point script if it was
    started through one (``supervisord``, which may be newly installed code),
    else the interpreter with its original options. A state fd from an
    earlier upgrade is left out."""
    script = sys.argv[0]
    if script and not script.endswith(".py") and os.access(script, os.X_OK):
        argv = [str(Path(script).resolve()), *sys.argv[1:]]
    else:
        argv = [sys.executable, *sys.orig_argv[1:]]
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == STATE_FD_FLAG:
            skip = True
        elif not arg.startswith(f"{STATE_FD_FLAG}="):
            out.append(arg)
    return out


async def check_new_code(entry: Sequence[str], document: bytes) -> str:
    """Run the new entry point's ``--check`` on ``document`` (as fd 3 of the check).

    Returns what it printed. Raises UpgradeRefused with its words otherwise.
    """
    memfd = fds.sealed_memfd("supervisor-state-check", document)
    argv = [*entry, "--check", STATE_FD_FLAG, "3"]
    try:
        with trio.fail_after(CHECK_TIMEOUT):
            done = await run_command(argv, env=dict(os.environ), fds=[memfd])
    except trio.TooSlowError:
        raise UpgradeRefused(f"{argv[0]} --check did not finish in {CHECK_TIMEOUT:g}s") from None
    except OSError as exc:  # seam: the new code's check, as UpgradeRefused
        raise UpgradeRefused(f"{argv[0]} cannot be run: {exc}") from exc
    finally:
        os.close(memfd)
    if done.returncode != 0:
        words = done.output.strip() or "no output"
        raise UpgradeRefused(f"the new code failed its check (exit {done.returncode}): {words}")
    return done.output.strip()


def execute(entry: Sequence[str], document: DaemonDoc, environ: Mapping[str, str]) -> OSError:
    """Exec the new image with ``document`` and ``environ`` (the daemon's own
    environment, systemd's variables put back); returns only if the exec
    failed (every fd is close-on-exec again then, and the old image serves on)."""
    document = document.stamped()
    memfd = fds.sealed_memfd("supervisor-state", state.encode(document))
    inherited = [*document.numbers(), memfd]
    argv = [*entry, STATE_FD_FLAG, str(memfd)]
    log.info("upgrade_exec", argv=argv, fds=len(inherited))
    fds.set_inheritable(inherited, True)
    # The caller blocks the daemon's signals across this (signals.blocked):
    # Python's handlers do not survive the exec, and the new image would die
    # of a SIGHUP or SIGUSR2 before it has its own (signals.forward).
    try:
        os.execve(argv[0], argv, dict(environ))  # noqa: S606  (our own entry point)
    except OSError as exc:  # seam: the exec itself; the old image serves on
        error = exc
    fds.set_inheritable(inherited, False)
    os.close(memfd)
    return error


def read_document(fd: int) -> DaemonDoc:
    """The state document the previous image left at ``fd`` (closed after
    reading). Its fds are checked by ``Ledger.received``, which must come
    first: before anything opens an fd that could take a lost one's number.

    Raises:
        StateError: unreadable, not sealed, or of a version this code does not know.
    """
    try:
        data = fds.read_sealed(fd)
    except OSError as exc:  # seam: the state document's fd, as StateError
        raise StateError(f"fd {fd}: {exc}") from exc
    finally:
        os.close(fd)
    return state.decode(data)
