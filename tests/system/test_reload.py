"""Zero-downtime reload under load, in the private network namespace.

The workers are sync-style demo workers (one connection at a time, 2 ms of
work per request) and the client runs more concurrent connections than
there are worker slots, so every old listener has connections queued at
cutover: the tests exercise the kernel's migration (or the drain), not an
idle hand-over. Each test checks that it did (migration counters, queue
depth at cutover), and a negative control shows the same load counts the
losses of a naive restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.harness import (
    DEMO,
    Background,
    Daemon,
    free_port,
    listening_sockets,
    process_gone,
    service_toml,
    wait_until,
)
from tests.support.load import ConnectLoad, DatagramLoad, Load, LoadResult

pytestmark = [pytest.mark.kernel, pytest.mark.slow]
SYNC_DEMO = [*DEMO, "--concurrency", "1", "--work", "0.002"]
CLIENTS = 16
RELOADS = 20


def web(port: int, workers: int = 4, **kwargs: object) -> str:
    return service_toml("web", port=port, workers=workers, command=SYNC_DEMO, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def migrating(
    start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None]
) -> tuple[Daemon, int]:
    """A daemon with 4 sync-style demo workers, migration on: (daemon, port)."""
    migrate_req(1)
    port = free_port()
    return start_daemon(web(port)), port


def check_answers(daemon: Daemon, result: LoadResult) -> None:
    """Every connection was answered by the generation whose listener accepted it."""
    cookies = daemon.cookies_by_generation()
    for body in result.bodies:
        assert int(body["listener"]) in cookies[int(body["generation"])], body


def reload_many(daemon: Daemon, count: int, path: str) -> list[dict[str, Any]]:
    reports = []
    for _ in range(count):
        before = daemon.status()["services"]["web"]
        old_pids = [w["pid"] for w in before["workers"]]
        reloaded = daemon.reload()
        assert reloaded.ok, reloaded.answer
        report = reloaded.report()
        assert report["path"] == path
        assert report["generation"] == before["generation"] + 1
        after = daemon.status()["services"]["web"]
        assert after["generation"] == report["generation"]
        assert {w["generation"] for w in after["workers"]} == {report["generation"]}
        assert all(process_gone(pid) for pid in old_pids), "old workers are gone"
        reports.append(report)
    return reports


@pytest.mark.parametrize(
    ("steering", "sysctl"),
    [("ebpf", 0), ("cbpf", 1)],
    ids=["ebpf-program-migrates-sysctl-off", "cbpf-sysctl-on"],
)
def test_twenty_reloads_by_migration_lose_nothing(
    start_daemon: Callable[..., Daemon],
    migrate_req: Callable[[int], None],
    steering: str,
    sysctl: int,
) -> None:
    migrate_req(sysctl)
    port = free_port()
    # An http gate: its probes are pinned to each candidate listener while standby.
    service = web(port, health='kind = "http"')
    daemon = start_daemon(service, supervisor_extra=f'steering = "{steering}"')
    assert daemon.status()["services"]["web"]["steering"] == steering
    with Load(port, threads=CLIENTS, duration=240) as load:
        reports = reload_many(daemon, RELOADS, "migrate")
    result = load.result
    assert result.failed == 0, (result.failures, result.examples)
    assert result.ok > 1000
    migrated = sum(r["counters"]["TCPMigrateReqSuccess"] for r in reports)
    queued = sum(r["queued_at_cutover"] for r in reports)
    print(f"migrate/{steering}: {result.ok} ok, {queued} queued at cutover, {migrated} migrated")
    assert queued > 0, "the load must leave queues for the kernel to migrate"
    assert migrated > 0
    assert all(r["counters"]["TCPMigrateReqFailure"] == 0 for r in reports)
    check_answers(daemon, result)
    if steering == "ebpf":
        assert daemon.terminate() == 0
        _migrations_only_to_active(daemon)


def _migrations_only_to_active(daemon: Daemon) -> None:
    """Per-listener eBPF counters: migrated requests landed on listeners that
    were active, never on one while it was retiring."""
    left = [e for e in daemon.events if e.get("event") == "steering_member_left"]
    retired = [e for e in left if e["migrations_while_retiring"] is not None]
    assert len(retired) == 4 * RELOADS, "every old listener was retired"
    assert sum(e["migrations_in"] for e in left) > 0
    assert [e for e in retired if e["migrations_while_retiring"]] == []
    # Every listener of every generation passed its gate by a probe pinned to it.
    assert sum(1 for e in left if e["probes"] > 0) == 4 * (RELOADS + 1)
    print(f"SYNs while retiring (steered away): {sum(e['syns_while_retiring'] for e in retired)}")


@pytest.mark.parametrize("steering", ["ebpf", "cbpf"])
def test_twenty_reloads_by_drain_lose_nothing(
    start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None], steering: str
) -> None:
    migrate_req(0)
    port = free_port()
    daemon = start_daemon(
        web(port, extra='retire = "drain"'), supervisor_extra=f'steering = "{steering}"'
    )
    assert daemon.status()["services"]["web"]["retire"] == "drain"
    with Load(port, threads=CLIENTS, duration=300) as load:
        reports = reload_many(daemon, RELOADS, "drain")
    result = load.result
    assert result.failed == 0, (result.failures, result.examples)
    assert sum(r["queued_at_cutover"] for r in reports) > 0
    assert all(r["left_at_shutdown"] == 0 and not r["drain_timed_out"] for r in reports)
    check_answers(daemon, result)


@pytest.mark.parametrize("steering", ["ebpf", "cbpf"])
def test_twenty_reloads_of_a_udp_service_answer_every_datagram_once(
    start_daemon: Callable[..., Daemon], steering: str
) -> None:
    port = free_port()
    service = web(port).replace(f'"127.0.0.1:{port}"', f'"udp://127.0.0.1:{port}"')
    daemon = start_daemon(service, supervisor_extra=f'steering = "{steering}"')
    with DatagramLoad(port, threads=CLIENTS, duration=240) as load:
        for _ in range(RELOADS):
            reloaded = daemon.reload()
            assert reloaded.ok, reloaded.answer
            assert reloaded.report()["datagrams_left"] == 0
    result = load.result
    print(f"udp/{steering}: {result.sent} sent, {result.answered} answered")
    assert result.lost == [] and result.duplicates == 0, (result.lost[:10], result.duplicates)
    assert result.answered == result.sent > 1000
    assert len(result.generations) > RELOADS / 2, "the load crossed the reloads"


async def test_negative_control_a_naive_restart_loses_connections(
    migrate_req: Callable[[int], None],
) -> None:
    """The same load against hand-rolled SO_REUSEPORT restarts (start new,
    stop old, close its listener; no migration, no steering) counts failures:
    the load can see a loss."""
    import trio  # noqa: PLC0415  (only this test drives processes from trio)

    from supervisor.kernel.notify import NotifyReceiver  # noqa: PLC0415
    from supervisor.kernel.proc import spawn  # noqa: PLC0415
    from supervisor.kernel.sockets import ListenerOptions, open_listener  # noqa: PLC0415
    from supervisor.values import parse_listen  # noqa: PLC0415

    migrate_req(0)
    port = free_port()
    address = parse_listen(f"127.0.0.1:{port}")

    async def start() -> tuple[object, object]:
        sock = open_listener(address, ListenerOptions())
        with NotifyReceiver("naive") as notify:
            env = {**os.environ, "LISTEN_FDS": "1", "NOTIFY_SOCKET": notify.address}
            proc = spawn(SYNC_DEMO, env=env, fds=[sock.fileno()])
            with trio.fail_after(30):
                await notify.receive()
        return sock, proc

    old = [await start() for _ in range(4)]
    load = Load(port, threads=CLIENTS, duration=120)
    with load:
        for _ in range(RELOADS):
            new = [await start() for _ in range(4)]
            # Let the new workers settle (like supervisord's startsecs): a
            # listener joins its group before its worker accepts, and would
            # hoard the clients meanwhile.
            await trio.sleep(0.2)
            for _sock, proc in old:
                proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
            for sock, proc in old:
                with trio.fail_after(30):
                    await proc.wait()  # type: ignore[attr-defined]
                proc.close()  # type: ignore[attr-defined]
                sock.close()  # type: ignore[attr-defined]  # its last reference: queue reset
            old = new
    for sock, proc in old:
        sock.close()  # type: ignore[attr-defined]
        await proc.aclose()  # type: ignore[attr-defined]
    print(f"naive restarts: {load.result.ok} ok, failures {dict(load.result.failures)}")
    assert load.result.failed > 0, "a naive restart must lose queued connections"
    assert set(load.result.failures) <= {"reset", "short", "refused"}, load.result.failures


def test_rollbacks_keep_the_old_generation_serving(migrating: tuple[Daemon, int]) -> None:
    daemon, port = migrating
    pids = daemon.worker_pids()
    with Load(port, threads=CLIENTS, duration=240) as load:
        # 1. the new command exits at once
        daemon.rewrite(service_toml("web", port=port, command=["false"]))
        failed = daemon.reload()
        assert not failed.ok
        report = failed.report()
        assert report["outcome"] == "rolled_back"
        assert "exited with status 1 before it was ready" in " ".join(report["reasons"])
        # 2. the new workers never become healthy: the gate times out
        slow = [*DEMO, "--delay", "60"]
        daemon.rewrite(service_toml("web", port=port, command=slow).replace('"15s"', '"2s"'))
        mark = daemon.mark()
        unhealthy = daemon.reload()
        report = unhealthy.report()
        assert report["outcome"] == "rolled_back"
        assert "health check notify failed: not ready after 2s" in " ".join(report["reasons"])
        assert daemon.wait_event("generation_listening", after=mark)["role"] == "standby"
        # 3. a bad config file
        daemon.rewrite("[services.web\n")
        bad = daemon.reload()
        assert bad.answer["error"] == "config rejected"
        assert "TOML syntax" in " ".join(bad.answer["reasons"])
        # 4. a failing preflight, through the real CLI: exit 1 and the output
        daemon.rewrite(
            web(port, extra='preflight = ["sh", "-c", "echo nginx: bad directive; exit 3"]')
        )
        cli = subprocess.run(
            [sys.executable, "-m", "supervisor.control.ctl", "-s", str(daemon.control), "reload"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 1
        assert "exited with status 3" in cli.stdout + cli.stderr
        assert "nginx: bad directive" in cli.stdout + cli.stderr
        assert daemon.worker_pids() == pids, "the old generation served throughout"
    assert load.result.failed == 0, (load.result.failures, load.result.examples)
    assert load.result.ok > 200
    status = daemon.status()["services"]["web"]
    # Two candidates were attempted (1 and 2): the generation counter moved on.
    assert status["generation"] == 1
    assert status["last_rollout"]["outcome"] == "rejected"
    daemon.rewrite(web(port))
    assert daemon.reload().report()["generation"] == 4


@pytest.mark.parametrize("steering", ["ebpf", "cbpf"])
def test_a_candidate_failing_its_gate_never_gets_a_connection(
    start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None], steering: str
) -> None:
    migrate_req(1)
    port = free_port()
    daemon = start_daemon(web(port), supervisor_extra=f'steering = "{steering}"')
    # Candidates that never accept: any connection steered to them would sit
    # in their accept queue, which the status of their listeners would show.
    daemon.rewrite(
        service_toml("web", port=port, command=[*DEMO, "--delay", "60"]).replace('"15s"', '"3s"')
    )
    queued: list[int] = []
    with Load(port, threads=CLIENTS, duration=120) as load:
        mark = daemon.mark()
        reload = Background(daemon)
        listening = daemon.wait_event("generation_listening", after=mark)
        candidate = {lst["cookie"] for lst in listening["listeners"]}
        while reload.running():
            queued.extend(_queued_on(port, candidate))
            time.sleep(0.05)
    assert queued, "the candidate's listeners were observed"
    assert max(queued) == 0, "no connection was steered to a standby candidate"
    assert load.result.failed == 0, load.result.failures
    assert reload.result().report()["outcome"] == "rolled_back"
    if steering == "ebpf":
        # The program's own counters: no client SYN reached a candidate listener.
        left = [
            e
            for e in daemon.events[mark:]
            if e.get("event") == "steering_member_left" and e["cookie"] in candidate
        ]
        assert len(left) == 4
        assert all(e["syns"] == 0 and e["migrations_in"] == 0 for e in left), left


def _queued_on(port: int, cookies: set[int]) -> list[int]:
    """Recv-Q (accept queue) of the listeners with these SO_COOKIEs, from ss."""
    out = subprocess.run(
        ["ss", "-Htlne", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        cookie = next((int(f[3:], 16) for f in fields if f.startswith("sk:")), None)
        if cookie in cookies:
            found.append(int(fields[1]))
    return found


@pytest.mark.parametrize("steering", ["ebpf", "cbpf"])
def test_changed_listener_settings_retire_by_drain(
    start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None], steering: str
) -> None:
    """Migration between listeners with different settings is refused: such a
    reload drains, says why, and still loses nothing."""
    migrate_req(1)
    port = free_port()
    daemon = start_daemon(web(port), supervisor_extra=f'steering = "{steering}"')
    bigger = web(port, extra='socket = { rcvbuf = 262144, defer_accept = "1s" }')
    paths = []
    with Load(port, threads=CLIENTS, duration=120) as load:
        for services in (bigger, bigger, web(port)):
            daemon.rewrite(services)
            reloaded = daemon.reload()
            assert reloaded.ok, reloaded.answer
            report = reloaded.report()
            paths.append((report["path"], report["path_reason"]))
            if report["path"] == "drain":
                assert report["left_at_shutdown"] == 0 and not report["drain_timed_out"], report
    assert load.result.failed == 0, (load.result.failures, load.result.examples)
    assert [path for path, _ in paths] == ["drain", "migrate", "drain"]
    assert "rcvbuf unset -> 262144" in paths[0][1] and "defer_accept unset -> 1s" in paths[0][1]
    assert "rcvbuf 262144 -> unset" in paths[2][1]
    check_answers(daemon, load.result)


def test_concurrent_requests_coalesce(migrating: tuple[Daemon, int]) -> None:
    daemon, _port = migrating
    mark = daemon.mark()
    reloads = [Background(daemon) for _ in range(6)]
    daemon.proc.send_signal(signal.SIGHUP)
    assert all(reload.result().ok for reload in reloads)

    def kinds_now() -> list[str]:
        wanted = ("rollout_started", "rollout_finished")
        return [e["event"] for e in daemon.events[mark:] if e.get("event") in wanted]

    # The SIGHUP may have queued a rollout that none of the six callers waits on.
    wait_until(lambda: len(kinds_now()) % 2 == 0, 120, "the queued rollout to finish")
    kinds = kinds_now()
    # Never two at once, and seven requests made at most three rollouts.
    assert kinds == ["rollout_started", "rollout_finished"] * (len(kinds) // 2)
    assert 1 <= len(kinds) // 2 <= 3
    assert daemon.status()["services"]["web"]["generation"] == 1 + len(kinds) // 2


def test_changed_shape_adds_and_removes_addresses(
    start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None]
) -> None:
    migrate_req(1)
    port, extra = free_port(), free_port()
    daemon = start_daemon(web(port, workers=2))
    with Load(port, threads=CLIENTS, duration=120) as load:
        daemon.rewrite(
            web(port, workers=3).replace(
                f'listen = ["127.0.0.1:{port}"]',
                f'listen = ["127.0.0.1:{port}", "127.0.0.1:{extra}"]',
            )
        )
        grown = daemon.reload()
        assert grown.ok, grown.answer
        assert len(listening_sockets(extra)) == 3
        assert len(daemon.status()["services"]["web"]["workers"]) == 3
        daemon.rewrite(web(port, workers=2))
        shrunk = daemon.reload()
        assert shrunk.ok, shrunk.answer
        assert listening_sockets(extra) == []
        assert len(listening_sockets(port)) == 2
    assert load.result.failed == 0, (load.result.failures, load.result.examples)


def test_seed_reproducer_restart_loop_shows_no_reset(
    start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None]
) -> None:
    """tcp_sink restarted in a loop under tcp_sink_client load, with the
    supervisor doing the restarts: no connect sees a reset."""
    migrate_req(1)
    port = free_port()
    daemon = start_daemon(web(port, workers=1))
    with ConnectLoad(port, threads=8, duration=120) as load:
        for _ in range(15):
            assert daemon.reload().ok
    assert load.result.failed == 0, (load.result.failures, load.result.examples)
    assert load.result.ok > 1000


def test_seed_reproducer_listeners_added_one_by_one(
    start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None]
) -> None:
    migrate_req(1)
    port = free_port()
    daemon = start_daemon(web(port, workers=1))
    with ConnectLoad(port, threads=8, duration=120) as load:
        for workers in range(2, 7):
            daemon.rewrite(web(port, workers=workers))
            assert daemon.reload().ok
            assert len(listening_sockets(port)) == workers
    assert load.result.failed == 0, (load.result.failures, load.result.examples)


def test_migrate_without_migration_is_a_config_error(
    start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None]
) -> None:
    """Classic BPF cannot migrate by itself: without the sysctl, migrate is refused."""
    migrate_req(0)
    port = free_port()
    cbpf = 'steering = "cbpf"'
    daemon = start_daemon(
        web(port, extra='retire = "migrate"'), wait_ready=False, supervisor_extra=cbpf
    )
    assert daemon.proc.wait(60) == 2
    assert "services.web.retire: migrate needs eBPF steering (CAP_BPF) or net.ipv4." in "\n".join(
        daemon.raw
    )
    # A running daemon rejects a reload that asks for it, and keeps serving.
    running = start_daemon(web(port), supervisor_extra=cbpf)
    running.rewrite(web(port, extra='retire = "migrate"'))
    answer = running.reload()
    assert answer.answer["error"] == "config rejected"
    assert running.status()["services"]["web"]["generation"] == 1


def test_reload_all_starts_new_and_stops_removed_services(
    start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None]
) -> None:
    migrate_req(1)
    port, api_port = free_port(), free_port()
    daemon = start_daemon(web(port, workers=2))
    api = service_toml("api", port=api_port, workers=1, command=SYNC_DEMO)
    daemon.rewrite(web(port, workers=2) + api)
    added = daemon.reload()
    assert added.ok, added.answer
    assert added.report("api")["outcome"] == "started"
    assert added.report("web")["outcome"] == "succeeded"
    assert len(listening_sockets(api_port)) == 1
    daemon.rewrite(api)
    removed = daemon.reload()
    assert removed.report("web")["outcome"] == "stopped"
    assert listening_sockets(port) == []
    assert set(daemon.status()["services"]) == {"api"}
