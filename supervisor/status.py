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
