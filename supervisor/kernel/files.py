"""Files and directories that someone else may have replaced, or never made.

The daemon reads files that less trusted users can write: a watched
certificate that an ACME client renews, a TLS key, the config. Path.read_bytes
would block the daemon's only thread forever in open() on a FIFO that nobody
writes, and would read /dev/zero until the OOM killer came. ``read_regular``
opens without blocking, takes only a regular file, and reads no more than a
limit.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at ``path`` (symlinks followed).

    Raises:
        OSError: it cannot be opened or read; it is not a regular file
            (``EINVAL``, strerror names what it is); or it holds more than
            ``limit`` bytes (``EFBIG``).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a file")
            raise OSError(errno.EINVAL, f"not a regular file ({kind})", str(path))
        chunks, size = [], 0
        # A regular file's size may lie (files in /proc say 0), so count what is read.
        while chunk := os.read(fd, min(1 << 16, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)


def ensure_directory(path: Path, uid: int | None, gid: int | None) -> None:
    """Make ``path`` (and its parents) unless it is a directory already: mode
    0755 whatever the umask, owned by ``uid``/``gid`` where given. An existing
    directory is left as it is, its owner and mode the operator's.

    Raises:
        OSError: it cannot be made (a read-only file system: ``EROFS``), or
            something other than a directory is there (``EEXIST``).
    """
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(path)
    os.chmod(path, 0o755)  # noqa: S103  (a server's unprivileged workers pass through it)
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)


def private_tmp(directory: Path, mountinfo: str | None = None) -> bool:
    """Whether ``directory`` lies in a private /tmp that systemd made for this
    service (``PrivateTmp=yes``): the mount it is on is a bind of a
    ``systemd-private-*`` directory, which no process outside the unit sees.
    (``/proc/1/root`` would tell any private mount, but the unit's bounding
    set, without CAP_SYS_PTRACE, may not look there.)"""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return False
    best, root = "", ""
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        inside = str(directory) == point or str(directory).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, root = point, fields[3]
    return "/systemd-private-" in root  # under the /tmp of the filesystem it is on
