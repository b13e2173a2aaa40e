"""The control server against clients that misbehave, on trio's autojump clock.

A real unix socket and a real client that connects and then stops reading:
the server gives it up after SEND_TIMEOUT, and the daemon's side of the
reply channel never waits on it, however many messages a reload sends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing

from supervisor.control import server
from supervisor.control.requests import Reload, Request
from supervisor.control.server import ControlServer, bound_control_socket

MESSAGES = 5000  # about 1 MB: more than a unix socket buffers


async def test_a_client_that_stops_reading_never_holds_the_daemon(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    requests, taken = trio.open_memory_channel[Request](1)
    control = ControlServer(requests, status=lambda: None)  # type: ignore[arg-type,return-value]
    path = tmp_path / "control.sock"
    with bound_control_socket(path, 0o600) as sock:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, sock)
            client = trio.socket.socket(trio.socket.AF_UNIX)
            await client.connect(str(path))
            await client.send(b'{"command": "reload"}\n')  # and never reads again
            request = await taken.receive()
            assert isinstance(request, Reload) and request.reply is not None
            progress: dict[str, Any] = {"type": "progress", "message": "x" * 200}
            began = trio.current_time()
            with trio.fail_after(server.SEND_TIMEOUT * 3):
                async with request.reply:
                    for _ in range(MESSAGES):
                        await request.reply.send(progress)
            # The daemon's sends ended once the client was given up, not never.
            assert trio.current_time() - began < server.SEND_TIMEOUT * 2
            data = b""
            while chunk := await client.recv(1 << 16):  # the server hung up on it
                data += chunk
            assert 0 < data.count(b"\n") < MESSAGES
            client.close()
            control.close()
