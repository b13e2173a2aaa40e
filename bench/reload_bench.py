"""Reload benchmark: a fast client (wrk) against 4 demo workers, steady vs reloading.

For each retirement path and steering backend (migrate by the eBPF program
with tcp_migrate_req=0; migrate by the kernel with classic BPF and the
sysctl at 1; drain with either backend and the sysctl at 0) it runs wrk
with ``Connection: close`` (one TCP connection per request) for the same
time twice: once steady, once while ``supervisorctl reload`` runs in a
loop (a reload, then a 0.5 s pause). It reports connections per second,
failed connections by cause (wrk's socket errors and non-2xx answers),
latency percentiles steady vs during reloads, and reload durations, into
bench/RESULTS.md.

Runs as root in a private network namespace (it re-executes itself under
``unshare -n``): loopback only, and the sysctl it sets is the namespace's.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor.ctl import request  # noqa: E402
from supervisor.errors import DaemonUnreachable  # noqa: E402

PORT = 8080
WRK_THREADS = 2
WRK_CONNECTIONS = 32
WARM_UP = 3


@dataclass
class WrkResult:
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    latency: dict[str, float] = field(default_factory=dict)  # "50%" -> ms
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def _ms(text: str) -> float:
    value = float(re.sub(r"[a-z]+$", "", text))
    unit = re.sub(r"^[0-9.]+", "", text)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(output: str) -> WrkResult:
    result = WrkResult()
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", output, re.M):
        result.latency[f"{pct}%"] = _ms(value)
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
    return result


def wrk(seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "wrk",
            f"-t{WRK_THREADS}",
            f"-c{WRK_CONNECTIONS}",
            f"-d{int(seconds)}s",
            "--latency",
            "-H",
            "Connection: close",
            f"http://127.0.0.1:{PORT}/",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


class Supervisor:
    def __init__(self, workdir: Path, workers: int, steering: str, retire: str) -> None:
        self.control = workdir / "control.sock"
        config = workdir / "bench.toml"
        demo = [sys.executable, "-m", "supervisor.demo"]
        config.write_text(
            f'[supervisor]\ncontrol_socket = "{self.control}"\nlog_level = "warning"\n'
            f'steering = "{steering}"\n'
            f"[services.web]\ncommand = {demo!r}\nworkers = {workers}\n"
            f'retire = "{retire}"\n'
            f'listen = ["127.0.0.1:{PORT}"]\nstop_timeout = "10s"\n'
            '[services.web.health]\nkind = "notify"\n'.replace("'", '"')
        )
        self.log = (workdir / "supervisord.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.daemon", "-c", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not self._status_ok():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"supervisord did not start; see {self.log.name}")
            time.sleep(0.1)

    def _status_ok(self) -> bool:
        try:
            for reply in request(self.control, {"command": "status"}, timeout=5):
                return reply.get("type") == "result"
        except DaemonUnreachable:
            return False
        return False

    def reload(self) -> tuple[float, dict[str, Any]]:
        start = time.monotonic()
        for reply in request(self.control, {"command": "reload"}, timeout=120):
            if reply["type"] in ("result", "error"):
                return time.monotonic() - start, dict(reply["services"]["web"])
        raise RuntimeError("no answer")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


@dataclass(frozen=True)
class Route:
    name: str
    steering: str  # [supervisor] steering
    retire: str  # [services.web] retire
    migrate_req: int  # net.ipv4.tcp_migrate_req in the benchmark's namespace


PATHS = [
    Route("migrate, eBPF (tcp_migrate_req=0)", "ebpf", "migrate", 0),
    Route("migrate, classic BPF (tcp_migrate_req=1)", "cbpf", "migrate", 1),
    Route("drain, eBPF (tcp_migrate_req=0)", "ebpf", "drain", 0),
    Route("drain, classic BPF (tcp_migrate_req=0)", "cbpf", "drain", 0),
]


@dataclass
class Scenario:
    name: str
    steady: WrkResult
    reloading: WrkResult
    reloads: list[dict[str, Any]]
    wall: list[float]


def run_scenario(path: Route, seconds: float, interval: float) -> Scenario:
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text(str(path.migrate_req))
    with tempfile.TemporaryDirectory() as tmp:
        sup = Supervisor(Path(tmp), workers=4, steering=path.steering, retire=path.retire)
        try:
            wrk(WARM_UP).communicate()  # not recorded: first connections, page faults
            steady = parse_wrk(wrk(seconds).communicate()[0])
            client = wrk(seconds)
            reports, wall = [], []
            stop_at = time.monotonic() + seconds - 1.5
            while time.monotonic() < stop_at:
                took, report = sup.reload()
                wall.append(took)
                reports.append(report)
                time.sleep(interval)
            reloading = parse_wrk(client.communicate()[0])
        finally:
            sup.stop()
    seen = {(r.get("path"), r.get("steering")) for r in reports if r.get("ok")}
    if seen - {(path.retire, path.steering)}:
        raise SystemExit(f"{path.name}: the daemon took {seen}, not what the row says")
    return Scenario(path.name, steady, reloading, reports, wall)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def render(scenarios: list[Scenario], seconds: float, interval: float) -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "unknown CPU",
    )
    lines = [
        "# Reload benchmark",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} cores "
        f"({cpu}), Linux {platform.release()}, Python {platform.python_version()}, "
        f"wrk {WRK_THREADS} threads / {WRK_CONNECTIONS} connections, `Connection: close` "
        "(one TCP connection per request), 4 demo workers on 127.0.0.1, in a private network "
        f"namespace. Each phase runs {seconds:g} s; during the second, `supervisorctl reload` "
        f"runs in a loop with a {interval:g} s pause between reloads. The client, the "
        "supervisor and the workers share the 2 cores, so absolute numbers are this machine's; "
        "the ratios are what compares.",
        "",
        "| path | conn/s steady | conn/s reloading | failed steady | failed reloading | "
        "p50 steady | p50 reloading | p99 steady | p99 reloading | p99 ratio | reloads | "
        "reload p50 | reload p99 | queued at cutover | drained | migrated |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        durations = [float(r["duration"]) for r in s.reloads if r.get("ok")]
        queued = sum(int(r.get("queued_at_cutover") or 0) for r in s.reloads)
        drained = sum(int(r.get("drained") or 0) for r in s.reloads)
        migrated = sum(
            int((r.get("counters") or {}).get("TCPMigrateReqSuccess", 0)) for r in s.reloads
        )
        ok = sum(1 for r in s.reloads if r.get("ok"))
        p99s, p99r = s.steady.latency.get("99%", 0.0), s.reloading.latency.get("99%", 0.0)
        lines.append(
            f"| {s.name} | {s.steady.rps:,.0f} | {s.reloading.rps:,.0f} | "
            f"{s.steady.failed} {s.steady.errors or ''} | {s.reloading.failed} "
            f"{s.reloading.errors or ''} | {s.steady.latency.get('50%', 0):.2f} ms | "
            f"{s.reloading.latency.get('50%', 0):.2f} ms | {p99s:.2f} ms | {p99r:.2f} ms | "
            f"{p99r / p99s if p99s else float('nan'):.2f}x | {ok}/{len(s.reloads)} | "
            f"{pct(durations, 0.5) * 1000:.0f} ms | {pct(durations, 0.99) * 1000:.0f} ms | "
            f"{queued} | {drained} | {migrated} |"
        )
    lines += [
        "",
        "Reload duration: from the rollout's start (config validated) to the old generation's "
        "last worker reaped, as the daemon reports it; it includes starting 4 Python workers "
        "(about 0.3 s each, in parallel) and the old workers' graceful exit. The drain path "
        "waits until the old queues are empty and the handshakes pending at cutover "
        "(sock_diag) have ended, checked twice 10 ms apart. `migrated` is the namespace's "
        "TCPMigrateReqSuccess over the reloads; `drained` the connections old workers "
        "accepted after the cutover.",
        "",
        "Failed connections are wrk's socket errors (connect, read, write, timeout) and "
        "non-2xx answers, counted for the whole phase.",
    ]
    lines.append("\nTargets (issue 6), as measured in this run:")
    for s in scenarios:
        failed = s.reloading.failed + s.steady.failed
        p99s, p99r = s.steady.latency.get("99%", 0.0), s.reloading.latency.get("99%", 0.0)
        ratio = p99r / p99s if p99s else float("nan")
        lines.append(
            f"- {s.name}: zero failed connections: "
            f"{'met' if failed == 0 else f'**missed** ({failed} failed)'}; "
            f"p99 during reloads within 1.2x of steady: "
            f"{'met' if ratio <= 1.2 else f'**missed** ({ratio:.2f}x)'}."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the benchmark needs root (a private network namespace)")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk (make bench does)")
    if os.environ.get("BENCH_IN_NETNS") != "1":
        env = {**os.environ, "BENCH_IN_NETNS": "1"}
        os.execvpe("unshare", ["unshare", "-n", sys.executable, *sys.argv], env)  # noqa: S606
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    scenarios = [run_scenario(path, args.seconds, args.interval) for path in PATHS]
    text = render(scenarios, args.seconds, args.interval)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
