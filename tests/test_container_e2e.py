"""End to end: ``connpark serve`` as a real subprocess, real TCP clients, the trio hook."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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

HERE = Path(__file__).parent


@pytest.fixture
def serve(sockdir: Path) -> Iterator[ServeProcess]:
    before = open_fd_count()
    proc = ServeProcess(sockdir / "c.sock")
    yield proc
    proc.stop()
    # The worker side (this process) leaked nothing either.
    assert open_fd_count() == before


async def _next_wake(parking: connpark.Parking, timeout: float = 10) -> connpark.Woken:  # type: ignore[type-arg]
    with trio.fail_after(timeout):
        return await parking.wakes().receive()


def _recv_exactly(sock: socket.socket, n: int, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


async def test_1000_parked_grow_container_fds_by_exactly_1000(serve: ServeProcess) -> None:
    clients, servers = tcp_pairs(1000)
    async with connpark.open_parking(serve.path, pool="web") as parking:
        await trio.sleep(0.1)
        baseline = serve.fd_count()
        async with trio.open_nursery() as nursery:
            tickets: list[int] = []

            async def park(s: socket.socket, i: int) -> None:
                tickets.append(await parking.park(s, token=b"%d" % i))

            for i, s in enumerate(servers):
                nursery.start_soon(park, s, i)
        assert len(set(tickets)) == 1000
        assert all(s.fileno() == -1 for s in servers)  # our copies were closed
        assert serve.fd_count() == baseline + 1000
        stats = serve.stats()
        assert stats.parked == 1000
        assert stats.fds_held == 1000
        # Every client hangs up: 1000 HANGUP notices, and the container lets go.
        for c in clients:
            c.close()
        seen = set()
        while len(seen) < 1000:
            w = await _next_wake(parking)
            assert w.reason is Reason.HANGUP
            assert w.socket is None
            seen.add(w.ticket)
        assert seen == set(tickets)
        for _ in range(100):
            if serve.fd_count() == baseline:
                break
            await trio.sleep(0.05)
        assert serve.fd_count() == baseline
        assert serve.stats().parked == 0


async def test_bytes_sent_while_parked_arrive_after_readable_wake(serve: ServeProcess) -> None:
    (client,), (server,) = tcp_pairs(1)
    payload = os.urandom(200_000)  # more than one segment, less than the socket buffer
    async with connpark.open_parking(serve.path) as parking:
        ticket = await parking.park(server, token=b"session-42", pending=b"half a req")
        client.sendall(payload[:10])
        w = await _next_wake(parking)
        client.sendall(payload[10:])
        assert (w.ticket, w.reason, w.token, w.pending) == (
            ticket,
            Reason.READABLE,
            b"session-42",
            b"half a req",
        )
        assert w.socket is not None
        got = b""
        with trio.fail_after(10):
            while len(got) < len(payload):
                got += await w.socket.recv(65536)
        assert got == payload
        await w.socket.send(b"pong")
        assert _recv_exactly(client, 4) == b"pong"
        w.socket.close()
    client.close()


async def test_hangup_gives_notice_by_default_and_fd_with_return(serve: ServeProcess) -> None:
    clients, servers = tcp_pairs(2)
    async with connpark.open_parking(serve.path) as parking:
        t_close = await parking.park(servers[0], token=b"a")
        t_return = await parking.park(servers[1], token=b"b", on_hangup="return")
        for c in clients:
            c.close()
        got = {}
        for _ in range(2):
            w = await _next_wake(parking)
            got[w.ticket] = w
        assert got[t_close].reason is Reason.HANGUP
        assert got[t_close].socket is None
        assert got[t_close].token == b"a"
        ret = got[t_return]
        assert ret.reason is Reason.HANGUP
        assert ret.socket is not None
        assert await ret.socket.recv(10) == b""  # the peer really is gone
        ret.socket.close()


async def test_half_closed_peer_with_data_is_readable_not_hangup(serve: ServeProcess) -> None:
    (client,), (server,) = tcp_pairs(1)
    async with connpark.open_parking(serve.path) as parking:
        await parking.park(server)
        client.sendall(b"last words")
        client.shutdown(socket.SHUT_WR)
        w = await _next_wake(parking)
        assert w.reason is Reason.READABLE
        assert w.socket is not None
        assert await w.socket.recv(100) == b"last words"
        w.socket.close()
    client.close()


async def test_idle_timeout_close_and_return(serve: ServeProcess) -> None:
    clients, servers = tcp_pairs(2)
    async with connpark.open_parking(serve.path) as parking:
        t1 = await parking.park(servers[0], idle_timeout=0.2)
        t2 = await parking.park(servers[1], idle_timeout=0.3, on_timeout="return")
        w1 = await _next_wake(parking)
        w2 = await _next_wake(parking)
        assert (w1.ticket, w1.reason, w1.socket) == (t1, Reason.TIMEOUT, None)
        assert (w2.ticket, w2.reason) == (t2, Reason.TIMEOUT)
        assert w2.socket is not None
        await w2.socket.send(b"still here")
        assert _recv_exactly(clients[1], 10) == b"still here"
        w2.socket.close()
    # The container closed the first one: its client sees EOF.
    assert _recv_exactly(clients[0], 1) == b""
    for c in clients:
        c.close()


async def test_unpark_requested_and_close_with_goodbye(serve: ServeProcess) -> None:
    clients, servers = tcp_pairs(2)
    async with connpark.open_parking(serve.path) as parking:
        t1 = await parking.park(servers[0], token=b"push")
        t2 = await parking.park(servers[1])
        await parking.unpark(t1)
        w = await _next_wake(parking)
        assert (w.ticket, w.reason, w.token) == (t1, Reason.REQUESTED, b"push")
        assert w.socket is not None
        await w.socket.send(b"news")
        assert _recv_exactly(clients[0], 4) == b"news"
        w.socket.close()
        await parking.unpark(t1)  # gone already: a no-op, not an error
        await parking.close(t2, goodbye=b"bye\n")
        assert _recv_exactly(clients[1], 100) == b"bye\n"  # then EOF
        stats = await parking.stats()
        assert stats.parked == 0
        assert stats.closed_total == 1
    for c in clients:
        c.close()


async def test_refused_park_leaves_socket_usable(serve: ServeProcess) -> None:
    (client,), (server,) = tcp_pairs(1)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    async with connpark.open_parking(serve.path) as parking:
        with pytest.raises(connpark.ParkRefused) as info:
            await parking.park(server, token=b"x" * 5000)
        assert info.value.reason.label == "token-too-large"
        with pytest.raises(connpark.ParkRefused) as info:
            await parking.park(udp)
        assert info.value.reason.label == "not-a-tcp-stream"
        with pytest.raises(connpark.ParkRefused) as info:
            await parking.park(listener)
        assert info.value.reason.label == "listening"
        unix_a, unix_b = socket.socketpair()
        with pytest.raises(connpark.ParkRefused) as info:
            await parking.park(unix_a)
        assert info.value.reason.label == "not-inet"
        stats = await parking.stats()
        assert stats.refused_total == {
            "token-too-large": 1,
            "not-a-tcp-stream": 1,
            "listening": 1,
            "not-inet": 1,
        }
        assert stats.fds_held == 0
    # Everything refused is still ours and works.
    server.sendall(b"ping")
    assert _recv_exactly(client, 4) == b"ping"
    client.sendall(b"pong")
    assert _recv_exactly(server, 4) == b"pong"
    unix_a.sendall(b"u")
    assert unix_b.recv(1) == b"u"
    for s in (client, server, udp, listener, unix_a, unix_b):
        s.close()


async def test_peer_uid_not_allowed_gets_clear_error(sockdir: Path) -> None:
    other = os.getuid() + 4242
    proc = ServeProcess(sockdir / "uid.sock", ["--allow-uid", str(other)])
    try:
        with pytest.raises(connpark.ConnparkError, match=f"uid {os.getuid()} is not allowed"):
            async with connpark.open_parking(proc.path):
                pass  # pragma: no cover
    finally:
        assert proc.stop() == 0


async def test_garbage_on_control_socket_leaves_container_serving(serve: ServeProcess) -> None:
    baseline = serve.fd_count()
    for garbage in (b"\xff" * 64, b"\x00\x00\x00\x05\x63\x00\x00\x00hello", os.urandom(4096)):
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(serve.path))
        raw.sendall(garbage)
        raw.settimeout(10)
        reply = b""
        while chunk := raw.recv(4096):
            reply += chunk
        raw.close()
        # An ERROR frame (type 11) came back before the container hung up.
        assert reply[4:5] == b"\x0b", reply
    # A frame that promises an fd it never sends; then a PARK with a wrong count.
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(serve.path))
    raw.sendall(b"".join(f.data for f in connpark._wire.encode(connpark._wire.Hello())))
    raw.sendall(b"\x00\x00\x00\x06\x03\x00\x00\x01" + b"\x00" * 6)
    raw.settimeout(10)
    while raw.recv(4096):
        pass
    raw.close()
    (client,), (server,) = tcp_pairs(1)
    async with connpark.open_parking(serve.path) as parking:
        await parking.park(server)
        client.sendall(b"still serving")
        w = await _next_wake(parking)
        assert w.reason is Reason.READABLE
        assert w.socket is not None
        w.socket.close()
        assert (await parking.stats()).protocol_errors_total >= 4
    client.close()
    for _ in range(100):
        if serve.fd_count() == baseline:
            break
        await trio.sleep(0.05)
    assert serve.fd_count() == baseline


@pytest.mark.parametrize("packed", [False, True])
async def test_sigterm_returns_everything_with_shutdown_and_exits_0(
    sockdir: Path, packed: bool
) -> None:
    """Objects or packed (parked for a second or two): each comes back once, as parked."""
    proc = ServeProcess(sockdir / "term.sock")
    clients, servers = tcp_pairs(50)
    try:
        async with connpark.open_parking(proc.path) as parking:
            tickets = {await parking.park(s, token=b"t", pending=b"p") for s in servers}
            if packed:
                await _until_packed(proc, 50)
            proc.proc.send_signal(signal.SIGTERM)
            got = set()
            while len(got) < 50:
                w = await _next_wake(parking)
                assert (w.reason, w.token, w.pending) == (Reason.SHUTDOWN, b"t", b"p")
                assert w.socket is not None
                got.add(w.ticket)
                await w.socket.send(b"moved")
                w.socket.close()
            assert got == tickets
            # The container exits once it has our ACKs, well before its grace period.
            with trio.fail_after(10):
                while proc.proc.poll() is None:
                    await trio.sleep(0.05)
    finally:
        rc = proc.stop()
    assert rc == 0, proc.log_text()
    assert "shutting down" in proc.log_text()
    assert not proc.path.exists()
    for c in clients:
        assert _recv_exactly(c, 5) == b"moved"
        c.close()


async def test_sigkill_worker_with_wakes_in_flight_loses_nothing(serve: ServeProcess) -> None:
    n = 20
    async with connpark.open_parking(serve.path, pool="p") as survivor:
        victim = subprocess.Popen(
            [sys.executable, str(HERE / "_stuck_worker.py"), str(serve.path), "p", str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert victim.stdout is not None
            port = int(victim.stdout.readline())
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
            assert victim.stdout.readline().strip() == b"parked"
            payloads = [os.urandom(1000) + b"%d" % i for i in range(n)]
            for c, p in zip(clients, payloads, strict=True):
                c.sendall(p)
            # The wakes go to their parker, which never ACKs: they are in flight.
            for _ in range(200):
                if serve.stats().unacked == n:
                    break
                await trio.sleep(0.05)
            assert serve.stats().unacked == n
            victim.kill()
            victim.wait()
        finally:
            if victim.poll() is None:
                victim.kill()
            victim.communicate()
        got = {}
        while len(got) < n:
            w = await _next_wake(survivor)
            assert w.reason is Reason.READABLE
            assert w.socket is not None
            got[w.token] = w.socket
        for i, (c, p) in enumerate(zip(clients, payloads, strict=True)):
            sock = got[b"conn-%d" % i]
            data = b""
            with trio.fail_after(10):
                while len(data) < len(p):
                    data += await sock.recv(4096)
            assert data == p
            await sock.send(b"ok")
            assert _recv_exactly(c, 2) == b"ok"
            sock.close()
            c.close()
        assert serve.stats().unacked == 0


async def test_limits_full_and_out_of_fds_are_refusals(sockdir: Path) -> None:
    import resource

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))

    proc = ServeProcess(sockdir / "lim.sock", ["--max-parked", "1000"], preexec_fn=low_fd_limit)
    clients, servers = tcp_pairs(150)
    try:
        async with connpark.open_parking(proc.path) as parking:
            budget = (await parking.stats()).fd_budget
            assert 0 < budget < 100
            outcomes: list[str] = []
            for s in servers:
                try:
                    await parking.park(s)
                    outcomes.append("ok")
                except connpark.ParkRefused as exc:
                    outcomes.append(exc.reason.label)
            assert outcomes.count("ok") == budget
            assert outcomes.count("out-of-fds") == 150 - budget
            stats = await parking.stats()
            assert stats.parked == budget
            assert stats.refused_total == {"out-of-fds": 150 - budget}
            # Refused sockets are still ours and usable.
            refused = [s for s, o in zip(servers, outcomes, strict=True) if o != "ok"]
            refused[0].sendall(b"mine")
            idx = servers.index(refused[0])
            assert _recv_exactly(clients[idx], 4) == b"mine"
    finally:
        assert proc.stop() == 0
    for s in (*clients, *servers):
        s.close()


async def test_max_parked_gives_full(sockdir: Path) -> None:
    proc = ServeProcess(sockdir / "full.sock", ["--max-parked", "3"])
    clients, servers = tcp_pairs(4)
    try:
        async with connpark.open_parking(proc.path) as parking:
            for s in servers[:3]:
                await parking.park(s)
            with pytest.raises(connpark.ParkRefused, match="full") as info:
                await parking.park(servers[3])
            assert info.value.reason.label == "full"
    finally:
        assert proc.stop() == 0
    for s in (*clients, *servers):
        s.close()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_connection_comes_back_as_ipv6(serve: ServeProcess) -> None:
    listener = socket.socket(socket.AF_INET6)
    listener.bind(("::1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname()[:2])
    server, _ = listener.accept()
    listener.close()
    async with connpark.open_parking(serve.path) as parking:
        await parking.park(server)
        client.sendall(b"six")
        w = await _next_wake(parking)
        assert w.socket is not None
        assert w.socket.family == socket.AF_INET6
        assert await w.socket.recv(10) == b"six"
        assert w.socket.getpeername()[:2] == client.getsockname()[:2]
        w.socket.close()
    client.close()


async def test_park_many_one_request_tickets_and_refusals(serve: ServeProcess) -> None:
    clients, servers = tcp_pairs(300)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    async with connpark.open_parking(serve.path) as parking:
        socks: list[socket.socket] = [*servers[:150], udp, *servers[150:]]
        tokens = [b"%d" % i for i in range(len(socks))]
        out = await parking.park_many(socks, tokens=tokens)
        assert len(out) == 301
        refused = out[150]
        assert isinstance(refused, connpark.ParkRefused)
        assert refused.reason.label == "not-a-tcp-stream"
        assert udp.fileno() != -1  # refused: still ours
        tickets = [t for t in out if isinstance(t, int)]
        assert len(set(tickets)) == 300
        assert all(s.fileno() == -1 for s in servers)
        assert (await parking.stats()).parked == 300
        await parking.unpark(*tickets)
        got = set()
        while len(got) < 300:
            w = await _next_wake(parking)
            assert w.reason is Reason.REQUESTED
            assert w.socket is not None
            got.add(w.token)
            w.socket.close()
        assert got == {b"%d" % i for i in range(301) if i != 150}
    udp.close()
    for c in clients:
        c.close()


async def test_concurrent_big_parks_near_the_fd_limit_are_refusals_not_errors(
    sockdir: Path,
) -> None:
    import resource

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (600, 600))

    proc = ServeProcess(sockdir / "emfile.sock", preexec_fn=low_fd_limit)
    pairs = [tcp_pairs(400) for _ in range(2)]
    outcomes: list[list[int | connpark.ParkRefused]] = []
    try:

        async def worker(servers: list[socket.socket]) -> None:
            async with connpark.open_parking(proc.path) as parking:
                outcomes.append(await parking.park_many(servers))
                await trio.sleep(0.5)  # stay connected while the other one parks

        async with trio.open_nursery() as nursery:
            for _, servers in pairs:
                nursery.start_soon(worker, servers)
        stats = proc.stats()
    finally:
        assert proc.stop() == 0
    results = [r for out in outcomes for r in out]
    parked = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if not isinstance(r, int)]
    assert stats.protocol_errors_total == 0  # no session was killed by MSG_CTRUNC
    assert 0 < len(parked) <= stats.fd_budget + 2
    assert {r.reason.label for r in refused} == {"out-of-fds"}
    assert len(parked) + len(refused) == 800
    for clients, servers in pairs:
        for s in (*clients, *servers):
            s.close()


async def test_long_parked_connections_are_packed_and_wake_as_parked(serve: ServeProcess) -> None:
    """A plain park still parked a second or two after its PARKED is packed (~40 B, no
    object); data, UNPARK, CLOSE, hangups and timeouts reach it as before, with
    its token, pending and policies."""
    clients, servers = tcp_pairs(25)
    async with connpark.open_parking(serve.path, pool="web") as parking:
        n = 20
        got = await parking.park_many(
            servers[:n],
            tokens=[b"t%d" % i for i in range(n)],
            pendings=[b"p%d" % i for i in range(n)],
        )
        tickets = [t for t in got if isinstance(t, int)]
        assert len(tickets) == n
        t_return = await parking.park(servers[n], token=b"ret", on_hangup="return")
        timed = [await parking.park(s, token=b"late", idle_timeout=3.0) for s in servers[n + 1 :]]
        with trio.fail_after(10):
            while serve.stats().packed < 25:
                await trio.sleep(0.1)
        assert serve.stats().parked == 25

        for i in range(3):  # data: READABLE, the bytes untouched
            clients[i].sendall(b"hello %d" % i)
        for _ in range(3):
            w = await _next_wake(parking)
            i = tickets.index(w.ticket)
            assert (w.reason, w.token, w.pending) == (Reason.READABLE, b"t%d" % i, b"p%d" % i)
            assert w.socket is not None
            assert await w.socket.recv(100) == b"hello %d" % i
            w.socket.close()
        await parking.unpark(*tickets[3:6])
        woken = set()
        for _ in range(3):
            w = await _next_wake(parking)
            assert (w.reason, w.socket is not None) == (Reason.REQUESTED, True)
            w.socket.close()  # type: ignore[union-attr]
            woken.add(w.ticket)
        assert woken == set(tickets[3:6])
        await parking.close(tickets[6], goodbye=b"bye")
        assert _recv_exactly(clients[6], 3) == b"bye"
        clients[7].close()
        clients[n].close()
        hangups = {}
        for _ in range(2):
            w = await _next_wake(parking)
            hangups[w.ticket] = w
        assert hangups[tickets[7]].reason is Reason.HANGUP
        assert hangups[tickets[7]].socket is None
        ret = hangups[t_return]
        assert (ret.reason, ret.token) == (Reason.HANGUP, b"ret")
        assert ret.socket is not None
        ret.socket.close()
        for _ in range(len(timed)):  # 3 s after they were parked, packed all along
            w = await _next_wake(parking)
            assert (w.ticket in timed, w.reason, w.token, w.socket) == (
                True,
                Reason.TIMEOUT,
                b"late",
                None,
            )
        stats = serve.stats()
        assert stats.parked == n - 8
        assert stats.packed == n - 8
        assert stats.woken_total == {"READABLE": 3, "REQUESTED": 3, "HANGUP": 2, "TIMEOUT": 4}
    for c in clients:
        c.close()


# -- packed connections (the lot packs plain parks after a second or two) ----------------


async def _until_packed(serve: ServeProcess, n: int, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while serve.stats().packed < n:
            await trio.sleep(0.1)


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
            while True:  # the restored ones: parked again (and, a second or two later, packed)
                try:
                    if serve.stats().parked == 40:
                        break
                except connpark.ConnparkError:
                    pass
                assert time.monotonic() < deadline, "not restored"
                time.sleep(0.1)
        with connpark.BlockingParking(path, pool="main") as parking:
            # One more park; a second later every restored connection is packed too
            # (under its old ticket, at its new fd number).
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
