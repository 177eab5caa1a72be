"""Serving parked connections without waking: a real container, real TCP, real clients.

Raw MQTT bytes for the exact-bytes rules; the third-party ``websockets``
client against ``examples/ws_server.py`` for pings, publish and a stalled
receiver. Counts come from the container's own statistics.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.protocol import State

import connpark
from connpark import Reason, Rule
from connpark._stats_client import fetch_stats
from connpark._wire import Ack, Wake

from ._procs import ServeProcess, recv_exactly, tcp_pairs
from ._raw import RawPeer
from .conftest import open_fd_count
from .test_examples import ExampleProcess

pytestmark = pytest.mark.linux

PINGREQ, PINGRESP = b"\xc0\x00", b"\xd0\x00"


@pytest.fixture
def serve(sockdir: Path) -> Iterator[ServeProcess]:
    proc = ServeProcess(sockdir / "c.sock")
    yield proc
    assert proc.stop() == 0


def _wakes(path: Path) -> int:
    return sum(fetch_stats(path).woken_total.values())


def _nothing_to_read(sock: socket.socket) -> bool:
    try:
        sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    except BlockingIOError:
        return True
    return False


def ws_client_frame(opcode: int, payload: bytes) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    head = (
        struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        if n <= 125
        else struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    )
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def test_mqtt_pings_answered_and_everything_else_wakes_with_every_byte(
    serve: ServeProcess,
) -> None:
    before = open_fd_count()
    clients, servers = tcp_pairs(5)
    with connpark.BlockingParking(serve.path, pool="mqtt") as parking:
        parking.set_rules(1, [Rule.exact(PINGREQ, PINGRESP)])
        parking.set_rules(2, [Rule.ws_ping()])
        tickets = [parking.park(s, rules=1 if i < 4 else 2) for i, s in enumerate(servers)]
        wakes0 = _wakes(serve.path)
        for _ in range(20):  # each ping answered by the container, nothing consumed else
            clients[0].sendall(PINGREQ)
            assert recv_exactly(clients[0], 2) == PINGRESP
        clients[0].sendall(PINGREQ * 3)  # three at once: three answers
        assert recv_exactly(clients[0], 6) == PINGRESP * 3
        assert _wakes(serve.path) == wakes0  # the worker slept through 23 pings

        cases = {
            tickets[1]: (clients[1], b"\xc0"),  # a partial ping
            tickets[2]: (clients[2], PINGREQ + b"\x30\x03a/b"),  # a ping, then a PUBLISH
            tickets[3]: (clients[3], b"\x30\x03a/b" + PINGREQ),  # data, then a ping
            tickets[4]: (clients[4], ws_client_frame(0x9, b"p" * 126)),  # ping over 125 bytes
        }
        for client, data in cases.values():
            client.sendall(data)
        for _ in cases:
            woken = parking.next_wake(timeout=10)
            assert woken is not None
            assert woken.reason is Reason.READABLE
            client, data = cases[woken.ticket]
            assert woken.socket is not None
            assert recv_exactly(woken.socket, len(data)) == data  # every byte still there
            assert _nothing_to_read(client)  # and no reply was written
            woken.socket.close()
        stats = parking.stats()
        assert stats.autoresponses_total == 23
        assert stats.autoresponse_bytes_total == 46
        assert stats.woken_total.get("READABLE", 0) >= 4
        parking.close(tickets[0])
    for c in clients:
        c.close()
    assert open_fd_count() == before


def test_resets_idle_is_a_rule_option(serve: ServeProcess) -> None:
    before = open_fd_count()
    clients, servers = tcp_pairs(2)
    with connpark.BlockingParking(serve.path, pool="idle") as parking:
        parking.set_rules(1, [Rule.exact(PINGREQ, PINGRESP, resets_idle=True)])
        parking.set_rules(2, [Rule.exact(PINGREQ, PINGRESP)])
        t_reset = parking.park(servers[0], rules=1, idle_timeout=0.6, on_timeout="return")
        t_keep = parking.park(servers[1], rules=2, idle_timeout=0.6, on_timeout="return")
        start = time.monotonic()
        woken_at: dict[int, float] = {}
        while time.monotonic() - start < 1.5:  # ping both every 0.2 s
            for c in clients:
                try:
                    c.sendall(PINGREQ)
                except OSError:
                    pass
            w = parking.next_wake(timeout=0.2)
            if w is not None:
                assert w.reason is Reason.TIMEOUT
                assert w.autoresponses >= 1
                woken_at[w.ticket] = time.monotonic() - start
                assert w.socket is not None
                w.socket.close()
        assert t_keep in woken_at
        assert woken_at[t_keep] < 1.2  # pings did not push its deadline back
        assert t_reset not in woken_at  # they did push this one's
        w = parking.next_wake(timeout=5)  # quiet now: its deadline passes
        assert w is not None
        assert (w.ticket, w.reason) == (t_reset, Reason.TIMEOUT)
        assert w.socket is not None
        w.socket.close()
    for c in clients:
        c.close()
    assert open_fd_count() == before


def test_publish_to_a_stalled_receiver_wakes_it_with_the_unsent_rest(
    serve: ServeProcess,
) -> None:
    before = open_fd_count()
    listener = socket.create_server(("127.0.0.1", 0))
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a receiver that stalls
    slow.connect(listener.getsockname())
    srv, _ = listener.accept()
    listener.close()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = os.urandom(60_000)
    with connpark.BlockingParking(serve.path, pool="pub") as parking:
        ticket = parking.park(srv, tags=["t"])
        assert parking.send(data, tag="t") == connpark.SendResult(0, 1, 0)
        w = parking.next_wake(timeout=10)
        assert w is not None
        assert (w.ticket, w.reason) == (ticket, Reason.UNSENT)
        assert 0 < len(w.unsent) < len(data)
        assert data.endswith(w.unsent)
        assert w.socket is not None
        with ThreadPoolExecutor(1) as reader:  # the client reads again
            got = reader.submit(recv_exactly, slow, len(data))
            w.socket.sendall(w.unsent)  # the worker finishes it, in order
            w.socket.close()
            assert got.result(20) == data
        with pytest.raises(connpark.Refused):
            parking.send(b"x" * 70_000, tickets=[ticket])  # over max_publish
        stats = parking.stats()
        assert stats.publish_woken_total == 1
        assert stats.publishes_total == 1
    slow.close()
    assert open_fd_count() == before


def test_an_older_worker_gets_plain_wakes_from_a_served_connection(serve: ServeProcess) -> None:
    """A v2 worker in the pool keeps working: its WAKE entries carry no v3 extension."""
    before = open_fd_count()
    clients, servers = tcp_pairs(1)
    with connpark.BlockingParking(serve.path, pool="mixed") as parking:
        parking.set_rules(1, [Rule.exact(PINGREQ, PINGRESP)], pool_wide=True)
        parking.park(servers[0], rules=1, tags=["t"])
    old = RawPeer(serve.path, pool="mixed", version=2)  # the pool's only session now
    try:
        clients[0].sendall(PINGREQ)
        assert recv_exactly(clients[0], 2) == PINGRESP
        clients[0].sendall(b"data")
        msg = old.receive()
        assert isinstance(msg, Wake)
        (entry,) = msg.entries
        assert (entry.reason, entry.autoresponses, entry.unsent) == (Reason.READABLE, 0, b"")
        old.send(Ack((entry.ticket,)))
        assert entry.fd is not None
        os.close(entry.fd)
    finally:
        old.close()
    clients[0].close()
    assert open_fd_count() == before


# ------------------------------------------------------------- websockets + the example


@pytest.fixture
def ws_server(serve: ServeProcess) -> Iterator[ExampleProcess]:
    server = ExampleProcess(
        "ws_server.py",
        "--parking-socket",
        str(serve.path),
        "--listen",
        "127.0.0.1:0",
        "--park-after",
        "0.3",
        "--state-size",
        "4096",
    )
    yield server
    server.stop()


def _raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _until(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        await asyncio.sleep(0.05)


async def _parked(path: Path, n: int, timeout: float = 30) -> None:
    def check() -> bool:
        return fetch_stats(path).parked >= n

    await _until(check, timeout, f"{n} parked")


async def _published(path: Path, n: int, timeout: float = 20) -> None:
    def check() -> bool:
        return fetch_stats(path).publishes_total >= n

    await _until(check, timeout, f"{n} publishes")


def test_websockets_clients_pings_messages_and_a_room_of_1000(
    serve: ServeProcess, ws_server: ExampleProcess
) -> None:
    _raise_nofile()
    before = open_fd_count()
    host, port = ws_server.addr
    url = f"ws://{host}:{port}"

    async def main() -> None:
        # 1. Clients that ping every 0.1 s stay connected, answered by the container.
        pingers = [
            await connect(f"{url}/pings", ping_interval=0.1, ping_timeout=2) for _ in range(10)
        ]
        await _parked(serve.path, 10)
        s0 = fetch_stats(serve.path)
        await asyncio.sleep(1.5)
        s1 = fetch_stats(serve.path)
        assert sum(s1.woken_total.values()) == sum(s0.woken_total.values())  # zero wakes
        assert s1.autoresponses_total - s0.autoresponses_total >= 10 * 5
        assert all(c.state is State.OPEN for c in pingers)
        # 2. A text message wakes its connection and is answered (the room echoes it).
        await pingers[0].send("hello")
        assert await asyncio.wait_for(pingers[0].recv(), 10) == "hello"
        for c in pingers[1:]:  # the other members got it through the container
            assert await asyncio.wait_for(c.recv(), 10) == "hello"
        s2 = fetch_stats(serve.path)
        assert sum(s2.woken_total.values()) - sum(s1.woken_total.values()) == 1

        # 3. A room of 1,000 parked members gets a post with no wake but the poster's.
        members: list[ClientConnection] = []
        for _ in range(20):
            members += await asyncio.gather(
                *(connect(f"{url}/lobby", ping_interval=None) for _ in range(50))
            )
        poster = await connect(f"{url}/lobby", ping_interval=None)
        await _parked(serve.path, 10 + 1000 + 1, timeout=60)
        s3 = fetch_stats(serve.path)
        await poster.send("news for 1,000")
        got = await asyncio.gather(*(asyncio.wait_for(c.recv(), 20) for c in members))
        assert got == ["news for 1,000"] * 1000
        assert await asyncio.wait_for(poster.recv(), 10) == "news for 1,000"
        s4 = fetch_stats(serve.path)
        assert sum(s4.woken_total.values()) - sum(s3.woken_total.values()) == 1  # the poster
        assert s4.published_total - s3.published_total >= 1000
        assert s4.tagged >= 1000
        await asyncio.gather(*(c.close() for c in [*pingers, *members, poster]))

    asyncio.run(main())
    assert open_fd_count() == before


def test_websockets_member_with_a_stalled_receive_side_gets_every_message(
    serve: ServeProcess, ws_server: ExampleProcess
) -> None:
    before = open_fd_count()
    host, port = ws_server.addr
    url = f"ws://{host}:{port}"

    async def main() -> None:
        # A websockets client that stops reading: a tiny socket receive buffer, and
        # the library stops reading the socket once max_queue messages wait unread.
        slow_sock = socket.socket()
        slow = poster = None
        try:
            slow_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow_sock.connect((host, port))
            slow = await connect(
                f"{url}/slow", sock=slow_sock, ping_interval=None, max_queue=1, close_timeout=2
            )
            poster = await connect(f"{url}/slow", ping_interval=None, max_size=None)
            await _parked(serve.path, 2)
            s0 = fetch_stats(serve.path)
            posts: list[str] = []
            for i in range(200):  # until the stalled socket's buffers are full (bounded)
                posts.append(f"{i}:" + "x" * 60_000)
                await poster.send(posts[-1])
                assert await asyncio.wait_for(poster.recv(), 20) == posts[-1]
                # The echo comes before the server's SEND: wait for the container to
                # have published this post, or the next one could land while `slow`
                # is being woken, which the example does not deliver (its docstring).
                await _published(serve.path, s0.publishes_total + len(posts))
                if fetch_stats(serve.path).publish_woken_total > s0.publish_woken_total:
                    break  # `slow` was woken with the rest of a post: the server writes it
            else:
                raise AssertionError("the stalled socket took 12 MB")
            received = [await asyncio.wait_for(slow.recv(), 20) for _ in posts]
            assert received == posts  # whole, in order
        finally:
            for ws in (slow, poster):
                if ws is not None:
                    await ws.close()
            slow_sock.close()

    asyncio.run(main())
    assert open_fd_count() == before
