"""A hostile review of the threads hook's writer thread (``BlockingParking``).

Since a caller sends only what the control socket takes at once, frames can
wait in the channel's queue for a slow container. A fake container (a unix
socket speaking the protocol by hand) decides when it reads.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
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

from ._procs import tcp_pairs

pytestmark = pytest.mark.linux

#: Enough PARK bytes to fill the control socket while the container reads nothing.
FILL = 8
FILL_PENDING = 60_000


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
