"""A tiny app for the gunicorn (WSGI) and uvicorn (ASGI) example configs.

Answers every request with 200 and a line naming the generation, worker and
pid, like the demo worker, so a load can tell who served it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any


def _body() -> bytes:
    return (
        f"service={os.environ.get('SUPERVISOR_SERVICE', '-')} "
        f"generation={os.environ.get('SUPERVISOR_GENERATION', '-')} "
        f"worker={os.environ.get('SUPERVISOR_WORKER', '-')} pid={os.getpid()}\n"
    ).encode()


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = _body()
    start_response(
        "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    )
    return [body]


async def asgi(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = _body()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
