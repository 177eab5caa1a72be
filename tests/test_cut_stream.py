"""A worker's stream that ends inside a frame (``connpark serve``, raw peers).

A hook that leaves while a frame is half written (a frozen container: the
wait at close ran out) cuts its stream short: the container discards that
frame, and whatever the worker queued after it, its ACKs too, never comes.
So the container cannot tell which of its written wakes the worker took:
a live worker keeps them (the container closes its copies), and only a
worker whose process is gone gives them up to another worker.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connpark._unixsock import _gone_from_proc, peer_gone
from connpark._wire import HEADER, MessageType, ParkEntry, Unpark, Wake

from ._procs import ServeProcess, recv_exactly, tcp_pairs, wait_until
from ._raw import RawPeer

pytestmark = pytest.mark.linux

#: A frame begun and never finished: an ACK's header and part of its body.
CUT = HEADER.pack(12, MessageType.ACK, 0, 0) + b"\0\0\0\1"


@pytest.fixture
def proc(sockdir: Path) -> Iterator[ServeProcess]:
    p = ServeProcess(sockdir / "c.sock", ["--end-grace", "1"])
    yield p
    assert p.stop() == 0


def test_a_live_worker_whose_stream_is_cut_keeps_the_wakes_it_was_written(
    proc: ServeProcess,
) -> None:
    """The worker took the wake; its ACK would have come after the frame it cut
    short. Before, the container gave the wake to another worker of the pool at
    once (the stream ended and nothing was unread): two owners."""
    (client,), (server,) = tcp_pairs(1)
    taker = RawPeer(proc.path, pool="cut", name="taker")
    other = RawPeer(proc.path, pool="cut", name="other")
    baseline = proc.fd_count()
    mine = None
    try:
        (result,) = taker.park([ParkEntry(server.fileno(), token=b"t")]).results
        assert result.ticket
        server.close()
        taker.send(Unpark((result.ticket,)))
        wake = taker.receive()
        assert isinstance(wake, Wake)
        (entry,) = wake.entries
        assert entry.fd is not None
        mine = socket.socket(fileno=entry.fd)
        taker.sock.sendall(CUT)
        taker.close()
        with pytest.raises(TimeoutError):
            other.receive(timeout=2.0)  # (end_grace 1 s: it decided by then)
        client.sendall(b"mine")
        assert recv_exactly(mine, 4) == b"mine"
        mine.close()
        assert wait_until(lambda: proc.fd_count() == baseline - 1)  # (the taker's session)
        assert proc.stats().parked == 0
        assert "mid-frame" in proc.log_text()
    finally:
        if mine is not None:
            mine.close()
        other.close()
        client.close()


def test_a_worker_that_leaves_our_bytes_unread_and_its_stream_cut_keeps_its_wakes(
    proc: ServeProcess,
) -> None:
    """The same cut, with a WAKE of ours left unread: its close reads as
    ECONNRESET here, not as the end of stream, and must be taken as a cut too.
    Before, the taken wake went to another worker at once (two owners)."""
    clients, servers = tcp_pairs(2)
    taker = RawPeer(proc.path, pool="cut", name="taker")
    other = RawPeer(proc.path, pool="cut", name="other")
    mine = None
    try:
        results = taker.park([ParkEntry(s.fileno(), token=b"t") for s in servers]).results
        for s in servers:
            s.close()
        taker.send(Unpark((results[0].ticket,)))
        wake = taker.receive()
        assert isinstance(wake, Wake)
        assert wake.entries[0].fd is not None
        mine = socket.socket(fileno=wake.entries[0].fd)
        taker.send(Unpark((results[1].ticket,)))  # a WAKE it never reads
        assert wait_until(lambda: proc.stats().parked == 0)
        taker.sock.sendall(CUT)
        taker.close()
        with pytest.raises(TimeoutError):
            other.receive(timeout=2.0)
        clients[0].sendall(b"mine")
        assert recv_exactly(mine, 4) == b"mine"
        assert "reset" in proc.log_text().lower()
    finally:
        if mine is not None:
            mine.close()
        other.close()
        for c in clients:
            c.close()


_DIES = textwrap.dedent(
    """
    import os, sys
    from connpark._wire import ParkEntry, Unpark, Wake
    from tests._raw import RawPeer
    from tests.test_cut_stream import CUT

    fd, path = int(sys.argv[1]), sys.argv[2]
    peer = RawPeer(path, pool="cut", name="dies")
    (result,) = peer.park([ParkEntry(fd, token=b"t")]).results
    os.close(fd)
    peer.send(Unpark((result.ticket,)))
    wake = peer.receive()
    assert isinstance(wake, Wake) and wake.entries[0].fd is not None
    peer.sock.sendall(CUT)
    os._exit(0)  # its copy of the connection dies with it, its ACK never written
    """
)


def test_a_worker_that_dies_mid_frame_gives_its_wakes_to_another_worker(
    proc: ServeProcess,
) -> None:
    """The same cut, by a worker that exits: it holds nothing now, so the wake it
    was written goes to another worker of the pool, bytes intact."""
    (client,), (server,) = tcp_pairs(1)
    other = RawPeer(proc.path, pool="cut", name="other")
    try:
        worker = subprocess.run(
            [sys.executable, "-c", _DIES, str(server.fileno()), str(proc.path)],
            pass_fds=[server.fileno()],
            cwd=Path(__file__).parent.parent,
            timeout=30,
            check=False,
        )
        assert worker.returncode == 0
        server.close()
        client.sendall(b"again")
        got = other.woken_bytes(1)
        assert list(got.values()) == [b"again"]
    finally:
        other.close()
        client.close()


def _peer_of_child(sockdir: Path, body: str) -> tuple[socket.socket, int]:
    """A forked child that connects to us (its credentials are on our end: a
    socketpair's would be ours) and runs ``body`` (Python, with ``time`` and
    ``threading``); our end and its pid."""
    path = str(sockdir / f"peer-{time.monotonic_ns()}.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                theirs = socket.socket(socket.AF_UNIX)
                theirs.connect(path)
                exec(body, {"time": time, "threading": threading, "sock": theirs})
            finally:
                os._exit(0)
        ours, _ = listener.accept()
    return ours, pid


@pytest.mark.parametrize("check", [peer_gone, _gone_from_proc], ids=["pidfd", "proc"])
def test_peer_gone_says_gone_only_once_every_thread_of_the_peer_exited(
    check: Callable[[socket.socket], bool], sockdir: Path
) -> None:
    alive, pid = _peer_of_child(sockdir, "time.sleep(0.5)")
    try:
        assert not check(alive)
        assert wait_until(lambda: check(alive), timeout=5)  # a zombie now: nothing held
        os.waitpid(pid, 0)
        assert check(alive)  # reaped too
    finally:
        alive.close()
    # Its main thread gone, another still running (and holding what it took).
    body = "threading.Thread(target=time.sleep, args=(1.0,)).start(); threading._shutdown = None"
    leader, pid = _peer_of_child(
        sockdir,
        body + "\nimport ctypes; ctypes.CDLL(None).syscall(60, 0)  # SYS_exit: this thread only",
    )
    try:
        time.sleep(0.3)
        assert not check(leader), "its other thread still runs"
        assert wait_until(lambda: check(leader), timeout=5)
    finally:
        os.waitpid(pid, 0)
        leader.close()
