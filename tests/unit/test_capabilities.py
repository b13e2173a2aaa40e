"""Which steering and retirement path a host gives, and saying so honestly.

This file: the parts that need no root and no running daemon; the rest is in
tests/kernel/test_capabilities.py.
"""

from __future__ import annotations

import pytest

from supervisor.plan.capabilities import Capabilities
from supervisor.plan.plan import retire_decision

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
