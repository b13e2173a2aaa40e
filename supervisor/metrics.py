"""Metrics in Prometheus's naming, as OpenMetrics text (``prometheus_client``).

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
``[supervisor] metrics_listen`` (``http.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from supervisor import __version__
from supervisor.errors import SupervisorError
from supervisor.lifecycle import WorkerState

if TYPE_CHECKING:
    from supervisor.rollout import RolloutReport
    from supervisor.service import Service

PREFIX = "reuseport_supervisor"
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

    def rollout(self, report: RolloutReport, retired_restarts: int = 0) -> None:
        """Count a finished rollout (and the restarts of the generation it retired)."""
        name = report.service
        outcomes = self.reloads.setdefault(name, {})
        outcomes[report.outcome] = outcomes.get(report.outcome, 0) + 1
        if report.outcome != "succeeded":
            return
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
            )
        except (TypeError, ValueError, AttributeError):
            return cls()


def _histogram(data: Mapping[str, Any]) -> Histogram:
    bounds = tuple(float(b) for b in data["bounds"])
    counts = [int(c) for c in data["counts"]]
    if len(counts) != len(bounds) + 1:
        raise ValueError("bucket counts do not fit the bounds")
    return Histogram(bounds, counts, float(data["total"]))


class Scrape(Collector):
    """Every metric, from the tally and the live services, at scrape time."""

    def __init__(self, tally: Tally, services: Mapping[str, Service]) -> None:
        self.tally = tally
        self.services = services

    def collect(self) -> Iterable[Metric]:
        yield from self._tallied()
        yield from self._live()

    def _tallied(self) -> Iterable[Metric]:
        t = self.tally
        build = InfoMetricFamily(f"{PREFIX}_build", "The supervisor's version.", labels=[])
        build.add_metric([], {"version": __version__})
        yield build
        reloads = CounterMetricFamily(
            f"{PREFIX}_reloads", "Rollouts by outcome.", labels=["service", "outcome"]
        )
        for name, outcomes in t.reloads.items():
            for outcome, count in outcomes.items():
                reloads.add_metric([name, outcome], count)
        yield reloads
        for histograms, metric, text in (
            (t.duration, "reload_duration_seconds", "Successful rollouts' durations."),
            (t.overhead, "reload_overhead_seconds", "The supervisor's own share of each."),
        ):
            family = HistogramMetricFamily(f"{PREFIX}_{metric}", text, labels=["service"])
            for name, histogram in histograms.items():
                family.add_metric([name], histogram.buckets(), sum_value=histogram.total)
            yield family
        connections = CounterMetricFamily(
            f"{PREFIX}_retired_connections",
            "Connections retirements met: queued at cutover, migrated by the kernel, drained "
            "by the old workers, left at shutdown.",
            labels=["service", "kind"],
        )
        for name, kinds in t.connections.items():
            for kind, count in kinds.items():
                connections.add_metric([name, kind], count)
        yield connections
        for key, short in KERNEL.items():
            kernel = CounterMetricFamily(
                f"{PREFIX}_kernel_{short}",
                f"Increase of the network namespace's TcpExt:{key} over retirements.",
                labels=["service"],
            )
            for name, counters in t.kernel.items():
                kernel.add_metric([name], counters.get(key, 0))
            yield kernel
        upgrades = CounterMetricFamily(f"{PREFIX}_upgrades", "In-place upgrades.")
        upgrades.add_metric([], t.upgrades)
        yield upgrades

    def _live(self) -> Iterable[Metric]:
        restarts = CounterMetricFamily(
            f"{PREFIX}_worker_restarts", "Worker processes respawned.", labels=["service"]
        )
        workers = GaugeMetricFamily(
            f"{PREFIX}_workers",
            "Workers of the serving generation by state.",
            labels=["service", "state"],
        )
        generation = GaugeMetricFamily(
            f"{PREFIX}_generation", "The serving generation.", labels=["service"]
        )
        syns = CounterMetricFamily(
            f"{PREFIX}_listener_syns",
            "Client SYNs the eBPF program steered to each listener of the serving generation.",
            labels=["service", "generation", "worker", "address"],
        )
        not_after = GaugeMetricFamily(
            f"{PREFIX}_tls_certificate_not_after_timestamp_seconds",
            "When the served certificate expires (Unix time).",
            labels=["service", "subject"],
        )
        for name, service in self.services.items():
            current = service.current
            if current is None:
                continue
            states = {state.value: 0 for state in WorkerState}
            for slot in current.slots:
                states[slot.state.value.value] += 1
            for state, count in states.items():
                workers.add_metric([name, state], count)
            generation.add_metric([name], current.number)
            lived = sum(slot.restarts for slot in current.slots)
            restarts.add_metric([name], self.tally.restarts.get(name, 0) + lived)
            for lst in current.listeners:
                try:
                    counts = lst.counts() if lst.in_group else None
                except SupervisorError:
                    counts = None
                if counts is not None:
                    labels = [name, str(current.number), str(lst.worker), str(lst.address)]
                    syns.add_metric(labels, counts.syns)
            cert = service.certificate
            if cert is not None:
                not_after.add_metric([name, cert.subject], cert.not_after.timestamp())
        yield from (restarts, workers, generation, syns, not_after)


def render(tally: Tally, services: Mapping[str, Service]) -> str:
    """The OpenMetrics text of everything (ends with ``# EOF``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Scrape(tally, services))
    text: bytes = generate_latest(registry)  # type: ignore[no-untyped-call]
    return text.decode()
