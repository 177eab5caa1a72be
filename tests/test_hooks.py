"""One conformance suite for the three hooks (trio, threads, asyncio).

Each hook is wrapped in a driver with the same synchronous surface, in the
manner of trio's ``testing/_check_streams.py``; every behaviour test runs
against all three. Deadlines use each world's own mechanism: a cancel scope
(trio), task cancellation (asyncio), ``timeout=`` (threads).
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from socket import send_fds
from typing import Any, Protocol

import attrs
import pytest
import trio

import connpark
import connpark.aio
from connpark import Reason
from connpark._fdpass import recv_fds
from connpark._unixsock import listen_unix
from connpark._wire import (
    Ack,
    Decoder,
    Error,
    ErrorCode,
    Hello,
    Park,
    Parked,
    ParkResult,
    Refusal,
    Wake,
    WakeEntry,
    Welcome,
    close_fds,
    encode,
    message_fds,
)

from ._procs import ServeProcess, recv_exactly, tcp_pairs, wait_until
from .conftest import open_fd_count

pytestmark = pytest.mark.linux

Wk = connpark.Woken[socket.socket]


class Driver(Protocol):
    kind: str

    def park(self, sock: socket.socket, **kw: Any) -> int: ...
    def park_many(self, socks: Sequence[socket.socket], **kw: Any) -> list[Any]: ...
    def park_within(self, sock: socket.socket, seconds: float) -> int | None: ...
    def stats_within(self, seconds: float) -> connpark.ContainerStats | None: ...
    def next_wake(self, timeout: float = 10) -> Wk: ...
    def unpark(self, ticket: int) -> None: ...
    def close(self, ticket: int, goodbye: bytes) -> None: ...
    def stats(self) -> connpark.ContainerStats: ...
    def sessions(self) -> int: ...
    def shutdown(self) -> None: ...
    def set_rules(self, set_id: int, rules: Sequence[connpark.Rule], **kw: Any) -> None: ...
    def send(self, data: bytes, **kw: Any) -> connpark.SendResult: ...
    def unpark_tag(self, tag: str) -> None: ...
    def close_tag(self, tag: str, goodbye: bytes) -> None: ...


class BlockingDriver:
    kind = "blocking"

    def __init__(self, path: Path, **kw: Any) -> None:
        self.parking = connpark.BlockingParking(path, **kw)

    def park(self, sock: socket.socket, **kw: Any) -> int:
        return self.parking.park(sock, **kw)

    def park_many(self, socks: Sequence[socket.socket], **kw: Any) -> list[Any]:
        return self.parking.park_many(socks, **kw)

    def park_within(self, sock: socket.socket, seconds: float) -> int | None:
        try:
            return self.parking.park(sock, timeout=seconds)
        except connpark.ContainerTimeout:
            return None

    def stats_within(self, seconds: float) -> connpark.ContainerStats | None:
        try:
            return self.parking.stats(timeout=seconds)
        except connpark.ContainerTimeout:
            return None

    def next_wake(self, timeout: float = 10) -> Wk:
        woken = self.parking.next_wake(timeout=timeout)
        assert woken is not None, "no wake in time"
        return woken

    def unpark(self, ticket: int) -> None:
        self.parking.unpark(ticket)

    def close(self, ticket: int, goodbye: bytes) -> None:
        self.parking.close(ticket, goodbye=goodbye)

    def stats(self) -> connpark.ContainerStats:
        return self.parking.stats()

    def sessions(self) -> int:
        return self.parking.sessions

    def shutdown(self) -> None:
        self.parking.shutdown()

    def set_rules(self, set_id: int, rules: Sequence[connpark.Rule], **kw: Any) -> None:
        self.parking.set_rules(set_id, rules, **kw)

    def send(self, data: bytes, **kw: Any) -> connpark.SendResult:
        return self.parking.send(data, **kw)

    def unpark_tag(self, tag: str) -> None:
        self.parking.unpark(tag=tag)

    def close_tag(self, tag: str, goodbye: bytes) -> None:
        self.parking.close(tag=tag, goodbye=goodbye)


class AsyncioDriver:
    """An asyncio loop in a thread; each call is a coroutine run there."""

    kind = "asyncio"

    def __init__(self, path: Path, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._cm = connpark.aio.open_parking(path, **kw)
        try:
            self.parking = self._run(self._cm.__aenter__())
        except BaseException:
            self._stop_loop()
            raise
        self._wakes = self.parking.wakes()

    def _run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def park(self, sock: socket.socket, **kw: Any) -> int:
        return self._run(self.parking.park(sock, **kw))  # type: ignore[no-any-return]

    def park_many(self, socks: Sequence[socket.socket], **kw: Any) -> list[Any]:
        return self._run(self.parking.park_many(socks, **kw))  # type: ignore[no-any-return]

    def _within(self, coro: Any, seconds: float) -> Any:
        async def go() -> Any:
            try:
                return await asyncio.wait_for(coro, seconds)
            except asyncio.TimeoutError:
                return None

        return self._run(go())

    def park_within(self, sock: socket.socket, seconds: float) -> int | None:
        return self._within(self.parking.park(sock), seconds)  # type: ignore[no-any-return]

    def stats_within(self, seconds: float) -> connpark.ContainerStats | None:
        return self._within(self.parking.stats(), seconds)  # type: ignore[no-any-return]

    def next_wake(self, timeout: float = 10) -> Wk:
        async def one() -> Any:
            return await asyncio.wait_for(self._wakes.__anext__(), timeout)

        return self._run(one())  # type: ignore[no-any-return]

    def unpark(self, ticket: int) -> None:
        self._run(self.parking.unpark(ticket))

    def close(self, ticket: int, goodbye: bytes) -> None:
        self._run(self.parking.close(ticket, goodbye=goodbye))

    def stats(self) -> connpark.ContainerStats:
        return self._run(self.parking.stats())  # type: ignore[no-any-return]

    def set_rules(self, set_id: int, rules: Sequence[connpark.Rule], **kw: Any) -> None:
        self._run(self.parking.set_rules(set_id, rules, **kw))

    def send(self, data: bytes, **kw: Any) -> connpark.SendResult:
        return self._run(self.parking.send(data, **kw))  # type: ignore[no-any-return]

    def unpark_tag(self, tag: str) -> None:
        self._run(self.parking.unpark(tag=tag))

    def close_tag(self, tag: str, goodbye: bytes) -> None:
        self._run(self.parking.close(tag=tag, goodbye=goodbye))

    def sessions(self) -> int:
        return self.parking.sessions

    def shutdown(self) -> None:
        if self.loop.is_closed():
            return

        async def leave() -> None:
            await self._wakes.aclose()  # type: ignore[attr-defined]
            await self._cm.__aexit__(None, None, None)

        try:
            self._run(leave())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class TrioDriver:
    """``trio.run`` in a thread; each call goes in through ``trio.from_thread``.

    Woken trio sockets are handed to the test as stdlib sockets (same fd, same mode).
    """

    kind = "trio"

    def __init__(self, path: Path, **kw: Any) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=trio.run, args=(self._main, path, kw), daemon=True)
        self.thread.start()
        self._ready.wait(30)
        if self._error is not None:
            self.thread.join(10)
            raise self._error

    async def _main(self, path: Path, kw: dict[str, Any]) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        try:
            async with connpark.open_parking(path, **kw) as parking:
                self.parking = parking
                self._wakes = parking.wakes()
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def _run(self, afn: Callable[[], Any]) -> Any:
        return trio.from_thread.run(afn, trio_token=self.token)

    def park(self, sock: socket.socket, **kw: Any) -> int:
        return self._run(functools.partial(self.parking.park, sock, **kw))  # type: ignore[no-any-return]

    def park_many(self, socks: Sequence[socket.socket], **kw: Any) -> list[Any]:
        return self._run(functools.partial(self.parking.park_many, socks, **kw))  # type: ignore[no-any-return]

    def _within(self, afn: Callable[[], Any], seconds: float) -> Any:
        async def go() -> Any:
            with trio.move_on_after(seconds):
                return await afn()
            return None

        return self._run(go)

    def park_within(self, sock: socket.socket, seconds: float) -> int | None:
        return self._within(functools.partial(self.parking.park, sock), seconds)  # type: ignore[no-any-return]

    def stats_within(self, seconds: float) -> connpark.ContainerStats | None:
        return self._within(self.parking.stats, seconds)  # type: ignore[no-any-return]

    def next_wake(self, timeout: float = 10) -> Wk:
        async def one() -> Wk:
            with trio.fail_after(timeout):
                w = await self._wakes.receive()
            sock = None
            if w.socket is not None:
                sock = socket.socket(w.socket.family, w.socket.type, fileno=w.socket.detach())
            return attrs.evolve(w, socket=sock)  # type: ignore[return-value]

        return self._run(one)  # type: ignore[no-any-return]

    def unpark(self, ticket: int) -> None:
        self._run(functools.partial(self.parking.unpark, ticket))

    def close(self, ticket: int, goodbye: bytes) -> None:
        self._run(functools.partial(self.parking.close, ticket, goodbye=goodbye))

    def stats(self) -> connpark.ContainerStats:
        return self._run(self.parking.stats)  # type: ignore[no-any-return]

    def set_rules(self, set_id: int, rules: Sequence[connpark.Rule], **kw: Any) -> None:
        self._run(functools.partial(self.parking.set_rules, set_id, rules, **kw))

    def send(self, data: bytes, **kw: Any) -> connpark.SendResult:
        return self._run(functools.partial(self.parking.send, data, **kw))  # type: ignore[no-any-return]

    def unpark_tag(self, tag: str) -> None:
        self._run(functools.partial(self.parking.unpark, tag=tag))

    def close_tag(self, tag: str, goodbye: bytes) -> None:
        self._run(functools.partial(self.parking.close, tag=tag, goodbye=goodbye))

    def sessions(self) -> int:
        return self.parking.sessions

    def shutdown(self) -> None:
        if not self.thread.is_alive():
            return
        trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self.thread.join(30)
        assert not self.thread.is_alive()


DRIVERS = [TrioDriver, BlockingDriver, AsyncioDriver]
IDS = ["trio", "blocking", "asyncio"]
Factory = Callable[..., Driver]


@pytest.fixture(scope="module")
def serve() -> Iterator[ServeProcess]:
    with tempfile.TemporaryDirectory(prefix="cp-") as d:
        proc = ServeProcess(Path(d) / "c.sock")
        yield proc
        assert proc.stop() == 0


@pytest.fixture(params=DRIVERS, ids=IDS)
def make(request: pytest.FixtureRequest) -> Iterator[Factory]:
    """Open drivers of one kind; each is shut down and fds are checked at the end."""
    before = open_fd_count()
    opened: list[Driver] = []

    def factory(path: Path, **kw: Any) -> Driver:
        driver: Driver = request.param(path, **kw)
        opened.append(driver)
        return driver

    factory.kind = request.param.kind  # type: ignore[attr-defined]
    yield factory
    for d in opened:
        d.shutdown()
    # Every socket the test got was closed by it or handed to the container.
    assert open_fd_count() == before


@pytest.fixture(scope="module")
def sharded() -> Iterator[ServeProcess]:
    """``serve --shards 3``: the hook keeps a session per shard and routes each call."""
    with tempfile.TemporaryDirectory(prefix="cp-") as d:
        proc = ServeProcess(Path(d) / "c.sock", ["--shards", "3"])
        yield proc
        assert proc.stop() == 0


@pytest.fixture(params=["one", "sharded"])
def container(
    request: pytest.FixtureRequest, serve: ServeProcess, sharded: ServeProcess
) -> ServeProcess:
    """Every behaviour test runs against one container and against three shards."""
    return serve if request.param == "one" else sharded


@pytest.fixture
def hook(make: Factory, container: ServeProcess, request: pytest.FixtureRequest) -> Driver:
    # A pool per test: connections a test leaves parked cannot wake into the next one.
    return make(container.path, pool=f"p-{request.node.name}")


# ------------------------------------------------------------------ behaviour


def test_park_then_readable_wake_with_bytes_intact(hook: Driver) -> None:
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
    # Threads get blocking sockets; trio and asyncio get non-blocking ones.
    assert os.get_blocking(woken.socket.fileno()) is (hook.kind == "blocking")
    assert recv_exactly(woken.socket, len(payload)) == payload
    woken.socket.sendall(b"back")
    assert recv_exactly(client, 4) == b"back"
    woken.socket.close()
    client.close()


def test_hangup_notice_and_return(hook: Driver) -> None:
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
    assert recv_exactly(returned, 10) == b""
    returned.close()


def test_unpark_and_close_with_goodbye(hook: Driver) -> None:
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
    assert recv_exactly(clients[1], 100) == b"bye\n"
    for c in clients:
        c.close()


def test_refusal_leaves_socket_usable(hook: Driver) -> None:
    (client,), (server,) = tcp_pairs(1)
    with pytest.raises(connpark.ParkRefused) as info:
        hook.park(server, token=b"x" * 10_000)
    assert info.value.reason is Refusal.TOKEN_TOO_LARGE
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(connpark.ParkRefused, match="not-a-tcp-stream"):
        hook.park(udp)
    server.sendall(b"still mine")
    assert recv_exactly(client, 10) == b"still mine"
    for s in (client, server, udp):
        s.close()


def test_park_many_tickets_and_refusals(hook: Driver) -> None:
    clients, servers = tcp_pairs(300)  # more than one PARK frame (253 fds)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out = hook.park_many([*servers, udp], tokens=[b"%d" % i for i in range(301)])
    tickets = out[:300]
    assert all(isinstance(t, int) for t in tickets)
    assert len(set(tickets)) == 300
    assert isinstance(out[300], connpark.ParkRefused)
    assert out[300].reason is Refusal.NOT_A_TCP_STREAM
    assert all(s.fileno() == -1 for s in servers)
    assert udp.fileno() != -1
    clients[123].sendall(b"x")
    woken = hook.next_wake()
    assert (woken.ticket, woken.token) == (tickets[123], b"123")
    assert woken.socket is not None
    woken.socket.close()
    for s in (*clients, udp):
        s.close()


def test_rules_tags_and_send_without_waking(hook: Driver) -> None:
    """The v3 API, the same through every hook: ping rules, tags, publish, by-tag ops."""
    hook.set_rules(1, [connpark.Rule.exact(b"\xc0\x00", b"\xd0\x00")])
    hook.set_rules(2, [connpark.Rule.exact(b"PING\r\n", b"PONG\r\n")], pool_wide=True)
    with pytest.raises(connpark.Refused) as refused:
        hook.set_rules(3, [connpark.Rule.exact(b"x" * 2000, b"")])
    assert refused.value.reason is connpark.Refusal.BAD_RULE
    clients, servers = tcp_pairs(4)
    tickets = [
        hook.park(servers[0], rules=1, tags=["room:1"]),
        hook.park(servers[1], rules=2, tags=["room:1", "vip"]),
        hook.park(servers[2], tags=["room:2"]),
    ]
    with pytest.raises(connpark.ParkRefused) as bad:
        hook.park(servers[3], rules=9)
    assert bad.value.reason is connpark.Refusal.UNKNOWN_RULES
    for _ in range(3):  # pings answered by the container, the worker sleeps on
        clients[0].sendall(b"\xc0\x00")
        assert recv_exactly(clients[0], 2) == b"\xd0\x00"
        clients[1].sendall(b"PING\r\n")
        assert recv_exactly(clients[1], 6) == b"PONG\r\n"
    assert hook.send(b"to room 1\n", tag="room:1") == connpark.SendResult(2, 0, 0)
    assert hook.send(b"direct\n", tickets=[tickets[2], 12345]) == connpark.SendResult(1, 0, 1)
    assert recv_exactly(clients[0], 10) == b"to room 1\n"
    assert recv_exactly(clients[1], 10) == b"to room 1\n"
    assert recv_exactly(clients[2], 7) == b"direct\n"
    stats = hook.stats()
    assert stats.autoresponses_total >= 6
    assert stats.tagged >= 3
    hook.unpark_tag("vip")
    woken = hook.next_wake()
    assert (woken.ticket, woken.reason, woken.autoresponses) == (tickets[1], Reason.REQUESTED, 3)
    assert woken.last_autoresponse is not None
    assert abs(woken.last_autoresponse - time.time()) < 60
    assert woken.socket is not None
    woken.socket.close()
    hook.close_tag("room:1", b"bye\n")  # ticket 0 only: ticket 1 is not parked any more
    assert recv_exactly(clients[0], 4) == b"bye\n"
    assert clients[0].recv(1) == b""
    hook.close(tickets[2], b"")
    for c in [*clients, servers[3]]:
        c.close()


def test_stats_and_session_info(hook: Driver) -> None:
    stats = hook.stats()
    assert stats.sessions >= 1
    assert hook.sessions() == 1


# ------------------------------------------------------------------ a silent container


class FakeContainer:
    """Answers HELLO, then PARKs only after ``answer_after`` s (never, if None).

    It keeps the fds of the parks it answers OK (it "parked" them) until ``close``.
    """

    def __init__(
        self, path: Path, answer_after: float | None = None, wake_fd: int | None = None
    ) -> None:
        #: If set: the first session gets a WAKE of this fd (ticket 5), then ERROR.
        self.wake_fd = wake_fd
        self.acked: list[int] = []
        self.listener = listen_unix(path)
        self.listener.settimeout(0.2)
        self.answer_after = answer_after
        self.held: list[int] = []
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.conns.append(conn)
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        dec = Decoder()
        conn.settimeout(0.2)
        try:
            while not self.stop.is_set():
                try:
                    data, fds = recv_fds(conn)
                except TimeoutError:
                    continue
                if not data:
                    return
                dec.receive_data(data, fds)
                for msg in dec:
                    if isinstance(msg, Hello):
                        conn.sendall(encode(Welcome(7, 0xFFFF, 1 << 16))[0].data)
                        if self.wake_fd is not None:
                            wake = Wake((WakeEntry(5, Reason.READABLE, b"t", fd=self.wake_fd),))
                            (frame,) = encode(wake)
                            (error,) = encode(Error(ErrorCode.LIMIT, "over a limit"))
                            # One sendmsg: the worker reads the WAKE and the ERROR at once.
                            send_fds(conn, [frame.data + error.data], list(frame.fds))
                            self.wake_fd = None
                    elif isinstance(msg, Ack):
                        self.acked.extend(msg.tickets)
                    elif isinstance(msg, Park) and self.answer_after is not None:
                        self.stop.wait(self.answer_after)
                        self.held.extend(e.fd for e in msg.entries)
                        ok = tuple(ParkResult(Refusal.OK, 100 + i) for i in range(len(msg.entries)))
                        for frame in encode(Parked(msg.request_id, ok)):
                            conn.sendall(frame.data)
                    else:  # never answered (STATS too)
                        close_fds(message_fds(msg))
        except OSError:
            return
        finally:
            dec.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.listener.close()
        close_fds(self.held)


@pytest.fixture
def silent(sockdir: Path) -> Iterator[FakeContainer]:
    fake = FakeContainer(sockdir / "silent.sock")
    yield fake
    fake.close()


def test_cancel_park_and_stats_against_a_silent_container(
    make: Factory, silent: FakeContainer, sockdir: Path
) -> None:
    (client,), (server,) = tcp_pairs(1)
    driver = make(sockdir / "silent.sock", reconnect=False)
    t0 = time.monotonic()
    assert driver.park_within(server, 0.5) is None
    assert driver.stats_within(0.5) is None
    assert time.monotonic() - t0 < 3, "the caller's deadline was not kept"
    # Never answered: the socket is still the caller's, and usable.
    assert server.fileno() != -1
    server.sendall(b"mine")
    assert recv_exactly(client, 4) == b"mine"
    server.close()
    client.close()


def test_cancelled_park_answered_late_is_closed_by_the_hook(make: Factory, sockdir: Path) -> None:
    fake = FakeContainer(sockdir / "late.sock", answer_after=1.0)
    try:
        (client,), (server,) = tcp_pairs(1)
        driver = make(sockdir / "late.sock", reconnect=False)
        assert driver.park_within(server, 0.2) is None
        # The container took it after all: the hook closes the caller's copy.
        assert wait_until(lambda: server.fileno() == -1, 10)
        driver.shutdown()
        client.close()
    finally:
        fake.close()


# ------------------------------------------------------------------ one owner


def test_wakes_read_before_an_error_are_acked_before_the_socket_closes(
    make: Factory, sockdir: Path
) -> None:
    (client,), (server,) = tcp_pairs(1)
    fake = FakeContainer(sockdir / "err.sock", wake_fd=server.fileno())
    try:
        driver = make(sockdir / "err.sock")
        woken = driver.next_wake()
        assert (woken.ticket, woken.token) == (5, b"t")
        # The container ended the session, but still reads: it must see the ACK,
        # or it would hand the connection to another worker too.
        assert wait_until(lambda: fake.acked == [5], 5)
        assert woken.socket is not None
        woken.socket.close()
        driver.shutdown()
    finally:
        fake.close()
        server.close()
        client.close()


def test_40_sessions_each_take_one_wake_and_leave_nothing_delivered_twice(
    make: Factory, serve: ServeProcess
) -> None:
    n = 40
    pool = f"row-{make.kind}"  # type: ignore[attr-defined]
    clients, servers = tcp_pairs(n)
    first = make(serve.path, pool=pool)
    for i, s in enumerate(servers):
        first.park(s, token=b"%d" % i)
    first.shutdown()
    for i, c in enumerate(clients):
        c.sendall(b"hello %d\n" % i)
    delivered: list[bytes] = []
    for _ in range(n):
        d = make(serve.path, pool=pool)
        woken = d.next_wake(timeout=15)
        delivered.append(woken.token)
        assert woken.socket is not None
        want = b"hello " + woken.token + b"\n"
        assert recv_exactly(woken.socket, len(want)) == want
        woken.socket.sendall(b"served\n")
        woken.socket.close()
        d.shutdown()  # at once: untaken wakes go back to the container
    assert sorted(delivered) == sorted(b"%d" % i for i in range(n)), "lost or delivered twice"
    for c in clients:
        assert recv_exactly(c, 7) == b"served\n"
        c.close()
    assert wait_until(lambda: serve.stats().parked == 0 and serve.stats().unacked == 0)


def test_container_killed_and_restarted_mid_traffic(make: Factory, sockdir: Path) -> None:
    path = sockdir / "r.sock"
    proc = ServeProcess(path)
    try:
        driver = make(path, pool="restart")
        clients, servers = tcp_pairs(3)
        t0 = driver.park(servers[0], token=b"before")
        assert t0
        # Freeze the container, park (sent, never answered), then kill it.
        os.kill(proc.pid, signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(driver.park, servers[1], token=b"in-flight")
            time.sleep(0.3)
            assert not pending.done()
            proc.stop(signal.SIGKILL)
            proc = ServeProcess(path)  # a new container on the same path
            ticket = pending.result(timeout=30)  # re-sent to the new one
        assert servers[1].fileno() == -1
        assert wait_until(lambda: driver.sessions() == 2)
        assert driver.park(servers[2], token=b"after")
        for c in clients[1:]:
            c.sendall(b"ping")
        got = {}
        for _ in range(2):
            w = driver.next_wake(timeout=15)
            got[w.token] = w
        assert got[b"in-flight"].ticket == ticket
        for w in got.values():
            assert w.socket is not None
            assert recv_exactly(w.socket, 4) == b"ping"
            w.socket.close()
        # The first container's parked connection died with it (crash recovery is
        # the container's own job); its client sees the close.
        assert recv_exactly(clients[0], 1) == b""
        for c in clients:
            c.close()
    finally:
        proc.stop()


def test_give_up_raises_container_lost(make: Factory, sockdir: Path) -> None:
    path = sockdir / "g.sock"
    proc = ServeProcess(path)
    backoff = connpark.Backoff(first=0.05, most=0.1, give_up_after=0.5)
    driver = make(path, pool="give-up", backoff=backoff)
    proc.stop(signal.SIGKILL)
    with pytest.raises(connpark.ContainerLost, match=r"could not reconnect within 0\.5 s"):
        driver.next_wake(timeout=10)


def test_no_container_is_one_clear_error(make: Factory, sockdir: Path) -> None:
    with pytest.raises(connpark.ContainerLost) as info:
        make(sockdir / "nothing.sock")
    assert str(info.value) == f"cannot connect to {sockdir / 'nothing.sock'}: no such socket file"
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a container as another uid")
def test_container_running_as_another_uid_is_refused(make: Factory) -> None:
    nobody = 65534
    with tempfile.TemporaryDirectory(prefix="cp-") as d:
        os.chmod(d, 0o777)
        path = Path(d) / "other.sock"
        proc = ServeProcess(
            path,
            ["--allow-uid", "0", "--socket-mode", "0666"],
            preexec_fn=lambda: os.setuid(nobody),
        )
        try:
            with pytest.raises(connpark.ContainerError) as info:
                make(path)
            assert f"runs as uid {nobody}" in str(info.value)
            assert "expected uid 0" in str(info.value)
            trusted = make(path, container_uid=nobody, pool="trusted")
            assert trusted.stats().sessions >= 1
        finally:
            proc.stop()


# ------------------------------------------------------------------ per-world notes


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
    assert recv_exactly(client, 5) == b"pong\n"
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
                out.append((woken.token, recv_exactly(woken.socket, want)))
                woken.socket.close()
            return out

        with ThreadPoolExecutor(n_threads) as pool:
            got = [x for part in pool.map(take, range(n_threads)) for x in part]
    assert sorted(got) == sorted((b"%d" % i, b"msg-%d" % i) for i in range(n))
    for c in clients:
        c.close()


async def test_trio_accepts_a_socket_stream(serve: ServeProcess) -> None:
    (client,), (server,) = tcp_pairs(1)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(server))
    async with connpark.open_parking(serve.path, pool="streams") as parking:
        ticket = await parking.park(stream, token=b"st")
        client.sendall(b"x")
        woken = await parking.wakes().receive()
        assert woken.ticket == ticket
        assert woken.socket is not None
        woken.socket.close()
    client.close()
