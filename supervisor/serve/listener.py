"""A listener: the supervisor's own socket for one worker on one address.

The generation owns its listeners; each ``Listener`` is the only way the
code above it touches the socket's steering: its role in the group, its
shutdown, its counters, the probes pinned to it. Every kernel failure comes
out of these verbs as a ``SupervisorError`` subclass (``SteeringError``,
``KernelError``), never as a bare OSError.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

import structlog

from supervisor.errors import SupervisorError
from supervisor.handoff.fdstore import NO_STORE, FdStore, listener_name
from supervisor.handoff.ledger import Ledger
from supervisor.handoff.state import ListenerDoc
from supervisor.kernel.sockets import (
    ListenerOptions,
    accept_queue,
    open_listener,
    receive_queue,
    reconfigure,
    socket_cookie,
)
from supervisor.plan.plan import ServicePlan
from supervisor.status import ListenerStatus
from supervisor.steering import ListenerCounts, Role, Steering, SteeringGroup
from supervisor.values import ListenAddress

log = structlog.get_logger("supervisor.serve.listener")


@dataclass(frozen=True)
class Listener:
    """One listener of one worker of one generation."""

    worker: int
    address: ListenAddress
    sock: socket.socket
    cookie: int
    group: SteeringGroup
    name: str = ""
    store: FdStore = NO_STORE  # systemd's fd store, which keeps a duplicate until told

    @property
    def tcp(self) -> bool:
        return self.address.proto == "tcp"

    def export(self, ledger: Ledger) -> ListenerDoc:
        """What the next image needs to take it over; its fd goes in ``ledger``
        under its name in systemd's fd store."""
        return ListenerDoc(
            name=ledger.put(self.name, self.sock.fileno()),
            worker=self.worker,
            address=str(self.address),
            cookie=self.cookie,
        )

    @property
    def role(self) -> Role | None:
        """Its steering role; None once it left its group (shut down or closed)."""
        return self.group.role(self.sock)

    @property
    def in_group(self) -> bool:
        return self.role is not None

    def active_peers(self) -> int:
        """How many other members of its group are active."""
        return sum(
            1
            for s in self.group.members
            if s is not self.sock and self.group.role(s) is Role.ACTIVE
        )

    def queued(self) -> int:
        """Connections waiting in its accept queue (0 once shut down).

        Raises:
            KernelError: TCP_INFO cannot be read.
        """
        if not self.tcp or self.sock.fileno() < 0:
            return 0
        depth = accept_queue(self.sock)
        return depth.queued if depth.listening else 0

    def unread(self) -> int:
        """Bytes waiting in a datagram listener's receive queue. Raises KernelError."""
        return 0 if self.tcp or self.sock.fileno() < 0 else receive_queue(self.sock).bytes

    def counts(self) -> ListenerCounts | None:
        """What the steering program counted for it (None: the backend keeps no counters).

        Raises:
            SteeringError: the counters cannot be read.
        """
        return self.group.counts(self.sock)

    def shutdown(self) -> None:
        """``shutdown(SHUT_RDWR)``: it leaves its group, its queue migrates where
        migration is on, and every holder's ``accept()`` fails with EINVAL.

        Raises:
            SteeringError: the kernel refused; it is still a member.
        """
        self.group.shutdown(self.sock)
        self.store.drop(self.name)

    def discard(self) -> None:
        """Close a member nobody else holds (a datagram one leaves its group then)."""
        self.group.discard(self.sock)
        self.store.drop(self.name)

    def refuse_migration(self) -> bool:
        """Drop requests migrating away from it; False if the backend cannot.

        Raises:
            SteeringError: the refusal could not be recorded.
        """
        return self.group.refuse_migration(self.sock)

    def set_role(self, role: Role) -> None:
        """Record a new role in the group's model; ``group.apply()`` publishes it.

        Only the generation that owns the listener calls this: roles have one writer.
        """
        self.group.set_role([self.sock], role)

    def pinned(self, host: str, sport: int) -> AbstractContextManager[None]:
        """While inside, connections from (host, sport) come to this listener."""
        return self.group.pinned(self.sock, host, sport)

    def status(self) -> ListenerStatus:
        """A snapshot for ``status``; a kernel read that fails shows as unknown (None)."""
        queued = limit = None
        if self.tcp and self.sock.fileno() >= 0:
            try:
                depth = accept_queue(self.sock)
            except SupervisorError:
                depth = None
            if depth is not None and depth.listening:
                queued, limit = depth.queued, depth.limit
        role = self.role
        return ListenerStatus(
            address=str(self.address),
            cookie=self.cookie,
            role=None if role is None else role.value,
            queued=queued,
            backlog=limit,
        )


def relieve(lst: Listener, why: str, **fields: object) -> bool:
    """Shut ``lst`` down so that its queue moves to the active listeners (where
    migration is possible); log ``{why}_listener_shut_down`` with how many
    waited, or ``{why}_listener_kept`` with the kernel's refusal (False)."""
    try:
        queued = lst.queued()
        lst.shutdown()
    except SupervisorError as exc:
        log.error(f"{why}_listener_kept", address=str(lst.address), error=str(exc), **fields)
        return False
    log.warning(f"{why}_listener_shut_down", address=str(lst.address), queued=queued, **fields)
    return True


@dataclass(frozen=True)
class AdoptedListener:
    """A listener this generation finds instead of binding one: from the image
    before an upgrade, or from systemd's fd store after a crash."""

    sock: socket.socket
    name: str
    cookie: int
    worker: int  # the slot it served


def open_listeners(
    plan: ServicePlan,
    steering: Steering,
    role: Role,
    store: FdStore = NO_STORE,
    inherited: Mapping[tuple[ListenAddress, int], AdoptedListener] | None = None,
) -> list[Listener]:
    """Create every listener of ``plan`` and enter it into its group as ``role``.

    ``inherited`` (by address and worker) are taken instead of bound: their
    options are set again from the plan, and they keep their place (and
    their name) in the group and in the fd store. New ones are put in the
    store. Runs without awaiting, so the groups' models follow each
    ``listen()`` exactly.

    Raises:
        ListenerError, SteeringError, KernelError: after releasing what was
            opened here (inherited sockets are left to their owner).
    """
    options = plan.listener_options
    inherited = inherited or {}
    listeners: list[Listener] = []
    opened: list[Listener] = []
    try:
        for worker in plan.workers:
            for address in worker.listen:
                lst = _listener(
                    plan,
                    worker.index,
                    address,
                    options=options,
                    steering=steering,
                    role=role,
                    store=store,
                    inherited=inherited.get((address, worker.index)),
                )
                listeners.append(lst)
                if (address, worker.index) not in inherited:
                    opened.append(lst)
        for group in _groups(listeners):
            group.apply()
    except BaseException:
        release_listeners(opened)
        raise
    for lst in opened:
        store.keep(lst.name, [lst.sock.fileno()])
    return listeners


def _listener(
    plan: ServicePlan,
    worker: int,
    address: ListenAddress,
    *,
    options: ListenerOptions,
    steering: Steering,
    role: Role,
    store: FdStore,
    inherited: AdoptedListener | None,
) -> Listener:
    group = steering.group(address)
    if inherited is not None:
        reconfigure(inherited.sock, address, options)
        # Whether it is a member was decided when the start took it over
        # (inherit.take_steering). One that is not was shut down already (its
        # worker was FATAL): it stays out of the group.
        if group.role(inherited.sock) is not None:
            group.set_role([inherited.sock], role)
        return Listener(
            worker, address, inherited.sock, inherited.cookie, group, inherited.name, store
        )
    sock = open_listener(address, options)
    try:
        cookie = socket_cookie(sock)
        group.join(sock, role)
    except BaseException:
        sock.close()
        raise
    name = listener_name(plan.name, plan.generation, worker, address)
    return Listener(worker, address, sock, cookie, group, name, store)


def _groups(listeners: Iterable[Listener]) -> list[SteeringGroup]:
    return list({id(lst.group): lst.group for lst in listeners}.values())


def release_listeners(listeners: list[Listener], *, preserve: bool = False) -> None:
    """Take listeners out of their groups and close them. Never raises.

    ``preserve``: only close our fds. Each listener stays as it is in the
    kernel (listening, in its group, queueing) and in systemd's fd store,
    for the next daemon: a ``systemctl restart`` loses nothing then.

    TCP members are shut down (the kernel unhashes them even if a worker's
    child still holds a copy), last index first, so that leaving moves no
    other member. UDP members leave when our close drops the last reference,
    which holds once their workers are reaped: the group closes them itself.
    A member the kernel refuses to shut down is closed all the same: once its
    last holder is gone, the close does what the shutdown would have.
    """
    if preserve:
        for lst in listeners:
            lst.sock.close()
        return
    members = [lst for lst in listeners if lst.in_group]
    members.sort(key=lambda lst: lst.group.index(lst.sock), reverse=True)
    for lst in members:
        try:
            if lst.tcp:
                lst.shutdown()
            else:
                lst.discard()
        except SupervisorError as exc:
            log.error("listener_release_failed", address=str(lst.address), error=str(exc))
            if lst.tcp:  # nobody else holds it now: closing it leaves the group
                try:
                    lst.discard()
                except SupervisorError as again:
                    log.error("listener_close_failed", address=str(lst.address), error=str(again))
    for lst in listeners:
        lst.sock.close()
