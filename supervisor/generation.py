"""A generation: one immutable plan of a service, its listeners and its workers.

``run_generation`` owns everything of a generation for its whole life: it
creates the listeners (one per worker per address), starts every worker
slot in parallel, reports readiness through ``task_status.started`` once
every worker passed its health check, and on the way out stops the workers
and closes the listeners, whatever happened.
"""

from __future__ import annotations

import enum
import socket
from contextlib import ExitStack
from dataclasses import dataclass

import structlog
import trio

from supervisor.errors import ListenerError, RolloutAborted, SupervisorError, leaves
from supervisor.kernel.sockets import ListenerOptions, accept_queue, open_listener, socket_cookie
from supervisor.lifecycle import Watched, WorkerState
from supervisor.plan import ServicePlan
from supervisor.spawner import Spawner
from supervisor.status import ListenerStatus, WorkerStatus
from supervisor.worker import SlotSettings, WorkerSlot

log = structlog.get_logger("supervisor.generation")


class GenerationState(enum.Enum):
    STARTING = "STARTING"  # listeners open, workers being health-checked
    SERVING = "SERVING"  # every worker passed its check
    STOPPING = "STOPPING"  # workers asked to stop
    STOPPED = "STOPPED"  # workers reaped, listeners closed


@dataclass(frozen=True)
class Listener:
    """One listener of one worker: the supervisor's own socket for it."""

    worker: int
    address_index: int
    sock: socket.socket
    cookie: int

    def status(self) -> ListenerStatus:
        queued = limit = None
        if self.sock.fileno() >= 0 and self.sock.type == socket.SOCK_STREAM:
            depth = accept_queue(self.sock)
            queued, limit = (depth.queued, depth.limit) if depth.listening else (None, None)
        address = str(_address_of(self))
        return ListenerStatus(address=address, cookie=self.cookie, queued=queued, backlog=limit)


def _address_of(listener: Listener) -> str:
    host, port = listener.sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        self, plan: ServicePlan, listeners: list[Listener], slots: list[WorkerSlot]
    ) -> None:
        self.plan = plan
        self.number = plan.generation
        self.listeners = listeners
        self.slots = slots
        self.state: Watched[GenerationState] = Watched(GenerationState.STARTING)
        self._stop_requested = trio.Event()

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def stop(self) -> None:
        """Stop the workers and close the listeners; return once all is done."""
        self.request_stop()
        await self.state.wait_for(lambda s: s is GenerationState.STOPPED)

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


def open_listeners(plan: ServicePlan, stack: ExitStack) -> list[Listener]:
    """Create every listener of ``plan``; each is closed by ``stack``.

    Raises:
        ListenerError: the first address that cannot be bound (all opened ones close).
    """
    options = listener_options(plan)
    listeners = []
    for worker in plan.workers:
        for index, address in enumerate(worker.listen):
            sock = stack.enter_context(open_listener(address, options))
            listeners.append(Listener(worker.index, index, sock, socket_cookie(sock)))
    return listeners


async def run_generation(
    plan: ServicePlan,
    settings: SlotSettings,
    spawner: Spawner,
    *,
    task_status: trio.TaskStatus[Generation] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Own a generation from its first listener to its last reaped worker.

    ``task_status.started(generation)`` once every worker is RUNNING.

    Raises:
        RolloutAborted: listeners could not be opened, or a worker failed to
            start; everything opened so far is closed and reaped first.
    """
    structlog.contextvars.bind_contextvars(service=plan.name, generation=plan.generation)
    with ExitStack() as stack:
        try:
            listeners = open_listeners(plan, stack)
        except ListenerError as exc:
            raise RolloutAborted(plan.name, [str(exc)]) from exc
        slots = [
            WorkerSlot(
                worker,
                [lst.sock.fileno() for lst in listeners if lst.worker == worker.index],
                settings,
                spawner,
            )
            for worker in plan.workers
        ]
        generation = Generation(plan, listeners, slots)
        try:
            await _serve(generation, task_status)
        finally:
            generation.state.set(GenerationState.STOPPED)
    log.info("generation_stopped")


async def _serve(generation: Generation, task_status: trio.TaskStatus[Generation]) -> None:
    slots = generation.slots
    try:
        async with trio.open_nursery() as nursery:
            await _start_all(generation, nursery)
            generation.state.set(GenerationState.SERVING)
            log.info("generation_serving", workers=len(slots))
            task_status.started(generation)
            await generation._stop_requested.wait()
            generation.state.set(GenerationState.STOPPING)
            log.info("generation_stopping")
            for slot in slots:
                slot.request_stop()
    except* RolloutAborted as group:
        # The nursery wraps our one RolloutAborted in a group: unwrap it.
        raise leaves(group)[0] from None


async def _start_all(generation: Generation, nursery: trio.Nursery) -> None:
    """Start every slot in parallel; raise one ``RolloutAborted`` naming each failure."""
    try:
        async with trio.open_nursery() as starter:
            for slot in generation.slots:
                starter.start_soon(nursery.start, slot.run)
    except* SupervisorError as group:
        reasons = [str(exc) for exc in leaves(group)]
        raise RolloutAborted(generation.plan.name, reasons) from None
