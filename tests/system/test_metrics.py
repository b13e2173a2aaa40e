"""Metrics: the OpenMetrics text, the opt-in HTTP endpoint, scraped by a real Prometheus.

Debian's prometheus server runs in the test's network namespace, scraping
the daemon's ``metrics_listen`` every second; PromQL queries (the dashboard's
among them) must answer with what the daemon did.

This file: the parts with real processes; the rest is in
tests/unit/test_metrics.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.observe.metrics import PREFIX
from tests.support.harness import DAEMON, Daemon, free_port, open_fd_count, service_toml, wait_until

CTL = [sys.executable, "-m", "supervisor.control.ctl"]


DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana-dashboard.json"


@pytest.mark.kernel
@pytest.mark.slow
def test_metrics_over_the_control_socket_and_http(start_daemon: Callable[..., Daemon]) -> None:
    port, metrics = free_port(), free_port()
    daemon = start_daemon(
        service_toml("web", port=port, workers=2),
        supervisor_extra=f'metrics_listen = "127.0.0.1:{metrics}"',
    )
    before = _get(f"http://127.0.0.1:{metrics}/metrics")
    for outcome in ("succeeded", "rejected", "rolled_back", "cancelled"):
        # There before the first reload, so rate() sees the first increment.
        assert f'{PREFIX}_reloads_total{{outcome="{outcome}",service="web"}} 0.0' in before
    assert daemon.reload().ok
    # Prometheus' text format 0.0.4 by default: what node_exporter's textfile
    # collector reads (it refuses OpenMetrics' info type), and any scraper.
    text = _ctl_metrics(daemon)
    assert not text.endswith("# EOF\n")
    assert f"# TYPE {PREFIX}_build_info gauge" in text
    assert f'{PREFIX}_reloads_total{{outcome="succeeded",service="web"}} 1.0' in text
    assert f'{PREFIX}_workers{{service="web",state="RUNNING"}} 2.0' in text
    assert f'{PREFIX}_generation{{service="web"}} 2.0' in text
    assert f'{PREFIX}_last_reload_successful{{service="web"}} 1.0' in text
    succeeded_at = _value(text, f'{PREFIX}_last_reload_success_timestamp_seconds{{service="web"}}')
    assert abs(succeeded_at - time.time()) < 60
    for worker in (0, 1):
        labels = f'address="127.0.0.1:{port}",service="web",worker="{worker}"'
        assert f"{PREFIX}_listener_backlog{{{labels}}} 1024.0" in text
        assert f"{PREFIX}_listener_queued{{{labels}}} " in text
    # The daemon's own process metrics; under our prefix here, where
    # node_exporter's textfile collector would refuse its own names.
    assert _value(text, f"{PREFIX}_process_resident_memory_bytes") > 10e6
    assert "\nprocess_open_fds " not in text
    daemon.rewrite("[services.web\n")
    assert not daemon.reload().ok
    failed = _ctl_metrics(daemon)
    assert f'{PREFIX}_last_reload_successful{{service="web"}} 0.0' in failed
    assert (
        _value(failed, f'{PREFIX}_last_reload_success_timestamp_seconds{{service="web"}}')
        == succeeded_at
    )
    assert _ctl_metrics(daemon, "--openmetrics").endswith("# EOF\n")
    url = f"http://127.0.0.1:{metrics}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        plain = answer.read().decode()
    assert not plain.endswith("# EOF\n")
    assert _value(plain, "process_open_fds") > 3, "the standard names over HTTP"
    assert _value(plain, "process_start_time_seconds") > 1e9
    # Content negotiation, as Prometheus asks by default.
    asks = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    asked = urllib.request.Request(url, headers={"Accept": asks})
    with urllib.request.urlopen(asked, timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
        served = answer.read().decode()
    assert f"{PREFIX}_build_info" in served and served.endswith("# EOF\n")
    assert daemon.upgrade().ok
    after = _get(f"http://127.0.0.1:{metrics}/metrics")
    assert f'{PREFIX}_reloads_total{{outcome="succeeded",service="web"}} 1.0' in after, (
        "counters survive an upgrade, and so does the endpoint"
    )
    assert f"{PREFIX}_upgrades_total 1.0" in after


def _value(text: str, series: str) -> float:
    """The value of the sample ``series`` (name and labels, as written) in ``text``."""
    for line in text.splitlines():
        if line.startswith(f"{series} "):
            return float(line.split()[-1])
    raise AssertionError(f"no {series} in:\n{text}")


def _ctl_metrics(daemon: Daemon, *options: str) -> str:
    done = subprocess.run(
        [*CTL, "-s", str(daemon.control), "metrics", *options],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return str(answer.read().decode())


class Prometheus:
    """Debian's prometheus, scraping ``target`` every second; ended by pid."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            for job, target in targets.items()
        )
        config.write_text(
            f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}"
        )
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir}/tsdb",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("w"),
        )  # fmt: skip
        wait_until(self._ready, 60, "prometheus to be ready")

    def _ready(self) -> bool:
        try:
            return "Ready" in _get(f"http://127.0.0.1:{self.port}/-/ready")
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        answer = json.loads(_get(url))
        assert answer["status"] == "success", (expr, answer)
        return list(answer["data"]["result"])

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def equals(self, expr: str, value: float) -> Callable[[], bool]:
        """A condition for ``wait_until``: ``expr`` evaluates to ``value``."""
        return lambda: self.value(expr) == value

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class AcceptRelay:
    """A relay in front of an HTTP endpoint that replaces each request's
    ``Accept`` header and records the ``Content-Type`` of each answer. One
    request per connection (it asks the endpoint to close after it)."""

    def __init__(self, upstream: str, accept: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.accept = accept
        self.answered: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> AcceptRelay:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        self.thread.join(10)

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            with client:
                client.settimeout(10)
                with contextlib.suppress(OSError):  # the scrape fails; Prometheus's up says so
                    self._relay(client)

    def _relay(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        kept = [
            line for line in lines[1:] if not line.lower().startswith((b"accept:", b"connection:"))
        ]
        request = [lines[0], *kept, b"Accept: " + self.accept.encode(), b"Connection: close"]
        with socket.create_connection(self.upstream, timeout=10) as upstream:
            upstream.sendall(b"\r\n".join(request) + b"\r\n\r\n")
            answer = b""
            while chunk := upstream.recv(65536):
                answer += chunk
        for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            if line.lower().startswith(b"content-type:"):
                self.answered.append(line.split(b":", 1)[1].strip().decode())
        client.sendall(answer)


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """``start(job=target, ...)``: a prometheus scraping each target as its job."""
    if shutil.which("prometheus") is None:
        pytest.skip("needs Debian's prometheus")
    started: list[Prometheus] = []

    def start(**targets: str) -> Prometheus:
        server = Prometheus(tmp_path, targets)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def _dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    # As Grafana would send them with every variable at "All".
    return [
        re.sub(r"\$(job|instance|service)\b", ".*", e).replace("$__rate_interval", "1m")
        for e in exprs
    ]


@pytest.mark.kernel
@pytest.mark.slow
def test_a_real_prometheus_scrapes_it_and_the_dashboard_queries_answer(
    start_daemon: Callable[..., Daemon], prometheus_for: Callable[..., Prometheus]
) -> None:
    """Two jobs scrape the same endpoint: as Prometheus asks (it prefers
    OpenMetrics), and through a relay that asks for the text format 0.0.4
    only, as a Prometheus configured for it (or any other scraper) does."""
    port, metrics = free_port(), free_port()
    daemon = start_daemon(
        service_toml("web", port=port, workers=2),
        supervisor_extra=f'metrics_listen = "127.0.0.1:{metrics}"\nsteering = "ebpf"',
    )
    with AcceptRelay(f"127.0.0.1:{metrics}", "text/plain;version=0.0.4") as relay:
        server = prometheus_for(supervisor=f"127.0.0.1:{metrics}", plain=relay.address)
        for job in ("supervisor", "plain"):
            wait_until(server.equals(f'up{{job="{job}"}}', 1.0), 60, f"{job}'s first scrape")
        for _ in range(3):
            assert daemon.reload().ok
        for job in ("supervisor", "plain"):
            total = f'sum({PREFIX}_reloads_total{{job="{job}",outcome="succeeded"}})'
            wait_until(server.equals(total, 3.0), 60, f"{job}: a scrape after the reloads")
        assert "text/plain; version=0.0.4; charset=utf-8" in relay.answered
        assert not any(kind.startswith("application/openmetrics") for kind in relay.answered)
        plain_fds = server.value('process_open_fds{job="plain"}')
        assert plain_fds is not None and plain_fds > 3, "the standard process_* names too"
    assert server.value(f'{PREFIX}_generation{{job="supervisor"}}') == 4.0
    assert (server.value(f'sum(rate({PREFIX}_reloads_total{{job="supervisor"}}[1m]))') or 0) > 0
    p99 = server.value(
        "histogram_quantile(0.99, sum by (le) "
        f'({PREFIX}_reload_duration_seconds_bucket{{job="supervisor"}}))'
    )
    assert p99 is not None and 0 < p99 <= 5.0
    for expr in _dashboard_queries():
        server.query(expr)  # valid PromQL over these metric names (asserted in query)
    series = server.query('{__name__=~"reuseport_supervisor_.+"}')
    names = {s["metric"]["__name__"] for s in series}
    no_tls_here = {f"{PREFIX}_tls_certificate_not_after_timestamp_seconds"}
    for expr in _dashboard_queries():
        used = set(re.findall(rf"{PREFIX}_[a-z_]+", expr))
        assert used <= names | no_tls_here, (expr, used - names)


IDLE_FLOOD = 300


@pytest.mark.kernel
@pytest.mark.slow
def test_a_flood_of_idle_metrics_connections_costs_neither_control_nor_workers(
    start_daemon: Callable[..., Daemon],
) -> None:
    # Anyone on the host may connect to metrics_listen. 300 idle connections
    # once took a daemon to its fd limit: the control socket could not accept,
    # and a worker killed meanwhile went FATAL (EMFILE) and stayed so.
    metrics = free_port()
    daemon = start_daemon(
        service_toml("web", port=free_port(), workers=2),
        supervisor_extra=f'metrics_listen = "127.0.0.1:{metrics}"',
        entry=["prlimit", "--nofile=96:96", *DAEMON],  # the flood would pass it
    )
    before = open_fd_count(daemon.proc.pid)
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE_FLOOD):
            conn = socket.socket()
            conn.setblocking(False)  # past the backlog a SYN waits: the flood need not
            conn.connect_ex(("127.0.0.1", metrics))
            idle.append(conn)
        wait_until(lambda: open_fd_count(daemon.proc.pid) >= before + 16, 10, "the cap to fill")
        during = open_fd_count(daemon.proc.pid)
        began = time.monotonic()
        status = daemon.status()
        assert time.monotonic() - began < 1, "status answers at once during the flood"
        victim = status["services"]["web"]["workers"][0]["pid"]
        mark = daemon.mark()
        os.kill(victim, signal.SIGKILL)
        daemon.wait_event("worker_running", after=mark)
        states = [w["state"] for w in daemon.status()["services"]["web"]["workers"]]
        assert states == ["RUNNING", "RUNNING"], states
    finally:
        for conn in idle:
            conn.close()
    print(f"daemon fds: {before} before, {during} during {IDLE_FLOOD} idle connections")
    assert during <= before + 16 + 4, "at most MAX_CLIENTS connections are held"
    assert daemon.terminate() == 0


@pytest.mark.kernel
@pytest.mark.slow
def test_node_exporter_textfile_collector_and_promtool_read_it(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    exporter = shutil.which("prometheus-node-exporter")
    promtool = shutil.which("promtool")
    if exporter is None or promtool is None:
        pytest.skip("needs Debian's prometheus-node-exporter and prometheus (promtool)")
    daemon = start_daemon(service_toml("web", port=free_port(), workers=1))
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    port = free_port()
    node = subprocess.Popen(
        [exporter, "--collector.disable-defaults", "--collector.textfile",
         f"--collector.textfile.directory={textfiles}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        scraped: dict[str, str] = {}
        for name, options in (("openmetrics", ("--openmetrics",)), ("default", ())):
            for old in textfiles.iterdir():
                old.unlink()
            text = _ctl_metrics(daemon, *options)
            (textfiles / "supervisor.prom").write_text(text)
            wait_until(lambda: _ready(port), 30, "node_exporter to answer")
            scraped[name] = _get(f"http://127.0.0.1:{port}/metrics")
            checked = subprocess.run(
                [promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                timeout=60,
            )  # fmt: skip
            if name == "default":
                assert checked.returncode == 0, checked.stdout + checked.stderr
    finally:
        node.terminate()
        node.wait(30)
    # The negative control: OpenMetrics' info type is refused, and nothing arrives.
    assert "node_textfile_scrape_error 1" in scraped["openmetrics"]
    assert "node_textfile_scrape_error 0" in scraped["default"]
    assert f'{PREFIX}_workers{{service="web",state="RUNNING"}} 1' in scraped["default"]
    assert f'{PREFIX}_build_info{{version="' in scraped["default"]
    # Ours under the prefix, beside node_exporter's own process_* (a clash
    # would be dropped from the scrape with a gathering error).
    assert f"\n{PREFIX}_process_open_fds " in scraped["default"]


def _ready(port: int) -> bool:
    try:
        return bool(_get(f"http://127.0.0.1:{port}/metrics"))
    except OSError:
        return False
