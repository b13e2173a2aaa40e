"""``supervisorctl signal``, ``restart``, ``stop`` and ``start``, against a real daemon.

``signal`` reaches the workers it names and only those, by pid. ``restart``
is a rollout of the config the service runs: lossless under load, and it
neither reads nor judges the file (a broken file does not stop it, where a
reload is refused).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.support.harness import Daemon, free_port, process_gone, service_toml, wait_until
from tests.support.load import Load

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

CTL = [sys.executable, "-m", "supervisor.control.ctl"]
# A worker that says which signal it got: its stdout becomes worker_output events.
TELLING = (
    "import signal, socket, sys, time\n"
    "def told(n, _): print('got', signal.Signals(n).name, flush=True)\n"
    "signal.signal(signal.SIGHUP, told)\n"
    "signal.signal(signal.SIGUSR2, told)\n"
    "sock = socket.socket(fileno=3)\n"
    "while True: time.sleep(1)\n"
)


def ctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTL, "-s", str(daemon.control), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_signal_reaches_every_worker_or_the_one_named(
    start_daemon: Callable[..., Daemon],
) -> None:
    command = [sys.executable, "-c", TELLING]
    daemon = start_daemon(
        service_toml("web", port=free_port(), workers=3, command=command, health='kind = "none"')
    )
    pids = daemon.worker_pids()
    mark = daemon.mark()
    done = ctl(daemon, "signal", "web", "HUP")
    assert done.returncode == 0, done.stderr
    assert "web: SIGHUP sent to 3 worker(s)" in done.stdout
    for pid in pids:
        assert str(pid) in done.stdout
        daemon.wait_event("worker_output", after=mark, pid=pid, line="got SIGHUP")

    mark = daemon.mark()
    one = ctl(daemon, "signal", "web", "sigusr2", "--worker", "1")
    assert one.returncode == 0, one.stderr
    daemon.wait_event("worker_output", after=mark, pid=pids[1], line="got SIGUSR2")
    told = {e["pid"] for e in daemon.events_since(mark, "worker_output")}
    assert told == {pids[1]}, "only worker 1"
    assert daemon.worker_pids() == pids, "nobody died of it"

    unknown = ctl(daemon, "signal", "nope", "HUP")
    assert unknown.returncode == 1 and "no service named 'nope'" in unknown.stderr
    absent = ctl(daemon, "signal", "web", "HUP", "--worker", "7")
    assert absent.returncode == 1 and "no worker 7 runs" in absent.stderr
    kill = ctl(daemon, "signal", "web", "KILL")
    assert kill.returncode == 2 and "not a signal a worker can handle" in kill.stderr


def test_restart_rolls_out_the_running_config_under_load_whatever_the_file_says(
    start_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    daemon = start_daemon(service_toml("web", port=port, workers=2))
    first = set(daemon.worker_pids())
    daemon.rewrite("[services.web\nbroken = ")  # a file that would be refused
    with Load(port, threads=4, duration=120) as load:
        wait_until(load.answered, 15, "the load to be answered")
        refused = ctl(daemon, "reload", "web")
        restarted = ctl(daemon, "restart", "web", "--reason", "test")
        again = ctl(daemon, "restart")  # every service
    result = load.result
    assert refused.returncode == 1 and "config rejected" in refused.stderr
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "web: generation 2 serving; generation 1 retired" in restarted.stdout
    assert again.returncode == 0 and "web: generation 3 serving" in again.stdout
    assert not first & set(daemon.worker_pids()), "every worker is a new process"
    assert result.failed == 0, (result.failures, result.examples)
    assert result.ok > 0
    requested = [e for e in daemon.events if e.get("event") == "reload_requested"]
    assert [e["restart"] for e in requested] == [False, True, True]


def test_stop_closes_a_service_until_start_and_reloads_and_upgrades_leave_it_stopped(
    start_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    daemon = start_daemon(service_toml("web", port=port, workers=2))
    pids = daemon.worker_pids()
    stopped = ctl(daemon, "stop", "web")
    assert stopped.returncode == 0, stopped.stderr
    assert "web: stopped (generation 1); its listeners are closed" in stopped.stdout
    assert all(process_gone(pid) for pid in pids)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert ctl(daemon, "status", "web").returncode == 3, "STOPPED is not active"
    assert daemon.status()["services"]["web"]["state"] == "STOPPED"
    assert ctl(daemon, "stop", "web").stdout.strip() == "web: already stopped"

    assert daemon.reload().ok, "a reload of every service leaves it stopped"
    refused = ctl(daemon, "reload", "web")
    assert refused.returncode == 1 and "service 'web' is stopped" in refused.stderr
    assert daemon.upgrade().ok
    assert daemon.status()["services"]["web"]["state"] == "STOPPED", "the upgrade carried it"

    started = ctl(daemon, "start", "web")
    assert started.returncode == 0, started.stderr
    assert "web: started (generation 2)" in started.stdout
    web = daemon.status()["services"]["web"]
    assert (web["state"], web["generation"]) == ("RUNNING", 2)
    with Load(port, threads=2, duration=30) as load:
        wait_until(load.answered, 15, "the started service to answer")
    assert load.result.failed == 0
    unknown = ctl(daemon, "start", "nope")
    assert unknown.returncode == 1 and "no stopped service named 'nope'" in unknown.stderr
