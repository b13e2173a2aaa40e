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

import enum
import socket
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import trio

from supervisor.errors import ListenerError, RolloutAborted, SupervisorError, leaves
from supervisor.health import pinned_connector
from supervisor.kernel.sockets import ListenerOptions, accept_queue, open_listener, socket_cookie
from supervisor.lifecycle import Watched, WorkerState
from supervisor.plan import ServicePlan
from supervisor.spawner import Spawner
from supervisor.status import ListenerStatus, WorkerStatus
from supervisor.steering import Role, Steering, SteeringGroup
from supervisor.values import ListenAddress
from supervisor.worker import SlotSettings, WorkerSlot

log = structlog.get_logger("supervisor.generation")
WorkerReady = Callable[[int, int], None]  # (workers ready so far, workers in all)


class GenerationState(enum.Enum):
    STARTING = "STARTING"  # listeners open, workers being health-checked
    SERVING = "SERVING"  # every worker passed its check
    STOPPING = "STOPPING"  # workers asked to stop
    STOPPED = "STOPPED"  # workers reaped, listeners closed


@dataclass(frozen=True)
class Listener:
    """One listener of one worker: the supervisor's own socket for it."""

    worker: int
    address: ListenAddress
    sock: socket.socket
    cookie: int
    group: SteeringGroup

    @property
    def tcp(self) -> bool:
        return self.address.proto == "tcp"

    @property
    def in_group(self) -> bool:
        return self.group.role(self.sock) is not None

    def queued(self) -> int:
        """Connections waiting in this listener's accept queue (0 once shut down)."""
        if not self.tcp or self.sock.fileno() < 0:
            return 0
        depth = accept_queue(self.sock)
        return depth.queued if depth.listening else 0

    def status(self) -> ListenerStatus:
        queued = limit = None
        if self.tcp and self.sock.fileno() >= 0:
            depth = accept_queue(self.sock)
            if depth.listening:
                queued, limit = depth.queued, depth.limit
        role = self.group.role(self.sock)
        return ListenerStatus(
            address=str(self.address),
            cookie=self.cookie,
            role=None if role is None else role.value,
            queued=queued,
            backlog=limit,
        )


def listener_options(plan: ServicePlan) -> ListenerOptions:
    opts = plan.config.socket
    return ListenerOptions(
        backlog=plan.config.backlog,
        defer_accept=opts.defer_accept,
        fastopen=opts.fastopen,
        rcvbuf=opts.rcvbuf,
        sndbuf=opts.sndbuf,
    )


class Generation:
    """Handle on a running generation; its resources belong to ``run_generation``."""

    def __init__(
        self, plan: ServicePlan, listeners: list[Listener], slots: list[WorkerSlot], role: Role
    ) -> None:
        self.plan = plan
        self.number = plan.generation
        self.listeners = listeners
        self.slots = slots
        self.role = role  # of the generation; a listener's own role follows its worker
        self.state: Watched[GenerationState] = Watched(GenerationState.STARTING)
        self._stop_requested = trio.Event()

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
        for lst in self.listeners:
            if lst.worker != slot.plan.index or not lst.in_group:
                continue
            role = self.role
            if role is Role.ACTIVE and slot.state.value is not WorkerState.RUNNING:
                # Out of rotation, unless it is the group's last active member:
                # with none, the kernel would hash over every member, standby too.
                others = any(
                    lst.group.role(s) is Role.ACTIVE for s in lst.group.members if s is not lst.sock
                )
                role = Role.STANDBY if others else Role.ACTIVE
            if lst.group.role(lst.sock) is not role:
                lst.group.set_role([lst.sock], role)
                changed[id(lst.group)] = lst.group
        return changed

    async def follow_worker(self, slot: WorkerSlot) -> None:
        """Keep ``slot``'s listeners out of rotation while its worker is down."""

        def down(state: WorkerState) -> bool:
            return state is not WorkerState.RUNNING

        def up_or_fatal(state: WorkerState) -> bool:
            return state in (WorkerState.RUNNING, WorkerState.FATAL)

        running = True
        while True:
            await slot.state.wait_for(down if running else up_or_fatal)
            running = slot.state.value is WorkerState.RUNNING
            groups = self._place(slot)
            for group in groups.values():
                group.apply()
            if groups:
                log.info(
                    "worker_steered",
                    worker=slot.plan.index,
                    state=slot.state.value.value,
                    role="in rotation" if running else "out of rotation",
                )
            if slot.state.value is WorkerState.FATAL:
                self._release_fatal(slot)
                return

    def _release_fatal(self, slot: WorkerSlot) -> None:
        """A FATAL worker never accepts again: shut its TCP listeners down so the
        kernel moves their queued connections to the active listeners (where
        migration is possible; elsewhere they are reset instead of hanging)."""
        for lst in self.listeners:
            if lst.worker != slot.plan.index or not lst.tcp or not lst.in_group:
                continue
            if lst.group.role(lst.sock) is Role.ACTIVE:
                continue  # the address's last active listener: keep it for the next reload
            queued = lst.queued()
            lst.group.shutdown(lst.sock)
            log.warning(
                "fatal_worker_listener_shut_down",
                worker=slot.plan.index,
                address=str(lst.address),
                queued=queued,
            )

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def stop(self) -> None:
        """Stop the workers and release the listeners; return once all is done."""
        self.request_stop()
        await self.state.wait_for(lambda s: s is GenerationState.STOPPED)

    def pids(self) -> list[int]:
        return [slot.pid for slot in self.slots if slot.pid is not None]

    def worker_status(self) -> list[WorkerStatus]:
        out = []
        for slot in self.slots:
            mine = [lst.status() for lst in self.listeners if lst.worker == slot.plan.index]
            out.append(
                WorkerStatus(
                    index=slot.plan.index,
                    generation=self.number,
                    pid=slot.pid if slot.state.value not in _NO_PROCESS else None,
                    state=slot.state.value.value,
                    restarts=slot.restarts,
                    last_exit=slot.last_exit,
                    listeners=mine,
                )
            )
        return out


_NO_PROCESS = frozenset({WorkerState.BACKOFF, WorkerState.EXITED, WorkerState.FATAL})


def open_listeners(plan: ServicePlan, steering: Steering, role: Role) -> list[Listener]:
    """Create every listener of ``plan`` and enter it into its group as ``role``.

    Runs without awaiting, so the groups' models follow each ``listen()``
    exactly. Raises ListenerError (after releasing what was opened).
    """
    options = listener_options(plan)
    listeners: list[Listener] = []
    try:
        for worker in plan.workers:
            for address in worker.listen:
                sock = open_listener(address, options)
                group = steering.group(address)
                group.join(sock, role)
                listeners.append(Listener(worker.index, address, sock, socket_cookie(sock), group))
        for group in {id(lst.group): lst.group for lst in listeners}.values():
            group.apply()
    except BaseException:
        release_listeners(listeners)
        raise
    return listeners


def release_listeners(listeners: list[Listener]) -> None:
    """Take listeners out of their groups and close them.

    TCP members are shut down (the kernel unhashes them even if a worker's
    child still holds a copy), last index first, so that leaving moves no
    other member. UDP members leave when our close drops the last reference,
    which holds once their workers are reaped: the group closes them itself.
    """
    members = [lst for lst in listeners if lst.in_group]
    members.sort(key=lambda lst: lst.group.index(lst.sock), reverse=True)
    for lst in members:
        try:
            if lst.tcp:
                lst.group.shutdown(lst.sock)
            else:
                lst.group.discard(lst.sock)
        except OSError as exc:
            log.error("listener_release_failed", address=str(lst.address), error=str(exc))
    for lst in listeners:
        lst.sock.close()


@dataclass(frozen=True)
class GenerationSpec:
    """Everything ``run_generation`` needs to bring a plan to life."""

    plan: ServicePlan
    settings: SlotSettings
    spawner: Spawner
    steering: Steering
    role: Role  # how its listeners enter their groups
    on_ready: WorkerReady | None = None


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
    plan, settings, spawner, role = spec.plan, spec.settings, spec.spawner, spec.role
    structlog.contextvars.bind_contextvars(service=plan.name, generation=plan.generation)
    try:
        listeners = open_listeners(plan, spec.steering, role)
    except ListenerError as exc:
        raise RolloutAborted(plan.name, [str(exc)]) from exc
    slots = []
    for worker in plan.workers:
        mine = [lst for lst in listeners if lst.worker == worker.index]
        first_tcp = next((lst for lst in mine if lst.tcp), None)
        connect = None if first_tcp is None else pinned_connector(first_tcp.group, first_tcp.sock)
        fds = [lst.sock.fileno() for lst in mine]
        slots.append(WorkerSlot(worker, fds, settings, spawner, connect))
    generation = Generation(plan, listeners, slots, role)
    log.info(
        "generation_listening",
        role=role.value,
        listeners=[{"worker": lst.worker, "cookie": lst.cookie} for lst in listeners],
    )
    try:
        await _serve(generation, task_status, spec.on_ready)
    finally:
        release_listeners(listeners)
        generation.state.set(GenerationState.STOPPED)
    log.info("generation_stopped")


async def _serve(
    generation: Generation,
    task_status: trio.TaskStatus[Generation],
    on_ready: WorkerReady | None,
) -> None:
    slots = generation.slots
    try:
        async with trio.open_nursery() as nursery:
            await _start_all(generation, nursery, on_ready)
            generation.state.set(GenerationState.SERVING)
            log.info("generation_serving", workers=len(slots))
            task_status.started(generation)
            async with trio.open_nursery() as followers:
                for slot in slots:
                    followers.start_soon(generation.follow_worker, slot)
                await generation._stop_requested.wait()
                followers.cancel_scope.cancel()
            generation.state.set(GenerationState.STOPPING)
            log.info("generation_stopping")
            for slot in slots:
                slot.request_stop()
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
