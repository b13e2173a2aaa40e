"""inotify(7) through ctypes: directory watches whose events a trio task awaits.

Only what the file watcher needs: watch a directory for entries that are
written, created, moved in or out, deleted or re-linked, and read the names
of the entries that changed. The fd is non-blocking and close-on-exec, owned
by one ``Inotify`` and closed by its context manager.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path
from types import TracebackType
from typing import Self

import trio

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# Every way a file in a directory can get new content: written in place,
# replaced by rename (editors, certbot's symlinks, Kubernetes' ..data swap),
# created, deleted, or its symlink changed.
DIRECTORY_CHANGES = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """One inotify instance with directory watches."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        self.fd: int = fd
        self._dirs: dict[int, Path] = {}

    def watch_directory(self, path: Path) -> None:
        """Report changes of entries in ``path``.

        Raises:
            OSError: ``path`` is not a directory, or the watch limit is reached.
        """
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), DIRECTORY_CHANGES | IN_ONLYDIR)
        if wd < 0:
            code = ctypes.get_errno()
            hint = " (fs.inotify.max_user_watches)" if code == errno.ENOSPC else ""
            raise OSError(code, f"inotify watch on {path}: {os.strerror(code)}{hint}")
        self._dirs[wd] = path

    async def changes(self) -> list[Path]:
        """Wait for events; return the paths they name (a directory on overflow)."""
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
                continue
            return self._parse(data)

    def _parse(self, data: bytes) -> list[Path]:
        paths: list[Path] = []
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
            offset += _EVENT.size + length
            directory = self._dirs.get(wd)
            if mask & IN_Q_OVERFLOW:
                paths.extend(self._dirs.values())  # events were lost: everything may have changed
            elif directory is not None:
                name = raw.rstrip(b"\0")
                paths.append(directory / os.fsdecode(name) if name else directory)
        return paths

    def close(self) -> None:
        if self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
