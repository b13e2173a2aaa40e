"""The load: wrk (Debian's package, C speed) with ``Connection: close``.

One TCP connection per request, so every request is a connect, an accept
and a close: what a reload can break. ``Wrk`` runs one phase and parses
wrk's summary: requests, rate, latency percentiles, failures by cause
(wrk's socket errors and non-2xx answers) and, with ``count_pids``, how
many answers each worker pid gave (a Lua script reads ``pid=`` in bodies).
A phase that measured nothing is never a result: ``result()`` raises
``NoMeasurement`` when wrk failed, printed no summary, or completed no
request (a phase of 0 requests would otherwise read as "0 failed").
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

THREADS = 2


class NoMeasurement(RuntimeError):
    """The load client failed, or its phase completed no request."""


CONNECTIONS = 32
PIDS_LUA = Path(__file__).with_name("count_pids.lua")


@dataclass
class WrkResult:
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    latency: dict[str, float] = field(default_factory=dict)  # "50%" -> ms, and "max"
    errors: dict[str, int] = field(default_factory=dict)  # cause -> count
    pids: dict[int, int] = field(default_factory=dict)  # pid -> answers

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def _ms(text: str) -> float:
    number = re.match(r"[0-9.]+", text)
    if number is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    unit = text[number.end() :]
    return float(number.group()) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse(output: str) -> WrkResult:
    result = WrkResult()
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", output, re.M):
        result.latency[f"{pct}%"] = _ms(value)
    # "Latency   1.2ms  0.5ms  45.3ms  90%": avg, stdev, max, +/- stdev
    row = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", output, re.M)
    if row:
        result.latency["max"] = _ms(row.group(3))
    done = re.search(r"(\d+) requests in ([0-9.]+)(\w+)", output)
    if done:
        result.requests = int(done.group(1))
        result.seconds = _ms(done.group(2) + done.group(3)) / 1000
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", output)
    result.rps = float(rps.group(1)) if rps else 0.0
    sock = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sock:
        for name, value in zip(("connect", "read", "write", "timeout"), sock.groups(), strict=True):
            if int(value):
                result.errors[name] = int(value)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        result.errors["non-2xx"] = int(non2xx.group(1))
    result.pids = {int(pid): int(n) for pid, n in re.findall(r"^PID (\d+) (\d+)$", output, re.M)}
    return result


class Wrk:
    """One wrk run against ``port``; ``result()`` waits for it (or stops it early)."""

    def __init__(
        self,
        port: int,
        seconds: float,
        *,
        connections: int = CONNECTIONS,
        count_pids: bool = False,
        prefix: Sequence[str] = (),
    ) -> None:
        """``prefix``: run wrk under it (``nsenter -t PID -n``: in another namespace)."""
        script = ["-s", str(PIDS_LUA)] if count_pids else []
        self.proc = subprocess.Popen(
            [
                *prefix,
                "wrk",
                f"-t{THREADS}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                *script,
                "-H",
                "Connection: close",
                f"http://127.0.0.1:{port}/",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self, *, stop: bool = False) -> WrkResult:
        if stop:  # wrk prints its summary on SIGINT
            self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=None if not stop else 30)
        if self.proc.returncode != 0 and not stop:
            said = err.strip().splitlines()[-1:] or ["no message"]
            raise NoMeasurement(f"wrk exited with status {self.proc.returncode}: {said[0]}")
        if not re.search(r"\d+ requests in ", out):
            raise NoMeasurement("wrk printed no summary")
        result = parse(out)
        if result.requests == 0:
            causes = ", ".join(f"{k} {v}" for k, v in result.errors.items()) or "no errors either"
            raise NoMeasurement(f"the phase completed no request ({causes})")
        return result
