"""The control socket, supervisorctl, and how the daemon fails to start.

This file: the parts with real processes; the rest is in
tests/unit/test_control.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import Daemon, free_port, listening_sockets, service_toml


def raw_exchange(path: Path, payload: bytes) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(15)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.kernel
@pytest.mark.slow
def test_control_socket_is_private_and_survives_bad_requests(
    start_daemon: Callable[..., Daemon],
) -> None:
    daemon = start_daemon(service_toml("web", port=free_port(), workers=1))
    mode = stat.S_IMODE(os.stat(daemon.control).st_mode)
    assert mode == 0o600
    assert raw_exchange(daemon.control, b"garbage\n")[0]["error"].startswith("request is not JSON")
    assert "longer than" in raw_exchange(daemon.control, b"x" * 70_000)[0]["error"]
    assert raw_exchange(daemon.control, b"")[0]["error"] == (
        "connection closed before a request was sent"
    )
    assert daemon.status()["services"]["web"]["state"] == "RUNNING"


@pytest.mark.kernel
@pytest.mark.slow
def test_second_daemon_refuses_and_stale_socket_is_reused(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    first = start_daemon(service_toml("web", port=free_port(), workers=1))
    config = tmp_path / "second.toml"
    config.write_text(
        f'[supervisor]\ncontrol_socket = "{first.control}"\n'
        + service_toml("web", port=free_port(), workers=1)
    )
    second = subprocess.run(
        [sys.executable, "-m", "supervisor.daemon", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert f"another supervisord is already serving the control socket {first.control}" in (
        second.stderr
    )
    assert first.status()["services"]["web"]["state"] == "RUNNING"
    # A daemon killed outright leaves its socket file; the next start reuses it.
    first.kill()
    assert first.control.exists()
    third = Daemon(config, first.control)
    try:
        third.wait_event("control_socket_stale")
        third.wait_event("daemon_ready")
    finally:
        assert third.terminate() == 0


@pytest.mark.kernel
@pytest.mark.slow
def test_start_fails_cleanly_when_a_port_is_taken(
    start_daemon: Callable[..., Daemon],
) -> None:
    taken = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", taken))
    holder.listen()
    ok_port = free_port()
    try:
        daemon = start_daemon(
            service_toml("api", port=ok_port, workers=2) + service_toml("web", port=taken),
            wait_ready=False,
        )
        assert daemon.proc.wait(60) == 1
    finally:
        holder.close()
    text = "\n".join(daemon.raw)
    assert f"cannot bind 127.0.0.1:{taken}: EADDRINUSE" in text
    assert listening_sockets(ok_port) == [], "the other service was stopped too"
    assert not daemon.control.exists()


@pytest.mark.kernel
@pytest.mark.slow
def test_start_fails_cleanly_when_a_worker_exits_at_once(
    start_daemon: Callable[..., Daemon],
) -> None:
    daemon = start_daemon(
        service_toml("web", port=free_port(), workers=2, command=["false"]), wait_ready=False
    )
    assert daemon.proc.wait(60) == 1
    text = "\n".join(daemon.raw)
    assert re.search(r"web\[[01]\]@1: cannot start: exited with status 1 before it was ready", text)
