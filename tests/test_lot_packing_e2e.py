"""End to end (a real ``connpark serve``): packed connections through shutdown, an
ended parker, fd reuse, and a shard's crash recovery."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import connpark
from connpark import Reason

from ._procs import ServeProcess, tcp_pairs
from .conftest import open_fd_count

pytestmark = pytest.mark.linux


@pytest.fixture
def serve(sockdir: Path) -> Iterator[ServeProcess]:
    before = open_fd_count()
    proc = ServeProcess(sockdir / "c.sock")
    yield proc
    proc.stop()
    assert open_fd_count() == before


async def _next_wake(parking: connpark.Parking, timeout: float = 10) -> connpark.Woken:  # type: ignore[type-arg]
    with trio.fail_after(timeout):
        return await parking.wakes().receive()


async def _until_packed(serve: ServeProcess, n: int, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while serve.stats().packed < n:
            await trio.sleep(0.1)


def _recv_exactly(sock: socket.socket, n: int, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while len(buf) < n and (chunk := sock.recv(n - len(buf))):
        buf += chunk
    return buf


async def test_sigterm_hands_back_packed_connections(sockdir: Path) -> None:
    proc = ServeProcess(sockdir / "term.sock")
    clients, servers = tcp_pairs(30)
    try:
        async with connpark.open_parking(proc.path) as parking:
            tickets = {
                await parking.park(s, token=b"t%d" % i, pending=b"p") for i, s in enumerate(servers)
            }
            await _until_packed(proc, 30)
            proc.proc.send_signal(signal.SIGTERM)
            got = set()
            while len(got) < 30:
                w = await _next_wake(parking)
                assert (w.reason, w.pending) == (Reason.SHUTDOWN, b"p")
                assert w.socket is not None
                got.add(w.ticket)
                await w.socket.send(b"moved")
                w.socket.close()
            assert got == tickets
            with trio.fail_after(10):
                while proc.proc.poll() is None:
                    await trio.sleep(0.05)
    finally:
        rc = proc.stop()
    assert rc == 0, proc.log_text()
    for c in clients:
        assert _recv_exactly(c, 5) == b"moved"
        c.close()


async def test_packed_connection_of_an_ended_parker_wakes_to_another_worker(
    serve: ServeProcess,
) -> None:
    clients, servers = tcp_pairs(10)
    async with connpark.open_parking(serve.path, pool="p") as other:
        async with connpark.open_parking(serve.path, pool="p") as parker:
            tickets = [await parker.park(s, token=b"%d" % i) for i, s in enumerate(servers)]
            await _until_packed(serve, 10)
        # The parker's session is over; its connections are the container's.
        with trio.fail_after(10):
            while serve.stats().sessions > 2:  # ``other`` and the stats probe
                await trio.sleep(0.05)
        for i in range(5):
            clients[i].sendall(b"x%d" % i)
        await other.unpark(*tickets[5:])
        seen = {}
        for _ in range(10):
            w = await _next_wake(other)
            assert w.socket is not None
            seen[w.ticket] = w.reason
            w.socket.close()
        assert seen == {
            **{t: Reason.READABLE for t in tickets[:5]},
            **{t: Reason.REQUESTED for t in tickets[5:]},
        }
        assert serve.stats().parked == 0
    for c in clients:
        c.close()


async def test_fd_of_a_packed_connection_reused_wakes_only_the_new_one(
    serve: ServeProcess,
) -> None:
    """A packed connection closed (CLOSE); its fd number is reused by the next park,
    with the same idle tick: the timeout wakes the new one, once, with its token."""
    clients, servers = tcp_pairs(2)
    async with connpark.open_parking(serve.path, pool="p") as parking:
        old = await parking.park(servers[0], token=b"old", idle_timeout=4.0)
        await _until_packed(serve, 1)
        await parking.close(old, goodbye=b"bye")
        assert _recv_exactly(clients[0], 3) == b"bye"
        new = await parking.park(servers[1], token=b"new", idle_timeout=4.0, on_timeout="return")
        assert new & 0xFFFFFF == old & 0xFFFFFF  # the same fd number in the container
        await _until_packed(serve, 1)
        w = await _next_wake(parking, timeout=15)
        assert (w.ticket, w.reason, w.token) == (new, Reason.TIMEOUT, b"new")
        assert w.socket is not None
        w.socket.close()
        with trio.move_on_after(2):
            extra = await parking.wakes().receive()
            raise AssertionError(f"a second wake: {extra}")
        assert serve.stats().parked == 0
    for c in clients:
        c.close()


def _shard_pid(serve: ServeProcess, not_: int = 0, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            procs = serve.stats().processes
        except connpark.ConnparkError:
            procs = ()
        pids = [p.pid for p in procs if p.role == "shard" and p.pid != not_]
        if pids:
            return pids[0]
        time.sleep(0.05)
    raise AssertionError("no shard")


def test_packed_connections_survive_a_shard_crash_and_keep_their_tickets(sockdir: Path) -> None:
    path = sockdir / "c.sock"
    serve = ServeProcess(path, ["--crash-recovery", "--restore-grace", "1"])
    clients, servers = tcp_pairs(40)
    try:
        shard = _shard_pid(serve)
        with connpark.BlockingParking(path, pool="main") as parking:
            out = parking.park_many(servers, tokens=[b"%d" % i for i in range(40)])
            tickets = [t for t in out if isinstance(t, int)]
            assert len(tickets) == 40
            deadline = time.monotonic() + 10
            while serve.stats().packed < 40:
                assert time.monotonic() < deadline, "never packed"
                time.sleep(0.1)
            os.kill(shard, signal.SIGKILL)
            _shard_pid(serve, not_=shard)
            deadline = time.monotonic() + 20
            while True:  # the restored ones: parked again (and, a second later, packed)
                try:
                    if serve.stats().parked == 40:
                        break
                except connpark.ConnparkError:
                    pass
                assert time.monotonic() < deadline, "not restored"
                time.sleep(0.1)
        with connpark.BlockingParking(path, pool="main") as parking:
            # A new park schedules a pack (restored ones alone do not, see
            # test_lot_packing): how many restored connections get packed?
            extra_c, extra_s = tcp_pairs(1)
            parking.park(extra_s[0], token=b"extra")
            time.sleep(2.5)
            after_crash = serve.stats()
            assert after_crash.parked == 41
            for i in range(10):
                clients[i].sendall(b"d%d" % i)
            parking.unpark(*tickets[10:20])
            for t in tickets[20:30]:
                parking.close(t)
            seen = {}
            while len(seen) < 20:
                w = parking.next_wake(timeout=20)
                assert w is not None, f"only {len(seen)} woke"
                assert w.ticket not in seen, "delivered twice"
                assert w.socket is not None
                seen[w.ticket] = (w.reason, w.token)
                w.socket.close()
            assert seen == {
                **{tickets[i]: (Reason.READABLE, b"%d" % i) for i in range(10)},
                **{tickets[i]: (Reason.REQUESTED, b"%d" % i) for i in range(10, 20)},
            }
            for i in range(20, 30):
                assert _recv_exactly(clients[i], 1) == b""  # closed by the container
            assert serve.stats().parked == 11
            extra_c[0].close()
            extra_s[0].close()
        # Last, as it fails: the restored connections came back under new fd
        # numbers (aliases), and ``pack`` leaves aliases as ~200 B objects.
        assert after_crash.packed == 41, f"{after_crash.packed} of 41 packed after the crash"
    finally:
        for s in (*clients, *servers):
            s.close()
        assert serve.stop() == 0
