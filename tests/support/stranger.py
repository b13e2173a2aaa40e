"""A process that is not ours binding a listen address: how a census meets a stranger."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

# Binds (with SO_REUSEPORT unless told not to), listens, says "ready", and
# never accepts: a connection steered to it would wait until the client gives up.
_SCRIPT = """
import socket, sys, time
host, port, defer, reuseport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
if reuseport:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
if defer:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer)
s.bind((host, port))
s.listen(64)
print("ready", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def stranger(
    host: str, port: int, *, defer_accept: int = 0, reuseport: bool = True
) -> Iterator[subprocess.Popen[str]]:
    """A listening stranger on (host, port) while inside; killed (by pid) and reaped after."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, host, str(port), str(defer_accept), str(int(reuseport))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
