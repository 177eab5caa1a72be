#!/usr/bin/env python3
"""Run every benchmark, one after another, then write results/summary.md (and PNG plots).

    python benchmarks/run_all.py [--quick] [--only throughput,memory,...]

``--quick`` runs each script in its quick mode (under 3 minutes in all on 2
cores, plus about a minute for million's 100,000 connections); without it,
each runs its full default (million: 1,000,000 connections, up to ~15
minutes). Each script writes its own JSON to benchmarks/results/; this one
adds summary.md, the table the README quotes, built from those JSON files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ORDER = ["throughput", "memory", "latency", "scale", "heavy", "recovery", "serving", "million"]


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _get(data: Any, *keys: Any, default: Any = None) -> Any:
    for key in keys:
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, dict) and str(key) in data:
            data = data[str(key)]
        else:
            return default
    return data


def _f(x: Any, fmt: str = ".3g") -> str:
    return "n/a" if x is None else format(x, fmt)


def summary_rows() -> list[tuple[str, str, str, str]]:
    """(benchmark, measure, connpark vs baseline, target) rows from the JSON files."""
    rows: list[tuple[str, str, str, str]] = []
    t = _load("throughput")
    if t:
        for batch in t.get("batches", []):
            s = _get(t, "summary", batch, default={})
            tgt = t.get("target", {})
            rows.append(
                (
                    "throughput",
                    f"container CPU per park+wake cycle, batch {batch}",
                    f"{_f(s.get('connpark_container_us_per_cycle'))} us vs the minimal loop's"
                    f" {_f(s.get('minimal_container_us_per_cycle'))} us"
                    f" = **{_f(s.get('container_cpu_vs_minimal'), '.2f')}x**"
                    f" (worker {_f(s.get('connpark_worker_us_per_cycle'))} us;"
                    f" {_f(s.get('connpark_rate'), ',.0f')} cycles/s)",
                    f"<= {tgt.get('max_container_us_per_cycle')} us and"
                    f" <= {tgt.get('max_ratio_to_minimal')}x: "
                    + ("met" if tgt.get("met") else "missed")
                    if int(batch) == tgt.get("batch")
                    else "",
                )
            )
    m = _load("memory")
    if m:
        for size, per in sorted(_get(m, "summary", default={}).items(), key=lambda kv: int(kv[0])):
            cp = _get(per, "connpark", "bytes_per_conn")
            others = ", ".join(
                f"{who} {_f(_get(per, who, 'bytes_per_conn'), '.0f')} B "
                f"({_f(_get(per, who, 'ratio_vs_connpark'), '.1f')}x)"
                for who in ("trio", "asyncio")
                if who in per
            )
            rows.append(
                (
                    "memory",
                    f"RSS per parked connection, N={int(size):,}",
                    f"**{_f(cp, '.0f')} B** vs {others}",
                    "<= 300 B: " + ("met" if cp is not None and cp <= 300 else "missed")
                    if int(size) >= 10_000
                    else "",
                )
            )
    lat = _load("latency")
    if lat:
        rows.extend(_latency_rows(lat))
    sc = _load("scale")
    if sc:
        s = sc.get("summary", {})
        parked = _get(s, "parked", default=_get(s, "parked_min"))
        flat = _get(s, "flatness", "wall", "ratio", default=_get(s, "flatness", "ratio"))
        burst = s.get("burst", {})
        rows.append(
            (
                "scale",
                "one container filled to its limit",
                f"{parked} parked (stopped by: {s.get('stopped_by', '?')}); "
                f"per-park cost last/first = **{_f(flat, '.2f')}**; "
                f"1% wake {burst.get('correct')}/{burst.get('asked')} correct; "
                f"RSS {_f(_get(s, 'container_rss_per_connection'), '.0f')} B/conn",
                "19,000+ and flat",
            )
        )
    h = _load("heavy")
    if h:
        s = h.get("summary", {})
        rows.append(
            (
                "heavy",
                f"heavy_server.py, {h.get('clients'):,} idle clients, "
                f"{h.get('state_size', 0) // 1024} KiB state",
                f"heavy RSS {_f(_get(s, 'heavy_rss', 'no_parking'), '.0f')} -> "
                f"{_f(_get(s, 'heavy_rss', 'parking'), '.0f')} MiB; total with container "
                f"{_f(_get(s, 'total_rss', 'no_parking'), '.0f')} -> "
                f"{_f(_get(s, 'total_rss', 'parking'), '.0f')} MiB "
                f"(no-parking/parking **{_f(_get(s, 'total_rss', 'ratio'), '.1f')}x**); live tasks "
                f"{_f(_get(s, 'live_sessions', 'no_parking'), '.0f')} -> "
                f"{_f(_get(s, 'live_sessions', 'parking'), '.0f')}",
                "",
            )
        )
    r = _load("recovery")
    if r:
        cpu = r.get("cpu_us_per_cycle", {})
        mem = r.get("rss_bytes_per_conn", {})
        plain_cpu, plain_mem = cpu.get("plain") or 0, mem.get("plain") or 0
        both_cpu = (cpu.get("shard") or 0) + (cpu.get("mirror") or cpu.get("supervisor") or 0)
        both_mem = (mem.get("shard") or 0) + (mem.get("mirror") or mem.get("supervisor") or 0)
        rows.append(
            (
                "recovery",
                f"--crash-recovery cost, batch {r.get('batch')}, N={r.get('n'):,}",
                f"CPU {_f(both_cpu)} vs {_f(plain_cpu)} us/cycle"
                f" (**{_f(both_cpu / plain_cpu if plain_cpu else None, '.2f')}x**);"
                f" RSS {_f(both_mem, '.0f')} vs {_f(plain_mem, '.0f')} B/conn",
                "",
            )
        )
        for how in ("sigkill", "upgrade"):
            h = r.get(how, {})
            rows.append(
                (
                    "recovery",
                    f"{'SIGKILL of the shard' if how == 'sigkill' else 'connpark upgrade'},"
                    f" N={r.get('n'):,}",
                    f"all back in **{_f(h.get('seconds_to_all_back'), '.2f')} s**;"
                    f" 1% wake {h.get('sample_correct')}/{h.get('sample')} correct",
                    "nothing lost",
                )
            )
    rows.extend(_million_rows())
    return rows


def _million_rows() -> list[tuple[str, str, str, str]]:
    mi = _load("million")
    if not mi:
        return []
    fill, mem, ker = mi.get("fill", {}), mi.get("memory", {}), mi.get("kernel", {})
    lat, kill, sample = mi.get("latency", {}), mi.get("kill", {}), mi.get("sample", {})
    single, burst = lat.get("single", {}), lat.get("burst", {})
    return [
        (
            "million",
            f"{mi.get('target', 0):,} parked over {_get(mi, 'start', 'shards')} shards",
            f"**{_f(fill.get('parked'), ',')}** in {_f(fill.get('seconds'), '.0f')} s"
            f" ({_f(fill.get('rate_avg'), ',.0f')}/s;"
            f" stopped by: {mi.get('stopped_by') or 'nothing'});"
            f" 1% wake {sample.get('correct')}/{sample.get('asked')} correct;"
            f" shard kill: {kill.get('wake_correct')}/{kill.get('held')} back and woken",
            "1,000,000, nothing lost",
        ),
        (
            "million",
            "memory per parked connection",
            f"userspace marginal (slope, mirrors included) RSS"
            f" **{_f(mem.get('marginal_rss_bytes_per_conn'), '.0f')} B**,"
            f" PSS **{_f(mem.get('marginal_pss_bytes_per_conn'), '.0f')} B**; total PSS"
            f" {_f(mem.get('total_pss_bytes_per_conn'), ',.0f')} B; kernel slab"
            f" {_f(ker.get('slab_bytes_per_conn'), ',.0f')} B",
            "marginal <= 300 B: "
            + ", ".join(
                f"{name} " + ("met" if (mem.get(key) or 1e9) <= 300 else "missed")
                for name, key in (
                    ("RSS", "marginal_rss_bytes_per_conn"),
                    ("PSS", "marginal_pss_bytes_per_conn"),
                )
            ),
        ),
        (
            "million",
            "wake latency at full size, p50/p99",
            f"single {_f(single.get('p50_ms'))}/{_f(single.get('p99_ms'))} ms;"
            f" burst of {burst.get('asked')} {_f(burst.get('p50_ms'))}/{_f(burst.get('p99_ms'))} ms"
            f" (all in {_f(burst.get('total_ms'), '.0f')} ms)",
            "",
        ),
    ]


def _latency_rows(lat: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    summary = lat.get("summary", {})
    for size, per in summary.items():
        if not isinstance(per, dict):
            continue
        single = per.get("single", {})
        burst = per.get("burst", {})
        cp, base = single.get("connpark", {}), single.get("baseline", {})
        if cp:
            rows.append(
                (
                    "latency",
                    f"single wake p50/p99, N={size}",
                    f"{_f(cp.get('p50_ms'))}/{_f(cp.get('p99_ms'))} ms vs raw epoll "
                    f"{_f(base.get('p50_ms'))}/{_f(base.get('p99_ms'))} ms "
                    f"= **{_f(single.get('ratio_p50'), '.2f')}x**",
                    "<= 2.5x at 10k" if str(size) == "10000" else "",
                )
            )
        cpb, baseb = burst.get("connpark", {}), burst.get("baseline", {})
        if cpb:
            rows.append(
                (
                    "latency",
                    f"burst of 1,000 delivered, N={size}",
                    f"{_f(cpb.get('total_ms'))} ms vs raw epoll {_f(baseb.get('total_ms'))} ms"
                    f" = **{_f(burst.get('ratio_total'), '.2f')}x**",
                    "<= 1.5x" if str(size) == "10000" else "",
                )
            )
    sv = _load("serving")
    if sv:
        r = sv.get("ratios", {})
        pings = sv.get("pings", {})
        rates = {k: [x["pings_per_s"] for x in v] for k, v in pings.items()}
        med = {k: sorted(v)[len(v) // 2] if v else None for k, v in rates.items()}
        rows.append(
            (
                "serving",
                f"pings answered/s, {sv.get('clients')} clients",
                f"{_f(med.get('container'), ',.0f')} by the container vs"
                f" {_f(med.get('wake'), ',.0f')} waking the worker"
                f" = **{_f(r.get('pings_container_over_wake'), '.2f')}x**",
                "",
            )
        )
        mem = sv.get("memory_bytes_per_conn", {})
        tags = sorted(mem.get("2 tags", []))
        plain = sorted(mem.get("no tags", []))
        rows.append(
            (
                "serving",
                f"publish to {sv.get('n'):,} parked, all delivered",
                "send(tag) vs waking them: "
                f"**{_f(r.get('publish_wake_over_send_delivered'), '.1f')}x**"
                f" faster ({_f(r.get('publish_wake_over_send_settled'), '.1f')}x until re-parked);"
                f" RSS/conn {_f(plain[len(plain) // 2] if plain else None, '.0f')} B,"
                f" with 2 tags {_f(tags[len(tags) // 2] if tags else None, '.0f')} B",
                "",
            )
        )
    return rows


def write_summary(elapsed: dict[str, float]) -> Path:
    machine = {}
    for name in ORDER:
        data = _load(name)
        if data:
            machine = data.get("machine", {})
            break
    lines = [
        "| benchmark | measure | connpark vs baseline (same run) | target |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows()]
    lines += [
        "",
        f"Machine: {machine.get('cpus')} CPUs, {machine.get('platform')}, "
        f"Python {machine.get('python')}, RLIMIT_NOFILE {machine.get('fd_limit')}. "
        "Run times: " + ", ".join(f"{k} {v:.0f} s" for k, v in elapsed.items()) + ".",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(ORDER))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else ORDER
    elapsed: dict[str, float] = {}
    failed = []
    for name in names:
        cmd = [sys.executable, str(HERE / f"bench_{name}.py")]
        if args.quick:
            cmd.append("--quick")
        if args.no_plot:
            cmd.append("--no-plot")
        print(f"\n===== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        rc = subprocess.run(cmd, cwd=HERE.parent).returncode
        elapsed[name] = time.monotonic() - start
        if rc != 0:
            failed.append(name)
            print(f"!!!!! {name} failed with exit code {rc}", flush=True)
    path = write_summary(elapsed)
    print(f"\n{path.read_text()}\nwrote {path}")
    print(f"total {sum(elapsed.values()):.0f} s")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
