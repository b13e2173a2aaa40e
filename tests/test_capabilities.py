"""Which steering and retirement path a host gives, and saying so honestly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.plan.capabilities import Capabilities
from supervisor.plan.plan import retire_decision
from tests.support.harness import free_port, service_toml

EBPF = Capabilities(migrate_req=0, cbpf=True, ebpf=True)
CBPF_SYSCTL_ON = Capabilities(migrate_req=1, cbpf=True, ebpf=False)
CBPF_SYSCTL_OFF = Capabilities(migrate_req=0, cbpf=True, ebpf=False)
OLD_KERNEL = Capabilities(migrate_req=None, cbpf=True, ebpf=False)


@pytest.mark.parametrize(
    ("caps", "retire", "path", "why"),
    [
        (EBPF, "auto", "migrate", "eBPF SELECT_OR_MIGRATE program"),
        (CBPF_SYSCTL_ON, "auto", "migrate", "tcp_migrate_req=1"),
        (CBPF_SYSCTL_OFF, "auto", "drain", "classic BPF steering and tcp_migrate_req=0"),
        (OLD_KERNEL, "auto", "drain", "tcp_migrate_req=missing (kernel < 5.14)"),
        (EBPF, "drain", "drain", 'retire = "drain"'),
        (CBPF_SYSCTL_ON, "migrate", "migrate", "tcp_migrate_req=1"),
    ],
)
def test_retire_plan_names_the_path_and_why(
    caps: Capabilities, retire: str, path: str, why: str
) -> None:
    chosen, reason = retire_decision(retire, [], caps)
    assert chosen == path
    assert why in reason


def test_changed_listener_settings_retire_by_drain_even_where_migration_works() -> None:
    for caps in (EBPF, CBPF_SYSCTL_ON):
        path, why = retire_decision("migrate", ["rcvbuf unset -> 262144"], caps)
        assert path == "drain"
        assert "rcvbuf unset -> 262144" in why and "no migration" in why


def test_cbpf_wanted_wins_over_available_ebpf() -> None:
    caps = Capabilities(migrate_req=0, cbpf=True, ebpf=True, wanted="cbpf")
    assert caps.steering == "cbpf"
    assert not caps.can_migrate


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
