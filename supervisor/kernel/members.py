"""Members of a reuseport group that are not ours: who holds them, and how
they are set.

Any process whose socket has the same owner uid may join a group by binding
the same address and port with SO_REUSEPORT: the kernel asks nothing else
(docs/kernel.md §2). sock_diag tells us a member's inode, cookie and uid;
``/proc/PID/fd`` tells us which processes hold it; a duplicate taken with
pidfd_getfd (root, or CAP_SYS_PTRACE) lets us read its settings as the
kernel sees them, the ones a migration between listeners must not cross.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

from supervisor.errors import KernelError, translated
from supervisor.kernel import diag
from supervisor.kernel.fds import fdinfo
from supervisor.kernel.proc import family, fd_of
from supervisor.values import ListenAddress

TCP_DEFER_ACCEPT, TCP_FASTOPEN, TCP_SAVE_SYN, TCP_ULP = 9, 23, 27, 31
SO_GET_FILTER = 26  # SO_ATTACH_FILTER read back: the filter's length, in instructions
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_PROC = Path("/proc")


@dataclass(frozen=True)
class Holder:
    """A process holding a socket: one of its fds refers to it."""

    pid: int
    fd: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})"


def holders(
    inodes: Collection[int], *, pids: Collection[int] | None = None, proc: Path = _PROC
) -> dict[int, list[Holder]]:
    """The processes (of ``pids``, default every one) holding each of
    ``inodes`` (sockets), ours excluded.

    Walks each process's fd table: without ``pids``, only for sockets nobody
    of ours accounts for. A process that exits meanwhile, or whose table we
    may not read, is skipped: its sockets then have no holder.
    """
    wanted = {f"socket:[{inode}]": inode for inode in inodes if inode}
    found: dict[int, list[Holder]] = {inode: [] for inode in inodes}
    if not wanted:
        return found
    me = os.getpid()
    entries = proc.iterdir() if pids is None else (proc / str(pid) for pid in pids)
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        command = ""
        for link in fds:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target in wanted:
                command = command or _command(entry)
                found[wanted[target]].append(Holder(int(entry.name), int(link.name), command))
    return found


def _command(entry: Path) -> str:
    try:
        return (entry / "comm").read_text().strip()
    except OSError:
        return "?"


@dataclass(frozen=True)
class Settings:
    """What a listener is set to, where a difference matters to a migration
    between two members (``tcp_migrate_req`` in the kernel's ip-sysctl docs)."""

    reuseport: bool
    defer_accept: int  # seconds, as the kernel reads its retransmits back; 0: off
    fastopen: int  # TCP_FASTOPEN's queue length; 0: off
    save_syn: bool
    v6only: bool | None  # None: not IPv6
    device: str  # SO_BINDTODEVICE; "" for none
    filter: int  # instructions of an attached socket filter; 0: none
    ulp: str  # TCP_ULP ("tls"); "" for none

    def differences(self, other: Settings) -> list[str]:
        """``defer_accept 5 (ours 0)`` for each setting ``self`` has unlike ``other``
        (reuseport aside: a member always has it; see ``Census``)."""
        mine, theirs = asdict(self), asdict(other)
        return [
            f"{key} {mine[key]!r} (ours {theirs[key]!r})"
            for key in mine
            if key != "reuseport" and mine[key] != theirs[key]
        ]


def settings_of(sock: socket.socket) -> Settings:
    """Read ``sock``'s settings.

    Raises:
        KernelError: a getsockopt the kernel refused.
    """
    with translated(KernelError, "getsockopt"):
        tcp = sock.type == socket.SOCK_STREAM

        def tcp_int(option: int) -> int:
            return sock.getsockopt(socket.IPPROTO_TCP, option) if tcp else 0

        v6only = None
        if sock.family == socket.AF_INET6:
            v6only = bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
        return Settings(
            reuseport=bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)),
            defer_accept=tcp_int(TCP_DEFER_ACCEPT),
            fastopen=tcp_int(TCP_FASTOPEN),
            save_syn=bool(tcp_int(TCP_SAVE_SYN)),
            v6only=v6only,
            device=_text(sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 64)),
            filter=_filter_length(sock.fileno()),
            ulp=_text(sock.getsockopt(socket.IPPROTO_TCP, TCP_ULP, 16)) if tcp else "",
        )


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _filter_length(fd: int) -> int:
    # With a length of 0 the kernel only says how long the filter is (in
    # optlen); any other length is taken as room for that many instructions.
    length = ctypes.c_uint(0)
    if _libc.getsockopt(fd, socket.SOL_SOCKET, SO_GET_FILTER, None, ctypes.byref(length)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"getsockopt(SO_GET_FILTER): {os.strerror(err)}")
    return length.value


def settings_held(holder: Holder) -> Settings:
    """The settings of ``holder``'s socket, read through a duplicate of its fd.

    Raises:
        KernelError: the duplicate could not be taken (the process is gone,
            or ptrace rules forbid it) or read.
    """
    with contextlib.closing(duplicate(holder)) as sock:
        return settings_of(sock)


PROG_TYPE_SK_REUSEPORT = 21


def reuseport_programs(pids: Collection[int]) -> dict[int, list[int]]:
    """The ids of the SK_REUSEPORT programs each of ``pids`` holds an fd of
    (``/proc/PID/fdinfo``): who may have attached one to a group. Processes
    that hold none, are gone, or hide their fds are left out."""
    found: dict[int, list[int]] = {}
    for pid in pids:
        try:
            links = list((_PROC / str(pid) / "fd").iterdir())
        except OSError:
            continue
        for link in links:
            try:
                if os.readlink(link) != "anon_inode:bpf-prog":
                    continue
                fields = fdinfo(int(link.name), pid)
            except OSError:
                continue
            if fields.get("prog_type") == str(PROG_TYPE_SK_REUSEPORT):
                found.setdefault(pid, []).append(int(fields.get("prog_id", "0")))
    return found


def bound_by(root: int, address: ListenAddress) -> list[tuple[diag.BoundSocket, Holder]]:
    """The members of ``address``'s group that ``root`` or one of its
    descendants holds (one holder each: the first found), by sock_diag and
    ``/proc``: the sockets a server bound itself.

    Raises:
        DiagError: sock_diag is unavailable.
    """
    exact = [b for b in diag.bound_on(address) if b.exact]
    held = holders([b.inode for b in exact], pids=sorted(family(root)))
    return [(b, held[b.inode][0]) for b in exact if held.get(b.inode)]


def duplicate(holder: Holder) -> socket.socket:
    """Our own reference to ``holder``'s socket (pidfd_getfd): a ``shutdown()``
    through it acts on the socket every holder shares.

    Raises:
        KernelError: the process is gone, the fd is closed, or ptrace rules forbid it.
    """
    with translated(KernelError, f"pidfd_getfd of fd {holder.fd} of {holder}"):
        return socket.socket(fileno=fd_of(holder.pid, holder.fd))
