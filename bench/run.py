"""The side-by-side benchmark: ``make bench`` (about 15 min), ``make bench-quick``.

Re-executes itself as root in a private network namespace (loopback only;
``net.ipv4.tcp_migrate_req`` is set in that namespace, never the host's),
then runs four sections and writes ``bench/RESULTS.md``, ``results.json``
and PNG plots (see ``bench/report.py``):

1. compare: every system under the same wrk load (``Connection: close``),
   steady, then with a reload every ``interval`` s for ``seconds`` s;
2. spread: 8 workers, per-worker SO_REUSEPORT listeners vs one shared one;
3. scale: reload duration, the supervisor's overhead and CPU per reload
   for 1, 4, 8 and 64 workers; the supervisor's RSS;
4. soak: consecutive reloads under load: failures, fds, RSS, zombies;
5. survive: the supervisor's in-place upgrade, a kill -9 and a restart under
   real systemd, beside nginx's kill -9 of the master and binary upgrade and
   HAProxy's master reload (``bench/survive.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import report, survive, wrk  # noqa: E402
from bench.procs import (  # noqa: E402
    HERE,
    SelfBound,
    cpu_seconds,
    rss_kib,
    settled_fd_count,
    wait_for,
    zombies,
)
from bench.systems import (  # noqa: E402
    Gunicorn,
    HandRolled,
    HAProxy,
    Naive,
    Nginx,
    Reload,
    Supervised,
    System,
    nginx_workers,
)
from supervisor.kernel import diag  # noqa: E402
from supervisor.values import parse_listen  # noqa: E402

PORT = 8080
WORKERS = 4


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "supervisor" or "other": the targets apply to the supervisor's rows
    migrate_req: int
    make: Callable[[Path], System]
    needs: str = ""  # a program that must be on PATH


def _sup(steering: str, retire: str) -> Callable[[Path], System]:
    return lambda d: Supervised(d, PORT, WORKERS, steering, retire)


CONTENDERS = [
    Contender("naive stop, then start", "other", 0, lambda _: Naive(PORT, WORKERS)),
    Contender("hand-rolled SO_REUSEPORT, tcp_migrate_req=0", "other", 0,
              lambda _: HandRolled(PORT, WORKERS)),
    Contender("hand-rolled SO_REUSEPORT, tcp_migrate_req=1", "other", 1,
              lambda _: HandRolled(PORT, WORKERS)),
    Contender("supervisor: migrate, sysctl (classic BPF, tcp_migrate_req=1)", "supervisor", 1,
              _sup("cbpf", "migrate")),
    Contender("supervisor: migrate, eBPF policy (tcp_migrate_req=0)", "supervisor", 0,
              _sup("ebpf", "migrate")),
    Contender("supervisor: drain, eBPF", "supervisor", 0, _sup("ebpf", "drain")),
    Contender("supervisor: drain, classic BPF", "supervisor", 0, _sup("cbpf", "drain")),
    Contender("supervisor: migrate, eBPF policy, nginx workers", "supervisor", 0,
              lambda d: nginx_workers(d, PORT, WORKERS, "ebpf"), "nginx"),
    Contender("nginx -s reload", "other", 0, lambda d: Nginx(d, PORT, reuseport=False), "nginx"),
    Contender("nginx -s reload, reuseport", "other", 0,
              lambda d: Nginx(d, PORT, reuseport=True), "nginx"),
    Contender("gunicorn HUP (sync workers)", "other", 0, lambda d: Gunicorn(d, PORT)),
    Contender("HAProxy reload (master-worker, fd passing)", "other", 0,
              lambda d: HAProxy(d, PORT), "haproxy"),
]  # fmt: skip


@dataclass
class Row:
    name: str
    kind: str
    steady: wrk.WrkResult = field(default_factory=wrk.WrkResult)
    reloading: wrk.WrkResult = field(default_factory=wrk.WrkResult)
    reloads: list[float] = field(default_factory=list)
    failed_reloads: int = 0
    overhead: list[float] = field(default_factory=list)  # the supervisor's own share
    error: str | None = None


def set_migrate_req(value: int) -> None:
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text(str(value))


def compare(c: Contender, seconds: float, steady: float, interval: float, warm: float) -> Row:
    row = Row(c.name, c.kind)
    if c.needs and shutil.which(c.needs) is None:
        row.error = f"{c.needs} is not installed"
        return row
    set_migrate_req(c.migrate_req)
    address = parse_listen(f"127.0.0.1:{PORT}")
    wait_for(lambda: not diag.port_owners(address), 30, f"port {PORT} to be free")
    with tempfile.TemporaryDirectory() as tmp:
        system = c.make(Path(tmp))
        try:
            system.start()
            wrk.Wrk(PORT, warm).result()  # warm-up, not recorded
            row.steady = wrk.Wrk(PORT, steady).result()
            client = wrk.Wrk(PORT, seconds)
            stop_at = time.monotonic() + seconds - 1.0
            while time.monotonic() < stop_at:
                done: Reload = system.reload()
                row.reloads.append(done.seconds)
                row.failed_reloads += not done.ok
                row.overhead += timing([done], "overhead")
                time.sleep(interval)
            row.reloading = client.result()
        except Exception as exc:  # noqa: BLE001  (a row that could not run says why)
            row.error = f"{type(exc).__name__}: {exc}"
        finally:
            system.stop()
    print(f"compare: {c.name}: {row.reloading.failed} failed, {len(row.reloads)} reloads"
          f"{', ' + row.error if row.error else ''}", flush=True)  # fmt: skip
    return row


def spread(seconds: float, workers: int = 8) -> dict[str, dict[str, int]]:
    """Answers per worker pid: per-worker listeners (supervisor) vs one shared listener."""
    set_migrate_req(0)
    out: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sup = Supervised(Path(tmp), PORT, workers, "auto", "migrate")
        sup.start()
        try:
            result = wrk.Wrk(PORT, seconds, count_pids=True).result()
            out["per-worker SO_REUSEPORT listeners"] = {str(k): v for k, v in result.pids.items()}
        finally:
            sup.stop()
    shared = socket.socket()
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    shared.bind(("127.0.0.1", PORT))
    shared.listen(1024)
    group = SelfBound(PORT, workers, "shared", share_fd=shared.fileno())
    try:
        group.procs = group.start()
        shared.close()  # the workers hold it now
        result = wrk.Wrk(PORT, seconds, count_pids=True).result()
        out["one shared listener"] = {str(k): v for k, v in result.pids.items()}
    finally:
        group.close()
    print(f"spread: {[(k, len(v)) for k, v in out.items()]}", flush=True)
    return out


def timing(reloads: list[Reload], key: str) -> list[float]:
    return [float(r.report["timings"][key]) for r in reloads if r.report and r.ok]


def scale(counts: list[int], reloads: int) -> list[dict[str, Any]]:
    """Reloads without load, so the times are the rollout's, not the client's."""
    set_migrate_req(0)
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            sup = Supervised(Path(tmp), PORT, n, "auto", "migrate")
            sup.start()
            try:
                k = max(2, reloads // (3 if n >= 64 else 1))
                cpu = cpu_seconds(sup.pid)
                done = [sup.reload() for _ in range(k)]
                cpu = (cpu_seconds(sup.pid) - cpu) / k
                rows.append({
                    "workers": n, "reloads": k, "failed": sum(not r.ok for r in done),
                    "duration": [r.seconds for r in done],
                    "overhead": timing(done, "overhead"),
                    "workers_start": timing(done, "workers_start"),
                    "cpu_per_reload": cpu, "rss_kib": rss_kib(sup.pid),
                })  # fmt: skip
            finally:
                sup.stop()
        print(f"scale: {n} workers done", flush=True)
    return rows


def soak(reloads: int, warm_up: int = 20) -> dict[str, Any]:
    set_migrate_req(0)
    tiny = [sys.executable, "-I", "-S", str(HERE / "tiny_worker.py")]
    with tempfile.TemporaryDirectory() as tmp:
        sup = Supervised(Path(tmp), PORT, 2, "ebpf", "migrate", command=tiny)
        sup.start()
        try:
            client = wrk.Wrk(PORT, 3600, connections=8)
            failed = sum(not sup.reload().ok for _ in range(warm_up))
            before = {"fds": settled_fd_count(sup.pid), "rss_kib": rss_kib(sup.pid)}
            start = time.monotonic()
            failed += sum(not sup.reload().ok for _ in range(reloads - warm_up))
            took = time.monotonic() - start
            after = {"fds": settled_fd_count(sup.pid), "rss_kib": rss_kib(sup.pid)}
            result = client.result(stop=True)
            left = len(zombies(sup.pid))
        finally:
            sup.stop()
    print(f"soak: {reloads} reloads, {result.failed} failed connections", flush=True)
    return {
        "reloads": reloads, "failed_reloads": failed, "seconds": took, "before": before,
        "after": after, "zombies": left, "requests": result.requests, "errors": result.errors,
        "measured": report.machine(),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short phases (under 2 minutes)")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument(
        "--only",
        choices=["compare", "spread", "scale", "soak", "survive", "nothing"],
        help="measure this section again (or nothing: only render); the rest comes from "
        "OUT/results.json",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the benchmark needs root (a private network namespace)")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk (make bench-deps does)")
    if os.environ.get("BENCH_IN_NETNS") != "1":
        env = {**os.environ, "BENCH_IN_NETNS": "1"}
        os.execvpe("unshare", ["unshare", "-n", sys.executable, *sys.argv], env)  # noqa: S606
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    q = args.quick
    seconds, steady, interval, warm = (3, 1, 0.5, 1) if q else (30, 10, 0.5, 3)
    survive_seconds = 8 if q else 30
    sections: dict[str, Callable[[], Any]] = {
        "compare": lambda: [
            asdict(compare(c, seconds, steady, interval, warm)) for c in CONTENDERS
        ],
        "spread": lambda: spread(3 if q else 10),
        "scale": lambda: scale([1, 4] if q else [1, 4, 8, 64], 2 if q else 10),
        "soak": lambda: soak(60 if q else 1000),
        "survive": lambda: survive.run(PORT, survive_seconds, 2.0 if q else 3.0),
    }
    if args.only:
        results = json.loads((args.out / "results.json").read_text())
        if args.only in sections:
            results[args.only] = sections[args.only]()
            if args.only == "survive":
                results["survive_seconds"] = survive_seconds
    else:
        results = {"quick": q, "seconds": seconds, "steady": steady, "interval": interval,
                   "survive_seconds": survive_seconds, "machine": report.machine()}  # fmt: skip
        results.update({name: measure() for name, measure in sections.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = report.render(results, args.out)
    (args.out / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
