"""systemd's side of the notify protocol, played by a real datagram socket."""

from __future__ import annotations

import itertools
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor.daemon.systemd import monotonic_usec
from supervisor.handoff.fdstore import CONFIG_NAME
from supervisor.kernel.notify import parse
from tests.support.harness import Daemon, free_port, service_toml, smuggling_worker

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


class FakeSystemd:
    """The NOTIFY_SOCKET end of systemd: collects the daemon's messages in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []
        self.stored: list[dict[str, str]] = []

    def next(self, timeout: float = 30.0) -> dict[str, str]:
        """The next message that is not about the fd store (those are in ``stored``)."""
        self.sock.settimeout(timeout)
        while True:
            message = parse(self.sock.recv(4096))  # attached fds are closed by the kernel
            about_store = "FDSTORE" in message or "FDSTOREREMOVE" in message
            if about_store and "STATUS" not in message:
                self.stored.append(message)
                continue
            self.messages.append(message)
            return message

    def next_without_watchdog(self, timeout: float = 30.0) -> dict[str, str]:
        while True:
            message = self.next(timeout)
            if message != {"WATCHDOG": "1"}:
                return message

    def nothing_more(self, wait: float) -> bool:
        try:
            self.next(wait)
        except TimeoutError:
            return True
        return False


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    yield fake
    fake.sock.close()


def test_start_reload_failed_reload_and_stop_in_systemd_order(
    start_daemon: Callable[..., Daemon], systemd: FakeSystemd
) -> None:
    port = free_port()
    services = service_toml("web", port=port, workers=2)
    daemon = start_daemon(services, env={"NOTIFY_SOCKET": str(systemd.path)})

    ready = systemd.next()
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(daemon.proc.pid)
    assert ready["STATUS"] == "web generation 1 RUNNING"

    before = monotonic_usec()
    assert daemon.reload().ok
    reloading = systemd.next()
    assert set(reloading) == {"RELOADING", "MONOTONIC_USEC"}
    assert reloading["RELOADING"] == "1"
    # The daemon's clock reading, taken when the reload began, as systemd wants it.
    assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
    done = systemd.next()
    assert done["READY"] == "1"
    assert done["STATUS"].startswith("web generation 2 RUNNING; last reload succeeded (web:")

    daemon.rewrite(services.replace("workers = 2", "workers = 0"))
    assert not daemon.reload().ok
    assert systemd.next()["RELOADING"] == "1"
    failed = systemd.next()
    assert failed["READY"] == "1", "systemd leaves the reloading state on READY=1 only"
    assert "last reload failed" in failed["STATUS"]
    assert "services.web.workers" in failed["STATUS"]

    assert daemon.terminate() == 0
    assert systemd.next() == {"STOPPING": "1", "STATUS": "stopping"}
    assert systemd.nothing_more(0.2), systemd.messages[-1]


def test_sighup_reload_is_announced_like_a_control_reload(
    start_daemon: Callable[..., Daemon], systemd: FakeSystemd
) -> None:
    # Type=notify-reload: systemd sends SIGHUP and waits for RELOADING=1 then READY=1.
    daemon = start_daemon(
        service_toml("web", port=free_port(), workers=1), env={"NOTIFY_SOCKET": str(systemd.path)}
    )
    assert systemd.next()["READY"] == "1"
    mark = daemon.mark()
    daemon.proc.send_signal(1)
    assert systemd.next()["RELOADING"] == "1"
    assert systemd.next()["STATUS"].startswith("web generation 2 RUNNING; last reload succeeded")
    daemon.wait_event("reload_answered", after=mark)


def test_watchdog_is_fed_at_half_the_interval(
    start_daemon: Callable[..., Daemon], systemd: FakeSystemd
) -> None:
    env = {
        "NOTIFY_SOCKET": str(systemd.path),
        "WATCHDOG_USEC": "400000",
        "WATCHDOG_PID": "",  # systemd sets it to the main pid; empty means "any"
    }
    daemon = start_daemon(service_toml("web", port=free_port(), workers=1), env=env)
    while "READY" not in systemd.next():  # beats queued during start-up: timing unknown
        pass
    start = time.monotonic()
    beats = []
    while time.monotonic() - start < 1.5:
        if systemd.next(5) == {"WATCHDOG": "1"}:
            beats.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(beats[1:])]
    assert len(beats) >= 5, beats
    assert all(0.1 < gap < 0.35 for gap in gaps), gaps
    # Workers never see systemd's variables: they could notify in the daemon's name.
    pid = daemon.worker_pids()[0]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith((b"WATCHDOG_", b"NOTIFY_SOCKET=/"))]


def test_watchdog_meant_for_another_pid_is_not_fed(
    start_daemon: Callable[..., Daemon], systemd: FakeSystemd
) -> None:
    env = {
        "NOTIFY_SOCKET": str(systemd.path),
        "WATCHDOG_USEC": "200000",
        "WATCHDOG_PID": str(os.getpid()),  # this test's pid, not the daemon's
    }
    start_daemon(service_toml("web", port=free_port(), workers=1), env=env)
    assert systemd.next()["READY"] == "1"
    assert systemd.nothing_more(0.5), systemd.messages[-1]


def test_without_notify_socket_nothing_is_sent(
    start_daemon: Callable[..., Daemon], systemd: FakeSystemd
) -> None:
    daemon = start_daemon(service_toml("web", port=free_port(), workers=1))
    assert daemon.reload().ok
    assert systemd.nothing_more(0.3)


def test_an_upgrade_is_announced_as_a_reload_with_the_same_main_pid(
    start_daemon: Callable[..., Daemon], systemd: FakeSystemd
) -> None:
    daemon = start_daemon(
        service_toml("web", port=free_port(), workers=1), env={"NOTIFY_SOCKET": str(systemd.path)}
    )
    assert systemd.next()["MAINPID"] == str(daemon.proc.pid)
    before = monotonic_usec()
    assert daemon.upgrade().ok
    reloading = systemd.next()
    assert set(reloading) == {"RELOADING", "MONOTONIC_USEC"}
    assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
    ready = systemd.next()  # from the new image, which kept systemd's socket
    assert ready["READY"] == "1" and ready["MAINPID"] == str(daemon.proc.pid)
    assert daemon.reload().ok, "and the new image talks to systemd as the old one did"
    assert systemd.next()["RELOADING"] == "1"
    assert systemd.next()["READY"] == "1"


def test_a_worker_cannot_send_notify_commands_through_a_failed_reload(
    start_daemon: Callable[..., Daemon], systemd: FakeSystemd
) -> None:
    port = free_port()
    http = 'kind = "http"\npath = "/healthz"\ninterval = "50ms"'
    good = service_toml("web", port=port, workers=1, health=http)
    daemon = start_daemon(good, env={"NOTIFY_SOCKET": str(systemd.path)})
    assert systemd.next()["READY"] == "1"

    hostile = [sys.executable, "-c", smuggling_worker("web/x")]
    bad = service_toml("web", port=port, workers=1, health=http, command=hostile)
    daemon.rewrite(bad.replace('ready_timeout = "15s"', 'ready_timeout = "2s"'))
    answer = daemon.reload()
    assert not answer.ok
    assert systemd.next()["RELOADING"] == "1"
    failed = systemd.next()
    # One READY=1 with one STATUS=: no command of the worker's became a line.
    assert set(failed) == {"READY", "STATUS"}, failed
    # The worker's words arrive as text (h11 refuses its answer and names the
    # line it choked on), on the one line STATUS= is.
    assert "WATCHDOG=trigger" in failed["STATUS"]
    assert "\x1b" not in failed["STATUS"]
    removed = [m["FDNAME"] for m in systemd.stored if "FDSTOREREMOVE" in m]
    removed = [name for name in removed if name != CONFIG_NAME]  # replaced at each reload
    assert removed == [f"web/tcp-127.0.0.1-{port}/g2/w0"], "only the candidate's own listener"
    # The reasons the client and the log show are printable too.
    reasons = " ".join(answer.answer["reasons"])
    assert "WATCHDOG=trigger" in reasons and "\n" not in reasons and "\x1b" not in reasons
    assert daemon.terminate() == 0
