"""A minimal PostgreSQL wire-protocol client, for a load through PgBouncer.

One connection: StartupMessage (protocol 3.0, trust authentication), wait
for ReadyForQuery, a simple ``SELECT 1``, its DataRow and ReadyForQuery,
Terminate. Any error, reset or short read is a failure with its cause.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from tests.support.load import Background, LoadFailure, LoadResult, cause_of


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise LoadFailure("short", f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def _message(sock: socket.socket) -> tuple[bytes, bytes]:
    kind = _read(sock, 1)
    (length,) = struct.unpack(">I", _read(sock, 4))
    return kind, _read(sock, length - 4)


def _until_ready(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    seen = []
    while True:
        kind, body = _message(sock)
        if kind == b"E":
            raise LoadFailure("status", f"server error: {body[:200]!r}")
        if kind == b"R" and struct.unpack(">I", body[:4])[0] != 0:
            raise LoadFailure("status", f"authentication asked for: {body[:4]!r}")
        seen.append((kind, body))
        if kind == b"Z":
            return seen


def select_one(host: str, port: int, user: str, database: str) -> None:
    """One connection, one ``SELECT 1``. Raises LoadFailure with the cause."""
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        raise LoadFailure(cause_of(exc), repr(exc), at_connect=True) from exc
    with sock:
        try:
            params = f"user\0{user}\0database\0{database}\0\0".encode()
            sock.sendall(struct.pack(">II", 8 + len(params), 196608) + params)
            _until_ready(sock)
            query = b"SELECT 1\0"
            sock.sendall(b"Q" + struct.pack(">I", 4 + len(query)) + query)
            rows = [body for kind, body in _until_ready(sock) if kind == b"D"]
            if len(rows) != 1 or not rows[0].endswith(b"1"):
                raise LoadFailure("short", f"SELECT 1 gave {rows!r}")
            sock.sendall(b"X" + struct.pack(">I", 4))
        except OSError as exc:
            raise LoadFailure(cause_of(exc), repr(exc)) from exc


class QueryLoad(Background):
    """``threads`` loops of ``select_one`` in the background, bounded in count and time."""

    def __init__(
        self, port: int, user: str, database: str, *, threads: int = 4, duration: float = 60.0
    ) -> None:
        deadline = time.monotonic() + duration
        self.answered = threading.Event()  # set at the first SELECT 1 answered

        def loop(_: int, stop: threading.Event) -> LoadResult:
            part = LoadResult()
            for _ in range(100_000):
                if stop.is_set() or time.monotonic() > deadline:
                    break
                try:
                    select_one("127.0.0.1", port, user, database)
                    part.ok += 1
                    self.answered.set()
                except LoadFailure as exc:
                    part.failures[exc.cause] += 1
                    if len(part.examples) < 5:
                        part.examples.append(str(exc))
            return part

        super().__init__(threads, loop)
