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


def _p99_ratio(row: dict[str, Any]) -> float:
    """p99 while reloading over p99 steady."""
    return ratio(row["reloading"]["latency"].get("99%", 0), row["steady"]["latency"].get("99%", 0))


def _spread(counts: dict[str, int]) -> float:
    """Most answers per worker over fewest."""
    return ratio(max(counts.values()), min(counts.values()))


def compare_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| system | conn/s steady | conn/s reloading | failed steady | failed reloading "
        "(by cause) | p50 steady / reloading | p99 steady / reloading | p99 ratio | "
        "max steady / reloading | reloads | reload p50 / p99 | supervisor overhead p50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['name']} | did not run: {r['error']} |" + " |" * 10)
            continue
        s, g = r["steady"], r["reloading"]

        def lat(k: str, s: dict[str, Any] = s, g: dict[str, Any] = g) -> str:
            return f"{s['latency'].get(k, 0):.1f} / {g['latency'].get(k, 0):.1f} ms"

        causes = _causes(g["errors"])
        overhead = f"{pct(r['overhead'], 0.5) * 1000:.0f} ms" if r["overhead"] else "n/a"
        lines.append(
            f"| {r['name']} | {s['rps']:,.0f} | {g['rps']:,.0f} | {_failed(s):,} | "
            f"{_failed(g):,}{f' ({causes})' if causes else ''} | {lat('50%')} | {lat('99%')} | "
            f"{_p99_ratio(r):.2f}x | "
            f"{lat('max')} | "
            f"{len(r['reloads']) - r['failed_reloads']}/{len(r['reloads'])} | "
            f"{pct(r['reloads'], 0.5) * 1000:.0f} / {pct(r['reloads'], 0.99) * 1000:.0f} ms | "
            f"{overhead} |"
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
        "| workers | reloads | reload p50 / p99 | workers' own start p50 | supervisor overhead "
        "p50 / p99 | supervisor CPU per reload | supervisor RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        (
            f"| {r['workers']} | {r['reloads'] - r['failed']}/{r['reloads']} | "
            f"{pct(r['duration'], 0.5) * 1000:.0f} / {pct(r['duration'], 0.99) * 1000:.0f} ms | "
            f"{pct(r['workers_start'], 0.5) * 1000:.0f} ms | "
            f"{pct(r['overhead'], 0.5) * 1000:.0f} / {pct(r['overhead'], 0.99) * 1000:.0f} ms | "
            f"{r['cpu_per_reload'] * 1000:.0f} ms | {r['rss_kib'] / 1024:.1f} MiB |"
        )
        for r in rows
    ]
    return lines


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
        span = f"{pct(took, 50):.2f} s ({max(took):.2f} s)" if took else "-"
        failed = _failed(load)
        causes = f" ({_causes(load['errors'])})" if load["errors"] else ""
        out.append(
            f"| {row['name']} | {row['event']} | {len(took)} | {load['requests']:,} | "
            f"{failed}{causes} | {load['errors'].get('connect', 0)} | "
            f"{load['latency'].get('99%', 0):.1f} ms | {span} |"
        )
    notes = [f"- {row['name']}, {row['event']}: {n}" for row in rows for n in row.get("notes", [])]
    return out + (["", *notes] if notes else [])


def targets(results: dict[str, Any]) -> list[str]:
    def verdict(ok: bool, measured: str) -> str:
        return f"met ({measured})" if ok else f"**missed** ({measured})"

    out = []
    for r in results["compare"]:
        if r["kind"] != "supervisor":
            continue
        if r["error"]:
            out.append(f"- {r['name']}: **did not run**: {r['error']}")
            continue
        failed = _failed(r["steady"]) + _failed(r["reloading"])
        p99 = _p99_ratio(r)
        out.append(
            f"- {r['name']}: zero failed connections: {verdict(failed == 0, f'{failed} failed')}; "
            f"p99 during reloads within 1.2x of steady: {verdict(p99 <= 1.2, f'{p99:.2f}x')}."
        )
    for r in results["scale"]:
        limit = {4: 0.05, 64: 0.25}.get(r["workers"])
        if limit is not None:
            p50 = pct(r["overhead"], 0.5)
            out.append(
                f"- supervisor overhead with {r['workers']} workers under {limit * 1000:.0f} ms "
                f"p50: {verdict(p50 < limit, f'{p50 * 1000:.0f} ms')}."
            )
    per_worker = next(iter(results["spread"].values()), {})
    if per_worker:
        worst = _spread(per_worker)
        out.append(f"- load spread at most 1.15 with per-worker listeners: "
                   f"{verdict(worst <= 1.15, f'{worst:.2f}')}.")  # fmt: skip
    soak = results["soak"]
    flat = soak["after"]["fds"] <= soak["before"]["fds"] and (
        soak["after"]["rss_kib"] - soak["before"]["rss_kib"] < soak["before"]["rss_kib"] // 10
    )
    out.append(
        f"- soak, flat fd count and RSS over {soak['reloads']:,} reloads: "
        + verdict(
            flat,
            f"fds {soak['before']['fds']} -> {soak['after']['fds']}, RSS "
            f"{soak['before']['rss_kib']:,} -> {soak['after']['rss_kib']:,} KiB",
        )
    )
    return out


def plots(results: dict[str, Any], out: Path) -> list[str]:
    """Write the PNGs; return their names. Every figure is a count or a ratio."""
    rows = [r for r in results["compare"] if not r["error"]]
    names = [r["name"] for r in rows]
    colors = ["tab:green" if r["kind"] == "supervisor" else "tab:gray" for r in rows]
    files = []

    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.2))
    failed = [_failed(r["reloading"]) for r in rows]
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
    p99 = [_p99_ratio(r) for r in rows]
    ax.barh(names, p99, color=colors)
    ax.axvline(1.2, color="tab:red", linestyle="--", label="target 1.2x")
    ax.invert_yaxis()
    ax.set_xlabel("p99 latency while reloading / p99 steady")
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
        " One run, one machine, in a private network namespace: every system met the same "
        "client. The client, the servers and the supervisor share the cores, so absolute "
        "numbers are this machine's; the ratios and counts are what compares.",
        "",
        "## Reloads under load",
        "",
        f"wrk, {THREADS} threads and {CONNECTIONS} connections, `Connection: close` "
        f"(one TCP connection per request): {results['steady']} s steady, then "
        f"{results['seconds']} s with a reload, a wait for it to complete, and a "
        f"{results['interval']} s pause, in a loop. A reload is complete when the old "
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
        "Reloads one after another without a client, so the times are the rollout's own. "
        "Migrate path, 0.3 s of Python start per demo worker, all started in parallel on the "
        "machine's cores; CPU is the supervisor process's user+system time.",
        "",
        *scale_lines(results["scale"]),
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
    ]
    return "\n".join(lines)


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
