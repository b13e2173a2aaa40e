"""Which steering and retirement path a host gives, and saying so honestly.

This file: the parts with real processes; the rest is in
tests/unit/test_capabilities.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import free_port, service_toml


def _check_without_cap_bpf(tmp_path: Path, supervisor: str) -> subprocess.CompletedProcess[str]:
    """``supervisord --check`` as root with CAP_BPF and CAP_SYS_ADMIN dropped."""
    config = tmp_path / "drop.toml"
    config.write_text(
        f"[supervisor]\ncontrol_socket = '{tmp_path}/c.sock'\n{supervisor}\n"
        + service_toml("web", port=free_port())
    )
    drop = "-bpf,-sys_admin"
    return subprocess.run(
        [
            "setpriv",
            f"--inh-caps={drop}",
            f"--bounding-set={drop}",
            sys.executable,
            "-m",
            "supervisor.daemon",
            "--check",
            "-c",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.kernel
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_without_cap_bpf_auto_falls_back_and_ebpf_is_a_config_error(tmp_path: Path) -> None:
    auto = _check_without_cap_bpf(tmp_path, "")
    assert auto.returncode == 0, auto.stderr
    assert "'steering': 'cbpf', 'ebpf': False" in auto.stdout
    assert "reloads retire by drain" in auto.stdout  # the namespace's sysctl is 0
    wanted = _check_without_cap_bpf(tmp_path, 'steering = "ebpf"')
    assert wanted.returncode == 2
    assert "supervisor.steering: ebpf needs CAP_BPF" in wanted.stderr
