"""The state document an in-place upgrade hands to the next image.

Versioned and validated (pydantic, frozen, unknown keys refused): the new
image reads it before it trusts a single fd, and ``supervisord --check
--state-fd N`` reads one before the old image execs, so new code that cannot
read the current version is refused while the old image still serves.

Only facts the kernel cannot give back travel here: which fd is which,
which pid is which worker, lifecycle states and counters, the config each
service runs, the classic BPF order. eBPF roles and slots are read back
from the maps themselves.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from supervisor.errors import StateError
from supervisor.kernel import fds

VERSION = 1
READABLE = frozenset({1})  # versions this code can adopt


class Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ListenerDoc(Doc):
    fd: int
    worker: int
    address: str  # as in the config: 127.0.0.1:8080, udp://[::1]:53
    cookie: int  # SO_COOKIE: the new image checks the fd is still this socket
    name: str  # its name in systemd's fd store


class WorkerDoc(Doc):
    index: int
    state: Literal["STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL"]
    pid: int | None  # None when no process runs (BACKOFF, FATAL)
    start_time: int | None  # /proc/PID/stat field 22: tells a reused pid from ours
    restarts: int
    short_runs: int
    last_exit: str | None
    start_seconds: float | None
    notify_fd: int  # its NOTIFY_SOCKET (an abstract datagram socket)
    # Its output pipes, read and write ends: stdout's, then stderr's (empty: inherit).
    output_fds: list[int] = Field(default_factory=list)


class GroupDoc(Doc):
    address: str
    ebpf: dict[str, int] | None = None  # map and program fds, by name
    order: list[tuple[int, str]] | None = None  # classic BPF: (cookie, role) in socks[] order


class ServiceDoc(Doc):
    name: str
    config: dict[str, Any]  # the ServiceConfig it runs, as the config file would say it
    steering: Literal["ebpf", "cbpf"]
    generation: int
    last_generation: int
    listeners: list[ListenerDoc]
    workers: list[WorkerDoc]
    groups: list[GroupDoc]
    last_rollout: dict[str, Any] | None = None


class ClientDoc(Doc):
    """A control client waiting for an answer (the upgrade's callers, and
    reloads asked for during the upgrade): the new image answers it."""

    fd: int
    command: Literal["reload", "restart", "upgrade"]
    service: str | None = None
    reason: str | None = None
    source: str = "control"


class DaemonDoc(Doc):
    version: int = VERSION
    software: str  # the version of the image that wrote it
    config_path: str
    supervisor: dict[str, Any]  # the running [supervisor] section
    control_fd: int
    started_at: float  # CLOCK_MONOTONIC seconds of the first image's start
    upgrade_requested_at: float  # CLOCK_MONOTONIC seconds
    upgrades: int = 0  # in-place upgrades so far, this one included
    services: list[ServiceDoc]
    clients: list[ClientDoc] = Field(default_factory=list)
    pending: list[ClientDoc] = Field(default_factory=list)  # reloads without a client
    watch_seen: dict[str, dict[str, str | None]] = Field(default_factory=dict)
    last_reload: str | None = None
    identities: dict[int, tuple[int, int]] = Field(default_factory=dict)  # fd -> (dev, inode)
    metrics: dict[str, Any] = Field(default_factory=dict)  # the counters (metrics.Tally)
    metrics_fd: int = -1  # the metrics_listen socket, if any
    stopped: dict[str, dict[str, Any]] = Field(default_factory=dict)  # switch.Stopped.export()

    def fds(self) -> list[int]:
        """Every fd the document names: what must survive the exec (-1: none)."""
        out = [self.control_fd, self.metrics_fd, *(client.fd for client in self.clients)]
        for service in self.services:
            out += [lst.fd for lst in service.listeners]
            out += [worker.notify_fd for worker in service.workers]
            out += [fd for worker in service.workers for fd in worker.output_fds]
            for group in service.groups:
                out += list((group.ebpf or {}).values())
        return [fd for fd in out if fd >= 0]

    def with_identities(self) -> DaemonDoc:
        """The document with the identity of each of its fds recorded (at the exec)."""
        found = {fd: fds.identity(fd) for fd in self.fds()}
        return self.model_copy(update={"identities": {k: v for k, v in found.items() if v}})

    def pids(self) -> set[int]:
        """The worker processes the document names."""
        return {w.pid for svc in self.services for w in svc.workers if w.pid is not None}

    def lost(self) -> set[int]:
        """The fds that are not what the old image handed over (closed, or reused
        for something else): the very first check of the new image, before it
        opens anything that could take their numbers."""
        return {fd for fd in self.fds() if fds.identity(fd) != self.identities.get(fd)}

    def without(self, lost: set[int]) -> DaemonDoc:
        """The document with ``lost`` fds replaced by -1: nobody may use or close them."""
        if not lost:
            return self

        def fd(number: int) -> int:
            return -1 if number in lost else number

        services = [
            svc.model_copy(
                update={
                    "listeners": [x.model_copy(update={"fd": fd(x.fd)}) for x in svc.listeners],
                    "workers": [
                        w.model_copy(
                            update={
                                "notify_fd": fd(w.notify_fd),
                                "output_fds": [fd(x) for x in w.output_fds],
                            }
                        )
                        for w in svc.workers
                    ],
                    "groups": [
                        g.model_copy(
                            update={
                                "ebpf": None
                                if g.ebpf is None
                                else {k: fd(v) for k, v in g.ebpf.items()}
                            }
                        )
                        for g in svc.groups
                    ],
                }
            )
            for svc in self.services
        ]
        return self.model_copy(
            update={
                "control_fd": fd(self.control_fd),
                "metrics_fd": fd(self.metrics_fd),
                "clients": [c for c in self.clients if c.fd not in lost],
                "services": services,
            }
        )


def encode(state: DaemonDoc) -> bytes:
    return state.model_dump_json().encode()


def decode(data: bytes) -> DaemonDoc:
    """Parse and validate a state document.

    Raises:
        StateError: not JSON, not a state document, or a version not in READABLE.
    """
    try:
        raw = DaemonDoc.model_validate_json(data)
    except ValidationError as exc:
        version = _version_of(data)
        if version is not None and version not in READABLE:
            raise StateError(_unknown(version)) from None
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'document'}: {e['msg']}"
            for e in exc.errors(include_url=False)[:5]
        )
        raise StateError(f"not a state document this version can read: {problems}") from None
    if raw.version not in READABLE:
        raise StateError(_unknown(raw.version))
    return raw


def _unknown(version: int) -> str:
    known = ", ".join(str(v) for v in sorted(READABLE))
    return f"state document version {version}; this code reads version {known}"


def _version_of(data: bytes) -> int | None:
    try:
        value = json.loads(data).get("version")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None
