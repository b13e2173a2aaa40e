"""The steering self-test: a worker that attaches its own reuseport program
(as nginx's QUIC module does) replaces ours for the whole group. The daemon
finds it within one check interval, names the worker that holds the
program, and attaches ours again; a reload afterwards is lossless as ever."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import pytest

from tests.support.harness import Daemon, free_port, service_toml
from tests.support.load import Load
from tests.support.procs import wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

# Serves the demo's answer on fd 3; worker 0, after a while, loads an
# SK_REUSEPORT program that passes everything and attaches it to its group.
ATTACHING = """
import os, socket, sys, threading, time
from supervisor.kernel import bpf
listener = socket.socket(fileno=3)
def serve():
    while True:
        conn, _ = listener.accept()
        conn.settimeout(5)
        try:
            conn.recv(65536)
            body = f"pid={os.getpid()}\\n".encode()
            head = f"HTTP/1.1 200 OK\\r\\nContent-Length: {len(body)}\\r\\n"
            head += "Connection: close\\r\\n\\r\\n"
            conn.sendall(head.encode() + body)
        except OSError:
            pass
        conn.close()
threading.Thread(target=serve, daemon=True).start()
if os.environ["SUPERVISOR_WORKER"] == "0":
    time.sleep(float(sys.argv[1]))
    code = bytes([0xB7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])  # return SK_PASS
    kind, attach = bpf.PROG_TYPE_SK_REUSEPORT, bpf.SK_REUSEPORT_SELECT_OR_MIGRATE
    program = bpf.Program(code, kind, attach, "theirs")
    bpf.attach_reuseport(listener, program)
    print("attached", flush=True)
time.sleep(3600)
"""


def test_a_worker_attaching_its_own_program_is_found_named_and_undone(
    start_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    command = [sys.executable, "-c", ATTACHING, "1.5"]
    service = service_toml(
        "web", port=port, workers=2, command=command, health='kind = "none"\nsettle = "0.2s"'
    )
    daemon = start_daemon(service, supervisor_extra='steering = "ebpf"\nsteering_check = "0.5s"')
    worker0 = daemon.worker_pids()[0]
    found = daemon.wait_event("steering_program_replaced", timeout=15)
    assert found["repaired"] is True, found
    assert f"pid {worker0} (python" in found["by"], found
    assert "worker 0 of generation 1 holds SK_REUSEPORT program id" in found["by"], found
    status = daemon.status()["services"]["web"]
    (line,) = status["steering_replaced"]
    assert "ours attached again" in line and str(worker0) in line
    # Ours steers again: the next checks find nothing more.
    mark = daemon.mark()
    time.sleep(2.0)
    assert daemon.events_since(mark, "steering_program_replaced") == []
    with Load(port, threads=4, duration=60) as load:
        wait_for(load.answered, 10, "the load's first answer")
        reloaded = daemon.reload()
    assert reloaded.ok, reloaded.answer
    result = load.result
    print(f"after the repair: reload under load {result.ok} ok, {result.failed} failed")
    assert result.failed == 0, (result.failures, result.examples)
