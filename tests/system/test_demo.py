"""The demo worker, run as a real process on listeners we hand it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from supervisor.kernel.notify import NotifyReceiver
from supervisor.kernel.proc import ChildProcess, spawn
from supervisor.kernel.sockets import socket_cookie
from tests.support.load import parse_body

pytestmark = [pytest.mark.kernel, pytest.mark.slow]
DEMO = [sys.executable, "-m", "supervisor.demo"]


def tcp_listener() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


@asynccontextmanager
async def demo(socks: list[socket.socket], *args: str) -> AsyncIterator[ChildProcess]:
    """A demo worker on ``socks`` (with ``args``), ready (READY=1 received) when entered."""
    with NotifyReceiver("demo-test") as notify:
        env = {
            **os.environ,
            "LISTEN_FDS": str(len(socks)),
            "NOTIFY_SOCKET": notify.address,
            "SUPERVISOR_SERVICE": "t",
            "SUPERVISOR_GENERATION": "5",
            "SUPERVISOR_WORKER": "2",
        }
        proc = spawn([*DEMO, *args], env=env, fds=[s.fileno() for s in socks])
        try:
            with trio.fail_after(30):
                message = await notify.receive()
            assert message.fields == {"READY": "1"}
            assert message.pid == proc.pid
            yield proc
        finally:
            await proc.aclose()


async def exchange(port: int, payload: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(payload)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


async def test_answers_identity_health_and_errors() -> None:
    sock = tcp_listener()
    port = sock.getsockname()[1]
    async with demo([sock]) as proc:
        root = await exchange(port, b"GET / HTTP/1.0\r\n\r\n")
        assert root.startswith(b"HTTP/1.1 200 ")
        body = parse_body(root.split(b"\r\n\r\n", 1)[1])
        assert body == {
            "service": "t",
            "generation": "5",
            "worker": "2",
            "pid": str(proc.pid),
            "listener": str(socket_cookie(sock)),
        }
        health = await exchange(
            port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert health.startswith(b"HTTP/1.1 200 ") and health.endswith(b"\r\n\r\nok\n")
        missing = await exchange(port, b"GET /nope HTTP/1.0\r\n\r\n")
        assert missing.startswith(b"HTTP/1.1 404 ")
        post = await exchange(port, b"POST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        assert post.startswith(b"HTTP/1.1 405 ")
        head = await exchange(port, b"HEAD / HTTP/1.0\r\n\r\n")
        assert head.endswith(b"\r\n\r\n")
    sock.close()


async def test_keep_alive_then_close() -> None:
    sock = tcp_listener()
    port = sock.getsockname()[1]
    async with demo([sock]):
        two = (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = await exchange(port, two)
        assert data.count(b"HTTP/1.1 200 ") == 2
    sock.close()


async def test_sigterm_finishes_the_request_in_flight() -> None:
    sock = tcp_listener()
    port = sock.getsockname()[1]
    async with demo([sock]) as proc:
        busy = await trio.open_tcp_stream("127.0.0.1", port)
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        await busy.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")  # headers not finished
        await idle.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await idle.receive_some(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            # The idle keep-alive connection is closed at once...
            assert await idle.receive_some(65536) == b""
            # ...the one in flight is answered, then closed.
            await busy.send_all(b"\r\n")
            data = b""
            while chunk := await busy.receive_some(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 ")
            assert b"connection: close" in data.lower()
            assert await proc.wait() == 0
        # It stopped accepting: a new connection is queued, never answered.
        await busy.aclose()
        await idle.aclose()
    sock.close()


async def test_einval_from_accept_retires_only_that_listener() -> None:
    first, second = tcp_listener(), tcp_listener()
    async with demo([first, second]):
        first.shutdown(socket.SHUT_RDWR)  # what the supervisor does on retirement
        # A shut-down listener is no longer in the group: connects are refused.
        with pytest.raises(OSError, match="all attempts to connect") as info:
            await exchange(first.getsockname()[1], b"GET / HTTP/1.0\r\n\r\n")
        assert isinstance(info.value.__cause__, BaseExceptionGroup)
        assert isinstance(info.value.__cause__.exceptions[0], ConnectionRefusedError)
        data = await exchange(second.getsockname()[1], b"GET / HTTP/1.0\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 ")
    first.close()
    second.close()


async def test_concurrency_is_per_listener_so_an_idle_one_starves_none() -> None:
    """``--concurrency 1`` with two listeners, the second never connected to: the
    first answers request after request. With one limit for both, the idle
    listener's acceptor held the only slot in accept() and the busy one's
    connections waited in its queue (at the latest from the second request on)."""
    busy, idle = tcp_listener(), tcp_listener()
    async with demo([busy, idle], "--concurrency", "1"):
        for _ in range(3):
            data = await exchange(busy.getsockname()[1], b"GET / HTTP/1.0\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 200 ")
    busy.close()
    idle.close()


async def test_udp_listener_answers_datagrams() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    async with demo([udp]):
        await client.sendto(b"7", udp.getsockname())
        with trio.fail_after(10):
            answer = await client.recv(4096)
    assert answer.startswith(b"7 service=t generation=5 worker=2")
    client.close()
    udp.close()


def test_refuses_to_run_without_its_listeners() -> None:
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_PID": "1"}
    done = subprocess.run(DEMO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "LISTEN_PID='1' is not my pid" in done.stderr
    env.pop("LISTEN_FDS")
    done = subprocess.run(DEMO, env=env, capture_output=True, text=True, timeout=60)
    assert "LISTEN_FDS is not set: run me under supervisord" in done.stderr
