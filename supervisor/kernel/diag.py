"""sock_diag (inet_diag over netlink): the handshakes a port still has pending.

A drain must know when every SYN steered to a retiring listener has become
a connection in its accept queue or has died. Request sockets
(``TCP_NEW_SYN_RECV``) are dumped by ``inet_req_diag_fill`` with state
SYN_RECV and their own cookie, but not with their listener: the kernel only
tells us the local address and port (docs/kernel.md §4). So a drain takes
the set of pending handshakes on its address once steering has moved away,
and waits until each of them is gone: no new request can be created for a
listener that no longer receives SYNs.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

from supervisor.errors import DiagError, translated
from supervisor.values import ListenAddress

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_SYN_RECV = 3
_NLMSG = struct.Struct("<IHHII")  # len, type, flags, seq, pid
_REQ = struct.Struct("<BBBxI48x")  # family, protocol, ext, pad, states, sockid (zero)
_MSG_SPORT, _MSG_SRC, _MSG_COOKIE, _MSG_UID = 4, 8, 44, 64  # offsets in struct inet_diag_msg
ALL_STATES = 0xFFFFFFFF
_TCP_LISTEN, _UDP_CLOSE, _UDP_CONNECTED = 10, 7, 1  # what a bound socket's state reads
_BOUND_STATES = {"tcp": {_TCP_LISTEN}, "udp": {_UDP_CLOSE, _UDP_CONNECTED}}
_TIMEOUT = 2.0


def _dump(
    family: socket.AddressFamily, states: int, protocol: int = socket.IPPROTO_TCP
) -> list[bytes]:
    """Every ``inet_diag_msg`` of ``protocol`` sockets in ``states`` (a bit mask) of ``family``.

    Raises:
        DiagError: the netlink socket could not be used or the kernel refused the dump.
    """
    with translated(DiagError, "sock_diag dump"):
        return _dump_raw(family, states, protocol)


def _dump_raw(family: socket.AddressFamily, states: int, protocol: int) -> list[bytes]:
    request = _REQ.pack(family, protocol, 0, states)
    header = _NLMSG.pack(
        _NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
    )
    messages: list[bytes] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(_TIMEOUT)
        nl.send(header + request)
        while True:
            buffer = nl.recv(1 << 16)
            offset = 0
            while offset + _NLMSG.size <= len(buffer):
                length, kind = _NLMSG.unpack_from(buffer, offset)[:2]
                if kind == NLMSG_DONE:
                    return messages
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("<i", buffer, offset + _NLMSG.size)
                    name = errno.errorcode.get(-err, str(-err))
                    raise OSError(-err, f"sock_diag dump failed: {name}")
                messages.append(buffer[offset + _NLMSG.size : offset + length])
                offset += (length + 3) & ~3


def pending_handshakes(address: ListenAddress) -> frozenset[int]:
    """Cookies of the request sockets (half-open handshakes) on ``address``.

    A wildcard address matches any local address on its port.

    Raises:
        DiagError: sock_diag is unavailable.
    """
    ip = ipaddress.ip_address(address.host)
    width = 4 if ip.version == 4 else 16
    cookies = set()
    for msg in _dump(address.family, 1 << TCP_SYN_RECV):
        (sport,) = struct.unpack_from(">H", msg, _MSG_SPORT)
        if sport != address.port:
            continue
        if not ip.is_unspecified and msg[_MSG_SRC : _MSG_SRC + width] != ip.packed:
            continue
        (cookie,) = struct.unpack_from("<Q", msg, _MSG_COOKIE)
        cookies.add(cookie)
    return frozenset(cookies)


def port_owners(address: ListenAddress) -> frozenset[int]:
    """The uids owning sockets bound to ``address``'s port that overlap it.

    For the message of a bind that failed with EADDRINUSE: a wildcard on
    either side overlaps every local address.

    Raises:
        DiagError: sock_diag is unavailable.
    """
    return frozenset(bound.uid for bound in bound_on(address))


_ID = struct.Struct(">HH16s16sI8s")  # sport, dport, src, dst (network order), ifindex, cookie
_NO_COOKIE = b"\xff" * 8
_MSG_INODE = 68
_QUEUED_STATES = {1, 3, 8}  # ESTABLISHED, SYN_RECV (fast open), CLOSE_WAIT


def accepted(local: tuple[str, int], remote: tuple[str, int]) -> bool:
    """Has the connection from ``remote`` to ``local`` left its listener's accept
    queue, that is, been accepted (and maybe closed)? A connection still queued
    has no socket file: sock_diag reports inode 0 for it, in a state of one
    that nobody has closed yet.

    Raises:
        DiagError: sock_diag is unavailable.
    """
    with translated(DiagError, "sock_diag lookup"):
        message = _lookup(local, remote)
    if message is None:  # gone: accepted and closed already (a reset is the caller's to see)
        return True
    (inode,) = struct.unpack_from("<I", message, _MSG_INODE)
    # A queued child is ESTABLISHED (or CLOSE_WAIT: the client left) with no file;
    # one the worker accepted has a file, or closed it already (FIN_WAIT and on).
    return inode != 0 or message[1] not in _QUEUED_STATES


def _lookup(local: tuple[str, int], remote: tuple[str, int]) -> bytes | None:
    ip = ipaddress.ip_address(local[0])
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sockid = _ID.pack(
        local[1],
        remote[1],
        ip.packed.ljust(16, b"\0"),
        ipaddress.ip_address(remote[0]).packed.ljust(16, b"\0"),
        0,
        _NO_COOKIE,
    )
    request = struct.pack("<BBBxI", family, socket.IPPROTO_TCP, 0, ALL_STATES) + sockid
    header = _NLMSG.pack(_NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(_TIMEOUT)
        nl.send(header + request)
        buffer = nl.recv(1 << 16)
    length, kind = _NLMSG.unpack_from(buffer, 0)[:2]
    if kind == NLMSG_ERROR:
        (err,) = struct.unpack_from("<i", buffer, _NLMSG.size)
        if -err == errno.ENOENT:
            return None
        if err:
            raise OSError(-err, f"sock_diag lookup failed: {errno.errorcode.get(-err, -err)}")
        return None
    return buffer[_NLMSG.size : length]


_MSG_IFINDEX = 40


@dataclass(frozen=True)
class BoundSocket:
    """A socket bound to a port, as sock_diag reports it."""

    inode: int  # 0: no file (a listener being torn down)
    cookie: int  # SO_COOKIE
    uid: int  # of the socket's creator: the kernel puts same-uid members only in one group
    host: str  # its local address
    ifindex: int  # SO_BINDTODEVICE's device, 0 for none
    exact: bool  # on ``address`` itself (a member of its reuseport group if it has
    # SO_REUSEPORT); otherwise it overlaps it (a wildcard, or a specific address
    # under a wildcard): another group on the same port


def bound_on(address: ListenAddress) -> list[BoundSocket]:
    """The listening (TCP) or bound (UDP) sockets of ``address``'s family on
    its port whose local address equals or overlaps it.

    Raises:
        DiagError: sock_diag is unavailable.
    """
    ip = ipaddress.ip_address(address.host)
    width = 4 if ip.version == 4 else 16
    protocol = socket.IPPROTO_TCP if address.proto == "tcp" else socket.IPPROTO_UDP
    states = _BOUND_STATES[address.proto]
    found = []
    for msg in _dump(address.family, sum(1 << state for state in states), protocol):
        (sport,) = struct.unpack_from(">H", msg, _MSG_SPORT)
        if sport != address.port or msg[1] not in states:
            continue
        source = msg[_MSG_SRC : _MSG_SRC + width]
        exact = source == ip.packed
        if not (exact or ip.is_unspecified or source == bytes(width)):
            continue
        (cookie,) = struct.unpack_from("<Q", msg, _MSG_COOKIE)
        (uid, inode) = struct.unpack_from("<II", msg, _MSG_UID)
        (ifindex,) = struct.unpack_from("<I", msg, _MSG_IFINDEX)
        host = str(ipaddress.ip_address(source))
        found.append(BoundSocket(inode, cookie, uid, host, ifindex, exact))
    return found
