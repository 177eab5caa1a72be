"""The blocking and asyncio hooks: the trio hook's behaviour tests, against ``connpark serve``."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import connpark
import connpark.aio
from connpark import Reason

from ._procs import ServeProcess, tcp_pairs
from .conftest import open_fd_count

pytestmark = pytest.mark.linux


class BlockingDriver:
    kind = "blocking"

    def __init__(self, path: Path, pool: str = "default") -> None:
        self.parking = connpark.BlockingParking(path, pool=pool)

    def park(self, sock: socket.socket, **kw: Any) -> int:
        return self.parking.park(sock, **kw)

    def next_wake(self, timeout: float = 10) -> connpark.Woken[socket.socket]:
        woken = self.parking.next_wake(timeout=timeout)
        assert woken is not None, "no wake in time"
        return woken

    def unpark(self, ticket: int) -> None:
        self.parking.unpark(ticket)

    def close(self, ticket: int, goodbye: bytes) -> None:
        self.parking.close(ticket, goodbye=goodbye)

    def stats(self) -> connpark.ContainerStats:
        return self.parking.stats()

    def shutdown(self) -> None:
        self.parking.shutdown()


class AsyncioDriver:
    """Runs an asyncio loop in a thread; each call is a coroutine run there."""

    kind = "asyncio"

    def __init__(self, path: Path, pool: str = "default") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._cm = connpark.aio.open_parking(path, pool=pool)
        self.parking = self._run(self._cm.__aenter__())
        self._wakes = self.parking.wakes()

    def _run(self, coro: Any, timeout: float = 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def park(self, sock: socket.socket, **kw: Any) -> int:
        return self._run(self.parking.park(sock, **kw))  # type: ignore[no-any-return]

    def next_wake(self, timeout: float = 10) -> connpark.Woken[socket.socket]:
        async def one() -> Any:
            return await asyncio.wait_for(self._wakes.__anext__(), timeout)

        return self._run(one())  # type: ignore[no-any-return]

    def unpark(self, ticket: int) -> None:
        self._run(self.parking.unpark(ticket))

    def close(self, ticket: int, goodbye: bytes) -> None:
        self._run(self.parking.close(ticket, goodbye=goodbye))

    def stats(self) -> connpark.ContainerStats:
        return self._run(self.parking.stats())  # type: ignore[no-any-return]

    def shutdown(self) -> None:
        async def leave() -> None:
            await self._wakes.aclose()
            await self._cm.__aexit__(None, None, None)

        self._run(leave())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def serve() -> Iterator[ServeProcess]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cp-") as d:
        proc = ServeProcess(Path(d) / "c.sock")
        yield proc
        assert proc.stop() == 0


@pytest.fixture(params=[BlockingDriver, AsyncioDriver], ids=["blocking", "asyncio"])
def hook(request: pytest.FixtureRequest, serve: ServeProcess) -> Iterator[Any]:
    before = open_fd_count()
    driver = request.param(serve.path, pool=f"p-{request.param.kind}-{os.getpid()}")
    yield driver
    driver.shutdown()
    # Every socket the test got was closed by it or handed to the container.
    assert open_fd_count() == before


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(10)
    buf = b""
    while len(buf) < n and (chunk := sock.recv(n - len(buf))):
        buf += chunk
    return buf


def _check_mode(hook: Any, sock: socket.socket) -> None:
    # Threads get blocking sockets; asyncio gets non-blocking ones.
    assert sock.getblocking() is (hook.kind == "blocking")


def test_park_then_readable_wake_with_bytes_intact(hook: Any) -> None:
    (client,), (server,) = tcp_pairs(1)
    payload = os.urandom(100_000)
    ticket = hook.park(server, token=b"tok", pending=b"pend")
    assert server.fileno() == -1  # our copy is closed
    client.sendall(payload)
    woken = hook.next_wake()
    assert (woken.ticket, woken.reason, woken.token, woken.pending) == (
        ticket,
        Reason.READABLE,
        b"tok",
        b"pend",
    )
    assert woken.socket is not None
    _check_mode(hook, woken.socket)
    woken.socket.setblocking(True)
    assert _recv_exactly(woken.socket, len(payload)) == payload
    woken.socket.sendall(b"back")
    assert _recv_exactly(client, 4) == b"back"
    woken.socket.close()
    client.close()


def test_hangup_notice_and_return(hook: Any) -> None:
    clients, servers = tcp_pairs(2)
    t_notice = hook.park(servers[0], token=b"n")
    t_return = hook.park(servers[1], token=b"r", on_hangup="return")
    for c in clients:
        c.close()
    got = {w.ticket: w for w in (hook.next_wake(), hook.next_wake())}
    assert got[t_notice].reason is Reason.HANGUP
    assert got[t_notice].socket is None
    assert got[t_notice].token == b"n"
    returned = got[t_return].socket
    assert got[t_return].reason is Reason.HANGUP
    assert returned is not None
    returned.setblocking(True)
    assert returned.recv(10) == b""
    returned.close()


def test_unpark_and_close_with_goodbye(hook: Any) -> None:
    clients, servers = tcp_pairs(2)
    t1 = hook.park(servers[0], token=b"push")
    t2 = hook.park(servers[1])
    hook.unpark(t1)
    woken = hook.next_wake()
    assert (woken.ticket, woken.reason, woken.token) == (t1, Reason.REQUESTED, b"push")
    assert woken.socket is not None
    woken.socket.close()
    hook.unpark(t1)  # already gone: no error
    hook.close(t2, b"bye\n")
    assert _recv_exactly(clients[1], 100) == b"bye\n"
    for c in clients:
        c.close()


def test_refusal_leaves_socket_usable(hook: Any) -> None:
    (client,), (server,) = tcp_pairs(1)
    with pytest.raises(connpark.ParkRefused) as info:
        hook.park(server, token=b"x" * 10_000)
    assert info.value.reason.label == "token-too-large"
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(connpark.ParkRefused, match="not-a-tcp-stream"):
        hook.park(udp)
    server.sendall(b"still mine")
    assert _recv_exactly(client, 10) == b"still mine"
    for s in (client, server, udp):
        s.close()


def test_asyncio_woken_socket_works_with_open_connection(serve: ServeProcess) -> None:
    (client,), (server,) = tcp_pairs(1)

    async def main() -> bytes:
        async with connpark.aio.open_parking(serve.path, pool="aio-streams") as parking:
            await parking.park(server, token=b"s")
            client.sendall(b"ping\n")
            async for woken in parking.wakes():
                assert woken.socket is not None
                reader, writer = await asyncio.open_connection(sock=woken.socket)
                line = await reader.readline()
                writer.write(b"pong\n")
                await writer.drain()
                writer.close()
                await writer.wait_closed()
                return line
        raise AssertionError("no wake")

    assert asyncio.run(main()) == b"ping\n"
    assert _recv_exactly(client, 5) == b"pong\n"
    client.close()


def test_blocking_many_threads_park_and_take_wakes_at_once(serve: ServeProcess) -> None:
    n_threads, per_thread = 8, 25
    n = n_threads * per_thread
    clients, servers = tcp_pairs(n)
    with connpark.BlockingParking(serve.path, pool="threads") as parking:

        def park_some(k: int) -> list[int]:
            return [
                parking.park(s, token=b"%d" % (k * per_thread + i))
                for i, s in enumerate(servers[k * per_thread : (k + 1) * per_thread])
            ]

        with ThreadPoolExecutor(n_threads) as pool:
            tickets = [t for ts in pool.map(park_some, range(n_threads)) for t in ts]
        assert len(set(tickets)) == n
        assert parking.stats().parked >= n
        for i, c in enumerate(clients):
            c.sendall(b"msg-%d" % i)

        def take(_: int) -> list[tuple[bytes, bytes]]:
            out = []
            while (woken := parking.next_wake(timeout=1.0)) is not None:
                assert woken.socket is not None
                assert woken.socket.getblocking()
                want = len(b"msg-" + woken.token)
                out.append((woken.token, _recv_exactly(woken.socket, want)))
                woken.socket.close()
            return out

        with ThreadPoolExecutor(n_threads) as pool:
            got = [x for part in pool.map(take, range(n_threads)) for x in part]
    assert sorted(got) == sorted((b"%d" % i, b"msg-%d" % i) for i in range(n))
    for c in clients:
        c.close()
