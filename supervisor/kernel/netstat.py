"""Network-namespace-wide TCP counters from /proc/net/netstat and /proc/net/snmp."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from supervisor.errors import KernelError, translated

REPORTED = (
    "TcpExt:TCPMigrateReqSuccess",
    "TcpExt:TCPMigrateReqFailure",
    "TcpExt:ListenOverflows",
    "TcpExt:ListenDrops",
)


def read(
    paths: Iterable[Path] = (Path("/proc/net/netstat"), Path("/proc/net/snmp")),
) -> dict[str, int]:
    """All counters as ``{"TcpExt:ListenDrops": n, "Tcp:OutRsts": n, ...}``.

    Raises:
        KernelError: a file could not be read.
    """
    counters: dict[str, int] = {}
    for path in paths:
        with translated(KernelError, f"read {path}"):
            lines = path.read_text().splitlines()
        for header, values in zip(lines[::2], lines[1::2], strict=False):
            names, numbers = header.split(), values.split()
            prefix = names[0].rstrip(":")
            for name, number in zip(names[1:], numbers[1:], strict=False):
                if number.lstrip("-").isdigit():
                    counters[f"{prefix}:{name}"] = int(number)
    return counters


def delta(
    before: Mapping[str, int], after: Mapping[str, int], keys: Iterable[str] = REPORTED
) -> dict[str, int]:
    """``after - before`` for ``keys``, named without their prefix."""
    return {key.split(":", 1)[1]: after.get(key, 0) - before.get(key, 0) for key in keys}
