"""Small value types of the config: durations, listen addresses, signal names.

Each has a pure parser that raises ``ValueError`` with a message meant for
the operator; pydantic turns those into field-path errors.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import socket
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BeforeValidator, PlainSerializer

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0}


def parse_duration(value: object) -> float:
    """Parse ``"500ms"``, ``"30s"``, ``"2m"`` (decimals allowed) into seconds.

    Raises:
        ValueError: for a bare number, a missing or unknown unit, or a negative value.
    """
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(
            f"a duration is a string with a unit (ms, s, m), like '30s', not {value!r}"
        )
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"invalid duration {value!r}: use a number and a unit: ms, s or m")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


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


Listen = Annotated[
    ListenAddress,
    BeforeValidator(parse_listen),
    PlainSerializer(str, return_type=str),
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
