"""Listeners a worker binds itself (``listen_mode = "own"``), adopted.

nginx with ``listen ... reuseport``, ``gunicorn --reuse-port``, PgBouncer
with ``so_reuseport = 1`` and most Go servers bind their own SO_REUSEPORT
sockets. Such a socket joins its reuseport group at the worker's listen(),
before the supervisor knows of it; under the eBPF program, which selects
only listeners the supervisor placed, it receives nothing meanwhile.

After each spawn the slot waits (within ``ready_timeout``) until the
worker, or one of its descendants (nginx's master binds, its workers
accept), holds a listening socket on every address of ``listen``: found by
sock_diag, matched against ``/proc/PID/fd``. A duplicate is taken with
pidfd_getfd and from then on the socket is one of the generation's
listeners like any other: standby until its worker passes its health check
(probes pinned to it), active after, retired by ``shutdown()`` on our
duplicate, which acts on the socket the worker holds too, so the program
migrates its queue.

When the process that bound them ends, its sockets stay listening through
our duplicates, with connections queued that nobody would accept: each is
steered away and shut down at once, so its queue migrates to the live
listeners. The address's last active listener is kept instead, until the
next process's listener serves, then shut down: its queue migrates there.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
import trio

from supervisor.errors import SupervisorError
from supervisor.kernel import members
from supervisor.kernel.diag import BoundSocket
from supervisor.plan.plan import WorkerPlan
from supervisor.serve.health import Connector, pinned_connector
from supervisor.serve.listener import Listener, relieve
from supervisor.steering import Role, Steering

log = structlog.get_logger("supervisor.serve.own")
# Seconds between looks for a worker's sockets. No kernel event tells of a
# bind; a cgroup BPF_CGROUP_INET4_POST_BIND hook would, at the price of a
# cgroup per service and a program per hook. Measured here: one look costs
# 0.30 ms (sock_diag of the port's listeners, then the worker tree's fds),
# a Python server listens 189 ms after its spawn, so about 10 looks and at
# most 20 ms of delay per start: not worth the hook.
POLL = 0.02
STEER_AWAY_PAUSE = 0.01  # a third ACK racing the steering change (docs/kernel.md §1)


class OwnListeners:
    """The adopted listeners of one worker slot, process after process."""

    def __init__(
        self,
        plan: WorkerPlan,
        steering: Steering,
        listeners: list[Listener],
        placed: Callable[[], None],
    ) -> None:
        """``listeners``: the generation's own list, which adopted ones join;
        ``placed``: sets and publishes the roles of this slot's listeners."""
        self.plan = plan
        self._steering = steering
        self._listeners = listeners
        self._placed = placed
        self.current: list[Listener] = []  # bound by the live process
        self._orphans: list[Listener] = []  # bound by an ended one; kept as last active

    async def adopt(self, pid: int) -> Connector:
        """Wait until ``pid`` (or a descendant) listens on every address, adopt
        each socket, place it; return a connector pinned to the first. The
        caller bounds the wait (``ready_timeout``).

        Raises:
            SupervisorError: sock_diag failed, or a duplicate could not be taken.
        """
        known = {lst.cookie for lst in self._listeners}
        found: dict[int, tuple[BoundSocket, members.Holder]] = {}
        while True:
            for i, address in enumerate(self.plan.listen):
                if i not in found:
                    fresh = [
                        pair
                        for pair in members.bound_by(pid, address)
                        if pair[0].cookie not in known
                    ]
                    if fresh:
                        found[i] = fresh[0]
            if len(found) == len(self.plan.listen):
                break
            await trio.sleep(POLL)
        for i, address in enumerate(self.plan.listen):
            bound, holder = found[i]
            sock = members.duplicate(holder)
            group = self._steering.group(address)
            try:
                group.join(sock, Role.STANDBY)
            except BaseException:
                sock.close()
                raise
            lst = Listener(self.plan.index, address, sock, bound.cookie, group)
            self._listeners.append(lst)
            self.current.append(lst)
            log.info(
                "listener_adopted",
                address=str(address),
                cookie=bound.cookie,
                holder=str(holder),
                fd=holder.fd,
            )
        self._placed()
        return pinned_connector(self.current[0])

    def missing(self) -> list[str]:
        """The addresses of ``listen`` the live process has not bound (yet)."""
        have = {lst.address for lst in self.current}
        return [str(a) for a in self.plan.listen if a not in have]

    async def release(self) -> None:
        """The process that bound ``current`` ended: steer away from its
        sockets and shut them down (their queues migrate to active
        listeners), except an address's last active one (see ``settle``)."""
        self._orphans += self.current
        self.current = []
        await self.settle()

    async def running(self) -> None:
        """The live process passed its health check: place its listeners for
        that (in an active generation, into rotation), then relieve orphans."""
        try:
            self._placed()
        except SupervisorError as exc:
            log.error("adopted_listener_not_placed", worker=self.plan.index, error=str(exc))
        await self.settle()

    async def settle(self) -> None:
        """Shut down every orphan that another active listener can relieve."""
        kept = []
        for lst in self._orphans:
            if not lst.in_group:
                continue
            if not lst.active_peers():
                kept.append(lst)  # its queue waits for the next process's listener
                continue
            if lst.role is not Role.RETIRING:
                try:
                    lst.set_role(Role.RETIRING)
                    lst.group.apply()
                except SupervisorError as exc:
                    log.error("orphan_listener_kept", address=str(lst.address), error=str(exc))
                    kept.append(lst)
                    continue
                await trio.sleep(STEER_AWAY_PAUSE)
            if not relieve(lst, "orphan", worker=self.plan.index):
                kept.append(lst)
        self._orphans = kept
