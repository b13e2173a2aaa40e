"""Running out of resources during a rollout, and ports held by other users."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest

from tests.support.harness import Daemon, free_port, service_toml, wait_until
from tests.support.load import Load

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def set_nofile(pid: int, soft: int) -> int:
    """Set ``pid``'s soft RLIMIT_NOFILE; return the old one."""
    out = subprocess.run(
        ["prlimit", f"--pid={pid}", "--nofile", "--output=SOFT", "--noheadings", "--raw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:"], check=True)
    return int(out.split()[0])


@pytest.mark.parametrize("spare", [0, 1, 2, 3, 4, 5])
def test_out_of_file_descriptors_fails_the_rollout_cleanly(
    spare: int, start_daemon: Callable[..., Daemon]
) -> None:
    port = free_port()
    daemon = start_daemon(service_toml("web", port=port, workers=2))
    pid = daemon.proc.pid
    with Load(port, threads=4, duration=120, max_connections=50_000) as load:
        wait_until(load.answered, 15, "the load to be answered")
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        # Room for the control connection and ``spare`` more: the rollout runs
        # out somewhere between accepting the request and spawning the workers.
        original = set_nofile(pid, in_use + 1 + spare)
        failed = daemon.reload()
        set_nofile(pid, original)
        assert daemon.proc.poll() is None, "the daemon survived"
        status = daemon.status()["services"]["web"]
        assert status["state"] == "RUNNING" and status["generation"] == 1
        recovered = daemon.reload()
    result = load.result

    assert not failed.ok
    text = " ".join(failed.answer.get("reasons") or [failed.answer.get("error", "")])
    assert "Too many open files" in text or "EMFILE" in text, failed.answer
    assert recovered.ok, recovered.answer
    assert recovered.report()["generation"] >= 2
    assert result.failed == 0, (result.failures, result.examples)
