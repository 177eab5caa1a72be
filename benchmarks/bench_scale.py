#!/usr/bin/env python3
"""Scale: park N connections in one container, up to what the machine allows.

This process is the worker (the trio hook). A client farm (``_common.Farm``'s
processes, here each on its own 127.0.0.x source address: ``SourceFarm``)
opens N loopback TCP clients; the worker accepts them and parks them in
chunks (default 1,000 concurrent ``park()`` calls, coalesced by the hook into
PARK frames of up to 253 fds), so it never holds more than one chunk of fds
itself. Each chunk is timed from its first accept to its last PARKED, with
the container's RSS and the CPU time the container and the worker spent on
it. The cost per park must stay flat as the container fills: the headline is
median(last 3 full chunks) / median(first 3 full chunks), ~1.0 is flat; by
default the fill is done 3 times (a fresh container each) and the ratio is
taken over the per-chunk medians, as one fill on a shared 2-core machine is
noisy.

Then a random 1% (at least 10) of the clients write at once; every woken
connection is read back and checked: its bytes must be exactly what its
client wrote, each chosen client must come back exactly once, and the token
must be the one it was parked with. The token is the accept sequence number
(which farm client an accepted socket belongs to is unknown until it
writes), so the token check is that the woken socket's peer address is the
one recorded at accept under that token. Then a sequential sample of single
wakes gives the one-at-a-time latency at full size. Wake latency is client
write -> ``Woken`` taken from ``parking.wakes()`` here (``time.monotonic_ns``
on both sides).

Which limit stops it is printed: the container's fd budget (RLIMIT_NOFILE,
20,000 here and not raisable, less the container's reserve) is shown by
parking a few more sockets past it and counting the ``out-of-fds``
refusals; ports and memory are checked against the target too.

The farm connects before any park is timed: the worker listens with several
SO_REUSEPORT sockets so the kernel accept queues (each capped by somaxconn)
hold every pending connection, and the farm's connects neither compete with
the parks for the CPU nor stall on SYN retransmits.

    python benchmarks/bench_scale.py [--target N|max] [--quick] [--tiny] [--no-plot]

Exit status 1 if fewer than planned were parked or any sampled wake was wrong
or missing.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
from _common import (
    PER_PROCESS,
    RESULTS,
    Container,
    Farm,
    expected_payload,
    kernel_socket_memory,
    median,
    percentile,
    print_table,
    raise_nofile,
    rss,
    write_json,
)

import connpark
from connpark._stats_client import fetch_stats

IDLE_TIMEOUT = 3600.0  # no parked connection may time out during the run
OVERFLOW_ATTEMPTS = 20  # parks tried past the fd budget, to show the refusals
FLAT_OK = 1.25  # last/first per-park cost at or under this counts as flat
EDGE_CHUNKS = 3  # chunks at each end compared for the flatness ratio
# Clients per farm process, each process on its own 127.0.0.x: bind(port 0) slows as
# an address fills up (15,000 on one address take ~3 s to connect, 4 x 5,000 ~1 s).
FARM_PER_PROCESS = min(PER_PROCESS, 5_000)
MAX_FARMS = 48
PORT_MARGIN = 500  # ephemeral ports left free on each farm source address
PER_CONN_GUESS = 10 * 1024  # memory per connection: two kernel TCP sockets, fds, a slot
READ_TIMEOUT = 5.0  # per woken connection, to read its bytes
CLK_TCK = os.sysconf("SC_CLK_TCK")
TCP_LOCAL_LOOPBACK = re.compile(rb"\n *\d+: ([0-9A-F]{2}00007F):")  # /proc/net/tcp, 127.0.0.x
MIB = 1024 * 1024
LINE = re.compile(rb"\A([A-Za-z]+)-([a-z]+)(\d+)\n\Z")  # PAYLOAD-TAG INDEX


# -- limits ----------------------------------------------------------------------------


def proc_nofile(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of another process, from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                big = 1 << 30
                return (big if soft == "unlimited" else int(soft)), (
                    big if hard == "unlimited" else int(hard)
                )
    return (0, 0)


def port_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return (32768, 60999)


def ports_in_use() -> Counter[str]:
    """TCP sockets (any state, TIME_WAIT included) per local 127.0.0.x address."""
    try:
        with open("/proc/net/tcp", "rb") as f:
            data = f.read()
    except OSError:
        return Counter()
    out: Counter[str] = Counter()
    for hexaddr, count in Counter(TCP_LOCAL_LOOPBACK.findall(data)).items():
        out[f"127.0.0.{int(hexaddr[:2], 16)}"] = count  # little-endian: last octet first
    return out


def somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return 128


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU time of a (single-threaded) process: schedstat's ns, else stat's 10 ms ticks."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


# -- the load generator ------------------------------------------------------------------------


class SourceFarm(Farm):
    """``_common.Farm`` on the emptiest source addresses, with a tag per process.

    Two benchmarks running at once must not share a source address's
    ephemeral ports (bind(port 0) then scans past the other farm's ports:
    ~3 ms per connect with ~20k taken, and the two can run out of the 28k).
    """

    def __init__(
        self,
        addr: tuple[str, int],
        n: int,
        sources: Sequence[str],
        per_process: int = PER_PROCESS,
        started: list[subprocess.Popen[str]] | None = None,
    ) -> None:
        super().__init__(addr, n, per_process, sources=sources, started=started)

    # Each process gets its own payload (PAYLOAD-TAG), which makes every
    # client's bytes unique whether _farm.py writes local or global indices
    # (older versions wrote local ones): both are recognised.

    @staticmethod
    def tag(k: int) -> str:
        out = ""
        while True:
            out = chr(ord("a") + k % 26) + out
            k //= 26
            if not k:
                return out

    def send(self, indices: Sequence[int], payload: str = "x") -> dict[int, int]:
        """Like ``Farm.send``, one command per process (all written first), a tag each."""
        by_proc: dict[int, list[int]] = {}
        for i in indices:
            k = next(k for k, (_, first, count) in enumerate(self.procs) if i < first + count)
            by_proc.setdefault(k, []).append(i - self.procs[k][1])
        for k, local in by_proc.items():
            stdin = self.procs[k][0].stdin
            assert stdin is not None
            stdin.write(f"send {payload}-{self.tag(k)} {','.join(map(str, local))}\n")
            stdin.flush()
        out: dict[int, int] = {}
        for k in by_proc:
            proc, first, _ = self.procs[k]
            reply = self._read(proc).split()
            if not reply or reply[0] != "sent":
                raise RuntimeError(f"farm answered {reply!r}")
            for pair in reply[1:]:
                idx, stamp = pair.split(":")
                out[first + int(idx)] = int(stamp)
        return out

    def decode(self, data: bytes) -> tuple[str, int] | None:
        """(payload, global client index) of what ``send`` made a client write."""
        m = LINE.match(data)
        if m is None:
            return None
        payload, tag, num = m.group(1).decode(), m.group(2).decode(), int(m.group(3))
        k = 0
        for ch in tag:
            k = k * 26 + ord(ch) - ord("a")
        if k >= len(self.procs):
            return None
        _, first, count = self.procs[k]
        if num < count:
            return payload, first + num
        if first <= num < first + count:
            return payload, num
        return None

    def expected(self, payload: str, index: int) -> set[bytes]:
        """The bytes client ``index`` writes for ``send(..., payload)`` (local or global)."""
        k = next(k for k, (_, first, count) in enumerate(self.procs) if index < first + count)
        first = self.procs[k][1]
        tagged = f"{payload}-{self.tag(k)}"
        return {expected_payload(tagged, index - first), expected_payload(tagged, index)}


def pick_sources(count: int, first: int) -> list[tuple[str, int]]:
    """``count`` 127.0.0.x addresses from .first on, the emptiest first, with ports in use."""
    used = ports_in_use()
    octets = [x for x in range(first, 255) if x >= 2] + list(range(2, min(first, 255)))
    seen = [(f"127.0.0.{x}", used[f"127.0.0.{x}"]) for x in octets[: count + 8]]
    return sorted(seen, key=lambda s: s[1])[:count]


# -- listening ----------------------------------------------------------------------------


def open_listeners(n_conns: int) -> tuple[list[socket.socket], int]:
    """SO_REUSEPORT listeners on one 127.0.0.1 port, enough queue room for n_conns.

    Returns the sockets and their total accept-queue capacity.
    """
    backlog = somaxconn()
    want = 1 + math.ceil(n_conns / max(1, backlog // 2))
    count = min(64, want) if hasattr(socket, "SO_REUSEPORT") else 1
    listeners: list[socket.socket] = []
    port = 0
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listeners.append(s)
            if count > 1:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            port = s.getsockname()[1]
            s.listen(backlog)
            s.setblocking(False)
    except BaseException:
        for s in listeners:
            s.close()
        raise
    return listeners, count * backlog


async def accept_chunk(
    listeners: Sequence[socket.socket], size: int, deadline: float
) -> list[tuple[socket.socket, Any]]:
    """``size`` connections from whichever listeners have them (bounded by ``deadline``)."""
    out: list[tuple[socket.socket, Any]] = []
    while True:
        for lst in listeners:
            while len(out) < size:
                try:
                    out.append(lst.accept())
                except BlockingIOError:
                    break
        if len(out) >= size:
            return out
        if time.monotonic() > deadline:
            for s, _ in out:
                s.close()
            raise TimeoutError(f"accepted {len(out)} of {size} connections before the deadline")
        await trio.sleep(0.001)


# -- wakes: collect, read back, check --------------------------------------------------------


class WakeLog:
    """Every ``Woken`` this session gets, checked against what its client wrote."""

    def __init__(self, peers: list[Any]) -> None:
        self.peers = peers  # accept sequence number (= token) -> peer address
        self.farm: SourceFarm | None = None
        self.wanted: dict[int, str] = {}  # farm index -> payload its client writes
        self.events: dict[int, trio.Event] = {}
        self.recv_ns: dict[int, int] = {}  # farm index -> when its Woken was taken
        self.ok: dict[int, bool] = {}
        self.problems: list[str] = []
        self.other: Counter[str] = Counter()  # wakes we did not ask for, by reason

    def expect(self, indices: Sequence[int], payload: str) -> None:
        for i in indices:
            self.wanted[i] = payload
            self.events[i] = trio.Event()

    async def wait(self, indices: Sequence[int], within: float) -> None:
        with trio.move_on_after(within):
            for i in indices:
                await self.events[i].wait()

    async def collect(self, parking: connpark.Parking) -> None:
        wakes = parking.wakes()
        async with trio.open_nursery() as nursery:
            async for woken in wakes:
                # Stamp everything already delivered before checking any of it, so one
                # wake's check does not count in the next one's latency.
                t = time.monotonic_ns()
                batch = [woken]
                while len(batch) < 10_000:
                    try:
                        batch.append(wakes.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                for w in batch:
                    nursery.start_soon(self._check, w, t)

    async def _check(self, woken: connpark.Woken[Any], t_ns: int) -> None:
        sock = woken.socket
        try:
            if sock is None or woken.reason is not connpark.Reason.READABLE:
                self.other[str(woken.reason)] += 1
                return
            try:
                peer_ok = sock.getpeername() == self.peers[int(woken.token)]
            except (ValueError, IndexError, OSError):
                peer_ok = False
            data = b""
            with trio.move_on_after(READ_TIMEOUT):
                while b"\n" not in data and len(data) < 256:
                    chunk = await sock.recv(256)
                    if not chunk:
                        break
                    data += chunk
            found = self.farm.decode(data) if self.farm is not None else None
            if found is None or found[1] not in self.wanted:
                self.other["READABLE (not asked for)"] += 1
                self.problems.append(f"token {woken.token!r}: unexpected bytes {data!r}")
                return
            payload, index = found
            if index in self.ok:
                self.ok[index] = False
                self.problems.append(f"client {index} woken twice")
                return
            assert self.farm is not None
            good = payload == self.wanted[index] and data in self.farm.expected(payload, index)
            if not good:
                self.problems.append(f"client {index}: bytes {data!r}")
            if not peer_ok:
                self.problems.append(f"client {index}: token {woken.token!r} has another peer")
            if woken.pending:
                self.problems.append(f"client {index}: pending {woken.pending!r}, parked none")
            self.recv_ns[index] = t_ns
            self.ok[index] = good and peer_ok and not woken.pending
            self.events[index].set()
        finally:
            if sock is not None:
                sock.close()

    def tally(self, indices: Sequence[int], sent: dict[int, int]) -> dict[str, Any]:
        correct = sum(1 for i in indices if self.ok.get(i) is True)
        wrong = sum(1 for i in indices if self.ok.get(i) is False)
        lat_ms = [(self.recv_ns[i] - sent[i]) / 1e6 for i in indices if i in self.recv_ns]
        writes = [sent[i] for i in indices if i in sent]
        woke = [self.recv_ns[i] for i in indices if i in self.recv_ns]
        return {
            "asked": len(indices),
            # the farm writes one client after another: how long its burst took, and
            # from its first write to the last Woken taken here
            "write_spread_ms": (max(writes) - min(writes)) / 1e6 if writes else 0.0,
            "first_write_to_last_woken_ms": (max(woke) - min(writes)) / 1e6
            if writes and woke
            else 0.0,
            "correct": correct,
            "wrong": wrong,
            "missing": len(indices) - correct - wrong,
            "latency_ms": {
                "count": len(lat_ms),
                "p50": percentile(lat_ms, 0.50),
                "p90": percentile(lat_ms, 0.90),
                "p99": percentile(lat_ms, 0.99),
                "max": max(lat_ms, default=0.0),
            },
            "latencies_ms": [round(x, 4) for x in lat_ms],
        }


# -- the run ----------------------------------------------------------------------------------


async def run_farm(
    addr: tuple[str, int],
    n: int,
    sources: Sequence[str],
    per_process: int,
    box: dict[str, Any],
    done: trio.Event,
) -> None:
    t = time.perf_counter()
    started: list[subprocess.Popen[str]] = []
    box["started"] = started
    try:
        box["farm"] = await trio.to_thread.run_sync(
            SourceFarm, addr, n, sources, per_process, started, abandon_on_cancel=True
        )
    except Exception as exc:
        box["error"] = exc
    finally:
        box["seconds"] = time.perf_counter() - t
        done.set()


async def park_chunk(
    parking: connpark.Parking,
    conns: list[tuple[socket.socket, Any]],
    first_seq: int,
    refused: Counter[str],
) -> int:
    """Park every socket concurrently (token = accept sequence number); how many parked."""
    parked = 0

    async def one(sock: socket.socket, seq: int) -> None:
        nonlocal parked
        try:
            await parking.park(sock, token=b"%d" % seq, idle_timeout=IDLE_TIMEOUT)
            parked += 1
        except connpark.ParkRefused as exc:
            refused[exc.reason.label] += 1
            sock.close()

    async with trio.open_nursery() as nursery:
        for k, (sock, _) in enumerate(conns):
            nursery.start_soon(one, sock, first_seq + k)
    return parked


async def overflow(parking: connpark.Parking, attempts: int) -> dict[str, Any]:
    """Try to park ``attempts`` more connections (local pairs) past the budget."""
    refused: Counter[str] = Counter()
    lst = socket.create_server(("127.0.0.1", 0), backlog=attempts)
    clients: list[socket.socket] = []
    servers: list[tuple[socket.socket, Any]] = []
    try:
        for _ in range(attempts):
            clients.append(socket.create_connection(lst.getsockname(), timeout=5))
            servers.append(lst.accept())
        with trio.fail_after(30):
            parked = await park_chunk(parking, servers, 10**9, refused)
    finally:
        for s, _ in servers:
            s.close()  # a no-op for the parked ones (park closed our copy)
        for c in clients:
            c.close()  # any that did park come back as HANGUP notices
        lst.close()
    return {"attempted": attempts, "parked": parked, "refused": dict(refused)}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    raise_nofile()
    plan: dict[str, Any] = {"target": args.target, "chunk": args.chunk}
    container = Container("--idle-timeout", str(IDLE_TIMEOUT))
    listeners: list[socket.socket] = []
    farm_box: dict[str, Any] = {}
    try:
        soft, hard = proc_nofile(container.pid)
        rss_base = container.rss()
        async with connpark.open_parking(str(container.path), pool="scale") as parking:
            budget = (await parking.stats()).fd_budget
            lo, hi = port_range()
            ports_per_source = hi - lo + 1
            want = budget if args.target == "max" else int(args.target)
            # One farm process per source address (the emptiest), at most MAX_FARMS.
            candidates = pick_sources(MAX_FARMS, args.source_base)
            free_ports = min(ports_per_source - used for _, used in candidates) - PORT_MARGIN
            per_source = max(0, min(PER_PROCESS, free_ports))
            caps = {
                "RLIMIT_NOFILE": budget,
                "ports": MAX_FARMS * per_source,
                "memory": mem_available() // PER_CONN_GUESS,
            }
            limits = {
                "container_rlimit_nofile": [soft, hard],
                "container_fd_budget": budget,
                "ports_per_source": ports_per_source,
                "mem_available": mem_available(),
                "somaxconn": somaxconn(),
                "caps": caps,
            }
            stopper = min(caps, key=lambda k: caps[k])
            n = min(want, caps[stopper])
            if n < 1:
                raise RuntimeError(f"nothing to park: limits {caps}")
            per_process = min(per_source, max(FARM_PER_PROCESS, math.ceil(n / MAX_FARMS)))
            n_procs = math.ceil(n / per_process)
            sources = candidates[:n_procs]
            limits.update(farm_sources=dict(sources), farm_per_process=per_process)
            explain = {
                "RLIMIT_NOFILE": f"the container's fd budget is {budget:,} (RLIMIT_NOFILE hard "
                f"limit {hard:,} fds, less its reserve of free fds and the ones it holds)",
                "ports": f"{MAX_FARMS} source addresses x {per_source:,} free ephemeral ports",
                "memory": f"{mem_available() / 2**30:.1f} GiB available / "
                f"~{PER_CONN_GUESS // 1024} KiB per connection",
            }
            if want > n or args.target == "max":
                stopped_by = f"{stopper}: {explain[stopper]}"
            else:
                stopped_by = "none: the target was reached"
            plan.update(wanted=want, n=n, stopped_by=stopped_by, stopper=stopper)
            print(
                f"target {want:,}: parking {n:,}. Limits: container fd budget {budget:,} "
                f"(RLIMIT_NOFILE {soft:,}/{hard:,}); ports ~{caps['ports']:,} "
                f"({per_source:,} per 127.0.0.x source); memory ~{caps['memory']:,} connections. "
                f"Farm: {n_procs} process(es) from "
                f"{', '.join(f'{ip} ({used:,} ports in use)' for ip, used in sources)}"
            )

            listeners, queue_room = open_listeners(n)
            addr = listeners[0].getsockname()
            farm_done = trio.Event()
            kmem0 = kernel_socket_memory()
            peers: list[Any] = []
            log = WakeLog(peers)
            chunks: list[dict[str, Any]] = []
            refused: Counter[str] = Counter()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(log.collect, parking)
                nursery.start_soon(
                    run_farm, addr, n, [ip for ip, _ in sources], per_process, farm_box, farm_done
                )
                farm_first = queue_room >= n * 1.2  # else park while the farm connects
                plan["farm_connects_first"] = farm_first
                plan["listeners"] = len(listeners)
                if farm_first:
                    with trio.move_on_after(60 + n / 200):
                        await farm_done.wait()
                    if "farm" not in farm_box:
                        raise RuntimeError(f"farm failed: {farm_box.get('error', 'timed out')}")
                    print(
                        f"farm: {n:,} clients connected in {farm_box['seconds']:.1f}s "
                        f"({len(listeners)} SO_REUSEPORT listeners)"
                    )
                kmem1 = kernel_socket_memory()

                # -- park, chunk by chunk ------------------------------------------
                parked_total = 0
                t_start = time.perf_counter()
                deadline = time.monotonic() + 120 + n / 100
                while len(peers) < n:
                    size = min(args.chunk, n - len(peers))
                    cpu0, wcpu0 = cpu_seconds(container.pid), time.process_time()
                    t0 = time.perf_counter()
                    conns = await accept_chunk(listeners, size, deadline)
                    t1 = time.perf_counter()
                    first_seq = len(peers)
                    peers.extend(a for _, a in conns)
                    with trio.fail_after(60):
                        got = await park_chunk(parking, conns, first_seq, refused)
                    t2 = time.perf_counter()
                    parked_total += got
                    chunks.append(
                        {
                            "chunk": len(chunks) + 1,
                            "size": size,
                            "parked": got,
                            "parked_total": parked_total,
                            "accept_s": t1 - t0,
                            "park_s": t2 - t1,
                            "per_park_us": (t2 - t0) / size * 1e6,
                            "container_cpu_us_per_park": (cpu_seconds(container.pid) - cpu0)
                            / size
                            * 1e6,
                            "worker_cpu_us_per_park": (time.process_time() - wcpu0) / size * 1e6,
                            "container_rss": container.rss(),
                        }
                    )
                park_seconds = time.perf_counter() - t_start
                park_sum = sum(c["accept_s"] + c["park_s"] for c in chunks)
                if not farm_first:
                    with trio.move_on_after(60):
                        await farm_done.wait()
                    if "farm" not in farm_box:
                        raise RuntimeError(f"farm failed: {farm_box.get('error', 'timed out')}")
                farm: SourceFarm = farm_box["farm"]
                log.farm = farm
                kmem2 = kernel_socket_memory()
                rss_full = container.rss()
                print(
                    f"parked {parked_total:,} in {park_seconds:.2f}s "
                    f"({park_sum / max(1, len(peers)) * 1e6:.1f} us per park); "
                    f"container RSS {rss_full / MIB:.1f} MiB"
                )

                # -- past the limit -----------------------------------------------------
                over: dict[str, Any] | None = None
                if stopper == "RLIMIT_NOFILE" and n == budget:
                    over = await overflow(parking, OVERFLOW_ATTEMPTS)
                    print(
                        f"past the budget: {over['attempted']} more parks -> "
                        f"refused {over['refused'] or 'none'}, parked {over['parked']}"
                    )

                # -- wake a random 1% at once ---------------------------------------------
                k = min(parked_total, max(10, round(parked_total * args.wake_frac)))
                pool = list(range(n))
                rng.shuffle(pool)
                burst_ix = sorted(pool[:k])
                singles_ix = pool[k : k + min(args.singles, max(0, n - k))]
                log.expect(burst_ix, "wake")
                t_b = time.perf_counter()
                sent = await trio.to_thread.run_sync(farm.send, burst_ix, "wake")
                await log.wait(burst_ix, 10 + k / 50)
                burst_s = time.perf_counter() - t_b
                burst = log.tally(burst_ix, sent)
                burst["seconds"] = burst_s
                print(
                    f"burst: {burst['correct']}/{k} woken with the right bytes "
                    f"(wrong {burst['wrong']}, missing {burst['missing']}); latency p50 "
                    f"{burst['latency_ms']['p50']:.2f} ms, p99 {burst['latency_ms']['p99']:.2f} ms"
                )

                # -- single wakes, one at a time ---------------------------------------------
                log.expect(singles_ix, "one")
                sent_single: dict[int, int] = {}
                t_s = time.perf_counter()
                for i in singles_ix:
                    sent_single.update(await trio.to_thread.run_sync(farm.send, [i], "one"))
                    await log.wait([i], READ_TIMEOUT)
                    if time.perf_counter() - t_s > 60:
                        break
                singles = log.tally(singles_ix, sent_single)
                print(
                    f"singles: {singles['correct']}/{len(singles_ix)} correct; latency p50 "
                    f"{singles['latency_ms']['p50']:.2f} ms, "
                    f"p99 {singles['latency_ms']['p99']:.2f} ms"
                )

                stats = await trio.to_thread.run_sync(
                    fetch_stats, str(container.path), abandon_on_cancel=True
                )
                rss_end = container.rss()
                nursery.cancel_scope.cancel()
    finally:
        for s in listeners:
            s.close()
        # The container first: it closes the server ends, so the clients are not the
        # ones left in TIME_WAIT holding their source ports for a minute.
        container.stop()
        if "farm" in farm_box:
            farm_box["farm"].close()
        else:  # it failed or never finished connecting
            for proc in farm_box.get("started", []):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    return {
        "plan": plan,
        "limits": limits,
        "loadavg": loadavg(),
        "farm_connect_s": farm_box.get("seconds"),
        "parked": parked_total,
        "refused_while_filling": dict(refused),
        "park_seconds": park_seconds,
        "park_seconds_sum_of_chunks": park_sum,
        "chunks": chunks,
        "flatness": flatness([chunks], args.chunk),
        "container_rss": {
            "before": rss_base,
            "full": rss_full,
            "end": rss_end,
            "per_connection": (rss_full - rss_base) / max(1, parked_total),
        },
        "kernel_memory": {"before": kmem0, "connected": kmem1, "parked": kmem2},
        "overflow": over,
        "burst": burst,
        "singles": singles,
        "unexpected_wakes": dict(log.other),
        "problems": log.problems[:50],
        "container_stats": {
            "parked": stats.parked,
            "fds_held": stats.fds_held,
            "fd_budget": stats.fd_budget,
            "parks_total": stats.parks_total,
            "refused_total": dict(stats.refused_total),
            "woken_total": dict(stats.woken_total),
            "wake_latency": {
                "count": stats.wake_latency.count,
                "p50_ms": stats.wake_latency.p50_ms,
                "p99_ms": stats.wake_latency.p99_ms,
                "max_ms": stats.wake_latency.max_ms,
            },
        },
        "worker_rss_end": rss(),
    }


# -- report ------------------------------------------------------------------------------------


def flatness(rounds: Sequence[Sequence[dict[str, Any]]], chunk: int) -> dict[str, Any]:
    """Last chunks' cost per park over the first chunks' (per-position medians over rounds).

    Only full chunks count (the last one is usually partial).
    """
    full = [[c for c in chunks if c["size"] == chunk] or list(chunks) for chunks in rounds]
    length = min(len(f) for f in full)
    edge = min(EDGE_CHUNKS, max(1, length // 2))
    out: dict[str, Any] = {"edge_chunks": edge, "flat_threshold": FLAT_OK}
    for key, name in (("per_park_us", "wall"), ("container_cpu_us_per_park", "container_cpu")):
        series = [median(f[i][key] for f in full) for i in range(length)]
        first, last = median(series[:edge]), median(series[-edge:])
        third = max(edge, length // 3)  # a steadier figure: first vs last third of the chunks
        t_first, t_last = median(series[:third]), median(series[-third:])
        out[name] = {
            "first_us": first,
            "last_us": last,
            "ratio": last / first if first else math.nan,
            "thirds_chunks": third,
            "thirds_ratio": t_last / t_first if t_first else math.nan,
            "per_round_ratio": [
                median(c[key] for c in f[-edge:]) / median(c[key] for c in f[:edge])
                if median(c[key] for c in f[:edge])
                else math.nan
                for f in full
            ],
        }
    # None: too few chunks to say
    out["flat"] = out["wall"]["ratio"] <= FLAT_OK if edge == EDGE_CHUNKS else None
    return out


def pooled(rounds: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """Wake results of every round together."""
    lat = [x for r in rounds for x in r[key]["latencies_ms"]]
    return {
        "asked": sum(r[key]["asked"] for r in rounds),
        "correct": sum(r[key]["correct"] for r in rounds),
        "wrong": sum(r[key]["wrong"] for r in rounds),
        "missing": sum(r[key]["missing"] for r in rounds),
        "p50_ms": percentile(lat, 0.50),
        "p90_ms": percentile(lat, 0.90),
        "p99_ms": percentile(lat, 0.99),
        "max_ms": max(lat, default=0.0),
    }


def summarize(rounds: Sequence[dict[str, Any]], chunk: int) -> dict[str, Any]:
    first = rounds[0]
    rss_full = median(r["container_rss"]["full"] for r in rounds)
    rss_base = median(r["container_rss"]["before"] for r in rounds)
    return {
        "rounds": len(rounds),
        "target": first["plan"]["wanted"],
        "n": first["plan"]["n"],
        "parked_min": min(r["parked"] for r in rounds),
        "stopped_by": first["plan"]["stopped_by"],
        "overflow_refused": dict(
            sum((Counter(r["overflow"]["refused"]) for r in rounds if r["overflow"]), Counter())
        ),
        "overflow_parked": sum(r["overflow"]["parked"] for r in rounds if r["overflow"]),
        "farm_connect_s": median(r["farm_connect_s"] or 0.0 for r in rounds),
        "park_seconds": median(r["park_seconds"] for r in rounds),
        "per_park_us_mean": median(
            r["park_seconds_sum_of_chunks"] / max(1, r["parked"]) * 1e6 for r in rounds
        ),
        "flatness": flatness([r["chunks"] for r in rounds], chunk),
        "container_rss_empty": rss_base,
        "container_rss_full": rss_full,
        "container_rss_per_connection": median(
            r["container_rss"]["per_connection"] for r in rounds
        ),
        "burst": pooled(rounds, "burst"),
        "burst_write_spread_ms": median(r["burst"]["write_spread_ms"] for r in rounds),
        "singles": pooled(rounds, "singles"),
        "container_wake_latency_p50_ms": [
            r["container_stats"]["wake_latency"]["p50_ms"] for r in rounds
        ],
        "unexpected_wakes": dict(sum((Counter(r["unexpected_wakes"]) for r in rounds), Counter())),
        "problems": [p for r in rounds for p in r["problems"]][:50],
        "run_seconds": [r.get("run_seconds") for r in rounds],
    }


def report(rounds: Sequence[dict[str, Any]], chunk: int) -> dict[str, Any]:
    s = summarize(rounds, chunk)
    length = max(len(r["chunks"]) for r in rounds)
    multi = len(rounds) > 1

    def col(i: int, key: str, scale: float = 1.0) -> list[float]:
        return [r["chunks"][i][key] * scale for r in rounds if i < len(r["chunks"])]

    rows = []
    for i in range(length):
        wall = col(i, "per_park_us")
        rows.append(
            [
                i + 1,
                rounds[0]["chunks"][i]["parked_total"] if i < len(rounds[0]["chunks"]) else "",
                median(col(i, "accept_s", 1e3)),
                median(col(i, "park_s", 1e3)),
                *([" ".join(f"{x:.0f}" for x in wall)] if multi else []),
                median(wall),
                median(col(i, "container_cpu_us_per_park")),
                median(col(i, "worker_cpu_us_per_park")),
                median(col(i, "container_rss", 1 / MIB)),
            ]
        )
    print_table(
        "cost per park as the container fills (chunk timed from its first accept to its last "
        "PARKED; CPU = container / worker CPU time per park)"
        + (f"; medians over {len(rounds)} rounds" if multi else ""),
        [
            "chunk",
            "parked",
            "accept ms",
            "park ms",
            *(["us/park by round"] if multi else []),
            "us/park",
            "ctr CPU us",
            "wkr CPU us",
            "RSS MiB",
        ],
        rows,
    )
    f = s["flatness"]
    b, g = s["burst"], s["singles"]
    print(f"\nsummary{f' ({len(rounds)} rounds: medians, wakes pooled)' if multi else ''}")
    print(f"  parked            {s['parked_min']:,} of {s['n']:,} (target {s['target']:,})")
    print(f"  stopped by        {s['stopped_by']}")
    if any(r["overflow"] for r in rounds):
        print(
            f"  past the budget   {OVERFLOW_ATTEMPTS} more parks per round: refused "
            f"{s['overflow_refused']}, parked {s['overflow_parked']}"
        )
    print(f"  farm connect      {s['farm_connect_s']:.1f} s (not part of the park time)")
    print(
        f"  time to park      {s['park_seconds']:.2f} s from first accept to last PARKED "
        f"({s['per_park_us_mean']:.1f} us per park on average)"
    )
    for name, label in (("wall", "per park (wall)"), ("container_cpu", "container CPU")):
        x = f[name]
        rr = ", ".join(f"{v:.2f}" for v in x["per_round_ratio"])
        print(
            f"  {label:<17} first {f['edge_chunks']} chunks {x['first_us']:.1f} us, last "
            f"{f['edge_chunks']} {x['last_us']:.1f} us: ratio {x['ratio']:.2f}"
            + (f" (by round: {rr})" if multi else "")
            + f"; last/first {x['thirds_chunks']} chunks {x['thirds_ratio']:.2f}"
        )
    verdict = {True: "yes", False: "NO", None: f"n/a (under {2 * EDGE_CHUNKS} full chunks)"}
    print(
        f"  flat?             {verdict[f['flat']]} (wall ratio <= {FLAT_OK}; a ratio "
        "below 1 is warm-up in the first chunks)"
    )
    print(
        f"  container RSS     {s['container_rss_empty'] / MIB:.1f} MiB empty, "
        f"{s['container_rss_full'] / MIB:.1f} MiB full "
        f"({s['container_rss_per_connection']:.0f} B per parked connection)"
    )
    print(
        f"  burst wake        {b['correct']}/{b['asked']} correct, {b['wrong']} wrong, "
        f"{b['missing']} missing; client write -> Woken here p50 {b['p50_ms']:.2f} ms, "
        f"p99 {b['p99_ms']:.2f} ms, max {b['max_ms']:.2f} ms (the farm's writes spread over "
        f"{s['burst_write_spread_ms']:.2f} ms)"
    )
    print(
        f"  single wakes      {g['correct']}/{g['asked']} correct; p50 {g['p50_ms']:.2f} ms, "
        f"p99 {g['p99_ms']:.2f} ms"
    )
    print(
        "  container stats   wake latency (readiness -> fd written) p50 "
        + ", ".join(f"{x:.3f}" for x in s["container_wake_latency_p50_ms"])
        + " ms; parked at the end "
        + ", ".join(f"{r['container_stats']['parked']:,}" for r in rounds)
    )
    km = rounds[-1]["kernel_memory"]
    slab = (km["parked"].get("slab_kib", 0) - km["before"].get("slab_kib", 0)) * 1024
    if slab > 0 and rounds[-1]["parked"] >= 1000:
        print(
            f"  kernel slab       +{slab / MIB:.1f} MiB machine-wide while connecting and "
            f"parking ({slab / max(1, rounds[-1]['parked']):.0f} B per connection, both ends; "
            "other processes count too)"
        )
    if s["unexpected_wakes"]:
        print(f"  unexpected wakes  {s['unexpected_wakes']}")
    for p in s["problems"][:10]:
        print(f"  PROBLEM           {p}")
    s["ok"] = (
        s["parked_min"] == s["n"]
        and b["correct"] == b["asked"]
        and g["correct"] == g["asked"]
        and not s["unexpected_wakes"]
    )
    return s


def plot(rounds: Sequence[dict[str, Any]], s: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install 'connpark[bench]')")
        return None
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    for k, r in enumerate(rounds):
        xs = [c["parked_total"] for c in r["chunks"]]
        first = k == 0
        ax1.plot(
            xs,
            [c["per_park_us"] for c in r["chunks"]],
            "o-",
            color="tab:blue",
            alpha=0.8,
            label="wall: accept + park" if first else None,
        )
        ax1.plot(
            xs,
            [c["worker_cpu_us_per_park"] for c in r["chunks"]],
            "^:",
            color="tab:orange",
            alpha=0.8,
            label="worker CPU" if first else None,
        )
        ax1.plot(
            xs,
            [c["container_cpu_us_per_park"] for c in r["chunks"]],
            "s--",
            color="tab:red",
            alpha=0.8,
            label="container CPU" if first else None,
        )
        ax2.plot(xs, [c["container_rss"] / MIB for c in r["chunks"]], "o-", color="tab:green")
    ax1.set_ylabel("µs per park")
    ax1.set_ylim(bottom=0)
    ax1.set_title(
        f"Parking {s['parked_min']:,} connections in one container"
        + (f" ({len(rounds)} rounds)" if len(rounds) > 1 else "")
        + f"\nlast/first per-park cost {s['flatness']['wall']['ratio']:.2f}"
    )
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.set_ylabel("container RSS (MiB)")
    ax2.set_xlabel("connections parked")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "scale.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--target", help="connections to park, or 'max' (the container's fd budget; default)"
    )
    p.add_argument(
        "--quick", action="store_true", help="~5 s: one round (not 3), 20 single wakes (not 50)"
    )
    p.add_argument(
        "--tiny", action="store_true", help="~1 s: target 300, chunks of 100, one round, no plot"
    )
    p.add_argument("--chunk", type=int, help="parks timed together (default 1000; tiny 100)")
    p.add_argument("--wake-frac", type=float, default=0.01, help="share woken at once (0.01)")
    p.add_argument("--singles", type=int, help="sequential single wakes (default 50)")
    p.add_argument("--repeat", type=int, help="rounds, each filling a fresh container (3)")
    p.add_argument("--seed", type=int, default=1, help="which clients are woken")
    p.add_argument(
        "--source-base", type=int, default=100, help="farm source addresses from 127.0.0.N (100)"
    )
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.target is None:
        args.target = "300" if args.tiny else "max"
    if args.target != "max" and not (args.target.isdigit() and int(args.target) > 0):
        p.error("--target takes a positive number or 'max'")
    if args.chunk is None:
        args.chunk = 100 if args.tiny else 1000
    if args.chunk < 1:
        p.error("--chunk must be positive")
    if args.singles is None:
        args.singles = 10 if args.tiny else 20 if args.quick else 50
    if args.repeat is None:
        args.repeat = 1 if args.tiny or args.quick else 3
    if not 1 <= args.repeat <= 20:
        p.error("--repeat takes 1..20")
    if not 0 < args.wake_frac <= 1:
        p.error("--wake-frac takes 0..1")
    if not 2 <= args.source_base <= 254:
        p.error("--source-base takes 2..254")
    if args.tiny:
        args.no_plot = True
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t = time.perf_counter()
    rounds = []
    for k in range(args.repeat):
        if args.repeat > 1:
            print(f"-- round {k + 1} of {args.repeat}")
        t_round = time.perf_counter()
        r = trio.run(bench, args)
        r["run_seconds"] = time.perf_counter() - t_round
        rounds.append(r)
        args.seed += 1
    summary = report(rounds, args.chunk)
    summary["run_seconds_total"] = time.perf_counter() - t
    write_json("scale", {"summary": summary, "rounds": rounds, "args": vars(args)})
    if not args.no_plot:
        plot(rounds, summary)
    print(f"run time {summary['run_seconds_total']:.1f} s; {'OK' if summary['ok'] else 'FAILED'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
