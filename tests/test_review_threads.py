"""A hostile review of the threads hook's writer thread (``BlockingParking``).

Since a caller sends only what the control socket takes at once, frames can
wait in the channel's queue for a slow container. A fake container (a unix
socket speaking the protocol by hand) decides when it reads.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import connpark
from connpark._fdpass import recv_fds
from connpark._unixsock import listen_unix
from connpark._wire import (
    Ack,
    Decoder,
    Hello,
    Reason,
    Wake,
    WakeEntry,
    Welcome,
    close_fds,
    encode,
    message_fds,
)

from . import test_hooks
from ._procs import ServeProcess, take_number, tcp_pairs, wait_until
from .test_hooks import Driver
from .test_review_hooks import (
    FILL,
    FILL_PENDING,
    closing,
    no_wake_within,
    park_many_within,
    park_within,
)

pytestmark = pytest.mark.linux

make = test_hooks.make  # the drivers fixture: each kind, shut down and fd-checked
__all__ = ["closing", "make"]  # fixtures


class SlowReader:
    """Answers HELLO, then reads nothing until ``read`` is set; on ``wake`` it sends
    a WAKE of ``wake_fd`` (ticket 5). Then it reads to EOF, recording ACKs."""

    def __init__(self, path: Path, wake_fd: int) -> None:
        self.listener = listen_unix(path)
        self.listener.settimeout(10)
        self.wake_fd = wake_fd
        self.wake = threading.Event()
        self.read = threading.Event()
        self.acked: list[int] = []
        self.done = threading.Event()
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        self._conn = conn
        dec = Decoder()
        try:
            while not any(isinstance(m, Hello) for m in dec):
                data, fds = recv_fds(conn)
                dec.receive_data(data, fds)
            conn.sendall(encode(Welcome(7, 0xFFFF, 1 << 16))[0].data)
            self.wake.wait(10)
            (frame,) = encode(Wake((WakeEntry(5, Reason.READABLE, b"t", fd=self.wake_fd),)))
            socket.send_fds(conn, [frame.data], list(frame.fds))
            self.read.wait(10)
            conn.settimeout(10)
            while True:
                data, fds = recv_fds(conn)
                if not data:
                    break
                dec.receive_data(data, fds)
                for msg in dec:
                    if isinstance(msg, Ack):
                        self.acked.extend(msg.tickets)
                    close_fds(message_fds(msg))
        except OSError:
            pass
        finally:
            dec.close()
            self.done.set()

    def close(self) -> None:
        self.read.set()
        self.wake.set()
        self._thread.join(15)
        if self._conn is not None:
            self._conn.close()
        self.listener.close()


@pytest.fixture
def pairs() -> Iterator[tuple[list[socket.socket], list[socket.socket]]]:
    clients, servers = tcp_pairs(FILL + 1)
    yield clients, servers
    for s in clients + servers:
        s.close()


def test_shutdown_sends_the_acks_queued_behind_a_slow_container(
    sockdir: Path, pairs: tuple[list[socket.socket], list[socket.socket]]
) -> None:
    """A wake read while the control socket is full: its ACK waits in the queue.
    The user takes the wake and shuts down; the container reads again 0.5 s later.
    It must get that ACK before the socket goes, or it gives the connection to a
    second worker (the trio hook waits up to CLOSE_TIMEOUT for it too)."""
    _clients, servers = pairs
    fake = SlowReader(sockdir / "slow.sock", servers[-1].fileno())
    try:
        parking = connpark.BlockingParking(sockdir / "slow.sock", reconnect=False)
        try:
            with pytest.raises(connpark.ContainerTimeout):
                parking.park_many(
                    servers[:FILL], pendings=[b"p" * FILL_PENDING] * FILL, timeout=0.3
                )
            assert parking._chan is not None
            assert parking._chan.flush_needed
            fake.wake.set()
            woken = parking.next_wake(timeout=10)
            assert woken is not None
            assert woken.ticket == 5
            assert woken.socket is not None
            woken.socket.close()
            threading.Timer(0.5, fake.read.set).start()
        finally:
            parking.shutdown()
        assert fake.done.wait(10)
        assert fake.acked == [5], "a wake the user took was never ACKed"
    finally:
        fake.close()


def test_a_park_timed_out_behind_a_backlog_is_not_sent_to_the_next_container(
    make: Callable[..., Driver],
    sockdir: Path,
    closing: list[socket.socket],
) -> None:
    """A frozen container: a PARK fills the control socket, a second park times out
    behind it. The socket is "still yours": the caller closes it and the number goes
    to a new connection. The container is killed and a new one starts; the hook
    re-sends what was sent, flagged RESENT. The second park must not be among them
    (it never left): its fd number now names the new connection, which the new
    container would take while the caller keeps it, two owners."""
    path = sockdir / "k.sock"
    proc = ServeProcess(path)
    try:
        backoff = connpark.Backoff(first=0.05, most=0.1, give_up_after=30)
        driver = make(path, pool="restart", backoff=backoff)
        clients, servers = tcp_pairs(FILL)
        (vclient,), (victim,) = tcp_pairs(1)
        (nclient,), (newcomer,) = tcp_pairs(1)
        closing += [*clients, *servers, vclient, victim, nclient, newcomer]
        os.kill(proc.pid, signal.SIGSTOP)
        assert park_many_within(driver, servers, 0.3, pendings=[b"p" * FILL_PENDING] * FILL) is None
        assert park_within(driver, victim, 0.3, token=b"victim") is None
        assert victim.fileno() != -1, "never answered: the caller's"
        newcomer = take_number(victim, newcomer)
        closing.append(newcomer)
        proc = _kill_and_restart(proc, driver)
        assert wait_until(lambda: proc.stats().parks_total >= FILL)  # the first park, re-sent
        time.sleep(0.5)  # a re-sent second park is read by now
        nclient.sendall(b"mine")
        stolen = not no_wake_within(driver, 1.0)
        assert not stolen, "the new container took a connection nobody parked"
        assert proc.stats().parked == FILL
    finally:
        proc.stop()


def test_a_park_timed_out_after_it_went_out_is_resent_with_its_own_socket(
    make: Callable[..., Driver],
    sockdir: Path,
    closing: list[socket.socket],
) -> None:
    """A frozen container: a PARK goes out and is never answered, and the caller's
    deadline passes. The caller closes the socket (still its own as far as it
    knows) and the number goes to a new connection. The container is killed and a
    new one starts: the hook re-sends the park (RESENT), and it must carry the
    connection it was for (the engine's own copy), not what the number names now:
    else the new container takes a connection the caller keeps (two owners)."""
    path = sockdir / "r.sock"
    proc = ServeProcess(path)
    try:
        backoff = connpark.Backoff(first=0.05, most=0.1, give_up_after=30)
        driver = make(path, pool="resend", backoff=backoff)
        (vclient,), (victim,) = tcp_pairs(1)
        (nclient,), (newcomer,) = tcp_pairs(1)
        closing += [vclient, victim, nclient, newcomer]
        os.kill(proc.pid, signal.SIGSTOP)
        assert park_within(driver, victim, 0.3, token=b"victim") is None
        assert victim.fileno() != -1, "never answered: the caller's, for now"
        newcomer = take_number(victim, newcomer)
        closing.append(newcomer)
        proc = _kill_and_restart(proc, driver)
        assert wait_until(lambda: proc.stats().parks_total >= 1)  # the park, re-sent
        vclient.sendall(b"late")  # the parked one wakes, with its token and bytes
        woken = driver.next_wake(timeout=10)
        assert woken is not None
        assert woken.token == b"victim"
        assert woken.socket is not None
        closing.append(woken.socket)
        woken.socket.settimeout(5)
        assert woken.socket.recv(4, socket.MSG_WAITALL) == b"late"
        nclient.sendall(b"mine")
        stolen = not no_wake_within(driver, 1.0)
        assert not stolen, "the new container took a connection nobody parked"
        assert newcomer.recv(4, socket.MSG_DONTWAIT) == b"mine"
    finally:
        proc.stop()


def test_shutdown_waits_for_the_answer_to_a_park_that_went_out(
    sockdir: Path, closing: list[socket.socket]
) -> None:
    """A slow container: a PARK goes out, and the user shuts the handle down before
    the answer. The answer decides who owns the socket, so shutdown waits for it
    (bounded): the park gets its ticket and the caller's copy is closed. Before, it
    failed with ParkingClosed ("still yours") while the container took it."""
    path = sockdir / "w.sock"
    proc = ServeProcess(path)
    try:
        (client,), (server,) = tcp_pairs(1)
        closing += [client, server]
        parking = connpark.BlockingParking(path, pool="bye")
        os.kill(proc.pid, signal.SIGSTOP)
        _shut_down_while(proc, parking, lambda: parking.park(server, token=b"late"))
        assert server.fileno() == -1, "the caller's copy of a parked socket is still open"
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.stop()


def test_shutdown_gives_a_held_retry_the_answer_of_its_first_park(
    sockdir: Path, closing: list[socket.socket]
) -> None:
    """A frozen container: a park times out after its PARK went out, the caller
    parks the connection again through a dup (held behind the first answer) and the
    handle is shut down. Shutdown waits for that answer, and the retry gets it: the
    ticket, its copy closed. Before, the retry failed with ParkingClosed ("still
    yours") while the container took the connection: two owners."""
    path = sockdir / "w.sock"
    proc = ServeProcess(path)
    try:
        (client,), (server,) = tcp_pairs(1)
        twin = server.dup()
        closing += [client, server, twin]
        parking = connpark.BlockingParking(path, pool="bye")
        os.kill(proc.pid, signal.SIGSTOP)
        with pytest.raises(connpark.ContainerTimeout):
            parking.park(server, token=b"first", timeout=0.3)
        _shut_down_while(proc, parking, lambda: parking.park(twin, token=b"again", timeout=10))
        assert twin.fileno() == -1, "the caller's copy of a parked socket is still open"
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.stop()


def _shut_down_while(
    proc: ServeProcess, parking: connpark.BlockingParking, park: Callable[[], object]
) -> None:
    """Run ``park`` in a thread against the frozen container (its PARK out, or held
    behind one), shut the handle down meanwhile and thaw the container 0.5 s in: the
    answer decides, so ``park`` must return that ticket (the container has it)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(park())
        except connpark.ConnparkError as exc:
            outcome.append(exc)

    parker = threading.Thread(target=run)
    parker.start()
    time.sleep(0.3)  # the PARK is in the socket, unanswered (or the retry held)
    threading.Timer(0.5, os.kill, (proc.pid, signal.SIGCONT)).start()
    parking.shutdown()
    parker.join(10)
    assert wait_until(lambda: proc.stats().parked == 1)  # the container has it
    assert len(outcome) == 1
    assert isinstance(outcome[0], int), f"told {outcome[0]!r}, yet the container took it"


def _kill_and_restart(proc: ServeProcess, driver: Driver) -> ServeProcess:
    """SIGKILL the (frozen) container, start a new one at its path: the driver's
    hook reconnects (its second session)."""
    proc.stop(signal.SIGKILL)
    proc = ServeProcess(proc.path)
    assert wait_until(lambda: driver.sessions() == 2, 15)
    return proc
