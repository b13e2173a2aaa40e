"""``docs/configuration.md`` and ``docs/config.schema.json``, made from the
config models (``python -m supervisor.config.reference docs``; ``make docs``).

Keys, defaults and the health checks' keys come from the pydantic models;
what each key means is written here, once. A field without a meaning fails
the generation (and so ``tests/unit/test_docs.py``), as does a meaning without a
field; the test also fails when the committed files are stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic.version import VERSION

from supervisor.config.schema import (
    Config,
    Health,
    ServiceConfig,
    SocketOptions,
    SupervisorSection,
    TlsFiles,
)
from supervisor.values import format_duration

SUPERVISOR: dict[str, str] = {
    "control_socket": ("unix socket of the control protocol; its directory is created if missing"),
    "control_socket_mode": ('file mode of the socket (string `"0660"` or TOML `0o660`)'),
    "control_socket_group": (
        'group of the socket file (with mode `"0660"`, its members can connect); its '
        "members are also allowed by the peer check"
    ),
    "control_allow_users": (
        "users besides root and the daemon's own user who may use the control socket. "
        "Every connection is checked with `SO_PEERCRED` (the kernel's word, not the "
        "client's); a refusal is answered with an error and logged as `control_refused` "
        "with the peer's pid, uid and gid"
    ),
    "control_allow_groups": (
        "groups (primary or supplementary, from `SO_PEERGROUPS`) whose members may use "
        "the control socket"
    ),
    "log_format": ("`auto` (JSON unless stdout is a terminal), `json`, `console`"),
    "log_level": ("`debug`, `info`, `warning`, `error`"),
    "steering": (
        "how new connections are steered within a reuseport group: `auto` (eBPF when "
        "the daemon may load it, else classic BPF), `ebpf` (needs `CAP_BPF`; otherwise "
        "a config error at start), `cbpf` (classic BPF, unprivileged). See "
        "[Steering](reloads.md#steering)"
    ),
    "steering_check": (
        "how often each eBPF-steered group is probed to prove its program is still "
        "ours (any member's `SO_ATTACH_REUSEPORT_EBPF` replaces it, as nginx's QUIC "
        "module does): one pinned connection to an active listener; a probe our "
        "program did not count is logged as `steering_program_replaced`, naming the "
        "processes that hold a reuseport program, and ours is attached again. `0` "
        "turns it off. See [Who shares a port](operations.md#who-shares-a-port)"
    ),
    "fd_store": (
        "`auto`: when systemd offers a file descriptor store (`$NOTIFY_SOCKET` set and "
        "`FileDescriptorStoreMax=` in the unit, as the shipped unit has), keep every "
        "listener in it, so a crash or a `systemctl restart` loses no queued connection "
        "(see [Crash recovery](operations.md#crash-recovery)); `off`: never"
    ),
    "state_directory": (
        "the root of the services' `{state}` directories (`ROOT/NAME`). systemd's "
        "`StateDirectory=` sets `$STATE_DIRECTORY`: under the shipped unit, "
        "`/var/lib/reuseport-supervisor`, one of the few places its sandbox lets "
        "workers write"
    ),
    "metrics_listen": (
        '`"127.0.0.1:9464"`: serve `GET /metrics` over HTTP there, from the daemon\'s '
        "event loop: OpenMetrics when the scraper's `Accept` asks for it (Prometheus "
        "does), else the text format 0.0.4. At most 16 connections at once, 10 s each. "
        "`supervisorctl metrics` gives the same text without TCP. See "
        "[Metrics](operations.md#metrics)"
    ),
    "tls_warn_before": (
        "a service's served certificate (`tls.cert`, as the reload's validation read it "
        "for its serving generation) that ends within this gets a `tls_expires_soon` "
        "warning in the log, at start and then daily; `status` shows its subject, end "
        "and days left"
    ),
    "tcp_migrate_req": (
        "`keep`: never touch the sysctl; `enable`: at start, set "
        "`net.ipv4.tcp_migrate_req=1` in the daemon's network namespace when it is 0 "
        "and the daemon may (root). Trade-off: the sysctl is per namespace, so every "
        "program there starts migrating its reuseport listeners' queues too (generally "
        "what one wants, but programs that use different socket options across one "
        "group's listeners could see requests move between them). The systemd-friendly "
        "alternative is a `sysctl.d` drop-in"
    ),
}
SERVICE: dict[str, str] = {
    "command": (
        "argv of a worker; placeholders `{fd}` (= 3, the first listener), `{worker}` "
        "(index), `{generation}`, and `{state}` and `{config_dir}` (above)"
    ),
    "workers": (
        "number of workers (1-512: a reload runs two generations in one reuseport "
        "group, and eBPF steering holds 1,024 members)"
    ),
    "listen": (
        'addresses: `"127.0.0.1:8080"`, `"[::1]:8080"`, `"tcp://0.0.0.0:80"`, '
        '`"udp://127.0.0.1:53"`. IP literals only; an address belongs to one service'
    ),
    "backlog": ("`listen()` backlog of each listener (the kernel caps it at `net.core.somaxconn`)"),
    "retire": (
        "how an old generation is retired: `migrate` (needs eBPF steering or "
        "`tcp_migrate_req=1`; otherwise a config error, never a silent loss), `drain`, "
        "or `auto` (migrate where possible, else drain). See [How a reload works](reloads.md)"
    ),
    "stop_signal": ("signal that asks a worker to stop (`SIGKILL`/`SIGSTOP` refused)"),
    "stop_timeout": ("time between `stop_signal` and SIGKILL"),
    "reopen_signal": (
        "signal the workers get when the daemon gets SIGUSR1 (log rotation): "
        '`"SIGUSR1"` for nginx. Without it SIGUSR1 changes nothing'
    ),
    "drain_timeout": (
        "bound of a drain retirement: after it the old listeners are shut down even if "
        "connections are still queued (the report counts them)"
    ),
    "ready_timeout": (
        "time a new worker has to pass its health check (at least `100ms`; with `kind = "
        '"none"`, longer than `settle`)'
    ),
    "environment": (
        "extra variables; values take the placeholders. The variables the supervisor "
        "sets ([what a worker receives](workers.md#what-a-worker-receives)) cannot be overridden"
    ),
    "user": (
        "run workers as this user/group (the supervisor must be root). Listeners are "
        "bound by the supervisor first, so ports below 1024 work"
    ),
    "group": (
        "run workers as this user/group (the supervisor must be root). Listeners are "
        "bound by the supervisor first, so ports below 1024 work"
    ),
    "working_directory": ("takes the placeholders"),
    "state_directory": (
        "what `{state}` means: the service's own writable directory (pid files, "
        "temporary files, caches). The daemon makes it (mode 0755, owned by "
        "`user`/`group`) before it starts anything of the service, and `--check` fails, "
        "naming it, if it cannot be made or written (a read-only file system: the "
        "shipped unit's sandbox). `STATE_ROOT` is `[supervisor] state_directory`. Set "
        "only where `{state}` is used, or here"
    ),
    "preflight": (
        "argv run before a reload (after the config is validated, before anything "
        'starts), e.g. `["nginx", "-t", "-c", "/etc/nginx/nginx.conf"]`; placeholders '
        "`{generation}`, `{state}`, `{config_dir}`; runs as the service (`user`, "
        "`group`, `environment`, in `working_directory`); bounded by `ready_timeout`. "
        "Non-zero exit: the reload is rejected with its output"
    ),
    "tls": (
        '`{ cert = "PATH", key = "PATH" }`: the certificate (PEM, leaf first, then its '
        "chain) and key the workers serve. Checked at start and before every reload: "
        "both parse, the key matches the certificate, the certificate is valid now (not "
        "expired, not before its start), each chain entry issued and signed the one "
        "before it. A bad pair is a config error: at start exit 2, at reload the reload "
        "is rejected and the old generation serves on. Encrypted keys are not "
        "supported. The supervisor does not pass the files to workers; put them in "
        "`command`"
    ),
    "watch": (
        "files whose change reloads this service (e.g. the certificate and key). Their "
        "directories are watched (inotify), so in-place writes, rename-over saves and "
        "symlink switches (certbot's `live/`) are all seen; the directories must exist"
    ),
    "listen_mode": (
        "`pass`: the daemon binds every listener and passes it to the worker (fds "
        "from 3, `LISTEN_FDS`). `own`: each worker binds `listen` itself with "
        "`SO_REUSEPORT` (nginx `listen ... reuseport`, `gunicorn --reuse-port`, a Go "
        "server) and gets no fds; after each spawn the daemon finds the sockets the "
        "worker (or a descendant) listens on, takes a duplicate of each (pidfd_getfd), "
        "and steers, gates, retires and migrates them like its own. Needs eBPF "
        "steering, TCP addresses, no `{fd}` and no `socket` options; see "
        "[Servers that bind their own sockets](workers.md#servers-that-bind-their-own-sockets)"
    ),
    "output": (
        "`events`: each line a worker writes to stdout or stderr becomes a "
        "`worker_output` log event with `service`, `generation`, `worker`, `pid`, "
        "`stream` and `line` (stdout at info, stderr at warning, or the level of a "
        "leading sd-daemon prefix `<3>`..`<7>`); lines are cut at 8 KiB, each pipe "
        "holds 64 KiB, and beyond 200 lines a second per stream (bursts of 2,000) lines "
        "are dropped and counted (`worker_output_dropped`); and each stream is read at "
        "most 4 MiB a second (bursts of 16 MiB): beyond that the worker waits in its "
        "own `write()` until its pipe is read again. So a worker that floods slows "
        "neither the daemon (a worker printing empty lines as fast as it can costs it "
        "about 3% of a core) nor another worker. `inherit`: workers write to the "
        "daemon's own stdout and stderr, untouched (for workers that log to files, or "
        "already tag their lines)"
    ),
    "watch_debounce": (
        "quiet time after the last change before the reload starts: a certificate and "
        "key written one after the other give one reload. A reload happens only when a "
        "watched file's content changed"
    ),
    "socket.defer_accept": ("`TCP_DEFER_ACCEPT` (duration, whole seconds, at most `1h`)"),
    "socket.fastopen": ("`TCP_FASTOPEN` queue length"),
    "socket.rcvbuf": (
        "`SO_RCVBUF`, `SO_SNDBUF` in bytes (1024 to 2147483647; the kernel caps them at "
        "`net.core.rmem_max`/`wmem_max`)"
    ),
    "socket.sndbuf": (
        "`SO_RCVBUF`, `SO_SNDBUF` in bytes (1024 to 2147483647; the kernel caps them at "
        "`net.core.rmem_max`/`wmem_max`)"
    ),
}
KINDS: dict[str, str] = {
    "none": ("the process stayed alive for `settle`"),
    "notify": ("the worker process itself sends `READY=1` to its `NOTIFY_SOCKET` (the demo does)"),
    "tcp": (
        "the worker accepts a connection to its own listener (first TCP address). The "
        "listener is the supervisor's, so the kernel completes the handshake by itself; "
        "the check passes only once sock_diag shows the probe's connection off the "
        "accept queue (its server side has a socket file, or was closed already): a "
        "worker that holds its listener and never accepts fails at `ready_timeout`. "
        "Without sock_diag (a seccomp filter, say) it cannot tell, and fails with that "
        "reason: use `http`, `tls`, `notify` or `exec` then"
    ),
    "http": (
        "`GET path` on the worker's own listener answers 2xx (the answer is parsed by "
        'h11: one that is not HTTP/1 fails the check and says so). `scheme = "https"`: '
        "over TLS, with `host` as the SNI name; the chain is not verified (the check "
        "asks whether the worker answers; `tls` compares the certificate)"
    ),
    "tls": (
        "a TLS handshake with the worker's own listener presents exactly the "
        "certificate in `tls.cert` as it was read for the generation: by the reload's "
        "validation (or at the start), so a cutover happens only once the checked "
        "certificate is served, and a worker respawned after the file changed gets no "
        "traffic until a reload checks the new one (needs `tls`; the chain is not "
        "verified, so a private CA is fine)"
    ),
    "exec": (
        "`command` exits 0; placeholders as in `command`. It runs as the service: its "
        "`user` and `group`, its `environment` (and the `SUPERVISOR_*` variables of the "
        "worker it checks), in its `working_directory`, so a relative path resolves "
        "there, as `--check` checks it"
    ),
}

SERVICE.update(
    {
        "tls.cert": "the certificate file: PEM, the leaf first, then its chain",
        "tls.key": "its private key (PEM, not encrypted)",
    }
)
HEALTH_KEYS: dict[str, str] = {
    "settle": "how long the process must stay alive",
    "timeout": "bound of one attempt",
    "interval": "pause between attempts (until ``ready_timeout``)",
    "path": "the request path",
    "host": "the Host header (and the SNI name with https)",
    "scheme": '`"http"` or `"https"`',
    "server_name": "the SNI name sent",
    "command": "argv of the check",
}
# Where the model's default says less than the truth.
DEFAULTS: dict[str, str] = {
    "supervisor.control_socket_mode": '`"0600"`',
    "supervisor.state_directory": "`$STATE_DIRECTORY`, else `/var/lib/reuseport-supervisor`",
    "supervisor.metrics_listen": "unset (off)",
    "services.working_directory": "unset (the daemon's)",
    "services.state_directory": "`STATE_ROOT/NAME`",
    "services.reopen_signal": "none",
}

INTRO = """\
# Configuration reference

<!-- Made by `make docs` (python -m supervisor.config.reference docs) from the
config models: edit supervisor/config/reference.py, not this file. -->

The config file is TOML. Unknown keys are errors. Durations are read as
systemd.time(7) reads them: a number and a unit (`500ms`, `30s`, `2m` or
`2min`, `1h`, `14d`, `1w`; decimals allowed), compound forms (`1m30s`,
`"1h 30min"`), or bare seconds (`"30"`, or a TOML number). A duration is
finite and at most `366d` (`nan` and `inf` are errors). Names (services,
environment variables) are matched whole, and no value the kernel takes (a
command's arguments, a variable, a user or group) may hold a NUL. Relative
paths are relative to the config file's directory. The config file,
watched files and TLS files must be regular files (a FIFO or a device is
refused by name, never read). `supervisord -c FILE --check` judges a file
without starting anything. Editors that read JSON Schema can check a file
against [config.schema.json](config.schema.json).

Three placeholders are expanded as the file is read, in a service's
`command`, `preflight`, `environment` values, `working_directory` and exec
check `command`, so `--check` prints the values themselves: `{config_dir}`,
the config file's directory (for programs that resolve relative paths
against something else: nginx's `-c` is relative to its `-p` prefix);
`{state}`, the service's `state_directory`; and `{python}`, the interpreter
the supervisor runs on (`{python} -m package` runs a Python program
installed beside it, from any install). `{worker}`, `{generation}` and
`{fd}` differ per process and are expanded for each one.
"""

PROBES = """\
`tcp`, `http` and `tls` probes are pinned to the worker's own listener: the
probe binds its source port, and the group's steering program sends that
exact (source address, source port) to the listener under test, even while
it is standby. So the check proves the very socket that will take traffic,
not a sibling that happens to answer. A wildcard listen address (`0.0.0.0`,
`::`) is probed on loopback.
"""


def default(where: str, field: FieldInfo) -> str:
    """The default as a config file would write it."""
    if where in DEFAULTS:
        return DEFAULTS[where]
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, float):  # every float of the config is a duration
        return f'`"{format_duration(value)}"`'
    if isinstance(value, str | Path):
        return f'`"{value}"`'
    return f"`{json.dumps(value)}`"


def _rows(
    prefix: str, model: type[BaseModel], meanings: dict[str, str], skip: tuple[str, ...] = ()
) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        key = f"{prefix}{name}"
        if key not in meanings:
            raise KeyError(f"{model.__name__}.{name}: no meaning in config/reference.py")
        where = ("supervisor." if model is SupervisorSection else "services.") + key
        rows.append(f"| `{key}` | {default(where, field)} | {meanings[key]} |")
    return rows


def _kinds() -> list[str]:
    rows = []
    for model in get_args(get_args(Health)[0]):
        (kind,) = get_args(model.model_fields["kind"].annotation)  # Literal["..."]
        keys = []
        for name, field in model.model_fields.items():
            if name == "kind":
                continue
            if name not in HEALTH_KEYS:
                raise KeyError(f"{model.__name__}.{name}: no meaning in config/reference.py")
            keys.append(f"`{name}` ({default('health.' + name, field)}): {HEALTH_KEYS[name]}")
        label = f"`{kind}` (default)" if kind == "none" else f"`{kind}`"
        rows.append(f"| {label} | {'; '.join(keys)} | {KINDS[kind]} |")
    return rows


def markdown() -> str:
    """The whole of docs/configuration.md."""
    used = set()
    lines = [INTRO, "## `[supervisor]`", "", "| key | default | meaning |", "|---|---|---|"]
    lines += _rows("", SupervisorSection, SUPERVISOR)
    used |= {f"supervisor.{k}" for k in SupervisorSection.model_fields}
    lines += [
        "",
        "## `[services.NAME]`",
        "",
        "`NAME`: letters, digits, `_`, `-`, `.`; at most 64 characters.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    lines += _rows("", ServiceConfig, SERVICE, skip=("socket", "health"))
    lines += _rows("tls.", TlsFiles, SERVICE)
    lines += _rows("socket.", SocketOptions, SERVICE)
    lines += [
        "",
        "## `[services.NAME.health]`",
        "",
        "When a newly spawned worker counts as RUNNING. `kind` selects the check:",
        "",
        "| kind | keys (default): meaning | healthy when |",
        "|---|---|---|",
        *_kinds(),
        "",
        PROBES,
    ]
    fields = {*ServiceConfig.model_fields, *(f"tls.{k}" for k in TlsFiles.model_fields)}
    fields |= {f"socket.{k}" for k in SocketOptions.model_fields}
    unknown = set(SERVICE) - fields | set(SUPERVISOR) - set(SupervisorSection.model_fields)
    if unknown:
        raise KeyError(f"meanings of keys no model has: {sorted(unknown)}")
    return "\n".join(lines)


def schema() -> str:
    """docs/config.schema.json: the models' JSON Schema, with the meanings."""
    document: dict[str, Any] = Config.model_json_schema(mode="validation")
    document["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    document["title"] = "reuseport-supervisor configuration"
    # Each pydantic release words the same schema a little differently: the
    # staleness test compares the text only when made with the same one.
    document["$comment"] = f"made from the config models by make docs, pydantic {VERSION}"
    described = {
        "SupervisorSection": SUPERVISOR,
        "ServiceConfig": SERVICE,
        "SocketOptions": {k.removeprefix("socket."): v for k, v in SERVICE.items()},
        "TlsFiles": {k.removeprefix("tls."): v for k, v in SERVICE.items()},
    }
    sections = {"socket": "listener options: the socket.* keys", "health": "the health check"}
    for name, meanings in described.items():
        for key, spec in document["$defs"][name]["properties"].items():
            spec["description"] = meanings.get(key) or sections[key]
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def write(folder: Path) -> list[Path]:
    out = [folder / "configuration.md", folder / "config.schema.json"]
    out[0].write_text(markdown())
    out[1].write_text(schema())
    return out


if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs")):
        print(path)
