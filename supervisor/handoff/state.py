"""The state document an in-place upgrade hands to the next image.

Versioned and validated (pydantic, frozen, unknown keys refused): the new
image reads it before it trusts a single fd, and ``supervisord --check
--state-fd N`` reads one before the old image execs, so new code that cannot
read the current version is refused while the old image still serves.

Only facts the kernel cannot give back travel here: which fd is which
(the ledger: every fd by name, with its identity at the exec; everything
else refers to fds by those names, see ``handoff.ledger``), which pid is
which worker, lifecycle states and counters, the config each
service runs, the classic BPF order. eBPF roles and slots are read back
from the maps themselves.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from supervisor.errors import StateError
from supervisor.kernel import fds

VERSION = 2
READABLE = frozenset({1, 2})  # versions this code can adopt (1: fd numbers in place)


class Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FdDoc(Doc):
    """One entry of the ledger: an fd, and what it was at the exec."""

    fd: int
    identity: tuple[int, int] | None = None  # (device, inode), stamped at the exec


class ListenerDoc(Doc):
    name: str  # its name in the ledger, and in systemd's fd store
    worker: int
    address: str  # as in the config: 127.0.0.1:8080, udp://[::1]:53
    cookie: int  # SO_COOKIE: the new image checks the fd is still this socket


class WorkerDoc(Doc):
    index: int
    state: Literal["STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL"]
    pid: int | None  # None when no process runs (BACKOFF, FATAL)
    start_time: int | None  # /proc/PID/stat field 22: tells a reused pid from ours
    restarts: int
    short_runs: int
    last_exit: str | None
    start_seconds: float | None
    notify: str  # its NOTIFY_SOCKET (an abstract datagram socket), by ledger name
    # Its output pipes by ledger name, read and write ends: stdout's, then
    # stderr's (empty: it inherits the daemon's output).
    output: list[str] = Field(default_factory=list)


class GroupDoc(Doc):
    address: str
    ebpf: dict[str, str] | None = None  # maps and program: ledger names, by object
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
    """A request waiting for an answer (the upgrade's callers, and reloads asked
    for during the upgrade): the new image answers it, or carries it out."""

    connection: str | None = None  # the client's connection, by ledger name (None: no client)
    command: Literal["reload", "restart", "upgrade"]
    service: str | None = None
    reason: str | None = None
    source: str = "control"


class DaemonDoc(Doc):
    version: int = VERSION
    software: str  # the version of the image that wrote it
    config_path: str
    supervisor: dict[str, Any]  # the running [supervisor] section
    ledger: dict[str, FdDoc]  # every fd that crosses, by name; the rest refers to names
    control: str  # the control socket, by ledger name
    metrics_socket: str | None = None  # the metrics_listen socket, if any
    started_at: float  # CLOCK_MONOTONIC seconds of the first image's start
    upgrade_requested_at: float  # CLOCK_MONOTONIC seconds
    upgrades: int = 0  # in-place upgrades so far, this one included
    services: list[ServiceDoc]
    clients: list[ClientDoc] = Field(default_factory=list)  # with a connection
    pending: list[ClientDoc] = Field(default_factory=list)  # reloads without a client
    watch_seen: dict[str, dict[str, str | None]] = Field(default_factory=dict)
    last_reload: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)  # the counters (metrics.Tally)
    stopped: dict[str, dict[str, Any]] = Field(default_factory=dict)  # switch.Stopped.export()

    def numbers(self) -> list[int]:
        """Every fd the ledger names: what must survive the exec."""
        return [entry.fd for entry in self.ledger.values()]

    def stamped(self) -> DaemonDoc:
        """The document with each fd's identity as it is now (at the exec)."""
        ledger = {
            name: entry.model_copy(update={"identity": fds.identity(entry.fd)})
            for name, entry in self.ledger.items()
        }
        return self.model_copy(update={"ledger": ledger})

    def pids(self) -> set[int]:
        """The worker processes the document names."""
        return {w.pid for svc in self.services for w in svc.workers if w.pid is not None}


def encode(state: DaemonDoc) -> bytes:
    return state.model_dump_json().encode()


def decode(data: bytes) -> DaemonDoc:
    """Parse and validate a state document.

    Raises:
        StateError: not JSON, not a state document, or a version not in READABLE.
    """
    version = _version_of(data)
    if version is not None and version not in READABLE:
        raise StateError(_unknown(version))
    try:
        if version == 1:
            raw = DaemonDoc.model_validate(_converted(data))
        else:
            raw = DaemonDoc.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'document'}: {e['msg']}"
            for e in exc.errors(include_url=False)[:5]
        )
        raise StateError(f"not a state document this version can read: {problems}") from None
    if raw.version not in READABLE:
        raise StateError(_unknown(raw.version))
    return raw


def _converted(data: bytes) -> dict[str, Any]:
    """A version 1 document in this version's shape.

    Raises:
        StateError: it does not have version 1's shape.
    """
    try:
        return from_version_1(json.loads(data))
    except (KeyError, TypeError, AttributeError) as exc:
        raise StateError(f"not a version 1 state document: {exc!r}") from None


def from_version_1(old: dict[str, Any]) -> dict[str, Any]:
    """A version 1 document (what the code before the ledger writes: fd numbers
    in place, -1 for none, identities by number) in this version's shape."""
    identities = {int(fd): value for fd, value in old.get("identities", {}).items()}
    ledger: dict[str, dict[str, Any]] = {}

    def named(name: str, fd: int) -> str | None:
        if fd < 0:
            return None
        ledger[name] = {"fd": fd, "identity": identities.get(fd)}
        return name

    def client(kind: str, i: int, item: dict[str, Any]) -> dict[str, Any]:
        fd = item.get("fd", -1)
        return {**_drop(item, "fd"), "connection": named(f"{kind}/{i}", fd)}

    services = []
    for svc in old["services"]:
        name = svc["name"]
        listeners = [
            {**_drop(lst, "fd"), "name": named(lst["name"], lst["fd"])} for lst in svc["listeners"]
        ]
        workers = [
            {
                **_drop(w, "notify_fd", "output_fds"),
                "notify": named(notify_name(name, w["index"]), w["notify_fd"]),
                "output": [
                    named(output_name(name, w["index"], k), fd)
                    for k, fd in enumerate(w.get("output_fds", []))
                ],
            }
            for w in svc["workers"]
        ]
        groups = [
            {
                **g,
                "ebpf": None
                if g.get("ebpf") is None
                else {
                    obj: named(ebpf_name(name, g["address"], obj), fd)
                    for obj, fd in g["ebpf"].items()
                },
            }
            for g in svc["groups"]
        ]
        services.append({**svc, "listeners": listeners, "workers": workers, "groups": groups})
    doc = _drop(old, "identities", "control_fd", "metrics_fd")
    return {
        **doc,
        "version": VERSION,
        "control": named("control", old["control_fd"]) or "control",
        "metrics_socket": named("metrics", old.get("metrics_fd", -1)),
        "clients": [client("client", i, c) for i, c in enumerate(old.get("clients", []))],
        "pending": [client("pending", i, c) for i, c in enumerate(old.get("pending", []))],
        "services": services,
        "ledger": ledger,
    }


def _drop(item: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in keys}


# Ledger names of what is not in systemd's store (listeners use their store name).
def notify_name(service: str, index: int) -> str:
    return f"{service}/w{index}/notify"


def output_name(service: str, index: int, end: int) -> str:
    return f"{service}/w{index}/output{end}"


def ebpf_name(service: str, address: str, obj: str) -> str:
    return f"{service}/{address}/ebpf/{obj}"


def _unknown(version: int) -> str:
    known = ", ".join(str(v) for v in sorted(READABLE))
    return f"state document version {version}; this code reads version {known}"


def _version_of(data: bytes) -> int | None:
    try:
        value = json.loads(data).get("version")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None
