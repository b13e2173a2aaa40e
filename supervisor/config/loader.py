"""Read a config file into a validated ``Config``, or fail listing every issue.

Three stages, each adding issues with field paths: TOML syntax (tomllib),
schema (pydantic), and the host (commands on PATH, users, directories).
Nothing here touches a running service.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import ValidationError

from supervisor.config.placeholders import expand
from supervisor.config.schema import (
    DEFAULT_CONTROL_SOCKET,
    Config,
    ServiceConfig,
    SupervisorSection,
)
from supervisor.errors import ConfigError, ConfigIssue
from supervisor.kernel.files import private_tmp, read_regular
from supervisor.values import Served

CONFIG_LIMIT = 4 << 20
_HEALTH_KINDS = frozenset({"none", "notify", "tcp", "http", "tls", "exec"})
_MESSAGE_REWRITES = {
    "Extra inputs are not permitted": "unknown key",
    "Field required": "required",
}


def load_config(
    path: Path, *, check_host_facts: bool = True, certificates: dict[str, Served] | None = None
) -> Config:
    """Load, validate and (by default) check ``path`` against this host;
    ``certificates`` gets each service's certificate as the check read it.

    Raises:
        ConfigError: listing every issue found, each with its field path.
    """
    source = str(path)
    try:
        text = read_regular(path, CONFIG_LIMIT).decode("utf-8")
    except OSError as exc:  # seam: the config file, read as ConfigError
        raise ConfigError(source, [ConfigIssue("", f"cannot read {path}: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [ConfigIssue("", f"not UTF-8 text: {exc}")]) from exc
    config = parse_config(text, source=source, base_dir=path.resolve().parent)
    if check_host_facts:
        issues = list(check_host(config, certificates))
        if issues:
            raise ConfigError(source, issues)
    return config


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Parse TOML text, expand its placeholders (``environ``: where
    ``$STATE_DIRECTORY`` is read, by default the daemon's environment) and
    validate it against the schema (no host checks).

    Raises:
        ConfigError: for a syntax error, or listing every schema issue.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [ConfigIssue("", f"TOML syntax: {exc}")]) from exc
    try:
        data = expand(data, base_dir or Path.cwd(), os.environ if environ is None else environ)
        return Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(source, issues_from_validation(exc)) from exc


def issues_from_validation(exc: ValidationError) -> list[ConfigIssue]:
    """Turn pydantic's errors into ``ConfigIssue``s with dotted field paths."""
    issues = []
    for error in exc.errors(include_url=False):
        parts = [str(p) for p in error["loc"]]
        # A discriminated union adds the tag ("http") after "health": drop it.
        parts = [
            p
            for i, p in enumerate(parts)
            if not (i and parts[i - 1] == "health" and p in _HEALTH_KINDS)
        ]
        message = str(error["msg"]).removeprefix("Value error, ")
        message = _MESSAGE_REWRITES.get(message, message)
        issues.append(ConfigIssue(".".join(parts), message))
    return issues


def check_host(
    config: Config, certificates: dict[str, Served] | None = None
) -> Iterable[ConfigIssue]:
    """Yield what this host cannot do of ``config``: missing programs, users,
    dirs, certificates (``certificates`` gets those read, see ``tls.check_config``)."""
    for name, service in config.services.items():
        yield from _check_service(f"services.{name}", service)
    if any(service.tls is not None for service in config.services.values()):
        from supervisor.config import tls  # noqa: PLC0415  (only with [tls]: see tls.py)

        yield from tls.check_config(config, certificates)
    yield from check_names(config.supervisor)


def host_warnings(config: Config) -> list[str]:
    """What works here but will surprise an operator: printed by ``--check``
    and logged at start, never refused (the daemon itself is unaffected)."""
    out = []
    control = config.supervisor.control_socket
    if private_tmp(control.parent):
        out.append(
            f"supervisor.control_socket: {control.parent} is this service's private /tmp "
            "(systemd's PrivateTmp=yes): supervisorctl outside the unit cannot reach "
            f"{control}; leave the key out for {DEFAULT_CONTROL_SOCKET}"
        )
    return out


def _check_service(where: str, service: ServiceConfig) -> Iterable[ConfigIssue]:
    cwd = service.working_directory
    if cwd is not None and not cwd.is_dir():
        yield ConfigIssue(f"{where}.working_directory", f"{cwd} is not a directory")
    path_var = service.environment.get("PATH", os.environ.get("PATH", os.defpath))
    yield from _check_program(f"{where}.command", service.command[0], path_var, cwd)
    if service.preflight is not None:
        yield from _check_program(f"{where}.preflight", service.preflight[0], path_var, cwd)
    if service.health.kind == "exec":
        yield from _check_program(
            f"{where}.health.command", service.health.command[0], path_var, cwd
        )
    if service.state_directory is not None:
        yield from _check_writable(f"{where}.state_directory", service.state_directory)
    for index, path in enumerate(service.watch):
        if not path.parent.is_dir():
            yield ConfigIssue(
                f"{where}.watch.{index}", f"{path.parent} is not a directory: nothing to watch"
            )
    if service.user is not None:
        try:
            pwd.getpwnam(service.user)
        except KeyError:
            yield ConfigIssue(f"{where}.user", f"no such user {service.user!r}")
    if service.group is not None:
        try:
            grp.getgrnam(service.group)
        except KeyError:
            yield ConfigIssue(f"{where}.group", f"no such group {service.group!r}")
    if (service.user is not None or service.group is not None) and os.geteuid() != 0:
        yield ConfigIssue(
            f"{where}.user", "switching user or group needs the supervisor to run as root"
        )


def _check_writable(where: str, path: Path) -> Iterable[ConfigIssue]:
    """``path`` is a directory the daemon can make, and write in once made."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        yield ConfigIssue(where, f"{existing} is not a directory")
    elif os.statvfs(existing).f_flag & os.ST_RDONLY:
        yield ConfigIssue(
            where,
            f"{existing} is on a read-only file system; under systemd's ProtectSystem= a "
            "unit writes only where StateDirectory= (the default: $STATE_DIRECTORY), "
            "ReadWritePaths= or LogsDirectory= say",
        )
    elif not os.access(existing, os.W_OK):
        yield ConfigIssue(where, f"{existing} is not writable by the supervisor")


def _check_program(
    where: str, program: str, path_var: str, cwd: Path | None
) -> Iterable[ConfigIssue]:
    if "/" in program:
        candidate = Path(program) if cwd is None else cwd / program
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            yield ConfigIssue(where, f"{program} is not an executable file")
    elif shutil.which(program, path=path_var) is None:
        yield ConfigIssue(where, f"{program!r} was not found on PATH")


def environment_for_workers(base: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment minus what belongs to the daemon alone.

    systemd's ``NOTIFY_SOCKET``, ``LISTEN_*`` and ``WATCHDOG_*`` address the
    daemon; a worker that saw them would talk to systemd in our name.
    """
    private = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
    return {
        k: v
        for k, v in base.items()
        if k not in private and not k.startswith(("WATCHDOG_", "SUPERVISOR_"))
    }


def check_names(section: SupervisorSection) -> list[ConfigIssue]:
    """Every user and group the control socket names must exist on this host."""
    issues = []
    for index, name in enumerate(section.control_allow_users):
        try:
            pwd.getpwnam(name)
        except KeyError:
            issues.append(
                ConfigIssue(f"supervisor.control_allow_users.{index}", f"no user {name!r}")
            )
    named = [
        (f"supervisor.control_allow_groups.{i}", n)
        for i, n in enumerate(section.control_allow_groups)
    ]
    if section.control_socket_group is not None:
        named.append(("supervisor.control_socket_group", section.control_socket_group))
    for where, name in named:
        try:
            grp.getgrnam(name)
        except KeyError:
            issues.append(ConfigIssue(where, f"no group {name!r}"))
    return issues
