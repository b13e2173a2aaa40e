"""The sd_notify datagram protocol, both sides.

``send`` is the client (the demo worker; the daemon towards systemd).
``NotifyReceiver`` is the per-worker ``NOTIFY_SOCKET`` the supervisor gives
each worker: an abstract unix datagram socket (no file to clean up, private
to the network namespace) that reports the sender's pid (SO_PASSCRED), so a
message counts only if it comes from the worker process we spawned.
"""

from __future__ import annotations

import array
import os
import secrets
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from supervisor.text import has_controls

_MAX_DATAGRAM = 4096
_UCRED = struct.Struct("iII")  # pid, uid, gid


def message(**fields: object) -> str:
    """The datagram for ``fields``: one ``KEY=value`` line each.

    systemd reads a datagram line by line, so a value holding a newline would
    add a command of its own choosing. Every value is checked here, the one
    place notify messages are made.

    Raises:
        ValueError: a key or value holds a control character, or a key is not
            an upper-case name.
    """
    lines = []
    for key, value in fields.items():
        text = str(value)
        if not key.replace("_", "").isalnum() or not key.isupper():
            raise ValueError(f"not a notify key: {key!r}")
        if has_controls(text):  # systemd splits a datagram into lines
            raise ValueError(f"{key}= value holds a control character: {text[:80]!r}")
        lines.append(f"{key}={text}")
    return "\n".join(lines)


def send(message: str, address: str | None = None, fds: Sequence[int] = ()) -> bool:
    """Send one notify datagram to ``address`` (default ``$NOTIFY_SOCKET``),
    with ``fds`` attached (SCM_RIGHTS: ``FDSTORE=1``).

    Returns False if there is no notify socket. Raises OSError if sending fails.
    """
    target = address if address is not None else os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    if target.startswith("@"):
        target = "\0" + target[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        if fds:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sock.sendmsg([message.encode()], rights, 0, target)
        else:
            sock.sendto(message.encode(), target)
    return True


def parse(datagram: bytes) -> dict[str, str]:
    """``b"READY=1\\nSTATUS=ok"`` -> ``{"READY": "1", "STATUS": "ok"}``."""
    fields = {}
    for line in datagram.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


@dataclass(frozen=True)
class NotifyMessage:
    pid: int
    fields: dict[str, str]


class NotifyReceiver:
    """An abstract-namespace datagram socket a worker can notify; closed by ``close()``."""

    def __init__(self, label: str, adopt: socket.socket | None = None) -> None:
        """Bind a new socket; or, with ``adopt``, take over one an earlier image bound."""
        if adopt is not None:
            raw = adopt
            self.address = "@" + raw.getsockname()[1:].decode(errors="replace")
        else:
            token = secrets.token_hex(6)
            self.address = f"@supervisor/{os.getpid()}/{label}/{token}"
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                raw.bind("\0" + self.address[1:])
            except BaseException:
                raw.close()
                raise
        self._sock = trio.socket.from_stdlib_socket(raw)

    def fileno(self) -> int:
        return self._sock.fileno()

    async def receive(self) -> NotifyMessage:
        """Wait for the next datagram; the pid is the sender's, from the kernel."""
        data, ancdata, _flags, _addr = await self._sock.recvmsg(
            _MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size)
        )
        pid = 0
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack_from(payload)[0]
        return NotifyMessage(pid=pid, fields=parse(data))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NotifyReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
