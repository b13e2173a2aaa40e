"""The files in systemd/: what systemd itself says of them, and that they fit the daemon.

This file: the parts with real processes; the rest is in
tests/unit/test_systemd_units.py.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.kernel import sysctl

ROOT = Path(__file__).resolve().parents[2]


SYSTEMD = ROOT / "systemd"


SYSCTL = SYSTEMD / "sysctl.d" / "60-reuseport-supervisor-migrate.conf"


@pytest.mark.kernel
@pytest.mark.slow
def test_sysctl_drop_in_enables_migration(migrate_req: Callable[[int], None]) -> None:
    if shutil.which("sysctl") is None:
        pytest.skip("procps' sysctl is not installed here")
    migrate_req(0)  # in the test's own network namespace; restored afterwards
    subprocess.run(["sysctl", "-q", "-p", str(SYSCTL)], check=True)
    assert sysctl.migrate_req() == 1
