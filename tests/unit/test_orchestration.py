"""The rollout's rules against fakes, on trio's autojump clock: unprivileged, milliseconds.

A service runs with fake processes (``FakeSpawner``) and fake steering
groups (``FakeGroups``: roles in memory, failures on demand) over real,
unprivileged listening sockets on loopback. Each test states one rule of
the rollout: coalescing, rollback, promote before retire, drain deadlines,
stop ordering, kernel errors at each step, truthful status.
"""

from __future__ import annotations

import gc
import signal
import socket
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from supervisor.config.loader import parse_config
from supervisor.config.schema import Config, ServiceConfig
from supervisor.control.requests import Reload
from supervisor.daemon.reloads import Checked, ServiceDirectory, handle_reload
from supervisor.errors import DiagError, KernelFeatureMissing
from supervisor.kernel import bpf, diag
from supervisor.plan.capabilities import Capabilities
from supervisor.reports import RolloutReport
from supervisor.serve.rollout import ValidatedConfig, ready_progress
from supervisor.serve.service import Service, ServiceEnv
from supervisor.steering import Role
from supervisor.steering.ebpf import available as ebpf_available
from tests.support.fakes import FakeGroup, FakeGroups, FakeProcess, FakeSpawner
from tests.support.harness import free_port

CAPS = Capabilities(migrate_req=1, cbpf=True, ebpf=False)


def config(port: int, **keys: str) -> ServiceConfig:
    """A service of 2 workers on ``port``; ``keys`` are TOML values that replace or add."""
    values = {
        "command": '["worker"]',
        "workers": "2",
        "listen": f'["127.0.0.1:{port}"]',
        "stop_timeout": '"5s"',
        "ready_timeout": '"10s"',
        "drain_timeout": '"3s"',
        **keys,
    }
    lines = "\n".join(f"{key} = {value}" for key, value in values.items())
    return parse_config(f"[services.web]\n{lines}\n").services["web"]


@dataclass
class Rig:
    service: Service
    spawner: FakeSpawner
    groups: FakeGroups
    port: int
    nursery: trio.Nursery
    base: dict[str, str]  # the keys the service started with

    def snapshot(self, **keys: str) -> ValidatedConfig:
        return ValidatedConfig(config(self.port, **{**self.base, **keys}))

    def group(self) -> FakeGroup:
        return next(iter(self.groups.made.values()))

    async def reload(self, **keys: str) -> RolloutReport:
        ticket = self.service.request_rollout(self.snapshot(**keys))
        await ticket.done.wait()
        assert ticket.report is not None
        return ticket.report

    def live(self, generation: int) -> list[FakeProcess]:
        return self.spawner.live(generation)

    async def next_spawn(self, generation: int) -> FakeProcess:
        """The next process spawned for ``generation``."""
        while True:
            proc = await self.spawner.spawned.receive()
            if proc.plan.generation == generation:
                return proc


@asynccontextmanager
async def running(spawner: FakeSpawner | None = None, **keys: str) -> AsyncIterator[Rig]:
    spawner = spawner or FakeSpawner()
    groups = FakeGroups()
    port = free_port()
    env = ServiceEnv(spawner, lambda: CAPS, groups)
    service = Service("web", config(port, **keys), env)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield Rig(service, spawner, groups, port, nursery, keys)
        service.request_stop()
        await service.stopped.wait()


def published(rig: Rig) -> dict[int, Role]:
    """Generation -> role, as the fake kernel steers (one role per generation)."""
    by_sock = rig.group().published
    out: dict[int, Role] = {}
    for gen in (rig.service.current, rig.service.stage.candidate, rig.service.stage.retiring):
        if gen is None:
            continue
        roles = {by_sock[lst.sock] for lst in gen.listeners if lst.sock in by_sock}
        if roles:
            out[gen.number] = roles.pop()
    return out


async def test_a_reload_starts_standby_promotes_then_retires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as rig:
        old = rig.live(1)
        at_stop: list[dict[int, Role]] = []
        for proc in old:  # what the kernel steers at the moment an old worker is told to stop
            proc.on_signal = lambda: at_stop.append(published(rig))
        ticket = rig.service.request_rollout(rig.snapshot())
        await rig.service.stage.wait_for(lambda stage: stage.candidate is not None)
        assert published(rig) == {1: Role.ACTIVE, 2: Role.STANDBY}
        await ticket.done.wait()
        report = ticket.report
        assert report is not None and report.outcome == "succeeded", report
        assert report.path == "migrate"
        # Promoted before any old worker heard of it: the new generation takes every
        # new connection; the old listeners are retiring, still in their group, so the
        # shutdown right after the stop signal migrates what they hold (a worker told
        # to stop first never sees accept() fail: nginx spins on that until it
        # handles its signal).
        assert at_stop == [{2: Role.ACTIVE, 1: Role.RETIRING}] * 2
        assert all(p.signals == [signal.SIGTERM] for p in old)
        assert [p.plan.generation for p in rig.spawner.live()] == [2, 2]
        assert rig.service.current is not None and rig.service.current.number == 2


async def test_a_retired_generation_is_released_not_kept_by_its_successor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Nothing of the serving generation holds the one it replaced: its slots,
    listeners and tasks' frames are freed at the reload, not at the next one."""
    async with running() as rig:
        assert rig.service.current is not None
        first = weakref.ref(rig.service.current)
        report = await rig.reload()
        assert report.outcome == "succeeded", report
        gc.collect()
        assert first() is None, "generation 1 is still referenced"


async def test_workers_ready_lines_come_at_most_every_quarter_second_and_at_the_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    said: list[str] = []
    ready = ready_progress(said.append)
    for k in range(1, 64):
        ready(k, 100)
    await trio.sleep(0.3)
    for k in range(64, 101):
        ready(k, 100)
    assert said == ["workers ready 1/100", "workers ready 64/100", "workers ready 100/100"]


async def test_requests_during_a_rollout_coalesce_into_one_with_the_newest_config(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as rig:
        first = rig.service.request_rollout(rig.snapshot())
        await trio.sleep(0.1)  # the first rollout is under way (its gate settles 0.5 s)
        waiting = [rig.service.request_rollout(rig.snapshot(workers=str(n))) for n in (3, 4)]
        for ticket in (first, *waiting):
            await ticket.done.wait()
        assert first.report is not None and first.report.generation == 2
        reports = [t.report for t in waiting]
        assert all(r is not None and r.ok and r.generation == 3 for r in reports), reports
        assert len(rig.live(3)) == 4, "the follow-up rolled out the newest snapshot"
        spawned = {p.plan.generation for p in rig.spawner.processes}
        assert spawned == {1, 2, 3}, "three requests, two rollouts"


async def test_a_candidate_that_dies_before_ready_rolls_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as rig:
        old = rig.live(1)
        ticket = rig.service.request_rollout(rig.snapshot())
        for _ in range(2):
            (await rig.next_spawn(2)).exit(3)
        await ticket.done.wait()
        report = ticket.report
        assert report is not None and report.outcome == "rolled_back"
        assert "exited with status 3 before it was ready" in " ".join(report.reasons)
        assert rig.live(1) == old and all(not p.signals for p in old)
        assert published(rig) == {1: Role.ACTIVE}
        assert len(rig.group().members) == 2, "the candidate's listeners left the group"


@pytest.mark.parametrize("fails", ["join", "apply"])
async def test_a_steering_failure_before_the_cutover_rolls_back(
    autojump_clock: trio.testing.MockClock, fails: str
) -> None:
    async with running() as rig:
        old = rig.live(1)
        rig.groups.arm(fails)
        report = await rig.reload()
        assert report.outcome == "rolled_back", report
        assert "injected" in " ".join(report.reasons)
        assert rig.live(1) == old and all(not p.signals for p in old)
        assert published(rig) == {1: Role.ACTIVE}
        assert (await rig.reload()).ok, "the next reload works"


async def test_a_failed_cutover_restores_the_roles_and_rolls_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as rig:
        old = rig.live(1)
        ticket = rig.service.request_rollout(rig.snapshot())
        await trio.sleep(0.2)  # the candidate is open (standby) and settling
        rig.group().fail["apply"] = 1  # the cutover's publication fails once
        await ticket.done.wait()
        report = ticket.report
        assert report is not None and report.outcome == "rolled_back", report
        assert "cutover failed" in " ".join(report.reasons)
        assert published(rig) == {1: Role.ACTIVE}
        assert rig.live(2) == [], "the candidate was stopped"
        assert rig.live(1) == old and all(not p.signals for p in old)
        assert rig.service.current is not None and rig.service.current.number == 1


@pytest.mark.parametrize("fails", ["shutdown", "counts", "refuse"])
async def test_kernel_failures_while_retiring_are_reported_not_raised(
    autojump_clock: trio.testing.MockClock, fails: str
) -> None:
    # Changed settings: drain, and migrations refused, so every retirement step runs.
    async with running() as rig:
        old = rig.live(1)
        ticket = rig.service.request_rollout(rig.snapshot(socket="{ rcvbuf = 262144 }"))
        await rig.service.stage.wait_for(lambda stage: stage.retiring is not None)
        rig.groups.arm(fails, times=100)
        await ticket.done.wait()
        report = ticket.report
        assert report is not None and report.outcome == "succeeded", report
        assert report.path == "drain"
        assert any("injected" in problem for problem in report.problems), report.problems
        assert all(p.returncode is not None for p in old), "the old workers stopped"
        assert published(rig) == {2: Role.ACTIVE}


async def test_a_drain_ends_at_its_deadline_and_counts_what_is_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(retire='"drain"') as rig:
        # A connection queued on an old listener that no old worker accepts.
        client = socket.create_connection(("127.0.0.1", rig.port))
        try:
            start = trio.current_time()
            report = await rig.reload()
            assert report.ok and report.path == "drain"
            assert report.drain_timed_out
            assert report.queued_at_cutover == 1
            assert report.left_at_shutdown == 1
            assert 3.0 <= report.timings["drain"] < 3.1
            assert trio.current_time() - start >= 3.0
        finally:
            client.close()


async def test_a_drain_without_sock_diag_midway_falls_back_to_the_grace(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    def flaky(address: object) -> frozenset[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return frozenset({42})  # a handshake pending at cutover...
        raise DiagError("sock_diag dump", OSError(24, "Too many open files"))

    monkeypatch.setattr(diag, "pending_handshakes", flaky)
    async with running(retire='"drain"') as rig:
        report = await rig.reload()
        assert report.ok, report
        assert report.handshakes_at_cutover == 1
        assert any("handshakes while draining" in p for p in report.problems), report.problems
        assert 1.2 <= report.timings["drain"] < 1.3, "waited out the handshake grace"


async def test_status_shows_both_generations_during_a_rollout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    spawner = FakeSpawner(ignores=frozenset({signal.SIGTERM}))  # old workers retire slowly
    async with running(spawner) as rig:
        ticket = rig.service.request_rollout(rig.snapshot())
        await trio.sleep(0.1)
        starting = rig.service.snapshot()
        assert starting.state == "RELOADING" and starting.generation == 1
        assert starting.candidate == 2
        assert [(w.generation, w.state) for w in starting.workers] == [
            (1, "RUNNING"),
            (1, "RUNNING"),
            (2, "STARTING"),
            (2, "STARTING"),
        ]
        await rig.service.stage.wait_for(lambda stage: stage.retiring is not None)
        await trio.sleep(1)
        retiring = rig.service.snapshot()
        assert retiring.state == "RELOADING" and retiring.generation == 2
        assert retiring.retiring == 1 and retiring.candidate is None
        assert [(w.generation, w.state) for w in retiring.workers] == [
            (2, "RUNNING"),
            (2, "RUNNING"),
            (1, "RETIRING"),
            (1, "RETIRING"),
        ]
        await ticket.done.wait()  # stop_timeout later, SIGKILL
        done = rig.service.snapshot()
        assert done.state == "RUNNING" and done.retiring is None
        assert [w.generation for w in done.workers] == [2, 2]


async def test_preflight_and_exec_checks_run_as_the_service(
    autojump_clock: trio.testing.MockClock,
) -> None:
    spawner = FakeSpawner()
    spawner.commands["check-config"] = 0
    async with running(spawner) as rig:
        report = await rig.reload(
            preflight='["check-config", "{generation}"]',
            health='{ kind = "exec", command = ["probe", "{worker}"] }',
        )
        assert report.ok, report
        assert ("web[0]@2", ("check-config", "2")) in spawner.ran
        assert {("web[0]@2", ("probe", "0")), ("web[1]@2", ("probe", "1"))} <= set(spawner.ran)
        spawner.commands["check-config"] = 1
        rejected = await rig.reload(preflight='["check-config"]')
        assert rejected.outcome == "rejected"
        assert "exited with status 1" in rejected.reasons[0]
        assert "check-config said 1" in rejected.reasons[0]


async def test_a_steering_failure_while_a_worker_respawns_keeps_the_service(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as rig:
        rig.groups.arm("apply", times=2)  # out of rotation, and back in: both fail
        victim = rig.live(1)[0]
        count = len(rig.spawner.processes)
        victim.exit(-signal.SIGKILL)
        await trio.sleep(0.2)  # the respawn comes 0.1 s later
        respawned = rig.spawner.processes[count]
        await trio.sleep(1)
        assert respawned.returncode is None
        assert rig.service.state().value == "RUNNING"
        assert (await rig.reload()).ok


async def test_stop_signals_workers_then_releases_listeners(
    autojump_clock: trio.testing.MockClock,
) -> None:
    spawner = FakeSpawner(ignores=frozenset({signal.SIGTERM}))
    order: list[str] = []
    async with running(spawner) as rig:
        group = rig.group()
        workers = rig.live(1)
        real_shutdown = group.shutdown

        def shutdown(sock: socket.socket) -> None:
            order.append(f"shutdown with {len(rig.live(1))} workers alive")
            real_shutdown(sock)

        group.shutdown = shutdown  # type: ignore[method-assign]
        start = trio.current_time()
        rig.service.request_stop()
        await rig.service.stopped.wait()
        assert all(p.signals == [signal.SIGTERM, signal.SIGKILL] for p in workers)
        assert order == ["shutdown with 0 workers alive"] * 2
        assert 5.0 <= trio.current_time() - start < 6.0, "SIGKILL after stop_timeout"
        assert group.closed


async def test_a_reload_reads_and_checks_the_file_once_and_rolls_out_what_it_checked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as rig:
        reads: list[int] = []
        first = Config(services={"web": config(rig.port, workers="3")})

        def load() -> Checked:
            reads.append(1)
            return Checked(first, CAPS)

        directory = _one_service(rig, load, first)
        answer = (await handle_reload(directory, Reload(source="test"))).answer
        assert answer["ok"], answer
        assert reads == [1], "one read and check for the whole reload"
        assert len(rig.live(2)) == 3, "the rollout ran the config that was checked"


async def test_a_reload_decides_with_the_capabilities_its_check_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The check saw no migration (tcp_migrate_req=0); by the time the rollout
    plans, the host says 1. The reload retires as what it checked said: one
    reading per reload, not one for the check and another for the plan."""
    async with running() as rig:
        checked = Config(services={"web": config(rig.port, workers="2")})
        no_migration = Capabilities(migrate_req=0, cbpf=True, ebpf=False)
        directory = _one_service(rig, lambda: Checked(checked, no_migration), checked)
        answer = (await handle_reload(directory, Reload(source="test"))).answer
        assert answer["ok"], answer
        report = answer["services"]["web"]
        assert report["path"] == "drain", report
        assert "tcp_migrate_req=0" in report["path_reason"], report


def _one_service(rig: Rig, load: Callable[[], Checked], running: Config) -> ServiceDirectory:
    """A daemon of one service, "web", running ``running``; ``load`` reads its file."""
    return ServiceDirectory(
        services={"web": rig.service},
        load=load,
        current=lambda: running,
        start=_never_start,
        stop=_never_stop,
        stopped=dict,
    )


async def _never_start(name: str, config: Config) -> None:
    raise AssertionError(f"no service is added here ({name})")


async def _never_stop(name: str) -> None:
    raise AssertionError(f"no service is removed here ({name})")


def test_an_unknown_architecture_gets_no_ebpf(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bpf() syscall number is per architecture: elsewhere, fail closed."""
    monkeypatch.setattr(bpf, "_NR_BPF", None)
    with pytest.raises(KernelFeatureMissing, match="syscall number"):
        bpf.Map(bpf.MAP_TYPE_ARRAY, 4, 4, 1, "probe")
    assert not ebpf_available()


@pytest.mark.parametrize("where", ["retire", "counters"])
async def test_a_bug_after_the_cutover_retires_the_old_generation_all_the_same(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # A bug (not an operating failure, which is translated) raised once the new
    # generation serves: once reported as rolled_back, with the old workers
    # left running, unseen by status, one more set at every reload.
    def bug(*_args: object, **_kwargs: object) -> None:
        raise ValueError("a bug")

    if where == "retire":
        monkeypatch.setattr("supervisor.serve.rollout.retire", bug)
    else:
        monkeypatch.setattr("supervisor.serve.rollout.netstat.delta", bug)
    async with running() as rig:
        old = rig.live(1)
        report = await rig.reload()
        assert report.outcome == "succeeded", report
        assert any("internal error" in p and "ValueError('a bug')" in p for p in report.problems)
        assert all(p.returncode is not None for p in old), "the old workers stopped"
        assert [p.plan.generation for p in rig.spawner.live()] == [2, 2]
        assert rig.service.current is not None and rig.service.current.number == 2
        report = await rig.reload()
        assert report.outcome == "succeeded"
        assert [p.plan.generation for p in rig.spawner.live()] == [3, 3]
