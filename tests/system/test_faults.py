"""Worker faults under load: kill -9 in each rollout phase, workers that ignore
their stop signal or crash-loop. The old generation serves whenever the
candidate fails, and nothing is left running afterwards."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.harness import (
    DEMO,
    Background,
    Daemon,
    established_owned_by,
    free_port,
    process_gone,
    process_state,
    service_toml,
    wait_until,
)
from tests.support.load import Load, LoadResult

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def kill_frozen(pid: int, port: int) -> int:
    """SIGSTOP, count the connections ``pid`` accepted (kill -9 loses those,
    whoever supervises), SIGKILL. Returns that count."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: process_state(pid) == "T", 10, "the victim to stop")
    in_flight = established_owned_by(pid, port)
    os.kill(pid, signal.SIGKILL)
    return in_flight


def spawned(daemon: Daemon, after: int, generation: int) -> dict[str, Any]:
    return daemon.wait_event("worker_spawned", after=after, generation=generation, worker=0)


def progress(daemon: Daemon, after: int, prefix: str) -> None:
    wait_until(
        lambda: any(
            e.get("event") == "rollout_progress" and str(e.get("message")).startswith(prefix)
            for e in daemon.events[after:]
        ),
        60,
        f"rollout progress {prefix!r}",
    )


def all_gone_but_current(daemon: Daemon) -> None:
    current = set(daemon.worker_pids())
    every = {e["pid"] for e in daemon.events if e.get("event") == "worker_spawned"}
    wait_until(lambda: all(process_gone(p) for p in every - current), 30, "old workers reaped")


def lost_at_most(result: LoadResult, in_flight: int) -> None:
    assert set(result.failures) <= {"reset", "short"}, (result.failures, result.examples)
    assert result.failed <= in_flight, (result.failures, in_flight)


CANDIDATE_PHASES = {
    # the candidate worker is killed while it starts (it sleeps 3 s before READY=1)
    "starting": service_toml("web", port=0, workers=2, command=[*DEMO, "--delay", "3"]),
    # ... or while it serves but its health gate (a 3 s exec check) is still running
    "gate": service_toml(
        "web", port=0, workers=2, health='kind = "exec"\ncommand = ["sleep", "3"]'
    ),
}


@pytest.mark.parametrize("phase", sorted(CANDIDATE_PHASES))
def test_candidate_killed_rolls_back(
    phase: str, start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None]
) -> None:
    migrate_req(1)
    port = free_port()
    daemon = start_daemon(service_toml("web", port=port, workers=2))
    old = daemon.worker_pids()
    with Load(port, threads=8, duration=120, max_connections=50_000) as load:
        wait_until(load.answered, 15, "the load to be answered")
        daemon.rewrite(CANDIDATE_PHASES[phase].replace(':0"', f':{port}"'))
        mark = daemon.mark()
        reload = Background(daemon)
        victim = spawned(daemon, mark, generation=2)["pid"]
        if phase == "gate":
            wait_until(lambda: os.readlink(f"/proc/{victim}/exe") != "", 10, "the exec")
        os.kill(victim, signal.SIGKILL)
        answer = reload.result()
    assert not answer.ok
    report = answer.report()
    assert report["outcome"] == "rolled_back", report
    assert "killed by SIGKILL" in " ".join(report["reasons"]), report["reasons"]
    assert daemon.worker_pids() == old, "the old generation served throughout"
    assert load.result.failed == 0, (load.result.failures, load.result.examples)
    all_gone_but_current(daemon)


@pytest.mark.parametrize("phase", ["cutover", "retiring"])
def test_old_worker_killed_during_cutover_or_retirement(
    phase: str, start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None]
) -> None:
    migrate_req(1)
    port = free_port()
    retire = 'retire = "drain"\ndrain_timeout = "10s"' if phase == "retiring" else ""
    daemon = start_daemon(service_toml("web", port=port, workers=2, extra=retire))
    old = daemon.worker_pids()
    with Load(port, threads=8, duration=120, max_connections=50_000) as load:
        wait_until(load.answered, 15, "the load to be answered")
        mark = daemon.mark()
        reload = Background(daemon)
        progress(daemon, mark, "cutover" if phase == "cutover" else "retiring generation 1")
        in_flight = kill_frozen(old[0], port)
        answer = reload.result()
    assert answer.ok, answer.answer
    assert answer.report()["generation"] == 2
    lost_at_most(load.result, in_flight)
    all_gone_but_current(daemon)
    assert set(daemon.worker_pids()).isdisjoint(old)


def test_worker_ignoring_its_stop_signal_is_killed_after_stop_timeout(
    start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None]
) -> None:
    migrate_req(1)
    port = free_port()
    # SIGWINCH is ignored by default, and the demo does not handle it.
    deaf = 'stop_signal = "SIGWINCH"'
    daemon = start_daemon(
        service_toml("web", port=port, workers=2, extra=deaf).replace('"10s"', '"1s"')
    )
    old = daemon.worker_pids()
    with Load(port, threads=8, duration=120, max_connections=50_000) as load:
        wait_until(load.answered, 15, "the load to be answered")
        mark = daemon.mark()
        assert daemon.reload().ok
    timeouts = [e for e in daemon.events[mark:] if e.get("event") == "worker_stop_timeout"]
    assert {e["pid"] for e in timeouts} == set(old)
    assert all(e["action"] == "SIGKILL" for e in timeouts)
    assert all(process_gone(pid) for pid in old)
    assert load.result.failed == 0, (load.result.failures, load.result.examples)


def test_crash_loop_goes_fatal_and_the_others_serve(
    start_daemon: Callable[..., Daemon], tmp_path: Any
) -> None:
    port = free_port()
    flag = tmp_path / "broken"
    # Starts normally; once the flag exists, every respawn exits at once.
    command = ["sh", "-c", f'test -e {flag} && exit 3; exec "$@"', "sh", *DEMO]
    daemon = start_daemon(service_toml("web", port=port, workers=3, command=command))
    victim = daemon.worker_pids()[0]
    with Load(port, threads=8, duration=120, max_connections=50_000) as load:
        wait_until(load.answered, 15, "the load to be answered")
        flag.write_text("")
        mark = daemon.mark()
        in_flight = kill_frozen(victim, port)
        fatal = daemon.wait_event("worker_fatal", after=mark, worker=0)
        assert "exited with status 3" in fatal["reason"]
        released = daemon.wait_event("fatal_worker_listener_shut_down", after=mark, worker=0)
        status = daemon.status()["services"]["web"]
        wait_until(load.answered, 15, "the load to go on")
    died = [e for e in daemon.events[mark:] if e.get("event") == "worker_died"]
    delays = [e["respawn_in"] for e in died]
    assert delays == sorted(delays) and delays[-1] > delays[0], delays  # backoff grows
    assert status["state"] == "DEGRADED"
    assert [w["state"] for w in status["workers"]] == ["FATAL", "RUNNING", "RUNNING"]
    # Its listener was shut down: what queued there while it was frozen moved
    # to the running workers (eBPF steering migrates) instead of waiting forever.
    assert released["address"] == f"127.0.0.1:{port}"
    assert status["workers"][0]["listeners"][0]["role"] is None
    lost_at_most(load.result, in_flight)


HOLDER = [
    sys.executable,
    "-c",
    "import socket, time; s = socket.socket(fileno=3); time.sleep(600)",  # holds, never accepts
]


def test_a_worker_that_never_accepts_fails_its_tcp_gate(
    start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None]
) -> None:
    """The kernel completes a probe's handshake on the supervisor's listener by
    itself: the tcp check passes only once the worker took the connection."""
    migrate_req(1)
    port = free_port()
    tcp = 'kind = "tcp"\ntimeout = "1s"'
    daemon = start_daemon(service_toml("web", port=port, workers=2, health=tcp))
    old = daemon.worker_pids()
    hung = service_toml("web", port=port, workers=2, command=HOLDER, health=tcp)
    daemon.rewrite(hung.replace('ready_timeout = "15s"', 'ready_timeout = "3s"'))
    with Load(port, threads=8, duration=120, max_connections=50_000) as load:
        wait_until(load.answered, 15, "the load to be answered")
        answer = daemon.reload()
    assert not answer.ok
    report = answer.report()
    assert report["outcome"] == "rolled_back", report
    assert "did not accept the probe connection" in " ".join(report["reasons"]), report
    assert daemon.worker_pids() == old, "the old generation serves on"
    assert load.result.failed == 0, (load.result.failures, load.result.examples)
