"""Who may control the daemon: SO_PEERCRED against the configured users and groups.

The clients here run as ``nobody`` (setpriv), so these tests need root. The
control socket lives in a directory everyone may enter, so that only the
daemon's own checks (and the socket file's mode) decide.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import Daemon, free_port, service_toml

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name


@pytest.fixture
def open_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sv-access-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def as_nobody(socket_path: Path, *, group: str = NOGROUP) -> subprocess.CompletedProcess[str]:
    """``supervisorctl status --json`` run as uid nobody with primary group ``group``."""
    return subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            f"--regid={group}",
            "--clear-groups",
            sys.executable,
            "-m",
            "supervisor.control.ctl",
            "-s",
            str(socket_path),
            "status",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def start(directory: Path, supervisor: str) -> Daemon:
    control = directory / "control.sock"
    header = f'[supervisor]\ncontrol_socket = "{control}"\n{supervisor}\n'
    config = directory / "supervisor.toml"
    config.write_text(header + service_toml("web", port=free_port(), workers=1))
    daemon = Daemon(config, control, header)
    daemon.wait_event("daemon_ready")
    return daemon


def test_other_uid_is_refused_and_logged_even_through_an_open_socket(open_dir: Path) -> None:
    daemon = start(open_dir, 'control_socket_mode = "0666"')
    try:
        assert stat.S_IMODE(os.stat(daemon.control).st_mode) == 0o666
        mark = daemon.mark()
        done = as_nobody(daemon.control)
        assert done.returncode == 1, done
        assert f"uid {NOBODY} (pid " in done.stdout + done.stderr
        refused = daemon.wait_event("control_refused", after=mark)
        assert refused["peer_uid"] == NOBODY and refused["peer_pid"] > 0
        # Root (this test) is still served.
        assert daemon.status()["services"]["web"]["state"] == "RUNNING"
    finally:
        assert daemon.terminate() == 0


def test_allowed_user_is_served(open_dir: Path) -> None:
    daemon = start(open_dir, 'control_socket_mode = "0666"\ncontrol_allow_users = ["nobody"]')
    try:
        done = as_nobody(daemon.control)
        assert done.returncode == 0, done
        assert json.loads(done.stdout)["services"]["web"]["state"] == "RUNNING"
    finally:
        assert daemon.terminate() == 0


def test_socket_group_members_are_served_others_cannot_even_connect(open_dir: Path) -> None:
    other = next(g.gr_name for g in grp.getgrall() if g.gr_name not in (NOGROUP, "root"))
    daemon = start(open_dir, f'control_socket_mode = "0660"\ncontrol_socket_group = "{NOGROUP}"')
    try:
        info = os.stat(daemon.control)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert grp.getgrgid(info.st_gid).gr_name == NOGROUP
        member = as_nobody(daemon.control)
        assert member.returncode == 0, member
        outsider = as_nobody(daemon.control, group=other)
        assert outsider.returncode == 2, outsider
        assert "Permission denied" in outsider.stderr
    finally:
        assert daemon.terminate() == 0


def test_unknown_user_or_group_is_a_config_error(open_dir: Path) -> None:
    config = open_dir / "bad.toml"
    config.write_text(
        '[supervisor]\ncontrol_allow_users = ["no-such-user-x"]\n'
        'control_socket_group = "no-such-group-x"\n'
        + service_toml("web", port=free_port(), workers=1)
    )
    done = subprocess.run(
        [sys.executable, "-m", "supervisor.daemon", "--check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "supervisor.control_allow_users.0: no user 'no-such-user-x'" in done.stderr
    assert "supervisor.control_socket_group: no group 'no-such-group-x'" in done.stderr


def test_the_daemon_listens_on_no_tcp_port_but_its_services(open_dir: Path) -> None:
    daemon = start(open_dir, "")
    try:
        service_ports = {
            int(lst["address"].rsplit(":", 1)[1])
            for worker in daemon.status()["services"]["web"]["workers"]
            for lst in worker["listeners"]
        }
        out = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout
        mine = [line for line in out.splitlines() if f"pid={daemon.proc.pid}," in line]
        ports = {int(line.split()[3].rsplit(":", 1)[1]) for line in mine}
        assert mine, "ss shows the daemon's own listeners"
        assert ports == service_ports, (ports, service_ports)
    finally:
        assert daemon.terminate() == 0
