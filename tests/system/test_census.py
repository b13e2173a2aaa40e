"""The census of a service's listen addresses, and the reload it refuses.

A stranger (a process of our uid that is not the daemon's) joins the
reuseport group of a serving service: ``supervisorctl census`` names it by
pid and command with the setting it has unlike ours, a reload is refused
with the same words and the old generation serves on, and a load running
all along loses nothing (under eBPF steering the stranger, which never
accepts, receives no connection). Once it is gone the census is clean and
the reload goes through: no false refusal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.support.harness import DEMO, Daemon, free_port, service_toml
from tests.support.load import Load
from tests.support.stranger import stranger

pytestmark = [pytest.mark.kernel, pytest.mark.slow]
CTL = [sys.executable, "-m", "supervisor.control.ctl"]


def census(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTL, "-s", str(daemon.control), "census", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_stranger_in_the_group_is_named_and_refuses_the_reload(
    start_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    daemon = start_daemon(service_toml("web", port=port, workers=2, command=DEMO))
    clean = census(daemon, "web")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "2 member(s), 0 not ours" in clean.stdout
    with (
        Load(port, threads=4, duration=60) as load,
        stranger("127.0.0.1", port, defer_accept=5) as proc,
    ):
        shown = census(daemon, "web")
        assert shown.returncode == 1, shown.stdout + shown.stderr
        assert "3 member(s), 1 not ours" in shown.stdout
        assert f"NOT OURS: pid {proc.pid} (python" in shown.stdout
        assert "defer_accept" in shown.stdout and "(ours 0)" in shown.stdout
        as_json = json.loads(census(daemon, "web", "--json").stdout)
        (group,) = as_json["web"]
        (theirs,) = [m for m in group["members"] if not m["ours"]]
        assert [h.split(" (")[0] for h in theirs["holders"]] == [f"pid {proc.pid}"]
        assert theirs["settings"]["defer_accept"] > 0
        refused = daemon.reload()
        assert not refused.ok
        report = refused.report()
        assert report["outcome"] == "rejected"
        (reason,) = report["reasons"]
        assert f"pid {proc.pid}" in reason and "defer_accept" in reason, reason
        assert daemon.status()["services"]["web"]["generation"] == 1
        assert load.answered()
    result = load.result
    print(f"census refusal under load: {result.ok} ok, {result.failed} failed")
    assert result.failed == 0, (result.failures, result.examples)
    assert result.ok > 100
    again = daemon.reload()
    assert again.ok, again.answer
    assert again.report()["generation"] == 2
    after = census(daemon, "web")
    assert after.returncode == 0 and "2 member(s), 0 not ours" in after.stdout, after.stdout


def test_a_more_specific_neighbour_refuses_a_wildcard_service_and_a_wildcard_does_not(
    start_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    wildcard = service_toml("web", port=port, workers=1, command=DEMO, host="0.0.0.0")
    daemon = start_daemon(wildcard)
    with stranger("127.0.0.2", port) as proc:
        shown = census(daemon)
        assert shown.returncode == 1
        assert "neighbour on 127.0.0.2: inode" in shown.stdout
        refused = daemon.reload()
        assert not refused.ok
        (reason,) = refused.report()["reasons"]
        assert "more specific than our wildcard" in reason and str(proc.pid) in reason
    assert daemon.reload().ok
    port = free_port()
    specific = start_daemon(service_toml("web", port=port, workers=1, command=DEMO))
    with stranger("0.0.0.0", port):
        shown = census(specific)
        assert shown.returncode == 0, shown.stdout
        assert "1 member(s), 0 not ours, 1 neighbour(s)" in shown.stdout
        assert specific.reload().ok


# A worker that binds the service's address itself, beside the listener it was given.
SELF_BINDING = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
time.sleep(600)
"""


def test_a_worker_that_binds_its_own_socket_is_named_as_ours(
    start_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    command = [sys.executable, "-c", SELF_BINDING, str(port)]
    service = service_toml(
        "web", port=port, workers=1, command=command, health='kind = "none"\nsettle = "0.3s"'
    )
    daemon = start_daemon(service)
    (pid,) = daemon.worker_pids()
    refused = daemon.reload()
    assert not refused.ok
    (reason,) = refused.report()["reasons"]
    assert f"pid {pid}" in reason, reason
    assert "bound by worker 0 of generation 1 itself" in reason, reason
