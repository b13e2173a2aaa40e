"""Typed requests to the daemon: signals and control commands become these.

Everything that changes the daemon's state travels as one of these on one
channel and is handled one at a time by the daemon's request loop. A request
may carry a ``reply`` channel on which the loop streams progress and the
final result; the sender owns the receiving end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

Reply = trio.MemorySendChannel[dict[str, Any]]


@dataclass(frozen=True)
class Shutdown:
    """Stop every worker gracefully, close listeners, exit 0."""

    source: str
    reply: Reply | None = None


@dataclass(frozen=True)
class Reload:
    """Roll out a new generation of one service (or all, ``service=None``)."""

    source: str
    service: str | None = None
    reason: str | None = None
    reply: Reply | None = None
    connection: int | None = None  # the control client's socket fd (carried by an upgrade)
    # ``supervisorctl restart``: roll out the config the service runs, not the file's.
    keep_config: bool = False


@dataclass(frozen=True)
class Upgrade:
    """Re-exec the daemon's entry point in place, adopting everything."""

    source: str
    reply: Reply | None = None
    connection: int | None = None


@dataclass(frozen=True)
class Reopen:
    """Send each service's ``reopen_signal`` to its workers (their logs were
    rotated). The daemon itself logs to stdout: it has nothing to reopen."""

    source: str
    reply: Reply | None = None


@dataclass(frozen=True)
class Signal:
    """Send ``signal`` to the workers of ``service``: every one it runs (during
    a rollout, both generations'), or the serving generation's ``worker``."""

    source: str
    service: str
    signal: str  # a canonical name (values.parse_signal)
    worker: int | None = None
    reply: Reply | None = None


@dataclass(frozen=True)
class Switch:
    """``supervisorctl stop`` (``on=False``) or ``start`` (``on=True``) of one service."""

    source: str
    service: str
    on: bool
    reply: Reply | None = None


Request = Shutdown | Reload | Upgrade | Reopen | Signal | Switch
