"""``{state}`` and ``{config_dir}``: expanded as the file is read, and the
state directory made before anything of the service runs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from supervisor.config.loader import load_config, parse_config
from supervisor.errors import ConfigError
from supervisor.kernel.files import ensure_directory

NGINX = """
[services.nginx]
command = ["nginx", "-p", "{state}/", "-c", "{config_dir}/nginx/nginx.conf"]
preflight = ["nginx", "-t", "-p", "{state}/"]
environment = { TMPDIR = "{state}/tmp" }
listen = ["127.0.0.1:8443"]
"""


def test_state_is_systemds_state_directory_when_the_unit_gives_one(tmp_path: Path) -> None:
    environ = {"STATE_DIRECTORY": "/var/lib/reuseport-supervisor:/var/lib/other"}
    service = parse_config(NGINX, base_dir=tmp_path, environ=environ).services["nginx"]
    state = Path("/var/lib/reuseport-supervisor/nginx")
    assert service.state_directory == state
    assert service.command == ["nginx", "-p", f"{state}/", "-c", f"{tmp_path}/nginx/nginx.conf"]
    assert service.preflight == ["nginx", "-t", "-p", f"{state}/"]
    assert service.environment == {"TMPDIR": f"{state}/tmp"}


def test_state_defaults_without_systemd_and_follows_the_supervisor_section(
    tmp_path: Path,
) -> None:
    service = parse_config(NGINX, base_dir=tmp_path, environ={}).services["nginx"]
    assert service.state_directory == Path("/var/lib/reuseport-supervisor/nginx")
    text = '[supervisor]\nstate_directory = "state"\n' + NGINX  # relative: to the file
    config = parse_config(text, base_dir=tmp_path, environ={"STATE_DIRECTORY": "/x"})
    assert config.services["nginx"].state_directory == tmp_path / "state" / "nginx"
    assert config.supervisor.state_directory == tmp_path / "state"


def test_a_service_that_does_not_use_state_has_none(tmp_path: Path) -> None:
    text = '[services.web]\ncommand = ["web", "{config_dir}"]\nlisten = ["127.0.0.1:8080"]\n'
    service = parse_config(text, base_dir=tmp_path, environ={}).services["web"]
    assert service.state_directory is None
    assert service.command == ["web", str(tmp_path)]


def test_the_check_names_a_state_directory_it_cannot_make(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = tmp_path / "supervisor.toml"
    config.write_text(
        f'[supervisor]\nstate_directory = "{blocker}"\n'
        '[services.web]\ncommand = ["true", "{state}"]\nlisten = ["127.0.0.1:8080"]\n'
    )
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert f"services.web.state_directory: {blocker} is not a directory" in str(raised.value)


def test_the_state_directory_is_made_for_the_services_user(tmp_path: Path) -> None:
    made = tmp_path / "root" / "nginx"
    old = os.umask(0o077)  # a tight umask (the unit's is 0027) does not apply
    try:
        ensure_directory(made, 65534, 65534)
    finally:
        os.umask(old)
    info = made.stat()
    assert stat.S_IMODE(info.st_mode) == 0o755
    assert (info.st_uid, info.st_gid) == (65534, 65534)
    os.chown(made, 0, 0)
    ensure_directory(made, 65534, 65534)  # an existing one is the operator's: untouched
    assert (made.stat().st_uid, made.stat().st_gid) == (0, 0)
