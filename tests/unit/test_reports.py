"""The answers of reload and upgrade are one model at both ends of the wire:
what the daemon sends, supervisorctl reads back field for field, and an
answer it cannot read is named, not a traceback."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from supervisor.control import ctl
from supervisor.reports import Adopted, RolloutReport, UpgradeResult, reports_of


def _full_report() -> RolloutReport:
    return RolloutReport(
        service="web", outcome="succeeded", generation=4, previous=3, duration=0.74,
        path="migrate", path_reason="eBPF", steering="ebpf", queued_at_cutover=12,
        handshakes_at_cutover=2, listeners_at_cutover=[{"address": "127.0.0.1:80", "queued": 3}],
        drained=0, left_at_shutdown=5, datagrams_left=None, drain_timed_out=False,
        unmovable=["x"], notes=["n"], problems=["p"], counters={"TCPMigrateReqSuccess": 5},
        reasons=[], reason="deploy 42", timings={"overhead": 0.01, "cpu": 0.02},
    )  # fmt: skip


def test_a_reload_answer_reads_back_as_the_reports_it_was_made_of() -> None:
    report = _full_report()
    wire = json.loads(json.dumps({"services": {"web": report.model_dump()}}))
    assert wire["services"]["web"]["ok"] is True, "ok is on the wire for scripts"
    assert reports_of(wire) == {"web": report}
    lines = ctl.describe_report(reports_of(wire)["web"])
    assert lines[0] == "web: generation 4 serving; generation 3 retired by migrate in 0.740 s"
    assert "  kernel: TCPMigrateReqSuccess +5" in lines


def test_keys_of_another_version_are_ignored_and_a_missing_one_is_an_error() -> None:
    newer = {"services": {"web": {"outcome": "rolled_back", "reasons": ["r"], "new": 1}}}
    (report,) = reports_of(newer).values()
    assert (report.ok, report.reasons) == (False, ["r"])
    with pytest.raises(ValueError, match="outcome"):
        reports_of({"services": {"web": {"generation": 2}}})


def test_an_upgrade_result_keeps_from_and_to_on_the_wire() -> None:
    result = UpgradeResult(
        from_version="0.1.0", to_version="0.2.0", pid=7, duration=0.8,
        adopted=Adopted(services=1, listeners=4, workers=4), restarted=1, problems=["q"],
    )  # fmt: skip
    wire = json.loads(json.dumps(result.wire()))
    assert (wire["from"], wire["to"]) == ("0.1.0", "0.2.0")
    assert UpgradeResult.model_validate(wire) == result
    assert ctl.describe_upgrade(result)[0].startswith("upgraded 0.1.0 -> 0.2.0 in place (pid 7)")


def test_supervisorctl_names_an_answer_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daemon (of another version, say) whose upgrade answer lacks a field."""
    path = tmp_path / "control.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            result = {"type": "result", "ok": True, "upgrade": {"from": "0.0.9", "pid": 1}}
            conn.sendall(json.dumps(result).encode() + b"\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    with pytest.raises(SystemExit) as exited:
        ctl.main(["-s", str(path), "upgrade"])
    thread.join(10)
    server.close()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "cannot read the daemon's answer (to: Field required)" in err, err
    assert "Traceback" not in err
