"""The fd store's one name format: what ``listener_name`` writes,
``parse_name`` reads back, for every kind of address."""

from __future__ import annotations

import pytest

from supervisor.handoff.fdstore import CONFIG_NAME, listener_name, parse_name
from supervisor.values import parse_listen


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:8080", "[::1]:443", "udp://127.0.0.1:5353", "0.0.0.0:80"]
)
def test_a_listener_name_reads_back_as_its_service_address_and_slot(listen: str) -> None:
    address = parse_listen(listen)
    name = listener_name("web-1", 12, 3, address)
    assert ":" not in name, "systemd separates LISTEN_FDNAMES with ':'"
    stored = parse_name(name, 7)
    assert (stored.service, stored.address, stored.generation, stored.worker) == (
        "web-1",
        address.fd_name,
        12,
        3,
    )
    assert stored.is_listener and stored.fd == 7


def test_other_names_are_not_listeners() -> None:
    for name in (CONFIG_NAME, "unknown", "web/127.0.0.1_80/g1"):
        assert not parse_name(name, 3).is_listener
