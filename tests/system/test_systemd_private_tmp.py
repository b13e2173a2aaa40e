"""A control socket under /tmp, under the shipped unit (``PrivateTmp=yes``),
in real systemd 252: the daemon serves and ``systemctl reload`` works (its
``ExecReload`` runs inside the unit), but ``supervisorctl`` outside the unit
cannot reach the socket. The daemon says so at start, naming the key and the
default that works; with the default it says nothing."""

from __future__ import annotations

import pytest

from tests.support.systemd_ns import UNIT, available
from tests.support.systemd_unit import booted, config_text

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.slow,
    pytest.mark.skipif(available() is not None, reason=f"real systemd: {available()}"),
]

PRIVATE = "/tmp/supervisor-demo.sock"


def _config(control_socket: str) -> str:
    return config_text(workers=1).replace(
        'control_socket = "/run/reuseport-supervisor/control.sock"',
        f'control_socket = "{control_socket}"',
    )


def test_a_control_socket_in_the_units_private_tmp_is_named_at_start() -> None:
    with booted(_config(PRIVATE)) as unit:
        unit.ctl("start", UNIT)
        unit.ctl("reload", UNIT)  # ExecReload runs in the unit: its /tmp is the daemon's
        outside = unit.supervisorctl("-s", PRIVATE, "status")
        (warning,) = unit.events("config_warning")
        assert outside.returncode == 2, outside.stdout
        assert f"cannot reach supervisord at {PRIVATE}" in outside.stderr, outside.stderr
        assert f"cannot reach {PRIVATE}" in warning["warning"], warning
        assert "/run/reuseport-supervisor/control.sock" in warning["warning"], warning


def test_the_default_control_socket_is_reached_from_outside_and_draws_no_warning() -> None:
    with booted(_config("/run/reuseport-supervisor/control.sock")) as unit:
        unit.ctl("start", UNIT)
        assert unit.supervisorctl("status").returncode == 0
        assert unit.events("config_warning") == []
