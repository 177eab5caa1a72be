#!/usr/bin/env python3
"""fd-passing throughput: park+wake cycles per second, and CPU per cycle on each side.

For each batch size B, the worker (this process, the trio hook) parks B
connected TCP sockets at once with ``park_many()`` (one PARK request, split by
the codec into frames of up to 253 fds), asks for all of them back with one
UNPARK, and takes the B wakes (WAKE messages of up to 253). One cycle = one
connection parked and woken. Three contenders, alternating in the same run:

- ``connpark``: the real ``connpark serve``;
- ``minimal``: ``_minimal_container.py``, a lean pure-Python loop speaking
  the same protocol to the same worker with only the syscalls a container
  cannot avoid: the floor for a Python container (target: connpark's
  container CPU per cycle <= 1.1x its, and <= 8 us at batch 253);
- ``bare``: a stdlib ``send_fds``/``recv_fds`` round trip of the same fds to
  a second process and back (a reference: no protocol, no checks, no epoll).

CPU per cycle is measured for the container process (``/proc/PID/task/*/
schedstat``, ns) and for the worker (this process, ``time.process_time``;
target: <= 8 us at batch 253 against connpark). Within a repetition connpark
and the minimal loop take turns in ``--slices`` slices, so that a slow spell of
the shared machine weighs on both; the ratio is the median of the
repetitions' ratios.

``--idle N`` parks N idle connections in each container first (a helper
process holds them): a cycle must not cost more with many parked besides.

    python benchmarks/bench_throughput.py [--batches 1,64,253] [--seconds 1.0] [--repeat 5]
        [--idle 0]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from _common import HERE, Container, median, plot_bars, print_table, raise_nofile, write_json

import connpark

#: Container CPU per cycle at batch 253: at most this many us...
TARGET_US_253 = 8.0
#: ...and at most this times the minimal loop's, measured in the same run.
TARGET_RATIO_MINIMAL = 1.1
#: The worker's (this process, the trio hook) CPU per cycle at batch 253, against connpark.
TARGET_WORKER_US_253 = 8.0
CONTENDERS = ("connpark", "minimal", "bare")


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            continue
    return total


class Minimal:
    """``_minimal_container.py`` in a subprocess."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="cpm-")
        self.path = Path(self._dir.name) / "m.sock"
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_minimal_container.py"), str(self.path)]
        )
        deadline = time.monotonic() + 20
        while not self.path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the minimal container did not start")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._dir.cleanup()


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


async def connpark_rate(
    path: str, servers: list[socket.socket], seconds: float, pid: int
) -> dict[str, Any]:
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
        cpu0, mine0 = cpu_ns(pid), time.process_time()
        deadline = start + seconds
        while time.perf_counter() < deadline and rounds < 1_000_000:
            await one_round()
            rounds += 1
        elapsed = time.perf_counter() - start
        cpu, mine = cpu_ns(pid) - cpu0, time.process_time() - mine0
    servers[:] = [
        s if isinstance(s, socket.socket) else socket.socket(fileno=s.detach()) for s in socks
    ]
    return _result(rounds * batch, elapsed, cpu / 1e3, mine * 1e6)


def _result(cycles: int, elapsed: float, container_us: float, worker_us: float) -> dict[str, Any]:
    return {
        "cycles": cycles,
        "seconds": elapsed,
        "rate": cycles / elapsed,
        "container_us_per_cycle": container_us / cycles,
        "worker_us_per_cycle": worker_us / cycles,
    }


def _merged(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Slices of one measurement as one: their cycles, time and CPU added up."""
    cycles = sum(r["cycles"] for r in results)
    return _result(
        cycles,
        sum(r["seconds"] for r in results),
        sum(r["container_us_per_cycle"] * r["cycles"] for r in results),
        sum(r["worker_us_per_cycle"] * r["cycles"] for r in results),
    )


def paired_rates(
    servers: list[socket.socket],
    contenders: list[tuple[str, Container | Minimal]],
    seconds: float,
    slices: int,
) -> dict[str, dict[str, Any]]:
    """connpark and the minimal loop, each for ``seconds`` in all, taking turns in
    ``slices`` slices (the order flipping slice by slice): a slow spell of the
    shared machine falls on both, which is what their ratio needs."""
    parts: dict[str, list[dict[str, Any]]] = {who: [] for who, _ in contenders}
    for i in range(slices):
        for who, server in contenders if i % 2 == 0 else contenders[::-1]:
            parts[who].append(
                trio.run(connpark_rate, str(server.path), servers, seconds / slices, server.pid)
            )
    return {who: _merged(results) for who, results in parts.items()}


# -- idle connections -------------------------------------------------------------------


def hold_idle(path: str, n: int) -> subprocess.Popen[str]:
    """A helper process that parks ``n`` idle connections in the container at
    ``path`` and keeps its session open (``hold_main``) until killed."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--hold", str(n), path], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "parked":
        proc.kill()
        raise RuntimeError("the idle connections were not parked")
    return proc


def hold_main(n: int, path: str) -> None:
    raise_nofile()
    _clients, servers = tcp_pairs(n)  # the client ends stay open: so do the connections

    async def hold() -> None:
        async with connpark.open_parking(path, pool="idle") as parking:
            for i in range(0, n, 253):
                tickets = await parking.park_many(servers[i : i + 253])
                if not all(isinstance(t, int) for t in tickets):
                    raise RuntimeError(f"an idle connection was refused: {tickets}")
            print("parked", flush=True)
            await trio.sleep_forever()

    trio.run(hold)


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
        cpu0, mine0 = cpu_ns(child.pid), time.process_time()
        deadline = start + seconds
        while time.perf_counter() < deadline and rounds < 10_000_000:
            one_round()
            rounds += 1
        elapsed = time.perf_counter() - start
        cpu, mine = cpu_ns(child.pid) - cpu0, time.process_time() - mine0
    finally:
        a.close()
        child.wait(10)
    return _result(rounds * len(fds), elapsed, cpu / 1e3, mine * 1e6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--batches", default="1,64,253")
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--slices", type=int, default=4, help="turns connpark and the minimal loop take per repeat"
    )
    parser.add_argument(
        "--idle", type=int, default=0, help="idle connections parked besides, in each container"
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats of 0.5 s")
    parser.add_argument("--tiny", action="store_true", help="seconds, for the test suite")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    parser.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo is not None:
        echo_main(args.echo)
        return 0
    if args.hold is not None:
        hold_main(args.hold, args.path)
        return 0
    if args.quick:
        args.seconds, args.repeat = 0.5, 3
    if args.tiny:
        args.seconds, args.repeat, args.batches, args.no_plot = 0.1, 1, "1,8", True
        args.slices = 2
    raise_nofile()
    batches = [int(b) for b in args.batches.split(",")]

    runs: dict[int, dict[str, list[dict[str, Any]]]] = {
        b: {who: [] for who in CONTENDERS} for b in batches
    }
    minimal = Minimal()
    holders: list[subprocess.Popen[str]] = []
    try:
        with Container() as container:
            if args.idle:
                holders = [hold_idle(str(c.path), args.idle) for c in (container, minimal)]
            for rep in range(args.repeat):
                for batch in batches:
                    clients, servers = tcp_pairs(batch)
                    try:
                        pair: list[tuple[str, Container | Minimal]] = [
                            ("connpark", container),
                            ("minimal", minimal),
                        ]
                        if rep % 2:  # which of the pair goes first, repetition by repetition
                            pair.reverse()
                        for who, r in paired_rates(
                            servers, pair, args.seconds, args.slices
                        ).items():
                            runs[batch][who].append(r)
                        runs[batch]["bare"].append(baseline_rate(servers, args.seconds))
                    finally:
                        for s in (*clients, *servers):
                            s.close()
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
        minimal.stop()

    rows = []
    summary: dict[str, Any] = {}
    for batch in batches:
        med = {
            who: {
                key: median(r[key] for r in runs[batch][who])
                for key in ("rate", "container_us_per_cycle", "worker_us_per_cycle")
            }
            for who in CONTENDERS
        }
        cp, mini, bare = med["connpark"], med["minimal"], med["bare"]
        # The ratio of each repetition's pair (measured back to back: a slow spell
        # of the shared machine weighs on both), then the median of those.
        ratio = median(
            c["container_us_per_cycle"] / m["container_us_per_cycle"]
            for c, m in zip(runs[batch]["connpark"], runs[batch]["minimal"], strict=True)
        )
        summary[str(batch)] = {
            **{f"{who}_{key}": value for who in CONTENDERS for key, value in med[who].items()},
            "container_cpu_vs_minimal": ratio,
            "container_cpu_vs_minimal_of_medians": (
                cp["container_us_per_cycle"] / mini["container_us_per_cycle"]
            ),
            "rate_vs_bare": cp["rate"] / bare["rate"],
        }
        rows.append(
            [
                batch,
                cp["rate"],
                cp["container_us_per_cycle"],
                mini["container_us_per_cycle"],
                ratio,
                bare["container_us_per_cycle"],
                cp["worker_us_per_cycle"],
                mini["worker_us_per_cycle"],
            ]
        )
    print_table(
        "park+wake cycles: connpark vs the minimal Python loop vs a bare fd round trip "
        "(medians; CPU in us per cycle; ratio: the median of each repetition's pair)"
        + (f"; {args.idle} idle connections parked besides" if args.idle else ""),
        [
            "batch",
            "connpark cycles/s",
            "container us",
            "minimal us",
            "ratio",
            "bare echo us",
            "worker us (connpark)",
            "worker us (minimal)",
        ],
        rows,
    )
    met = worker_met = None
    if 253 in batches:
        s253 = summary["253"]
        us = s253["connpark_container_us_per_cycle"]
        met = us <= TARGET_US_253 and s253["container_cpu_vs_minimal"] <= TARGET_RATIO_MINIMAL
        print(
            f"\ntarget at batch 253: container <= {TARGET_US_253} us per cycle and <= "
            f"{TARGET_RATIO_MINIMAL}x the minimal loop: {us:.2f} us, "
            f"{s253['container_cpu_vs_minimal']:.2f}x: {'met' if met else 'MISSED'}"
        )
        worker_us = s253["connpark_worker_us_per_cycle"]
        worker_met = worker_us <= TARGET_WORKER_US_253
        print(
            f"target at batch 253: worker (trio hook) <= {TARGET_WORKER_US_253} us per cycle:"
            f" {worker_us:.2f} us: {'met' if worker_met else 'MISSED'}"
        )
    name = f"throughput_idle{args.idle}" if args.idle else "throughput"
    write_json(
        name,
        {
            "batches": batches,
            "idle_parked": args.idle,
            "seconds_per_measurement": args.seconds,
            "repeat": args.repeat,
            "runs": {str(b): v for b, v in runs.items()},
            "summary": summary,
            "target": {
                "batch": 253,
                "max_container_us_per_cycle": TARGET_US_253,
                "max_ratio_to_minimal": TARGET_RATIO_MINIMAL,
                "met": met,
                "max_worker_us_per_cycle": TARGET_WORKER_US_253,
                "worker_met": worker_met,
            },
        },
    )
    if not args.no_plot:
        plot_bars(
            name,
            "container CPU per park+wake cycle (lower is better)",
            [str(b) for b in batches],
            {
                "connpark": [summary[str(b)]["connpark_container_us_per_cycle"] for b in batches],
                "minimal Python loop": [
                    summary[str(b)]["minimal_container_us_per_cycle"] for b in batches
                ],
                "bare fd echo": [summary[str(b)]["bare_container_us_per_cycle"] for b in batches],
            },
            "us of CPU per cycle",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
