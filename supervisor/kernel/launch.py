"""Exec helper between the supervisor and a worker: ``python -I -S launch.py SPEC... ARGV...``.

Runs in the child after fork and before the worker's own program, with the
standard library only and as little of it as will do (no site, no package,
no json, re or enum: it costs about 12 ms of CPU, of which 11 are the
interpreter's own start; with json it cost 29).
It does what must happen in the child and cannot be done safely from a
``preexec_fn`` in a threaded parent:

1. give back the soft ``RLIMIT_NOFILE``, then drop privileges (groups, gid,
   uid) when asked;
2. set the parent-death signal *after* the credential change (which would
   clear it), then check the parent is still the one that forked us;
3. move the inherited listener fds to 3, 4, ... (two passes, so no target
   clobbers a source) and close the originals;
4. set ``LISTEN_PID`` to its own pid (exec keeps the pid), chdir, exec.

SPEC is eight positional arguments: ``PARENT PDEATHSIG UID GID GROUPS CWD
FDS NOFILE``: pids and numbers in decimal, ``GROUPS`` and ``FDS``
comma-separated (``GROUPS`` is ``-`` to keep the groups, empty to drop them
all), ``UID``, ``GID``, ``CWD`` and ``NOFILE`` empty to keep them. ``NOFILE``
is the soft ``RLIMIT_NOFILE`` the worker gets back: the supervisor raises its
own to the hard limit, and a program that still uses ``select()`` must not
be handed fds above 1024 by default. The worker's argv follows.
On failure it prints one line to stderr and exits 127 (before exec) so the
supervisor reports it as a failed start.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import sys

TYPE_CHECKING = False  # importing typing would double the launcher's start
if TYPE_CHECKING:
    from typing import NoReturn

_PR_SET_PDEATHSIG = 1
_FIRST_FD = 3
_EXIT_LAUNCH_FAILED = 127
_SPEC_ARGS = 8


class Spec:
    """The parsed SPEC (see the module's docstring)."""

    def __init__(self, args: list[str]) -> None:
        if len(args) <= _SPEC_ARGS:
            raise ValueError(f"expected {_SPEC_ARGS} fields and an argv, got {len(args)} args")
        parent, pdeathsig, uid, gid, groups, cwd, fds, nofile = args[:_SPEC_ARGS]
        self.parent = int(parent)
        self.pdeathsig = int(pdeathsig)
        self.uid = int(uid) if uid else None
        self.gid = int(gid) if gid else None
        self.groups = None if groups == "-" else _numbers(groups)
        self.cwd = cwd or None
        self.fds = _numbers(fds)
        self.nofile = int(nofile) if nofile else None
        self.argv = args[_SPEC_ARGS:]


def _numbers(text: str) -> list[int]:
    return [int(n) for n in text.split(",")] if text else []


def encode(
    argv: list[str],
    *,
    fds: list[int],
    parent: int,
    pdeathsig: int,
    uid: int | None,
    gid: int | None,
    groups: list[int] | None,
    cwd: str | None,
    nofile: int | None = None,
) -> list[str]:
    """SPEC and argv as this launcher's arguments (the inverse of ``Spec``)."""
    return [
        str(parent),
        str(pdeathsig),
        "" if uid is None else str(uid),
        "" if gid is None else str(gid),
        "-" if groups is None else ",".join(map(str, groups)),
        cwd or "",
        ",".join(map(str, fds)),
        "" if nofile is None else str(nofile),
        *argv,
    ]


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"supervisor-launch: {message}\n")
    sys.stderr.flush()
    os._exit(_EXIT_LAUNCH_FAILED)


def _drop_privileges(spec: Spec) -> None:
    if spec.groups is not None:
        os.setgroups(spec.groups)
    if spec.gid is not None:
        os.setresgid(spec.gid, spec.gid, spec.gid)
    if spec.uid is not None:
        os.setresuid(spec.uid, spec.uid, spec.uid)


def _die_with_parent(spec: Spec) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, spec.pdeathsig, 0, 0, 0) != 0:
        _fail(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}")
    # The parent may have died between fork and prctl: then nobody will signal us.
    if os.getppid() != spec.parent:
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


def _restore_nofile(soft: int) -> None:
    import resource  # noqa: PLC0415  (only when asked: every import is start time)

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))


def main() -> None:
    try:
        spec = Spec(sys.argv[1:])
    except ValueError as exc:
        _fail(f"bad launch spec: {exc}")
    # Before the privileges go: ``resource`` is an extension module of the
    # supervisor's interpreter, which the service's user may not be able to
    # read (a venv under /root), and lowering a soft limit needs no privilege.
    if spec.nofile is not None:
        try:
            _restore_nofile(spec.nofile)
        except (OSError, ValueError) as exc:
            _fail(f"cannot restore RLIMIT_NOFILE: {exc}")
    try:
        _drop_privileges(spec)
    except OSError as exc:
        _fail(f"cannot drop privileges: {exc}")
    _die_with_parent(spec)
    try:
        _arrange_fds(spec.fds)
        if spec.cwd:
            os.chdir(spec.cwd)
    except OSError as exc:
        _fail(f"cannot prepare the worker: {exc}")
    env = dict(os.environ)
    env["LISTEN_PID"] = str(os.getpid())
    argv = spec.argv
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        _fail(f"cannot execute {argv[0]!r}: {exc.strerror}")


if __name__ == "__main__":
    main()
