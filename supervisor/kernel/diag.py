"""sock_diag (inet_diag over netlink): the handshakes a port still has pending.

A drain must know when every SYN steered to a retiring listener has become
a connection in its accept queue or has died. Request sockets
(``TCP_NEW_SYN_RECV``) are dumped by ``inet_req_diag_fill`` with state
SYN_RECV and their own cookie, but not with their listener: the kernel only
tells us the local address and port (KERNEL.md section 6). So a drain takes
the set of pending handshakes on its address once steering has moved away,
and waits until each of them is gone: no new request can be created for a
listener that no longer receives SYNs.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

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
    ip = ipaddress.ip_address(address.host)
    width = 4 if ip.version == 4 else 16
    protocol = socket.IPPROTO_TCP if address.proto == "tcp" else socket.IPPROTO_UDP
    owners = set()
    for msg in _dump(address.family, ALL_STATES, protocol):
        (sport,) = struct.unpack_from(">H", msg, _MSG_SPORT)
        source = msg[_MSG_SRC : _MSG_SRC + width]
        if sport != address.port or msg[1] not in _BOUND_STATES[address.proto]:
            continue
        if ip.is_unspecified or source in (ip.packed, bytes(width)):
            (uid,) = struct.unpack_from("<I", msg, _MSG_UID)
            owners.add(uid)
    return frozenset(owners)
