"""Kernel failures injected into a real daemon during a reload under load.

strace attaches to the daemon's main thread (where every steering, socket
and process call is made) and makes one syscall fail from its N-th call on:
``bpf()`` (map updates), the netlink ``socket()`` of sock_diag, ``shutdown()``,
``listen()``, ``setsockopt()`` (the classic BPF attach) and ``pidfd_open()``.
Whatever the point of failure, the reload must end with the old or the new
generation serving, the daemon alive, no connection lost, and the next
reload (strace detached) must succeed.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import Daemon, free_port, service_toml, syscall_fault, wait_until
from tests.support.load import Load

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace"),
]

DRAIN = 'retire = "drain"'
ROLLED_BACK, SUCCEEDED, EITHER = "rolled_back", "succeeded", "either"
# syscall, errno, from which call (strace's when=), service extra, steering, expected
CASES = {
    # the candidate's first sockarray update: its listeners cannot join
    "bpf-join": ("bpf", "ENOMEM", "1", "", "ebpf", ROLLED_BACK),
    # from the last listeners' joins on: the candidate's table, then the cutover
    "bpf-from-16": ("bpf", "ENOMEM", "16+", "", "ebpf", ROLLED_BACK),
    "bpf-from-23": ("bpf", "ENOMEM", "23+", "", "ebpf", EITHER),
    # one update somewhere in the cutover or the retirement
    "bpf-29": ("bpf", "ENOMEM", "29", "", "ebpf", EITHER),
    # the classic program's attach: the candidate's, then the cutover's and on
    "cbpf-attach-9": ("setsockopt", "ENOMEM", "9+", "", "cbpf", ROLLED_BACK),
    "cbpf-attach-10": ("setsockopt", "ENOMEM", "10+", "", "cbpf", EITHER),
    # sock_diag while draining (the census's, the listeners' and the notify
    # sockets come first)
    "diag-at-cutover": ("socket", "EMFILE", "10+", DRAIN, "ebpf", SUCCEEDED),
    "diag-while-draining": ("socket", "EMFILE", "11+", DRAIN, "ebpf", EITHER),
    # the census's own sock_diag, before anything starts: noted, not refused
    "diag-census": ("socket", "EMFILE", "1", "", "ebpf", SUCCEEDED),
    # the old listeners' shutdown: the first one, then all of them
    "shutdown-first": ("shutdown", "EPERM", "1", "", "ebpf", SUCCEEDED),
    "shutdown-all": ("shutdown", "EPERM", "1+", "", "ebpf", SUCCEEDED),
    "shutdown-all-drain": ("shutdown", "EPERM", "1+", DRAIN, "cbpf", SUCCEEDED),
    # a candidate listener cannot listen; a candidate's pidfd cannot be opened
    "listen": ("listen", "EADDRINUSE", "2", "", "ebpf", ROLLED_BACK),
    "pidfd_open": ("pidfd_open", "EMFILE", "3", "", "ebpf", ROLLED_BACK),
}


def _serving(daemon: Daemon) -> dict[str, Any]:
    return dict(daemon.status()["services"]["web"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_failing_syscall_during_a_reload_loses_nothing(
    case: str, start_daemon: Callable[..., Daemon], migrate_req: Callable[[int], None]
) -> None:
    syscall, error, when, extra, steering, expected = CASES[case]
    migrate_req(1 if steering == "cbpf" and extra != DRAIN else 0)
    port = free_port()
    daemon = start_daemon(
        service_toml("web", port=port, workers=4, extra=extra),
        # No steering self-test: its probe's socket() would shift the count.
        supervisor_extra=f'steering = "{steering}"\nsteering_check = "0"',
    )
    with Load(port, threads=8, duration=120, max_connections=60_000) as load:
        wait_until(load.answered, 15, "the load to be answered")
        with syscall_fault(daemon.proc.pid, syscall, error, when):
            faulty = daemon.reload()
        assert daemon.proc.poll() is None, "the daemon survived"
        during = _serving(daemon)
        clean = daemon.reload()
    result = load.result
    report = faulty.report()
    print(f"{case}: {report['outcome']}: {report.get('reasons') or report.get('problems')}")
    assert report["outcome"] in ((ROLLED_BACK, SUCCEEDED) if expected == EITHER else (expected,))
    if report["outcome"] == ROLLED_BACK:
        assert error in " ".join(report["reasons"]), report
        assert during["generation"] == 1, "the old generation serves on"
    else:
        assert during["generation"] == 2, "the new generation serves"
        if case == "diag-census":  # met before anything started: a note, no refusal
            assert any("census of" in n and error in n for n in report["notes"]), report
        elif expected == SUCCEEDED:  # the failure was met after the cutover, and reported
            assert error in " ".join(report["problems"]), report
    assert during["state"] == "RUNNING"
    assert {w["generation"] for w in during["workers"]} == {during["generation"]}
    assert clean.ok, clean.answer
    assert result.failed == 0, (result.failures, result.examples)
    assert result.ok > 100


def test_a_watch_that_cannot_be_added_after_start_is_retried(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    # certbot's live/ symlinks: switching one to a new directory makes the
    # watcher add a watch there, in the running daemon. That call failing
    # (ENOSPC: the watch limit; ENOENT: the directory swapped away again)
    # once reached the root nursery and ended the daemon.
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text(name)
    watched = tmp_path / "live"
    watched.symlink_to(tmp_path / "a" / "file")
    extra = f'watch = ["{watched}"]\nwatch_debounce = "100ms"'
    daemon = start_daemon(service_toml("web", port=free_port(), workers=1, extra=extra))
    daemon.wait_event("watching", service="web")
    mark = daemon.mark()
    with syscall_fault(daemon.proc.pid, "inotify_add_watch", "ENOSPC", "1+"):
        switch = tmp_path / "switch"
        switch.symlink_to(tmp_path / "b" / "file")
        switch.replace(watched)  # rename over: one atomic switch, as certbot does
        failed = daemon.wait_event("watch_failed", after=mark)
        assert failed["directory"] == str(tmp_path / "b")
        assert "max_user_watches" in failed["error"]
    answered = daemon.wait_event("reload_answered", after=mark)
    assert answered["ok"], answered
    assert daemon.proc.poll() is None, "the daemon survived"
    # Detached: the next change adds the watch it could not add before.
    mark = daemon.mark()
    (tmp_path / "b" / "file").write_text("b, rewritten")
    assert daemon.wait_event("reload_answered", after=mark)["ok"]
    assert daemon.terminate() == 0


def test_a_spawn_the_daemon_cannot_afford_is_retried_not_counted(
    start_daemon: Callable[..., Daemon],
) -> None:
    # posix_spawn's clone3 failing with EAGAIN (or an EMFILE, ENOMEM) is the
    # daemon running short, not the worker failing: 5 of them in a row once
    # made the worker FATAL for good, its listener shut down.
    daemon = start_daemon(service_toml("web", port=free_port(), workers=1))
    victim = daemon.worker_pids()[0]
    mark = daemon.mark()
    with syscall_fault(daemon.proc.pid, "clone3", "EAGAIN", "1..7"):
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: (
                len(daemon.events_since(mark, "worker_spawn_failed")) >= 7
                or bool(daemon.events_since(mark, "worker_fatal"))
            ),
            60,
            "7 failed spawns",
        )
    assert not daemon.events_since(mark, "worker_fatal"), "the daemon's shortage is no fault"
    running = daemon.wait_event("worker_running", after=mark)
    assert running["pid"] != victim
    assert [w["state"] for w in daemon.status()["services"]["web"]["workers"]] == ["RUNNING"]
    assert daemon.terminate() == 0
