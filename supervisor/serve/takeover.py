"""What a starting service takes over instead of creating.

Two sources, one shape (``Takeover``):

- an in-place upgrade: the state document names each fd and pid; every one
  is checked (a socket with the same SO_COOKIE, our child with the same
  start time, a BPF map of the right type) before it is trusted;
- a crash or ``systemctl restart``: systemd's fd store hands back the
  listeners and eBPF objects by name; the workers are gone and start anew.

What cannot be taken over is reported and replaced, never silently dropped:
a listener that is gone is taken back from the worker that holds it
(``pidfd_getfd``) or bound anew and a repair rollout follows; a worker that
is gone is respawned on its listener; steering objects that are gone are
made anew, the old program replaced in the kernel.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from supervisor.config.schema import ServiceConfig
from supervisor.errors import (
    AdoptionKind,
    AdoptionProblem,
    FdLost,
    SupervisorError,
)
from supervisor.handoff.fdstore import StoredFd
from supervisor.handoff.ledger import Ledger, socket_problem
from supervisor.handoff.state import ListenerDoc, ServiceDoc, WorkerDoc
from supervisor.kernel import fds
from supervisor.kernel.proc import adopt_child, fd_of
from supervisor.kernel.sockets import accept_queue, socket_cookie
from supervisor.plan.plan import FIRST_LISTEN_FD
from supervisor.serve.lifecycle import WorkerState
from supervisor.serve.listener import AdoptedListener
from supervisor.serve.output import Pipe
from supervisor.serve.worker import AdoptedWorker
from supervisor.steering import Role
from supervisor.values import ListenAddress, parse_listen

log = structlog.get_logger("supervisor.serve.takeover")


@dataclass
class AdoptedSteering:
    """How a group's steering is taken over (an upgrade carries it; after a
    crash there is none: eBPF steering is made anew, the classic order learned)."""

    ebpf: dict[str, int] | None = None  # map and program fds, by name
    order: list[tuple[int, Role]] | None = None  # classic BPF: (cookie, role), socks[] order


@dataclass
class Takeover:
    """What one service finds at start."""

    generation: int  # the number of the generation it runs
    last_generation: int
    listeners: dict[tuple[ListenAddress, int], AdoptedListener] = field(default_factory=dict)
    leftovers: list[tuple[ListenAddress, AdoptedListener]] = field(default_factory=list)
    # Slots the config no longer has (workers lowered while the daemon was
    # down) whose listeners hold queued connections: see ``keep_queued``.
    queued_slots: dict[tuple[ListenAddress, int], AdoptedListener] = field(default_factory=dict)
    handovers: dict[int, AdoptedWorker] | None = None  # None: no worker runs (after a crash)
    groups: dict[ListenAddress, AdoptedSteering] = field(default_factory=dict)
    problems: list[AdoptionProblem] = field(default_factory=list)
    repair: bool = False  # roll out a fresh generation once serving
    follow_up: str | None = None  # roll out the config once serving, for this reason
    last_rollout: dict[str, object] | None = None
    lost_workers: int = 0  # workers that were gone (respawned)

    def note(self, kind: AdoptionKind, problem: str) -> None:
        log.warning("inherit_problem", kind=kind, problem=problem)
        self.problems.append(AdoptionProblem(kind, problem))

    def adopted_workers(self) -> int:
        return sum(1 for h in (self.handovers or {}).values() if h.process is not None)


def _socket(fd: int, cookie: int | None) -> socket.socket | None:
    """The socket at ``fd`` if it is one (and has ``cookie``, when given); an
    fd that is not is left alone: it is not ours to close."""
    return None if socket_problem(fd, cookie) else fds.adopt_socket(fd)


def address_of(sock: socket.socket) -> ListenAddress | None:
    """The address a listener is bound to, as the config would write it."""
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        host, port = sock.getsockname()[:2]
    except OSError:  # seam: an inherited socket we cannot read is not ours
        return None
    return ListenAddress("tcp" if kind == socket.SOCK_STREAM else "udp", host, port)


# --- an in-place upgrade -------------------------------------------------------------


def from_upgrade(state: ServiceDoc, config: ServiceConfig, ledger: Ledger) -> Takeover:
    """Check and take over what the state document says this service had,
    taking its fds from ``ledger`` by name."""
    found = Takeover(state.generation, state.last_generation, last_rollout=state.last_rollout)
    found.handovers = {}
    pids = {w.index: w.pid for w in state.workers}
    for worker in state.workers:
        found.handovers[worker.index] = _worker(found, worker, ledger)
    for lst in state.listeners:
        address = parse_listen(lst.address)
        try:
            sock: socket.socket | None = ledger.take_socket(lst.name, lst.cookie)
        except FdLost as lost:
            sock = _from_worker(found, config, address, lst, pids)
            why = lost.why
        if sock is None:
            found.note(
                "listener_lost",
                f"listener {address} of worker {lst.worker} (cookie {lst.cookie}) was lost in "
                f"the upgrade ({why}): a new one is bound, and a rollout replaces the generation",
            )
            found.repair = True
            continue
        found.listeners[(address, lst.worker)] = AdoptedListener(
            sock, lst.name, lst.cookie, lst.worker
        )
    for group in state.groups:
        address = parse_listen(group.address)
        found.groups[address] = AdoptedSteering(
            ebpf=None if group.ebpf is None else _ebpf(found, address, group.ebpf, ledger),
            order=None if group.order is None else [(c, Role(r)) for c, r in group.order],
        )
    return found


def _worker(found: Takeover, worker: WorkerDoc, ledger: Ledger) -> AdoptedWorker:
    index = worker.index
    state = WorkerState(worker.state)
    process = None if worker.pid is None else adopt_child(worker.pid, worker.start_time)
    if worker.pid is not None and process is None:
        found.note(
            "worker_gone",
            f"worker {index} (pid {worker.pid}) was gone after the upgrade: respawned",
        )
        found.lost_workers += 1
        state = WorkerState.BACKOFF if state is not WorkerState.FATAL else state
    notify = None
    try:
        notify = ledger.take_socket(worker.notify)
    except FdLost as lost:
        if process is not None:
            found.note(
                "notify_lost",
                f"worker {index}: its NOTIFY_SOCKET was lost ({lost.why}); "
                "later notifications are lost",
            )
    pipes = None
    if worker.output:
        try:
            ends = [ledger.take_fd(name) for name in worker.output]
        except FdLost as lost:
            # The ends that did cross stay open: closing a read end would kill
            # the writer with SIGPIPE before the rollout replaces it.
            found.note(
                "pipes_lost",
                f"worker {index}: its output pipes were lost ({lost.why}): "
                "a rollout gives it new ones",
            )
            found.repair = True  # a pipe nobody reads would stop its writer once full
        else:
            pipes = Pipe("stdout", ends[0], ends[1]), Pipe("stderr", ends[2], ends[3])
    return AdoptedWorker(
        state=state,
        process=process,
        restarts=worker.restarts,
        short_runs=worker.short_runs,
        last_exit=worker.last_exit,
        start_seconds=worker.start_seconds,
        notify=notify,
        pipes=pipes,
    )


def _ebpf(
    found: Takeover, address: ListenAddress, names: Mapping[str, str], ledger: Ledger
) -> dict[str, int] | None:
    """A group's eBPF objects, if every one crossed (else they are made anew)."""
    objects: dict[str, int] = {}
    try:
        for obj, name in names.items():
            objects[obj] = ledger.take_fd(name)
    except FdLost as lost:
        for fd in objects.values():
            os.close(fd)
        found.note(
            "steering_made_anew",
            f"the steering of {address} could not be taken over ({lost}): made anew",
        )
        return None
    return objects


def _from_worker(
    found: Takeover,
    config: ServiceConfig,
    address: ListenAddress,
    lst: ListenerDoc,
    pids: Mapping[int, int | None],
) -> socket.socket | None:
    """Take a lost listener back from the worker holding it as fd 3, 4, ..."""
    handover = (found.handovers or {}).get(lst.worker)
    pid = pids.get(lst.worker)
    if handover is None or handover.process is None or pid is None:
        return None
    try:
        fd = fd_of(pid, FIRST_LISTEN_FD + list(config.listen).index(address))
    except (OSError, ValueError):  # seam: another process's fd (pidfd_getfd), or none
        return None
    sock = _socket(fd, lst.cookie)
    if sock is None:
        os.close(fd)
        return None
    found.note(
        "listener_taken_back",
        f"listener {address} of worker {lst.worker} was taken back from pid {pid}",
    )
    return sock


# --- systemd's fd store, after a crash or a restart ---------------------------------


def from_store(
    name: str, config: ServiceConfig, stored: Sequence[StoredFd], ledger: Ledger
) -> Takeover:
    """Sort what the store kept for service ``name``: one listener per (address,
    worker) of the config is taken, the rest retire once the new workers serve.

    Of two for one slot, the one that holds connections is taken, else the
    newer generation's: after a crash in the middle of a rollout the
    candidate's listeners were never promoted and are empty, while the serving
    generation's queued what came during the outage. Where retirement cannot
    migrate, the one not taken resets what it holds. ``stored`` says what each
    name is; the sockets are taken from ``ledger``, by name.
    """
    mine = [s for s in stored if s.service == name]
    generations = [s.generation for s in mine if s.generation is not None]
    newest = max(generations, default=0)
    found = Takeover(newest + 1, newest + 1, handovers=None)
    wanted = set(config.listen)
    by_slot: dict[tuple[ListenAddress, int], tuple[int, AdoptedListener]] = {}
    extra: dict[tuple[ListenAddress, int], tuple[int, AdoptedListener]] = {}
    for item in (s for s in mine if s.is_listener):
        try:
            sock = ledger.take_socket(item.name)
        except FdLost as lost:  # systemd vouches the fd is ours: close it
            found.note("not_a_socket", f"fd store: {lost}: closed")
            with contextlib.suppress(OSError):
                os.close(item.fd)
            continue
        address = address_of(sock)
        if address is None:
            found.note("not_a_socket", f"fd store: {item.name} is not a listener: closed")
            sock.close()
            continue
        inherited = AdoptedListener(sock, item.name, socket_cookie(sock), item.worker or 0)
        key = (address, item.worker or 0)
        gen = item.generation or 0
        slots = by_slot if key[1] < config.workers else extra
        if address not in wanted or (slots is extra and not _holds_connections(inherited)):
            found.leftovers.append((address, inherited))
            continue
        if key in slots:
            other_gen, other = slots[key]
            if _preferred((other_gen, other), (gen, inherited)) is other:
                found.leftovers.append((address, inherited))
                continue
            found.leftovers.append((address, other))
        slots[key] = (gen, inherited)
    found.listeners = {key: inherited for key, (_, inherited) in by_slot.items()}
    found.queued_slots = {key: inherited for key, (_, inherited) in extra.items()}
    return found


def keep_queued(found: Takeover, config: ServiceConfig, *, migrates: bool) -> ServiceConfig:
    """The config the first generation runs: ``config``, or, where the kernel
    cannot migrate, as many workers as it takes to serve the stored slots that
    hold queued connections, followed by a rollout to ``config`` (which
    retires the extra workers by drain, after they accepted those
    connections). Shutting those listeners down would reset what they hold.
    Where the kernel migrates, they are leftovers like any other."""
    queued, found.queued_slots = found.queued_slots, {}
    if migrates or not queued:
        found.leftovers.extend((address, item) for (address, _), item in queued.items())
        return config
    found.listeners.update(queued)
    workers = max(worker for _, worker in queued) + 1
    log.info(
        "inherited_queues_kept",
        names=[item.name for item in queued.values()],
        workers=workers,
        configured=config.workers,
    )
    found.follow_up = f"workers {workers} -> {config.workers}: the extra slots held connections"
    return config.model_copy(update={"workers": workers})


def _preferred(a: tuple[int, AdoptedListener], b: tuple[int, AdoptedListener]) -> AdoptedListener:
    """Of two stored listeners for one slot: the one with queued connections,
    else the newer generation's."""
    a_holds, b_holds = _holds_connections(a[1]), _holds_connections(b[1])
    if a_holds != b_holds:
        return a[1] if a_holds else b[1]
    return a[1] if a[0] > b[0] else b[1]


def _holds_connections(item: AdoptedListener) -> bool:
    try:
        return item.sock.type == socket.SOCK_STREAM and accept_queue(item.sock).queued > 0
    except SupervisorError:
        return False


def addresses(found: Takeover) -> set[ListenAddress]:
    return {a for a, _ in found.listeners} | {a for a, _ in found.leftovers}
