"""1,000 reloads under load: nothing lost, nothing leaked. ``make soak`` (not ``make test``).

Marked ``soak`` and deselected by default: it takes several minutes. CI
runs it after ``make test``. ``SOAK_RELOADS`` changes the count.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from tests.support.harness import Daemon, free_port, service_toml, wait_until
from tests.support.load import Load
from tests.support.procs import rss_kib, settled_fd_count, zombies

pytestmark = [pytest.mark.kernel, pytest.mark.slow, pytest.mark.soak]

RELOADS = int(os.environ.get("SOAK_RELOADS", "1000"))
WARM_UP = 20


def test_thousand_reloads_lose_and_leak_nothing(
    start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None]
) -> None:
    migrate_req(0)  # eBPF steering migrates regardless; the sysctl stays off
    port = free_port()
    daemon = start_daemon(service_toml("web", port=port, workers=2))
    pid = daemon.proc.pid
    with Load(port, threads=4, duration=3600, max_connections=5_000_000) as load:
        wait_until(load.answered, 15, "the load to be answered")
        for _ in range(WARM_UP):
            assert daemon.reload().ok
        before = settled_fd_count(pid), rss_kib(pid)
        for n in range(RELOADS - WARM_UP):
            reloaded = daemon.reload()
            assert reloaded.ok, (n, reloaded.answer)
        after = settled_fd_count(pid), rss_kib(pid)
        left = zombies(pid)
    result = load.result
    print(f"soak: {RELOADS} reloads, {result.ok} requests, fds {before[0]}->{after[0]}, "
          f"rss {before[1]}->{after[1]} KiB")  # fmt: skip
    assert result.failed == 0, (result.failures, result.examples)
    assert daemon.status()["services"]["web"]["generation"] == RELOADS + 1
    assert after[0] <= before[0], f"fd count grew: {before[0]} -> {after[0]}"
    assert after[1] - before[1] < max(4096, before[1] // 10), f"RSS grew: {before} -> {after}"
    assert not left, left
