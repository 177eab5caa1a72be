#!/usr/bin/env python3
"""fd-passing throughput: park+wake cycles per second through a real container.

For each batch size B, the worker (this process, the trio hook) parks B
connected TCP sockets at once with ``park_many()`` (one PARK request, split by
the codec into frames of up to 253 fds), asks for all of them back with one
UNPARK, and takes the B wakes (the container coalesces them into WAKE
messages of up to 253). One cycle = one connection parked and
woken. Baseline, in the same run and alternating with connpark: a bare
stdlib ``socket.send_fds``/``recv_fds`` round trip of the same B fds to a
second process and back (the floor cost of fd passing from Python).

    python benchmarks/bench_throughput.py [--batches 1,64,253] [--seconds 1.0] [--repeat 5]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from typing import Any

import trio
from _common import Container, median, plot_bars, print_table, raise_nofile, write_json

import connpark

TARGET_RATIO_253 = 0.5


def tcp_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(n)
    clients, servers = [], []
    for _ in range(n):
        clients.append(socket.create_connection(listener.getsockname()))
        servers.append(listener.accept()[0])
    listener.close()
    return clients, servers


# -- connpark ---------------------------------------------------------------------------


async def connpark_rate(path: str, servers: list[socket.socket], seconds: float) -> dict[str, Any]:
    """Cycles/s for len(servers) connections; hands back the sockets it ends with."""
    batch = len(servers)
    socks: list[Any] = list(servers)
    async with connpark.open_parking(path, pool="bench") as parking:
        wakes = parking.wakes()

        async def one_round() -> None:
            nonlocal socks
            tickets = await parking.park_many(socks)
            assert all(isinstance(t, int) for t in tickets), tickets
            await parking.unpark(*tickets)  # type: ignore[arg-type]
            socks = []
            while len(socks) < batch:
                woken = await wakes.receive()
                socks.append(woken.socket)
                # Take the rest of the burst without a scheduler round each.
                while len(socks) < batch:
                    try:
                        socks.append(wakes.receive_nowait().socket)
                    except trio.WouldBlock:
                        break

        await one_round()  # warm-up
        rounds = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline and rounds < 1_000_000:
            await one_round()
            rounds += 1
        elapsed = time.perf_counter() - start
    servers[:] = [
        s if isinstance(s, socket.socket) else socket.socket(fileno=s.detach()) for s in socks
    ]
    return {"cycles": rounds * batch, "seconds": elapsed, "rate": rounds * batch / elapsed}


# -- baseline -------------------------------------------------------------------------------


def echo_main(fd: int) -> None:
    """The baseline's far side: receive fds, send them straight back, close our copies."""
    sock = socket.socket(fileno=fd)
    while True:
        data, fds, _flags, _addr = socket.recv_fds(sock, 16, 253)
        if not data:
            return
        socket.send_fds(sock, [data], fds)
        for f in fds:
            socket.close(f)


def baseline_rate(servers: list[socket.socket], seconds: float) -> dict[str, Any]:
    a, b = socket.socketpair()
    child = subprocess.Popen(
        [sys.executable, __file__, "--echo", str(b.fileno())], pass_fds=[b.fileno()]
    )
    b.close()
    fds = [s.fileno() for s in servers]
    chunks = [fds[i : i + 253] for i in range(0, len(fds), 253)]

    def one_round() -> None:
        for chunk in chunks:
            socket.send_fds(a, [b"x"], chunk)
            _data, got, _flags, _addr = socket.recv_fds(a, 16, 253)
            for f in got:
                socket.close(f)

    try:
        one_round()
        rounds = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline and rounds < 10_000_000:
            one_round()
            rounds += 1
        elapsed = time.perf_counter() - start
    finally:
        a.close()
        child.wait(10)
    return {"cycles": rounds * len(fds), "seconds": elapsed, "rate": rounds * len(fds) / elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--batches", default="1,64,253")
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 repeats of 0.5 s")
    parser.add_argument("--tiny", action="store_true", help="seconds, for the test suite")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo is not None:
        echo_main(args.echo)
        return 0
    if args.quick:
        args.seconds, args.repeat = 0.5, 3
    if args.tiny:
        args.seconds, args.repeat, args.batches, args.no_plot = 0.1, 1, "1,8", True
    raise_nofile()
    batches = [int(b) for b in args.batches.split(",")]

    runs: dict[int, dict[str, list[dict[str, Any]]]] = {
        b: {"connpark": [], "baseline": []} for b in batches
    }
    with Container() as container:
        for rep in range(args.repeat):
            for batch in batches:
                clients, servers = tcp_pairs(batch)
                try:
                    # Alternate which contender goes first, repetition by repetition.
                    order = ["connpark", "baseline"] if rep % 2 == 0 else ["baseline", "connpark"]
                    for who in order:
                        if who == "connpark":
                            r = trio.run(connpark_rate, str(container.path), servers, args.seconds)
                        else:
                            r = baseline_rate(servers, args.seconds)
                        runs[batch][who].append(r)
                finally:
                    for s in (*clients, *servers):
                        s.close()

    rows = []
    summary: dict[str, Any] = {}
    for batch in batches:
        cp = median(r["rate"] for r in runs[batch]["connpark"])
        base = median(r["rate"] for r in runs[batch]["baseline"])
        ratio = cp / base if base else 0.0
        summary[str(batch)] = {
            "connpark_cycles_per_s": cp,
            "baseline_round_trips_per_s": base,
            "ratio": ratio,
            "connpark_us_per_cycle": 1e6 / cp if cp else None,
            "baseline_us_per_fd": 1e6 / base if base else None,
        }
        rows.append([batch, cp, base, ratio])
    print_table(
        "park+wake cycles/s vs bare send_fds/recv_fds round trips/s (medians)",
        ["batch", "connpark /s", "stdlib fd round trip /s", "ratio"],
        rows,
    )
    met = summary.get("253", {}).get("ratio", 0.0) >= TARGET_RATIO_253 if 253 in batches else None
    print(f"\ntarget: batch 253 ratio >= {TARGET_RATIO_253}: {'met' if met else 'MISSED'}")
    write_json(
        "throughput",
        {
            "batches": batches,
            "seconds_per_measurement": args.seconds,
            "repeat": args.repeat,
            "runs": {str(b): v for b, v in runs.items()},
            "summary": summary,
            "target": {"batch": 253, "min_ratio": TARGET_RATIO_253, "met": met},
        },
    )
    if not args.no_plot:
        plot_bars(
            "throughput",
            "park+wake cycles/s vs bare fd round trips/s",
            [str(b) for b in batches],
            {
                "connpark": [summary[str(b)]["connpark_cycles_per_s"] for b in batches],
                "stdlib send_fds round trip": [
                    summary[str(b)]["baseline_round_trips_per_s"] for b in batches
                ],
            },
            "per second (higher is better)",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
