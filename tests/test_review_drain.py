"""A hook whose send fails still reads what the container wrote before it went.

A fake container (a unix socket speaking the protocol by hand) takes a PARK,
answers it OK and closes at once; before the hook has read that PARKED,
another of its sends fails (EPIPE). A hook that ended the session there
dropped the PARKED and re-sent the park, flagged RESENT, to the next session:
a container that already held the connection (restored from its mirror as
confirmed) would park it a second time, two tickets for one connection. Each
hook must instead read on until EOF: the park gets its ticket, the socket is
closed, and the next session never sees it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio

import connpark
import connpark.aio
from connpark import _hook_blocking
from connpark._fdpass import BlockingChannel
from connpark._unixsock import listen_unix
from connpark._wire import (
    MAX_TOKEN,
    Decoder,
    Hello,
    Message,
    Park,
    Parked,
    ParkResult,
    Refusal,
    Unpark,
    Welcome,
)
from connpark._worker import ReqState, SessionLost

from ._procs import tcp_pairs
from .conftest import open_fd_count
from .test_engine import FakeSock, entry, ok, parks, settled, started

pytestmark = pytest.mark.linux

FIRST_TICKET = 777
BACKOFF = connpark.Backoff(first=0.05, most=0.2, give_up_after=10.0)
Ident = tuple[Any, Any]


def ident(sock: socket.socket) -> Ident:
    """Which TCP connection a socket is (the same for every fd of it)."""
    return sock.getsockname(), sock.getpeername()


class FakeContainer:
    """Two sessions on one path. The first takes one PARK, waits for ``go``, answers
    it OK (``FIRST_TICKET``) and closes at once; the second answers every PARK OK
    and records each entry as (connection, resent)."""

    def __init__(self, path: Path) -> None:
        self.listener = listen_unix(path)
        self.listener.settimeout(10)
        self.got_park = threading.Event()
        self.go = threading.Event()
        self.closed = threading.Event()
        self.stop = threading.Event()
        self.first: list[Ident] = []
        self.second: list[tuple[Ident, bool]] = []
        self.second_msgs: list[Message] = []
        self.error: BaseException | None = None
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _accept(self, session_id: int) -> tuple[BlockingChannel, Decoder]:
        conn, _ = self.listener.accept()
        chan, decoder = BlockingChannel(conn), Decoder()
        hello = chan.receive_message(decoder, timeout=5)
        assert isinstance(hello, Hello), hello
        chan.send(Welcome(session_id, MAX_TOKEN, 1 << 16))
        return chan, decoder

    def _took(self, fd: int) -> Ident:
        sock = socket.socket(fileno=fd)
        self._held.append(sock)  # the container holds it now
        return ident(sock)

    def _run(self) -> None:
        try:
            chan, decoder = self._accept(1)
            park = chan.receive_message(decoder, timeout=5)
            assert isinstance(park, Park), park
            self.first = [self._took(e.fd) for e in park.entries]
            self.got_park.set()
            assert self.go.wait(5)
            chan.send(Parked(park.request_id, (ParkResult(Refusal.OK, FIRST_TICKET),)))
            decoder.close()
            chan.close()  # dies right after writing PARKED
            self.closed.set()
            chan, decoder = self._accept(2)
            ticket = 900
            while not self.stop.is_set():
                try:
                    msg = chan.receive_message(decoder, timeout=0.05)
                except TimeoutError:
                    continue
                if msg is None:
                    break
                self.second_msgs.append(msg)
                if isinstance(msg, Park):
                    results = []
                    for e in msg.entries:
                        self.second.append((self._took(e.fd), e.resent))
                        ticket += 1
                        results.append(ParkResult(Refusal.OK, ticket))
                    chan.send(Parked(msg.request_id, tuple(results)))
            decoder.close()
            chan.close()
        except BaseException as exc:  # reported by close()
            self.error = exc

    def close(self) -> None:
        self.go.set()
        self.stop.set()
        self._thread.join(10)
        self.listener.close()
        for s in self._held:
            s.close()
        assert not self._thread.is_alive()


@pytest.fixture
def setup(sockdir: Path) -> Iterator[tuple[FakeContainer, socket.socket, socket.socket]]:
    """The fake container, and two worker-side connections X and Y to park."""
    before = open_fd_count()
    fake = FakeContainer(sockdir / "c.sock")
    clients, (x, y) = tcp_pairs(2)
    try:
        yield fake, x, y
    finally:
        fake.close()
        for s in (*clients, x, y):
            s.close()
    assert open_fd_count() == before, "fds leaked"


def check(fake: FakeContainer, x_id: Ident, y_id: Ident, x: socket.socket, got: Any) -> None:
    """X got the first session's ticket and is closed; the second session saw Y
    (not re-sent) and never X."""
    assert fake.error is None, fake.error
    assert fake.first == [x_id]
    assert got["x"] == FIRST_TICKET, "the PARKED the dead container wrote was dropped"
    assert x.fileno() == -1, "X is parked: the worker's copy must be closed"
    assert x_id not in [c for c, _ in fake.second], "X re-sent: parked twice, two owners"
    assert fake.second == [(y_id, False)]
    assert isinstance(got["y"], int)


def test_the_engine_takes_answers_after_a_failed_send_and_re_sends_only_the_rest() -> None:
    """Sans-IO: after ``send_failed`` nothing goes out; a PARKED read then settles
    its park (one owner), parks made meanwhile wait for the next session, and EOF
    ends the session with the send's error."""
    engine, peer = started()
    x, z = FakeSock(), FakeSock()
    rx = engine.park([x], [entry(x)], None)
    rz = engine.park([z], [entry(z)], None)
    px = parks(peer.recv())[0]
    assert [e.fd for e in px.entries] == [x.fd, z.fd]  # one batch
    broken = connpark.ContainerLost("lost the container: broken pipe")
    engine.send_failed(broken)
    y = FakeSock()
    ry = engine.park([y], [entry(y)], None)
    engine.unpark([5])
    assert engine.data_to_send() == []
    assert not engine.ready
    assert engine.connected
    peer.send(Parked(px.request_id, ok(41)))  # answers X only: Z's answer never came
    assert rx in settled(peer.events())
    assert rx.outcome() == [41]
    assert x.closed
    engine.receive_eof()
    assert engine.last_error is broken
    assert [type(ev) for ev in peer.events()] == [SessionLost]
    peer.connect()
    peer.welcome()
    msgs = peer.recv()
    assert Unpark((5,)) in msgs  # UNPARKs are re-sent
    entries = [e for p in parks(msgs) for e in p.entries]
    assert [(e.fd, e.resent) for e in entries] == [(z.fd, True), (y.fd, False)]
    assert not z.closed
    assert not y.closed
    assert rz.state is ry.state is ReqState.SENT


def test_trio_reads_the_parked_of_a_dead_container_after_a_failed_send(
    setup: tuple[FakeContainer, socket.socket, socket.socket],
) -> None:
    fake, x, y = setup
    x_id, y_id = ident(x), ident(y)
    got: dict[str, Any] = {}

    async def main() -> None:
        with trio.fail_after(9):
            async with connpark.open_parking(
                fake.listener.getsockname(), backoff=BACKOFF
            ) as parking:

                async def park_x() -> None:
                    got["x"] = await parking.park(x)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(park_x)
                    assert await trio.to_thread.run_sync(fake.got_park.wait, 5)
                    fake.go.set()
                    # The loop is blocked: the reader cannot take the PARKED yet.
                    assert fake.closed.wait(5)
                    await parking.unpark(12345)  # sent at once: EPIPE
                got["y"] = await parking.park(y)

    trio.run(main)
    check(fake, x_id, y_id, x, got)


def test_threads_read_the_parked_of_a_dead_container_after_a_failed_send(
    setup: tuple[FakeContainer, socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader thread has the PARKED's bytes but has not fed them to the engine
    (descheduled) when another thread's send fails."""
    fake, x, y = setup
    x_id, y_id = ident(x), ident(y)
    hold, inside, release = threading.Event(), threading.Event(), threading.Event()
    real = _hook_blocking.recv_fds

    def gated(sock: socket.socket, *args: Any) -> tuple[bytes, list[int]]:
        data, fds = real(sock, *args)
        if hold.is_set() and data:
            inside.set()
            release.wait(5)
        return data, fds

    monkeypatch.setattr(_hook_blocking, "recv_fds", gated)
    got: dict[str, Any] = {}
    try:
        with connpark.BlockingParking(fake.listener.getsockname(), backoff=BACKOFF) as parking:
            hold.set()
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(parking.park, x, timeout=6)
                assert fake.got_park.wait(5)
                fake.go.set()
                assert fake.closed.wait(5)
                assert inside.wait(5)  # the reader holds the PARKED
                hold.clear()
                parking.unpark(12345)  # EPIPE
                release.set()
                got["x"] = future.result(8)
            got["y"] = parking.park(y, timeout=5)
    finally:
        release.set()
    check(fake, x_id, y_id, x, got)


def test_asyncio_reads_the_parked_of_a_dead_container_after_a_failed_send(
    setup: tuple[FakeContainer, socket.socket, socket.socket],
) -> None:
    fake, x, y = setup
    x_id, y_id = ident(x), ident(y)
    x.setblocking(False)
    y.setblocking(False)
    got: dict[str, Any] = {}

    async def body() -> None:
        async with connpark.aio.open_parking(
            fake.listener.getsockname(), backoff=BACKOFF
        ) as parking:
            task = asyncio.create_task(parking.park(x))
            assert await asyncio.to_thread(fake.got_park.wait, 5)
            fake.go.set()
            # The loop is blocked: the reader cannot take the PARKED yet.
            assert fake.closed.wait(5)
            await parking.unpark(12345)  # sent at once: EPIPE
            got["x"] = await asyncio.wait_for(task, 5)
            got["y"] = await asyncio.wait_for(parking.park(y), 5)

    async def main() -> None:
        await asyncio.wait_for(body(), 9)

    asyncio.run(main())
    check(fake, x_id, y_id, x, got)


class DeafContainer:
    """Two sessions: the first stops reading (SHUT_RD) right after WELCOME but keeps
    its end open, so a worker's send fails (EPIPE) and no EOF ever comes."""

    def __init__(self, path: Path) -> None:
        self.listener = listen_unix(path)
        self.listener.settimeout(10)
        self.both = threading.Event()
        self.deaf = threading.Event()
        self.error: BaseException | None = None
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for sid in (1, 2):
                conn, _ = self.listener.accept()
                self._held.append(conn)
                chan, decoder = BlockingChannel(conn), Decoder()
                assert isinstance(chan.receive_message(decoder, timeout=5), Hello)
                chan.send(Welcome(sid, MAX_TOKEN, 1 << 16))
                decoder.close()
                if sid == 1:
                    conn.shutdown(socket.SHUT_RD)
                    self.deaf.set()
            self.both.set()
        except BaseException as exc:  # reported by close()
            self.error = exc

    def close(self) -> None:
        self._thread.join(12)
        self.listener.close()
        for s in self._held:
            s.close()


@pytest.mark.parametrize("kind", ["trio", "threads", "asyncio"])
def test_a_failed_send_with_no_eof_ends_the_session_within_the_drain_bound(
    sockdir: Path, kind: str
) -> None:
    """The container stops reading but keeps its end open: the send fails and no
    EOF comes. The hook ends the session after the drain (~1 s) and reconnects."""
    fake = DeafContainer(sockdir / "c.sock")
    path = sockdir / "c.sock"
    took: list[float] = []

    async def trio_main() -> None:
        async with connpark.open_parking(path, backoff=BACKOFF) as parking:
            assert await trio.to_thread.run_sync(fake.deaf.wait, 5)
            start = trio.current_time()
            await parking.unpark(1)  # EPIPE: the container reads no more
            with trio.move_on_after(5):
                while parking.sessions < 2:
                    await trio.sleep(0.02)
            took.append(trio.current_time() - start)

    async def asyncio_main() -> None:
        async with connpark.aio.open_parking(path, backoff=BACKOFF) as parking:
            assert await asyncio.to_thread(fake.deaf.wait, 5)
            start = time.monotonic()
            await parking.unpark(1)
            deadline = start + 5
            while parking.sessions < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            took.append(time.monotonic() - start)

    try:
        if kind == "trio":
            trio.run(trio_main)
        elif kind == "asyncio":
            asyncio.run(asyncio.wait_for(asyncio_main(), 9))
        else:
            with connpark.BlockingParking(path, backoff=BACKOFF) as parking:
                assert fake.deaf.wait(5)
                start = time.monotonic()
                parking.unpark(1)
                while parking.sessions < 2 and time.monotonic() < start + 5:
                    time.sleep(0.02)
                took.append(time.monotonic() - start)
    finally:
        fake.close()
    assert fake.error is None, fake.error
    assert fake.both.is_set(), "the hook did not reconnect"
    assert took[0] < 4
