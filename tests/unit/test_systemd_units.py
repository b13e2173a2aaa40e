"""The files in systemd/: what systemd itself says of them, and that they fit the daemon.

This file: the parts that need no root and no running daemon; the rest is in
tests/system/test_systemd_units.py.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config.schema import DEFAULT_CONTROL_SOCKET

ROOT = Path(__file__).resolve().parents[2]


SYSTEMD = ROOT / "systemd"


UNIT = SYSTEMD / "reuseport-supervisor.service"


NOTIFY_RELOAD = SYSTEMD / "reuseport-supervisor.service.d" / "notify-reload.conf"


needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here"
)


def systemd_version() -> int:
    out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout
    match = re.match(r"systemd (\d+)", out)
    return int(match.group(1)) if match else 0


def installed_copy(tmp_path: Path, text: str) -> Path:
    """The unit as `pip install` into this venv would need it: its commands exist."""
    unit = tmp_path / "reuseport-supervisor.service"
    unit.write_text(text.replace("/usr/local/bin/", f"{Path(sys.executable).parent}/"))
    return unit


def verify(unit: Path) -> str:
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    # verify exits 0 on unknown keys and bad values: its warnings are the findings.
    return (done.stdout + done.stderr).strip() + ("" if done.returncode == 0 else " (failed)")


@needs_analyze
def test_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    assert verify(installed_copy(tmp_path, UNIT.read_text())) == ""


@needs_analyze
def test_verify_catches_what_it_should(tmp_path: Path) -> None:
    # Negative control: the check above would see a typo or a missing program.
    bad = UNIT.read_text().replace("NotifyAccess=main", "NotifyAccess=main\nNotfyAccess=all")
    assert "Unknown key" in verify(installed_copy(tmp_path, bad))
    missing = tmp_path / "missing"
    missing.mkdir()
    assert "not executable" in verify(
        installed_copy(
            missing,
            UNIT.read_text().replace(
                "/usr/local/bin/reuseport-supervisord", "/nonexistent/reuseport-supervisord"
            ),
        )
    )


@needs_analyze
@pytest.mark.skipif(systemd_version() < 253, reason="Type=notify-reload needs systemd 253+")
def test_notify_reload_variant_verifies(tmp_path: Path) -> None:
    assert verify(installed_copy(tmp_path, UNIT.read_text() + NOTIFY_RELOAD.read_text())) == ""


def test_unit_matches_the_daemon() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["Type"] == "notify"
    # The control socket's default directory is the unit's RuntimeDirectory.
    assert DEFAULT_CONTROL_SOCKET.parent == Path("/run") / service["RuntimeDirectory"]
    # The client finds the socket where the daemon's own file puts it.
    config = service["ExecStart"].split(" -c ", 1)[1].split()[0]
    assert f" -c {config} reload" in service["ExecReload"]
    caps = set(service["CapabilityBoundingSet"].split())
    assert {"CAP_NET_BIND_SERVICE", "CAP_BPF", "CAP_SETUID", "CAP_SETGID", "CAP_KILL"} <= caps
    assert "CAP_SYS_ADMIN" not in caps


def test_real_systemd_tests_say_why_they_skip_a_venv_under_tmp(tmp_path: Path) -> None:
    # The namespace mounts a fresh /tmp, which hides a venv that lives there:
    # 7 tests once failed for no reason they said.
    if not str(tmp_path).startswith("/tmp/"):
        pytest.skip("pytest's tmp_path is not under /tmp here")
    python = tmp_path / "python3"
    python.symlink_to(sys.executable)
    code = "from tests.support.systemd_ns import available; print(available())"
    done = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert "the venv is under /tmp" in done.stdout, done.stdout + done.stderr
    assert "clone outside /tmp" in done.stdout


def test_the_units_documentation_is_what_the_install_steps_put_there() -> None:
    """Each ``man:NAME(SECTION)`` of ``Documentation=`` is a page the install
    steps (docs/operations.md) install under that name, from a page the wheel ships."""
    pages = re.findall(r"man:([a-z-]+)\((\d)\)", UNIT.read_text())
    assert {name for name, _ in pages} == {"reuseport-supervisord", "reuseport-supervisorctl"}
    readme = (ROOT / "docs" / "operations.md").read_text()
    for name, section in pages:
        shipped = name.removeprefix("reuseport-")
        assert (ROOT / "docs" / "man" / f"{shipped}.{section}").is_file()
        installed = f"/usr/local/share/man/man{section}/{name}.{section}"
        assert f"$share/man/man{section}/{shipped}.{section} {installed}" in readme
