"""Who may use the control socket: checked on every connection with SO_PEERCRED.

The kernel says who the peer is (pid, uid, gid and, with SO_PEERGROUPS,
its supplementary groups); the client's own claims are never read. Allowed:
root, the daemon's own uid, the configured users, and members (primary or
supplementary) of the configured groups and of the socket's group.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from supervisor.config.schema import SupervisorSection

SO_PEERGROUPS = 59  # Linux 4.13+; not in Python's socket module
_UCRED = struct.Struct("iII")  # pid, uid, gid
_GID = struct.Struct("I")
_MAX_GROUPS = 65536


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


def peer_of(sock: socket.socket) -> Peer:
    """The connecting process, from the kernel, not from the client."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GID.size * _MAX_GROUPS)
    except OSError:  # seam: SO_PEERGROUPS, absent on old kernels
        data = b""  # an older kernel: primary group only
    groups = frozenset(g for (g,) in _GID.iter_unpack(data[: len(data) // 4 * 4]))
    return Peer(pid, uid, gid, groups)


@dataclass(frozen=True)
class Access:
    """The uids and gids allowed besides root and the daemon's own uid."""

    uids: frozenset[int]
    gids: frozenset[int]

    def allows(self, peer: Peer) -> bool:
        if peer.uid in (0, os.geteuid()) or peer.uid in self.uids:
            return True
        return bool(({peer.gid} | peer.groups) & self.gids)

    @classmethod
    def from_config(cls, section: SupervisorSection) -> Access:
        """Resolve the configured names (``check`` has confirmed they exist)."""
        groups = list(section.control_allow_groups)
        if section.control_socket_group is not None:
            groups.append(section.control_socket_group)
        return cls(
            frozenset(pwd.getpwnam(name).pw_uid for name in section.control_allow_users),
            frozenset(grp.getgrnam(name).gr_gid for name in groups),
        )

    def describe(self) -> dict[str, list[int]]:
        return {"uids": sorted(self.uids), "gids": sorted(self.gids)}
