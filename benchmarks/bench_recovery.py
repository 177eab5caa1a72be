#!/usr/bin/env python3
"""What crash recovery costs and how fast it recovers (``connpark serve --crash-recovery``).

In one run, alternating the two containers:

- **CPU per park+wake cycle** at batch 253, shard and its mirror (utime+stime
  from /proc) against a plain ``connpark serve``: the mirror's price;
- **memory per connection**: RSS slope of the mirror process and of
  the shard as N connections are parked, against a plain container;
- **recovery**: SIGKILL of the shard with N parked, time until the new shard
  has every one back (a STATS round trip says ``parked == N``), and a 1%
  sample woken and checked byte for byte afterwards; then the same for
  ``connpark upgrade``.

    python benchmarks/bench_recovery.py [--n 8000] [--seconds 2] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from _common import Container, median, print_table, raise_nofile, rss, write_json

import connpark
from connpark._stats_client import fetch_stats

BATCH = 253


def tcp_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(min(n, 4096))
    clients, servers = [], []
    for _ in range(n):
        clients.append(socket.create_connection(listener.getsockname()))
        servers.append(listener.accept()[0])
    listener.close()
    return clients, servers


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shard_pid(container: Container, not_: int = 0, timeout: float = 20, role: str = "shard") -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            procs = fetch_stats(str(container.path), timeout=2).processes
        except connpark.ConnparkError:
            time.sleep(0.05)
            continue
        pids = [p.pid for p in procs if p.role == role and p.pid != not_]
        if pids:
            return pids[0]
        time.sleep(0.05)
    raise RuntimeError(f"no {role}")


def recovery_pids(container: Container) -> dict[str, int]:
    """The processes that do the work: the shard and its mirror (the supervisor idles)."""
    return {"shard": shard_pid(container), "mirror": shard_pid(container, role="mirror")}


def cycle_cpu(container: Container, recovery: bool, seconds: float) -> dict[str, float]:
    """Park 253 and wake them back, in a loop: CPU per cycle of each container process."""
    clients, servers = tcp_pairs(BATCH)
    pids = {"container": container.pid}
    if recovery:
        pids = recovery_pids(container)
    socks: list[socket.socket] = servers
    with connpark.BlockingParking(container.path, pool="bench") as parking:
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        cycles = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            tickets = [t for t in parking.park_many(socks) if isinstance(t, int)]
            parking.unpark(*tickets)
            socks = []
            while len(socks) < len(tickets):
                w = parking.next_wake(timeout=30)
                assert w is not None
                assert w.socket is not None
                socks.append(w.socket)
            cycles += len(socks)
        after = {k: cpu_seconds(p) for k, p in pids.items()}
    for s in (*clients, *socks):
        s.close()
    out = {f"{k}_us": (after[k] - before[k]) / cycles * 1e6 for k in pids}
    out["cycles"] = cycles
    return out


def park_n(container: Container, n: int) -> tuple[Any, list[socket.socket], Any]:
    clients, servers = tcp_pairs(n)
    parking = connpark.BlockingParking(container.path, pool="bench-n")
    tickets: list[Any] = []
    for i in range(0, n, 1000):
        chunk = servers[i : i + 1000]
        tickets += parking.park_many(chunk, tokens=[b"%d" % (i + j) for j in range(len(chunk))])
    assert all(isinstance(t, int) for t in tickets), "a park was refused"
    return parking, clients, tickets


def memory(container: Container, recovery: bool, n: int) -> dict[str, float]:
    pids = {"container": container.pid}
    if recovery:
        pids = recovery_pids(container)
    before = {k: rss(p) for k, p in pids.items()}
    parking, clients, _ = park_n(container, n)
    time.sleep(0.5)  # the mirror reads behind the shard
    after = {k: rss(p) for k, p in pids.items()}
    parking.shutdown()
    for c in clients:
        c.close()
    return {f"{k}_bytes_per_conn": (after[k] - before[k]) / n for k in pids}


def recovery(container: Container, n: int, how: str) -> dict[str, Any]:
    """Disrupt the shard with n parked; time until all are back, then check a 1% sample."""
    parking, clients, _ = park_n(container, n)
    old = shard_pid(container)
    start = time.monotonic()
    if how == "sigkill":
        os.kill(old, signal.SIGKILL)
    else:
        subprocess.run(
            [sys.executable, "-m", "connpark", "upgrade", "--socket", str(container.path)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    shard_pid(container, not_=old)
    while True:
        try:
            if fetch_stats(str(container.path), timeout=2).parked == n:
                break
        except connpark.ConnparkError:
            pass
        if time.monotonic() - start > 60:
            raise RuntimeError("not every connection came back in 60 s")
        time.sleep(0.01)
    back = time.monotonic() - start
    sample = random.Random(1).sample(range(n), max(1, n // 100))
    for i in sample:
        clients[i].sendall(b"check %d" % i)
    correct = 0
    for _ in sample:
        w = parking.next_wake(timeout=20)
        assert w is not None
        assert w.socket is not None
        want = b"check " + w.token
        w.socket.settimeout(5)
        correct += w.socket.recv(len(want) + 10) == want
        w.socket.close()
    parking.shutdown()
    for c in clients:
        c.close()
    return {"seconds_to_all_back": back, "sample": len(sample), "sample_correct": correct}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    # Both ends of every connection live in this process: 2n fds under its 20,000.
    parser.add_argument("--n", type=int, default=8_000)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="n 4,000, 1 s, 2 repeats")
    parser.add_argument("--tiny", action="store_true", help="seconds, for the test suite")
    parser.add_argument("--no-plot", action="store_true", help="(no plots: accepted for run_all)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.seconds, args.repeat = 4_000, 1.0, 2
    if args.tiny:
        args.n, args.seconds, args.repeat = 300, 0.3, 1
    raise_nofile()
    cpu: dict[str, list[dict[str, float]]] = {"plain": [], "recovery": []}
    mem: dict[str, list[dict[str, float]]] = {"plain": [], "recovery": []}
    for _ in range(args.repeat):
        for kind in ("plain", "recovery"):
            flags = ("--crash-recovery",) if kind == "recovery" else ()
            with Container(*flags) as c:
                cpu[kind].append(cycle_cpu(c, kind == "recovery", args.seconds))
            with Container(*flags) as c:
                mem[kind].append(memory(c, kind == "recovery", args.n))

    def med(runs: list[dict[str, float]], key: str) -> float:
        return median(r[key] for r in runs)

    plain_us = med(cpu["plain"], "container_us")
    shard_us = med(cpu["recovery"], "shard_us")
    sup_us = med(cpu["recovery"], "mirror_us")
    plain_b = med(mem["plain"], "container_bytes_per_conn")
    shard_b = med(mem["recovery"], "shard_bytes_per_conn")
    sup_b = med(mem["recovery"], "mirror_bytes_per_conn")
    with Container("--crash-recovery") as c:
        killed = recovery(c, args.n, "sigkill")
    with Container("--crash-recovery") as c:
        upgraded = recovery(c, args.n, "upgrade")
    print_table(
        f"crash recovery: cost and speed (batch {BATCH}, N={args.n:,}, medians of {args.repeat})",
        ["measure", "plain serve", "--crash-recovery", "ratio"],
        [
            [
                "CPU us per park+wake cycle",
                plain_us,
                f"{shard_us:.3g} + {sup_us:.3g}",
                (shard_us + sup_us) / plain_us,
            ],
            [
                "RSS bytes per parked conn",
                plain_b,
                f"{shard_b:.0f} + {sup_b:.0f}",
                (shard_b + sup_b) / plain_b if plain_b > 0 else float("nan"),
            ],
            ["SIGKILL: s until all back", "-", killed["seconds_to_all_back"], "-"],
            ["upgrade: s until all back", "-", upgraded["seconds_to_all_back"], "-"],
        ],
    )
    print(
        f"1% sample after SIGKILL: {killed['sample_correct']}/{killed['sample']} correct;"
        f" after upgrade: {upgraded['sample_correct']}/{upgraded['sample']} correct"
    )
    write_json(
        "recovery",
        {
            "n": args.n,
            "batch": BATCH,
            "cpu_us_per_cycle": {"plain": plain_us, "shard": shard_us, "mirror": sup_us},
            "rss_bytes_per_conn": {"plain": plain_b, "shard": shard_b, "mirror": sup_b},
            "sigkill": killed,
            "upgrade": upgraded,
            "raw": {"cpu": cpu, "memory": mem},
        },
    )
    ok = killed["sample_correct"] == killed["sample"] and (
        upgraded["sample_correct"] == upgraded["sample"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
