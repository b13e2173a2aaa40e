"""Immutable status snapshots: what ``supervisorctl status --json`` prints.

The control plane reads these; it never reaches into live objects.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Snapshot(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ListenerStatus(Snapshot):
    address: str
    cookie: int  # SO_COOKIE: the kernel's id of the supervisor's socket
    role: str | None  # steering role: active, standby, retiring; None once out of its group
    queued: int | None  # accept-queue length (TCP_INFO), None for UDP or not listening
    backlog: int | None


class WorkerStatus(Snapshot):
    index: int
    generation: int
    pid: int | None
    state: str
    restarts: int
    last_exit: str | None
    listeners: list[ListenerStatus]


class CertificateStatus(Snapshot):
    path: str
    subject: str
    not_after: str  # ISO 8601, UTC
    days_left: float


class MemberStatus(Snapshot):
    """A socket on one of a service's addresses, as the kernel lists it."""

    inode: int
    cookie: int
    uid: int
    host: str  # its local address (a neighbour's may be a wildcard or a specific one)
    ours: bool  # one of this service's listeners
    generation: int | None = None  # ours: of which generation, and which worker
    worker: int | None = None
    role: str | None = None  # ours: its steering role
    holders: list[str] = []  # not ours: "pid 123 (nginx)", each process holding it
    settings: dict[str, Any] | None = None  # not ours: as read through a duplicate
    differences: list[str] = []  # not ours: its settings unlike ours


class GroupCensus(Snapshot):
    """Who shares one listen address: the members of its reuseport group and,
    on the same port, the sockets of overlapping addresses (other groups)."""

    address: str
    members: list[MemberStatus]
    neighbours: list[MemberStatus] = []
    problems: list[str] = []  # what refuses a reload
    error: str | None = None  # the census could not be taken


class ServiceStatus(Snapshot):
    name: str
    generation: int
    state: str
    retire: str  # the path a rollout takes now: migrate or drain
    steering: str
    workers: list[WorkerStatus]  # during a rollout: the serving, candidate and retiring ones
    candidate: int | None = None  # a generation started but not yet serving
    retiring: int | None = None  # a generation steered away from, being retired
    certificate: CertificateStatus | None = None  # tls.cert as the serving generation loaded it
    last_rollout: dict[str, Any] | None = None
    census: list[GroupCensus] = []  # of each listen address (``supervisorctl census``)
    # The last times a steering self-test found a group's program not ours.
    steering_replaced: list[str] = []


class DaemonStatus(Snapshot):
    pid: int
    version: str
    config: str
    uptime: float  # seconds since the first image started (an upgrade keeps counting)
    upgrades: int = 0  # in-place upgrades since the daemon started
    last_upgrade: dict[str, Any] | None = None  # the result of the last one
    fd_store: bool = False  # listeners are kept in systemd's fd store


SCHEMA_VERSION = 1  # of status --json; raised when a field changes meaning or goes


class Status(Snapshot):
    schema_version: int = SCHEMA_VERSION
    daemon: DaemonStatus
    services: dict[str, ServiceStatus]


def render(status: Status) -> list[str]:
    """Human-readable lines for ``supervisorctl status``."""
    lines = []
    for service in status.services.values():
        stage = ""
        if service.candidate is not None:
            stage += f"  candidate {service.candidate}"
        if service.retiring is not None:
            stage += f"  retiring {service.retiring}"
        lines.append(
            f"{service.name}: {service.state}  generation {service.generation}{stage}  "
            f"retire={service.retire}  steering={service.steering}"
        )
        cert = service.certificate
        if cert is not None:
            lines.append(
                f"  certificate {cert.subject}: valid until {cert.not_after} "
                f"({cert.days_left:.1f} days left)"
            )
        if service.steering_replaced:
            lines.append(f"  STEERING: {service.steering_replaced[-1]}")
        for worker in service.workers:
            pid = "-" if worker.pid is None else str(worker.pid)
            queued = sum(lst.queued or 0 for lst in worker.listeners)
            extra = f"  last: {worker.last_exit}" if worker.restarts and worker.last_exit else ""
            gen = f"@{worker.generation}" if worker.generation != service.generation else ""
            lines.append(
                f"  worker {worker.index:<3}{gen:<4} {worker.state:<9} pid {pid:<8} "
                f"restarts {worker.restarts:<3} queued {queued}{extra}"
            )
    return lines


def render_census(status: Status) -> list[str]:
    """Human-readable lines for ``supervisorctl census``."""
    lines = []
    for service in status.services.values():
        for group in service.census:
            strangers = sum(not m.ours for m in group.members)
            lines.append(
                f"{service.name} {group.address}: {len(group.members)} member(s), "
                f"{strangers} not ours"
                + (f", {len(group.neighbours)} neighbour(s)" if group.neighbours else "")
            )
            if group.error:
                lines.append(f"  census not taken: {group.error}")
            lines += [f"  {_member(m)}" for m in group.members]
            lines += [f"  neighbour on {m.host}: {_member(m)}" for m in group.neighbours]
            lines += [f"  PROBLEM: {p}" for p in group.problems]
    return lines


def _member(member: MemberStatus) -> str:
    head = f"inode {member.inode:<9} cookie {member.cookie:<6} uid {member.uid:<6}"
    if member.ours:
        return (
            f"{head} ours: generation {member.generation} worker {member.worker} "
            f"{member.role or 'out of its group'}"
        )
    held = ", ".join(member.holders) or "no process visible here"
    unlike = f"; unlike ours: {', '.join(member.differences)}" if member.differences else ""
    return f"{head} NOT OURS: {held}{unlike}"
