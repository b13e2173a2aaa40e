"""Metrics without a daemon: the tally and its histograms, the dashboard's
selectors, and the shipped alert rules under ``promtool test rules``
(tests/system/test_metrics.py scrapes a running daemon)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from supervisor.observe.metrics import Histogram, Tally
from supervisor.reports import RolloutReport

DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana-dashboard.json"


def test_the_tally_counts_rollouts_and_comes_back_from_an_export() -> None:
    tally = Tally()
    ok = RolloutReport(
        service="web", outcome="succeeded", generation=2, previous=1, duration=0.3,
        queued_at_cutover=5, drained=2, left_at_shutdown=3,
        counters={"TCPMigrateReqSuccess": 3}, timings={"overhead": 0.02},
    )  # fmt: skip
    tally.rollout(ok, retired_restarts=4)
    tally.rollout(RolloutReport(service="web", outcome="rolled_back", generation=3, previous=2))
    again = Tally.restore(json.loads(json.dumps(tally.export())))
    assert again == tally
    assert again.reloads == {"web": {"succeeded": 1, "rolled_back": 1}}
    assert again.connections["web"] == {"queued": 5, "migrated": 3, "drained": 2, "left": 3}
    assert again.restarts == {"web": 4}
    assert again.duration["web"].buckets()[3] == ("0.5", 1)  # 0.3 s: in the 0.5 bucket
    assert Tally.restore({"reloads": "nonsense"}) == Tally(), "a bad export starts anew"


def test_histogram_buckets_are_cumulative() -> None:
    histogram = Histogram((1.0, 2.0))
    for value in (0.5, 1.5, 1.5, 9.0):
        histogram.observe(value)
    assert histogram.buckets() == [("1.0", 1), ("2.0", 3), ("+Inf", 4)]
    assert histogram.total == 12.5


def test_the_dashboard_selects_by_job_and_instance_and_rates_by_the_scrape_interval() -> None:
    board = json.loads(DASHBOARD.read_text())
    variables = [v["name"] for v in board["templating"]["list"]]
    assert variables == ["datasource", "job", "instance", "service"]
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for selector in re.findall(r"reuseport_supervisor_\w+(\{[^}]*\})?", expr):
                assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, expr
            assert not re.search(r"rate\([^)]*\[\d+[smh]\]\)", expr), f"a fixed rate window: {expr}"


def test_the_shipped_alert_rules_pass_promtool_and_their_own_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("needs Debian's prometheus (promtool)")
    root = Path(__file__).resolve().parents[2]
    checked = subprocess.run(
        [promtool, "check", "rules", str(root / "config" / "prometheus-alerts.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts-test.yml"],
        cwd=root / "tests" / "support" / "prometheus", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr
