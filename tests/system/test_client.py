"""supervisorctl: it judges no config, never locks the operator out, and keeps
the conventions a command line is expected to keep.

This file: the parts with real processes; the rest is in
tests/unit/test_client.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.support.harness import DEMO, Background, Daemon, free_port, service_toml

CTL = [sys.executable, "-m", "supervisor.control.ctl"]


def supervisorctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.kernel
@pytest.mark.slow
@pytest.mark.parametrize("broken", ["bad TOML", "bad field", "missing file"])
def test_a_broken_config_never_locks_the_operator_out(
    start_daemon: Callable[..., Daemon], broken: str
) -> None:
    daemon = start_daemon(service_toml("web", port=free_port(), workers=1))
    good = daemon.config.read_text()
    if broken == "bad TOML":
        daemon.config.write_text(good + "\n[services.web\n")
    elif broken == "bad field":
        daemon.config.write_text(good.replace("workers = 1", 'workers = "many"'))
    else:
        daemon.config.unlink()
    where = ["-s", str(daemon.control)] if broken == "missing file" else ["-c", str(daemon.config)]
    status = supervisorctl(*where, "status")
    assert status.returncode == 0, status.stderr
    assert "web: RUNNING" in status.stdout
    reload = supervisorctl(*where, "reload")
    assert reload.returncode == 1, (reload.stdout, reload.stderr)
    assert "error: config rejected" in reload.stderr  # the daemon's verdict, not the client's
    reason = {
        "bad TOML": "TOML syntax",
        "bad field": "services.web.workers",
        "missing file": "cannot read",
    }[broken]
    assert reason in reload.stderr, reload.stderr
    assert "Traceback" not in reload.stderr + status.stderr
    stop = supervisorctl(*where, "shutdown")
    assert stop.returncode == 0, stop.stderr
    assert daemon.proc.wait(60) == 0


@pytest.mark.kernel
@pytest.mark.slow
def test_status_exits_0_while_a_reload_serves_and_reload_can_time_out(
    start_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    daemon = start_daemon(service_toml("web", port=port, workers=1))
    sock = str(daemon.control)
    running = supervisorctl("-s", sock, "status", "web")
    assert running.returncode == 0
    assert supervisorctl("-s", sock, "status").returncode == 0, "no service named: always 0"
    daemon.rewrite(service_toml("web", port=port, workers=1, command=[*DEMO, "--delay", "3"]))
    mark = daemon.mark()
    impatient = supervisorctl("-s", sock, "reload", "--timeout", "500ms")
    assert impatient.returncode == 2
    assert "no answer within 500ms; the reload goes on in the daemon" in impatient.stderr
    reloading = supervisorctl("-s", sock, "status", "web")
    assert "web: RELOADING" in reloading.stdout
    assert reloading.returncode == 0, "RELOADING serves, as systemctl is-active counts it"
    assert supervisorctl("-s", sock, "status", "nope").returncode == 1
    finished = daemon.wait_event("rollout_finished", after=mark, timeout=60)
    assert finished["outcome"] == "succeeded", "the reload went on without its client"
    assert supervisorctl("-s", sock, "status", "web").returncode == 0
    reload = Background(daemon)
    assert reload.result().ok
