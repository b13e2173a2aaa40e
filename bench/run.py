"""The side-by-side benchmark: ``make bench`` (about 25 min), ``make bench-quick``.

Re-executes itself as root in a private network namespace (loopback only;
``net.ipv4.tcp_migrate_req`` is set in that namespace, never the host's),
then runs four sections and writes ``bench/RESULTS.md``, ``results.json``
and PNG plots (see ``bench/report.py``):

1. compare: every system under the same wrk load (``Connection: close``),
   steady, then with a reload every ``interval`` s for ``seconds`` s; the
   rows a target compares run ``--rounds`` times, interleaved (A B A B),
   and are judged on the median; a run that measured nothing is an error;
2. spread: 8 workers, per-worker SO_REUSEPORT listeners vs one shared one;
3. scale: a worker that starts in milliseconds (``tiny_worker.py``) at 1,
   64, 256 and 512 workers: time to first serve at start, reload duration,
   the supervisor's overhead and CPU per reload, its RSS and fds, and the
   same reloads done with only the kernel's part (``bench/floor.py``);
4. soak: consecutive reloads under load: failures, fds, RSS, zombies;
5. survive: the supervisor's in-place upgrade, a kill -9 and a restart under
   real systemd, beside nginx's kill -9 of the master and binary upgrade and
   HAProxy's master reload (``bench/survive.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench import floor, report, survive, wrk  # noqa: E402
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
from tests.support.procs import (  # noqa: E402
    TINY,
    SelfBound,
    cpu_seconds,
    enter_private_netns,
    machine_busy_seconds,
    rss_kib,
    settled_fd_count,
    wait_for,
    zombies,
)

PORT = 8080
WORKERS = 4


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "supervisor" or "other": the targets apply to the supervisor's rows
    migrate_req: int
    make: Callable[[Path], System]
    needs: str = ""  # a program that must be on PATH
    baseline: bool = False  # a target compares a supervisor row with this one

    @property
    def compared(self) -> bool:
        """Does a target read this row? Those run every round; the rest once."""
        return self.kind == "supervisor" or self.baseline


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
    # The same reloads with a worker that starts in milliseconds: what is left of
    # the spike once the new workers' own start costs (almost) no CPU.
    Contender("supervisor: migrate, eBPF policy, tiny workers", "supervisor", 0,
              lambda d: Supervised(d, PORT, WORKERS, "ebpf", "migrate", command=TINY)),
    Contender("supervisor: migrate, eBPF policy, nginx workers", "supervisor", 0,
              lambda d: nginx_workers(d, PORT, WORKERS, "ebpf"), "nginx"),
    Contender("nginx -s reload", "other", 0, lambda d: Nginx(d, PORT, reuseport=False), "nginx",
              baseline=True),
    Contender("nginx -s reload, reuseport", "other", 0,
              lambda d: Nginx(d, PORT, reuseport=True), "nginx"),
    Contender("gunicorn HUP (sync workers)", "other", 0, lambda d: Gunicorn(d, PORT)),
    Contender("HAProxy reload (master-worker, fd passing)", "other", 0,
              lambda d: HAProxy(d, PORT), "haproxy"),
]  # fmt: skip


@dataclass
class Run:
    """One row's measurement in one round."""

    steady: wrk.WrkResult = field(default_factory=wrk.WrkResult)
    reloading: wrk.WrkResult = field(default_factory=wrk.WrkResult)
    reloads: list[float] = field(default_factory=list)
    failed_reloads: int = 0
    overhead: list[float] = field(default_factory=list)  # the supervisor's own share
    cpu: list[float] = field(default_factory=list)  # the supervisor thread's CPU per reload
    waiting: list[float] = field(default_factory=list)  # ... and its time runnable without a CPU
    error: str | None = None  # a run that measured nothing, or broke, says why


@dataclass
class Row:
    name: str
    kind: str
    runs: list[Run] = field(default_factory=list)
    skipped: str | None = None  # a program it needs is not installed


def set_migrate_req(value: int) -> None:
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text(str(value))


def compare(
    contenders: list[Contender], rounds: int, phases: tuple[float, float, float, float]
) -> list[Row]:
    """The rows a target compares once per round, in order, ``rounds`` times
    (A B C A B C); the others in the first round only. On 2 shared cores one
    run is noise; interleaving spreads the machine's drift over every row alike."""
    rows = [Row(c.name, c.kind) for c in contenders]
    for row, c in zip(rows, contenders, strict=True):
        if c.needs and shutil.which(c.needs) is None:
            row.skipped = f"{c.needs} is not installed"
    for n in range(rounds):
        for row, c in zip(rows, contenders, strict=True):
            if row.skipped is None and (n == 0 or c.compared):
                row.runs.append(_measure(c, *phases))
                last = row.runs[-1]
                print(f"compare {n + 1}/{rounds}: {c.name}: {last.reloading.failed} failed, "
                      f"{len(last.reloads)} reloads{', ' + last.error if last.error else ''}",
                      flush=True)  # fmt: skip
    return rows


def _measure(c: Contender, seconds: float, steady: float, interval: float, warm: float) -> Run:
    run = Run()
    set_migrate_req(c.migrate_req)
    address = parse_listen(f"127.0.0.1:{PORT}")
    wait_for(lambda: not diag.port_owners(address), 30, f"port {PORT} to be free")
    with tempfile.TemporaryDirectory() as tmp:
        system = c.make(Path(tmp))
        try:
            system.start()
            wrk.Wrk(PORT, warm).result()  # warm-up, not recorded
            run.steady = wrk.Wrk(PORT, steady).result()
            client = wrk.Wrk(PORT, seconds)
            # wrk checks one connection first and exits if it is refused: a naive
            # restart at once would leave the phase with no measurement at all.
            time.sleep(0.5)
            stop_at = time.monotonic() + seconds - 1.5
            while time.monotonic() < stop_at:
                done: Reload = system.reload()
                run.reloads.append(done.seconds)
                run.failed_reloads += not done.ok
                run.overhead += timing([done], "overhead")
                run.cpu += timing([done], "cpu")
                run.waiting += timing([done], "waiting_for_cpu")
                time.sleep(interval)
            run.reloading = client.result()
            if not run.reloads:
                run.error = "no reload completed within the phase"
        except Exception as exc:  # noqa: BLE001  (a run that could not finish says why)
            run.error = f"{type(exc).__name__}: {exc}"
        finally:
            system.stop()
    return run


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
    return [
        float(r.report["timings"][key])
        for r in reloads
        if r.report and r.ok and key in r.report["timings"]
    ]


def answers(port: int) -> bool:
    """Does ``GET /`` on ``port`` get a 200 now?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            return conn.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def scale(counts: list[int], reloads: int) -> list[dict[str, Any]]:
    """Tiny workers (milliseconds to start), reloads without load: the times
    are the rollout's and the supervisor's, not a client's or a slow worker's."""
    set_migrate_req(0)
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            sup = Supervised(Path(tmp), PORT, n, "auto", "migrate", command=TINY)
            began = time.monotonic()
            sup.launch()
            wait_for(lambda: answers(PORT), 300, "the first answer")
            first = time.monotonic() - began
            sup.wait_serving()
            all_running = time.monotonic() - began
            try:
                k = reloads if n <= 64 else max(2, reloads // 2)
                cpu, machine = cpu_seconds(sup.pid), machine_busy_seconds()
                done = [sup.reload() for _ in range(k)]
                cpu = (cpu_seconds(sup.pid) - cpu) / k
                machine = (machine_busy_seconds() - machine) / k
                rows.append({
                    "workers": n, "reloads": k, "failed": sum(not r.ok for r in done),
                    "duration": [r.seconds for r in done],
                    "overhead": timing(done, "overhead"),
                    "workers_start": timing(done, "workers_start"),
                    "workers_stop": timing(done, "workers_stop"),
                    "thread_cpu": timing(done, "cpu"),
                    "waiting_for_cpu": timing(done, "waiting_for_cpu"),
                    "cpu_per_reload": cpu, "machine_cpu_per_reload": machine,
                    "rss_kib": rss_kib(sup.pid),
                    "fds": settled_fd_count(sup.pid),
                    "first_serve": first, "all_running": all_running,
                })  # fmt: skip
            finally:
                sup.stop()
        least = floor.measure(n, k)  # the same reloads with only the kernel's part
        rows[-1].update(floor_cpu_per_worker=least.cpu_per_worker, floor_duration=least.durations)
        print(f"scale: {n} workers done", flush=True)
    return rows


def soak(reloads: int, warm_up: int = 20) -> dict[str, Any]:
    set_migrate_req(0)
    with tempfile.TemporaryDirectory() as tmp:
        sup = Supervised(Path(tmp), PORT, 2, "ebpf", "migrate", command=TINY)
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
    parser.add_argument(
        "--rounds",
        type=int,
        help="runs of each row a target compares, interleaved (default 3; 1 with --quick)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk (make bench-deps does)")
    enter_private_netns("the benchmark")
    q = args.quick
    # (seconds reloading, seconds steady, pause between reloads, warm-up)
    phases = (3.0, 1.0, 0.5, 1.0) if q else (15.0, 5.0, 0.5, 2.0)
    rounds = args.rounds or (1 if q else 3)
    survive_seconds = 8 if q else 30
    sections: dict[str, Callable[[], Any]] = {
        "compare": lambda: [asdict(row) for row in compare(CONTENDERS, rounds, phases)],
        "spread": lambda: spread(3 if q else 10),
        "scale": lambda: scale([1, 64] if q else [1, 64, 256, 512], 2 if q else 10),
        "soak": lambda: soak(60 if q else 1000),
        "survive": lambda: survive.run(PORT, survive_seconds, 2.0 if q else 3.0),
    }
    if args.only:
        results = json.loads((args.out / "results.json").read_text())
        if args.only in sections:
            results[args.only] = sections[args.only]()
            # The other sections come from an earlier run: say when this one was.
            results.setdefault("remeasured", {})[args.only] = report.machine()
            if args.only == "survive":
                results["survive_seconds"] = survive_seconds
    else:
        seconds, steady, interval, _ = phases
        results = {"quick": q, "seconds": seconds, "steady": steady, "interval": interval,
                   "rounds": rounds, "survive_seconds": survive_seconds,
                   "machine": report.machine()}  # fmt: skip
        results.update({name: measure() for name, measure in sections.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = report.render(results, args.out)
    (args.out / "RESULTS.md").write_text(text)
    print(text)
    errors = report.errors(results)
    if errors:
        # A phase that measured nothing must never pass for "0 failed".
        raise SystemExit("the benchmark has errors:\n" + "\n".join(f"- {e}" for e in errors))


if __name__ == "__main__":
    main()
