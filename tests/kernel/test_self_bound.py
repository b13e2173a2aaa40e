"""A server that binds its own SO_REUSEPORT socket, restarted under load.

Restarted by a plain loop (start the new process, then stop the old one),
it resets what waited in the old socket's accept queue: the race of the
"seamless server restart" report. Restarted with its sockets adopted (found
by sock_diag and ``/proc``, duplicated with pidfd_getfd, placed in eBPF
steering as standby, activated, the old one shut down through our
duplicate so the program migrates its queue), it loses nothing. This is the
mechanism of ``listen_mode = "own"``, proved on the demo server's
``--bind`` mode with ``tcp_migrate_req=0``.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from supervisor.kernel import members
from supervisor.steering import Role
from supervisor.steering.ebpf import EbpfGroup
from supervisor.values import ListenAddress
from tests.support.load import Load, LoadResult

pytestmark = [pytest.mark.kernel, pytest.mark.slow]
ROUNDS = 10
SYNC = ["--concurrency", "1", "--work", "0.002"]


class SelfBound:
    """One demo server binding ``address`` itself; its socket as sock_diag finds it."""

    def __init__(self, address: ListenAddress, known: set[int]) -> None:
        argv = [sys.executable, "-m", "supervisor.demo", "--bind", str(address), *SYNC]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while True:
            found = [
                (b, h) for b, h in members.bound_by(self.proc.pid, address) if b.inode not in known
            ]
            if found:
                self.inode, self.holder = found[0][0].inode, found[0][1]
                return
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "the server never listened"
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def restarts(address: ListenAddress, *, adopt: bool) -> LoadResult:
    group = EbpfGroup(address) if adopt else None
    known: set[int] = set()
    current = SelfBound(address, known)
    known.add(current.inode)
    ours: socket.socket | None = None
    try:
        if group is not None:
            ours = members.duplicate(current.holder)
            group.join(ours, Role.ACTIVE)
            group.apply()
        with Load(address.port, threads=8, duration=120) as load:
            time.sleep(0.3)
            for _ in range(ROUNDS):
                new = SelfBound(address, known)
                known.add(new.inode)
                if group is not None:
                    assert ours is not None
                    theirs = members.duplicate(new.holder)
                    group.join(theirs, Role.STANDBY)
                    group.apply()
                    group.set_role([theirs], Role.ACTIVE)
                    group.set_role([ours], Role.RETIRING)
                    group.apply()
                    time.sleep(0.01)  # a third ACK racing the steering change (kernel.md §1)
                    group.shutdown(ours)  # the program migrates its queue
                    ours.close()
                    ours = theirs
                current.stop()
                current = new
                time.sleep(0.2)
        return load.result
    finally:
        current.stop()
        if ours is not None:
            ours.close()
        if group is not None:
            group.close()


def test_restarts_of_a_self_bound_server_lose_nothing_once_adopted(
    address: ListenAddress,
) -> None:
    plain = restarts(address, adopt=False)
    adopted = restarts(address, adopt=True)
    print(
        f"{ROUNDS} restarts: plain loop {plain.ok} ok {dict(plain.failures)}; "
        f"adopted {adopted.ok} ok {dict(adopted.failures)}"
    )
    assert plain.failed > 0, "the load must see the resets of a plain restart"
    assert adopted.failed == 0, (adopted.failures, adopted.examples)
    assert adopted.ok > 500
