"""Worker output as log events, bounded; journald priorities on the daemon's lines."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from supervisor.serve.output import BURST, MAX_LINE, OutputHub, Pipe, level_of, open_pipes
from tests.support.harness import Daemon, cpu_seconds, free_port, service_toml, wait_until


def test_sd_daemon_prefixes_set_the_level() -> None:
    assert level_of("<3>disk full", "stdout") == (40, "disk full")
    assert level_of("<7>detail", "stderr") == (10, "detail")
    assert level_of("plain", "stdout") == (20, "plain")
    assert level_of("plain", "stderr") == (30, "plain")
    assert level_of("<x>not a prefix", "stdout") == (20, "<x>not a prefix")


async def _relayed(pipe: Pipe, data: bytes, wait: float) -> list[MutableMapping[str, Any]]:
    with structlog.testing.capture_logs() as events, OutputHub() as hub:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            hub.watch(pipe, 3, lambda: 4242)
            os.write(pipe.write, data)
            await trio.sleep(wait)
            nursery.cancel_scope.cancel()
    return events


async def test_lines_become_events_and_long_ones_are_cut() -> None:
    out, err = open_pipes()
    try:
        long = b"x" * (MAX_LINE + 100)
        events = await _relayed(out, b"hello\r\n<4>careful\n" + long + b"\npartial", 0.2)
    finally:
        for pipe in (out, err):
            os.close(pipe.read)
            os.close(pipe.write)
    lines = [e for e in events if e["event"] == "worker_output"]
    assert [(e["line"], e["log_level"]) for e in lines[:2]] == [
        ("hello", "info"),
        ("careful", "warning"),
    ]
    assert lines[2]["truncated"] == 100 and len(str(lines[2]["line"])) == MAX_LINE
    assert all(e["stream"] == "stdout" and e["pid"] == 4242 and e["worker"] == 3 for e in lines)
    assert len(lines) == 3, "a line without its newline waits for it"


async def test_a_flood_is_read_and_dropped_beyond_the_rate() -> None:
    out, err = open_pipes()
    try:
        events = await _relayed(out, b"line\n" * 12_000, 1.5)
    finally:
        for pipe in (out, err):
            os.close(pipe.read)
            os.close(pipe.write)
    lines = [e for e in events if e["event"] == "worker_output"]
    dropped = sum(int(e["lines"]) for e in events if e["event"] == "worker_output_dropped")
    assert BURST <= len(lines) < BURST + 1000, len(lines)
    assert len(lines) + dropped <= 12_000 and dropped > 0


def test_daemon_lines_carry_journald_priorities(tmp_path: Path) -> None:
    out = tmp_path / "journal"
    script = textwrap.dedent(
        """
        import os, sys
        st = os.fstat(1)
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        import structlog
        from supervisor.observe import logs
        logs.configure("json", "debug")
        log = structlog.get_logger()
        log.info("i"); log.warning("w"); log.error("e"); log.debug("d")
        """
    )
    with out.open("w") as stdout:
        subprocess.run([sys.executable, "-c", script], stdout=stdout, check=True, timeout=60)
    lines = out.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>", "<7>"]
    assert lines[0][3:].startswith("{")
    without = subprocess.run(
        [sys.executable, "-c", script.replace('os.environ["JOURNAL_STREAM"]', "x")],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert not without.stdout.startswith("<"), "not the journal: no prefixes"


def test_each_daemon_line_is_one_write_on_an_unbuffered_stdout() -> None:
    """Under PYTHONUNBUFFERED (python -u) print() writes a line's newline apart;
    a worker sharing the daemon's stdout (output = "inherit") could then write
    between the two. The daemon's lines must each be one write()."""
    script = textwrap.dedent(
        """
        import io, sys
        class Recorder(io.RawIOBase):
            calls = []
            def writable(self):
                return True
            def write(self, data):
                self.calls.append(bytes(data))
                return len(data)
        recorder = Recorder()
        sys.stdout = io.TextIOWrapper(recorder, write_through=True)  # as python -u has it
        import structlog
        from supervisor.observe import logs
        logs.configure("json", "info")
        structlog.get_logger().info("one", detail="x" * 3000)
        structlog.get_logger().warning("two")
        sys.__stdout__.write(repr(recorder.calls))
        """
    )
    done = subprocess.run(
        [sys.executable, "-u", "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    calls = ast.literal_eval(done.stdout)
    assert len(calls) == 2, calls
    assert all(call.startswith(b"{") and call.endswith(b"}\n") for call in calls)


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
