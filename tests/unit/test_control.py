"""The control socket, supervisorctl, and how the daemon fails to start.

This file: the parts that need no root and no running daemon; the rest is in
tests/system/test_control.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.control.ctl import find_socket
from supervisor.control.protocol import parse_request
from supervisor.errors import ProtocolError

CTL = [sys.executable, "-m", "supervisor.control.ctl"]


def test_socket_discovery_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "s.toml"
    config.write_text(
        "[supervisor]\ncontrol_socket = '/x/from-config.sock'\n"
        "[services.web]\ncommand = ['x']\nlisten = ['127.0.0.1:1']\n"
    )
    monkeypatch.delenv("SUPERVISOR_SOCKET", raising=False)
    assert str(find_socket(None, None)) == "/run/reuseport-supervisor/control.sock"
    assert str(find_socket(None, config)) == "/x/from-config.sock"
    monkeypatch.setenv("SUPERVISOR_SOCKET", "/x/from-env.sock")
    assert str(find_socket(None, config)) == "/x/from-env.sock"
    assert str(find_socket("/x/explicit.sock", config)) == "/x/explicit.sock"


def test_request_parsing() -> None:
    assert parse_request(b'{"command": "status"}').command == "status"
    for bad, reason in [
        (b"not json", "request is not JSON"),
        (b'{"command": "explode"}', "command: Input should be"),
        (b'{"command": "status", "extra": 1}', "extra: Extra inputs"),
        (b"[1]", "invalid request"),
        (b"\xff\xfe", "request is not JSON"),
    ]:
        with pytest.raises(ProtocolError, match=reason):
            parse_request(bad)


def test_unreachable_daemon_is_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CTL, "-s", str(tmp_path / "none.sock"), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cannot reach supervisord at" in lines[0] and "No such file or directory" in lines[0]
