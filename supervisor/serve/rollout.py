"""The rollout: validate, plan, start a standby candidate, health-gate it,
promote it, retire the old generation, report. Or reject / roll back,
changing nothing that serves.

``run_rollout`` is the whole procedure for one service; ``Ticket`` is one
caller's view of it (progress lines and the final report), so that callers
who asked while a rollout was running share the one that follows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
import trio

from supervisor.config.schema import ServiceConfig
from supervisor.errors import PreflightFailed, RolloutAborted, StartFailed, SupervisorError
from supervisor.handoff.fdstore import NO_STORE, FdStore
from supervisor.kernel import netstat
from supervisor.kernel.proc import describe_exit, thread_schedstat
from supervisor.plan.capabilities import Capabilities
from supervisor.plan.plan import RolloutPlan, ServicePlan, plan_rollout, substitute
from supervisor.reports import Outcome, RolloutReport
from supervisor.serve.census import Known, problems, take_census
from supervisor.serve.cutover import promote
from supervisor.serve.generation import Generation, GenerationSpec, run_generation
from supervisor.serve.retire import retire
from supervisor.serve.spawner import Spawner
from supervisor.steering import Role, Steering
from supervisor.text import printable
from supervisor.values import Served

log = structlog.get_logger("supervisor.serve.rollout")
_MAX_OUTPUT = 4000
READY_EVERY = 0.25  # seconds between "workers ready k/n" lines (the last always comes)


class Ticket:
    """One caller's share of a rollout: the config it validated, progress
    messages, then the report."""

    def __init__(self, reason: str | None = None, snapshot: ValidatedConfig | None = None) -> None:
        self.reason = reason
        self.snapshot = snapshot
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


class Stage:
    """Where a service stands: the generation serving (its plan holds the
    certificate it serves) and the config it runs, and the generations that
    are neither simply serving nor gone. Rollouts write it as they go, the service and
    ``status`` read it: nothing calls back up. Waitable, like ``Watched``."""

    def __init__(self, config: ServiceConfig) -> None:
        self.serving: Generation | None = None
        self.config = config  # as asked (a start may run more workers: keep_queued)
        self.candidate: Generation | None = None  # started; not yet promoted
        self.retiring: Generation | None = None  # promoted away from; not yet reaped
        self._changed = trio.Event()

    def serve(self, generation: Generation, config: ServiceConfig) -> None:
        """``generation`` serves now, with ``config`` (a start, or a cutover)."""
        self.serving, self.config = generation, config
        self._wake()

    def set(self, candidate: Generation | None, retiring: Generation | None) -> None:
        self.candidate, self.retiring = candidate, retiring
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[Stage], bool]) -> None:
        while not predicate(self):
            await self._changed.wait()


@dataclass(frozen=True)
class ValidatedConfig:
    """One service's config as a reload validated it, once: the rollout uses
    exactly what the caller was shown."""

    config: ServiceConfig
    validated_in: float = 0.0  # seconds the daemon took to read and check the file
    # What the check judged it on: the rollout decides with the same (None:
    # nothing was checked, as for a restart; read when the rollout starts).
    capabilities: Capabilities | None = None
    # Its certificate as the check read it (None: nothing was checked, or no
    # tls: read when the rollout starts). The one probed for, and shown.
    certificate: Served | None = None


@dataclass
class RolloutContext:
    """What a rollout may use of its service."""

    name: str
    nursery: trio.Nursery
    steering: Steering
    spawner: Spawner
    current: Generation
    generation: int  # the number the candidate will get
    capabilities: Capabilities  # what the plan decides on, if the snapshot was not judged
    stage: Stage  # where the service stands: the rollout writes it as it goes
    store: FdStore = NO_STORE  # the candidate's listeners are kept there too


async def run_rollout(
    ctx: RolloutContext, snapshot: ValidatedConfig, say: Callable[[str], None]
) -> RolloutReport:
    """Carry out one rollout of ``ctx.name`` to ``snapshot``.

    Never raises for an operating failure (a kernel error included): a
    failure before the cutover rolls back, one after it is a problem in the
    report; the serving generation is never touched by either. Cancellation
    (the daemon stopping) stops the candidate and propagates.
    """
    timer = Timer(already=snapshot.validated_in)
    report = RolloutReport(service=ctx.name, outcome="rejected", previous=ctx.current.number)

    def finish(outcome: Outcome, reasons: list[str] | None = None) -> RolloutReport:
        report.outcome = outcome
        report.reasons = reasons or []
        report.duration = round(timer.elapsed(), 4)
        report.timings = timer.timings(report.duration)
        return report

    service = snapshot.config
    caps = snapshot.capabilities or ctx.capabilities
    certificate = snapshot.certificate or read_certificate(service)
    plan = plan_rollout(ctx.current.plan, service, ctx.generation, caps, certificate)
    census = take_census(
        [*ctx.current.plan.config.listen, *service.listen],
        Known.of([ctx.current]),
        own=service.listen_mode == "own",
    )
    report.notes = [f"census of {g.address} not taken: {g.error}" for g in census if g.error]
    refusals = problems(census)
    timer.lap("validate")
    if refusals:
        say("refused: another socket shares a listen address (supervisorctl census)")
        return finish("rejected", refusals)
    if service.preflight:
        say(f"running preflight {service.preflight}")
        try:
            await run_preflight(ctx.spawner, plan.candidate)
        except PreflightFailed as exc:
            return finish("rejected", [str(exc)])
        timer.lap("preflight")
    report.generation = ctx.generation
    say(f"starting generation {ctx.generation} ({service.workers} workers, standby)")
    spec = GenerationSpec(
        plan.candidate,
        ctx.spawner,
        ctx.steering,
        Role.STANDBY,
        on_ready=ready_progress(say),
        created=lambda generation: ctx.stage.set(generation, None),
        store=ctx.store,
    )
    try:
        try:
            candidate: Generation = await ctx.nursery.start(run_generation, spec)
        except RolloutAborted as exc:
            say(f"generation {ctx.generation} failed its health gate: rolled back")
            return finish("rolled_back", list(exc.reasons))
        timer.lap("start")
        timer.workers("workers_start", [s.start_seconds for s in candidate.slots])
        return await _cut_over(ctx, candidate, plan, say=say, finish=finish, timer=timer)
    finally:
        ctx.stage.set(None, None)


def ready_progress(say: Callable[[str], None]) -> Callable[[int, int], None]:
    """``workers ready k/n`` at most every READY_EVERY seconds, and at n/n: one
    line a worker cost each caller a message (and the daemon a send) per worker."""
    last = -READY_EVERY

    def ready(k: int, n: int) -> None:
        nonlocal last
        now = trio.current_time()
        if k == n or now - last >= READY_EVERY:
            last = now
            say(f"workers ready {k}/{n}")

    return ready


async def _cut_over(
    ctx: RolloutContext,
    candidate: Generation,
    plan: RolloutPlan,
    *,
    say: Callable[[str], None],
    finish: Callable[[Outcome, list[str] | None], RolloutReport],
    timer: Timer,
) -> RolloutReport:
    old = ctx.current
    before = _counters()
    try:
        promote(candidate, old)
    except RolloutAborted as exc:
        say(f"cutover to generation {candidate.number} failed: rolled back")
        with trio.CancelScope(shield=True):
            await candidate.stop()
        return finish("rolled_back", list(exc.reasons))
    except BaseException:
        with trio.CancelScope(shield=True):
            await candidate.stop()
        raise
    ctx.stage.serve(candidate, plan.candidate.config)
    ctx.stage.set(None, old)
    timer.lap("cutover")
    say(f"cutover: generation {candidate.number} takes every new connection")
    say(f"retiring generation {old.number} by {plan.path}: {plan.why}")
    retirement = await retire(
        old,
        plan.path,
        plan.why,
        plan.candidate.config.drain_timeout,
        refuse=plan.refuse_migration,
    )
    after = _counters()
    timer.lap("retire")
    timer.workers("drain", [retirement.drain_seconds])
    timer.workers("workers_stop", [retirement.stop_seconds])
    report = finish("succeeded", None)
    report.steering = ctx.steering.backend
    report.path, report.path_reason = plan.path, plan.why
    report.queued_at_cutover = retirement.queued_at_cutover
    report.handshakes_at_cutover = retirement.handshakes_at_cutover
    report.listeners_at_cutover = retirement.listeners
    report.drained = retirement.drained
    report.left_at_shutdown = retirement.left_at_shutdown
    report.datagrams_left = retirement.datagrams_left
    report.drain_timed_out = retirement.drain_timed_out
    report.unmovable = retirement.unmovable
    report.notes += retirement.notes
    report.problems = retirement.problems
    if before is None or after is None:
        report.problems.append("kernel counters could not be read: counters are empty")
    else:
        report.counters = netstat.delta(before, after)
    say(f"generation {old.number} retired")
    return report


def _counters() -> dict[str, int] | None:
    try:
        return netstat.read()
    except SupervisorError as exc:
        log.warning("netstat_unreadable", error=str(exc))
        return None


class Timer:
    """Where a rollout's time went, for its report (seconds).

    Laps: ``validate`` (config read and checked by the daemon, and the
    rollout planned), ``preflight``, ``start``
    (spawning the candidate until its last worker passed its check),
    ``cutover`` and ``retire`` (steer-away pause, drain, stop, reap). Within
    them, time that belongs to the workers, not to the supervisor: the
    preflight command, ``workers_start`` (the slowest new worker's spawn to
    health check passed), ``drain`` (old workers emptying their queues) and
    ``workers_stop`` (the old workers' stop: from their stop signal, sent
    just before their listeners are shut down, to the last one reaped, less
    the supervisor thread's own CPU meanwhile).
    ``overhead`` is the duration less those: the supervisor's own share.
    Beside them, over the whole reload: ``cpu``, the supervisor thread's own
    CPU time, and ``waiting_for_cpu``, its time runnable without a CPU (the
    kernel's schedstat). Where the workers' start and exit saturate the
    cores, the second is most of the overhead.
    """

    _WORKERS = ("preflight", "workers_start", "drain", "workers_stop")

    def __init__(self, already: float = 0.0) -> None:
        self._start = trio.current_time() - already  # the reload's validation came first
        self._last = self._start
        self._laps: dict[str, float] = {}
        self._sched = thread_schedstat()

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
        now = thread_schedstat()
        if self._sched is not None and now is not None:
            out["cpu"] = round(now[0] - self._sched[0], 4)
            out["waiting_for_cpu"] = round(now[1] - self._sched[1], 4)
        return out


async def run_preflight(spawner: Spawner, plan: ServicePlan) -> None:
    """Run the service's preflight argv as the service (bounded by ``ready_timeout``).

    Raises:
        PreflightFailed: it exited non-zero, could not run, or timed out.
    """
    service = plan.config
    assert service.preflight is not None
    first = plan.workers[0]
    argv = [substitute(a, worker=0, generation=plan.generation) for a in service.preflight]
    try:
        with trio.fail_after(service.ready_timeout):
            done = await spawner.run_command(first, argv)
    except trio.TooSlowError:
        raise PreflightFailed(
            plan.name, argv, f"did not finish in {service.ready_timeout:g}s", ""
        ) from None
    except StartFailed as exc:
        raise PreflightFailed(plan.name, argv, f"could not run: {exc.reason}", "") from exc
    if done.returncode != 0:
        raise PreflightFailed(
            plan.name,
            argv,
            describe_exit(done.returncode),
            printable(done.output[-_MAX_OUTPUT:], lines=True),
        )


def read_certificate(config: ServiceConfig) -> Served | None:
    """``config``'s certificate, read now: for a generation nothing validated
    (a start, a restart); None without tls, or if it cannot be read (the
    tls probe then says why)."""
    if config.tls is None:
        return None
    from supervisor.config import tls  # noqa: PLC0415  (only with [tls]: see tls.py)

    return tls.served(config.tls.cert)
