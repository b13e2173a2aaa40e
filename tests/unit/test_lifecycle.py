"""Worker lifecycle logic against fake processes, on trio's autojump clock."""

from __future__ import annotations

import itertools
import signal

import pytest
import trio
import trio.testing

from supervisor.config.loader import parse_config
from supervisor.config.schema import HealthNone, HealthNotify
from supervisor.errors import HealthCheckFailed, SpawnError, TransitionError
from supervisor.plan.plan import RestartPolicy, SlotSettings, plan_worker
from supervisor.serve.lifecycle import (
    Watched,
    WorkerState,
    check_transition,
)
from supervisor.serve.worker import WorkerSlot
from tests.support.fakes import FakeSpawner

S = WorkerState
SERVICE = parse_config('[services.web]\ncommand = ["x"]\nlisten = ["127.0.0.1:8080"]\n').services[
    "web"
]


def make_slot(spawner: FakeSpawner, **settings: object) -> WorkerSlot:
    defaults: dict[str, object] = {
        "health": HealthNone(),  # settles 0.5 s
        "ready_timeout": 10.0,
        "stop_timeout": 5.0,
    }
    defaults.update(settings)
    return WorkerSlot(plan_worker("web", SERVICE, 1, 0), [7], SlotSettings(**defaults), spawner)  # type: ignore[arg-type]


def test_transition_table() -> None:
    check_transition(S.STARTING, S.RUNNING)
    check_transition(S.RUNNING, S.BACKOFF)
    check_transition(S.BACKOFF, S.STARTING)
    check_transition(S.STOPPING, S.EXITED)
    for old, new in [(S.EXITED, S.STARTING), (S.FATAL, S.STARTING), (S.RUNNING, S.STARTING)]:
        with pytest.raises(TransitionError):
            check_transition(old, new)


def test_restart_policy() -> None:
    policy = RestartPolicy()
    assert [policy.delay(n) for n in range(7)] == [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
    assert policy.delay(20) == 5.0
    assert policy.is_short(reached_running=False, lifetime=100)
    assert policy.is_short(reached_running=True, lifetime=1)
    assert not policy.is_short(reached_running=True, lifetime=6)
    assert not policy.gives_up(4)
    assert policy.gives_up(5)


async def test_watched_wakes_waiters_on_change() -> None:
    value = Watched(1)
    seen = []

    async def waiter() -> None:
        seen.append(await value.wait_for(lambda v: v >= 3))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        value.set(2)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []
        value.set(3)
    assert seen == [3]


def test_watched_observer_sees_every_value_set_while_inside() -> None:
    value = Watched("a")
    seen: list[str] = []
    with value.observing(seen.append):
        value.set("b")
        value.set("b")  # no change: no call
        value.set("c")
    value.set("d")  # after the block: not observed
    assert seen == ["b", "c"]


async def test_start_respawn_and_stop(autojump_clock: trio.testing.MockClock) -> None:
    spawner = FakeSpawner()
    slot = make_slot(spawner)
    async with trio.open_nursery() as nursery:
        await nursery.start(slot.run)
        assert slot.state.value is S.RUNNING
        first = spawner.processes[0]
        assert slot.pid == first.pid
        await trio.sleep(60)  # a long, stable run
        first.exit(-signal.SIGKILL)
        second = await spawner.spawned.receive()
        second = await spawner.spawned.receive() if second is first else second
        await slot.state.wait_for(lambda s: s is S.RUNNING)
        assert slot.restarts == 1
        assert slot.last_exit == "killed by SIGKILL"
        assert slot.pid == second.pid
        slot.request_stop()
    assert slot.state.value.value == "EXITED"
    assert second.signals == [signal.SIGTERM]
    assert all(p.closed for p in spawner.processes)


async def test_crash_loop_goes_fatal_with_backoff(autojump_clock: trio.testing.MockClock) -> None:
    spawner = FakeSpawner()
    slot = make_slot(spawner)
    spawn_times = []
    async with trio.open_nursery() as nursery:
        await nursery.start(slot.run)
        proc = await spawner.spawned.receive()
        while True:
            spawn_times.append(trio.current_time())
            proc.exit(1)  # dies at once: every run is short
            with trio.move_on_after(100):
                proc = await spawner.spawned.receive()
                continue
            break
        assert slot.state.value is S.FATAL
        slot.request_stop()
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(spawn_times)]
    # Each process dies before its check passes: respawns wait only the backoff.
    assert gaps == [0.1, 0.2, 0.4, 0.8]
    assert len(spawner.processes) == 5
    assert slot.restarts == 4


async def test_first_process_dying_fails_the_start(autojump_clock: trio.testing.MockClock) -> None:
    spawner = FakeSpawner()
    slot = make_slot(spawner)

    async def exit_soon() -> None:
        proc = await spawner.spawned.receive()
        proc.exit(3)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(exit_soon)
        with pytest.raises(SpawnError, match=r"web\[0\]@1: cannot start: exited with status 3"):
            await nursery.start(slot.run)
    assert slot.state.value is S.FATAL
    assert len(spawner.processes) == 1, "no retry before the first RUNNING"


async def test_health_timeout_kills_and_fails(autojump_clock: trio.testing.MockClock) -> None:
    spawner = FakeSpawner()
    slot = make_slot(spawner, health=HealthNotify(kind="notify"), ready_timeout=3.0)
    async with trio.open_nursery() as nursery:
        with pytest.raises(HealthCheckFailed, match="not ready after 3s: no READY=1"):
            await nursery.start(slot.run)
    assert spawner.processes[0].signals == [signal.SIGKILL]
    assert trio.current_time() == pytest.approx(3.0)


async def test_stop_escalates_to_sigkill(autojump_clock: trio.testing.MockClock) -> None:
    spawner = FakeSpawner(ignores=frozenset({signal.SIGTERM}))
    slot = make_slot(spawner, stop_timeout=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(slot.run)
        started = trio.current_time()
        slot.request_stop()
    assert spawner.processes[0].signals == [signal.SIGTERM, signal.SIGKILL]
    assert trio.current_time() - started == pytest.approx(5.0)
    assert slot.state.value.value == "EXITED"


async def test_spawn_error_is_reported(autojump_clock: trio.testing.MockClock) -> None:
    spawner = FakeSpawner(fail=OSError(24, "Too many open files"))
    slot = make_slot(spawner)
    async with trio.open_nursery() as nursery:
        with pytest.raises(SpawnError, match="cannot start: EMFILE: Too many open files"):
            await nursery.start(slot.run)


async def test_cancellation_kills_the_process(autojump_clock: trio.testing.MockClock) -> None:
    spawner = FakeSpawner()
    slot = make_slot(spawner)
    async with trio.open_nursery() as nursery:
        await nursery.start(slot.run)
        nursery.cancel_scope.cancel()
    assert spawner.processes[0].closed
    assert spawner.processes[0].returncode == -signal.SIGKILL
