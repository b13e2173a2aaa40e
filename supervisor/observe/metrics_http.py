"""The opt-in metrics endpoint: ``GET /metrics`` over HTTP/1.1, from a trio task.

``[supervisor] metrics_listen = "127.0.0.1:9464"`` binds it (off by
default). One small h11 server: a request line is read within a deadline,
the body of the answer is the metrics text, the connection closes. The text
is OpenMetrics when the scraper's ``Accept`` asks for it (Prometheus does by
default), else Prometheus' text format 0.0.4, as prometheus_client answers. It
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
from supervisor.observe.metrics import CONTENT_TYPES, Format
from supervisor.values import ListenAddress

log = structlog.get_logger("supervisor.http")

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
    except OSError as exc:  # seam: the metrics socket, as ControlError
        sock.close()
        raise ListenerError(f"metrics_listen {address}", exc, "bind") from exc
    return sock


async def serve(
    sock: socket.socket,
    render: Callable[[Format], str],
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
    stream: trio.SocketStream, render: Callable[[Format], str], slots: trio.Semaphore
) -> None:
    async with stream:
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT):
                with trio.fail_after(READ_TIMEOUT):
                    request = await _request(stream)
                if request is None:
                    return
                target, accept = request
                if target.split("?", 1)[0] != "/metrics":
                    await _send(stream, 404, b"only /metrics here\n", "text/plain")
                    return
                form = negotiate(accept)
                await _send(stream, 200, render(form).encode(), CONTENT_TYPES[form])
        except (trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError):
            return
        except Exception:  # a bug must not stop the endpoint (nor the daemon)
            log.exception("metrics_failed")
        finally:
            slots.release()


def negotiate(accept: str) -> Format:
    """OpenMetrics if ``accept`` names it (as prometheus_client's choose_encoder
    decides), else the text format 0.0.4."""
    for part in accept.split(","):
        if part.split(";", 1)[0].strip() == "application/openmetrics-text":
            return "openmetrics"
    return "prometheus"


async def _request(stream: trio.SocketStream) -> tuple[str, str] | None:
    """The request's target and its ``Accept`` header; None if none came."""
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
            accept = b",".join(v for k, v in event.headers if k == b"accept")
            return event.target.decode(errors="replace"), accept.decode(errors="replace")
        return None


async def _send(stream: trio.SocketStream, status: int, body: bytes, kind: str) -> None:
    head = (
        f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}\r\n"
        f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    await stream.send_all(head.encode() + body)
