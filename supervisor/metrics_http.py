"""The opt-in metrics endpoint: ``GET /metrics`` over HTTP/1.1, from a trio task.

``[supervisor] metrics_listen = "127.0.0.1:9464"`` binds it (off by
default). One small h11 server: a request line is read within a deadline,
the body of the answer is the OpenMetrics text, the connection closes. It
runs in the daemon's event loop, not in a thread, and an in-place upgrade
carries its listening socket across the exec like the others.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import h11
import structlog
import trio

from supervisor.errors import ListenerError
from supervisor.values import ListenAddress

log = structlog.get_logger("supervisor.http")

CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
READ_TIMEOUT = 5.0
EXCHANGE_TIMEOUT = 10.0  # the whole of one connection: request and answer
MAX_REQUEST = 16 * 1024
# Connections served at once; the next ones wait in the listen backlog (then
# the kernel drops their SYNs). Unbounded, 300 idle connections from anyone
# on the host took the daemon to its fd limit: no control client could
# connect and no worker could be respawned meanwhile.
MAX_CLIENTS = 16


def bind(address: ListenAddress) -> socket.socket:
    """A listening TCP socket for the endpoint.

    Raises:
        ListenerError: it could not be bound (the daemon does not start then).
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address.sockaddr)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"metrics_listen {address}", exc, "bind") from exc
    return sock


async def serve(
    sock: socket.socket,
    render: Callable[[], str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``GET /metrics`` on ``sock`` (the caller owns it) until cancelled."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup()))
    slots = trio.Semaphore(MAX_CLIENTS)
    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        while True:
            await slots.acquire()  # at the cap, new clients wait in the backlog
            try:
                stream = await listener.accept()
            except OSError as exc:  # out of fds: the client waits in the backlog
                slots.release()
                log.warning("metrics_accept_failed", error=str(exc))
                await trio.sleep(0.1)
                continue
            nursery.start_soon(_answer, stream, render, slots)


async def _answer(
    stream: trio.SocketStream, render: Callable[[], str], slots: trio.Semaphore
) -> None:
    async with stream:
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT):
                with trio.fail_after(READ_TIMEOUT):
                    target = await _request_target(stream)
                if target is None:
                    return
                if target.split("?", 1)[0] != "/metrics":
                    await _send(stream, 404, b"only /metrics here\n", "text/plain")
                    return
                await _send(stream, 200, render().encode(), CONTENT_TYPE)
        except (trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError):
            return
        except Exception:  # a bug must not stop the endpoint (nor the daemon)
            log.exception("metrics_failed")
        finally:
            slots.release()


async def _request_target(stream: trio.SocketStream) -> str | None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            connection.receive_data(data)
            if not data:
                return None
            continue
        if isinstance(event, h11.Request):
            return str(event.target.decode(errors="replace"))
        return None


async def _send(stream: trio.SocketStream, status: int, body: bytes, kind: str) -> None:
    head = (
        f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}\r\n"
        f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    await stream.send_all(head.encode() + body)
