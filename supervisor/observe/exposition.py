"""The metrics text of ``metrics.Tally`` and the live services, made with
``prometheus_client``: Prometheus' text format 0.0.4 (what node_exporter's
textfile collector and every scraper read), or OpenMetrics 1.0.0 on request.
Imported at the first scrape, not with the daemon: prometheus_client costs
some 12 MB of RSS a daemon without a scraper never needs (``Daemon.metrics_text``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, get_args

from prometheus_client import ProcessCollector
from prometheus_client import exposition as text_format
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.openmetrics import exposition as openmetrics_format
from prometheus_client.registry import Collector, CollectorRegistry

from supervisor import __version__
from supervisor.errors import SupervisorError
from supervisor.observe.metrics import KERNEL, PREFIX, Format, Tally
from supervisor.reports import Outcome
from supervisor.serve.lifecycle import WorkerState

if TYPE_CHECKING:
    from supervisor.serve.service import Service


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
        # Every outcome of every service, 0 until it first happens: a series that
        # appears only at its first increment hides that increment from rate().
        for name in {**dict.fromkeys(self.services), **dict.fromkeys(t.reloads)}:
            outcomes = t.reloads.get(name, {})
            for outcome in {**dict.fromkeys(get_args(Outcome)), **dict.fromkeys(outcomes)}:
                reloads.add_metric([name, outcome], outcomes.get(outcome, 0))
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
        successful = GaugeMetricFamily(
            f"{PREFIX}_last_reload_successful",
            "0 if the service's last rollout was rejected or rolled back (its old "
            "generation serves on), else 1.",
            labels=["service"],
        )
        success_at = GaugeMetricFamily(
            f"{PREFIX}_last_reload_success_timestamp_seconds",
            "When the service's last rollout succeeded (Unix time); absent before one has.",
            labels=["service"],
        )
        for name in self.services:
            successful.add_metric([name], 0 if t.last_failed.get(name) else 1)
            if name in t.last_success:
                success_at.add_metric([name], t.last_success[name])
        yield successful
        yield success_at

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
        # No generation label: each reload would make a new set of series. A
        # reload's new listeners start from 0, which rate() reads as a reset.
        syns = CounterMetricFamily(
            f"{PREFIX}_listener_syns",
            "Client SYNs the eBPF program steered to each listener of the serving generation.",
            labels=["service", "worker", "address"],
        )
        queued = GaugeMetricFamily(
            f"{PREFIX}_listener_queued",
            "Connections waiting in each TCP listener's accept queue (serving generation).",
            labels=["service", "worker", "address"],
        )
        backlog = GaugeMetricFamily(
            f"{PREFIX}_listener_backlog",
            "Each TCP listener's accept queue limit (the backlog, capped by somaxconn).",
            labels=["service", "worker", "address"],
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
                labels = [name, str(lst.worker), str(lst.address)]
                try:
                    counts = lst.counts() if lst.in_group else None
                except SupervisorError:
                    counts = None
                if counts is not None:
                    syns.add_metric(labels, counts.syns)
                depth = lst.status()
                if depth.queued is not None and depth.backlog is not None:
                    queued.add_metric(labels, depth.queued)
                    backlog.add_metric(labels, depth.backlog)
            cert = service.certificate
            if cert is not None:
                not_after.add_metric([name, cert.subject], cert.not_after.timestamp())
        yield from (restarts, workers, generation, syns, queued, backlog, not_after)


def render(
    tally: Tally,
    services: Mapping[str, Service],
    form: Format = "prometheus",
    *,
    textfile: bool = False,
) -> str:
    """The text of everything, in ``form`` (OpenMetrics ends with ``# EOF``),
    with the daemon's own process_* metrics (``Daemon.metrics_text``: ``textfile``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Scrape(tally, services))
    ProcessCollector(namespace=PREFIX if textfile else "", registry=registry)
    module = openmetrics_format if form == "openmetrics" else text_format
    text: bytes = module.generate_latest(registry)
    return text.decode()
