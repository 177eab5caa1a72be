#!/usr/bin/env python3
"""The heavy server's saving: examples/heavy_server.py with N idle clients, parking vs not.

Both runs in the same invocation, alternating: the heavy server alone (every
idle client keeps its session state and its task), and the heavy server with
a connpark container (idle clients are parked after ``--park-after`` s and
their state freed). Reported: the heavy server's RSS, live sessions (tasks)
and threads, the container's RSS, and the total; ratios no-parking / parking.
Then a sample of clients speak again and must get their line echoed back.

    python benchmarks/bench_heavy.py [--clients 10000] [--state-size 131072] [--repeat 1]
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import threading
import time
from typing import Any

from _common import (
    HERE,
    Container,
    Farm,
    expected_payload,
    median,
    plot_bars,
    print_table,
    raise_nofile,
    rss,
    threads,
    write_json,
)

HEAVY = HERE.parent / "examples" / "heavy_server.py"


class Heavy:
    """examples/heavy_server.py in a subprocess; keeps its latest status line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HEAVY), "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        match = re.fullmatch(r"listening on (\S+):(\d+)\n", first)
        if not match:
            raise RuntimeError(f"heavy_server did not start: {first!r}")
        self.addr = (match.group(1), int(match.group(2)))
        self.status: dict[str, float] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("status "):
                self.status = {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}

    def wait_status(self, timeout: float, **want: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.status.get(k) == v for k, v in want.items()):
                return self.status
            time.sleep(0.1)
        raise RuntimeError(f"heavy_server never reached {want}; last {self.status}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_once(parking: bool, n: int, state_size: int, park_after: float) -> dict[str, Any]:
    container = Container() if parking else None
    heavy = None
    farm = None
    try:
        args = ["--state-size", str(state_size), "--park-after", str(park_after)]
        if container is not None:
            args += ["--parking-socket", str(container.path)]
        heavy = Heavy(*args)
        base_rss = rss(heavy.proc.pid)
        start = time.monotonic()
        farm = Farm(heavy.addr, n)
        connect_s = time.monotonic() - start
        if parking:
            heavy.wait_status(60 + n / 500, live=0, parked=n)
        else:
            heavy.wait_status(60 + n / 500, live=n)
            time.sleep(park_after + 1)  # as long as the parking run waited: still all live
            heavy.wait_status(10, live=n)
        time.sleep(1.0)
        result = {
            "parking": parking,
            "clients": n,
            "heavy_rss": rss(heavy.proc.pid),
            "heavy_rss_base": base_rss,
            "heavy_threads": threads(heavy.proc.pid),
            "live_sessions": int(heavy.status["live"]),
            "parked": int(heavy.status["parked"]),
            "container_rss": container.rss() if container else 0,
            "connect_s": connect_s,
        }
        result["total_rss"] = result["heavy_rss"] + result["container_rss"]
        # A sample of clients speaks again: every line must come back intact.
        sample = random.Random(7).sample(range(n), min(50, n))
        farm.send(sample, "again")
        ok = 0
        for i in sample:
            got = farm.read(i, timeout=10)
            ok += got == expected_payload("again", i)
        result["echo_ok"] = ok
        result["echo_sample"] = len(sample)
        return result
    finally:
        if farm is not None:
            farm.close()
        if heavy is not None:
            heavy.stop()
        if container is not None:
            container.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--state-size", type=int, default=128 * 1024, help="bytes per session")
    parser.add_argument("--park-after", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2,000 clients")
    parser.add_argument("--tiny", action="store_true", help="50 clients, for the test suite")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients = 2000
    if args.tiny:
        args.clients, args.state_size, args.park_after, args.no_plot = 50, 65536, 0.5, True
    raise_nofile()

    runs: dict[str, list[dict[str, Any]]] = {"parking": [], "no-parking": []}
    for rep in range(args.repeat):
        for parking in (True, False) if rep % 2 == 0 else (False, True):
            r = run_once(parking, args.clients, args.state_size, args.park_after)
            runs["parking" if parking else "no-parking"].append(r)
            if r["echo_ok"] != r["echo_sample"]:
                raise SystemExit(f"wrong echoes after wake: {r}")

    def med(who: str, key: str) -> float:
        return median(r[key] for r in runs[who])

    mib = 2**20
    rows = []
    summary: dict[str, Any] = {}
    for key, label in (
        ("heavy_rss", "heavy server RSS (MiB)"),
        ("container_rss", "container RSS (MiB)"),
        ("total_rss", "total RSS (MiB)"),
        ("live_sessions", "live sessions (tasks)"),
        ("heavy_threads", "heavy server threads"),
    ):
        scale = mib if key.endswith("rss") else 1
        no, yes = med("no-parking", key) / scale, med("parking", key) / scale
        summary[key] = {"no_parking": no, "parking": yes, "ratio": no / yes if yes else None}
        rows.append([label, no, yes, f"{no / yes:.1f}x" if yes and no else "-"])
    print_table(
        f"examples/heavy_server.py, {args.clients:,} idle clients, "
        f"state {args.state_size // 1024} KiB each (medians of {args.repeat})",
        ["", "no parking", "parking", "no/parking"],
        rows,
    )
    write_json(
        "heavy",
        {
            "clients": args.clients,
            "state_size": args.state_size,
            "park_after": args.park_after,
            "runs": runs,
            "summary": summary,
        },
    )
    if not args.no_plot:
        keys = ("heavy_rss", "container_rss", "total_rss")
        plot_bars(
            "heavy",
            f"heavy_server.py with {args.clients:,} idle clients",
            ["heavy server", "container", "total"],
            {
                "no parking": [summary[k]["no_parking"] for k in keys],
                "parking": [summary[k]["parking"] for k in keys],
            },
            "RSS, MiB (lower is better)",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
