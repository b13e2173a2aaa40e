"""The fd ledger across a real ``execve``: a process puts a listener (with a
connection queued on it), a pipe (with bytes in it) and two more fds in a
ledger, writes the state document into a sealed memfd as the upgrade does,
then loses one fd and lets another's number be reused, and execs itself.
The image after the exec must find the same pid, take the listener and the
pipe by name with what they held, name the two losses with their causes,
see nothing that was not in the ledger, and close what nobody took."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

BEFORE = r"""
import json, os, socket, sys
from supervisor.handoff import state
from supervisor.handoff.ledger import Ledger
from supervisor.handoff.state import DaemonDoc, ListenerDoc, ServiceDoc
from supervisor.kernel import fds
from supervisor.kernel.sockets import socket_cookie

listener = socket.create_server(("127.0.0.1", 0))
port = listener.getsockname()[1]
client = socket.create_connection(("127.0.0.1", port))  # queued, not accepted
client.sendall(b"queued before the exec")
read_end, write_end = os.pipe()
os.write(write_end, b"in the pipe before the exec")
lost = os.open("/dev/null", os.O_RDONLY)
reused = os.open("/dev/null", os.O_RDONLY)
private = socket.socket()  # not in the ledger: must not cross

ledger = Ledger()
name = ledger.put("web/tcp-127.0.0.1:%d/g1/w0" % port, listener.fileno())
ledger.put("web/w0/output0", read_end)
ledger.put("lost", lost)
ledger.put("reused", reused)
ledger.put("untaken", write_end)
listeners = [ListenerDoc(name=name, worker=0, address="127.0.0.1:%d" % port,
                         cookie=socket_cookie(listener))]
service = ServiceDoc(name="web", config={}, steering="cbpf", generation=1, last_generation=1,
                     listeners=listeners, workers=[], groups=[])
document = DaemonDoc(software="test", config_path="/x", supervisor={}, control="none",
                     started_at=0, upgrade_requested_at=0, services=[service],
                     ledger=ledger.entries()).stamped()
memfd = fds.sealed_memfd("supervisor-state", state.encode(document))
# After the stamp, as a bug of the old image or a stray close would: one fd
# closed, one number closed and handed to something else.
fds.set_inheritable([*document.numbers(), memfd], True)
os.close(reused)
assert os.open("/proc/self/stat", os.O_RDONLY) == reused
os.set_inheritable(reused, True)
os.close(lost)
print(json.dumps({"pid": os.getpid(), "port": port, "private": private.fileno(),
                  "lost": lost, "reused": reused, "write_end": write_end}), flush=True)
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1], str(memfd)])
"""

AFTER = r"""
import json, os, sys
from supervisor.daemon.upgrade import read_document
from supervisor.handoff.ledger import Ledger
from supervisor.kernel import fds

document = read_document(int(sys.argv[1]))
ledger = Ledger.received(document.ledger)
(listener_doc,) = document.services[0].listeners
listener = ledger.take_socket(listener_doc.name, listener_doc.cookie)
listener.settimeout(5)
conn, _ = listener.accept()
read_end = ledger.take_fd("web/w0/output0")
print(json.dumps({
    "pid": os.getpid(),
    "lost": ledger.lost(),
    "accepted": conn.recv(100).decode(),
    "piped": os.read(read_end, 100).decode(),
    "untaken": ledger.untaken(),
    "closed": ledger.close_untaken(),
    "numbers": document.numbers(),
}), flush=True)
"""


def test_the_ledger_carries_fds_across_a_real_exec_by_name() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", BEFORE, AFTER], stdout=subprocess.PIPE, text=True
    )
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    before, after = (json.loads(line) for line in out.splitlines())
    assert after["pid"] == before["pid"] == proc.pid, "an exec keeps the pid"
    assert after["accepted"] == "queued before the exec"
    assert after["piped"] == "in the pipe before the exec"
    assert after["lost"] == {
        "lost": f"fd {before['lost']} was closed in the exec",
        "reused": f"fd {before['reused']} is something else after the exec",
    }
    assert after["untaken"] == after["closed"] == ["untaken"]
    assert before["private"] not in after["numbers"]


PROBE = (
    "import os, socket\n"
    "s = socket.socket(); s.set_inheritable({inheritable}); fd = s.fileno()\n"
    "os.execv('/bin/sh', ['sh', '-c', 'test -e /proc/$$/fd/%d && echo open || echo gone' % fd])\n"
)


@pytest.mark.parametrize(("inheritable", "seen"), [(False, "gone"), (True, "open")])
def test_only_what_is_marked_crosses(inheritable: bool, seen: str) -> None:
    """Why the ledger is the one list: Python's fds are close-on-exec, so an
    fd crosses only if marked (the probe tells both cases apart)."""
    code = PROBE.format(inheritable=inheritable)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == seen, out.stderr
