"""A hostile review of the worker hooks: one owner under cancellation, timeouts,
stopped and killed containers.

Each test drives a real ``connpark serve`` subprocess and real loopback TCP
connections through the three hooks (the drivers of ``test_hooks``); the
container is frozen with SIGSTOP / SIGCONT or killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import connpark
from connpark._fdpass import Outbox, close_fds
from connpark._wire import Parked, ParkResult, Refusal

from . import test_hooks
from ._procs import ServeProcess, recv_exactly, take_number, tcp_pairs, wait_until
from .test_engine import FakeSock, entry, ok, parks, settled, started
from .test_hooks import AsyncioDriver, BlockingDriver, Driver, TrioDriver

pytestmark = pytest.mark.linux

make = test_hooks.make  # the drivers fixture: each kind, shut down and fd-checked

Factory = Callable[..., Driver]


@pytest.fixture
def proc(sockdir: Path) -> Iterator[ServeProcess]:
    """A container of the test's own (it gets frozen): resumed and stopped at the end."""
    p = ServeProcess(sockdir / "c.sock")
    yield p
    if p.proc.poll() is None:
        os.kill(p.pid, signal.SIGCONT)
    p.stop()


@pytest.fixture
def closing() -> Iterator[list[socket.socket]]:
    """Sockets closed at the end whatever happens (before ``make`` counts fds)."""
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def park_within(driver: Driver, sock: socket.socket, seconds: float, **kw: Any) -> int | None:
    """``park`` with each world's deadline; None when it passed."""
    if isinstance(driver, BlockingDriver):
        try:
            return driver.parking.park(sock, timeout=seconds, **kw)
        except connpark.ContainerTimeout:
            return None
    if isinstance(driver, AsyncioDriver):
        return driver._within(driver.parking.park(sock, **kw), seconds)  # type: ignore[no-any-return]
    assert isinstance(driver, TrioDriver)
    return driver._within(functools.partial(driver.parking.park, sock, **kw), seconds)  # type: ignore[no-any-return]


def no_wake_within(driver: Driver, seconds: float) -> bool:
    try:
        woken = driver.next_wake(timeout=seconds)
    except (AssertionError, TimeoutError):
        return True
    except BaseException as exc:  # trio.TooSlowError, asyncio.TimeoutError
        if "Timeout" in type(exc).__name__ or "TooSlow" in type(exc).__name__:
            return True
        raise
    if woken.socket is not None:
        woken.socket.close()
    return False


# ------------------------------------------------------------------ timeouts, retries


def test_a_park_retried_after_a_timeout_parks_the_connection_once(
    make: Factory, proc: ServeProcess
) -> None:
    """Timed out twice against a frozen container, then it resumes: both PARKs
    reach it. The connection must be parked once and wake once, not twice."""
    driver = make(proc.path, pool="retry")
    (client,), (server,) = tcp_pairs(1)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert park_within(driver, server, 0.3, token=b"first") is None
        assert server.fileno() != -1  # "still yours": so the caller tries again
        assert park_within(driver, server, 0.3, token=b"again") is None
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # The container took it after all: the hook closes the caller's copy.
    assert wait_until(lambda: server.fileno() == -1)
    assert wait_until(lambda: proc.stats().parks_total >= 1)
    time.sleep(0.3)  # the second PARK, if sent, is read by now
    client.sendall(b"ping")
    woken = driver.next_wake(timeout=10)
    assert woken.socket is not None
    assert recv_exactly(woken.socket, 4) == b"ping"
    twice = not no_wake_within(driver, 1.0)
    woken.socket.close()
    client.close()
    assert not twice, "one connection was delivered twice"
    assert proc.stats().parked == 0


def park_many_within(
    driver: Driver, socks: list[socket.socket], seconds: float, **kw: Any
) -> list[Any] | None:
    """``park_many`` with each world's deadline; None when it passed."""
    if isinstance(driver, BlockingDriver):
        try:
            return driver.parking.park_many(socks, timeout=seconds, **kw)
        except connpark.ContainerTimeout:
            return None
    if isinstance(driver, AsyncioDriver):
        return driver._within(driver.parking.park_many(socks, **kw), seconds)  # type: ignore[no-any-return]
    assert isinstance(driver, TrioDriver)
    return driver._within(functools.partial(driver.parking.park_many, socks, **kw), seconds)  # type: ignore[no-any-return]


#: Enough PARK bytes to fill the control socket while the container reads nothing.
FILL = 8
FILL_PENDING = 60_000


def test_a_park_timing_out_behind_a_full_control_socket_keeps_its_deadline(
    make: Factory,
    proc: ServeProcess,
    closing: list[socket.socket],
) -> None:
    """A frozen container that reads nothing: the PARK cannot all be written. The
    caller's deadline still holds (threads: ``timeout=`` covers the write too)."""
    driver = make(proc.path, pool="full")
    clients, servers = tcp_pairs(FILL)
    closing += clients + servers
    os.kill(proc.pid, signal.SIGSTOP)
    guard = threading.Timer(3.0, os.kill, (proc.pid, signal.SIGCONT))  # a hang ends
    guard.start()
    try:
        t0 = time.monotonic()
        got = park_many_within(driver, servers, 0.3, pendings=[b"p" * FILL_PENDING] * FILL)
        took = time.monotonic() - t0
    finally:
        guard.cancel()
        os.kill(proc.pid, signal.SIGCONT)
    assert got is None
    assert took < 2, f"park_many(timeout=0.3) returned after {took:.1f} s"
    assert wait_until(lambda: all(s.fileno() == -1 for s in servers))  # taken after all
    for c in clients:
        c.close()


def test_a_cancelled_park_still_queued_cannot_carry_a_reused_fd_number(
    make: Factory,
    proc: ServeProcess,
    closing: list[socket.socket],
) -> None:
    """A PARK stuck behind a full control socket is cancelled: the socket is "still
    yours", so the caller closes it, and the fd number goes to a new connection.
    When the container reads again, it must not get that new connection."""
    driver = make(proc.path, pool="reuse")
    clients, servers = tcp_pairs(FILL)
    (vclient,), (victim,) = tcp_pairs(1)
    (nclient,), (newcomer,) = tcp_pairs(1)
    closing += [*clients, *servers, vclient, victim, nclient, newcomer]
    os.kill(proc.pid, signal.SIGSTOP)
    guard = threading.Timer(3.0, os.kill, (proc.pid, signal.SIGCONT))  # a hang ends
    guard.start()
    try:
        assert park_many_within(driver, servers, 0.3, pendings=[b"p" * FILL_PENDING] * FILL) is None
        assert park_within(driver, victim, 0.3, token=b"victim") is None
        assert victim.fileno() != -1, "never sent: the caller's"
        newcomer = take_number(victim, newcomer)  # the caller's to close; the number reused
        closing.append(newcomer)
    finally:
        guard.cancel()
        os.kill(proc.pid, signal.SIGCONT)
    assert wait_until(lambda: all(s.fileno() == -1 for s in servers))
    time.sleep(0.5)  # every queued frame is read by now
    vclient.settimeout(0.5)
    try:
        closed = vclient.recv(1) == b""  # never sent: the caller's close ended it
    except TimeoutError:
        closed = False
    if not closed:  # sent before the cancel: the container took it after all
        vclient.sendall(b"late")
        woken = driver.next_wake(timeout=10)
        assert woken.token == b"victim"
        assert woken.socket is not None
        woken.socket.close()
    nclient.sendall(b"mine")
    stolen = not no_wake_within(driver, 1.0)
    assert newcomer.recv(4, socket.MSG_DONTWAIT) == b"mine"
    for s in (newcomer, vclient, nclient, *clients):
        s.close()
    assert not stolen, "the container took a connection nobody parked"


# ------------------------------------------------------------------ the engine alone


def test_a_park_withdrawn_while_reconnecting_is_still_sent_again() -> None:
    """Sent, then the session is lost: the container may hold the socket (a shard
    restored from its mirror). Cancelled while the hook reconnects, the park must
    still go out again (RESENT), so the answer decides the owner."""
    engine, peer = started()
    sock = FakeSock()
    req = engine.park([sock], [entry(sock)], None)
    (first,) = parks(peer.recv())
    engine.receive_eof()
    peer.events()
    engine.withdraw(req)  # the caller's deadline passes during the backoff
    peer.connect()
    peer.welcome()
    (again,) = parks(peer.recv())
    assert [e.resent for e in again.entries] == [True]
    peer.send(Parked(again.request_id, ok(7)))
    assert settled(peer.events()) == []  # nobody waits
    assert sock.closed, "the container has it, and so does the caller"
    assert first.request_id != again.request_id


def test_park_many_retried_after_a_timeout_waits_for_the_first_answer() -> None:
    """The retry is held until the first answer: a socket it parked gets that ticket
    and is not sent twice; one it refused goes out again."""
    engine, peer = started()
    a, b = FakeSock(), FakeSock()
    first = engine.park([a, b], [entry(a), entry(b)], None)
    (p1,) = parks(peer.recv())
    engine.withdraw(first)  # timed out
    retry = engine.park([a, b], [entry(a), entry(b)], None)
    assert parks(peer.recv()) == []  # held
    peer.send(Parked(p1.request_id, (ParkResult(Refusal.OK, 7), ParkResult(Refusal.FULL, 0))))
    assert settled(peer.events()) == []
    assert a.closed
    assert not b.closed
    (p2,) = parks(peer.recv())
    assert [e.fd for e in p2.entries] == [b.fd]
    peer.send(Parked(p2.request_id, ok(9)))
    assert settled(peer.events()) == [retry]
    assert retry.outcome() == [7, 9]
    assert b.closed


def test_a_retry_withdrawn_while_held_leaves_the_first_answer_in_charge() -> None:
    engine, peer = started()
    sock = FakeSock()
    first = engine.park([sock], [entry(sock)], None)
    (p1,) = parks(peer.recv())
    engine.withdraw(first)
    retry = engine.park([sock], [entry(sock)], None)
    engine.withdraw(retry)  # timed out too, before the first answer came
    peer.send(Parked(p1.request_id, (ParkResult(Refusal.FULL, 0),)))
    assert settled(peer.events()) == []
    assert parks(peer.recv()) == []  # nothing sent again: the socket is the caller's
    assert not sock.closed


def test_a_new_socket_under_a_number_in_limbo_is_not_held_behind_the_old_park() -> None:
    """An abandoned park's socket is closed by the caller and its number goes to a
    new socket: parking that one goes out at once (it is not the one in limbo), the
    old answer leaves it alone, and the engine's own copy of the old one is closed."""
    engine, peer = started()
    before = len(os.listdir("/proc/self/fd"))
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    try:
        old = FakeSock(a.fileno())
        first = engine.park([old], [entry(old)], None)
        (p1,) = parks(peer.recv())
        engine.withdraw(first)  # timed out: in limbo until the answer
        number = a.fileno()
        a.close()  # the caller's, as far as it knows
        os.dup2(b.fileno(), number)  # the number names another socket now
        new = FakeSock(number, real=True)
        second = engine.park([new], [entry(new)], None)
        (p2,) = parks(peer.recv())  # not held behind the first
        assert [e.fd for e in p2.entries] == [number]
        peer.send(Parked(p1.request_id, ok(7)))
        assert settled(peer.events()) == []  # (the first's caller is gone)
        assert not new.closed, "the old answer closed the new socket"
        peer.send(Parked(p2.request_id, ok(9)))
        assert settled(peer.events()) == [second]
        assert second.outcome() == [9]
        assert new.closed
    finally:
        for s in (a, a_peer, b, b_peer):
            s.close()
    assert len(os.listdir("/proc/self/fd")) == before, "the engine's copy was not closed"


def test_asyncio_a_cancelled_sender_leaves_nothing_unsent(
    proc: ServeProcess, closing: list[socket.socket]
) -> None:
    """asyncio: while a send waits for room, other flushes leave their frames in the
    engine for that sender to take next. Here the sender is the caller's own
    ``unpark()``, and the caller cancels it (a deadline): a park made meanwhile,
    and the rest of the UNPARK, must still go out once the container reads again,
    not wait for the next thing the container happens to write."""
    driver = AsyncioDriver(proc.path, pool="handoff")
    try:
        parking = driver.parking
        (client,), (server,) = tcp_pairs(1)
        closing += [client, server]
        os.kill(proc.pid, signal.SIGSTOP)

        async def stuck() -> Any:
            # Far more than the control socket holds: this call waits for room.
            unpark = asyncio.ensure_future(parking.unpark(*range(1, 200_001)))
            await asyncio.sleep(0.2)
            park = asyncio.ensure_future(parking.park(server, token=b"late"))
            await asyncio.sleep(0.2)
            unpark.cancel()  # the caller's deadline
            await asyncio.gather(unpark, return_exceptions=True)
            return park

        park = driver._run(stuck())
        os.kill(proc.pid, signal.SIGCONT)

        async def finish() -> Any:
            try:
                return await asyncio.wait_for(park, 5)
            except asyncio.TimeoutError:
                return None

        ticket = driver._run(finish())
        assert ticket is not None, "the park was left in the engine, never sent"
        assert server.fileno() == -1
        client.sendall(b"ping")
        woken = driver.next_wake(timeout=10)
        assert woken.token == b"late"
        assert woken.socket is not None
        woken.socket.close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        driver.shutdown()


def test_a_number_in_limbo_known_by_number_only_is_checked_on_its_old_socket() -> None:
    """Where sockets have no inode (macOS, the BSDs; here: a number naming nothing),
    the limbo knows a socket by its number: a new socket under that number is the old
    one only while the old socket object still has it (the caller closed it: not)."""
    engine, peer = started()
    old = FakeSock()
    first = engine.park([old], [entry(old)], None)
    (p1,) = parks(peer.recv())
    engine.withdraw(first)
    again = engine.park([old], [entry(old)], None)  # the same object: held
    assert parks(peer.recv()) == []
    engine.withdraw(again)
    old.close()  # the caller's, as far as it knows
    new = FakeSock(old.fd)
    engine.park([new], [entry(new)], None)
    (p2,) = parks(peer.recv())  # not held: another socket under the number
    assert [e.fd for e in p2.entries] == [old.fd]
    peer.send(Parked(p1.request_id, ok(7)))
    assert not new.closed, "the old answer closed the new socket"


@contextlib.contextmanager
def in_limbo() -> Iterator[tuple[Any, Any, Any, int]]:
    """An engine whose park of a real socket timed out after it went out (in limbo
    until the answer): (engine, its peer, that PARK, the socket's fd, to dup)."""
    engine, peer = started()
    a, a_peer = socket.socketpair()
    try:
        old = FakeSock(a.fileno())
        first = engine.park([old], [entry(old)], None)
        (p1,) = parks(peer.recv())
        engine.withdraw(first)
        yield engine, peer, p1, a.fileno()
    finally:
        a.close()
        a_peer.close()


def test_a_retry_through_a_dup_of_a_socket_in_limbo_waits_for_its_answer() -> None:
    """The same socket under another number (``sock.dup()``) is still the socket in
    limbo (Linux knows it by inode): it waits for the first answer and gets its ticket."""
    with in_limbo() as (engine, peer, p1, fd):
        twin = FakeSock(os.dup(fd), real=True)
        retry = engine.park([twin], [entry(twin)], None)
        assert parks(peer.recv()) == []  # held: one connection is not parked twice
        peer.send(Parked(p1.request_id, ok(7)))
        assert settled(peer.events()) == [retry]
        assert retry.outcome() == [7]
        assert twin.closed  # the container has it


def test_asyncio_leaving_with_a_send_stuck_leaves_the_loop_clean(
    proc: ServeProcess, closing: list[socket.socket]
) -> None:
    """asyncio: the handle is left while a send waits for room (a frozen container).
    The loop must not go on watching the closed socket's number: the next socket
    that gets it could not be watched (FileNotFoundError from add_reader)."""
    driver = AsyncioDriver(proc.path, pool="stale")
    parking = driver.parking
    pending: list[Any] = []
    os.kill(proc.pid, signal.SIGSTOP)
    try:

        async def stuck() -> int:
            assert parking._chan is not None
            number = parking._chan.sock.fileno()
            # Far more than the control socket holds: this call waits for room.
            pending.append(asyncio.ensure_future(parking.unpark(*range(1, 200_001))))
            await asyncio.sleep(0.2)
            return number

        number = driver._run(stuck())
        driver._run(driver._cm.__aexit__(None, None, None))  # (waits CLOSE_TIMEOUT)
        a, b = socket.socketpair()  # the number goes to a new socket
        closing += [a, b]
        if a.fileno() != number:  # (else the lowest free number was it already)
            os.dup2(a.fileno(), number)
            closing.append(socket.socket(fileno=number))

        async def watch() -> None:
            loop = asyncio.get_running_loop()
            loop.add_reader(number, lambda: None)
            loop.remove_reader(number)

        driver._run(watch())
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        driver._stop_loop()


def test_a_retry_held_at_close_waits_for_the_first_answer() -> None:
    """A retry (through a dup) of a socket whose first park is out and unanswered
    when the handle is left: the close waits for that answer (the STATS barrier), and
    the retry gets it: the container's ticket (its dup closed), not ParkingClosed
    ('still yours') while the container takes the connection."""
    with in_limbo() as (engine, peer, p1, fd):
        twin = FakeSock(os.dup(fd), real=True)
        retry = engine.park([twin], [entry(twin)], None)
        assert parks(peer.recv()) == []  # held
        barrier = engine.begin_close((), None)
        assert barrier is not None  # the first park is out: the close waits for it
        assert settled(peer.events()) == []
        peer.send(Parked(p1.request_id, ok(7)))
        assert settled(peer.events()) == [retry]
        assert retry.outcome() == [7]
        assert twin.closed  # the container has it: no second owner


def test_a_retry_held_at_close_is_the_callers_when_the_first_is_refused() -> None:
    """The same, the first park refused: the retry is not sent (the session is
    closing) and fails with ParkingClosed, its socket the caller's."""
    with in_limbo() as (engine, peer, p1, fd):
        twin = FakeSock(os.dup(fd), real=True)
        retry = engine.park([twin], [entry(twin)], None)
        assert engine.begin_close((), None) is not None
        peer.send(Parked(p1.request_id, (ParkResult(Refusal.FULL, 0),)))
        assert settled(peer.events()) == [retry]
        with pytest.raises(connpark.ParkingClosed):
            retry.outcome()
        assert not twin.closed
        assert parks(peer.recv()) == []


def test_a_retry_of_many_held_at_close_gets_a_ticket_and_a_refusal() -> None:
    """A held park_many, one socket in limbo (taken by its first park) and one not:
    at close the first gets its ticket, the other (never sent) stays the caller's."""
    with in_limbo() as (engine, peer, p1, fd):
        twin, fresh = FakeSock(os.dup(fd), real=True), FakeSock()
        retry = engine.park([twin, fresh], [entry(twin), entry(fresh)], None)
        assert engine.begin_close((), None) is not None
        peer.send(Parked(p1.request_id, ok(7)))
        assert settled(peer.events()) == [retry]
        ticket, refused = retry.outcome()
        assert ticket == 7
        assert isinstance(refused, connpark.ParkRefused)
        assert refused.reason is Refusal.SHUTTING_DOWN
        assert twin.closed
        assert not fresh.closed
        assert parks(peer.recv()) == []


def test_a_resent_frame_queued_at_close_carries_its_connection_not_a_reused_number() -> None:
    """A park in limbo is re-sent on the next session with the engine's own copy
    (a ``dup``), and the frame waits in the hook's queue (a slow container).
    The hook is left: the engine closes its copies. The queue must drop the
    frame first (the hooks pass their channel to ``finish_close``), or it goes
    out with the number of whatever socket took it next: that socket parked,
    the connection lost."""
    with in_limbo() as (engine, peer, _p1, fd):
        engine.connection_failed(connpark.ContainerLost("the container died"))
        peer.events()
        peer.connect()
        peer.welcome()
        frames = engine.data_to_send()  # the re-sent PARK, with our copy of the socket
        (copy,) = [n for frame in frames for n in frame.fds]
        assert copy != fd
        queue = Outbox(own_fds=False)  # what the hooks' channels queue with
        queue.add(frames)  # not sent yet: the container is slow
        stranger, stranger_peer = socket.socketpair()
        try:
            engine.begin_close()
            engine.finish_close(queue)
            os.dup2(stranger.fileno(), copy)  # a new socket gets our copy's number
            sender, receiver = socket.socketpair()
            with sender, receiver:
                while queue:
                    queue.send_some(sender)
                # Never sent (``stop_sending``): the socket stays the caller's.
                receiver.setblocking(False)
                with pytest.raises(BlockingIOError):
                    socket.recv_fds(receiver, 1 << 16, 8)
        finally:
            os.close(copy)
            stranger.close()
            stranger_peer.close()


def test_leaving_with_parks_unanswered_closes_the_copies_that_reached_the_container() -> None:
    """The container is slow: leaving, the wait for its answers runs out. It reads
    on after we close and keeps what it parks (then wakes it to another worker of
    the pool), so a socket whose PARK reached it must be closed here (never both),
    and so must a retry of it held behind that answer; one whose PARK is still in
    the hook's queue never left: still the caller's."""
    engine, _peer = started()
    (a1, b1), (a2, b2) = socket.socketpair(), socket.socketpair()
    sent, queued = FakeSock(a1.detach(), real=True), FakeSock(a2.detach(), real=True)
    retried = FakeSock(os.dup(sent.fd), real=True)  # the same connection, another number
    try:
        first = engine.park([sent], [entry(sent)], None)
        queue = Outbox(own_fds=False)  # what the hooks' channels queue with
        queue.add(engine.data_to_send())
        sender, receiver = socket.socketpair()
        with sender, receiver:
            queue.send_some(sender)  # this PARK reached the container
            second = engine.park([queued], [entry(queued)], None)
            queue.add(engine.data_to_send())  # this one did not: the socket was full
            engine.withdraw(first)  # (the caller stopped waiting: in limbo)
            retry = engine.park([retried], [entry(retried)], None)
            assert engine.data_to_send() == []  # held behind the first answer
            engine.begin_close()
            engine.finish_close(queue)
            _data, fds, _flags, _addr = socket.recv_fds(receiver, 1 << 16, 8)
            close_fds(fds)
        assert sent.closed, "the container may have it: two owners"
        assert retried.closed, "the same connection, held behind that park: two owners"
        assert not queued.closed, "it never left: the caller's"
        with pytest.raises(connpark.ParkingClosed):
            second.outcome()
        with pytest.raises(connpark.ParkingClosed, match="your copy was closed"):
            retry.outcome()
        assert first.error is not None  # (withdrawn: nobody waits for it)
    finally:
        for s in (sent, queued, retried):
            s.close()
        b1.close()
        b2.close()


def test_leaving_without_an_answer_closes_a_socket_whose_park_went_out(
    make: Factory, proc: ServeProcess, closing: list[socket.socket]
) -> None:
    """A container frozen past the leaving's wait (CLOSE_TIMEOUT): the PARK went
    out, no answer came. Thawed, the container reads it and parks the connection
    (for any worker of the pool), so the caller's copy must be closed. Before, it
    was left open with ParkingClosed ("still yours"): the client's next bytes woke
    it to another worker while the caller still had it."""
    driver = make(proc.path, pool="bye")
    (client,), (server,) = tcp_pairs(1)
    closing += [client, server]
    outcome: list[BaseException] = []

    def park() -> None:
        try:
            driver.park(server, token=b"late")
        except connpark.ConnparkError as exc:
            outcome.append(exc)

    os.kill(proc.pid, signal.SIGSTOP)
    parker = threading.Thread(target=park)
    parker.start()
    time.sleep(0.3)  # the PARK is in the socket, unanswered
    driver.shutdown()  # waits CLOSE_TIMEOUT for the answer, in vain
    parker.join(10)
    assert len(outcome) == 1
    assert isinstance(outcome[0], connpark.ParkingClosed)
    assert "your copy was closed" in str(outcome[0])
    assert server.fileno() == -1, "the container will park it: two owners"
    os.kill(proc.pid, signal.SIGCONT)
    assert wait_until(lambda: proc.stats().parked == 1)  # one owner: the container
    other = make(proc.path, pool="bye")
    client.sendall(b"after")
    woken = other.next_wake()
    assert woken.token == b"late"
    assert woken.socket is not None
    closing.append(woken.socket)
    assert recv_exactly(woken.socket, 5) == b"after"
