"""Durations, listen addresses and signal names."""

from __future__ import annotations

import pytest

from supervisor.values import (
    ListenAddress,
    format_duration,
    parse_duration,
    parse_listen,
    parse_signal,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("2m", 120.0),
        ("2min", 120.0),
        ("1.5s", 1.5),
        (" 10 s ", 10.0),
        ("0s", 0.0),
        # systemd.time(7): hours, days, weeks, compound forms, bare seconds
        ("1h", 3600.0),
        ("14d", 14 * 86400.0),
        ("1w", 604800.0),
        ("1m30s", 90.0),
        ("1h 30min", 5400.0),
        ("2 hours", 7200.0),
        ("30", 30.0),
        ("0.25", 0.25),
        (30, 30.0),
        (0.5, 0.5),
        ("200us", 0.0002),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "a duration is like '30s'"),
        (None, "a duration is like '30s'"),
        (-3, "cannot be negative"),
        ("30 parsecs", "unknown unit 'parsecs'"),
        ("-1s", "use a number and a unit"),
        ("s", "use a number and a unit"),
        ("", "use a number and a unit"),
        ("1s and more", "use a number and a unit"),
        (float("nan"), "at most 366d"),
        (float("inf"), "at most 366d"),
        ("9" * 400 + "s", "at most 366d"),
        ("367d", "at most 366d"),
    ],
)
def test_bad_durations(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


@pytest.mark.parametrize("seconds", [0.0, 0.5, 1.0, 30.0, 120.0, 0.25, 90.0])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", ListenAddress("tcp", "127.0.0.1", 8080)),
        ("tcp://0.0.0.0:80", ListenAddress("tcp", "0.0.0.0", 80)),
        ("[::1]:8080", ListenAddress("tcp", "::1", 8080)),
        ("udp://127.0.0.1:53", ListenAddress("udp", "127.0.0.1", 53)),
        ("udp://[::]:5353", ListenAddress("udp", "::", 5353)),
        ("[0:0::1]:1", ListenAddress("tcp", "::1", 1)),
    ],
)
def test_listen_addresses(text: str, expected: ListenAddress) -> None:
    address = parse_listen(text)
    assert address == expected
    assert parse_listen(str(address)) == address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("localhost:8080", "must be an IP address"),
        ("127.0.0.1", "expected host:port"),
        (":8080", "expected host:port"),
        ("127.0.0.1:0", "port must be a number from 1 to 65535"),
        ("127.0.0.1:70000", "port must be a number from 1 to 65535"),
        ("127.0.0.1:http", "port must be a number"),
        ("::1:8080", r"written \[addr\]:port"),
        ("[::1]8080", r"written \[addr\]:port"),
        ("sctp://127.0.0.1:1", "unknown scheme"),
        (8080, "a listen address is a string"),
    ],
)
def test_bad_listen_addresses(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen(text)


def test_fd_names_have_no_colons() -> None:
    assert parse_listen("[::1]:80").fd_name == "tcp-__1-80"
    assert parse_listen("udp://127.0.0.1:53").fd_name == "udp-127.0.0.1-53"


@pytest.mark.parametrize(("text", "name"), [("SIGTERM", "SIGTERM"), ("quit", "SIGQUIT")])
def test_signals(text: str, name: str) -> None:
    assert parse_signal(text) == name


@pytest.mark.parametrize("text", ["SIGKILL", "STOP", "SIGNOPE", ""])
def test_bad_signals(text: str) -> None:
    with pytest.raises(ValueError, match="is not a signal a worker can handle"):
        parse_signal(text)
