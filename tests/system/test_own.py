"""Workers that bind their own sockets (``listen_mode = "own"``), adopted.

The worker is the demo server in its ``--bind`` mode: it binds the address
itself with SO_REUSEPORT, as nginx with ``reuseport``, ``gunicorn
--reuse-port`` or a Go server do, and gets no fds from the daemon. Each
test runs a real load; the negative controls run the same servers without
the daemon and count what they lose.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.harness import DEMO, Daemon, free_port, service_toml
from tests.support.load import Load, LoadResult
from tests.support.procs import wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.slow]
SYNC = ["--concurrency", "1", "--work", "0.004"]
RELOADS = 30
CLIENTS = 16


def own(port: int, workers: int = 4, **kwargs: Any) -> str:
    command = [*DEMO, "--bind", f"127.0.0.1:{port}", *SYNC]
    return service_toml(
        "web",
        port=port,
        workers=workers,
        command=command,
        health='kind = "http"',
        extra='listen_mode = "own"',
        **kwargs,
    )


@pytest.fixture
def adopted(
    start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None]
) -> tuple[Daemon, int]:
    migrate_req(0)  # only the eBPF program migrates
    port = free_port()
    return start_daemon(own(port), supervisor_extra='steering = "ebpf"'), port


def test_reloads_of_self_bound_workers_lose_nothing(adopted: tuple[Daemon, int]) -> None:
    daemon, port = adopted
    census = daemon.status()["services"]["web"]["census"]
    (group,) = census
    assert len(group["members"]) == 4 and all(m["ours"] for m in group["members"])
    assert {m["role"] for m in group["members"]} == {"active"}
    reports = []
    with Load(port, threads=CLIENTS, duration=240) as load:
        wait_for(load.answered, 10, "the load's first answer")
        for _ in range(RELOADS):
            reloaded = daemon.reload()
            assert reloaded.ok, reloaded.answer
            reports.append(reloaded.report())
    result = load.result
    queued = sum(r["queued_at_cutover"] for r in reports)
    migrated = sum(r["counters"]["TCPMigrateReqSuccess"] for r in reports)
    print(
        f"own: {RELOADS} reloads, {result.ok} ok, {result.failed} failed, "
        f"{queued} queued at cutover, {migrated} migrated"
    )
    assert result.failed == 0, (result.failures, result.examples)
    assert queued > 0 and migrated > 0, "the load must leave queues to migrate"
    assert all(r["path"] == "migrate" for r in reports)
    adoptions = [e for e in daemon.events if e.get("event") == "listener_adopted"]
    assert len(adoptions) == 4 * (RELOADS + 1)


def _kill_under_load(port: int, pids: Callable[[], list[int]], kills: int) -> LoadResult:
    with Load(port, threads=CLIENTS, duration=120) as load:
        wait_for(load.answered, 10, "the load's first answer")
        for _ in range(kills):
            time.sleep(0.5)
            victim = pids()[0]
            subprocess.run(["kill", "-9", str(victim)], check=True)
        time.sleep(1.0)
    return load.result


def test_kill_9_of_an_adopted_worker_loses_only_what_it_had_accepted(
    adopted: tuple[Daemon, int],
) -> None:
    """Each worker serves one connection at a time (``--concurrency 1``): a
    kill -9 can fail only that one. What waited in its queue migrates, by our
    duplicate's shutdown. Without the daemon, the same kill resets the queue."""
    daemon, port = adopted
    kills = 3
    mark = daemon.mark()
    result = _kill_under_load(port, daemon.worker_pids, kills)
    shut = daemon.events_since(mark, "orphan_listener_shut_down")
    moved = sum(e["queued"] for e in shut)
    print(f"own, {kills} kill -9: {result.ok} ok, {dict(result.failures)}, {moved} queued moved")
    assert len(shut) == kills
    assert result.failed <= kills, (result.failures, result.examples)
    assert result.ok > 500
    # The negative control: the same four servers on their own, the same kills.
    port = free_port()
    argv = [*DEMO, "--bind", f"127.0.0.1:{port}", *SYNC]
    alone = [subprocess.Popen(argv) for _ in range(4)]
    try:
        wait_for(lambda: _answers(port), 10, "the servers alone to answer")
        live = list(alone)

        def pids() -> list[int]:
            victim = live.pop(0)
            alone.append(subprocess.Popen(argv))  # restarted, as a supervisor would
            return [victim.pid]

        control = _kill_under_load(port, pids, kills)
    finally:
        for proc in alone:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    print(f"alone, {kills} kill -9: {control.ok} ok, {dict(control.failures)}")
    assert control.failed > result.failed, "the load must see the resets of a plain kill"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_a_worker_that_never_binds_is_named_and_the_old_generation_serves(
    adopted: tuple[Daemon, int],
) -> None:
    daemon, port = adopted
    sleeper = service_toml(
        "web",
        port=port,
        workers=2,
        command=[sys.executable, "-c", "import time; time.sleep(60)"],
        extra='listen_mode = "own"',
    ).replace('ready_timeout = "15s"', 'ready_timeout = "1s"')
    daemon.rewrite(sleeper)
    refused = daemon.reload()
    assert not refused.ok
    report = refused.report()
    assert report["outcome"] == "rolled_back"
    assert any(
        f"did not listen on 127.0.0.1:{port} within 1s (listen_mode = own)" in reason
        for reason in report["reasons"]
    ), report["reasons"]
    assert daemon.status()["services"]["web"]["generation"] == 1
    assert _answers(port)


def test_an_upgrade_is_refused_while_a_service_adopts(adopted: tuple[Daemon, int]) -> None:
    daemon, port = adopted
    pids = daemon.worker_pids()
    answer = daemon.upgrade().answer
    assert not answer["ok"]
    (reason,) = answer["reasons"]
    assert 'listen_mode = "own"' in reason and "systemctl restart" in reason, reason
    assert daemon.worker_pids() == pids
    assert _answers(port)
