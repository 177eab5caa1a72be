#!/usr/bin/env python3
"""Serving without waking: pings and publishes handled by the container vs by the worker.

Three measures, each contender in the same run, alternating, medians of repetitions:

- **pings**: M clients (another process) each send an MQTT PINGREQ, wait for the
  PINGRESP, and repeat, for S seconds. *container*: the connections are parked
  with an exact-bytes rule and the container answers. *wake*: they are parked
  plainly; each ping wakes the worker (trio hook), which reads it, answers and
  parks the connection again. Pings answered per second, and CPU per ping.
- **publish**: N parked connections, all with one tag; a 100-byte message must
  reach every one. *send*: one ``parking.send(msg, tag=...)``. *wake*:
  ``unpark(tag=...)``, then the worker writes the message on each woken socket
  and parks it again. Time until every client has the message (the clients'
  process says when) and, for *wake*, until every connection is parked again.
- **memory**: container RSS growth per parked connection for N connections
  parked with no tag and with two tags each (``room:K``, 100 rooms, and
  ``user:I``, one per connection), each in a fresh container.

    python benchmarks/bench_serving.py [--clients 100] [--seconds 2] [--n 10000]
                                       [--repeat 3] [--quick] [--tiny] [--no-plot]
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import subprocess
import sys
import time
from typing import Any

from _common import Container, median, plot_bars, print_table, raise_nofile, write_json

PINGREQ, PINGRESP = b"\xc0\x00", b"\xd0\x00"
MSG = b"m" * 99 + b"\n"
PARK_CHUNK = 1000
SETTLE = 0.5


# -- the clients' process (--role clients) ---------------------------------------------


def clients_role(port: int, n: int) -> None:
    """Connect n clients, then obey commands on stdin: ``ping SECONDS``, ``expect BYTES``."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
    print(f"connected {n}", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "ping":
            print(f"pinged {_ping(socks, float(arg))}", flush=True)
        elif cmd == "expect":
            print(f"received {_expect(socks, int(arg))}", flush=True)
        elif cmd == "quit":
            break
    for s in socks:
        s.close()


def _ping(socks: list[socket.socket], seconds: float) -> int:
    """Closed loop: every client has one ping in flight; count answered pings."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
        s.send(PINGREQ)
    done = 0
    end = time.monotonic() + seconds
    got: dict[int, int] = {}
    while time.monotonic() < end:
        for key, _ in sel.select(0.1):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            n = len(s.recv(64))
            have = got.get(s.fileno(), 0) + n
            while have >= 2:
                have -= 2
                done += 1
                s.send(PINGREQ)
            got[s.fileno()] = have
    # Drain the last answers so the next run starts clean (bounded).
    drain_end = time.monotonic() + 5
    outstanding = len(socks)
    while outstanding and time.monotonic() < drain_end:
        for key, _ in sel.select(0.1):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            have = got.get(s.fileno(), 0) + len(s.recv(64))
            got[s.fileno()] = have
            if have >= 2:
                got[s.fileno()] = have - 2
                sel.unregister(s)
                outstanding -= 1
    sel.close()
    return done


def _expect(socks: list[socket.socket], nbytes: int) -> int:
    """Wait until every client has ``nbytes``; print the monotonic ns of the last byte."""
    sel = selectors.DefaultSelector()
    left = {s.fileno(): nbytes for s in socks}
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    end = time.monotonic() + 120
    while left and time.monotonic() < end:
        for key, _ in sel.select(0.5):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            left[s.fileno()] -= len(s.recv(65536))
            if left[s.fileno()] <= 0:
                del left[s.fileno()]
                sel.unregister(s)
    sel.close()
    if left:
        raise SystemExit(f"{len(left)} clients never got the message")
    return time.monotonic_ns()


class Clients:
    def __init__(self, port: int, n: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--role", "clients", "--port", str(port), "--n", str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def line(self) -> str:
        assert self.proc.stdout is not None
        out = self.proc.stdout.readline().strip()
        if not out:
            raise RuntimeError("the clients' process died")
        return out

    def cmd(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.line()

    def close(self) -> None:
        try:
            self.cmd("quit")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the worker (this process, trio) ------------------------------------------------------


async def _accept_and_park(
    listener: Any, parking: Any, n: int, clients: list[Clients], **park: Any
) -> list[int]:
    import trio

    tickets: list[int] = []
    done = 0
    while done < n:
        await trio.lowlevel.wait_readable(listener)
        batch = []
        while len(batch) < min(PARK_CHUNK, n - done):
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            batch.append(conn)
        results = await parking.park_many(batch, **park)
        for conn in batch:
            conn.close()  # parked ones are closed already
        tickets += [t for t in results if isinstance(t, int)]
        done += len(batch)
    return tickets


async def _session(container: Container, n: int, measure: Any, park: dict[str, Any]) -> Any:
    import trio

    import connpark

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    box: list[Clients] = []
    try:
        async with connpark.open_parking(str(container.path), pool="bench-serving") as parking:
            await parking.set_rules(1, [connpark.Rule.exact(PINGREQ, PINGRESP)])
            await parking.stats()
            rss0 = container.rss()

            async def start_clients() -> None:
                c = Clients(listener.getsockname()[1], n)
                box.append(c)
                await trio.to_thread.run_sync(c.line)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(start_clients)
                tickets = await _accept_and_park(listener, parking, n, box, **park)
            if len(tickets) != n:
                raise RuntimeError(f"{len(tickets)} of {n} parked")
            return await measure(parking, box[0], rss0)
    finally:
        listener.close()
        for c in box:
            c.close()


async def _rearm_loop(parking: Any, stop: Any, answer: bytes | None) -> int:
    """Serve wakes: answer the ping (or write ``answer``), park again; count them."""
    import trio

    n = 0
    async with trio.open_nursery() as nursery:

        async def one(w: Any) -> None:
            nonlocal n
            sock = w.socket
            if answer is None:
                await sock.recv(2)
                await sock.send(PINGRESP)
            else:
                await sock.send(answer)
            n += 1
            await parking.park(sock, tags=["room"])

        async def loop() -> None:
            async for w in parking.wakes():
                nursery.start_soon(one, w)

        nursery.start_soon(loop)
        await stop.wait()
        nursery.cancel_scope.cancel()
    return n


def run_pings(mode: str, m: int, seconds: float) -> dict[str, float]:
    import trio

    async def measure(parking: Any, clients: Clients, rss0: int) -> dict[str, float]:
        stop = trio.Event()
        cpu0 = cpu_seconds(container.pid)
        self0 = time.process_time()
        async with trio.open_nursery() as nursery:
            if mode == "wake":
                nursery.start_soon(_rearm_loop, parking, stop, None)
            done = int((await trio.to_thread.run_sync(clients.cmd, f"ping {seconds}")).split()[1])
            stop.set()
        cpu = cpu_seconds(container.pid) - cpu0 + (time.process_time() - self0)
        stats = await parking.stats()
        return {
            "pings_per_s": done / seconds,
            "cpu_us_per_ping": 1e6 * cpu / max(done, 1),
            "wakes": sum(stats.woken_total.values()),
            "autoresponses": stats.autoresponses_total,
        }

    with Container() as container:
        park = {"rules": 1} if mode == "container" else {}
        return trio.run(_session, container, m, measure, park)  # type: ignore[no-any-return]


def run_publish(mode: str, n: int) -> dict[str, float]:
    import trio

    async def measure(parking: Any, clients: Clients, rss0: int) -> dict[str, float]:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            result: list[str] = []
            arrived = trio.Event()

            async def expect() -> None:
                result.append(await trio.to_thread.run_sync(clients.cmd, f"expect {len(MSG)}"))
                arrived.set()

            nursery.start_soon(expect)
            await trio.sleep(0.2)  # the clients are waiting
            t0 = time.monotonic_ns()
            if mode == "send":
                sent = await parking.send(MSG, tag="room")
                assert sent.written + sent.woken == n, sent
            else:
                nursery.start_soon(_rearm_loop, parking, stop, MSG)
                await parking.unpark(tag="room")
            await arrived.wait()
            delivered = (int(result[0].split()[1]) - t0) / 1e9
            if mode == "wake":
                with trio.fail_after(120):
                    while (await parking.stats()).parked < n:  # noqa: ASYNC110
                        await trio.sleep(0.01)
            settled = (time.monotonic_ns() - t0) / 1e9
            stop.set()
        return {"delivered_s": delivered, "settled_s": settled}

    with Container() as container:
        return trio.run(_session, container, n, measure, {"tags": ["room"]})  # type: ignore[no-any-return]


def run_memory(tags: bool, n: int) -> float:
    import trio

    async def measure(parking: Any, clients: Clients, rss0: int) -> float:
        await trio.sleep(SETTLE)
        return (container.rss() - rss0) / n

    with Container() as container:
        if not tags:
            return trio.run(_session, container, n, measure, {})  # type: ignore[no-any-return]
        return trio.run(_tagged_session, container, n, measure)  # type: ignore[no-any-return]


async def _tagged_session(container: Container, n: int, measure: Any) -> Any:
    """Like ``_session``, each connection with its own tags (room:K, user:I)."""
    import trio

    import connpark

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    box: list[Clients] = []
    try:
        async with connpark.open_parking(str(container.path), pool="bench-serving") as parking:
            await parking.stats()
            rss0 = container.rss()

            async def start_clients() -> None:
                c = Clients(listener.getsockname()[1], n)
                box.append(c)
                await trio.to_thread.run_sync(c.line)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(start_clients)
                i = 0
                while i < n:
                    await trio.lowlevel.wait_readable(listener)
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        continue
                    nursery.start_soon(
                        functools_partial(parking.park, conn, tags=[f"room:{i % 100}", f"user:{i}"])
                    )
                    i += 1
            if (await parking.stats()).parked != n:
                raise RuntimeError("not all parked")
            return await measure(parking, box[0], rss0)
    finally:
        listener.close()
        for c in box:
            c.close()


def functools_partial(fn: Any, *args: Any, **kw: Any) -> Any:
    async def call() -> Any:
        return await fn(*args, **kw)

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--clients", type=int, default=100, help="pinging clients (100)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per ping run (2)")
    parser.add_argument("--n", type=int, default=10_000, help="parked for publish/memory")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 s runs, N = 5000, 2 repeats")
    parser.add_argument("--tiny", action="store_true", help="seconds, for the test suite")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--role", choices=["clients"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raise_nofile()
    if args.role == "clients":
        clients_role(args.port, args.n)
        return 0
    mode = "default"
    if args.quick:
        mode, args.seconds, args.n, args.repeat = "quick", 1.0, 5000, 2
    if args.tiny:
        mode, args.clients, args.seconds, args.n, args.repeat = "tiny", 10, 0.3, 200, 1
        args.no_plot = True

    started = time.monotonic()
    pings: dict[str, list[dict[str, float]]] = {"container": [], "wake": []}
    pubs: dict[str, list[dict[str, float]]] = {"send": [], "wake": []}
    mem: dict[str, list[float]] = {"no tags": [], "2 tags": []}
    for rep in range(args.repeat):
        order = ["container", "wake"] if rep % 2 == 0 else ["wake", "container"]
        for who in order:
            pings[who].append(run_pings(who, args.clients, args.seconds))
            print(f"pings {who}: {pings[who][-1]}", flush=True)
        for who in ["send", "wake"] if rep % 2 == 0 else ["wake", "send"]:
            pubs[who].append(run_publish(who, args.n))
            print(f"publish {who}: {pubs[who][-1]}", flush=True)
        for label, tagged in [("no tags", False), ("2 tags", True)]:
            mem[label].append(run_memory(tagged, args.n))
            print(f"memory {label}: {mem[label][-1]:.0f} B/conn", flush=True)

    def med(runs: list[dict[str, float]], key: str) -> float:
        return median(r[key] for r in runs)

    p_c, p_w = med(pings["container"], "pings_per_s"), med(pings["wake"], "pings_per_s")
    d_s, d_w = med(pubs["send"], "delivered_s"), med(pubs["wake"], "delivered_s")
    settle_w = med(pubs["wake"], "settled_s")
    m0, m2 = median(mem["no tags"]), median(mem["2 tags"])
    print_table(
        f"Serving without waking ({mode}; {args.clients} pinging clients, N={args.n:,})",
        ["measure", "container", "worker woken", "ratio"],
        [
            ["pings answered / s", p_c, p_w, f"{p_c / p_w:.2f}x"],
            [
                "CPU per ping (µs, container + worker)",
                med(pings["container"], "cpu_us_per_ping"),
                med(pings["wake"], "cpu_us_per_ping"),
                "",
            ],
            ["wakes during the ping run", med(pings["container"], "wakes"), "", ""],
            [f"publish to {args.n:,}: all delivered (s)", d_s, d_w, f"{d_w / d_s:.2f}x"],
            [
                f"publish to {args.n:,}: all parked again (s)",
                d_s,
                settle_w,
                f"{settle_w / d_s:.2f}x",
            ],
            ["RSS per parked conn, no tags (B)", m0, "", ""],
            ["RSS per parked conn, 2 tags (B)", m2, "", f"+{m2 - m0:.0f} B"],
        ],
    )
    write_json(
        "serving",
        {
            "mode": mode,
            "clients": args.clients,
            "seconds": args.seconds,
            "n": args.n,
            "repeat": args.repeat,
            "pings": pings,
            "publish": pubs,
            "memory_bytes_per_conn": mem,
            "ratios": {
                "pings_container_over_wake": p_c / p_w,
                "publish_wake_over_send_delivered": d_w / d_s,
                "publish_wake_over_send_settled": settle_w / d_s,
            },
            "elapsed_s": time.monotonic() - started,
        },
    )
    if not args.no_plot:
        plot_bars(
            "serving",
            "pings answered per second",
            ["pings/s"],
            {"container (auto-response)": [p_c], "worker woken": [p_w]},
            "pings / s",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
