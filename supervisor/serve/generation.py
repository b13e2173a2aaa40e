"""A generation: one immutable plan of a service, its listeners and its workers.

``run_generation`` owns everything of a generation for its whole life: it
creates the listeners (one per worker per address) and enters them into
their reuseport groups with a role (the first generation ``ACTIVE``, a
candidate ``STANDBY``), starts every worker slot in parallel, reports
readiness through ``task_status.started`` once every worker passed its
health check, and on the way out stops the workers and takes its
listeners out of their groups, whatever happened.
"""

from __future__ import annotations

import contextlib
import enum
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import structlog
import trio

from supervisor.errors import RolloutAborted, SupervisorError, leaves
from supervisor.handoff.fdstore import NO_STORE, FdStore
from supervisor.handoff.ledger import Ledger
from supervisor.handoff.state import ListenerDoc, WorkerDoc
from supervisor.plan.plan import ServicePlan
from supervisor.serve.health import pinned_connector
from supervisor.serve.lifecycle import Watched, WorkerState
from supervisor.serve.listener import (
    AdoptedListener,
    Listener,
    open_listeners,
    release_listeners,
    relieve,
)
from supervisor.serve.output import OutputHub
from supervisor.serve.own import OwnListeners
from supervisor.serve.spawner import Spawner
from supervisor.serve.worker import AdoptedWorker, WorkerSlot
from supervisor.status import WorkerStatus
from supervisor.steering import Role, Steering, SteeringGroup
from supervisor.values import ListenAddress

log = structlog.get_logger("supervisor.serve.generation")
WorkerReady = Callable[[int, int], None]  # (workers ready so far, workers in all)


class GenerationState(enum.Enum):
    STARTING = "STARTING"  # listeners open, workers being health-checked
    SERVING = "SERVING"  # every worker passed its check
    STOPPING = "STOPPING"  # workers asked to stop
    STOPPED = "STOPPED"  # workers reaped, listeners closed


def by_worker_index(listeners: list[Listener]) -> dict[int, list[Listener]]:
    """Worker index -> its listeners, in order (one pass: a scan per worker was
    quadratic, 262,144 comparisons a reload at 512 workers)."""
    out: dict[int, list[Listener]] = {}
    for lst in listeners:
        out.setdefault(lst.worker, []).append(lst)
    return out


class Generation:
    """Handle on a running generation; its resources belong to ``run_generation``."""

    def __init__(
        self,
        plan: ServicePlan,
        listeners: list[Listener],
        slots: list[WorkerSlot],
        role: Role,
        own: Mapping[int, OwnListeners] | None = None,
    ) -> None:
        self.plan = plan
        self.number = plan.generation
        self.listeners = listeners  # every one, adopted ones too (their sockets are ours)
        self._of = by_worker_index(listeners)
        self._own = own or {}  # listen_mode = "own": each slot's adopted listeners
        self.slots = slots
        self.role = role  # of the generation; a listener's own role follows its worker
        self.state: Watched[GenerationState] = Watched(GenerationState.STARTING)
        self._stop_requested = trio.Event()
        self.preserve = False
        self._down: set[int] = set()  # workers whose listeners were placed out of rotation

    def listeners_of(self, worker: int) -> list[Listener]:
        """Worker ``worker``'s listeners (adopted: its live process's)."""
        own = self._own.get(worker)
        return own.current if own is not None else self._of.get(worker, [])

    def place_worker(self, index: int) -> None:
        """Set and publish the roles of worker ``index``'s listeners (just adopted).

        Raises:
            SteeringError: the kernel refused the change.
        """
        slot = self.slots[index]
        groups = self._place(slot)
        groups.update((id(lst.group), lst.group) for lst in self.listeners_of(index))
        for group in groups.values():
            group.apply()

    def admit(self, role: Role) -> dict[int, SteeringGroup]:
        """Give the generation ``role`` in its groups; return the groups to ``apply()``.

        In an ``ACTIVE`` generation, the listeners of a worker that is not
        RUNNING (being respawned, or FATAL) stay out of rotation.
        """
        self.role = role
        groups: dict[int, SteeringGroup] = {}
        for slot in self.slots:
            groups.update(self._place(slot))
        return groups

    def _place(self, slot: WorkerSlot) -> dict[int, SteeringGroup]:
        """Set the roles of ``slot``'s listeners; return the groups that changed."""
        changed: dict[int, SteeringGroup] = {}
        for lst in self.listeners_of(slot.plan.index):
            if not lst.in_group:
                continue
            role = self.role
            if role is Role.ACTIVE and slot.state.value is not WorkerState.RUNNING:
                # Out of rotation, unless it is the group's last active member:
                # with none, the kernel would hash over every member, standby too.
                role = Role.STANDBY if lst.active_peers() else Role.ACTIVE
            if lst.role is not role:
                lst.set_role(role)
                changed[id(lst.group)] = lst.group
        return changed

    @contextlib.contextmanager
    def following(self) -> Iterator[None]:
        """While inside, keep each worker's listeners out of rotation while its
        worker is down: followed as each slot's state is set, not by a task per
        worker. A worker already down when this begins is placed at once."""
        with contextlib.ExitStack() as stack:
            for slot in self.slots:
                follow = functools.partial(self._follow, slot)
                stack.enter_context(slot.state.observing(follow))
                if slot.state.value is not WorkerState.RUNNING:
                    follow(slot.state.value)
            yield

    def _follow(self, slot: WorkerSlot, state: WorkerState) -> None:
        running = state is WorkerState.RUNNING
        placed_up = slot.plan.index not in self._down
        if state is not WorkerState.FATAL and running == placed_up:
            return  # placed as it is already
        if running:
            self._down.discard(slot.plan.index)
        else:
            self._down.add(slot.plan.index)
        groups = self._place(slot)
        for group in groups.values():
            try:
                group.apply()
            except SupervisorError as exc:
                # The kernel keeps the table it had: the worker's listener
                # stays where it was (its queue waits for the respawn).
                log.error("worker_steering_failed", worker=slot.plan.index, error=str(exc))
        if groups:
            log.info(
                "worker_steered",
                worker=slot.plan.index,
                state=state.value,
                role="in rotation" if running else "out of rotation",
            )
        if state is WorkerState.FATAL:
            self._release_fatal(slot)

    def _release_fatal(self, slot: WorkerSlot) -> None:
        """A FATAL worker never accepts again: shut its TCP listeners down so the
        kernel moves their queued connections to the active listeners (where
        migration is possible; elsewhere they are reset instead of hanging)."""
        for lst in self.listeners_of(slot.plan.index):
            if not lst.tcp or not lst.in_group:
                continue
            if lst.role is Role.ACTIVE:
                continue  # the address's last active listener: keep it for the next reload
            relieve(lst, "fatal_worker", worker=slot.plan.index)

    def request_stop(self, *, preserve: bool = False) -> None:
        """``preserve``: once the workers are gone, leave the listeners to systemd's
        fd store (listening, queueing) instead of shutting them down."""
        self.preserve = self.preserve or preserve
        self._stop_requested.set()

    async def signal_stop(self) -> None:
        """Send every worker its stop signal, in one batch; return once sent,
        without waiting for the workers to exit (``stop`` does)."""
        self.request_stop()
        await self.state.wait_for(
            lambda s: s in (GenerationState.STOPPING, GenerationState.STOPPED)
        )

    async def stop(self, *, preserve: bool = False) -> None:
        """Stop the workers and release the listeners; return once all is done."""
        self.request_stop(preserve=preserve)
        await self.state.wait_for(lambda s: s is GenerationState.STOPPED)

    def signal(self, sig: int, index: int | None = None) -> list[int]:
        """Send ``sig`` to every worker process that runs (or worker ``index``'s);
        the pids it was sent to."""
        sent = []
        for slot in self.slots:
            if slot.process is not None and index in (None, slot.plan.index):
                slot.process.send_signal(sig)
                sent.append(slot.process.pid)
        return sent

    def pids(self) -> list[int]:
        return [slot.pid for slot in self.slots if slot.pid is not None]

    def export(self, ledger: Ledger, service: str) -> tuple[list[ListenerDoc], list[WorkerDoc]]:
        """Its open listeners and its slots, for the next image; fds go in ``ledger``."""
        listeners = [lst.export(ledger) for lst in self.listeners if lst.sock.fileno() >= 0]
        return listeners, [slot.export(ledger, service) for slot in self.slots]

    def worker_status(self, shown_as: str | None = None) -> list[WorkerStatus]:
        """The workers' snapshots; ``shown_as`` replaces a live worker's state
        (``RETIRING`` while its generation is being retired)."""
        out = []
        for slot in self.slots:
            mine = [lst.status() for lst in self.listeners_of(slot.plan.index)]
            state = slot.state.value
            alive = state not in _NO_PROCESS and state is not WorkerState.EXITED
            out.append(
                WorkerStatus(
                    index=slot.plan.index,
                    generation=self.number,
                    pid=slot.pid if state not in _NO_PROCESS else None,
                    state=shown_as if shown_as is not None and alive else state.value,
                    restarts=slot.restarts,
                    last_exit=slot.last_exit,
                    listeners=mine,
                )
            )
        return out


_NO_PROCESS = frozenset({WorkerState.BACKOFF, WorkerState.EXITED, WorkerState.FATAL})


@dataclass(frozen=True)
class GenerationSpec:
    """Everything ``run_generation`` needs to bring a plan to life."""

    plan: ServicePlan
    spawner: Spawner
    steering: Steering
    role: Role  # how its listeners enter their groups
    on_ready: WorkerReady | None = None
    created: Callable[[Generation], None] | None = None  # before its workers start
    store: FdStore = NO_STORE
    # Taken over from an earlier image (upgrade) or systemd's fd store (crash):
    inherited: Mapping[tuple[ListenAddress, int], AdoptedListener] | None = None
    handovers: Mapping[int, AdoptedWorker] | None = None  # worker index -> its running slot
    keep_if_failed: bool = False  # a start that fails leaves inherited listeners as they were


async def run_generation(
    spec: GenerationSpec,
    *,
    task_status: trio.TaskStatus[Generation] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Own a generation from its first listener to its last reaped worker.

    ``task_status.started(generation)`` once every worker is RUNNING.

    Raises:
        RolloutAborted: listeners could not be opened, or a worker failed to
            start; everything opened so far is released and reaped first.
    """
    plan, spawner, role = spec.plan, spec.spawner, spec.role
    settings = plan.settings
    structlog.contextvars.bind_contextvars(service=plan.name, generation=plan.generation)
    own_mode = plan.config.listen_mode == "own"
    try:
        listeners = (
            []
            if own_mode
            else open_listeners(plan, spec.steering, role, spec.store, spec.inherited)
        )
    except SupervisorError as exc:
        raise RolloutAborted(plan.name, [str(exc)]) from exc
    slots = []
    handovers = spec.handovers or {}
    hub = OutputHub()
    by_worker = by_worker_index(listeners)
    owns: dict[int, OwnListeners] = {}
    home: list[Generation] = []  # the generation, once made: adopted listeners are placed in it
    for worker in plan.workers:
        mine = by_worker.get(worker.index, [])
        first_tcp = next((lst for lst in mine if lst.tcp), None)
        connect = None if first_tcp is None else pinned_connector(first_tcp)
        fds = [lst.sock.fileno() for lst in mine]
        handover = handovers.get(worker.index)
        own = None
        if own_mode:
            place = functools.partial(_place_in, home, worker.index)
            own = owns[worker.index] = OwnListeners(worker, spec.steering, listeners, place)
        slots.append(
            WorkerSlot(
                worker, fds, settings, spawner, connect, handover=handover, output=hub, own=own
            )
        )
    generation = Generation(plan, listeners, slots, role, owns)
    home.append(generation)
    if spec.created is not None:
        spec.created(generation)
    log.info(
        "generation_listening",
        role=role.value,
        listeners=[{"worker": lst.worker, "cookie": lst.cookie} for lst in listeners],
    )
    # The spec's callbacks belong to the rollout that made this generation and
    # reach the generation before it: held for this one's whole life, they kept
    # that one (its slots, their tasks' frames, its listeners) alive until the
    # next reload. Only ``_serve`` gets ``on_ready``, and drops it once started.
    keep_if_failed = spec.keep_if_failed
    serving = _serve(generation, task_status, spec.on_ready, hub)
    del spec
    try:
        with hub:
            await serving
    finally:
        failed = generation.state.value is GenerationState.STARTING
        preserve = generation.preserve or (keep_if_failed and failed)
        release_listeners(listeners, preserve=preserve)
        generation.state.set(GenerationState.STOPPED)
    log.info("generation_stopped")


def _place_in(home: list[Generation], index: int) -> None:
    home[0].place_worker(index)


async def _serve(
    generation: Generation,
    task_status: trio.TaskStatus[Generation],
    on_ready: WorkerReady | None,
    hub: OutputHub,
) -> None:
    slots = generation.slots
    try:
        async with trio.open_nursery() as relaying:
            relaying.start_soon(hub.run)  # until every slot has let go of its pipes
            async with trio.open_nursery() as nursery:
                await _start_all(generation, nursery, on_ready)
                on_ready = None  # the rollout's: not held for the generation's life
                generation.state.set(GenerationState.SERVING)
                log.info("generation_serving", workers=len(slots))
                task_status.started(generation)
                with generation.following():
                    await generation._stop_requested.wait()
                generation.state.set(GenerationState.STOPPING)
                log.info("generation_stopping")
                for slot in slots:
                    slot.request_stop()
            relaying.cancel_scope.cancel()
    except* RolloutAborted as group:
        # The nursery wraps our one RolloutAborted in a group: unwrap it.
        raise leaves(group)[0] from None


async def _start_all(
    generation: Generation, nursery: trio.Nursery, on_ready: WorkerReady | None
) -> None:
    """Start every slot in parallel; raise one ``RolloutAborted`` naming each failure."""
    total = len(generation.slots)
    ready = 0

    async def start(slot: WorkerSlot) -> None:
        nonlocal ready
        await nursery.start(slot.run)
        ready += 1
        if on_ready is not None:
            on_ready(ready, total)

    try:
        async with trio.open_nursery() as starter:
            for slot in generation.slots:
                starter.start_soon(start, slot)
    except* SupervisorError as group:
        reasons = [str(exc) for exc in leaves(group)]
        raise RolloutAborted(generation.plan.name, reasons) from None
