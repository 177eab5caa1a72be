"""Review of f2d845a (``Engine.finish_close(queue)``, ``_close_unanswered``,
``Outbox.queued_fds``): ownership holes left at close.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import connpark
import connpark._hook_blocking
import connpark._hook_trio
import connpark.aio
from connpark._fdpass import Outbox
from connpark._shards import shard_of
from connpark._wire import Parked
from connpark._worker import Phase

from . import test_hooks
from ._procs import ServeProcess, recv_exactly, tcp_pairs, wait_until
from .test_engine import FakeSock, entry, ok, parks, settled, started
from .test_hooks import Driver
from .test_review_hooks import FILL_PENDING, closing, park_within, proc

pytestmark = pytest.mark.linux

make = test_hooks.make

__all__ = ["closing", "make", "proc"]  # fixtures


Factory = Callable[..., Driver]


def test_a_frame_queued_at_finish_close_must_not_go_out_after_it(
    make: Factory,
    proc: ServeProcess,
    closing: list[socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``finish_close`` reads the channel's queue (``queued_fds``) and tells the
    parks still in it "still yours" (ParkingClosed, socket left open). But the
    hooks keep sending that queue after it: the threads hook's writer thread
    (``chan.flush`` takes only the channel's lock) until ``_end`` shuts the socket,
    the asyncio hook's ``_session`` finally (``send_now``) and pending flush tasks,
    the trio hook's writer task until the nursery is cancelled. A container that
    reads again in that window parks a socket the caller still has: two owners.

    The window is widened here by a ``finish_close`` that resumes the frozen
    container and then takes its time (as a slow close / GC pause / busy CPU would).
    """
    for hook in (connpark._hook_trio, connpark._hook_blocking, connpark.aio):
        monkeypatch.setattr(hook, "CLOSE_TIMEOUT", 0.5)
    driver = make(proc.path, pool="race")
    # Two PARK frames (1 MiB bodies): the first fills the control socket (its fds
    # go with its first byte, but the frame is cut short: the container discards
    # it), the second, fds and all, stays in the hook's queue.
    n = 20
    clients, servers = tcp_pairs(n)
    closing += [*clients, *servers]
    engine = driver.parking._engine  # type: ignore[attr-defined]
    real_finish = engine.finish_close
    resumed: list[bool] = []

    def slow_finish(*args: Any) -> None:
        real_finish(*args)
        if not resumed:
            resumed.append(True)
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(1.0)

    def before_leaving() -> None:
        engine.finish_close = slow_finish

    outcome = _park_many_and_leave_frozen(
        proc,
        driver,
        servers,
        before_leaving,
        tokens=[b"f%d" % i for i in range(n)],
        pendings=[b"p" * FILL_PENDING] * n,
    )
    assert resumed
    assert len(outcome) == 1
    assert isinstance(outcome[0], connpark.ParkingClosed)
    kept = [i for i, s in enumerate(servers) if s.fileno() != -1]
    # The first frame cut short, the second never sent: every socket is the caller's.
    assert kept == list(range(n))
    # "Still yours": the caller has these. The container must not have them.
    other = make(proc.path, pool="race")
    time.sleep(0.5)
    for i in kept:
        clients[i].sendall(b"y")
    try:
        woken = other.next_wake(timeout=1.5)
    except (AssertionError, TimeoutError):
        return  # no wake: one owner
    except BaseException as exc:  # trio.TooSlowError, asyncio.TimeoutError
        if "Timeout" in type(exc).__name__ or "TooSlow" in type(exc).__name__:
            return
        raise
    if woken.socket is not None:
        closing.append(woken.socket)
    assert woken.token not in {b"f%d" % i for i in kept}, (
        f"{woken.token!r}: left open for the caller at close, and the container"
        " parked it too (its frame went out after finish_close): two owners"
    )


def _second_owner(proc: ServeProcess, pool: str, client: socket.socket, token: bytes) -> bool:
    """Thaw the container; does another worker of ``pool`` get the connection?"""
    os.kill(proc.pid, signal.SIGCONT)
    assert wait_until(lambda: proc.stats() is not None)
    with connpark.BlockingParking(proc.path, pool=pool) as other:
        time.sleep(0.5)  # the PARK is read by now
        client.sendall(b"hi")
        woken = other.next_wake(timeout=3)
        if woken is None:
            return False
        if woken.socket is not None:
            woken.socket.close()
        return woken.token == token


def _one_owner(proc: ServeProcess, client: socket.socket, server: socket.socket) -> None:
    """The caller's copy is closed (the container's alone), or no other worker of
    the pool gets the connection."""
    if server.fileno() != -1:
        assert not _second_owner(proc, "abort", client, b"abort"), (
            "the caller still has the socket and another worker got it: two owners"
        )


def test_trio_leaving_on_an_exception_with_a_park_out_keeps_one_owner(
    proc: ServeProcess,
    closing: list[socket.socket],
) -> None:
    """The body of ``open_parking`` raises while a park is out, unanswered (a
    slow container): no ``_close``, no ``begin_close``. open_parking's finally
    calls ``finish_close(shard._chan)`` with the session already torn down
    (``_chan`` None) and the engine READY, so ``_close_unanswered`` is skipped:
    the cancelled park is let go ("the caller's again"), the socket stays open,
    and the container, reading on, parks it too."""
    import trio

    (client,), (server,) = tcp_pairs(1)
    closing += [client, server]

    async def main() -> None:
        async with connpark.open_parking(proc.path, pool="abort") as parking:
            os.kill(proc.pid, signal.SIGSTOP)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(parking.park, server, token=b"abort"))
                await trio.sleep(0.3)  # the PARK is in the control socket
                raise RuntimeError("the application fails")

    try:
        with pytest.raises(BaseException):  # noqa: B017,PT011  (a group, or the error)
            trio.run(main)
        _one_owner(proc, client, server)
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_asyncio_leaving_on_an_exception_with_a_park_out_keeps_one_owner(
    proc: ServeProcess,
    closing: list[socket.socket],
) -> None:
    """The same with the asyncio hook: its finally calls ``finish_close`` with the
    channel, but the engine is READY (no ``begin_close``): ``_close_unanswered``
    is skipped."""
    import asyncio

    (client,), (server,) = tcp_pairs(1)
    closing += [client, server]

    async def main() -> None:
        async with connpark.aio.open_parking(proc.path, pool="abort") as parking:
            os.kill(proc.pid, signal.SIGSTOP)
            task = asyncio.ensure_future(parking.park(server, token=b"abort"))
            await asyncio.sleep(0.3)  # the PARK is in the control socket
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise RuntimeError("the application fails")

    try:
        with pytest.raises(RuntimeError):
            asyncio.run(main())
        _one_owner(proc, client, server)
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_a_held_retry_failed_at_close_closes_the_copy_its_first_park_gave_away() -> None:
    """A park_many retry held behind two abandoned parks: the first answered OK
    (the container has that connection: ticket 7), the second unanswered when the
    wait at close runs out. ``_close_unanswered`` closes the retry's copy behind the
    second and fails the retry, but the copy behind the first (a dup: another
    object, same connection) stays open: the container has it too."""
    engine, peer = started()
    (a, a_peer), (b, b_peer) = socket.socketpair(), socket.socketpair()
    try:
        sa, sb = FakeSock(a.fileno()), FakeSock(b.fileno())
        first = engine.park([sa], [entry(sa)], None)
        second = engine.park([sb], [entry(sb)], None)
        (p1,) = parks(peer.recv())  # one PARK request carries both
        engine.withdraw(first)
        engine.withdraw(second)
        twin_a = FakeSock(os.dup(a.fileno()), real=True)
        twin_b = FakeSock(os.dup(b.fileno()), real=True)
        retry = engine.park([twin_a, twin_b], [entry(twin_a), entry(twin_b)], None)
        assert parks(peer.recv()) == []  # held
        peer.send(Parked(p1.request_id, ok(7)))  # the first is answered: OK
        assert settled(peer.events()) == []  # still held behind the second
        assert engine.begin_close() is not None
        engine.finish_close(Outbox(own_fds=False))  # nothing queued: it all went out
        assert twin_b.closed
        assert twin_a.closed, "the container has it (ticket 7), and so does the caller"
        with pytest.raises(connpark.ParkingClosed):
            retry.outcome()
    finally:
        for s in (twin_a, twin_b):
            s.close()
        for s in (a, a_peer, b, b_peer):
            s.close()


def test_leaving_with_parks_unanswered_in_several_frames_keeps_every_one(
    make: Factory,
    proc: ServeProcess,
    closing: list[socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three parks out, unanswered, each in its own PARK frame (a frozen container),
    when the wait at close runs out: the hook closes the caller's copies, counting
    on the container to read on and keep them. It resumes: it parks the first
    frame, its PARKED to the closed socket fails (EPIPE), and that ended the session
    at once, so the fds of the next frames were closed: two connections lost."""
    for hook in (connpark._hook_trio, connpark._hook_blocking, connpark.aio):
        monkeypatch.setattr(hook, "CLOSE_TIMEOUT", 0.5)
    driver = make(proc.path, pool="frames")
    clients, servers = tcp_pairs(3)
    closing += [*clients, *servers]
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        for i, server in enumerate(servers):
            assert park_within(driver, server, 0.2, token=b"f%d" % i) is None
        driver.shutdown()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert [s.fileno() for s in servers] == [-1] * 3  # every PARK reached the container
    assert wait_until(lambda: proc.stats().parked == 3, timeout=3), (
        f"{proc.stats().parked} of 3 kept: the others' caller copies were closed too"
    )
    with connpark.BlockingParking(proc.path, pool="frames") as other:
        for c in clients:
            c.sendall(b"x")
        tokens = set()
        while len(tokens) < 3 and (woken := other.next_wake(timeout=3)) is not None:
            tokens.add(woken.token)
            if woken.socket is not None:
                woken.socket.close()
    assert tokens == {b"f0", b"f1", b"f2"}


def test_trio_a_wake_read_as_the_handle_closes_is_not_dropped(proc: ServeProcess) -> None:
    """Leaving ``open_parking``: ``_close`` empties the wake queue to hand back what
    nobody took, then started a task per shard that calls ``begin_close``. A WAKE
    already in the control socket is read in between (trio runs the session task
    and that one in either order): ACKed, queued for nobody, and its connection
    closed at the end. It must be handed back, or left un-ACKed for another
    worker. (Each round has one chance in two to order the tasks so.)"""
    import trio

    before = len(os.listdir("/proc/self/fd"))
    for rnd in range(8):
        pool = f"window-{rnd}"
        (client,), (server,) = tcp_pairs(1)

        async def main(server: socket.socket = server, pool: str = pool) -> None:
            async with connpark.open_parking(proc.path, pool=pool) as parking:
                ticket = await parking.park(server)
                await parking.unpark(ticket)
                time.sleep(0.2)  # noqa: ASYNC251  (no checkpoint: the WAKE waits unread)

        try:
            trio.run(main)
            client.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                assert client.recv(1, socket.MSG_PEEK) != b"", (
                    f"round {rnd}: the woken connection was closed as the handle closed"
                )
        finally:
            client.close()
            server.close()
    assert len(os.listdir("/proc/self/fd")) == before


def _closed_by_peer(client: socket.socket) -> bool:
    client.settimeout(0.3)
    try:
        return client.recv(1, socket.MSG_PEEK) == b""
    except TimeoutError:
        return False


def test_leaving_on_an_exception_hands_back_the_wakes_nobody_took(proc: ServeProcess) -> None:
    """README: wakes not taken when you leave the block are parked again. The trio
    and asyncio hooks skipped ``_close`` when the block raised (a cancelled task,
    a failing worker), and closed those wakes, ACKed and in no one's hands: the
    clients were dropped. (The threads hook's ``__exit__`` always hands back.)"""
    import asyncio

    import trio

    before = len(os.listdir("/proc/self/fd"))
    (c1, c2), (s1, s2) = tcp_pairs(2)
    try:

        async def trio_main() -> None:
            async with connpark.open_parking(proc.path, pool="exc") as parking:
                await parking.unpark(await parking.park(s1, token=b"trio"))
                await trio.sleep(0.3)  # the wake is queued, untaken
                raise RuntimeError("the application fails")

        async def asyncio_main() -> None:
            async def body() -> None:
                async with connpark.aio.open_parking(proc.path, pool="exc") as parking:
                    await parking.unpark(await parking.park(s2, token=b"asyncio"))
                    await asyncio.sleep(100)  # cancelled, the wake queued, untaken

            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(body(), 0.5)

        with pytest.raises(RuntimeError):
            trio.run(trio_main)
        asyncio.run(asyncio_main())
        assert not _closed_by_peer(c1), "trio: the untaken wake was closed"
        assert not _closed_by_peer(c2), "asyncio: the untaken wake was closed"
        with connpark.BlockingParking(proc.path, pool="exc") as other:
            c1.sendall(b"x")
            c2.sendall(b"x")
            tokens = set()
            while len(tokens) < 2 and (woken := other.next_wake(timeout=3)) is not None:
                tokens.add(woken.token)
                if woken.socket is not None:
                    woken.socket.close()
        assert tokens == {b"trio", b"asyncio"}
    finally:
        for s in (c1, c2, s1, s2):
            s.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_trio_cancelled_around_the_handle_with_a_park_out_keeps_one_owner(
    proc: ServeProcess,
) -> None:
    """A cancel scope around ``open_parking`` (the usual way to stop a trio
    worker) fires while a park is out to a slow container. It cancels the body and
    the session task at once; when the session task's finally ran first, it
    dropped the channel, and open_parking's ``finish_close(None)`` then told the
    park "still yours" (socket open) though its PARK had reached the container,
    which parks it on resuming: two owners. (Each round: one chance in two or so.)"""
    import trio

    before = len(os.listdir("/proc/self/fd"))
    for rnd in range(6):
        (client,), (server,) = tcp_pairs(1)
        parked = proc.stats().parked

        async def main(server: socket.socket = server, rnd: int = rnd) -> None:
            with trio.move_on_after(0.3):
                async with connpark.open_parking(proc.path, pool=f"outer-{rnd}") as parking:
                    os.kill(proc.pid, signal.SIGSTOP)
                    await parking.park(server)

        try:
            trio.run(main)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        try:
            assert wait_until(lambda n=parked + 1: proc.stats().parked == n, timeout=3)
            assert server.fileno() == -1, (
                f"round {rnd}: the container parked it, and the caller's copy is open"
            )
        finally:
            client.close()
            server.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_asyncio_cancelled_with_the_handle_with_a_park_out_keeps_one_owner(
    proc: ServeProcess,
) -> None:
    """The same with asyncio: the task holding the handle is left running when
    ``asyncio.run``'s main returns, and is cancelled together with the hook's
    session tasks; the session's finally, run first, dropped the channel."""
    import asyncio

    before = len(os.listdir("/proc/self/fd"))
    for rnd in range(6):
        (client,), (server,) = tcp_pairs(1)
        parked = proc.stats().parked

        async def main(server: socket.socket = server, rnd: int = rnd) -> None:
            async def body() -> None:
                async with connpark.aio.open_parking(proc.path, pool=f"left-{rnd}") as parking:
                    os.kill(proc.pid, signal.SIGSTOP)
                    await parking.park(server)

            task = asyncio.get_running_loop().create_task(body())
            await asyncio.sleep(0.3)
            assert not task.done()  # asyncio.run cancels it, and the hook's tasks, at once

        try:
            asyncio.run(main())
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        try:
            assert wait_until(lambda n=parked + 1: proc.stats().parked == n, timeout=3)
            assert server.fileno() == -1, (
                f"round {rnd}: the container parked it, and the caller's copy is open"
            )
        finally:
            client.close()
            server.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_leaving_with_a_park_frame_cut_short_leaves_its_sockets_the_caller_s(
    make: Factory,
    proc: ServeProcess,
    closing: list[socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A frozen container, a PARK frame bigger than the control socket takes: half
    written when the wait at close runs out. The hook closes the socket, so the
    container reads part of the frame, then the end, and closes its fds (it never
    admits a frame cut short). The sockets are the caller's: before, the hook
    closed them as having reached the container, and every connection was lost."""
    for hook in (connpark._hook_trio, connpark._hook_blocking, connpark.aio):
        monkeypatch.setattr(hook, "CLOSE_TIMEOUT", 0.5)
    baseline = proc.fd_count()
    driver = make(proc.path, pool="cut")
    n = 8
    clients, servers = tcp_pairs(n)
    closing += [*clients, *servers]
    outcome = _park_many_and_leave_frozen(
        proc, driver, servers, lambda: None, pendings=[b"p" * FILL_PENDING] * n
    )
    assert len(outcome) == 1
    assert isinstance(outcome[0], connpark.ParkingClosed), outcome
    assert [s.fileno() != -1 for s in servers] == [True] * n, "closed: nobody owns them"
    assert wait_until(lambda: proc.fd_count() == baseline), "the container kept fds"
    assert proc.stats().parked == 0
    assert "mid-frame" in proc.log_text()
    for client, server in zip(clients, servers, strict=True):
        client.sendall(b"yours")
        assert recv_exactly(server, 5) == b"yours"


def _park_many_and_leave_frozen(
    proc: ServeProcess,
    driver: Driver,
    socks: list[socket.socket],
    before_leaving: Callable[[], None],
    **kw: Any,
) -> list[BaseException | object]:
    """``park_many(socks, **kw)`` (another thread) against the container frozen,
    then leave (``shutdown``: the wait at close runs out); thaw it. The outcome."""
    outcome: list[BaseException | object] = []

    def park() -> None:
        try:
            outcome.append(driver.park_many(socks, **kw))
        except BaseException as exc:
            outcome.append(exc)

    os.kill(proc.pid, signal.SIGSTOP)
    guard = threading.Timer(20.0, os.kill, (proc.pid, signal.SIGCONT))
    guard.start()
    try:
        parker = threading.Thread(target=park, daemon=True)
        parker.start()
        time.sleep(0.5)  # the first frame is half written: the socket took what it could
        before_leaving()
        driver.shutdown()
        parker.join(10)
    finally:
        guard.cancel()
        os.kill(proc.pid, signal.SIGCONT)
    return outcome


def _lost(driver: Driver) -> bool:
    return driver.parking._engine.phase is Phase.LOST  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize("what", ["untaken", "resent"])
def test_leaving_while_the_container_restarts_waits_for_it(
    make: Factory,
    sockdir: Path,
    closing: list[socket.socket],
    what: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The container dies (a crash, an upgrade) and the hook leaves before it has
    reconnected. ``untaken``: wakes nobody took were closed (no session to hand
    them to): their connections lost. ``resent``: a park the dead container never
    answered was failed "still yours", though a container restored from its
    mirror may hold it. Now leaving waits (bounded) for the session to come back,
    then hands the wakes back and has the re-sent park answered."""
    if make.kind == "blocking":  # type: ignore[attr-defined]
        # The reader thread preempted between WELCOME (READY) and encoding the
        # re-sent parks: leaving must not take READY as settled and fail them.
        real_flush = connpark.BlockingParking._flush

        def slow_flush(self: connpark.BlockingParking) -> None:
            if threading.current_thread() is getattr(self, "_reader", None) and self._engine._batch:
                time.sleep(0.1)
            real_flush(self)

        monkeypatch.setattr(connpark.BlockingParking, "_flush", slow_flush)
    path = sockdir / "c.sock"
    first = ServeProcess(path)
    second: list[ServeProcess] = []
    try:
        driver = make(path, pool="restart")
        clients, servers = tcp_pairs(2)
        closing += [*clients, *servers]
        outcome: list[BaseException | object] = []
        if what == "untaken":
            tickets = driver.park_many(servers, tokens=[b"u0", b"u1"])  # type: ignore[attr-defined]
            for t in tickets:
                driver.unpark(t)
            assert wait_until(lambda: first.stats().parked == 0)  # woken, ACKed: the hook's
            first.stop(signal.SIGKILL)
        else:
            os.kill(first.pid, signal.SIGSTOP)
            parker = threading.Thread(
                target=lambda: outcome.append(_outcome(driver.park_many, servers, [b"u0", b"u1"])),
                daemon=True,
            )
            parker.start()
            time.sleep(0.3)  # the PARK is out, unanswered
            first.stop(signal.SIGKILL)
        assert wait_until(lambda: _lost(driver), timeout=5)
        starter = threading.Thread(target=lambda: second.append(ServeProcess(path)))
        starter.start()
        driver.shutdown()  # while the session is lost: it waits for the new container
        starter.join(20)
        if what == "resent":
            parker.join(10)
            assert len(outcome) == 1
            assert all(isinstance(t, int) for t in outcome[0]), outcome  # type: ignore[attr-defined]
        assert [s.fileno() for s in servers] == [-1, -1] or what == "untaken"
        (new,) = second
        assert wait_until(lambda: new.stats().parked == 2), f"lost at close: {new.stats()}"
        with connpark.BlockingParking(path, pool="restart") as other:
            for c in clients:
                c.sendall(b"back")
            tokens = set()
            while len(tokens) < 2 and (woken := other.next_wake(timeout=5)) is not None:
                tokens.add(woken.token)
                assert woken.socket is not None
                assert recv_exactly(woken.socket, 4) == b"back"
                woken.socket.close()
        assert tokens == {b"u0", b"u1"}
    finally:
        for p in (first, *second):
            if p.proc.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
            p.stop()


def _outcome(call: Callable[..., Any], socks: list[socket.socket], tokens: list[bytes]) -> object:
    try:
        return call(socks, tokens=tokens)
    except BaseException as exc:
        return exc


def test_leaving_while_a_shard_restarts_hands_its_wake_back_to_it(sockdir: Path) -> None:
    """``--shards 2``: a wake of shard 1 read and not yet ACKed (another thread is
    mid-send) when shard 1 dies; the handle leaves while it reconnects, shard 0 up.
    The wake went back to shard 0 at once, while the restored shard 1 kept its
    own copy in quarantine (no resume tickets came): after ``--restore-grace`` it
    woke the connection again, a second copy. Now leaving waits for shard 1."""
    path = sockdir / "c.sock"
    proc = ServeProcess(path, ["--shards", "2", "--restore-grace", "1"])
    clients, servers = tcp_pairs(2)
    try:
        parking = connpark.BlockingParking(path, pool="q")
        tickets = [parking.park(s, token=b"t%d" % i) for i, s in enumerate(servers)]
        mine = [shard_of(t) for t in tickets].index(1)
        shard = parking._shards[1]
        pid = {p.shard: p.pid for p in parking.stats().processes if p.role == "shard"}[1]
        shard._send_lock.acquire()  # another thread mid-send on shard 1: the ACK waits
        try:
            with shard._lock:
                shard._engine.unpark([tickets[mine]])
                frames = shard._engine.data_to_send()
            assert shard._chan is not None
            shard._chan.try_send(frames)
            assert wait_until(lambda: parking._wakes.qsize() == 1, 5), "no wake"
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        finally:
            shard._send_lock.release()
        assert wait_until(lambda: shard._engine.phase is not Phase.READY, 5)
        parking.shutdown()
        time.sleep(2.0)  # past the restored shard's --restore-grace
        with connpark.BlockingParking(path, pool="q") as other:
            clients[mine].sendall(b"hi")
            tokens = []
            while (woken := other.next_wake(timeout=3)) is not None:
                tokens.append(woken.token)
                if woken.socket is not None:
                    woken.socket.close()
        assert tokens == [b"t%d" % mine], "the connection was parked twice"
    finally:
        for s in (*clients, *servers):
            s.close()
        proc.stop()
