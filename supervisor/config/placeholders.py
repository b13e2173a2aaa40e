"""The placeholders a config file's paths may use, expanded as the file is read.

``{config_dir}`` is the directory of the config file: what relative paths in
the file are resolved against, for programs that resolve paths against
something else (nginx's ``-c`` is relative to its ``-p`` prefix).

``{python}`` is the interpreter the supervisor runs on (``sys.executable``):
a Python program installed beside it runs as ``{python} -m program`` from
any install (a venv, pipx, a link in /usr/local/bin), whatever PATH says.

``{state}`` is the service's own writable directory, its
``state_directory``: by default ``STATE_ROOT/NAME``, where the root is
``[supervisor] state_directory``, else ``$STATE_DIRECTORY`` (what systemd's
``StateDirectory=`` gives the unit, and one of the few places its sandbox
lets a worker write), else ``/var/lib/reuseport-supervisor``. The daemon
creates it before it starts anything of the service.

All three are expanded in ``command``, ``preflight``, ``environment`` values,
``working_directory`` and an exec check's ``command``, before validation, so
the plan, ``--check`` and ``status`` show the paths themselves. (``{worker}``,
``{generation}`` and ``{fd}`` differ per process and are the plan's.)
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STATE_ROOT = Path("/var/lib/reuseport-supervisor")
STATE = "{state}"
CONFIG_DIR = "{config_dir}"
PYTHON = "{python}"


def state_root(data: Mapping[str, Any], base_dir: Path, environ: Mapping[str, str]) -> Path:
    """Where services' state directories go by default (see the module doc)."""
    section = data.get("supervisor")
    configured = section.get("state_directory") if isinstance(section, dict) else None
    if isinstance(configured, str):
        return base_dir / configured
    given = environ.get("STATE_DIRECTORY", "").split(":")[0]  # systemd: one per entry
    return Path(given) if given.startswith("/") else STATE_ROOT


def expand(data: dict[str, Any], base_dir: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    """``data`` (the parsed TOML) with the placeholders expanded, and each
    service that uses ``{state}`` given its ``state_directory``. What is not
    the expected shape is left for the schema to report."""
    services = data.get("services")
    if not isinstance(services, dict):
        return data
    root = state_root(data, base_dir, environ)
    expanded = dict(data)
    expanded["services"] = {
        name: _service(service, base_dir, _state(service, base_dir, root / str(name)))
        if isinstance(service, dict)
        else service
        for name, service in services.items()
    }
    return expanded


def _state(service: dict[str, Any], base_dir: Path, default: Path) -> Path:
    configured = service.get("state_directory")
    return base_dir / configured if isinstance(configured, str) else default


def _service(service: dict[str, Any], config_dir: Path, state: Path) -> dict[str, Any]:
    used = False

    def sub(value: object) -> object:
        nonlocal used
        if not isinstance(value, str):
            return value
        used = used or STATE in value
        return (
            value.replace(STATE, str(state))
            .replace(CONFIG_DIR, str(config_dir))
            .replace(PYTHON, sys.executable)
        )

    def sub_all(values: object) -> object:
        return [sub(v) for v in values] if isinstance(values, list) else values

    out = dict(service)
    for key in ("command", "preflight"):
        out[key] = sub_all(out.get(key))
    if isinstance(out.get("environment"), dict):
        out["environment"] = {k: sub(v) for k, v in out["environment"].items()}
    if "working_directory" in out:
        out["working_directory"] = sub(out["working_directory"])
    health = out.get("health")
    if isinstance(health, dict) and "command" in health:
        out["health"] = {**health, "command": sub_all(health["command"])}
    if used or "state_directory" in service:
        out["state_directory"] = str(state)
    return {k: v for k, v in out.items() if v is not None or k in service}
