"""The config schema: frozen pydantic models in the shape of docs/design.md.

Models are pure: they check types, ranges and cross-field rules. Facts about
the host (does the command exist, does the user exist) are checked by
``loader.check_host`` so that unit tests can validate configs anywhere.
Relative paths are resolved against the config file's directory, passed as
validation context ``base_dir``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from supervisor.values import Duration, Listen, ListenAddress, SignalName, Text

DEFAULT_CONTROL_SOCKET = Path("/run/reuseport-supervisor/control.sock")
MAX_WORKERS = 512
MIN_READY_TIMEOUT = 0.1
# Matched whole (fullmatch): "$" would let a trailing newline through, and a
# service name becomes part of fd-store names and systemd's STATUS=.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Variables the supervisor sets itself for each worker; configuring them is an error.
RESERVED_ENV = frozenset(
    {
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "SUPERVISOR_SERVICE",
        "SUPERVISOR_GENERATION",
        "SUPERVISOR_WORKER",
    }
)


class Model(BaseModel):
    """Base of every config model: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if base is not None and not path.is_absolute():
        return (Path(base) / path).resolve()
    return path


def _resolve_optional(path: Path | None, info: ValidationInfo) -> Path | None:
    return None if path is None else _resolve(path, info)


class SupervisorSection(Model):
    """``[supervisor]``: settings of the daemon itself."""

    control_socket: Path = DEFAULT_CONTROL_SOCKET
    control_socket_mode: Annotated[
        int, WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}]})
    ] = Field(default=0o600, ge=0, le=0o777)
    control_socket_group: str | None = None  # the socket file's group; its members may connect
    control_allow_users: list[str] = Field(default_factory=list)
    control_allow_groups: list[str] = Field(default_factory=list)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "enable": switch net.ipv4.tcp_migrate_req on at start when we may. It is
    # per network namespace: every program in the namespace then migrates.
    tcp_migrate_req: Literal["keep", "enable"] = "keep"
    # "auto": eBPF where it can be loaded (CAP_BPF), else classic BPF.
    steering: Literal["auto", "ebpf", "cbpf"] = "auto"
    # "auto": keep every listener in systemd's fd store when systemd offers one
    # (NOTIFY_SOCKET set and FileDescriptorStoreMax= in the unit): a crash or a
    # restart then loses no queued connection. "off": never.
    fd_store: Literal["auto", "off"] = "auto"
    # How often each eBPF-steered group is probed to prove its program is still
    # ours (a member's SO_ATTACH_REUSEPORT_EBPF replaces it); 0 turns it off.
    steering_check: Duration = 5.0
    # A served certificate this close to its end gets a daily tls_expires_soon warning.
    tls_warn_before: Duration = 14 * 86400.0
    # Opt-in: serve GET /metrics (OpenMetrics) over HTTP here. Off by default:
    # `supervisorctl metrics` gives the same text over the control socket.
    metrics_listen: Listen | None = None
    # Where each service's {state} directory goes (STATE_ROOT/NAME): by default
    # $STATE_DIRECTORY (systemd's StateDirectory=), else /var/lib/reuseport-supervisor.
    state_directory: Path | None = None

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_over_tcp(cls, value: ListenAddress | None) -> ListenAddress | None:
        if value is not None and value.proto != "tcp":
            raise ValueError("metrics are served over HTTP: a TCP address like '127.0.0.1:9464'")
        return value

    @field_validator("state_directory")
    @classmethod
    def _state_directory(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve_optional(value, info)

    @field_validator("control_socket")
    @classmethod
    def _control_socket_path(cls, value: Path, info: ValidationInfo) -> Path:
        path = _resolve(value, info)
        if len(str(path).encode()) > 107:
            raise ValueError(f"{path} is longer than a unix socket path may be (107 bytes)")
        return path

    @field_validator("control_socket_mode", mode="before")
    @classmethod
    def _octal_mode(cls, value: object) -> object:
        # TOML has 0o600 integers, but operators write "0600"; accept both.
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                raise ValueError(f"{value!r} is not an octal file mode like '0600'") from None
        return value


class HealthNone(Model):
    """Healthy once the process has stayed alive for ``settle``."""

    kind: Literal["none"] = "none"
    settle: Duration = 0.5


class HealthNotify(Model):
    """Healthy once the worker sends ``READY=1`` to its ``NOTIFY_SOCKET``."""

    kind: Literal["notify"]


class HealthTcp(Model):
    """Healthy once a TCP connect to the worker's first listen address succeeds."""

    kind: Literal["tcp"]
    timeout: Duration = 5.0
    interval: Duration = 0.1


class HealthHttp(Model):
    """Healthy once ``GET path`` on the worker's first listen address answers 2xx."""

    kind: Literal["http"]
    path: str = "/healthz"
    host: str | None = None
    # "https": the probe speaks TLS first (the worker serves it itself). The
    # chain is not verified: the probe asks whether the worker answers.
    scheme: Literal["http", "https"] = "http"
    timeout: Duration = 5.0
    interval: Duration = 0.1

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/") or not value.isprintable() or " " in value:
            raise ValueError("must be an absolute request path like '/healthz'")
        return value

    @field_validator("host")
    @classmethod
    def _host_header(cls, value: str | None) -> str | None:
        # It becomes a line of the probe's request: no spaces, no line breaks.
        if value is not None and (not value.isprintable() or " " in value or not value):
            raise ValueError("must be a host name like 'example.com' (no spaces or controls)")
        return value


class HealthExec(Model):
    """Healthy once ``command`` exits 0 (placeholders {worker}, {generation}, {fd})."""

    kind: Literal["exec"]
    command: list[Text] = Field(min_length=1)
    timeout: Duration = 5.0
    interval: Duration = 0.5


class HealthTls(Model):
    """Healthy once a TLS handshake with the worker's own listener presents the
    certificate in the service's ``tls.cert`` file."""

    kind: Literal["tls"]
    server_name: str | None = None  # SNI; default: none sent
    timeout: Duration = 5.0
    interval: Duration = 0.1


Health = Annotated[
    HealthNone | HealthNotify | HealthTcp | HealthHttp | HealthTls | HealthExec,
    Field(discriminator="kind"),
]


class SocketOptions(Model):
    """Options set on every listener of a service before it listens."""

    # The kernel takes whole seconds as an int; past an hour it waits no longer.
    defer_accept: Annotated[Duration, Field(le=3600)] | None = None
    fastopen: int | None = Field(default=None, ge=1, le=65535)
    # setsockopt takes a C int; the kernel caps the value at net.core.[rw]mem_max.
    rcvbuf: int | None = Field(default=None, ge=1024, le=2**31 - 1)
    sndbuf: int | None = Field(default=None, ge=1024, le=2**31 - 1)


class TlsFiles(Model):
    """``tls = { cert = ..., key = ... }``: what the service serves (PEM; chain after leaf)."""

    cert: Path
    key: Path

    @field_validator("cert", "key")
    @classmethod
    def _paths(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)


class ServiceConfig(Model):
    """``[services.NAME]``: one program run as N workers on M listen addresses."""

    command: list[Text] = Field(min_length=1)
    # A reload runs two generations in one reuseport group: eBPF steering holds
    # 1,024 members (ebpf_program.SLOTS), and classic BPF's program for 512
    # active listeners with every candidate pinned is 3,595 of 4,096 instructions.
    workers: int = Field(default=1, ge=1, le=MAX_WORKERS)
    listen: list[Listen] = Field(min_length=1)
    backlog: int = Field(default=1024, ge=1, le=65535)
    retire: Literal["auto", "migrate", "drain"] = "auto"
    stop_signal: SignalName = "SIGTERM"
    # What the workers are sent when the daemon gets SIGUSR1 (logrotate's
    # postrotate, `systemctl kill -s USR1`): nginx's is SIGUSR1. None: nothing.
    reopen_signal: SignalName | None = None
    stop_timeout: Duration = 30.0
    drain_timeout: Duration = 30.0
    # No process starts and passes a check in less: a ready_timeout of 0
    # passed --check, and then no worker could ever be ready.
    ready_timeout: Annotated[Duration, Field(ge=MIN_READY_TIMEOUT)] = 30.0
    environment: dict[str, Text] = Field(default_factory=dict)
    user: Text | None = None
    group: Text | None = None
    working_directory: Path | None = None
    # What {state} in command, preflight, environment and working_directory
    # means: a directory the daemon creates (mode 0755, owned by user/group)
    # before it starts anything of the service. Set by the loader when {state}
    # is used: [supervisor] state_directory / NAME.
    state_directory: Path | None = None
    preflight: list[Text] | None = Field(default=None, min_length=1)
    socket: SocketOptions = SocketOptions()
    health: Health = HealthNone()
    tls: TlsFiles | None = None
    watch: list[Path] = Field(default_factory=list)
    watch_debounce: Duration = 1.0
    # "events": the workers' stdout and stderr become worker_output log events
    # (service, generation, worker, stream); "inherit": they write to the
    # daemon's own stdout and stderr, untouched (workers that log to files).
    output: Literal["events", "inherit"] = "events"
    # "pass": the supervisor binds every listener and passes it (LISTEN_FDS).
    # "own": each worker binds `listen` itself (SO_REUSEPORT); the supervisor
    # finds those sockets and adopts them (needs eBPF steering and ptrace rights).
    listen_mode: Literal["pass", "own"] = "pass"

    @model_validator(mode="after")
    def _own_listeners(self) -> ServiceConfig:
        if self.listen_mode != "own":
            return self
        if any(address.proto != "tcp" for address in self.listen):
            raise ValueError('listen_mode = "own" adopts TCP listeners only: drop the udp:// ones')
        if any("{fd}" in arg for arg in self.command):
            raise ValueError(
                'listen_mode = "own": the worker binds its own sockets and gets no fds, '
                "so {fd} has no meaning in command"
            )
        if self.socket != SocketOptions():
            raise ValueError(
                'listen_mode = "own": the worker sets its own socket options; '
                "remove [services.NAME.socket]"
            )
        return self

    @field_validator("watch")
    @classmethod
    def _watch(cls, value: list[Path], info: ValidationInfo) -> list[Path]:
        return [_resolve(path, info) for path in value]

    @model_validator(mode="after")
    def _tls_check_needs_files(self) -> ServiceConfig:
        if self.health.kind == "tls" and self.tls is None:
            raise ValueError(
                'health kind "tls" compares the served certificate with tls.cert: '
                "set tls = { cert = ..., key = ... }"
            )
        return self

    @model_validator(mode="after")
    def _settle_within_ready_timeout(self) -> ServiceConfig:
        if isinstance(self.health, HealthNone) and self.health.settle >= self.ready_timeout:
            raise ValueError(
                f"health.settle ({self.health.settle:g}s) must be shorter than ready_timeout "
                f"({self.ready_timeout:g}s): a worker is healthy only once it stayed up that long"
            )
        return self

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        if not value[0].strip():
            raise ValueError("the program name (first element) is empty")
        return value

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            if key in RESERVED_ENV:
                raise ValueError(f"{key} is set by the supervisor for each worker")
        return value

    @field_validator("working_directory", "state_directory")
    @classmethod
    def _directories(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve_optional(value, info)

    @field_validator("listen")
    @classmethod
    def _unique_listen(cls, value: list[ListenAddress]) -> list[ListenAddress]:
        seen: set[ListenAddress] = set()
        for address in value:
            if address in seen:
                raise ValueError(f"{address} is listed twice")
            seen.add(address)
        return value


class Config(Model):
    """The whole file."""

    supervisor: SupervisorSection = SupervisorSection()
    services: dict[str, ServiceConfig] = Field(min_length=1)

    @field_validator("services")
    @classmethod
    def _service_names(cls, value: dict[str, ServiceConfig]) -> dict[str, ServiceConfig]:
        for name in value:
            if not _NAME.fullmatch(name):
                raise ValueError(
                    f"service name {name!r}: use letters, digits, '_', '-', '.' (at most 64)"
                )
        return value

    @model_validator(mode="after")
    def _no_shared_address(self) -> Config:
        # Two services on one address would join one reuseport group and take
        # each other's connections.
        owner: dict[ListenAddress, str] = {}
        for name, service in self.services.items():
            for address in service.listen:
                if address in owner:
                    raise ValueError(
                        f"services.{name}.listen: {address} is already used by "
                        f"services.{owner[address]}"
                    )
                owner[address] = name
        return self
