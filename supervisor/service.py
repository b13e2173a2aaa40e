"""A service: its generations over time, and the requests that change them.

The service owns a nursery in which its generations live. The daemon asks
it to start, to stop, and (later) to roll out a new generation; it answers
with immutable snapshots.
"""

from __future__ import annotations

import enum
import signal

import structlog
import trio

from supervisor.config import ServiceConfig
from supervisor.generation import Generation, GenerationState, run_generation
from supervisor.lifecycle import WorkerState
from supervisor.plan import plan_service
from supervisor.spawner import Spawner
from supervisor.status import ServiceStatus
from supervisor.worker import SlotSettings

log = structlog.get_logger("supervisor.service")


class ServiceState(enum.Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"  # every worker of the current generation RUNNING
    DEGRADED = "DEGRADED"  # some worker respawning or FATAL
    FATAL = "FATAL"  # every worker FATAL
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"


def slot_settings(config: ServiceConfig) -> SlotSettings:
    return SlotSettings(
        health=config.health,
        ready_timeout=config.ready_timeout,
        stop_signal=signal.Signals[config.stop_signal],
        stop_timeout=config.stop_timeout,
    )


class Service:
    """One configured service; ``run`` owns its generations."""

    def __init__(self, name: str, config: ServiceConfig, spawner: Spawner) -> None:
        self.name = name
        self.config = config
        self._spawner = spawner
        self.current: Generation | None = None
        self._stop_requested = trio.Event()
        self._stopped = False

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start generation 1; ``started()`` once it serves; stop it on request.

        Raises:
            RolloutAborted: the first generation could not start.
        """
        structlog.contextvars.bind_contextvars(service=self.name)
        async with trio.open_nursery() as nursery:
            plan = plan_service(self.name, self.config, 1)
            log.info("generation_starting", generation=1, workers=len(plan.workers))
            self.current = await nursery.start(
                run_generation, plan, slot_settings(self.config), self._spawner
            )
            task_status.started()
            await self._stop_requested.wait()
            log.info("service_stopping")
            await self.current.stop()
        self._stopped = True
        log.info("service_stopped")

    def state(self) -> ServiceState:
        if self._stopped:
            return ServiceState.STOPPED
        if self.current is None:
            return ServiceState.STARTING
        if self._stop_requested.is_set() or self.current.state.value in (
            GenerationState.STOPPING,
            GenerationState.STOPPED,
        ):
            return ServiceState.STOPPING
        states = {slot.state.value for slot in self.current.slots}
        if states == {WorkerState.RUNNING}:
            return ServiceState.RUNNING
        if states == {WorkerState.FATAL}:
            return ServiceState.FATAL
        return ServiceState.DEGRADED

    def snapshot(self) -> ServiceStatus:
        current = self.current
        return ServiceStatus(
            name=self.name,
            generation=0 if current is None else current.number,
            state=self.state().value,
            retire=self.config.retire,
            steering="none",
            workers=[] if current is None else current.worker_status(),
        )
