"""Listening sockets: creation with SO_REUSEPORT, options, and observation.

The supervisor creates every listener itself and keeps its own fd open for
the generation's life; workers get a duplicate. The socket stays blocking:
O_NONBLOCK lives on the open file description, which the worker shares, and
the worker decides how it wants to accept.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from supervisor.errors import DiagError, KernelError, ListenerError, translated
from supervisor.kernel import diag
from supervisor.values import ListenAddress

SO_COOKIE = 57  # include/uapi/asm-generic/socket.h
SO_MEMINFO = 55
_MEMINFO = struct.Struct("<9I")  # SK_MEMINFO_RMEM_ALLOC first, SK_MEMINFO_DROPS last
_TCP_INFO_LEN = 104  # enough for tcpi_unacked (24) and tcpi_sacked (28)
_TCP_LISTEN = 10


@dataclass(frozen=True)
class ListenerOptions:
    """Kernel options for one listener, set before bind/listen."""

    backlog: int = 1024
    defer_accept: float | None = None
    fastopen: int | None = None
    rcvbuf: int | None = None
    sndbuf: int | None = None


def open_listener(address: ListenAddress, options: ListenerOptions) -> socket.socket:
    """Create, configure, bind and (for TCP) listen on ``address`` with SO_REUSEPORT.

    The caller owns the returned socket and must close it.

    Raises:
        ListenerError: naming the address, the failing step and the errno.
    """
    kind = socket.SOCK_STREAM if address.proto == "tcp" else socket.SOCK_DGRAM
    try:
        sock = socket.socket(address.family, kind)
    except OSError as exc:
        raise ListenerError(str(address), exc, "create a socket for") from exc
    try:
        _configure(sock, address, options)
        _bind(sock, address)
        if address.proto == "tcp":
            try:
                sock.listen(options.backlog)
            except OSError as exc:
                raise ListenerError(str(address), exc, "listen on") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def _configure(sock: socket.socket, address: ListenAddress, options: ListenerOptions) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.proto == "tcp":
            # Connections our workers closed first sit in TIME_WAIT for 60 s
            # and inherit this: without it they keep any server that binds
            # without SO_REUSEPORT (the next owner of the port) from binding.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            # [::]:80 must not swallow 0.0.0.0:80: each is its own group.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if options.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, options.rcvbuf)
        if options.sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, options.sndbuf)
        if address.proto == "tcp" and options.defer_accept is not None:
            seconds = max(1, round(options.defer_accept))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, seconds)
        if address.proto == "tcp" and options.fastopen is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, options.fastopen)
    except OSError as exc:
        raise ListenerError(str(address), exc, "set socket options on") from exc


def reconfigure(sock: socket.socket, address: ListenAddress, options: ListenerOptions) -> None:
    """Set ``options`` again on a listener that is already bound (and listening):
    one inherited from an earlier daemon. ``listen()`` on a listening socket
    only changes its backlog: it keeps its queue and its place in its group.

    Raises:
        ListenerError: the kernel refused an option.
    """
    try:
        if options.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, options.rcvbuf)
        if options.sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, options.sndbuf)
        if address.proto == "tcp":
            defer = 0 if options.defer_accept is None else max(1, round(options.defer_accept))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer)
            if options.fastopen is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, options.fastopen)
            # Only a listening one: listen() would bring a shut down listener back.
            if accept_queue(sock).listening:
                sock.listen(options.backlog)
    except (OSError, KernelError) as exc:
        err = exc if isinstance(exc, OSError) else OSError(exc.errno, str(exc))
        raise ListenerError(str(address), err, "set the options of inherited") from exc


def _bind(sock: socket.socket, address: ListenAddress) -> None:
    try:
        sock.bind(address.sockaddr)
    except OSError as exc:
        detail = _in_use_by(address) if exc.errno == errno.EADDRINUSE else None
        raise ListenerError(str(address), exc, "bind", detail) from exc


def _in_use_by(address: ListenAddress) -> str | None:
    """Who holds ``address`` (from sock_diag), in words; None if unknown."""
    try:
        owners = diag.port_owners(address)
    except DiagError:
        return None
    me = os.geteuid()
    others = sorted(owners - {me})
    if others:
        names = ", ".join(f"uid {uid} ({_user(uid)})" for uid in others)
        return (
            f"held by a socket of {names}; a SO_REUSEPORT group has one owner, and the "
            f"supervisor runs as uid {me} ({_user(me)}): stop that program or run as its user"
        )
    if owners:
        return (
            f"held by a socket of this user (uid {me}) without SO_REUSEPORT: another "
            "program (or another supervisord) already serves this address"
        )
    return None


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "no such user"


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's unique id of the socket (SO_COOKIE): stable across dup and fork.

    Raises:
        KernelError: the socket cannot be read (closed, out of memory).
    """
    with translated(KernelError, "read SO_COOKIE"):
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
    return int.from_bytes(raw, "little")


@dataclass(frozen=True)
class QueueDepth:
    """A TCP listener's accept queue: connections waiting for accept(), and its limit."""

    listening: bool
    queued: int
    limit: int


def accept_queue(sock: socket.socket) -> QueueDepth:
    """Read the accept queue of a TCP listener from TCP_INFO.

    On a LISTEN socket the kernel reports ``sk_ack_backlog`` in
    ``tcpi_unacked`` and ``sk_max_ack_backlog`` in ``tcpi_sacked``.

    Raises:
        KernelError: TCP_INFO cannot be read.
    """
    with translated(KernelError, "read TCP_INFO of a listener"):
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    state = info[0]
    queued, limit = struct.unpack_from("<II", info, 24)
    if state != _TCP_LISTEN:
        return QueueDepth(listening=False, queued=0, limit=0)
    return QueueDepth(listening=True, queued=queued, limit=limit)


@dataclass(frozen=True)
class ReceiveQueue:
    """A datagram socket's receive queue: bytes waiting (with overhead), drops so far."""

    bytes: int
    drops: int


def receive_queue(sock: socket.socket) -> ReceiveQueue:
    """Read ``sk_rmem_alloc`` and ``sk_drops`` (SO_MEMINFO): 0 bytes once every
    datagram that arrived has been read (SIOCINQ gives only the next one's size).

    Raises:
        KernelError: SO_MEMINFO cannot be read.
    """
    with translated(KernelError, "read SO_MEMINFO of a datagram socket"):
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
    info = _MEMINFO.unpack(raw)
    return ReceiveQueue(bytes=info[0], drops=info[8])
