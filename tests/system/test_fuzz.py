"""Hostile input never crashes the daemon: config files and control requests (hypothesis).

Config: random text and random values put at every known key (and unknown
ones) either load or are rejected with ConfigIssues that name their field.
Control: malformed, oversized, partial and slow requests each get an error
line, and the daemon serves a normal request right after.

This file: the parts with real processes; the rest is in
tests/unit/test_fuzz.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.harness import Daemon, cpu_seconds, free_port, open_fd_count, service_toml
from tests.support.procs import rss_kib


def exchange(path: Path, payload: bytes, *, pause: float = 0.0) -> list[dict[str, Any]]:
    """Send ``payload`` (in two halves ``pause`` apart), half-close, read every reply line."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(20)
        sock.connect(str(path))
        middle = len(payload) // 2
        sock.sendall(payload[:middle])
        time.sleep(pause)
        sock.sendall(payload[middle:])
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


requests = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode() + b"\n"),
    st.dictionaries(
        st.sampled_from(["command", "service", "reason", "extra"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=20), st.sampled_from(["nope", ""])),
        max_size=4,
    ).map(lambda d: json.dumps(d).encode() + b"\n"),
)


@pytest.mark.kernel
@pytest.mark.slow
def test_control_socket_answers_hostile_requests_and_keeps_serving(
    start_daemon: Callable[..., Daemon],
) -> None:
    daemon = start_daemon(service_toml("web", port=free_port(), workers=1))
    seen: list[str] = []

    @given(payload=requests, pause=st.sampled_from([0.0, 0.0, 0.05]))
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    def hostile(payload: bytes, pause: float) -> None:
        if b'"shutdown"' in payload or b'"reload"' in payload:
            return  # valid commands that change state; not what this test is about
        replies = exchange(daemon.control, payload, pause=pause)
        assert len(replies) == 1, replies
        reply = replies[0]
        assert reply["type"] in ("result", "error"), reply
        if reply["type"] == "error":
            assert reply["error"], reply
            seen.append(reply["error"].split(":")[0])

    hostile()
    assert daemon.proc.poll() is None
    assert daemon.status()["services"]["web"]["state"] == "RUNNING"
    assert seen, "hypothesis sent nothing the daemon refused"
    # Oversized and silent clients: an error each, within the request timeout.
    assert "longer than" in exchange(daemon.control, b"{" * 100_000)[0]["error"]
    with socket.socket(socket.AF_UNIX) as silent:
        silent.settimeout(20)
        silent.connect(str(daemon.control))
        started = time.monotonic()
        answer = json.loads(silent.recv(65536).splitlines()[0])
        assert answer["error"] == "no request received in time"
        assert time.monotonic() - started < 15
    assert daemon.status()["services"]["web"]["state"] == "RUNNING"


# Values --check takes, at their edges (zero, tiny, the largest the schema
# allows): whatever --check passes, the daemon must survive. The values it
# refuses are the named-error tests' (test_config.HOSTILE). Workers stay few:
# 512 demo workers three times over is a benchmark, not a test.
EDGE_DURATIONS = st.sampled_from(['"0s"', '"1us"', '"1ms"', '"366d"', "0", "1e-9"])


EDGE_KEYS: dict[str, st.SearchStrategy[str]] = {
    "workers": st.sampled_from(["1", "2", "3"]),
    "backlog": st.sampled_from(["1", "2", "65535"]),
    "stop_timeout": EDGE_DURATIONS,
    "drain_timeout": EDGE_DURATIONS,
    "ready_timeout": st.sampled_from(['"30s"', '"366d"']),
    "watch_debounce": EDGE_DURATIONS,
    "retire": st.sampled_from(['"auto"', '"migrate"', '"drain"']),
    "stop_signal": st.sampled_from(['"SIGTERM"', '"SIGINT"']),
    "reopen_signal": st.sampled_from(['"SIGUSR1"', '"SIGHUP"', '"SIGWINCH"']),
    "environment": st.sampled_from(['{ A = "" }', '{ B = "' + "x" * 4096 + '" }', "{}"]),
    "socket": st.sampled_from(
        [
            "{ rcvbuf = 1024, sndbuf = 1024 }",
            "{ rcvbuf = 2147483647, sndbuf = 2147483647 }",
            '{ defer_accept = "1h" }',
            '{ defer_accept = "1us" }',
            "{ fastopen = 65535 }",
            "{ fastopen = 1 }",
        ]
    ),
}


def _hostile_service(port: int, keys: dict[str, str]) -> str:
    lines = [
        "[services.web]",
        f'command = ["{sys.executable}", "-m", "supervisor.demo"]',
        f'listen = ["127.0.0.1:{port}"]',
        *(f"{key} = {value}" for key, value in keys.items()),
        "[services.web.health]",
        'kind = "notify"',
    ]
    return "\n".join(lines) + "\n"


@pytest.mark.kernel
@pytest.mark.slow
def test_a_config_check_passes_is_one_the_daemon_survives(
    start_daemon: Callable[..., Daemon], tmp_path_factory: Any
) -> None:
    ran: list[dict[str, str]] = []

    @given(keys=st.fixed_dictionaries({}, optional=EDGE_KEYS))
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    def survives(keys: dict[str, str]) -> None:
        port = free_port()
        path = Path(tmp_path_factory.mktemp("hostile")) / "s.toml"
        path.write_text(_hostile_service(port, keys))
        done = subprocess.run(
            [sys.executable, "-m", "supervisor.daemon", "--check", "-c", str(path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode in (0, 2) and "Traceback" not in done.stderr, done.stderr
        if done.returncode == 2:
            assert "retire" in keys, done.stderr  # migrate without migration: a config error
            return
        ran.append(keys)
        daemon = start_daemon(_hostile_service(port, keys))
        for _ in range(3):
            answer = daemon.reload()
            assert answer.ok, (keys, answer.answer)
        pids = daemon.worker_pids()
        mark = daemon.mark()
        os.kill(pids[0], signal.SIGKILL)
        daemon.wait_event("worker_running", after=mark)
        listed = {w["pid"] for w in daemon.status()["services"]["web"]["workers"]}
        assert None not in listed and len(listed) == len(pids), (keys, listed)
        assert daemon.terminate() == 0, keys

    survives()
    print(f"{len(ran)} edge configs passed --check and ran; keys: {sorted({*chain(*ran)})}")
    assert ran, "no draw passed --check: the fuzz ran no daemon"


SLOW_PEERS = 150  # of each kind: more than either server takes at once


def _slow_peer(address: str | tuple[str, int], payload: bytes, stop: threading.Event) -> None:
    """Connect, then send ``payload`` a byte every 50 ms (and never read), until ``stop``."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as peer:
        peer.settimeout(2)
        peer.connect(address)
        for byte in payload:
            if stop.wait(0.05):
                return
            peer.send(bytes([byte]))
        stop.wait(30)


@pytest.mark.kernel
@pytest.mark.slow
def test_slow_and_malformed_peers_leave_the_daemon_bounded_and_answering(
    start_daemon: Callable[..., Daemon],
) -> None:
    metrics = free_port()
    daemon = start_daemon(
        service_toml("web", port=free_port(), workers=1),
        supervisor_extra=f'metrics_listen = "127.0.0.1:{metrics}"',
    )
    pid = daemon.proc.pid
    fds_before, rss_before, cpu_before = open_fd_count(pid), rss_kib(pid), cpu_seconds(pid)
    stop = threading.Event()
    payloads = [b'{"command": "status"', b"GET /metrics HTTP/1.1\r\nHost: x\r\n", b"\x00\xff" * 40]
    peers = [
        threading.Thread(target=_slow_peer, args=(address, payloads[i % 3], stop), daemon=True)
        for i in range(SLOW_PEERS)
        for address in (str(daemon.control), ("127.0.0.1", metrics))
    ]
    began = time.monotonic()
    for peer in peers:
        peer.start()
    slowest, fds_most = 0.0, 0
    try:
        while time.monotonic() - began < 8:
            asked = time.monotonic()
            assert daemon.status()["services"]["web"]["state"] == "RUNNING"
            slowest = max(slowest, time.monotonic() - asked)
            fds_most = max(fds_most, open_fd_count(pid))
            time.sleep(0.2)
    finally:
        stop.set()
        for peer in peers:
            peer.join(10)
    cpu = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - began)
    rss_growth = rss_kib(pid) - rss_before
    print(
        f"status at most {slowest * 1000:.0f} ms; fds {fds_before} -> at most {fds_most}; "
        f"CPU {cpu:.0%} of a core; RSS +{rss_growth} KiB"
    )
    assert slowest < 1.0
    assert fds_most <= fds_before + SLOW_PEERS + 16 + 8, "each control peer, 16 metrics ones"
    assert cpu < 0.5
    assert rss_growth < 32 * 1024
    assert daemon.proc.poll() is None
