"""Metrics in Prometheus's naming, as OpenMetrics text (made in ``exposition.py``).

``Tally`` is what the daemon counts as it goes: reloads by outcome, their
durations and the supervisor's own overhead (histograms), the connections
each retirement found queued, moved, drained and left, the kernel counters'
deltas, worker restarts, upgrades. It is plain numbers, so an in-place
upgrade carries it in its state document and no counter goes back to zero.
Everything else is read from the running daemon at scrape time: worker
states, the serving generation, the eBPF SYN counters per listener, the
served certificates' ends.

Served by ``supervisorctl metrics`` (the control socket: fits node_exporter's
textfile collector, needs no TCP) and, opt-in, over HTTP at
``[supervisor] metrics_listen`` (``metrics_http.py``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from supervisor.reports import RolloutReport

PREFIX = "reuseport_supervisor"
# Prometheus' text format 0.0.4 (the default: node_exporter's textfile collector
# rejects OpenMetrics' info type), or OpenMetrics 1.0.0.
Format = Literal["prometheus", "openmetrics"]
CONTENT_TYPES: dict[Format, str] = {
    "prometheus": "text/plain; version=0.0.4; charset=utf-8",
    "openmetrics": "application/openmetrics-text; version=1.0.0; charset=utf-8",
}
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OVERHEAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONNECTIONS = ("queued", "migrated", "drained", "left")  # at cutover, moved, drained, at shutdown
KERNEL = {
    "TCPMigrateReqSuccess": "tcp_migrate_req_success",
    "TCPMigrateReqFailure": "tcp_migrate_req_failure",
    "ListenOverflows": "listen_overflows",
    "ListenDrops": "listen_drops",
}


@dataclass
class Histogram:
    """Cumulative-free bucket counts (one per bound, then the overflow), sum, count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        self.counts[index] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclass
class Tally:
    """The daemon's counters, by service (and outcome, kind)."""

    reloads: dict[str, dict[str, int]] = field(default_factory=dict)  # service -> outcome -> n
    duration: dict[str, Histogram] = field(default_factory=dict)
    overhead: dict[str, Histogram] = field(default_factory=dict)
    connections: dict[str, dict[str, int]] = field(default_factory=dict)  # service -> kind -> n
    kernel: dict[str, dict[str, int]] = field(default_factory=dict)  # service -> counter -> n
    restarts: dict[str, int] = field(default_factory=dict)  # of generations no longer running
    upgrades: int = 0
    # The last rollout that ended by failing (rejected, rolled back) or not, and
    # when the last one succeeded (Unix time), as Prometheus' own config reloads.
    last_failed: dict[str, bool] = field(default_factory=dict)
    last_success: dict[str, float] = field(default_factory=dict)

    def rollout(self, report: RolloutReport, retired_restarts: int = 0) -> None:
        """Count a finished rollout (and the restarts of the generation it retired)."""
        name = report.service
        outcomes = self.reloads.setdefault(name, {})
        outcomes[report.outcome] = outcomes.get(report.outcome, 0) + 1
        if report.outcome in ("rejected", "rolled_back"):
            self.last_failed[name] = True
        if report.outcome != "succeeded":
            return
        self.last_failed[name] = False
        self.last_success[name] = time.time()
        self.duration.setdefault(name, Histogram(DURATION_BUCKETS)).observe(report.duration)
        if "overhead" in report.timings:
            histogram = self.overhead.setdefault(name, Histogram(OVERHEAD_BUCKETS))
            histogram.observe(report.timings["overhead"])
        moved = report.counters.get("TCPMigrateReqSuccess", 0)
        seen = {
            "queued": report.queued_at_cutover or 0,
            "migrated": max(0, moved),
            "drained": report.drained or 0,
            "left": report.left_at_shutdown or 0,
        }
        counts = self.connections.setdefault(name, dict.fromkeys(CONNECTIONS, 0))
        for kind, value in seen.items():
            counts[kind] = counts.get(kind, 0) + value
        kernel = self.kernel.setdefault(name, {})
        for key, value in report.counters.items():
            kernel[key] = kernel.get(key, 0) + max(0, value)
        self.restarts[name] = self.restarts.get(name, 0) + retired_restarts

    def refused(self, services: Iterable[str]) -> None:
        """A reload of ``services`` was refused before any rollout (a bad file)."""
        for name in services:
            self.last_failed[name] = True

    def export(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def restore(cls, data: Mapping[str, Any]) -> Tally:
        """From ``export()`` (an upgrade's state document); what does not fit starts anew."""
        try:
            return cls(
                reloads={k: dict(v) for k, v in data.get("reloads", {}).items()},
                duration={k: _histogram(v) for k, v in data.get("duration", {}).items()},
                overhead={k: _histogram(v) for k, v in data.get("overhead", {}).items()},
                connections={k: dict(v) for k, v in data.get("connections", {}).items()},
                kernel={k: dict(v) for k, v in data.get("kernel", {}).items()},
                restarts=dict(data.get("restarts", {})),
                upgrades=int(data.get("upgrades", 0)),
                last_failed={k: bool(v) for k, v in data.get("last_failed", {}).items()},
                last_success={k: float(v) for k, v in data.get("last_success", {}).items()},
            )
        except (TypeError, ValueError, AttributeError):
            return cls()


def _histogram(data: Mapping[str, Any]) -> Histogram:
    bounds = tuple(float(b) for b in data["bounds"])
    counts = [int(c) for c in data["counts"]]
    if len(counts) != len(bounds) + 1:
        raise ValueError("bucket counts do not fit the bounds")
    return Histogram(bounds, counts, float(data["total"]))
