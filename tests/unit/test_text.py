"""Text from outside the daemon (a worker's answer or output) made printable,
notify messages that cannot carry a second command, and files read without
blocking on what is not a regular file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor.kernel.files import read_regular
from supervisor.kernel.notify import message, parse
from supervisor.text import has_controls, printable


def test_printable_makes_one_line_without_escapes() -> None:
    text = "503 x\nWATCHDOG=trigger\r\nMAINPID=1\x1b[31mred\x1b[0m\x00\x7f\u2028end\x1b]0;title\x07"
    out = printable(text)
    assert out == "503 x WATCHDOG=trigger MAINPID=1red?? end"
    assert not has_controls(out)


def test_printable_keeps_lines_when_asked_and_cuts_at_the_limit() -> None:
    assert printable("a\r\nb\tc\x1b[1m", lines=True) == "a\nb\tc"
    assert printable("x" * 50, limit=10) == "x" * 9 + "…"


@pytest.mark.parametrize(
    "value", ["ok\nWATCHDOG=trigger", "a\rb", "nul\x00", "sep\u2028x", "bell\x07"]
)
def test_a_notify_value_with_a_control_character_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="control character"):
        message(READY=1, STATUS=value)


def test_a_notify_message_is_one_line_per_field() -> None:
    text = message(FDSTORE=1, FDNAME="web/tcp-127.0.0.1-8080/g1/w0")
    assert parse(text.encode()) == {"FDSTORE": "1", "FDNAME": "web/tcp-127.0.0.1-8080/g1/w0"}
    with pytest.raises(ValueError, match="not a notify key"):
        message(**{"READY=1\nX": 1})


def test_read_regular_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match=r"not a regular file \(a FIFO\)"):
        read_regular(fifo, 100)  # returns at once: nobody writes it, nothing blocks
    with pytest.raises(OSError, match=r"not a regular file \(a character device\)"):
        read_regular(Path("/dev/zero"), 100)
    with pytest.raises(OSError, match=r"not a regular file \(a directory\)"):
        read_regular(tmp_path, 100)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    with pytest.raises(OSError, match="larger than 100 bytes"):
        read_regular(big, 100)
    exact = tmp_path / "exact"
    exact.write_bytes(b"y" * 100)
    assert read_regular(exact, 100) == b"y" * 100
    # /proc files say they are empty: what counts is what is read.
    assert read_regular(Path("/proc/self/stat"), 4096).startswith(str(os.getpid()).encode())
