#!/usr/bin/env python3
"""Wake latency: a client's write -> the woken socket in the worker's hands.

Two contenders, measured in the same run and alternating, each holding its own
N client connections at the same time (two farms of N clients in other
processes, over 127.x.y.z source addresses):

- connpark: a real ``connpark serve`` container; this process is its trio
  worker. Every connection is parked with token = its client index. A wake is
  timed when its ``Woken`` comes out of ``parking.wakes()``; then its bytes are
  read and checked and it is parked again (same token), so N stays constant.
- raw epoll: the floor for the same job in Python. A minimal loop in a child
  process (``--baseline-child``) holds the same number of fds in one epoll
  (EPOLLIN|EPOLLRDHUP|EPOLLONESHOT) and passes each ready fd back with
  ``socket.send_fds`` (the ready fds of one poll round batched, up to 253 per
  message), the client index as data. This process receives them
  (non-blocking ``recv_fds`` under ``trio.lowlevel.wait_readable``), times,
  reads, checks, and sends them back to be re-armed.

Modes: single wakes (one random client at a time, sequentially) and bursts
(K random distinct clients written at once by one ``Farm.send``; first write
-> last fd in the worker's hands, plus per-connection p50/p99 within the
burst). Every process stamps with ``time.monotonic_ns`` (CLOCK_MONOTONIC is
system-wide on Linux).

Targets (from the issue): single-wake p50 at 10k parked within 2.5x of raw
epoll; a burst of 1,000 delivered within 1.5x of raw epoll's time.

Burst columns besides the times: "writes took" is the farm's own first ->
last write (a floor for "total"), "tail" is last write -> last socket in
hand, and "cpu" is CPU time per wake (/proc/PID/schedstat) of this worker
and of the far side (the container, or the baseline child). The farm's
writes are ordered without a thread and their times collected after the
wakes are in, so during a round this process runs nothing but the wake path.

    python benchmarks/bench_latency.py [--sizes 1000,10000,max] [--samples 200]
        [--bursts 3] [--burst-size 1000] [--quick] [--tiny] [--no-plot]
"""

from __future__ import annotations

import argparse
import array
import math
import os
import random
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
from _common import (
    PER_PROCESS,
    Container,
    Farm,
    expected_payload,
    median,
    percentile,
    plot_bars,
    print_table,
    raise_nofile,
    write_json,
)

import connpark
from connpark._stats_client import fetch_stats

SINGLE_P50_MAX_RATIO = 2.5  # at 10k parked
SINGLE_TARGET_N = 10_000
BURST_MAX_RATIO = 1.5
MAX_MARGIN = 100  # "max" = the container's fd budget less this
CHUNK = 1000  # sockets accepted/identified/parked per step: the worker holds at most ~this
ROUND = 50  # single-wake samples per contender turn
WARMUP = 10  # unrecorded single wakes per contender before measuring
IDLE_TIMEOUT = 24 * 3600.0  # nothing may time out mid-run
UNKNOWN = 0xFFFFFFFF  # index of a connection not identified yet
MAX_FDS = 253  # SCM_MAX_FD
ROUND_TIMEOUT = 60.0  # seconds for any single round of wakes
CPU_SETTLE = 0.02  # seconds after a burst before reading the far side's CPU time
CONNPARK = "connpark"
RAW = "raw epoll"
CONTENDERS = (CONNPARK, RAW)

Arrival = tuple[int, int, Any]  # (t_ns in the worker's hands, client index or UNKNOWN, handle)


# -- the raw-epoll baseline, in its own process --------------------------------------------


def baseline_child(path: str) -> int:
    """The baseline: hold fds in one epoll, pass each back (index as data) when ready.

    Control messages on the SOCK_SEQPACKET socket, from the worker: fds with
    their indices (uint32 each) to arm; b"S" (answered b"S" + held count,
    after everything before it); b"Q" or EOF to quit.
    """
    raise_nofile()
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ctl.connect(path)
    ctl.setblocking(False)
    ctl_fd = ctl.fileno()
    ep = select.epoll()
    ep.register(ctl_fd, select.EPOLLIN)
    mask = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
    index_of: dict[int, int] = {}
    cloexec = getattr(socket, "MSG_CMSG_CLOEXEC", 0)

    def send(data: bytes, fds: Sequence[int]) -> None:
        for _ in range(600):
            try:
                socket.send_fds(ctl, [data], fds)
                return
            except BlockingIOError:
                select.select([], [ctl_fd], [], 0.1)
        raise RuntimeError("baseline: the worker stopped reading")

    running = True
    try:
        while running:
            events = ep.poll(-1, 4096)
            ready_fds: list[int] = []
            ready_idx: list[int] = []
            for fd, _ev in events:
                if fd != ctl_fd:
                    idx = index_of.pop(fd, None)
                    if idx is None:
                        continue
                    ep.unregister(fd)  # epoll keys on the open file: never close a registered fd
                    ready_fds.append(fd)
                    ready_idx.append(idx)
                    continue
                while running:  # drain the control socket
                    try:
                        data, fds, flags, _ = socket.recv_fds(
                            ctl, 4 * MAX_FDS + 64, MAX_FDS, cloexec
                        )
                    except BlockingIOError:
                        break
                    if flags & socket.MSG_CTRUNC:
                        raise RuntimeError("baseline: MSG_CTRUNC, fds dropped")
                    if not fds:
                        if data == b"S":
                            send(b"S" + struct.pack("I", len(index_of)), [])
                        elif data in (b"Q", b""):
                            running = False
                        else:
                            raise RuntimeError(f"baseline: bad control message {data!r}")
                        continue
                    idxs = array.array("I")
                    idxs.frombytes(data)
                    if len(idxs) != len(fds):
                        raise RuntimeError("baseline: fds and indices do not match")
                    for f, i in zip(fds, idxs, strict=True):
                        ep.register(f, mask)
                        index_of[f] = i
            try:
                for k in range(0, len(ready_fds), MAX_FDS):
                    send(
                        array.array("I", ready_idx[k : k + MAX_FDS]).tobytes(),
                        ready_fds[k : k + MAX_FDS],
                    )
            except (BrokenPipeError, ConnectionResetError):
                running = False  # the worker is gone: nobody to hand anything to
            for f in ready_fds:
                os.close(f)
    finally:
        for f in index_of:
            os.close(f)
        ep.close()
        ctl.close()
    return 0


# -- contenders, as the worker sees them ---------------------------------------------------


class Contender:
    """Collects arrivals (timestamped on receipt) and takes sockets back."""

    name = ""
    far_pid = 0  #: the process on the other side: the container, or the baseline child

    def __init__(self) -> None:
        self._arrivals: list[Arrival] = []
        self._expected = 0
        self._done = trio.Event()

    def begin(self, count: int) -> None:
        if self._arrivals:
            raise RuntimeError(f"{self.name}: {len(self._arrivals)} unexpected wakes")
        self._expected = count
        self._done = trio.Event()

    async def wait(self) -> list[Arrival]:
        try:
            with trio.fail_after(ROUND_TIMEOUT):
                await self._done.wait()
        except trio.TooSlowError:
            raise RuntimeError(
                f"{self.name}: {len(self._arrivals)} of {self._expected} wakes in {ROUND_TIMEOUT}s"
            ) from None
        out, self._arrivals, self._expected = self._arrivals, [], 0
        return out

    def _arrived(self, t: int, idx: int, handle: Any) -> None:
        self._arrivals.append((t, idx, handle))
        if len(self._arrivals) >= self._expected:
            self._done.set()

    def socket_of(self, handle: Any) -> socket.socket:
        raise NotImplementedError

    async def put(self, items: Sequence[tuple[int, socket.socket]]) -> None:
        """Hand these (index, socket) back to be watched; our copies get closed."""
        raise NotImplementedError

    async def held(self) -> int:
        """How many connections the far side holds, once everything sent before is in."""
        raise NotImplementedError

    async def collect(self) -> None:
        raise NotImplementedError


class ConnparkContender(Contender):
    name = CONNPARK

    def __init__(self, parking: connpark.Parking, far_pid: int) -> None:
        super().__init__()
        self.parking = parking
        self.far_pid = far_pid

    async def collect(self) -> None:
        wakes = self.parking.wakes()
        while True:
            try:
                woken = await wakes.receive()
            except trio.EndOfChannel:
                return
            self._take(time.monotonic_ns(), woken)
            while True:  # everything already in the channel is in our hands too
                try:
                    woken = wakes.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                self._take(time.monotonic_ns(), woken)

    def _take(self, t: int, woken: connpark.Woken[Any]) -> None:
        if woken.socket is None or woken.reason is not connpark.Reason.READABLE:
            raise RuntimeError(f"connpark: unexpected wake {woken.reason.name} {woken.token!r}")
        self._arrived(t, int(woken.token) if woken.token else UNKNOWN, woken)

    def socket_of(self, handle: Any) -> socket.socket:
        sock = handle.socket
        if isinstance(sock, socket.socket):
            return sock
        return socket.socket(fileno=sock.detach())

    async def _park(self, idx: int, sock: socket.socket) -> None:
        token = b"" if idx == UNKNOWN else str(idx).encode()
        try:
            await self.parking.park(sock, token=token, idle_timeout=IDLE_TIMEOUT)
        except connpark.ParkRefused as exc:
            sock.close()
            raise RuntimeError(f"park refused: {exc}") from exc

    async def put(self, items: Sequence[tuple[int, socket.socket]]) -> None:
        if len(items) == 1:
            await self._park(*items[0])
            return
        async with trio.open_nursery() as nursery:  # concurrent parks: batched by the hook
            for idx, sock in items:
                nursery.start_soon(self._park, idx, sock)

    async def held(self) -> int:
        return (await self.parking.stats()).parked


class RawEpollContender(Contender):
    name = RAW

    def __init__(self, sock: socket.socket, far_pid: int) -> None:
        super().__init__()
        sock.setblocking(False)
        self.sock = sock
        self.far_pid = far_pid
        self._synced = trio.Event()
        self._held = -1

    async def _send(self, data: bytes, fds: Sequence[int]) -> None:
        for _ in range(10_000):
            try:
                socket.send_fds(self.sock, [data], fds)
                return
            except BlockingIOError:
                with trio.fail_after(ROUND_TIMEOUT):
                    await trio.lowlevel.wait_writable(self.sock)
        raise RuntimeError("raw epoll: control socket stuck")

    async def collect(self) -> None:
        cloexec = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, 4 * MAX_FDS + 64, MAX_FDS, cloexec)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            t = time.monotonic_ns()
            if flags & socket.MSG_CTRUNC:
                for f in fds:
                    os.close(f)
                raise RuntimeError("raw epoll: MSG_CTRUNC, fds dropped")
            if not fds:
                if data[:1] != b"S":
                    raise RuntimeError(f"raw epoll: the baseline process ended ({data!r})")
                (self._held,) = struct.unpack("I", data[1:5])
                self._synced.set()
                continue
            idxs = array.array("I")
            idxs.frombytes(data)
            for idx, fd in zip(idxs, fds, strict=True):
                self._arrived(t, idx, fd)

    def socket_of(self, handle: Any) -> socket.socket:
        return socket.socket(fileno=handle)

    async def put(self, items: Sequence[tuple[int, socket.socket]]) -> None:
        try:
            for k in range(0, len(items), MAX_FDS):
                chunk = items[k : k + MAX_FDS]
                data = array.array("I", [idx for idx, _ in chunk]).tobytes()
                await self._send(data, [s.fileno() for _, s in chunk])
        finally:
            for _, s in items:
                s.close()  # the baseline has its own copies now (in flight or received)
        await self.held()  # re-armed before we go on, as connpark's PARKED says

    async def held(self) -> int:
        """A round trip that returns once everything sent before is armed."""
        self._synced = trio.Event()
        await self._send(b"S", [])
        with trio.fail_after(ROUND_TIMEOUT):
            await self._synced.wait()
        return self._held


class Baseline:
    """The baseline child process and this side of its control socket."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="cpl-")
        path = str(Path(self._dir.name) / "raw.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(path)
            listener.listen(1)
            listener.settimeout(30)
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--baseline-child", path]
            )
            try:
                self.sock, _ = listener.accept()
            except BaseException:
                self.stop()
                raise
        finally:
            listener.close()

    def stop(self) -> None:
        sock = getattr(self, "sock", None)
        if sock is not None:
            try:
                sock.settimeout(5)
                sock.send(b"Q")
            except OSError:
                pass
            sock.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._dir.cleanup()


# -- client farms --------------------------------------------------------------------------


class SourceFarm(Farm):
    """A ``Farm`` whose processes each get their own source address, ``127.{a}.{b}.{k+1}``.

    Outside 127.0.0.x (where ``Farm(source_base=)`` puts them), with ``a``
    drawn per run: our two farms, earlier runs' TIME_WAITs and other
    benchmarks running at the same time never compete for one address's
    ephemeral ports.
    """

    def __init__(
        self, addr: tuple[str, int], n: int, a: int, b: int, per_process: int = PER_PROCESS
    ) -> None:
        processes = -(-n // per_process)
        sources = [f"127.{a}.{b}.{k + 1}" for k in range(processes)]
        super().__init__(addr, n, per_process, sources=sources)
        #: Whether a client writes its index within its farm process (older _farm.py)
        #: or its global index (what ``expected_payload`` assumes); seen during
        #: identification on a process other than the first. None: not seen.
        self.writes_local: bool | None = None

    def first_of(self, idx: int) -> int:
        """The global index of the first client in ``idx``'s farm process."""
        for _, first, count in self.procs:
            if first <= idx < first + count:
                return first
        raise IndexError(f"no client {idx} in the farm")

    def expected(self, payload: str, idx: int) -> bytes:
        """What client ``idx`` writes on ``send(..., payload)``."""
        return expected_payload(payload, idx - self.first_of(idx) if self.writes_local else idx)

    def identified(self, value: int, writes: dict[int, int]) -> int:
        """Which client of this round wrote ``value`` as its index."""
        first = self.first_of(min(writes))
        if value in writes and not (first and self.writes_local):
            if first:
                self.writes_local = False
            return value
        if first and first + value in writes and self.writes_local is not False:
            self.writes_local = True
            return first + value
        raise RuntimeError(f"identification: index {value} was not written this round")


async def connect_farm(
    contender: Contender, n: int, a: int, b: int, farms: list[Farm]
) -> tuple[SourceFarm, float]:
    """N clients connected, accepted and handed to ``contender`` (index unknown yet)."""
    t0 = time.perf_counter()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    addr = listener.getsockname()
    box: list[SourceFarm] = []

    def build() -> None:
        farm = SourceFarm(addr, n, a, b)
        farms.append(farm)  # closed by the caller's finally, whatever happens here
        box.append(farm)

    async def accept_all() -> None:
        accepted = 0
        while accepted < n:
            batch: list[tuple[int, socket.socket]] = []
            while len(batch) < CHUNK and accepted + len(batch) < n:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    if batch:
                        break
                    await trio.lowlevel.wait_readable(listener)
                    continue
                batch.append((UNKNOWN, conn))
            await contender.put(batch)
            accepted += len(batch)

    try:
        with trio.fail_after(60 + n / 200):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept_all)
                await trio.to_thread.run_sync(build, abandon_on_cancel=True)
    finally:
        trio.lowlevel.notify_closing(listener)
        listener.close()
    held = await contender.held()
    if held != n:
        raise RuntimeError(f"{contender.name}: holds {held} connections, expected {n}")
    return box[0], time.perf_counter() - t0


# -- rounds --------------------------------------------------------------------------------


def cpu_ns(pid: int | str) -> int:
    """Time a process's main thread has spent on a CPU, in ns (/proc/PID/schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def read_line(sock: socket.socket) -> bytes:
    """The bytes a woken client sent (one short line, normally already there)."""
    sock.setblocking(False)
    data = b""
    deadline = time.monotonic() + 5
    while not data.endswith(b"\n"):
        try:
            chunk = sock.recv(4096)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no full line from a woken client: {data!r}") from None
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            poller.poll(50)
            continue
        if not chunk:
            raise RuntimeError(f"EOF from a woken client after {data!r}")
        data += chunk
    return data


def send_start(farm: Farm, indices: Sequence[int], payload: str) -> list[int]:
    """``Farm.send``'s first half: order the writes, do not wait for the answer.

    A command line is far smaller than a pipe buffer, so this never blocks;
    the answers (write times) are read by ``send_finish`` once the wakes are
    in, so nothing but the wake path runs in this process meanwhile: no
    thread, no GIL hand-over, no extra wake-up of this process.
    """
    by_proc: dict[int, list[int]] = {}
    for i in indices:
        for k, (_, first, count) in enumerate(farm.procs):
            if first <= i < first + count:
                by_proc.setdefault(k, []).append(i - first)
                break
        else:
            raise IndexError(f"no client {i} in the farm")
    for k, local in by_proc.items():
        stdin = farm.procs[k][0].stdin
        assert stdin is not None
        stdin.write(f"send {payload} {','.join(map(str, local))}\n")
        stdin.flush()
    return list(by_proc)


def send_finish(farm: Farm, started: list[int]) -> dict[int, int]:
    """``Farm.send``'s second half: {index: time.monotonic_ns() of its write}."""
    out: dict[int, int] = {}
    for k in started:
        proc, first, _ = farm.procs[k]
        reply = farm._read(proc).split()
        if not reply or reply[0] != "sent":
            raise RuntimeError(f"farm: {reply!r}")
        for pair in reply[1:]:
            i, t = pair.split(":")
            out[first + int(i)] = int(t)
    return out


async def wake_round(
    c: Contender, farm: Farm, indices: Sequence[int], payload: str
) -> tuple[dict[int, int], list[Arrival]]:
    """Write on these clients; wait for all of them to come back to us."""
    c.begin(len(indices))
    started = send_start(farm, indices, payload)
    arrivals = await c.wait()
    return send_finish(farm, started), arrivals


async def settle(
    c: Contender,
    farm: SourceFarm,
    writes: dict[int, int],
    arrivals: list[Arrival],
    payload: str,
    identify: bool = False,
) -> dict[int, int]:
    """Read and check every woken connection, hand it back; {index: latency ns}."""
    items: list[tuple[int, socket.socket]] = []
    latency: dict[int, int] = {}
    try:
        for t, idx, handle in arrivals:
            sock = c.socket_of(handle)
            data = read_line(sock)
            if identify:
                prefix = payload.encode()
                if not data.startswith(prefix) or not data[len(prefix) : -1].isdigit():
                    raise RuntimeError(f"{c.name}: bad identification line {data!r}")
                idx = farm.identified(int(data[len(prefix) : -1]), writes)
            items.append((idx, sock))
            if idx not in writes or idx in latency:
                raise RuntimeError(f"{c.name}: unexpected or duplicate wake of client {idx}")
            if data != farm.expected(payload, idx):
                raise RuntimeError(f"{c.name}: client {idx} sent {data!r}, expected another line")
            latency[idx] = t - writes[idx]
        if len(latency) != len(writes):
            raise RuntimeError(f"{c.name}: {len(writes) - len(latency)} clients never woke")
    except BaseException:
        for _, s in items:
            s.close()
        raise
    await c.put(items)
    return latency


async def identify_all(c: Contender, farm: SourceFarm) -> None:
    """Each client writes its index once; re-park its connection with token = index.

    Rounds never straddle two farm processes (see ``SourceFarm.identified``).
    """
    for _, first, count in farm.procs:
        for start in range(first, first + count, CHUNK):
            indices = list(range(start, min(first + count, start + CHUNK)))
            writes, arrivals = await wake_round(c, farm, indices, "id")
            await settle(c, farm, writes, arrivals, "id", identify=True)


class Sampler:
    """Random client choice (never the last one woken) and unique payloads."""

    def __init__(self, rng: random.Random, n: int) -> None:
        self.rng = rng
        self.n = n
        self.seq = 0
        self.last = -1

    def payload(self, kind: str) -> str:
        self.seq += 1
        return f"{kind}{self.seq}x"

    def one(self) -> int:
        for _ in range(100):
            i = self.rng.randrange(self.n)
            if i != self.last:
                break
        self.last = i
        return i


async def single(c: Contender, farm: SourceFarm, sampler: Sampler) -> int:
    i = sampler.one()
    payload = sampler.payload("s")
    writes, arrivals = await wake_round(c, farm, [i], payload)
    return (await settle(c, farm, writes, arrivals, payload))[i]


async def burst(c: Contender, farm: SourceFarm, sampler: Sampler, k: int) -> dict[str, Any]:
    indices = sampler.rng.sample(range(sampler.n), k)
    payload = sampler.payload("b")
    farm_pids = [proc.pid for proc, _, _ in farm.procs]
    cpu0 = cpu_ns("self"), cpu_ns(c.far_pid), sum(cpu_ns(p) for p in farm_pids)
    writes, arrivals = await wake_round(c, farm, indices, payload)
    worker_cpu = cpu_ns("self") - cpu0[0]
    first_write = min(writes.values())
    last_in_hand = max(t for t, _, _ in arrivals)
    await trio.sleep(CPU_SETTLE)  # let the far side finish (ACKs, closes) before reading its CPU
    far_cpu = cpu_ns(c.far_pid) - cpu0[1]
    farm_cpu = sum(cpu_ns(p) for p in farm_pids) - cpu0[2]
    latency = list((await settle(c, farm, writes, arrivals, payload)).values())
    return {
        "total_ms": (last_in_hand - first_write) / 1e6,
        "write_span_ms": (max(writes.values()) - first_write) / 1e6,
        "tail_ms": (last_in_hand - max(writes.values())) / 1e6,  # last write -> last in hand
        "p50_ms": percentile(latency, 0.50) / 1e6,
        "p99_ms": percentile(latency, 0.99) / 1e6,
        "max_ms": max(latency) / 1e6,
        # CPU time spent on the burst: this worker until the last socket was in hand; the far
        # side (container / baseline child) and the farm until CPU_SETTLE after that.
        "cpu_ms": {"worker": worker_cpu / 1e6, "far side": far_cpu / 1e6, "farm": farm_cpu / 1e6},
    }


def summarize_us(ns: Sequence[int]) -> dict[str, Any]:
    us = [x / 1000 for x in ns]
    return {
        "count": len(us),
        "p50_us": percentile(us, 0.50),
        "p99_us": percentile(us, 0.99),
        "max_us": max(us) if us else 0.0,
        "min_us": min(us) if us else 0.0,
        "mean_us": sum(us) / len(us) if us else 0.0,
        "samples_us": [round(x, 1) for x in us],
    }


# -- one size ------------------------------------------------------------------------------


async def measure_size(
    container: Container,
    baseline: Baseline,
    n: int,
    label: str,
    budget: int,
    args: argparse.Namespace,
    rng: random.Random,
    hosts: tuple[int, int],
    farms: list[Farm],
) -> dict[str, Any]:
    """Set up N on both sides, then alternate: warm-up, single wakes, bursts."""
    async with connpark.open_parking(str(container.path), pool="bench-latency") as parking:
        print(f"\n== N = {label}: connecting 2 x {n:,} clients", flush=True)
        cp = ConnparkContender(parking, container.pid)
        raw = RawEpollContender(baseline.sock, baseline.proc.pid)
        contenders: dict[str, Contender] = {CONNPARK: cp, RAW: raw}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cp.collect)
            nursery.start_soon(raw.collect)
            farm_of: dict[str, SourceFarm] = {}
            setup: dict[str, float] = {}
            for j, name in enumerate(CONTENDERS):
                c = contenders[name]
                farm_of[name], connect_s = await connect_farm(c, n, hosts[0], hosts[1] + j, farms)
                t = time.perf_counter()
                await identify_all(c, farm_of[name])
                setup[name] = connect_s + time.perf_counter() - t
                print(
                    f"   {name}: {n:,} connected, parked, identified in {setup[name]:.1f}s",
                    flush=True,
                )
            sampler = Sampler(rng, n)
            for name in CONTENDERS:
                for _ in range(min(WARMUP, args.samples)):
                    await single(contenders[name], farm_of[name], sampler)

            t = time.perf_counter()
            singles: dict[str, list[int]] = {name: [] for name in CONTENDERS}
            turns = math.ceil(args.samples / ROUND)
            for turn in range(turns):
                order = CONTENDERS if turn % 2 == 0 else CONTENDERS[::-1]
                for name in order:
                    todo = min(ROUND, args.samples - len(singles[name]))
                    for _ in range(todo):
                        lat = await single(contenders[name], farm_of[name], sampler)
                        singles[name].append(lat)
            single_s = time.perf_counter() - t

            t = time.perf_counter()
            k = min(args.burst_size, n)
            bursts: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
            for rep in range(args.bursts):
                order = CONTENDERS if rep % 2 == 0 else CONTENDERS[::-1]
                for name in order:
                    r = await burst(contenders[name], farm_of[name], sampler, k)
                    bursts[name].append(r)
            burst_s = time.perf_counter() - t

            for name in CONTENDERS:  # N constant to the end
                held = await contenders[name].held()
                if held != n:
                    raise RuntimeError(f"{name}: holds {held} at the end, expected {n}")
            stats = await parking.stats()
            writes_local = {name: farm_of[name].writes_local for name in CONTENDERS}
            nursery.cancel_scope.cancel()

    single_summary = {name: summarize_us(singles[name]) for name in CONTENDERS}
    burst_summary: dict[str, Any] = {"size": k}
    for name in CONTENDERS:
        rs = bursts[name]
        burst_summary[name] = {
            "bursts": rs,
            "total_ms_median": median(r["total_ms"] for r in rs) if rs else 0.0,
            "p50_ms_median": median(r["p50_ms"] for r in rs) if rs else 0.0,
            "p99_ms_median": median(r["p99_ms"] for r in rs) if rs else 0.0,
            "max_ms": max((r["max_ms"] for r in rs), default=0.0),
            "write_span_ms_median": median(r["write_span_ms"] for r in rs) if rs else 0.0,
            "tail_ms_median": median(r["tail_ms"] for r in rs) if rs else 0.0,
            "cpu_us_per_wake_median": {
                side: median(r["cpu_ms"][side] for r in rs) * 1000 / k if rs else 0.0
                for side in ("worker", "far side", "farm")
            },
        }

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    return {
        "label": label,
        "n": n,
        "fd_budget": budget,
        "setup_s": setup,
        "farm_writes_local_index": writes_local,
        "single_s": single_s,
        "burst_s": burst_s,
        "single": {
            **single_summary,
            "ratio_p50": ratio(single_summary[CONNPARK]["p50_us"], single_summary[RAW]["p50_us"]),
            "ratio_p99": ratio(single_summary[CONNPARK]["p99_us"], single_summary[RAW]["p99_us"]),
        },
        "burst": {
            **burst_summary,
            "ratio_total": ratio(
                burst_summary[CONNPARK]["total_ms_median"], burst_summary[RAW]["total_ms_median"]
            ),
            "ratio_p50": ratio(
                burst_summary[CONNPARK]["p50_ms_median"], burst_summary[RAW]["p50_ms_median"]
            ),
        },
        "container_after": {
            "parked": stats.parked,
            "fds_held": stats.fds_held,
            "woken_total": dict(stats.woken_total),
            "wake_latency_recent": {
                "note": "container-internal: readiness seen -> written, last 4096 wakes",
                "p50_ms": stats.wake_latency.p50_ms,
                "p99_ms": stats.wake_latency.p99_ms,
                "max_ms": stats.wake_latency.max_ms,
            },
        },
    }


def run_size(
    requested: int | None, args: argparse.Namespace, rng: random.Random, hosts: tuple[int, int]
) -> dict[str, Any]:
    """Fresh container and baseline process for one N; both stopped whatever happens."""
    farms: list[Farm] = []
    container = Container()
    try:
        budget = fetch_stats(str(container.path)).fd_budget
        n = budget - MAX_MARGIN if requested is None else requested
        if not 2 <= n <= budget:
            raise SystemExit(f"cannot park {n} connections (the container's fd budget: {budget})")
        label = f"{n:,}" + (" (max)" if requested is None else "")
        baseline = Baseline()
        try:
            return trio.run(
                measure_size, container, baseline, n, label, budget, args, rng, hosts, farms
            )
        finally:
            baseline.stop()
    finally:
        try:
            container.stop()
        finally:
            # Clients last: closing them first would wake every parked connection (HANGUP).
            for farm in farms:
                farm.close()


# -- report --------------------------------------------------------------------------------


def targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    at = [r for r in results if r["n"] == SINGLE_TARGET_N]
    single_ratio = at[0]["single"]["ratio_p50"] if at else None
    per_size = {
        r["label"]: {
            "ratio": r["burst"]["ratio_total"],
            "burst_size": r["burst"]["size"],
            "met": r["burst"]["ratio_total"] is not None
            and r["burst"]["ratio_total"] <= BURST_MAX_RATIO,
        }
        for r in results
        if r["burst"][CONNPARK]["bursts"]
    }
    return {
        "single_p50": {
            "n": SINGLE_TARGET_N,
            "max_ratio": SINGLE_P50_MAX_RATIO,
            "ratio": single_ratio,
            "met": None if single_ratio is None else single_ratio <= SINGLE_P50_MAX_RATIO,
        },
        "burst_total": {
            "max_ratio": BURST_MAX_RATIO,
            "per_size": per_size,
            "met": all(v["met"] for v in per_size.values()) if per_size else None,
        },
    }


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers per N in ms, contenders "connpark" and "baseline" (run_all.py reads it)."""
    out: dict[str, Any] = {}
    for r in results:
        single, burst = r["single"], r["burst"]
        out[str(r["n"])] = {
            "label": r["label"],
            "single": {
                **{
                    key: {
                        "p50_ms": single[name]["p50_us"] / 1000,
                        "p99_ms": single[name]["p99_us"] / 1000,
                        "max_ms": single[name]["max_us"] / 1000,
                    }
                    for key, name in (("connpark", CONNPARK), ("baseline", RAW))
                },
                "ratio_p50": single["ratio_p50"],
                "ratio_p99": single["ratio_p99"],
            },
            "burst": {
                "size": burst["size"],
                **{
                    key: {
                        "total_ms": burst[name]["total_ms_median"],
                        "p50_ms": burst[name]["p50_ms_median"],
                        "p99_ms": burst[name]["p99_ms_median"],
                    }
                    for key, name in (("connpark", CONNPARK), ("baseline", RAW))
                },
                "ratio_total": burst["ratio_total"],
            },
        }
    return out


def verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "MISSED")


def report(results: list[dict[str, Any]], tgt: dict[str, Any]) -> None:
    rows = []
    for r in results:
        for name in CONTENDERS:
            s = r["single"][name]
            rows.append(
                [
                    r["label"],
                    name,
                    s["count"],
                    s["p50_us"],
                    s["p99_us"],
                    s["max_us"],
                    r["single"]["ratio_p50"] if name == CONNPARK else "",
                    r["single"]["ratio_p99"] if name == CONNPARK else "",
                ]
            )
    print_table(
        "single wakes: client write -> socket in the worker's hands (us)",
        ["N parked", "contender", "samples", "p50", "p99", "max", "p50 ratio", "p99 ratio"],
        rows,
    )
    rows = []
    for r in results:
        b = r["burst"]
        for name in CONTENDERS:
            s = b[name]
            rows.append(
                [
                    r["label"],
                    name,
                    f"{len(s['bursts'])} x {b['size']}",
                    s["total_ms_median"],
                    s["p50_ms_median"],
                    s["p99_ms_median"],
                    s["max_ms"],
                    s["write_span_ms_median"],
                    s["tail_ms_median"],
                    b["ratio_total"] if name == CONNPARK else "",
                    s["cpu_us_per_wake_median"]["worker"],
                    s["cpu_us_per_wake_median"]["far side"],
                ]
            )
    print_table(
        "bursts: first write -> last socket in the worker's hands (ms, medians over bursts);"
        " CPU us per wake",
        [
            "N parked",
            "contender",
            "bursts",
            "total",
            "p50",
            "p99",
            "max",
            "writes took",
            "tail",
            "ratio",
            "cpu worker",
            "cpu far side",
        ],
        rows,
    )
    s = tgt["single_p50"]
    ratio_txt = "n/a" if s["ratio"] is None else f"{s['ratio']:.3f}x"
    print(
        f"\ntarget: single-wake p50 at {s['n']:,} parked <= {s['max_ratio']}x raw epoll: "
        f"{ratio_txt} -> {verdict(s['met'])}"
    )
    b = tgt["burst_total"]
    for label, v in b["per_size"].items():
        ratio_txt = "n/a" if v["ratio"] is None else f"{v['ratio']:.3f}x"
        print(
            f"target: burst of {v['burst_size']:,} at {label} parked <= {b['max_ratio']}x "
            f"raw epoll: {ratio_txt} -> {verdict(v['met'])}"
        )


def plot(results: list[dict[str, Any]]) -> None:
    labels = [r["label"] for r in results]
    series: dict[str, Sequence[float]] = {}
    for name in CONTENDERS:
        series[f"{name} p50"] = [r["single"][name]["p50_us"] for r in results]
        series[f"{name} p99"] = [r["single"][name]["p99_us"] for r in results]
    plot_bars(
        "latency",
        "single-wake latency: client write -> socket in the worker's hands",
        labels,
        series,
        "microseconds (lower is better)",
    )
    series = {}
    for name in CONTENDERS:
        series[f"{name} total"] = [r["burst"][name]["total_ms_median"] for r in results]
        series[f"{name} p50"] = [r["burst"][name]["p50_ms_median"] for r in results]
    k = results[0]["burst"]["size"] if results else 0
    plot_bars(
        "latency_burst",
        f"bursts of {k:,}: first write -> last socket in hand (total), per-connection p50",
        labels,
        series,
        "milliseconds (lower is better)",
    )


def source_version() -> dict[str, Any]:
    """The commit measured, and whether src/ had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head, "src_dirty": bool(dirty)}


def parse_sizes(text: str) -> list[int | None]:
    """ "1000,10000,max" -> [1000, 10000, None] (None: the container's fd budget less a margin)."""
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "max":
            out.append(None)
        elif part:
            out.append(int(part.replace("_", "").replace("k", "000")))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,max", help="N parked, 'max': the fd budget")
    parser.add_argument("--samples", type=int, default=200, help="single wakes per contender per N")
    parser.add_argument("--bursts", type=int, default=3, help="bursts per contender per N")
    parser.add_argument("--burst-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="1k and 10k, fewer samples")
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for the test suite")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--baseline-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_child:
        return baseline_child(args.baseline_child)
    mode = "full"
    if args.quick:
        mode, args.sizes, args.samples, args.bursts = "quick", "1000,10000", 300, 3
    if args.tiny:
        mode, args.sizes, args.samples, args.bursts = "tiny", "100", 20, 1
        args.burst_size, args.no_plot = 50, True
    if args.samples < 1 or args.bursts < 0 or args.burst_size < 1:
        parser.error("--samples must be >= 1, --bursts >= 0, --burst-size >= 1")
    raise_nofile()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    sizes = parse_sizes(args.sizes)
    # Source addresses 127.{a}.{b}.x: fresh ones per run and per farm, so neither our
    # own earlier farms' TIME_WAITs nor other benchmarks' clients eat our ports.
    a = rng.randrange(100, 255)
    started = time.perf_counter()
    results = []
    for k, requested in enumerate(sizes):
        results.append(run_size(requested, args, rng, (a, 1 + 2 * k)))
        r = results[-1]
        print(
            f"   single p50: {CONNPARK} {r['single'][CONNPARK]['p50_us']:.0f} us, "
            f"{RAW} {r['single'][RAW]['p50_us']:.0f} us; burst total: "
            f"{CONNPARK} {r['burst'][CONNPARK]['total_ms_median']:.1f} ms, "
            f"{RAW} {r['burst'][RAW]['total_ms_median']:.1f} ms",
            flush=True,
        )
    elapsed = time.perf_counter() - started
    tgt = targets(results)
    report(results, tgt)
    print(f"\nrun time {elapsed:.1f}s (seed {seed})")
    write_json(
        "latency",
        {
            "mode": mode,
            "seed": seed,
            "source": source_version(),
            "sizes": args.sizes,
            "samples": args.samples,
            "bursts": args.bursts,
            "burst_size": args.burst_size,
            "run_seconds": elapsed,
            "what": "client write (farm, monotonic_ns) -> socket in the worker's hands",
            "contenders": {
                CONNPARK: "connpark serve + trio hook; time = Woken out of parking.wakes()",
                RAW: "one epoll (IN|RDHUP|ONESHOT) in a child process, send_fds back "
                "(<=253 per sendmsg); time = recv_fds returned",
            },
            "results": results,
            "summary": summary(results),
            "targets": tgt,
        },
    )
    if not args.no_plot:
        plot(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
