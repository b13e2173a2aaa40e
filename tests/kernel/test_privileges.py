"""Workers with user/group run without the supervisor's privileges, on privileged ports."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.harness import DEMO, Daemon, service_toml, toml_list, wait_until
from tests.support.load import one_request

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def wait_for_exec(pid: int) -> None:
    """Until the launcher (which drops privileges, then execs) has become the worker."""
    target = SYSTEM_PYTHON.resolve()
    wait_until(lambda: Path(os.readlink(f"/proc/{pid}/exe")) == target, 10, "the exec")


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


# A stdlib-only HTTP worker on the inherited fd 3: the test's own interpreter
# (under /root) is not something user nobody may execute.
WORKER = """
import os, socket
listener = socket.socket(fileno=3)
while True:
    conn, _ = listener.accept()
    conn.recv(65536)
    body = f"pid={os.getpid()} uid={os.getuid()}\\n".encode()
    head = f"HTTP/1.1 200 OK\\r\\nContent-Length: {len(body)}\\r\\nConnection: close\\r\\n\\r\\n"
    conn.sendall(head.encode() + body)
    conn.close()
"""
SYSTEM_PYTHON = Path("/usr/bin/python3")


def test_unprivileged_workers_serve_port_80(start_daemon: Callable[..., Daemon]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to bind port 80 and switch users")
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} (a Python user nobody may run) is not installed")
    nobody = pwd.getpwnam("nobody")
    command = toml_list([str(SYSTEM_PYTHON), "-c", WORKER])
    # Port 80 of the test's own network namespace: free, and privileged.
    daemon = start_daemon(
        service_toml(
            "web",
            port=80,
            workers=2,
            extra='user = "nobody"\ngroup = "nogroup"',
            health='kind = "tcp"',
        ).replace(f"command = {toml_list(DEMO)}", f"command = {command}")
    )
    supervisor = proc_status(daemon.proc.pid)
    assert supervisor["CapEff"] != "0000000000000000", "the supervisor itself is privileged"
    for pid in daemon.worker_pids():
        # A tcp check passes once the kernel completes a handshake, which may be
        # before the launcher has exec'd the worker: wait for the exec.
        wait_for_exec(pid)
        status = proc_status(pid)
        assert status["Uid"].split() == [str(nobody.pw_uid)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(nobody.pw_gid)] * 4, status["Gid"]
        assert status["Groups"] == str(nobody.pw_gid), status["Groups"]
        for caps in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
            assert status[caps] == "0000000000000000", (caps, status[caps])
        assert status["NoNewPrivs"] in ("0", "1")
    pids = {str(p) for p in daemon.worker_pids()}
    answers = [one_request("127.0.0.1", 80) for _ in range(40)]
    served = {answer["pid"] for answer in answers}
    assert served <= pids and served, served
    assert {answer["uid"] for answer in answers} == {str(nobody.pw_uid)}
    # And a reload keeps it so: the new generation is dropped the same way.
    assert daemon.reload().ok
    for pid in daemon.worker_pids():
        wait_for_exec(pid)
        assert proc_status(pid)["CapEff"] == "0000000000000000"
        assert proc_status(pid)["Uid"].split()[0] == str(nobody.pw_uid)


def test_preflight_and_exec_checks_run_as_the_service(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Not as the daemon: the service's user and group, environment and
    working directory (a relative probe path resolves there, as --check says)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} (a Python user nobody may run) is not installed")
    nobody = pwd.getpwnam("nobody")
    shared = Path(tempfile.mkdtemp(prefix="sv-probe-", dir="/var/tmp"))
    try:
        shared.chmod(0o777)
        probe = shared / "probe.sh"
        probe.write_text(f'#!/bin/sh\necho "$1 $(id -u) $(id -g) $MARK $(pwd)" >> {shared}/ran\n')
        probe.chmod(0o755)
        command = toml_list([str(SYSTEM_PYTHON), "-c", WORKER])
        service = service_toml(
            "web",
            port=80,
            workers=2,
            extra=(
                'user = "nobody"\ngroup = "nogroup"\n'
                f'working_directory = "{shared}"\n'
                'environment = { MARK = "svc-env" }\n'
                'preflight = ["./probe.sh", "preflight"]'
            ),
            health='kind = "exec"\ncommand = ["./probe.sh", "check-{worker}"]',
        ).replace(f"command = {toml_list(DEMO)}", f"command = {command}")
        daemon = start_daemon(service)
        assert daemon.reload().ok
        lines = (shared / "ran").read_text().splitlines()
    finally:
        shutil.rmtree(shared)
    ids = f"{nobody.pw_uid} {nobody.pw_gid} svc-env {shared}"
    assert f"check-0 {ids}" in lines and f"check-1 {ids}" in lines, lines
    assert f"preflight {ids}" in lines, lines
    assert all(line.endswith(ids) for line in lines), lines
