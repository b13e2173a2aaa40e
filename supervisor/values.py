"""Small value types of the config: durations, listen addresses, signal names.

Each has a pure parser that raises ``ValueError`` with a message meant for
the operator; pydantic turns those into field-path errors.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import re
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, WithJsonSchema

# systemd.time(7)'s units; "m" is minutes there too.
_UNIT_SECONDS = {
    **dict.fromkeys(("us", "usec"), 1e-6),
    **dict.fromkeys(("ms", "msec"), 0.001),
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
    **dict.fromkeys(("w", "week", "weeks"), 604800.0),
}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")
_UNITS_HELP = "us, ms, s, min (or m), h, d, w"
# The longest duration a setting may have. Every duration becomes a trio
# deadline or a timer somewhere; nan and inf pass a "not negative" check and
# then crash the daemon where they are used (trio refuses a NaN deadline).
DURATION_MAX = 366 * 86400.0


def parse_duration(value: object) -> float:
    """Parse a duration into seconds, as systemd.time(7) reads one: ``"500ms"``,
    ``"30s"``, ``"2min"`` or ``"2m"``, ``"1h"``, ``"14d"``, compound ``"1m30s"``
    or ``"1h 30min"``, bare seconds ``"30"`` (or a TOML number), decimals allowed.

    Raises:
        ValueError: for an unknown unit, a negative value, or anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"a duration is like '30s' or '1m30s', not {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value!r}")
        return _bounded(float(value), value)
    if not isinstance(value, str):
        raise ValueError(f"a duration is like '30s' or '1m30s', not {value!r}")
    text = value.strip().lower()
    total, position = 0.0, 0
    for match in _PART.finditer(text):
        if text[position : match.start()].strip() or not match.group(0):
            break
        unit = match.group(2) or "s"
        if unit not in _UNIT_SECONDS or (not match.group(2) and match.end() != len(text)):
            raise ValueError(
                f"invalid duration {value!r}: unknown unit {unit!r} (use {_UNITS_HELP})"
            )
        total += float(match.group(1)) * _UNIT_SECONDS[unit]
        position = match.end()
    if not text or position != len(text) or text[position:].strip():
        raise ValueError(f"invalid duration {value!r}: use a number and a unit ({_UNITS_HELP})")
    return _bounded(total, value)


def _bounded(seconds: float, value: object) -> float:
    if not math.isfinite(seconds) or seconds > DURATION_MAX:
        raise ValueError(f"a duration is at most 366d, not {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact string that ``parse_duration`` reads back as ``seconds``."""
    millis = round(seconds * 1000)
    if millis % 60_000 == 0 and millis:
        return f"{millis // 60_000}m"
    if millis % 1000 == 0:
        return f"{millis // 1000}s"
    return f"{millis}ms"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    # For editors (docs/config.schema.json): "30s", "1m30s", or seconds.
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, {"type": "string"}]}),
]

Protocol = Literal["tcp", "udp"]


@dataclass(frozen=True, order=True)
class ListenAddress:
    """One address a service listens on: protocol, IP literal, port."""

    proto: Protocol
    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def fd_name(self) -> str:
        """A name for LISTEN_FDNAMES: systemd forbids ':' in names."""
        return f"{self.proto}-{self.host}-{self.port}".replace(":", "_")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        prefix = "udp://" if self.proto == "udp" else ""
        return f"{prefix}{host}:{self.port}"


def connect_address(address: ListenAddress) -> tuple[str, int]:
    """Where this host connects to reach ``address``: a wildcard means loopback."""
    ip = ipaddress.ip_address(address.host)
    if ip.is_unspecified:
        return ("::1" if ip.version == 6 else "127.0.0.1", address.port)
    return address.sockaddr


def parse_listen(value: object) -> ListenAddress:
    """Parse ``host:port``, ``[v6]:port``, ``tcp://...`` or ``udp://...``.

    The host must be an IP literal: a name could resolve to several addresses
    and each (address, port) is its own reuseport group in the kernel.

    Raises:
        ValueError: with the reason.
    """
    if isinstance(value, ListenAddress):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a listen address is a string like '127.0.0.1:8080', not {value!r}")
    proto, text = _split_scheme(value.strip())
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r}: an IPv6 address is written [addr]:port")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{value!r}: expected host:port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{value!r}: host must be an IP address (like 127.0.0.1 or [::1]), not a name"
        ) from None
    if ip.version == 6 and not text.startswith("["):
        raise ValueError(f"{value!r}: an IPv6 address is written [addr]:port")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: port must be a number from 1 to 65535")
    return ListenAddress(proto=proto, host=str(ip), port=int(port_text))


def _split_scheme(text: str) -> tuple[Protocol, str]:
    if text.startswith("udp://"):
        return "udp", text[6:]
    if text.startswith("tcp://"):
        return "tcp", text[6:]
    if "://" in text:
        raise ValueError(f"{text!r}: unknown scheme (use tcp:// or udp://)")
    return "tcp", text


def _as_text(address: ListenAddress) -> str:
    # Not PlainSerializer(str): pydantic before 2.8 inspects the function's
    # signature, and the str type has none (ValueError at import).
    return str(address)


Listen = Annotated[
    ListenAddress,
    BeforeValidator(parse_listen),
    PlainSerializer(_as_text, return_type=str),
    WithJsonSchema({"type": "string", "examples": ["127.0.0.1:8080", "udp://[::1]:53"]}),
]


def parse_signal(value: object) -> str:
    """Accept ``"SIGTERM"``, ``"TERM"`` or ``"term"``; return the canonical name."""
    if not isinstance(value, str):
        raise ValueError(f"a signal is a name like 'SIGTERM', not {value!r}")
    name = value.strip().upper()
    if not name.startswith("SIG"):
        name = f"SIG{name}"
    if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
        raise ValueError(f"{value!r} is not a signal a worker can handle (like SIGTERM, SIGQUIT)")
    return name


SignalName = Annotated[str, BeforeValidator(parse_signal)]


def no_nul(value: str) -> str:
    """A string the kernel can take (an argument, a name, a variable's value)."""
    if "\0" in value:
        raise ValueError(f"{value!r} holds a NUL character, which no argument or name can hold")
    return value


Text = Annotated[str, AfterValidator(no_nul)]


@dataclass(frozen=True)
class Served:
    """A service's certificate as read once (by a reload's validation, or at
    a start): what the tls health check must be served, byte for byte, and
    what ``status`` and the expiry warning show. Made by ``config.tls``."""

    path: Path
    subject: str
    serial: int
    not_after: datetime.datetime  # UTC
    der: bytes  # the leaf

    def seconds_left(self, now: datetime.datetime | None = None) -> float:
        now = now or datetime.datetime.now(datetime.UTC)
        return (self.not_after - now).total_seconds()

    def describe(self) -> str:
        return f"{self.path} ({self.subject}, serial {self.serial:x})"
