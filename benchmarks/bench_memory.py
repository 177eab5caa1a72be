#!/usr/bin/env python3
"""Memory per parked connection: container RSS growth vs holding the sockets yourself.

For each N, three contenders hold N idle loopback TCP connections, each in a
fresh process, one contender at a time (alternating within each repetition):

- connpark: a ``connpark serve`` container; this process is the worker, it
  accepts the N connections in chunks and parks them (concurrent ``park()``
  calls, coalesced by the trio hook into PARK frames). Measured: the
  container's RSS after the session is open and before parking, and after all
  N are parked.
- trio: a process holding each socket itself, one task per socket awaiting
  ``trio.lowlevel.wait_readable(sock)`` (what a trio user would write instead).
- asyncio: a process holding each socket with ``loop.add_reader(sock, callback)``.

The holders' RSS baseline is taken after imports and with the listener up,
before the first accept. The headline is RSS growth / N (bytes per
connection) and its ratio contender / connpark, medians over repetitions.
The kernel's own memory (/proc/meminfo Slab and /proc/net/sockstat TCP mem
pages, before/after, / N) is reported separately: it is system-wide and
covers both ends of each loopback connection (the farm's client socket too).

    python benchmarks/bench_memory.py [--sizes 10000,max] [--repeat 3] [--quick] [--tiny]
                                      [--no-plot]

``max`` is as many connections as the container's fd budget allows, less a margin.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import time
from typing import IO, TYPE_CHECKING, Any

import _common
from _common import (
    PAGE,
    Container,
    Farm,
    kernel_socket_memory,
    median,
    plot_bars,
    print_table,
    raise_nofile,
    rss,
    write_json,
)

if TYPE_CHECKING:
    import connpark

#: The target from the issue: container RSS per parked connection, at 10k and at the fd limit.
TARGET_BYTES_PER_CONN = 300
#: Sizes at or above this count towards the target (small N is page-granularity noise).
TARGET_MIN_N = 10_000
#: Connections below the container's fd budget for ``max``.
MAX_MARGIN = 50
#: Connections accepted and parked at once by the worker (it keeps at most this many fds).
PARK_CHUNK = 1000
BACKLOG = 4096
SETTLE = 0.5
CONTENDERS = ("connpark", "trio", "asyncio")
#: Clients per farm process and per 127.0.0.x source address. Linux's bind(port 0) takes
#: odd ports first (even ones are kept for connect()), so past half the ephemeral range
#: (~14k of 32768-60999) every further bind scans the full odd half: ~5 ms each, and a
#: 19.6k farm on one source took 20-35 s instead of 2.
FARM_PER_SOURCE = 10_000


# -- holders: the contenders that keep the sockets themselves (run as subprocesses) ----------


def _wait_go_blocking() -> None:
    """The parent writes ``go`` once it has read our baseline RSS."""
    os.read(0, 64)


def holder_trio(n: int, settle: float, lifetime: float) -> None:
    import trio

    async def main() -> None:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen(BACKLOG)
        print(f"ready {listener.getsockname()[1]}", flush=True)
        await trio.lowlevel.wait_readable(0)
        os.read(0, 64)  # "go"

        async def hold(sock: trio.socket.SocketType) -> None:
            with sock:
                await trio.lowlevel.wait_readable(sock)

        with trio.fail_after(lifetime):
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    conn, _addr = await listener.accept()
                    nursery.start_soon(hold, conn)
                listener.close()
                await trio.sleep(settle)
                print(f"held {n}", flush=True)
                await trio.lowlevel.wait_readable(0)  # EOF or a line: the parent is done
                nursery.cancel_scope.cancel()

    trio.run(main)


def holder_asyncio(n: int, settle: float, lifetime: float) -> None:
    import asyncio

    loop = asyncio.new_event_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(BACKLOG)
    listener.setblocking(False)
    held: list[socket.socket] = []
    done: asyncio.Future[None] = loop.create_future()
    print(f"ready {listener.getsockname()[1]}", flush=True)
    _wait_go_blocking()

    def on_readable(sock: socket.socket) -> None:
        loop.remove_reader(sock)
        sock.close()

    def on_accept() -> None:
        for _ in range(BACKLOG):
            try:
                conn, _addr = listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            loop.add_reader(conn, on_readable, conn)
            held.append(conn)
            if len(held) >= n:
                loop.remove_reader(listener)
                done.set_result(None)
                return

    loop.add_reader(listener, on_accept)
    loop.run_until_complete(asyncio.wait_for(done, lifetime))
    listener.close()
    loop.run_until_complete(asyncio.sleep(settle))
    print(f"held {n}", flush=True)
    os.read(0, 64)  # EOF or a line: the parent is done


# -- the parent side --------------------------------------------------------------------------


class _Lines:
    """Lines from a child's stdout pipe, each read with a deadline."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._fd = stream.fileno()
        self._buf = b""

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line from the child in {timeout:g}s")
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready:
                chunk = os.read(self._fd, 4096)
                if not chunk:
                    raise RuntimeError("the child exited")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode().strip()


def _farm(addr: tuple[str, int], n: int) -> Farm:
    """A ``Farm`` with at most FARM_PER_SOURCE clients per process (one source address each)."""
    return Farm(addr, n, per_process=min(_common.PER_PROCESS, FARM_PER_SOURCE))


def _kernel_per_conn(before: dict[str, int], after: dict[str, int], n: int) -> dict[str, Any]:
    """System-wide kernel memory deltas / N; ``kernel_clean`` when no one else's TCP moved.

    The machine is shared: other processes open and close TCP sockets during a run. A
    run's kernel figures count only if sockstat's TCP ``inuse`` grew by our 2N sockets
    (client and server end), give or take the listener.
    """
    slab = (after.get("slab_kib", 0) - before.get("slab_kib", 0)) * 1024
    unreclaimable = (after.get("sunreclaim_kib", 0) - before.get("sunreclaim_kib", 0)) * 1024
    tcp = (after.get("tcp_mem_pages", 0) - before.get("tcp_mem_pages", 0)) * PAGE
    inuse = after.get("tcp_inuse", 0) - before.get("tcp_inuse", 0)
    return {
        "slab_bytes_per_conn": slab / n,
        "sunreclaim_bytes_per_conn": unreclaimable / n,
        "tcp_mem_bytes_per_conn": tcp / n,
        "kernel_bytes_per_conn": (slab + tcp) / n,
        "tcp_inuse_delta": inuse,
        "kernel_clean": abs(inuse - 2 * n) <= 2,
    }


def _result(
    n: int,
    rss_before: int,
    rss_after: int,
    k_before: dict[str, int],
    k_after: dict[str, int],
    seconds: float,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "n": n,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "rss_growth": rss_after - rss_before,
        "bytes_per_conn": (rss_after - rss_before) / n,
        "kernel_before": k_before,
        "kernel_after": k_after,
        **_kernel_per_conn(k_before, k_after, n),
        "seconds": seconds,
        **extra,
    }


def run_holder(kind: str, n: int, timeout: float) -> dict[str, Any]:
    start = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--holder",
            kind,
            "--n",
            str(n),
            "--lifetime",
            str(timeout),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    farm: Farm | None = None
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        lines = _Lines(proc.stdout)
        ready = lines.readline(30).split()
        if len(ready) != 2 or ready[0] != "ready":
            raise RuntimeError(f"{kind} holder: {ready!r}")
        port = int(ready[1])
        rss_before = rss(proc.pid)
        k_before = kernel_socket_memory()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        farm = _farm(("127.0.0.1", port), n)
        held = lines.readline(timeout)
        if held != f"held {n}":
            raise RuntimeError(f"{kind} holder: {held!r}")
        rss_after = rss(proc.pid)
        k_after = kernel_socket_memory()
    finally:
        # The server side closes first (killing the holder), so TIME_WAIT lands on the
        # server's side and the farm's source ports are free again for the next run.
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        if farm is not None:
            farm.close()
    return _result(n, rss_before, rss_after, k_before, k_after, time.monotonic() - start)


async def _accept_and_park(listener: socket.socket, parking: connpark.Parking, n: int) -> None:
    """Accept N connections in chunks; park each chunk with concurrent park() calls."""
    import trio

    done = 0
    while done < n:
        await trio.lowlevel.wait_readable(listener)
        batch: list[socket.socket] = []
        try:
            while len(batch) < min(PARK_CHUNK, n - done):
                try:
                    conn, _addr = listener.accept()
                except BlockingIOError:
                    break
                batch.append(conn)
            async with trio.open_nursery() as nursery:
                for conn in batch:
                    nursery.start_soon(parking.park, conn)
        finally:
            for conn in batch:
                conn.close()  # parked ones are closed already (a no-op)
        done += len(batch)


async def _connpark_session(
    container: Container, n: int, timeout: float, farm_box: list[Farm]
) -> dict[str, Any]:
    import trio

    import connpark

    start = time.monotonic()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(BACKLOG)
    listener.setblocking(False)
    port = listener.getsockname()[1]

    async def start_farm() -> None:
        farm_box.append(
            await trio.to_thread.run_sync(_farm, ("127.0.0.1", port), n, abandon_on_cancel=True)
        )

    try:
        with trio.fail_after(timeout):
            async with connpark.open_parking(str(container.path), pool="bench-memory") as parking:
                stats = await parking.stats()  # the session is fully set up in the container
                budget = stats.fd_budget
                rss_before = container.rss()
                k_before = kernel_socket_memory()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(start_farm)
                    await _accept_and_park(listener, parking, n)
                await trio.sleep(SETTLE)
                stats = await parking.stats()
                rss_after = container.rss()
                k_after = kernel_socket_memory()
    finally:
        listener.close()
    if stats.parked != n:
        raise RuntimeError(f"connpark: {stats.parked} parked, expected {n} ({stats})")
    return _result(
        n,
        rss_before,
        rss_after,
        k_before,
        k_after,
        time.monotonic() - start,
        parked=stats.parked,
        fds_held=stats.fds_held,
        fd_budget=budget,
    )


def run_connpark(n: int, timeout: float) -> dict[str, Any]:
    import trio

    farm_box: list[Farm] = []
    container = Container()
    try:
        return trio.run(_connpark_session, container, n, timeout, farm_box)
    finally:
        # Server side first (the session is closed: stopping closes every parked fd).
        container.stop()
        for farm in farm_box:
            farm.close()


def probe_fd_budget() -> int:
    from connpark._stats_client import fetch_stats

    with Container() as container:
        return fetch_stats(str(container.path)).fd_budget


def _median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    return median(r[key] for r in runs) if runs else None


def run_one(who: str, n: int, timeout: float) -> dict[str, Any]:
    if who == "connpark":
        return run_connpark(n, timeout)
    return run_holder(who, n, timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sizes", default="10000,max", help="comma-separated N; 'max' = fd budget")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0, help="per run, seconds")
    parser.add_argument("--quick", action="store_true", help="N = 2000,10000, 2 repeats")
    parser.add_argument("--tiny", action="store_true", help="seconds, for the test suite")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--holder", choices=["trio", "asyncio"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", type=float, default=300.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raise_nofile()
    if args.holder is not None:
        if args.holder == "trio":
            holder_trio(args.n, SETTLE, args.lifetime)
        else:
            holder_asyncio(args.n, SETTLE, args.lifetime)
        return 0
    mode = "default"
    if args.quick:
        mode, args.sizes, args.repeat = "quick", "2000,10000", 2
    if args.tiny:
        mode, args.sizes, args.repeat, args.no_plot, args.timeout = "tiny", "200", 1, True, 60.0
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    budget = probe_fd_budget()
    sizes: list[int] = []
    labels: list[str] = []
    for item in args.sizes.split(","):
        item = item.strip()
        n = budget - MAX_MARGIN if item == "max" else int(item)
        if not 0 < n <= budget - MAX_MARGIN:
            parser.error(f"size {item}: must be 1..{budget - MAX_MARGIN} (fd budget {budget})")
        sizes.append(n)
        labels.append(f"N={n:,}" + (" (max)" if item == "max" else ""))
    print(f"container fd budget {budget}; sizes {sizes}; {args.repeat} repetition(s)")

    started = time.monotonic()
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {
        n: {c: [] for c in CONTENDERS} for n in sizes
    }
    for n in sizes:
        for rep in range(args.repeat):
            for who in CONTENDERS:
                r = run_one(who, n, args.timeout)
                runs[n][who].append(r)
                print(
                    f"  N={n:>6} rep {rep + 1}/{args.repeat} {who:<8} "
                    f"{r['bytes_per_conn']:8.1f} B/conn RSS  "
                    f"kernel {r['kernel_bytes_per_conn']:8.1f} B/conn"
                    f"{'' if r['kernel_clean'] else ' (other TCP activity)'}"
                    f"  ({r['seconds']:.1f}s)",
                    flush=True,
                )

    summary: dict[str, Any] = {}
    rows: list[list[Any]] = []
    for n, label in zip(sizes, labels, strict=True):
        per: dict[str, Any] = {}
        base = median(r["bytes_per_conn"] for r in runs[n]["connpark"])
        for who in CONTENDERS:
            rs = runs[n][who]
            bpc = median(r["bytes_per_conn"] for r in rs)
            clean = [r for r in rs if r["kernel_clean"]]
            per[who] = {
                "bytes_per_conn": bpc,
                "ratio_vs_connpark": bpc / base if base > 0 else None,
                "rss_before": median(r["rss_before"] for r in rs),
                "rss_after": median(r["rss_after"] for r in rs),
                "kernel_bytes_per_conn": _median_of(clean, "kernel_bytes_per_conn"),
                "slab_bytes_per_conn": _median_of(clean, "slab_bytes_per_conn"),
                "sunreclaim_bytes_per_conn": _median_of(clean, "sunreclaim_bytes_per_conn"),
                "tcp_mem_bytes_per_conn": _median_of(clean, "tcp_mem_bytes_per_conn"),
                "kernel_runs_clean": len(clean),
            }
            ratio = per[who]["ratio_vs_connpark"]
            rows.append(
                [
                    label,
                    who,
                    bpc,
                    "-" if ratio is None else f"{ratio:.2f}x",
                    "n/a" if not clean else per[who]["kernel_bytes_per_conn"],
                    f"{len(clean)}/{len(rs)}",
                    per[who]["rss_before"] / 2**20,
                ]
            )
        summary[str(n)] = per

    print_table(
        "RSS growth per held connection (medians; ratio = contender / connpark)",
        ["N", "contender", "RSS B/conn", "ratio", "kernel B/conn", "clean", "RSS base MiB"],
        rows,
    )
    print(
        "kernel B/conn: /proc/meminfo Slab + sockstat TCP mem deltas / N, system-wide, both"
        " ends of each loopback connection; median over the 'clean' runs (TCP inuse grew by"
        " exactly our 2N sockets)"
    )
    judged = [n for n in sizes if n >= TARGET_MIN_N]
    met: bool | None = None
    if judged:
        met = all(
            summary[str(n)]["connpark"]["bytes_per_conn"] <= TARGET_BYTES_PER_CONN for n in judged
        )
        verdict = "met" if met else "MISSED"
        print(f"\ntarget: connpark <= {TARGET_BYTES_PER_CONN} B/conn at N={judged}: {verdict}")
    else:
        print(f"\ntarget: not judged (needs N >= {TARGET_MIN_N:,})")
    elapsed = time.monotonic() - started
    print(f"total {elapsed:.1f}s")

    write_json(
        "memory",
        {
            "mode": mode,
            "sizes": sizes,
            "labels": labels,
            "fd_budget": budget,
            "repeat": args.repeat,
            "contenders": list(CONTENDERS),
            "runs": {str(n): v for n, v in runs.items()},
            "summary": summary,
            "target": {
                "max_bytes_per_conn": TARGET_BYTES_PER_CONN,
                "judged_sizes": judged,
                "met": met,
            },
            "seconds": elapsed,
            "notes": (
                "bytes_per_conn = (RSS after holding N) - (RSS before the first one), / N."
                " connpark: the container process (the worker holds nothing once parked)."
                " Kernel figures are system-wide deltas (Slab + TCP mem pages) over the"
                " same interval and include the client end of each loopback connection."
            ),
        },
    )
    if not args.no_plot:
        plot_bars(
            "memory",
            "RSS per idle connection held (lower is better)",
            labels,
            {who: [summary[str(n)][who]["bytes_per_conn"] for n in sizes] for who in CONTENDERS},
            "bytes per connection",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
