"""The demo worker: a small HTTP/1.1 server (trio + h11) on inherited listeners.

It takes its listeners by the systemd protocol (``LISTEN_FDS`` from fd 3,
checked against ``LISTEN_PID``), answers ``GET /`` with a line naming the
service, generation, worker, pid and the listener's SO_COOKIE, and
``GET /healthz`` with ``ok``. On SIGTERM it stops accepting, finishes the
requests in flight, closes idle keep-alive connections and exits 0. An
``EINVAL`` from ``accept()`` means the supervisor retired the listener
(``shutdown()``): that listener is done, the others keep serving.
UDP listeners answer each datagram with the same identity line.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import ssl
from dataclasses import dataclass

import h11
import structlog
import trio

from supervisor.kernel import notify
from supervisor.kernel.sockets import socket_cookie

log = structlog.get_logger("supervisor.demo")

FIRST_FD = 3
MAX_REQUEST = 64 * 1024
IDLE_TIMEOUT = 30.0  # a keep-alive connection with no request
REQUEST_TIMEOUT = 30.0  # from a request's first byte to its end
DRAIN_TIMEOUT = 25.0
FIRST_REQUEST_GRACE = 5.0  # after SIGTERM, for a connection whose first request is on its way


@dataclass(frozen=True)
class Identity:
    service: str
    generation: str
    worker: str
    pid: int

    def line(self, cookie: int) -> str:
        return (
            f"service={self.service} generation={self.generation} worker={self.worker} "
            f"pid={self.pid} listener={cookie}\n"
        )


class ListenFdsError(RuntimeError):
    pass


def inherited_sockets() -> list[socket.socket]:
    """The listeners passed by the systemd protocol, or an error saying what is wrong."""
    pid_text = os.environ.get("LISTEN_PID", "")
    count_text = os.environ.get("LISTEN_FDS", "")
    if not count_text.isdigit() or int(count_text) < 1:
        raise ListenFdsError("LISTEN_FDS is not set: run me under supervisord")
    if pid_text != str(os.getpid()):
        raise ListenFdsError(f"LISTEN_PID={pid_text!r} is not my pid {os.getpid()}")
    socks = []
    for fd in range(FIRST_FD, FIRST_FD + int(count_text)):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


class Server:
    def __init__(
        self,
        identity: Identity,
        concurrency: int = 0,
        work: float = 0.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.identity = identity
        self._tls = tls
        self.draining = False
        self._idle: set[trio.CancelScope] = set()  # keep-alive, between requests
        self._fresh: set[trio.CancelScope] = set()  # accepted, first request not read yet
        # Like a sync worker: with a limit, the next accept() waits for a free
        # slot, so connections queue in the kernel under load. The limit is per
        # listener: an acceptor waits in accept() holding a slot, and with one
        # limiter for all, an idle listener's acceptor starved a busy one.
        self._concurrency = concurrency
        self._work = work

    def drain(self) -> None:
        """Stop taking new requests: close idle connections now, busy ones after.

        A connection accepted before the stop still gets its first request
        answered (its client sent it, or is in the TLS handshake), within a grace.
        """
        self.draining = True
        for scope in list(self._idle):
            scope.cancel()
        grace = trio.current_time() + FIRST_REQUEST_GRACE
        for scope in list(self._fresh):
            scope.deadline = min(scope.deadline, grace)

    async def accept_loop(self, sock: socket.socket, handlers: trio.Nursery) -> None:
        cookie = socket_cookie(sock)
        listener = trio.socket.from_stdlib_socket(sock)
        slots = trio.CapacityLimiter(self._concurrency) if self._concurrency > 0 else None
        while True:
            token = object()  # the limiter's borrower: one per connection
            if slots is not None:
                await slots.acquire_on_behalf_of(token)
            try:
                conn, _ = await listener.accept()
            except OSError as exc:
                if slots is not None:
                    slots.release_on_behalf_of(token)
                if exc.errno == errno.EINVAL:
                    log.info("listener_retired", listener=cookie)
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept_failed", error=str(exc))
                    await trio.sleep(0.05)
                    continue
                raise
            handlers.start_soon(self._serve_slot, trio.SocketStream(conn), cookie, slots, token)

    async def _serve_slot(
        self,
        stream: trio.SocketStream,
        cookie: int,
        slots: trio.CapacityLimiter | None,
        owner: object,
    ) -> None:
        try:
            if self._tls is None:
                await self.serve_connection(stream, cookie)
            else:
                # The handshake happens on the first read, under the idle deadline.
                await self.serve_connection(
                    trio.SSLStream(stream, self._tls, server_side=True), cookie
                )
        finally:
            if slots is not None:
                slots.release_on_behalf_of(owner)

    async def serve_connection(self, stream: trio.abc.Stream, cookie: int) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            async with stream:
                first = True
                while first or not self.draining or conn.their_state is not h11.IDLE:
                    request = await self._next_request(stream, conn, first)
                    first = False
                    if request is None:
                        return
                    await self._respond(stream, conn, request, cookie)
                    if conn.our_state is h11.MUST_CLOSE or self.draining:
                        return
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return

    async def _next_request(
        self, stream: trio.abc.Stream, conn: h11.Connection, first: bool
    ) -> h11.Request | None:
        """Read one whole request. While no byte of it has arrived the connection
        is idle: ``drain`` may close it (the first request of a connection gets
        a grace instead), and it times out after IDLE_TIMEOUT."""
        request: h11.Request | None = None
        idle = conn.their_state is h11.IDLE and not conn.trailing_data[0]
        waiting = self._fresh if first else self._idle
        with trio.CancelScope() as scope:
            scope.deadline = trio.current_time() + (IDLE_TIMEOUT if idle else REQUEST_TIMEOUT)
            if first and self.draining:
                scope.deadline = min(scope.deadline, trio.current_time() + FIRST_REQUEST_GRACE)
            if idle:
                waiting.add(scope)
            try:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = bytes(await stream.receive_some(65536))
                        if data and idle:
                            idle = False
                            waiting.discard(scope)
                            scope.deadline = trio.current_time() + REQUEST_TIMEOUT
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.EndOfMessage):
                        return request
                    elif isinstance(event, h11.ConnectionClosed):
                        return None
            finally:
                waiting.discard(scope)
        return None

    async def _respond(
        self, stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request, cookie: int
    ) -> None:
        target = request.target.decode(errors="replace").split("?", 1)[0]
        if request.method not in (b"GET", b"HEAD"):
            status, body = 405, "method not allowed\n"
        elif target == "/":
            status, body = 200, self.identity.line(cookie)
        elif target == "/healthz":
            status, body = 200, "ok\n"
        else:
            status, body = 404, "not found\n"
        if self._work:
            await trio.sleep(self._work)
        payload = body.encode()
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(payload))),
        ]
        if self.draining:
            headers.append(("Connection", "close"))
        data = conn.send(h11.Response(status_code=status, headers=headers))
        if request.method != b"HEAD":
            data = (data or b"") + (conn.send(h11.Data(data=payload)) or b"")
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send_all(data)

    async def datagram_loop(self, sock: socket.socket) -> None:
        cookie = socket_cookie(sock)
        udp = trio.socket.from_stdlib_socket(sock)
        answer = self.identity.line(cookie).encode()
        while not self.draining:
            data, peer = await udp.recvfrom(65536)
            # A datagram read is answered even if SIGTERM arrives meanwhile:
            # the supervisor waited for this socket's queue to empty before it.
            with trio.CancelScope(shield=True):
                await udp.sendto(data.split(b"\n", 1)[0] + b" " + answer, peer)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for ``cert`` (leaf first, then its chain) and ``key``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def bound_sockets(addresses: list[str]) -> list[socket.socket]:
    """Listeners this process binds itself, with SO_REUSEPORT, on ``host:port``
    addresses: a server that binds its own sockets, as most do."""
    socks = []
    for text in addresses:
        host, _, port = text.rpartition(":")
        host = host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, int(port)))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise ListenFdsError(f"cannot listen on {text}: {exc}") from exc
        socks.append(sock)
    return socks


async def serve(
    delay: float = 0.0,
    concurrency: int = 0,
    work: float = 0.0,
    tls: ssl.SSLContext | None = None,
    bind: list[str] | None = None,
) -> None:
    """Serve the inherited listeners (or, with ``bind``, its own) until
    SIGTERM/SIGINT; then drain and return."""
    socks = bound_sockets(bind) if bind else inherited_sockets()
    identity = Identity(
        service=os.environ.get("SUPERVISOR_SERVICE", "demo"),
        generation=os.environ.get("SUPERVISOR_GENERATION", "0"),
        worker=os.environ.get("SUPERVISOR_WORKER", "0"),
        pid=os.getpid(),
    )
    structlog.contextvars.bind_contextvars(
        service=identity.service, generation=identity.generation, worker=identity.worker
    )
    server = Server(identity, concurrency, work, tls)
    # `systemctl kill -s USR1` (logrotate's) reaches every process of the unit:
    # the demo logs to stdout and has nothing to reopen, and must not die of it.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        if delay:
            await trio.sleep(delay)
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as acceptors:
                for sock in socks:
                    if sock.type == socket.SOCK_STREAM:
                        acceptors.start_soon(server.accept_loop, sock, handlers)
                    else:
                        acceptors.start_soon(server.datagram_loop, sock)
                notify.send("READY=1")
                log.info("demo_ready", listeners=len(socks))
                async for signum in signals:
                    log.info("demo_stopping", signal=signal.Signals(signum).name)
                    break
                acceptors.cancel_scope.cancel()
            server.drain()
            handlers.cancel_scope.deadline = trio.current_time() + DRAIN_TIMEOUT
    log.info("demo_stopped")
