"""RESULTS.md and its plots, from the measurements ``bench/run.py`` made."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.wrk import CONNECTIONS, THREADS


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    wrk_version = (wrk.stdout + wrk.stderr).split("[", 1)[0].strip()
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores ({cpu}), "
        f"Linux {platform.release()}, Python {platform.python_version()}, {wrk_version}"
    )


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _causes(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in errors.items())


def _failed(result: dict[str, Any]) -> int:
    return sum(result["errors"].values())


def _p99(result: dict[str, Any]) -> float:
    return float(result["latency"].get("99%", 0))


def _p99_ratio(run: dict[str, Any]) -> float:
    """p99 while reloading over p99 steady, in one run."""
    return ratio(_p99(run["reloading"]), _p99(run["steady"]))


def _spread(counts: dict[str, int]) -> float:
    """Most answers per worker over fewest."""
    return ratio(max(counts.values()), min(counts.values()))


def measured(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A row's runs that measured something (the others are errors)."""
    return [run for run in row["runs"] if not run["error"]]


def median(values: list[float]) -> float:
    return pct(values, 0.5)


def _mr(values: list[float], fmt: str = "{:.1f}", unit: str = "") -> str:
    """The median, and the range when there is more than one value."""
    if not values:
        return "n/a"
    text = fmt.format(median(values)) + unit
    if len(values) > 1:
        text += f" ({fmt.format(min(values))}-{fmt.format(max(values))})"
    return text


def row_stats(row: dict[str, Any]) -> dict[str, Any]:
    """A row's numbers over its runs: medians of per-run values, sums of counts."""
    runs = measured(row)
    reloads = [sec for run in runs for sec in run["reloads"]]
    return {
        "runs": len(runs),
        "rps_steady": [run["steady"]["rps"] for run in runs],
        "rps_reloading": [run["reloading"]["rps"] for run in runs],
        "failed_steady": sum(_failed(run["steady"]) for run in runs),
        "failed": sum(_failed(run["reloading"]) for run in runs),
        "errors": _sum_errors([run["reloading"]["errors"] for run in runs]),
        "p99_steady": [_p99(run["steady"]) for run in runs],
        "p99_reloading": [_p99(run["reloading"]) for run in runs],
        "p99_ratio": [_p99_ratio(run) for run in runs],
        "reload_p50": [median(run["reloads"]) for run in runs if run["reloads"]],
        "reloads": len(reloads),
        "reloads_ok": len(reloads) - sum(run["failed_reloads"] for run in runs),
        "reload_p99": pct(reloads, 0.99),
        "overhead": [median(run["overhead"]) for run in runs if run["overhead"]],
        "cpu": [median(run["cpu"]) for run in runs if run.get("cpu")],
        "waiting": [median(run["waiting"]) for run in runs if run.get("waiting")],
    }


def _sum_errors(each: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for errors in each:
        for cause, n in errors.items():
            total[cause] = total.get(cause, 0) + n
    return total


def compare_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| system | runs | conn/s steady / reloading | failed steady | failed reloading "
        "(by cause) | p99 steady / reloading | p99 ratio | reloads | reload p50 (p99) | "
        "supervisor overhead p50 | supervisor CPU / waiting for CPU per reload |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["skipped"]:
            lines.append(f"| {r['name']} | not run: {r['skipped']} |" + " |" * 9)
            continue
        broken = [run["error"] for run in r["runs"] if run["error"]]
        st = row_stats(r)
        if not st["runs"]:
            lines.append(f"| {r['name']} | **error**: {'; '.join(broken)} |" + " |" * 9)
            continue
        causes = _causes(st["errors"])
        ms = {"fmt": "{:.0f}", "unit": " ms"}
        cpu = (
            f"{_mr([c * 1000 for c in st['cpu']], **ms)} / "
            f"{_mr([w * 1000 for w in st['waiting']], **ms)}"
            if st["cpu"]
            else "n/a"
        )
        runs = f"{st['runs']}" + (f" (**{len(broken)} broken**)" if broken else "")
        lines.append(
            f"| {r['name']} | {runs} | {_mr(st['rps_steady'], '{:,.0f}')} / "
            f"{_mr(st['rps_reloading'], '{:,.0f}')} | {st['failed_steady']:,} | "
            f"{st['failed']:,}{f' ({causes})' if causes else ''} | "
            f"{median(st['p99_steady']):.1f} / {_mr(st['p99_reloading'], unit=' ms')} | "
            f"{_mr(st['p99_ratio'], '{:.2f}', 'x')} | {st['reloads_ok']}/{st['reloads']} | "
            f"{_mr([x * 1000 for x in st['reload_p50']], **ms)} "
            f"({st['reload_p99'] * 1000:.0f} ms) | "
            f"{_mr([x * 1000 for x in st['overhead']], **ms)} | {cpu} |"
        )
    return lines


def spread_lines(spread: dict[str, dict[str, int]]) -> list[str]:
    lines = [
        "| listeners | workers answering | answers | max/min per worker |",
        "|---|---|---|---|",
    ]
    for name, counts in spread.items():
        spread_ratio = f"{_spread(counts):.2f}" if counts else "n/a"
        lines.append(f"| {name} | {len(counts)} | {sum(counts.values()):,} | {spread_ratio} |")
    return lines


def scale_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| workers | first serve / all running at start | reloads | reload p50 / p99 | "
        "supervisor overhead p50 / p99 (per worker) | supervisor CPU per reload (per worker) | "
        "its thread waiting for CPU p50 | machine CPU per reload (the supervisor's share) | "
        "supervisor RSS | supervisor fds | the floor: CPU per reload per worker / reload p50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = r["workers"]
        over = pct(r["overhead"], 0.5)
        lines.append(
            f"| {n} | {r['first_serve'] * 1000:.0f} / {r['all_running'] * 1000:.0f} ms | "
            f"{r['reloads'] - r['failed']}/{r['reloads']} | "
            f"{pct(r['duration'], 0.5) * 1000:.0f} / {pct(r['duration'], 0.99) * 1000:.0f} ms | "
            f"{over * 1000:.0f} / {pct(r['overhead'], 0.99) * 1000:.0f} ms "
            f"({over / n * 1000:.2f} ms) | "
            f"{r['cpu_per_reload'] * 1000:.0f} ms ({r['cpu_per_reload'] / n * 1000:.2f} ms) | "
            f"{pct(r['waiting_for_cpu'], 0.5) * 1000:.0f} ms | {_machine(r)} | "
            f"{r['rss_kib'] / 1024:.1f} MiB | {r['fds']:,} | {_floor(r)} |"
        )
    return lines


def _floor(row: dict[str, Any]) -> str:
    """The floor's CPU per worker and reload p50 (older results lack them)."""
    if "floor_duration" not in row:
        return "n/a"
    took = pct(row["floor_duration"], 0.5)
    return f"{row['floor_cpu_per_worker'] * 1000:.2f} ms / {took * 1000:.0f} ms"


def _machine(row: dict[str, Any]) -> str:
    """The whole machine's CPU per reload, and the daemon's part of it (older
    results lack it)."""
    machine = row.get("machine_cpu_per_reload")
    if not machine:
        return "n/a"
    return f"{machine * 1000:,.0f} ms ({row['cpu_per_reload'] / machine:.0%})"


def survive_table(rows: list[dict[str, Any]]) -> list[str]:
    """The supervisor surviving itself, and the same events for nginx and HAProxy."""
    out = [
        "| system | event | events | requests | failed | at connect | p99 | event took p50 (max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        load = row["load"]
        if row.get("error"):
            out.append(f"| {row['name']} | {row['event']} | not run: {row['error']} |||||| ")
            continue
        took = row["events"]
        span = f"{pct(took, 0.5):.2f} s ({max(took):.2f} s)" if took else "-"
        failed = _failed(load)
        causes = f" ({_causes(load['errors'])})" if load["errors"] else ""
        out.append(
            f"| {row['name']} | {row['event']} | {len(took)} | {load['requests']:,} | "
            f"{failed}{causes} | {load['errors'].get('connect', 0)} | "
            f"{load['latency'].get('99%', 0):.1f} ms | {span} |"
        )
    notes = [f"- {row['name']}, {row['event']}: {n}" for row in rows for n in row.get("notes", [])]
    return out + (["", *notes] if notes else [])


def _remeasured(results: dict[str, Any], section: str) -> list[str]:
    """A line saying when ``section`` was run on its own (``--only``), if it was."""
    when = results.get("remeasured", {}).get(section)
    if when is None:
        return []
    return ["", f"This section was measured again on its own, {when}, after the full run."]


def _floor_reload(row: dict[str, Any]) -> str:
    """Beside the overhead: the supervisor's reload p50 and the floor's."""
    if "floor_duration" not in row:
        return ""
    ours, least = pct(row["duration"], 0.5), pct(row["floor_duration"], 0.5)
    return f"; reload p50 {ours * 1000:.0f} ms, the floor's {least * 1000:.0f} ms"


def _verdict(ok: bool, measured: str) -> str:
    return f"met ({measured})" if ok else f"**missed** ({measured})"


NGINX_UNDER_US = "supervisor: migrate, eBPF policy, nginx workers"
NGINX_ALONE = "nginx -s reload"


def targets(results: dict[str, Any]) -> list[str]:
    """Each target judged on the median of the interleaved runs."""
    rows = {r["name"]: r for r in results["compare"]}
    out = []
    for r in results["compare"]:
        if r["kind"] != "supervisor":
            continue
        st = row_stats(r)
        if not st["runs"]:
            out.append(f"- {r['name']}: **did not run**: {r['skipped'] or 'every run broke'}")
            continue
        failed = st["failed_steady"] + st["failed"]
        line = f"- {r['name']}: zero failed connections: {_verdict(failed == 0, f'{failed}')}"
        if r["name"] == NGINX_UNDER_US:
            line += "; " + _beside_nginx(st, rows.get(NGINX_ALONE))
        else:
            ratio_ = median(st["p99_ratio"])
            line += (
                f"; p99 reloading / steady at most 1.3x: "
                f"{_verdict(ratio_ <= 1.3, _mr(st['p99_ratio'], '{:.2f}', 'x'))}"
            )
        out.append(line + ".")
    for r in results["scale"]:
        n, over = r["workers"], pct(r["overhead"], 0.5)
        limit = {64: 0.025, 512: 0.150}.get(n)
        if limit is not None:
            out.append(
                f"- tiny workers, supervisor overhead p50 at most {limit * 1000:.0f} ms with {n} "
                f"workers: {_verdict(over <= limit, f'{over * 1000:.0f} ms{_floor_reload(r)}')}."
            )
        if n >= 64:
            per = r["cpu_per_reload"] / n * 1000
            least = (
                f"; the floor: {r['floor_cpu_per_worker'] * 1000:.2f} ms"
                if "floor_cpu_per_worker" in r
                else ""
            )
            out.append(
                f"- tiny workers, supervisor CPU per reload at most 0.5 ms per worker with {n}: "
                f"{_verdict(per <= 0.5, f'{per:.2f} ms{least}')}."
            )
        if n == 512:
            rss = r["rss_kib"] / 1024
            out.append(
                f"- supervisor RSS at most 80 MiB with 512 workers: "
                f"{_verdict(rss <= 80, f'{rss:.1f} MiB')}."
            )
    per_worker = next(iter(results["spread"].values()), {})
    if per_worker:
        worst = _spread(per_worker)
        out.append(f"- load spread at most 1.15 with per-worker listeners: "
                   f"{_verdict(worst <= 1.15, f'{worst:.2f}')}.")  # fmt: skip
    soak = results["soak"]
    flat = soak["after"]["fds"] <= soak["before"]["fds"] and (
        soak["after"]["rss_kib"] - soak["before"]["rss_kib"] < soak["before"]["rss_kib"] // 10
    )
    out.append(
        f"- soak, flat fd count and RSS over {soak['reloads']:,} reloads: "
        + _verdict(
            flat,
            f"fds {soak['before']['fds']} -> {soak['after']['fds']}, RSS "
            f"{soak['before']['rss_kib']:,} -> {soak['after']['rss_kib']:,} KiB",
        )
    )
    return out


def _beside_nginx(st: dict[str, Any], nginx: dict[str, Any] | None) -> str:
    """The nginx-workers row against ``nginx -s reload`` in the same run."""
    base = row_stats(nginx) if nginx and not nginx["skipped"] else None
    if not base or not base["runs"]:
        return f"p99 and reload time beside {NGINX_ALONE}: **not judged** (it did not run)"
    ours, theirs = median(st["p99_reloading"]), median(base["p99_reloading"])
    mine, its = median(st["reload_p50"]), median(base["reload_p50"])
    p99 = f"{ours:.1f} vs {theirs:.1f} ms, {ratio(ours, theirs):.2f}x"
    took = f"{mine * 1000:.0f} vs {its * 1000:.0f} ms, {ratio(mine, its):.2f}x"
    return (
        f"p99 while reloading within 1.1x of {NGINX_ALONE}'s: "
        f"{_verdict(ours <= 1.1 * theirs, p99)}; reload p50 within 1.2x of nginx's: "
        f"{_verdict(mine <= 1.2 * its, took)}"
    )


def errors(results: dict[str, Any]) -> list[str]:
    """What the run failed to measure: each makes the benchmark exit non-zero."""
    out = [
        f"compare, {r['name']}, run {n + 1}: {run['error']}"
        for r in results.get("compare", [])
        for n, run in enumerate(r["runs"])
        if run["error"]
    ]
    out += [
        f"scale, {r['workers']} workers: {r['failed']} failed reloads"
        for r in results.get("scale", [])
        if r["failed"]
    ]
    out += [
        f"survive, {r['name']}, {r['event']}: {r['error']}"
        for r in results.get("survive", [])
        if r.get("error")
    ]
    return out


def plots(results: dict[str, Any], out: Path) -> list[str]:
    """Write the PNGs; return their names. Every figure is a count or a ratio."""
    rows = [r for r in results["compare"] if measured(r)]
    stats = [row_stats(r) for r in rows]
    names = [r["name"] for r in rows]
    colors = ["tab:green" if r["kind"] == "supervisor" else "tab:gray" for r in rows]
    files = []

    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.2))
    failed = [st["failed"] for st in stats]
    ax.barh(names, [f + 0.5 for f in failed], color=colors)  # +0.5: a zero stays visible
    ax.set_xscale("log")
    ax.set_xlim(0.3, max([*failed, 1]) * 20)
    for y, f in enumerate(failed):
        ax.text(f + 0.6, y, f"{f:,}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("failed connections while reloading (log scale; green: this supervisor)")
    fig.tight_layout()
    fig.savefig(out / "failed.png", dpi=90)
    files.append("failed.png")

    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.2))
    p99 = [median(st["p99_ratio"]) for st in stats]
    spans = [
        [m - min(st["p99_ratio"]) for m, st in zip(p99, stats, strict=True)],
        [max(st["p99_ratio"]) - m for m, st in zip(p99, stats, strict=True)],
    ]
    ax.barh(names, p99, color=colors, xerr=spans, capsize=3)
    ax.axvline(1.3, color="tab:red", linestyle="--", label="target 1.3x (demo workers)")
    ax.invert_yaxis()
    ax.set_xlabel("p99 latency while reloading / p99 steady (median of runs; bars: range)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "p99-ratio.png", dpi=90)
    files.append("p99-ratio.png")

    fig, ax = plt.subplots(figsize=(9, 3.2))
    for name, counts in results["spread"].items():
        values = sorted(counts.values(), reverse=True)
        mean = sum(values) / len(values) if values else 1
        ax.plot(range(1, len(values) + 1), [v / mean for v in values], marker="o", label=name)
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xlabel("worker (busiest first)")
    ax.set_ylabel("answers / mean")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "spread.png", dpi=90)
    files.append("spread.png")
    plt.close("all")
    return files


def render(results: dict[str, Any], out: Path) -> str:
    files = plots(results, out)
    soak = results["soak"]
    lines = [
        "# Benchmark: reloads side by side",
        "",
        f"Measured {results['machine']}; `make {'bench-quick' if results['quick'] else 'bench'}`."
        " One machine, in a private network namespace: every system met the same "
        "client. The client, the servers and the supervisor share the cores, so absolute "
        "numbers are this machine's; the ratios and counts are what compares.",
        "",
        "## Reloads under load",
        "",
        f"wrk, {THREADS} threads and {CONNECTIONS} connections, `Connection: close` "
        f"(one TCP connection per request): {results['steady']} s steady, then "
        f"{results['seconds']} s with a reload, a wait for it to complete, and a "
        f"{results['interval']} s pause, in a loop. The rows a target compares (the "
        f"supervisor's and `{NGINX_ALONE}`) ran {results.get('rounds', 1)} times, interleaved "
        "(A B C A B C, so the machine's drift falls on every row alike); each cell is the "
        "median of the runs with their range in brackets, failures are summed, and the "
        "targets are judged on the medians. The other rows ran once. A reload is complete "
        "when the old "
        "generation's processes are gone and the new one serves; its duration runs from the "
        "command (or signal). 4 workers each, except HAProxy (one process, a thread per core). "
        "The supervisor, naive and hand-rolled rows run the same demo worker (Python, trio, "
        "h11; the hand-rolled restart waits for the new workers' READY=1 before it stops the "
        "old ones), except the supervisor row with nginx workers (one nginx, master and worker "
        "process, per supervisor worker, http health check); nginx, gunicorn (sync) and "
        "HAProxy answer a line of the same length themselves.",
        "",
        *compare_table(results["compare"]),
        "",
        "Failed connections are wrk's socket errors (connect: refused or reset at connect; "
        "read: reset or closed before an answer; write; timeout) and non-2xx answers. The "
        "supervisor overhead is the reload's duration less the time that belongs to the "
        "workers (the slowest new worker's start to its READY=1, old workers emptying their "
        "queues, the slowest old worker's stop), from each reload's report (`timings`).",
        "",
        *[f"![{f}]({f})" for f in files[:2]],
        "",
        "## Load spread across 8 workers",
        "",
        "The same demo worker; answers per worker pid counted by a wrk Lua script. Per-worker "
        "listeners: the supervisor (each worker its own SO_REUSEPORT listener, steered by "
        "hash). Shared: one listener, inherited by all 8, each accepting on it.",
        "",
        *spread_lines(results["spread"]),
        "",
        f"![{files[2]}]({files[2]})",
        "",
        "## Scale",
        "",
        "A worker that starts in milliseconds (`bench/tiny_worker.py`, stdlib Python run "
        "with `-I -S`, `READY=1` when it serves), reloads one after another without a "
        "client, so the times are the rollout's and the supervisor's own; migrate path. "
        "First serve: from the daemon's start to the first answer on the port; all "
        "running: to every worker RUNNING. Supervisor CPU is the daemon process's user+system "
        "time per reload; waiting for CPU is its trio thread's time runnable without a core "
        "(schedstat), which is where the overhead goes when hundreds of starting workers "
        "hold both cores. Machine CPU is every core's busy time per reload (/proc/stat): "
        "the workers' start and exit, the supervisor's part beside it; on 2 cores a reload "
        "can take no less than half of it. fds are the fewest over 0.5 s. The floor "
        "(`bench/floor.py`, run right after each row) does the same reloads with only the "
        "kernel's part of a worker's start and stop, one trio task per worker: listener, "
        "NOTIFY_SOCKET, output pipes, the same spawn, READY=1, stop signal, shutdown, reap; "
        "no eBPF, health gate, state or reports. Its CPU is the least a trio supervisor "
        "spends per worker on this machine. Its reload p50 is the least a reload takes with "
        "these workers; where their CPU fills both cores, the two reloads differ by the "
        "run-to-run noise.",
        "",
        *scale_lines(results["scale"]),
        *_remeasured(results, "scale"),
        "",
        "## Soak",
        "",
        f"{soak['reloads']:,} consecutive reloads (migrate, eBPF; 2 workers of a stdlib "
        "worker that starts in milliseconds) under wrk with 8 connections: "
        f"{soak['requests']:,} requests, {sum(soak['errors'].values())} failed"
        f"{' (' + _causes(soak['errors']) + ')' if soak['errors'] else ''}; "
        f"{soak['failed_reloads']} failed reloads; took {soak['seconds']:.0f} s. The "
        f"supervisor's fds {soak['before']['fds']} -> {soak['after']['fds']}, RSS "
        f"{soak['before']['rss_kib']:,} -> {soak['after']['rss_kib']:,} KiB (after 20 "
        f"warm-up reloads, and at the end; fds are the fewest over 0.5 s); zombie children: "
        f"{soak['zombies']}."
        + (f" This section was measured {soak['measured']}." if "measured" in soak else ""),
        "",
        *_survive_section(results),
        "## Targets",
        "",
        *targets(results),
        "",
        *_findings(),
    ]
    return "\n".join(lines)


FINDINGS = Path(__file__).with_name("findings.md")


def _findings() -> list[str]:
    """What the measurements taught, written by hand (``bench/findings.md``)."""
    if not FINDINGS.exists():
        return []
    return [FINDINGS.read_text().rstrip(), ""]


def _survive_section(results: dict[str, Any]) -> list[str]:
    if "survive" not in results:
        return []
    return [
        "## The supervisor surviving itself",
        "",
        f"The same wrk load, {results.get('survive_seconds', '?')} s per row, with the event "
        "repeated (once for the nginx master's kill -9: nothing can bring it back). The "
        "systemd rows run the shipped unit under real systemd 252 booted in a private "
        "namespace, with wrk in its network namespace. An event's duration runs until the "
        "new process serves and the old one is gone (for kill -9 under systemd: until the "
        "restarted daemon's workers serve). `at connect` counts connections refused or reset "
        "at connect; after a kill -9 the other failures are the requests the killed workers "
        "had accepted.",
        "",
        *survive_table(results["survive"]),
        "",
    ]
