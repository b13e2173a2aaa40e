"""Worker output as log events, bounded; journald priorities on the daemon's lines.

This file: the parts that need no root and no running daemon; the rest is in
tests/system/test_output.py.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog
import trio
import trio.testing

from supervisor.serve.output import BURST, MAX_LINE, OutputHub, Pipe, level_of, open_pipes


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
