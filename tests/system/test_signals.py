"""No signal an operator or a tool may send kills the daemon by accident.

Each signal whose default action would terminate the daemon is sent to it
under load: it is logged and ignored, the workers serve on, nothing fails.
SIGUSR1 (logrotate's) forwards each service's ``reopen_signal``. And a
SIGHUP that comes while an upgrade's new image starts waits for it, instead
of killing it with Python's handlers gone (execve resets them).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

import pytest

from supervisor.daemon.signals import IGNORED, name
from tests.support.harness import Daemon, free_port, service_toml, upgrading, wait_until
from tests.support.load import Load

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def test_signals_that_would_terminate_are_logged_and_ignored_under_load(
    start_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    daemon = start_daemon(service_toml("web", port=port, workers=2))
    pids = daemon.worker_pids()
    with Load(port, threads=2, duration=90, max_connections=40_000) as load:
        wait_until(load.answered, 15, "the load to be answered")
        for signum in (*IGNORED, signal.SIGUSR1, signal.SIGPIPE):
            mark = daemon.mark()
            os.kill(daemon.proc.pid, signum)
            if signum == signal.SIGUSR1:  # the service has no reopen_signal: nothing to forward
                daemon.wait_event("reopen_requested", after=mark, services=[])
            elif signum != signal.SIGPIPE:  # ignored by Python itself, as it always was
                daemon.wait_event("signal_ignored", after=mark, signal=name(signum))
            assert daemon.proc.poll() is None, f"{name(signum)} killed the daemon"
        assert daemon.status()["services"]["web"]["state"] == "RUNNING"
        assert daemon.worker_pids() == pids
        result = load.finish()
    assert result.ok > 0
    assert result.failed == 0, (result.failures, result.examples)
    assert daemon.terminate() == 0


# A worker that says so on stdout each time it is sent SIGUSR1 (the daemon
# relays its output as worker_output events), and otherwise waits.
_REOPENER = r"""
import os, signal, sys
def reopened(*_):
    print(f"reopened {os.getpid()}", flush=True)
signal.signal(signal.SIGUSR1, reopened)
print("up", flush=True)
while True:
    signal.pause()
"""


def test_sigusr1_forwards_the_reopen_signal_to_every_worker(
    start_daemon: Callable[..., Daemon],
) -> None:
    reopener = [sys.executable, "-c", _REOPENER]
    daemon = start_daemon(
        service_toml(
            "web",
            port=free_port(),
            workers=2,
            command=reopener,
            health='kind = "none"\nsettle = "200ms"',
            extra='reopen_signal = "SIGUSR1"',
        )
    )
    pids = daemon.worker_pids()
    for pid in pids:
        daemon.wait_event("worker_output", line="up", pid=pid)
    mark = daemon.mark()
    os.kill(daemon.proc.pid, signal.SIGUSR1)
    forwarded = daemon.wait_event("reopen_forwarded", after=mark)
    assert forwarded["workers"] == 2 and forwarded["signal"] == "SIGUSR1"
    for pid in pids:
        daemon.wait_event("worker_output", after=mark, line=f"reopened {pid}")
    assert daemon.worker_pids() == pids
    assert daemon.proc.poll() is None
    assert daemon.terminate() == 0


def test_a_sighup_while_the_upgraded_image_starts_waits_for_it(
    start_daemon: Callable[..., Daemon],
) -> None:
    daemon = start_daemon(service_toml("web", port=free_port(), workers=1))
    mark = daemon.mark()
    thread, answers = upgrading(daemon)
    daemon.wait_event("upgrade_exec", after=mark)
    # The new image is importing now: without the mask, SIGHUP's default kills it.
    os.kill(daemon.proc.pid, signal.SIGHUP)
    thread.join(120)
    assert answers and answers[0].ok, answers
    reloaded = daemon.wait_event("reload_answered", after=mark)
    assert reloaded["ok"], reloaded
    assert daemon.proc.poll() is None
    assert daemon.status()["services"]["web"]["generation"] == 2, "the SIGHUP's reload ran"
    # The mask is lifted once the handlers are in place, and no worker inherits it.
    for pid in (daemon.proc.pid, *daemon.worker_pids()):
        assert blocked_signals(pid) == 0, pid
    assert daemon.terminate() == 0


def blocked_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigBlk:"):
                return int(line.split()[1], 16)
    raise AssertionError(f"no SigBlk for {pid}")


def test_a_sighup_storm_during_an_upgrade_is_coalesced(
    start_daemon: Callable[..., Daemon],
) -> None:
    # Every SIGHUP the loop takes while an upgrade runs is a reload parked for
    # after it. More than the request channel holds (128) once crashed the new
    # image; now a clientless reload is parked once per target.
    daemon = start_daemon(service_toml("web", port=free_port(), workers=1))
    mark = daemon.mark()
    thread, answers = upgrading(daemon)
    daemon.wait_event("upgrade_requested", after=mark)
    sent, deadline = 0, time.monotonic() + 30
    while not daemon.events_since(mark, "upgrade_exec") and time.monotonic() < deadline:
        os.kill(daemon.proc.pid, signal.SIGHUP)
        sent += 1
        time.sleep(0.002)  # let the loop take each one: signals of one kind merge
    thread.join(120)
    assert answers and answers[0].ok, answers
    assert daemon.proc.poll() is None, f"the new image died after {sent} SIGHUPs"
    taken = daemon.events_since(mark, "reload_parked") + daemon.events_since(
        mark, "reload_coalesced"
    )
    assert len(taken) > 128, f"{len(taken)} of {sent} SIGHUPs taken: the storm was too small"
    assert len(daemon.events_since(mark, "reload_parked")) == 1
    daemon.wait_event("reload_answered", after=mark, ok=True)
    assert daemon.proc.poll() is None
    assert daemon.terminate() == 0
