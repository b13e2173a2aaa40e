"""File descriptors that outlive an image: sealed memfds, inheritance, identity.

An in-place upgrade hands its state to the next image as a sealed memfd
(written once, then sealed, so the reader knows nobody can change it) and
its sockets, pidfd-less children and BPF objects as inherited fds. The new
image checks what each fd is before it trusts it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from collections.abc import Iterable
from pathlib import Path

F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
SEALED = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE


def sealed_memfd(name: str, data: bytes) -> int:
    """A memfd holding ``data``, sealed against every change; close-on-exec.

    Raises:
        OSError: memfd_create, write or sealing failed.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, F_ADD_SEALS, SEALED)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_sealed(fd: int) -> bytes:
    """Everything in memfd ``fd``.

    Raises:
        OSError: ``fd`` is not a memfd sealed against writes (or cannot be read).
    """
    seals = fcntl.fcntl(fd, F_GET_SEALS)
    if seals & SEALED != SEALED:
        raise OSError(0, f"fd {fd} is not a sealed memfd (seals {seals:#x})")
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def set_inheritable(fds: Iterable[int], inheritable: bool) -> None:
    for fd in fds:
        os.set_inheritable(fd, inheritable)


def identity(fd: int) -> tuple[int, int] | None:
    """What ``fd`` refers to (device and inode), None if it is not open. An fd
    number alone is not an identity: a closed one is soon reused."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def adopt_socket(fd: int) -> socket.socket:
    """A ``socket.socket`` for inherited ``fd`` (family and type read from the kernel).

    Raises:
        OSError: ``fd`` is not an open socket.
    """
    if not is_socket(fd):
        raise OSError(9, f"fd {fd} is not an open socket")
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    return sock


def fdinfo(fd: int, pid: int | str = "self") -> dict[str, str]:
    """``/proc/PID/fdinfo/FD`` as a dict (BPF objects show their type and sizes here)."""
    text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
    pairs = (line.partition(":") for line in text.splitlines())
    return {key.strip(): value.strip() for key, sep, value in pairs if sep}


def fd_kind(fd: int) -> str:
    """What ``fd`` refers to, as ``readlink /proc/self/fd/FD`` says (``anon_inode:bpf-map``)."""
    return os.readlink(f"/proc/self/fd/{fd}")
