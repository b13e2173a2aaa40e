"""Test session set-up: a private network namespace, and shared fixtures.

Test policy (after trio-websocket's): loopback addresses only; every
blocking call has a timeout and every wait a deadline, only to avoid
hanging; we wait for events (a log line, a process exit, a socket state),
never for a fixed time; every process a test starts is ended by pid.

As root, the whole session moves into a new network namespace at import
(before any thread exists, so every thread and child inherits it) with
loopback up: tests may then set ``net.ipv4.tcp_migrate_req`` and bind any
port without touching the host. Without root, tests marked ``kernel`` skip.
"""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CLONE_NEWNET = 0x40000000


def _enter_private_netns() -> str | None:
    """Return None on success, or why the namespace could not be made."""
    if os.geteuid() != 0:
        return "needs root to create a private network namespace"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}"
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    return None


HOST_NETNS_INODE = os.stat("/proc/self/ns/net").st_ino
NETNS_PROBLEM = _enter_private_netns()
IN_PRIVATE_NETNS = NETNS_PROBLEM is None


# The tiers are folders, and their markers agree: tests/unit is fast and
# unprivileged; everything else is slow (or soak), and needs root where it
# says kernel.
TIER_MARKS = {"unit": set(), "kernel": {"slow"}, "system": {"slow"}, "soak": {"soak"}}


def _tier_problem(item: pytest.Item) -> str | None:
    tier = Path(str(item.path)).relative_to(Path(__file__).parent).parts[0]
    marks = {m for m in ("slow", "kernel", "soak") if m in item.keywords}
    if tier not in TIER_MARKS:
        return f"{item.nodeid}: a test outside the tier folders {sorted(TIER_MARKS)}"
    if tier == "unit" and marks:
        return f"{item.nodeid}: marked {sorted(marks)} in tests/unit (the fast tier)"
    if not TIER_MARKS[tier] <= marks and not (tier == "kernel" and "kernel" in marks):
        return f"{item.nodeid}: in tests/{tier} but not marked {sorted(TIER_MARKS[tier])}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problems = [p for p in map(_tier_problem, items) if p is not None]
    if problems:
        raise pytest.UsageError("\n".join(problems))
    if IN_PRIVATE_NETNS:
        return
    skip = pytest.mark.skip(reason=f"kernel test: {NETNS_PROBLEM}")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


def _open_fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the fd listdir itself used
            continue
    return out


def _children() -> set[int]:
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(pid) for pid in f.read().split())
        except FileNotFoundError:  # a thread that just ended
            continue
    return pids


LEAK_GRACE = 10.0  # a child that was killed a moment ago is reaped within this


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a child process or an open fd behind."""
    fds, children = _open_fds(), _children()
    yield
    deadline = time.monotonic() + LEAK_GRACE
    while (_children() - children) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = sorted(_children() - children)
    gc.collect()  # objects the test dropped close their fds now, as they would anyway
    leaked = {fd: target for fd, target in _open_fds().items() if fds.get(fd) != target}
    problems = []
    if left:
        problems.append(f"child processes left running: {left}")
    if leaked:
        problems.append(f"fds left open: {leaked}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


pytest_plugins = ["tests.support.harness"]
