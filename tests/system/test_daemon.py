"""The daemon with real demo workers, in the private network namespace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable

import pytest

from tests.support.harness import (
    DEMO,
    Daemon,
    established_owned_by,
    free_port,
    listening_sockets,
    process_gone,
    process_state,
    service_toml,
    wait_until,
)
from tests.support.load import Load, one_request

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def test_four_workers_each_on_own_listener_share_the_load(
    start_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    daemon = start_daemon(service_toml("web", port=port, workers=4))
    status = daemon.status()["services"]["web"]
    assert status["state"] == "RUNNING"
    assert status["generation"] == 1
    workers = status["workers"]
    assert [w["index"] for w in workers] == [0, 1, 2, 3]
    assert all(w["state"] == "RUNNING" and w["pid"] for w in workers)
    cookies = {w["listeners"][0]["cookie"] for w in workers}
    assert len(cookies) == 4, "each worker has its own listener"
    # The kernel sees four listening sockets on the one port: one group.
    assert len(listening_sockets(port)) == 4

    bodies = [one_request("127.0.0.1", port) for _ in range(400)]
    by_worker = Counter(b["worker"] for b in bodies)
    assert set(by_worker) == {"0", "1", "2", "3"}, by_worker
    # Reuseport hashes connections over the group: no worker is starved.
    assert min(by_worker.values()) >= 40, by_worker
    for body in bodies:
        worker = workers[int(body["worker"])]
        assert body["pid"] == str(worker["pid"])
        assert body["listener"] == str(worker["listeners"][0]["cookie"])
        assert body["generation"] == "1"
        assert body["service"] == "web"


def test_killed_worker_respawns_on_same_listener_and_serves_its_queue(
    start_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    # The respawned demo waits 1 s before accepting, so connections made while
    # worker 0 is down are certain to sit in its listener's accept queue.
    command = [sys.executable, "-m", "supervisor.demo", "--delay", "1"]
    daemon = start_daemon(service_toml("web", port=port, workers=4, command=command))
    before = daemon.status()["services"]["web"]["workers"][0]
    victim, cookie = before["pid"], before["listeners"][0]["cookie"]

    with Load(port, threads=4, duration=60, max_connections=20_000) as load:
        wait_until(lambda: load.served_by(victim), 10, "the load to reach worker 0")
        mark = daemon.mark()
        # Freeze the victim, count the connections it has accepted and not
        # finished (kill -9 loses those, whoever supervises), then kill it.
        os.kill(victim, signal.SIGSTOP)
        wait_until(lambda: process_state(victim) == "T", 10, "the victim to stop")
        in_flight = established_owned_by(victim, port)
        os.kill(victim, signal.SIGKILL)
        died = daemon.wait_event("worker_died", after=mark, worker=0)
        assert died["exit"] == "killed by SIGKILL"
        spawned = daemon.wait_event("worker_spawned", after=mark, worker=0)
        # Its listener leaves rotation while the new process starts (the demo
        # sleeps 1 s before READY=1): it keeps its queue and takes no new SYNs.
        out = daemon.wait_event("worker_steered", after=mark, worker=0)
        assert out["role"] == "out of rotation"
        down = daemon.status()["services"]["web"]["workers"][0]
        assert down["state"] != "RUNNING", "the respawn outran the test; raise --delay"
        assert down["listeners"][0]["role"] == "standby"
        # While the new process sleeps, its listener (the same socket) queues.
        wait_until(
            lambda: (
                (daemon.status()["services"]["web"]["workers"][0]["listeners"][0]["queued"] or 0)
                > 0
            ),
            timeout=10,
            what="connections queued on worker 0's listener while it is down",
        )
        daemon.wait_event("worker_running", after=mark, worker=0)
        back = daemon.wait_event("worker_steered", after=mark, role="in rotation", worker=0)
        assert back["state"] == "RUNNING"
        after = daemon.status()["services"]["web"]["workers"][0]
        wait_until(lambda: load.served_by(spawned["pid"]), 15, "the respawned worker to serve")
    result = load.result

    assert after["pid"] == spawned["pid"] != victim
    assert after["restarts"] == 1
    assert after["listeners"][0]["cookie"] == cookie, "respawned on the same listener"
    assert after["listeners"][0]["role"] == "active", "back in rotation"
    # Only the victim's own accepted connections may fail (RST, or FIN when it
    # had already read the request); nothing queued may.
    assert set(result.failures) <= {"reset", "short"}, (result.failures, result.examples)
    assert result.failed <= in_flight, (result.failures, in_flight)
    # While worker 0 is down every client thread ends up waiting in its queue,
    # so the volume varies; the load ran if it completed a few requests.
    assert result.ok >= 10
    queued_then_served = [b for b in result.bodies if b.get("pid") == str(spawned["pid"])]
    assert queued_then_served
    assert all(b["listener"] == str(cookie) for b in queued_then_served)


def test_sigterm_leaves_no_process_listener_or_socket_file(
    start_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    daemon = start_daemon(service_toml("web", port=port, workers=3))
    pids = daemon.worker_pids()
    daemon_fds = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
    assert daemon_fds > 3
    assert daemon.terminate() == 0
    for pid in pids:
        assert process_gone(pid), f"worker {pid} survived the daemon"
    assert listening_sockets(port) == []
    assert not daemon.control.exists()
    stopped = [e for e in daemon.events if e.get("event") == "worker_stopped"]
    assert sorted(e["pid"] for e in stopped) == sorted(pids)
    assert all(e["exit"] == "exited with status 0" for e in stopped), stopped


def test_workers_die_with_a_killed_daemon(start_daemon: Callable[..., Daemon]) -> None:
    port = free_port()
    daemon = start_daemon(service_toml("web", port=port, workers=2))
    pids = daemon.worker_pids()
    daemon.kill()
    wait_until(lambda: all(process_gone(p) for p in pids), 10, "orphaned workers to die")
    assert listening_sockets(port) == []


def test_supervisorctl_status_and_shutdown(start_daemon: Callable[..., Daemon]) -> None:
    port = free_port()
    daemon = start_daemon(service_toml("web", port=port, workers=2))
    ctl = [sys.executable, "-m", "supervisor.control.ctl", "-s", str(daemon.control)]
    text = subprocess.run([*ctl, "status"], capture_output=True, text=True, timeout=30)
    assert text.returncode == 0, text.stderr
    assert "web: RUNNING  generation 1" in text.stdout
    assert text.stdout.count("RUNNING") == 3
    as_json = subprocess.run([*ctl, "status", "--json"], capture_output=True, text=True, timeout=30)
    data = json.loads(as_json.stdout)
    web = data["services"]["web"]
    assert {"generation", "state", "retire", "steering", "workers"} <= set(web)
    assert {"index", "pid", "state", "generation", "restarts"} <= set(web["workers"][0])
    unknown = subprocess.run([*ctl, "status", "nope"], capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 1
    assert "no service named 'nope'" in unknown.stderr
    down = subprocess.run([*ctl, "shutdown"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert "all services stopped" in down.stdout
    assert daemon.proc.wait(30) == 0


def test_reload_report_splits_the_workers_time_from_the_supervisors(
    start_daemon: Callable[..., Daemon],
) -> None:
    """Workers that take 0.4 s to start and ignore their stop signal (killed
    after 0.5 s): the report puts that time in workers_start and workers_stop,
    not in the supervisor's overhead, and its laps add up to the duration."""
    port = free_port()
    daemon = start_daemon(
        service_toml(
            "web",
            port=port,
            workers=2,
            command=[*DEMO, "--delay", "0.4"],
            extra='stop_signal = "SIGWINCH"\nstop_timeout = "0.5s"',
        ).replace('stop_timeout = "10s"\n', "")
    )
    reloaded = daemon.reload()
    assert reloaded.ok, reloaded.answer
    report = reloaded.report()
    timings, duration = report["timings"], report["duration"]
    assert set(timings) == {
        "validate", "start", "workers_start", "cutover", "retire", "drain", "workers_stop",
        "overhead", "cpu", "waiting_for_cpu",
    }  # fmt: skip
    assert timings["workers_start"] >= 0.4
    assert timings["start"] >= timings["workers_start"]
    assert timings["workers_stop"] >= 0.5
    assert timings["retire"] >= timings["workers_stop"]
    laps = sum(timings[k] for k in ("validate", "start", "cutover", "retire"))
    assert abs(laps - duration) < 0.01, (laps, duration)
    assert timings["overhead"] <= duration - 0.9
    # The supervisor thread ran, or waited to run, for part of the reload at most.
    assert timings["cpu"] > 0
    assert timings["waiting_for_cpu"] >= 0
    assert timings["cpu"] + timings["waiting_for_cpu"] <= duration + 0.01


def test_the_daemon_loads_prometheus_and_cryptography_only_when_used() -> None:
    # 12 and 9 MB of RSS that a daemon without a scraper or a [tls] service never needs.
    code = (
        "import sys, supervisor.daemon.daemon, supervisor.daemon.startup\n"
        "print(sorted(m for m in ('prometheus_client', 'cryptography') if m in sys.modules))\n"
        "from supervisor.observe import exposition, metrics\n"
        "exposition.render(metrics.Tally(), {}, 'prometheus')\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split("\n")[:2] == ["[]", "True"]
