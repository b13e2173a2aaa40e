"""Exec helper between the supervisor and a worker: ``python -I -S launch.py SPEC``.

Runs in the child after fork and before the worker's own program, with the
standard library only (no site, no package import: it starts in ~20 ms).
It does what must happen in the child and cannot be done safely from a
``preexec_fn`` in a threaded parent:

1. drop privileges (groups, gid, uid) when asked;
2. set the parent-death signal *after* the credential change (which would
   clear it), then check the parent is still the one that forked us;
3. move the inherited listener fds to 3, 4, ... (two passes, so no target
   clobbers a source) and close the originals;
4. set ``LISTEN_PID`` to its own pid (exec keeps the pid), chdir, exec.

SPEC is JSON: ``{"argv": [...], "fds": [..], "parent": pid, "pdeathsig": n,
"uid": n|null, "gid": n|null, "groups": [..]|null, "cwd": str|null}``.
On failure it prints one line to stderr and exits 127 (before exec) so the
supervisor reports it as a failed start.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import sys
from typing import Any, NoReturn

_PR_SET_PDEATHSIG = 1
_FIRST_FD = 3
_EXIT_LAUNCH_FAILED = 127


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"supervisor-launch: {message}\n")
    sys.stderr.flush()
    os._exit(_EXIT_LAUNCH_FAILED)


def _drop_privileges(spec: dict[str, Any]) -> None:
    if spec.get("groups") is not None:
        os.setgroups(spec["groups"])
    if spec.get("gid") is not None:
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    if spec.get("uid") is not None:
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])


def _die_with_parent(spec: dict[str, Any]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, spec["pdeathsig"], 0, 0, 0) != 0:
        _fail(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}")
    # The parent may have died between fork and prctl: then nobody will signal us.
    if os.getppid() != spec["parent"]:
        _fail("the supervisor exited while this worker was starting")


def _arrange_fds(sources: list[int]) -> None:
    # Pass 1 copies every source above all sources and targets, pass 2 moves
    # the copies down to 3, 4, ...: no target can clobber a source not yet moved.
    floor = max([*sources, _FIRST_FD + len(sources)]) + 1
    temporary = [fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, floor) for src in sources]
    for src in set(sources):
        os.close(src)
    for offset, tmp in enumerate(temporary):
        os.dup2(tmp, _FIRST_FD + offset, inheritable=True)
        os.close(tmp)


def main() -> None:
    try:
        spec = json.loads(sys.argv[1])
    except (IndexError, ValueError) as exc:
        _fail(f"bad launch spec: {exc}")
    try:
        _drop_privileges(spec)
    except OSError as exc:
        _fail(f"cannot drop privileges: {exc}")
    _die_with_parent(spec)
    try:
        _arrange_fds(spec["fds"])
        if spec.get("cwd"):
            os.chdir(spec["cwd"])
    except OSError as exc:
        _fail(f"cannot prepare the worker: {exc}")
    env = dict(os.environ)
    env["LISTEN_PID"] = str(os.getpid())
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        _fail(f"cannot execute {argv[0]!r}: {exc.strerror}")


if __name__ == "__main__":
    main()
