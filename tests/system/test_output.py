"""Worker output as log events, bounded; journald priorities on the daemon's lines.

This file: the parts with real processes; the rest is in
tests/unit/test_output.py.
"""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Callable

import pytest

from tests.support.harness import Daemon, cpu_seconds, free_port, service_toml, wait_until

CHATTY = [sys.executable, "-u", "-c", textwrap.dedent(
    """
    import os, signal, socket, sys, time
    # One write() a line: "inherit" shares the daemon's stdout, and print()
    # under -u writes each argument apart, so other lines could come between.
    os.write(1, f"started {os.getpid()}\\n".encode())
    os.write(2, b"trouble ahead\\n")
    socket.socket(fileno=3)  # hold the listener
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        time.sleep(1)
    """
)]  # fmt: skip


FLOOD = ["sh", "-c", "exec yes 'a flood of output'"]


@pytest.mark.kernel
@pytest.mark.slow
def test_worker_output_as_events_and_a_flood_blocks_nobody(
    start_daemon: Callable[..., Daemon],
) -> None:
    quiet, loud, plain = free_port(), free_port(), free_port()
    services = (
        service_toml("web", port=quiet, workers=1, command=CHATTY, health='kind = "none"')
        + service_toml("flood", port=loud, workers=2, command=FLOOD, health='kind = "none"')
        + service_toml(
            "plain",
            port=plain,
            workers=1,
            command=CHATTY,
            health='kind = "none"',
            extra='output = "inherit"',
        )
    )
    daemon = start_daemon(services)
    said = daemon.wait_event("worker_output", service="web", stream="stdout")
    assert str(said["line"]).startswith("started ") and said["worker"] == 0
    assert said["generation"] == 1 and said["pid"] == daemon.worker_pids()[0]
    warned = daemon.wait_event("worker_output", service="web", stream="stderr")
    assert warned["line"] == "trouble ahead" and warned["level"] == "warning"
    daemon.wait_event("worker_output_dropped", service="flood")
    # The daemon stays responsive while two workers flood it.
    for _ in range(3):
        assert daemon.status()["services"]["web"]["state"] == "RUNNING"
        assert daemon.reload("web").ok
    # output = "inherit": the line is the worker's own, in the daemon's stdout.
    wait_until(lambda: any(line.startswith("started ") for line in daemon.raw), 30, "plain output")


TICKING = [sys.executable, "-u", "-c", textwrap.dedent(
    """
    import socket, time
    socket.socket(fileno=3)
    n = 0
    while True:
        print("tick", n)
        n += 1
        time.sleep(0.2)
    """
)]  # fmt: skip


@pytest.mark.kernel
@pytest.mark.slow
def test_output_pipes_survive_an_upgrade(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(
        service_toml("web", port=free_port(), workers=1, command=TICKING, health='kind = "none"')
    )
    daemon.wait_event("worker_output", service="web")
    pid = daemon.worker_pids()[0]
    assert daemon.upgrade().ok
    mark = daemon.mark()
    after = daemon.wait_event("worker_output", service="web", after=mark)
    assert after["pid"] == pid and str(after["line"]).startswith("tick ")


EMPTY_LINES = ["sh", "-c", "exec yes ''"]


@pytest.mark.kernel
@pytest.mark.slow
def test_a_worker_printing_empty_lines_costs_the_daemon_little(
    start_daemon: Callable[..., Daemon],
) -> None:
    # `yes ''` writes a newline at a time as fast as it can: read and split
    # line by line, that held the daemon at 100% of a core (500 of 500 ticks
    # in 5 s in the audit). Now its pipe is read at BYTE_RATE and the lines
    # beyond the rate are counted, not split.
    daemon = start_daemon(
        service_toml(
            "flood",
            port=free_port(),
            workers=1,
            command=EMPTY_LINES,
            health='kind = "none"\nsettle = "100ms"',
        )
    )
    daemon.wait_event("worker_output_dropped", service="flood")
    before, began = cpu_seconds(daemon.proc.pid), time.monotonic()
    time.sleep(3)
    share = (cpu_seconds(daemon.proc.pid) - before) / (time.monotonic() - began)
    print(f"daemon CPU while a worker prints empty lines: {share:.1%} of a core")
    assert share < 0.3, f"the daemon spent {share:.0%} of a core on one worker's output"
    assert daemon.status()["services"]["flood"]["state"] == "RUNNING"
    assert daemon.terminate() == 0
