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
import os
import subprocess

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_PRIVATE_NETNS:
        return
    skip = pytest.mark.skip(reason=f"kernel test: {NETNS_PROBLEM}")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


pytest_plugins = ["tests.harness"]
