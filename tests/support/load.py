"""A bounded client load of short-lived HTTP connections, counting every failure.

Each connection: connect, send one request (``Connection: close``), read the
whole response to EOF, check status and length. A failure is classified by
cause: reset, refused, timeout, short (fewer bytes than Content-Length or no
complete head), status (not 200), other. Loops stop at ``max_connections``
or ``duration`` seconds, whichever comes first, or when ``stop`` is set.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Self, TypeVar

Part = TypeVar("Part")
REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"


@dataclass
class LoadResult:
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    at_connect: Counter[str] = field(default_factory=Counter)  # those refused or reset at connect
    examples: list[str] = field(default_factory=list)
    bodies: list[dict[str, str]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def merge(self, other: LoadResult) -> None:
        self.ok += other.ok
        self.failures.update(other.failures)
        self.at_connect.update(other.at_connect)
        self.examples.extend(other.examples[:5])
        self.bodies.extend(other.bodies)


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(path: str) -> None:
    """Move the calling thread into the network namespace at ``path``
    (/proc/PID/ns/net): its sockets are that namespace's from now on."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def parse_body(body: bytes) -> dict[str, str]:
    pairs = (item.partition("=") for item in body.decode().split())
    return {key: value for key, sep, value in pairs if sep}


def one_request(
    host: str, port: int, timeout: float = 10.0, tls: ssl.SSLContext | None = None
) -> dict[str, str]:
    """Do one request; return the parsed body. Raises ``LoadFailure`` by cause.

    With ``tls`` the request goes over a TLS handshake first; the body then
    also carries ``_cert`` (SHA-256 of the served certificate) and ``_at``
    (``time.monotonic()`` when the connection began).
    """
    began = time.monotonic()
    served = ""
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise LoadFailure(cause_of(exc), str(exc), at_connect=True) from exc
    try:
        with raw:
            sock = raw if tls is None else tls.wrap_socket(raw)
            if isinstance(sock, ssl.SSLSocket):
                served = hashlib.sha256(sock.getpeercert(binary_form=True) or b"").hexdigest()
            sock.sendall(REQUEST)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except ssl.SSLError as exc:
        raise LoadFailure("tls", str(exc)) from exc
    except OSError as exc:
        raise LoadFailure(cause_of(exc), repr(exc)) from exc
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise LoadFailure("short", f"incomplete head: {data[:80]!r}")
    lines = head.decode(errors="replace").split("\r\n")
    if " 200 " not in lines[0] + " ":
        raise LoadFailure("status", lines[0])
    length = next(
        (int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length")),
        None,
    )
    if length is None or len(body) != length:
        raise LoadFailure("short", f"body {len(body)} bytes, expected {length}")
    parsed = parse_body(body)
    if tls is not None:
        parsed.update(_cert=served, _at=str(began))
    return parsed


class LoadFailure(Exception):
    def __init__(self, cause: str, detail: str, *, at_connect: bool = False) -> None:
        super().__init__(f"{cause}{' at connect' if at_connect else ''}: {detail}")
        self.cause = cause
        self.at_connect = at_connect


def cause_of(exc: OSError) -> str:
    """A failed connection's cause, as the loads count it."""
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "other"


def _loop(  # noqa: PLR0917  (a thread target: positional by nature)
    host: str,
    port: int,
    stop: threading.Event,
    deadline: float,
    budget: int,
    seen: Callable[[dict[str, str]], None],
    tls: ssl.SSLContext | None = None,
) -> LoadResult:
    result = LoadResult()
    for _ in range(budget):
        if stop.is_set() or time.monotonic() > deadline:
            break
        try:
            body = one_request(host, port, tls=tls)
            result.bodies.append(body)
            result.ok += 1
            seen(body)
        except LoadFailure as exc:
            result.failures[exc.cause] += 1
            if exc.at_connect:
                result.at_connect[exc.cause] += 1
            if len(result.examples) < 5:
                result.examples.append(str(exc))
    return result


class Loops(Generic[Part]):
    """``threads`` loops in the background, each returning a part when it ends.

    A loop gets its index and the shared ``stop`` event; ``join`` stops
    them all and returns their parts (once; later calls return nothing).
    With ``netns`` each thread first enters that network namespace.
    """

    def __init__(
        self,
        threads: int,
        loop: Callable[[int, threading.Event], Part],
        netns: str | None = None,
    ) -> None:
        self.stop = threading.Event()
        self._parts: list[Part] = []

        def run(i: int) -> None:
            if netns is not None:
                enter_netns(netns)
            self._parts.append(loop(i, self.stop))

        self._threads = [
            threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> list[Part]:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)
        parts, self._parts = self._parts, []
        return parts


class Load:
    """Run ``threads`` request loops in the background: ``with Load(...) as load:``."""

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        threads: int = 4,
        duration: float = 60.0,
        max_connections: int = 200_000,
        tls: ssl.SSLContext | None = None,
        netns: str | None = None,
    ) -> None:
        self.result = LoadResult()
        deadline = time.monotonic() + duration
        budget = max_connections // threads
        self._lock = threading.Lock()
        self._live: set[tuple[str, str]] = set()
        self._loops = Loops(
            threads,
            lambda _, stop: _loop(host, port, stop, deadline, budget, self._seen, tls),
            netns,
        )
        self.stop = self._loops.stop

    def _seen(self, body: dict[str, str]) -> None:
        with self._lock:
            self._live.add((body.get("pid", ""), body.get("listener", "")))

    def answered(self) -> bool:
        """Has any request of this load been answered yet?"""
        with self._lock:
            return bool(self._live)

    def pids(self) -> list[str]:
        """The pids that have answered this load so far."""
        with self._lock:
            return sorted({p for p, _ in self._live})

    def served_by(self, pid: int) -> bool:
        """Has a process with this pid answered a request of this load yet?"""
        with self._lock:
            return any(p == str(pid) for p, _ in self._live)

    def __enter__(self) -> Load:
        self._loops.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def finish(self) -> LoadResult:
        """Stop the loops and return the merged result (idempotent)."""
        if self.stop.is_set():
            return self.result
        for part in self._loops.join():
            self.result.merge(part)
        return self.result


def _connect_loop(host: str, port: int, stop: threading.Event, deadline: float) -> LoadResult:
    """The seeds' tcp_sink_client: connect, close; a reset or refusal is a failure."""
    result = LoadResult()
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=10):
                result.ok += 1
        except ConnectionResetError:
            result.failures["reset"] += 1
        except ConnectionRefusedError:
            result.failures["refused"] += 1
        except OSError as exc:
            result.failures["other"] += 1
            if len(result.examples) < 5:
                result.examples.append(repr(exc))
    return result


class Background:
    """Loops of one kind in the background, their results merged at the end:
    ``with SomeLoad(...) as load: ...``, then ``load.result``."""

    def __init__(self, threads: int, loop: Callable[[int, threading.Event], LoadResult]) -> None:
        self.result = LoadResult()
        self._loops = Loops(threads, loop)
        self.stop = self._loops.stop

    def __enter__(self) -> Self:
        self._loops.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for part in self._loops.join():
            self.result.merge(part)


class ConnectLoad(Background):
    """Background connect-only loops: ``with ConnectLoad(port) as load: ...``."""

    def __init__(self, port: int, *, threads: int = 4, duration: float = 60.0) -> None:
        deadline = time.monotonic() + duration
        super().__init__(threads, lambda _, stop: _connect_loop("127.0.0.1", port, stop, deadline))


@dataclass
class DatagramResult:
    sent: int = 0
    answered: int = 0
    lost: list[str] = field(default_factory=list)  # "thread:seq" never answered
    duplicates: int = 0
    generations: Counter[str] = field(default_factory=Counter)


def _datagram_loop(
    port: int, name: str, stop: threading.Event, deadline: float, budget: int
) -> DatagramResult:
    """Send numbered datagrams one at a time; each must be answered exactly once."""
    result = DatagramResult()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for seq in range(budget):
            if stop.is_set() or time.monotonic() > deadline:
                break
            tag = f"{name}:{seq}"
            sock.sendto(f"{tag}\n".encode(), ("127.0.0.1", port))
            result.sent += 1
            try:
                answer = sock.recv(65536).decode()
            except TimeoutError:
                result.lost.append(tag)
                continue
            words = answer.split()
            if words[0] != tag:  # a late or repeated answer to an earlier datagram
                result.duplicates += 1
                continue
            result.answered += 1
            result.generations[parse_body(answer.encode()).get("generation", "?")] += 1
        sock.setblocking(False)
        while True:  # anything still arriving is an answer given twice
            try:
                sock.recv(65536)
            except BlockingIOError:
                break
            result.duplicates += 1
    return result


class DatagramLoad:
    """Background senders of numbered datagrams: ``with DatagramLoad(port) as load:``."""

    def __init__(
        self, port: int, *, threads: int = 4, duration: float = 60.0, max_datagrams: int = 400_000
    ) -> None:
        deadline = time.monotonic() + duration
        budget = max_datagrams // threads
        self.result = DatagramResult()
        self._loops = Loops(
            threads, lambda i, stop: _datagram_loop(port, f"t{i}", stop, deadline, budget)
        )
        self.stop = self._loops.stop

    def __enter__(self) -> DatagramLoad:
        self._loops.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for part in self._loops.join():
            self.result.sent += part.sent
            self.result.answered += part.answered
            self.result.lost += part.lost
            self.result.duplicates += part.duplicates
            self.result.generations.update(part.generations)
