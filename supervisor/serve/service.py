"""A service: its generations over time, and the rollouts that replace them.

The service owns a nursery in which its generations live. One rollout runs
at a time; requests that arrive meanwhile coalesce into one follow-up
rollout, which rolls out the newest config snapshot among them (each was
validated once, by the reload that asked) and answers all of them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import asdict, dataclass

import structlog
import trio

from supervisor.config.schema import ServiceConfig
from supervisor.errors import UpgradeRefused
from supervisor.handoff.fdstore import NO_STORE, FdStore
from supervisor.handoff.ledger import Ledger
from supervisor.handoff.state import GroupDoc, ServiceDoc, ebpf_name
from supervisor.plan.capabilities import Capabilities
from supervisor.plan.plan import plan_service
from supervisor.reports import RolloutReport
from supervisor.serve.census import Known, take_census
from supervisor.serve.generation import Generation, GenerationSpec, run_generation
from supervisor.serve.inherit import retire_leftovers, take_steering
from supervisor.serve.lifecycle import Watched, WorkerState
from supervisor.serve.program_watch import Replaced, watch_programs
from supervisor.serve.rollout import (
    RolloutContext,
    Stage,
    Ticket,
    ValidatedConfig,
    read_certificate,
    run_rollout,
)
from supervisor.serve.spawner import Spawner
from supervisor.serve.takeover import Takeover, keep_queued
from supervisor.status import CertificateStatus, GroupCensus, ServiceStatus
from supervisor.steering import Backend, Role, Steering, SteeringGroup
from supervisor.values import ListenAddress, Served

_KEEP = 10  # replacements of the steering program status shows
log = structlog.get_logger("supervisor.serve.service")


class ServiceState(enum.Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"  # every worker of the current generation RUNNING
    RELOADING = "RELOADING"  # a rollout is under way; the current generation serves
    DEGRADED = "DEGRADED"  # some worker respawning or FATAL
    FATAL = "FATAL"  # every worker FATAL
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"


def _workers_state(states: set[WorkerState]) -> ServiceState:
    if states == {WorkerState.RUNNING}:
        return ServiceState.RUNNING
    if states == {WorkerState.FATAL}:
        return ServiceState.FATAL
    return ServiceState.DEGRADED


GroupFactory = Callable[[Backend, ListenAddress], SteeringGroup]


@dataclass(frozen=True)
class TakeoverSummary:
    """What a service's start took over (an upgrade, or systemd's fd store)."""

    generation: int
    listeners: int  # inherited listeners it serves on
    workers: int  # running workers adopted (an upgrade)
    restarted: int  # workers that were gone and are respawned
    retired: list[str]  # inherited listeners it shut down (another generation's, ...)
    problems: list[str]


@dataclass(frozen=True)
class ServiceEnv:
    """What the daemon gives each service."""

    spawner: Spawner
    capabilities: Callable[[], Capabilities]
    groups: GroupFactory | None = None  # steering groups; None: the backend's own
    store: FdStore = NO_STORE  # systemd's fd store, where listeners outlive the daemon
    # Told of every finished rollout, with the restarts of the generation it retired.
    on_rollout: Callable[[RolloutReport, int], None] = lambda _report, _restarts: None
    steering_check: float = 0.0  # seconds between steering self-tests; 0: none


class Service:
    """One configured service; ``run`` owns its generations."""

    def __init__(
        self,
        name: str,
        config: ServiceConfig,
        env: ServiceEnv,
        inheritance: Takeover | None = None,
        *,
        first_generation: int = 1,
    ) -> None:
        self.name = name
        self._first_generation = first_generation
        self._env = env
        self._inheritance = inheritance
        self.stage = Stage(config)
        backend = env.capabilities().steering
        self.steering = Steering(backend, env.groups)
        self.last_generation = 0
        self.last_rollout: RolloutReport | None = None
        self.inherited: TakeoverSummary | None = None  # what the start took over
        self.steering_replaced: list[str] = []  # the last replacements of our program
        self._preserve = False
        self._rolling_out = False
        self._busy = Watched(False)  # a rollout runs or waits
        self._queue: list[Ticket] = []
        self._wake = trio.Event()
        self._stop_requested = trio.Event()
        self._stopped = False
        self.stopped = trio.Event()

    def request_stop(self, *, preserve: bool = False) -> None:
        """Stop every generation. ``preserve``: leave the serving generation's
        listeners (and steering) to systemd's fd store for the next daemon."""
        self._preserve = self._preserve or preserve
        self._stop_requested.set()

    @property
    def current(self) -> Generation | None:
        """The generation serving (None before the first one serves)."""
        return self.stage.serving

    @property
    def config(self) -> ServiceConfig:
        """The config the serving generation runs (before it: the one to start)."""
        return self.stage.config

    @property
    def certificate(self) -> Served | None:
        """The certificate the serving generation was planned and probed with."""
        serving = self.stage.serving
        return None if serving is None else serving.plan.settings.certificate

    def request_rollout(self, snapshot: ValidatedConfig, reason: str | None = None) -> Ticket:
        """Queue a rollout to ``snapshot``; it shares the next one to start (never
        overlaps one), which rolls out the newest snapshot of those waiting."""
        ticket = Ticket(reason, snapshot)
        if self._stop_requested.is_set():
            ticket.finish(self._refused("the service is stopping"))
            return ticket
        self._queue.append(ticket)
        self._wake.set()
        self._busy.set(True)
        return ticket

    @property
    def idle(self) -> bool:
        """No rollout runs or waits."""
        return not self._busy.value

    async def wait_idle(self) -> None:
        await self._busy.wait_for(lambda busy: not busy)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start generation 1; ``started()`` once it serves; roll out on request;
        stop every generation on ``request_stop``.

        Raises:
            RolloutAborted: the first generation could not start.
        """
        structlog.contextvars.bind_contextvars(service=self.name)
        try:
            await self._run(task_status)
        finally:
            self.steering.close(preserve=self._preserve)
        for ticket in self._queue:
            ticket.finish(self._refused("the service stopped"))
        self._stopped = True
        self.stopped.set()
        log.info("service_stopped")

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        found = self._inheritance
        self._inheritance = None  # the sockets belong to the generation from here on
        config = self.config
        async with trio.open_nursery() as nursery:
            if found is not None:
                migrates = self._env.capabilities().can_migrate
                config = keep_queued(found, self.config, migrates=migrates)
                await take_steering(self.steering, found, self._env.store, config)
            number = self._first_generation if found is None else found.generation
            self.last_generation = number if found is None else found.last_generation
            if found is not None and found.last_rollout is not None:
                self.last_rollout = RolloutReport.model_validate(found.last_rollout)
            plan = plan_service(self.name, config, number, read_certificate(config))
            log.info("generation_starting", generation=number, workers=len(plan.workers))
            spec = GenerationSpec(
                plan,
                self._env.spawner,
                self.steering,
                Role.ACTIVE,
                store=self._env.store,
                inherited=None if found is None else found.listeners,
                handovers=None if found is None else found.handovers,
                keep_if_failed=found is not None,
            )
            # No local name for it: this frame lives as long as the service,
            # and would keep the generation alive after it retires.
            self.stage.serve(await nursery.start(run_generation, spec), self.config)
            if found is not None:
                self._took_over(found)
            task_status.started()
            async with trio.open_nursery() as rollouts:
                rollouts.start_soon(self._rollout_loop, nursery)
                if self._env.steering_check > 0:
                    rollouts.start_soon(
                        watch_programs, self._quiet, self._env.steering_check, self._replaced
                    )
                await self._stop_requested.wait()
                log.info("service_stopping")
                rollouts.cancel_scope.cancel()
            # A rollout cut short may leave a candidate: stop every generation.
            nursery.cancel_scope.deadline = trio.current_time() + self.config.stop_timeout + 5
            serving = self.current
            assert serving is not None
            await serving.stop(preserve=self._preserve)
            nursery.cancel_scope.cancel()

    def _quiet(self) -> Generation | None:
        """The serving generation, while no rollout changes its groups."""
        stage = self.stage
        if self._rolling_out or stage.candidate is not None or stage.retiring is not None:
            return None
        return self.current

    def _replaced(self, replaced: Replaced) -> None:
        self.steering_replaced = [*self.steering_replaced, replaced.describe()][-_KEEP:]

    def export(self, ledger: Ledger) -> ServiceDoc:
        """This service, serving and idle (no rollout under way), as the next
        image needs it; every fd goes in ``ledger``.

        Raises:
            UpgradeRefused: its workers bind their own sockets (not carried yet).
        """
        if self.config.listen_mode == "own":
            raise UpgradeRefused(
                f'service {self.name}: listen_mode = "own": an in-place upgrade does not '
                "carry adopted listeners yet; use systemctl restart (it costs the requests "
                "in flight)"
            )
        current = self.current
        assert current is not None
        listeners, workers = current.export(ledger, self.name)
        cookies = {id(lst.sock): lst.cookie for lst in current.listeners}
        groups = []
        for address, group in self.steering.items():
            exported = group.export()
            objects, order = exported.objects, exported.order
            groups.append(
                GroupDoc(
                    address=str(address),
                    ebpf=None
                    if objects is None
                    else {
                        obj: ledger.put(ebpf_name(self.name, str(address), obj), fd)
                        for obj, fd in objects.items()
                    },
                    order=None if order is None else [(cookies[id(s)], r.value) for s, r in order],
                )
            )
        last = self.last_rollout
        return ServiceDoc(
            name=self.name,
            config=self.config.model_dump(mode="json"),
            steering=self.steering.backend,
            generation=current.number,
            last_generation=self.last_generation,
            listeners=listeners,
            workers=workers,
            groups=groups,
            last_rollout=None if last is None else last.model_dump(),
        )

    def _took_over(self, found: Takeover) -> None:
        """The first generation serves on what it inherited: retire the rest, and
        replace the generation if something could not be taken over."""
        assert self.current is not None
        migrates = self._env.capabilities().can_migrate
        retired = retire_leftovers(self.steering, found, self._env.store, migrates=migrates)
        self.inherited = TakeoverSummary(
            generation=self.current.number,
            listeners=len(found.listeners),
            workers=found.adopted_workers(),
            restarted=found.lost_workers,
            retired=retired,
            problems=[str(problem) for problem in found.problems],
        )
        log.info("service_inherited", **asdict(self.inherited))
        if found.repair:
            self.request_rollout(
                ValidatedConfig(self.config), "repair: something was lost in the handover"
            )
        elif found.follow_up is not None:
            self.request_rollout(ValidatedConfig(self.config), found.follow_up)

    async def _rollout_loop(self, nursery: trio.Nursery) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            tickets, self._queue = self._queue, []
            if tickets:
                await self._rollout(nursery, tickets)
            if not self._queue:
                self._busy.set(False)

    async def _rollout(self, nursery: trio.Nursery, tickets: list[Ticket]) -> None:
        assert self.current is not None
        old = self.current
        reasons = sorted({t.reason for t in tickets if t.reason})
        snapshot = next(t.snapshot for t in reversed(tickets) if t.snapshot is not None)
        self.last_generation += 1
        context = RolloutContext(
            name=self.name,
            nursery=nursery,
            steering=self.steering,
            spawner=self._env.spawner,
            current=self.current,
            generation=self.last_generation,
            capabilities=self._env.capabilities(),
            stage=self.stage,
            store=self._env.store,
        )

        def say(message: str) -> None:
            log.info("rollout_progress", message=message)
            for ticket in tickets:
                ticket.say(f"{self.name}: {message}")

        log.info("rollout_started", callers=len(tickets), reasons=reasons)
        self._rolling_out = True
        try:
            report = await run_rollout(context, snapshot, say)
        except Exception as exc:
            # run_rollout translates every operating failure; this is a bug.
            # Report it and keep serving: the service must not die of it.
            log.exception("rollout_crashed")
            assert self.current is not None
            report = _crashed(self.name, self.last_generation, old, self.current, exc)
            if self.current is not old:  # after the cutover: the old one must not linger
                with trio.CancelScope(shield=True):
                    await old.stop()
        except BaseException:
            for ticket in tickets:
                ticket.finish(self._refused("the rollout was cut short: the daemon is stopping"))
            raise
        finally:
            self._rolling_out = False
        report.reason = "; ".join(reasons) or None
        if report.generation is None:
            self.last_generation -= 1  # rejected before a candidate existed: no number used
        self.last_rollout = report
        self._env.on_rollout(report, sum(s.restarts for s in old.slots) if report.ok else 0)
        log.info("rollout_finished", **report.model_dump())
        for ticket in tickets:
            ticket.finish(report)

    def _refused(self, why: str) -> RolloutReport:
        current = None if self.current is None else self.current.number
        return RolloutReport(
            service=self.name, outcome="cancelled", previous=current, reasons=[why]
        )

    def signal_workers(self, sig: int, index: int | None = None) -> list[int]:
        """Send ``sig`` to the workers of every generation this service runs
        (during a rollout, the candidate's and the retiring one's too), or to
        the serving generation's worker ``index``; the pids it went to."""
        if index is not None:
            return [] if self.current is None else self.current.signal(sig, index)
        stage = self.stage
        held = (self.current, stage.candidate, stage.retiring)
        return [pid for gen in dict.fromkeys(held) if gen is not None for pid in gen.signal(sig)]

    def state(self) -> ServiceState:
        current = self.current
        if self._stopped:
            return ServiceState.STOPPED
        if current is None:
            return ServiceState.STARTING
        if self._stop_requested.is_set():
            return ServiceState.STOPPING
        if self._rolling_out:
            return ServiceState.RELOADING
        return _workers_state({slot.state.value for slot in current.slots})

    def snapshot(self) -> ServiceStatus:
        """What ``status`` shows: during a rollout, the candidate's workers with
        their own states and the retiring generation's as RETIRING, beside the
        serving generation's, and the census of its addresses. Reads no kernel
        state that could fail it."""
        current = self.current
        caps = self._env.capabilities()
        last = self.last_rollout
        stage = self.stage
        workers = [] if current is None else current.worker_status()
        if stage.candidate is not None:
            workers += stage.candidate.worker_status()
        if stage.retiring is not None:
            workers += stage.retiring.worker_status(shown_as="RETIRING")
        return ServiceStatus(
            name=self.name,
            generation=0 if current is None else current.number,
            state=self.state().value,
            retire=caps.retire_path(self.config.retire),
            steering=self.steering.backend,
            workers=workers,
            candidate=None if stage.candidate is None else stage.candidate.number,
            retiring=None if stage.retiring is None else stage.retiring.number,
            certificate=_certificate(self.certificate),
            last_rollout=None if last is None else last.model_dump(),
            census=self.census(),
            steering_replaced=self.steering_replaced,
        )

    def census(self) -> list[GroupCensus]:
        """Who shares each of the service's addresses (never raises: see census.py)."""
        stage = self.stage
        held = (self.current, stage.candidate, stage.retiring)
        addresses = list(self.config.listen)
        for gen in held:
            if gen is not None:
                addresses += gen.plan.config.listen
        return take_census(addresses, Known.of(held), own=self.config.listen_mode == "own")


def _certificate(served: Served | None) -> CertificateStatus | None:
    if served is None:
        return None
    return CertificateStatus(
        path=str(served.path),
        subject=served.subject,
        not_after=served.not_after.isoformat(),
        days_left=round(served.seconds_left() / 86400, 2),
    )


def _crashed(
    name: str, generation: int, old: Generation, current: Generation, exc: Exception
) -> RolloutReport:
    """The report of a rollout that raised: rolled back if the old generation
    still serves; after the cutover, succeeded, with the error as a problem."""
    error = f"internal error: {exc!r}"
    if current is old:
        return RolloutReport(
            service=name,
            outcome="rolled_back",
            generation=generation,
            previous=old.number,
            reasons=[error],
        )
    report = RolloutReport(
        service=name, outcome="succeeded", generation=current.number, previous=old.number
    )
    stopped = f"generation {old.number} was stopped without its planned retirement"
    report.problems = [f"{error}; {stopped}"]
    return report
