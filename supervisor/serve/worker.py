"""One worker slot: the processes that serve one worker index of a generation.

The slot owns its processes and its notify socket, never the listeners: the
generation owns those, so a worker that dies leaves its listener (and the
connections queued on it) in place, and the respawned process serves them.

Life of a slot: the first process must pass its health check
(``nursery.start`` returns then; if it dies or times out first, ``run``
raises and nothing is retried: the caller decides). After that, a process
that dies is respawned on the same listeners with backoff; too many short
runs in a row make the slot FATAL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import structlog
import trio

from supervisor.errors import (
    HealthCheckFailed,
    SpawnError,
    StartFailed,
    SupervisorError,
    WorkerFatal,
    os_reason,
)
from supervisor.handoff.ledger import Ledger
from supervisor.handoff.state import WorkerDoc, notify_name, output_name
from supervisor.kernel.notify import NotifyReceiver
from supervisor.kernel.proc import describe_exit, start_time
from supervisor.plan.plan import SlotSettings, WorkerPlan
from supervisor.serve.health import Connector, ProbeTarget, make_probe
from supervisor.serve.lifecycle import Watched, WorkerState, check_transition
from supervisor.serve.output import OutputHub, Pipe, open_pipes
from supervisor.serve.own import OwnListeners
from supervisor.serve.spawner import ProcessHandle, Spawner
from supervisor.values import ListenAddress

log = structlog.get_logger("supervisor.serve.worker")


# Errors of a spawn that say the daemon, not the worker, ran short (EAGAIN:
# fork's, at the process limit).
STARVED_RETRY = 1.0


@dataclass
class AdoptedWorker:
    """A worker slot as the image before an in-place upgrade left it."""

    state: WorkerState
    process: ProcessHandle | None  # None: no process runs (BACKOFF, FATAL), or it is gone
    restarts: int = 0
    short_runs: int = 0
    last_exit: str | None = None
    start_seconds: float | None = None
    notify: socket.socket | None = None  # its NOTIFY_SOCKET, bound by the earlier image
    pipes: tuple[Pipe, Pipe] | None = None  # its stdout and stderr pipes


@dataclass
class _Run:
    """What happened to one process."""

    returncode: int
    lifetime: float
    reached_running: bool
    failure: SupervisorError | None
    # The spawn failed for want of the daemon's own resources (fds, memory,
    # processes): not the worker's fault, so not a short run.
    starved: bool = False


class WorkerSlot:
    """Runs and respawns the processes of one worker; see the module docstring."""

    def __init__(
        self,
        plan: WorkerPlan,
        fds: Sequence[int],
        settings: SlotSettings,
        spawner: Spawner,
        connect: Connector | None = None,
        *,
        handover: AdoptedWorker | None = None,
        output: OutputHub | None = None,
        own: OwnListeners | None = None,
    ) -> None:
        """``output``: the generation's reader of worker output, for ``output =
        "events"``; without one the processes write to the daemon's own stdout
        and stderr."""
        self.plan = plan
        self._handover = handover
        self._output = output
        self.fds = tuple(fds)
        self._connect = connect
        self._own = own  # listen_mode = "own": the listeners each process binds itself
        self.settings = settings
        self._spawner = spawner
        self.state: Watched[WorkerState] = Watched(WorkerState.STARTING)
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        # The process's own start: spawn to health check passed.
        self.start_seconds: float | None = None
        self._stop_requested = trio.Event()
        self._notify: NotifyReceiver | None = None
        self._short_runs = 0  # short runs in a row (RestartPolicy)
        self.process: ProcessHandle | None = None  # the live process, if any
        self._signalled: ProcessHandle | None = None  # the process the stop signal went to
        self._waiting: trio.CancelScope | None = None  # around the wait for the live process
        self.pipes: tuple[Pipe, Pipe] | None = None  # stdout and stderr, relayed as events

    @property
    def label(self) -> str:
        return self.plan.label

    def request_stop(self) -> None:
        """Ask the slot to stop its process and end: the stop signal goes now
        (so a generation signals its workers in one batch, before its
        listeners are shut down), SIGKILL after ``stop_timeout``."""
        if not self._stop_requested.is_set() and self.process is not None:
            self._signal_stop(self.process)
        self._stop_requested.set()

    def _signal_stop(self, proc: ProcessHandle) -> None:
        if self.state.value is not WorkerState.STOPPING:
            self._set(WorkerState.STOPPING)
        proc.send_signal(self.settings.stop_signal)
        self._signalled = proc
        if self._waiting is not None:  # SIGKILL once stop_timeout has passed (_wait)
            self._waiting.deadline = trio.current_time() + self.settings.stop_timeout

    def export(self, ledger: Ledger, service: str) -> WorkerDoc:
        """What the next image needs to go on with this slot; its fds go in
        ``ledger``. Its process, if one runs, keeps running: it is not ours to stop."""
        assert self._notify is not None
        index = self.plan.index
        pid = None if self.process is None else self.process.pid
        ends = [fd for pipe in self.pipes or () for fd in (pipe.read, pipe.write)]
        return WorkerDoc(
            index=index,
            state=self.state.value.value,
            pid=pid,
            start_time=None if pid is None else start_time(pid),
            restarts=self.restarts,
            short_runs=self._short_runs,
            last_exit=self.last_exit,
            start_seconds=self.start_seconds,
            notify=ledger.put(notify_name(service, index), self._notify.fileno()),
            output=[ledger.put(output_name(service, index, k), fd) for k, fd in enumerate(ends)],
        )

    def _set(self, new: WorkerState) -> None:
        check_transition(self.state.value, new)
        log.debug("worker_state", old=self.state.value.value, new=new.value)
        self.state.set(new)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``request_stop``. ``task_status.started()`` once first RUNNING.

        Raises:
            SpawnError, HealthCheckFailed: the first process never became RUNNING.
        Cancellation: any live process is killed and reaped before this returns.
        """
        structlog.contextvars.bind_contextvars(
            service=self.plan.service, generation=self.plan.generation, worker=self.plan.index
        )
        handover = self._handover
        try:
            adopt = None if handover is None else handover.notify
            receiver = NotifyReceiver(self.label, adopt=adopt)
        except OSError as exc:  # seam: its notify socket, as SpawnError
            self._set(WorkerState.FATAL)
            raise SpawnError(
                self.label, f"cannot create its NOTIFY_SOCKET: {os_reason(exc)}"
            ) from exc
        with receiver as notify, self._relayed_output(handover) as output:
            self._notify = notify
            self.pipes = output
            await self._live(handover, task_status)

    @contextlib.contextmanager
    def _relayed_output(self, handover: AdoptedWorker | None) -> Iterator[tuple[Pipe, Pipe] | None]:
        """The slot's output pipes (its own, or the ones it was handed), watched by
        the generation's hub; unwatched (after a last read) and closed at its end.

        Raises:
            SpawnError: no pipe could be made (out of fds).
        """
        hub = self._output
        if self.settings.output != "events" or hub is None:
            yield None
            return
        pipes: tuple[Pipe, Pipe] | None = None
        try:
            pipes = handover.pipes if handover is not None and handover.pipes else open_pipes()
            for pipe in pipes:
                hub.watch(pipe, self.plan.index, lambda: self.pid)
        except OSError as exc:  # seam: its output pipes, as SpawnError
            self._set(WorkerState.FATAL)
            _close_pipes(hub, pipes)
            raise SpawnError(self.label, f"cannot make its output pipes: {os_reason(exc)}") from exc
        try:
            yield pipes
        finally:
            _close_pipes(hub, pipes)

    async def _live(
        self, handover: AdoptedWorker | None, task_status: trio.TaskStatus[None]
    ) -> None:
        if handover is not None:
            task_status.started()  # its generation serves already
            await self._guarded(self._resume(handover))
            return
        first = await self._run_process(task_status.started)
        if self._stop_requested.is_set():
            return
        if not first.reached_running:
            self._set(WorkerState.FATAL)
            raise first.failure or SpawnError(self.label, "exited before it was ready")
        await self._guarded(self._respawn_loop(first))

    async def _guarded(self, serving: Awaitable[None]) -> None:
        """Run the slot's life after its start. A bug there must not take the
        generation (and every other worker of the service) down with it: this
        slot alone ends, FATAL."""
        try:
            await serving
        except Exception:
            log.exception("worker_slot_failed")
            if self.state.value not in (WorkerState.FATAL, WorkerState.EXITED):
                self.state.set(WorkerState.FATAL)
            await self._stop_requested.wait()

    async def _resume(self, handover: AdoptedWorker) -> None:
        """Go on from where the earlier image left this slot: adopt its process
        (no spawn), or keep backing off, or stay FATAL."""
        self.restarts, self.last_exit = handover.restarts, handover.last_exit
        self.start_seconds = handover.start_seconds
        if handover.state is WorkerState.FATAL:
            self.state.set(WorkerState.FATAL)
            await self._stop_requested.wait()
            return
        if handover.process is None:  # backing off, or its process died meanwhile
            self._short_runs = max(0, handover.short_runs - 1)  # the loop counts it again
            last = _Run(returncode=-1, lifetime=0.0, reached_running=False, failure=None)
        else:
            self._short_runs = handover.short_runs
            last = await self._run_process(
                lambda: None,
                existing=handover.process,
                running=handover.state is WorkerState.RUNNING,
            )
        await self._respawn_loop(last)

    async def _respawn_loop(self, last: _Run) -> None:
        policy = self.settings.policy
        while not self._stop_requested.is_set():
            if last.starved:
                last = await self._respawn_when_fed()
                continue
            short = policy.is_short(reached_running=last.reached_running, lifetime=last.lifetime)
            self._short_runs = self._short_runs + 1 if short else 0
            short_runs = self._short_runs
            if policy.gives_up(short_runs):
                fatal = WorkerFatal(self.label, short_runs, self.last_exit or "unknown")
                self._set(WorkerState.FATAL)
                log.error("worker_fatal", reason=str(fatal))
                await self._stop_requested.wait()
                return
            delay = policy.delay(short_runs)
            self._set(WorkerState.BACKOFF)
            log.warning(
                "worker_died", exit=self.last_exit, respawn_in=delay, restarts=self.restarts
            )
            with trio.move_on_after(delay):
                await self._stop_requested.wait()
            if self._stop_requested.is_set():
                break
            self.restarts += 1
            last = await self._run_process(lambda: None)
        if self.state.value is not WorkerState.EXITED:
            self._set(WorkerState.STOPPING)
            self._set(WorkerState.EXITED)

    async def _respawn_when_fed(self) -> _Run:
        """The daemon could not spawn (out of fds, memory or processes): try again
        after ``STARVED_RETRY``, counting nothing against the worker. A flood of
        connections to the metrics endpoint once left a worker killed meanwhile
        FATAL for good, its listener shut down."""
        self._set(WorkerState.BACKOFF)
        with trio.move_on_after(STARVED_RETRY):
            await self._stop_requested.wait()
        if self._stop_requested.is_set():
            return _Run(returncode=-1, lifetime=0.0, reached_running=False, failure=None)
        return await self._run_process(lambda: None)

    async def _run_process(
        self,
        on_first_ready: Callable[[], None],
        *,
        existing: ProcessHandle | None = None,
        running: bool = False,
    ) -> _Run:
        """Spawn a process (or watch ``existing``, an adopted one: ``running`` if it
        had passed its check already), gate it, and wait for it to end."""
        if running:
            self.state.set(WorkerState.RUNNING)
        elif self.state.value is not WorkerState.STARTING:
            self._set(WorkerState.STARTING)
        if existing is not None:
            proc = existing
        else:
            try:
                output = None if self.pipes is None else (self.pipes[0].write, self.pipes[1].write)
                proc = self._spawner(self.plan, self.fds, self._notify_address(), output)
            except StartFailed as exc:
                failure = SpawnError(self.label, exc.reason)
                self.last_exit = failure.reason
                retry = STARVED_RETRY if exc.starved else None
                log.error("worker_spawn_failed", reason=str(failure), retry_in=retry)
                return _Run(-1, 0.0, reached_running=False, failure=failure, starved=exc.starved)
        self.pid = proc.pid
        self.process = proc
        structlog.contextvars.bind_contextvars(pid=proc.pid)
        if existing is None:
            log.info("worker_spawned", argv=list(self.plan.argv))
        else:
            log.info("worker_adopted", state=self.state.value.value)
        # An adopted process has run for a while: its end is not a "short run".
        spawned_at = trio.current_time() - (self.settings.policy.stable_after if running else 0)
        outcome = _Run(returncode=0, lifetime=0.0, reached_running=running, failure=None)
        try:
            async with trio.open_nursery() as nursery:
                if not running:
                    nursery.start_soon(self._gate, proc, outcome, on_first_ready, spawned_at)
                outcome.returncode = await self._wait(proc)
                nursery.cancel_scope.cancel()
        finally:
            self.process = None
            await proc.aclose()  # killed and reaped if it still runs (cancellation)
        if self._own is not None:
            await self._own.release()  # its sockets' queues go to live listeners
        outcome.lifetime = trio.current_time() - spawned_at
        self.last_exit = describe_exit(outcome.returncode)
        if outcome.failure is None and not outcome.reached_running:
            outcome.failure = SpawnError(self.label, f"{self.last_exit} before it was ready")
        if self.state.value is WorkerState.STOPPING:
            log.info("worker_stopped", exit=self.last_exit)
            self._set(WorkerState.EXITED)
        return outcome

    def _notify_address(self) -> str | None:
        return None if self._notify is None else self._notify.address

    async def _gate(
        self,
        proc: ProcessHandle,
        outcome: _Run,
        on_first_ready: Callable[[], None],
        spawned_at: float,
    ) -> None:
        probe = None
        with trio.move_on_after(self.settings.ready_timeout) as scope:
            connect = self._connect
            if self._own is not None:
                try:
                    connect = await self._own.adopt(proc.pid)
                except SupervisorError as exc:
                    outcome.failure = SpawnError(
                        self.label, f"its own listeners could not be adopted: {exc}"
                    )
                    log.error("worker_unadoptable", reason=str(outcome.failure))
                    proc.send_signal(signal.SIGKILL)
                    return
            target = ProbeTarget(
                label=self.label,
                worker=self.plan.index,
                generation=self.plan.generation,
                pid=proc.pid,
                address=_first_tcp(self.plan.listen),
                connect=connect,
                notifications=None if self._notify is None else self._notify.receive,
                certificate=self.settings.certificate,
                run=lambda argv: self._spawner.run_command(self.plan, argv),
            )
            probe = make_probe(self.settings.health, target)
            await probe.wait_ready()
        if scope.cancelled_caught:
            timeout = f"{self.settings.ready_timeout:g}s"
            if probe is None and self._own is not None:
                missing = ", ".join(self._own.missing())
                outcome.failure = SpawnError(
                    self.label, f"did not listen on {missing} within {timeout} (listen_mode = own)"
                )
            else:
                last = "" if probe is None else probe.last_error
                outcome.failure = HealthCheckFailed(
                    self.label, self.settings.health.kind, f"not ready after {timeout}: {last}"
                )
            log.error("worker_unhealthy", reason=str(outcome.failure))
            proc.send_signal(signal.SIGKILL)
            return
        if self.state.value is WorkerState.STARTING:
            outcome.reached_running = True
            self.start_seconds = trio.current_time() - spawned_at
            self._set(WorkerState.RUNNING)
            log.info("worker_running", check=self.settings.health.kind)
            on_first_ready()
            if self._own is not None:
                await self._own.running()

    async def _wait(self, proc: ProcessHandle) -> int:
        """Wait for ``proc`` to exit; once it has its stop signal (``request_stop``,
        or a stop asked before it was spawned), SIGKILL it after ``stop_timeout``.
        The timeout is a deadline on this wait, not a task per process."""
        with trio.CancelScope() as waiting:
            self._waiting = waiting
            if self._stop_requested.is_set() and self._signalled is not proc:
                self._signal_stop(proc)  # asked before this process was spawned
            elif self._signalled is proc:  # signalled before this wait began
                waiting.deadline = trio.current_time() + self.settings.stop_timeout
            try:
                return await proc.wait()
            finally:
                self._waiting = None
        log.warning("worker_stop_timeout", timeout=self.settings.stop_timeout, action="SIGKILL")
        proc.send_signal(signal.SIGKILL)
        return await proc.wait()


def _close_pipes(hub: OutputHub, pipes: tuple[Pipe, Pipe] | None) -> None:
    """Unwatch (a pipe never watched is a no-op; a watched one is read once more
    first) and close both ends of each pipe."""
    for pipe in pipes or ():
        hub.unwatch(pipe)
        os.close(pipe.read)
        os.close(pipe.write)


def _first_tcp(addresses: Sequence[ListenAddress]) -> ListenAddress | None:
    return next((a for a in addresses if a.proto == "tcp"), None)
