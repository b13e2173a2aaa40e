"""The rollout: validate, plan, start a standby candidate, health-gate it,
promote it, retire the old generation, report. Or reject / roll back,
changing nothing that serves.

``run_rollout`` is the whole procedure for one service; ``Ticket`` is one
caller's view of it (progress lines and the final report), so that callers
who asked while a rollout was running share the one that follows.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import structlog
import trio

from supervisor.capabilities import Capabilities, check
from supervisor.config import Config, ServiceConfig
from supervisor.errors import ConfigError, PreflightFailed, RolloutAborted
from supervisor.generation import Generation, GenerationSpec, run_generation
from supervisor.kernel import netstat
from supervisor.kernel.proc import describe_exit
from supervisor.plan import plan_service, socket_changes, substitute
from supervisor.retire import promote, retire
from supervisor.spawner import Spawner
from supervisor.steering import Role, Steering
from supervisor.worker import SlotSettings

log = structlog.get_logger("supervisor.rollout")
Outcome = Literal["succeeded", "rejected", "rolled_back", "cancelled"]
_MAX_OUTPUT = 4000


@dataclass
class RolloutReport:
    """The answer to "did the reload work, and what did it cost?"."""

    service: str
    outcome: Outcome
    generation: int | None  # the new (or attempted) generation
    previous: int | None
    duration: float = 0.0
    path: str | None = None
    path_reason: str | None = None
    steering: str | None = None
    queued_at_cutover: int | None = None
    handshakes_at_cutover: int | None = None
    listeners_at_cutover: list[dict[str, object]] = field(default_factory=list)
    drained: int | None = None
    left_at_shutdown: int | None = None
    datagrams_left: int | None = None
    drain_timed_out: bool = False
    unmovable: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    reason: str | None = None  # why the rollout was asked for (--reason)
    timings: dict[str, float] = field(default_factory=dict)  # see Timer

    @property
    def ok(self) -> bool:
        return self.outcome == "succeeded"

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}


class Ticket:
    """One caller's share of a rollout: progress messages, then the report."""

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason
        self._send, self.messages = trio.open_memory_channel[str](256)
        self.report: RolloutReport | None = None
        self.done = trio.Event()

    def say(self, message: str) -> None:
        # A slow client must never hold up a rollout: its progress lines drop.
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._send.send_nowait(message)

    def finish(self, report: RolloutReport) -> None:
        self.report = report
        self._send.close()
        self.done.set()


@dataclass
class RolloutContext:
    """What a rollout may use of its service."""

    name: str
    nursery: trio.Nursery
    steering: Steering
    spawner: Spawner
    current: Generation
    generation: int  # the number the candidate will get
    load_config: Callable[[], Config]
    capabilities: Callable[[], Capabilities]
    settings: Callable[[ServiceConfig], SlotSettings]


@dataclass
class RolloutResult:
    report: RolloutReport
    generation: Generation | None = None  # the new current generation on success
    config: ServiceConfig | None = None


async def run_rollout(ctx: RolloutContext, say: Callable[[str], None]) -> RolloutResult:
    """Carry out one rollout of ``ctx.name``; never raises for an operating failure."""
    timer = Timer()
    report = RolloutReport(ctx.name, "rejected", None, ctx.current.number)

    def finish(outcome: Outcome, reasons: list[str] | None = None) -> RolloutResult:
        report.outcome = outcome
        report.reasons = reasons or []
        report.duration = round(timer.elapsed(), 4)
        report.timings = timer.timings(report.duration)
        return RolloutResult(report)

    say("validating config")
    try:
        config = ctx.load_config()
    except ConfigError as exc:
        return finish("rejected", [str(issue) for issue in exc.issues])
    service = config.services.get(ctx.name)
    if service is None:
        return finish("rejected", [f"service {ctx.name} is no longer in the config file"])
    caps = ctx.capabilities()
    issues = [str(i) for i in check(config, caps) if i.location.startswith(f"services.{ctx.name}.")]
    if issues:
        return finish("rejected", issues)
    timer.lap("validate")
    if service.preflight:
        say(f"running preflight {service.preflight}")
        try:
            await run_preflight(ctx.name, service, ctx.generation)
        except PreflightFailed as exc:
            return finish("rejected", [str(exc)])
        timer.lap("preflight")
    report.generation = ctx.generation
    plan = plan_service(ctx.name, service, ctx.generation)
    say(f"starting generation {ctx.generation} ({service.workers} workers, standby)")
    spec = GenerationSpec(
        plan,
        ctx.settings(service),
        ctx.spawner,
        ctx.steering,
        Role.STANDBY,
        on_ready=lambda k, n: say(f"workers ready {k}/{n}"),
    )
    try:
        candidate: Generation = await ctx.nursery.start(run_generation, spec)
    except RolloutAborted as exc:
        say(f"generation {ctx.generation} failed its health gate: rolled back")
        return finish("rolled_back", list(exc.reasons))
    timer.lap("start")
    timer.workers("workers_start", [s.start_seconds for s in candidate.slots])
    return await _cut_over(
        ctx, candidate, service=service, caps=caps, say=say, finish=finish, timer=timer
    )


async def _cut_over(
    ctx: RolloutContext,
    candidate: Generation,
    *,
    service: ServiceConfig,
    caps: Capabilities,
    say: Callable[[str], None],
    finish: Callable[[Outcome], RolloutResult],
    timer: Timer,
) -> RolloutResult:
    old = ctx.current
    changes = socket_changes(old.plan.config, service)
    path, why = caps.retire_plan(service.retire, changes)
    before = netstat.read()
    promote(candidate, old)
    timer.lap("cutover")
    say(f"cutover: generation {candidate.number} takes every new connection")
    say(f"retiring generation {old.number} by {path}: {why}")
    retirement = await retire(old, path, why, service.drain_timeout, refuse=bool(changes))
    after = netstat.read()
    timer.lap("retire")
    timer.workers("drain", [retirement.drain_seconds])
    timer.workers("workers_stop", [s.stop_seconds for s in old.slots])
    result = finish("succeeded")
    report = result.report
    report.steering = ctx.steering.backend
    report.path, report.path_reason = path, why
    report.queued_at_cutover = retirement.queued_at_cutover
    report.handshakes_at_cutover = retirement.handshakes_at_cutover
    report.listeners_at_cutover = retirement.listeners
    report.drained = retirement.drained
    report.left_at_shutdown = retirement.left_at_shutdown
    report.datagrams_left = retirement.datagrams_left
    report.drain_timed_out = retirement.drain_timed_out
    report.unmovable = retirement.unmovable
    report.notes = retirement.notes
    report.counters = netstat.delta(before, after)
    say(f"generation {old.number} retired")
    result.generation, result.config = candidate, service
    return result


class Timer:
    """Where a rollout's time went, for its report (seconds).

    Laps: ``validate`` (config read and checked), ``preflight``, ``start``
    (spawning the candidate until its last worker passed its check),
    ``cutover`` and ``retire`` (steer-away pause, drain, stop, reap). Within
    them, time that belongs to the workers, not to the supervisor: the
    preflight command, ``workers_start`` (the slowest new worker's spawn to
    health check passed), ``drain`` (old workers emptying their queues) and
    ``workers_stop`` (the slowest old worker's stop signal to exit).
    ``overhead`` is the duration less those: the supervisor's own share.
    """

    _WORKERS = ("preflight", "workers_start", "drain", "workers_stop")

    def __init__(self) -> None:
        self._start = self._last = trio.current_time()
        self._laps: dict[str, float] = {}

    def elapsed(self) -> float:
        return trio.current_time() - self._start

    def lap(self, name: str) -> None:
        now = trio.current_time()
        self._laps[name] = now - self._last
        self._last = now

    def workers(self, name: str, seconds: Sequence[float | None]) -> None:
        self._laps[name] = max((s for s in seconds if s is not None), default=0.0)

    def timings(self, duration: float) -> dict[str, float]:
        out = {name: round(value, 4) for name, value in self._laps.items()}
        if "start" in out:
            own = sum(self._laps.get(name, 0.0) for name in self._WORKERS)
            out["overhead"] = round(max(0.0, duration - own), 4)
        return out


async def run_preflight(name: str, service: ServiceConfig, generation: int) -> None:
    """Run the service's preflight argv (bounded by ``ready_timeout``).

    Raises:
        PreflightFailed: it exited non-zero, could not run, or timed out.
    """
    assert service.preflight is not None
    argv = [substitute(a, worker=0, generation=generation) for a in service.preflight]
    cwd = service.working_directory
    try:
        with trio.fail_after(service.ready_timeout):
            done = await trio.run_process(
                argv,
                cwd=None if cwd is None else substitute(str(cwd), worker=0, generation=generation),
                check=False,
                capture_stdout=True,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
    except trio.TooSlowError:
        raise PreflightFailed(
            name, argv, f"did not finish in {service.ready_timeout:g}s", ""
        ) from None
    except OSError as exc:
        raise PreflightFailed(name, argv, f"could not run: {exc}", "") from exc
    if done.returncode != 0:
        output = done.stdout.decode(errors="replace")[-_MAX_OUTPUT:]
        raise PreflightFailed(name, argv, describe_exit(done.returncode), output)
