"""Hostile input never crashes the daemon: config files and control requests (hypothesis).

Config: random text and random values put at every known key (and unknown
ones) either load or are rejected with ConfigIssues that name their field.
Control: malformed, oversized, partial and slow requests each get an error
line, and the daemon serves a normal request right after.

This file: the parts that need no root and no running daemon; the rest is in
tests/system/test_fuzz.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.config.loader import load_config, parse_config
from supervisor.errors import ConfigError
from tests.support.fuzzing import values

SERVICE_KEYS = [
    "command", "workers", "listen", "backlog", "retire", "stop_signal", "stop_timeout",
    "drain_timeout", "ready_timeout", "environment", "user", "group", "working_directory",
    "preflight", "socket", "health", "tls", "watch", "watch_debounce", "bogus",
]  # fmt: skip


SUPERVISOR_KEYS = [
    "control_socket", "control_socket_mode", "control_socket_group", "control_allow_users",
    "control_allow_groups", "log_format", "log_level", "tcp_migrate_req", "steering", "x",
]  # fmt: skip


def assert_named(exc: ConfigError) -> None:
    """Every issue names its field, or is about the whole file (syntax, encoding)."""
    assert exc.issues
    for issue in exc.issues:
        assert issue.location or issue.message.startswith(("TOML syntax", "not UTF-8")), issue


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_text_loads_or_is_rejected_with_reasons(text: str) -> None:
    try:
        parse_config(text)
    except ConfigError as exc:
        assert_named(exc)


@given(
    service=st.dictionaries(st.sampled_from(SERVICE_KEYS), values, max_size=6),
    supervisor=st.dictionaries(st.sampled_from(SUPERVISOR_KEYS), values, max_size=3),
)
@settings(max_examples=400, deadline=None)
def test_hostile_values_at_every_key_are_named(
    service: dict[str, str], supervisor: dict[str, str]
) -> None:
    lines = ["[supervisor]", *(f"{k} = {v}" for k, v in supervisor.items()), "[services.web]"]
    base = {"command": '["python3"]', "listen": '["127.0.0.1:8080"]'}
    lines += [f"{k} = {v}" for k, v in {**base, **service}.items()]
    text = "\n".join(lines) + "\n"
    try:
        config = parse_config(text)
    except ConfigError as exc:
        assert_named(exc)
        for issue in exc.issues:
            key = issue.location.split(".")
            if issue.location and key[0] == "services":
                assert key[:2] == ["services", "web"], issue
    else:
        assert config.services["web"].command


@given(data=st.binary(max_size=200))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_check_command_never_crashes(data: bytes, tmp_path_factory: Any) -> None:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "f.toml"
    path.write_bytes(b'[services.web]\ncommand = ["true"]\nlisten = ["127.0.0.1:1"]\n' + data)
    done = subprocess.run(
        [sys.executable, "-m", "supervisor.daemon", "--check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode in (0, 2), done.stderr
    assert "Traceback" not in done.stderr
    if done.returncode == 2:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert_named(info.value)
