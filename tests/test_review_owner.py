"""Review of the one-owner promise where it is most intricate (review 7).

Sessions the container ends itself, PARKED answers never written, re-sent
parks and their twins along a worker's chain of resumed sessions, and
connections restored from the mirror, attacked with raw peers
(``_raw.RawPeer``, written from docs/protocol.md) and real loopback TCP
clients against real ``connpark serve`` processes. Each test checks that
every connection ends up with exactly one owner, wakes at most once, with
its bytes, and that the container's fds come back to their baseline.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from connpark._wire import (
    Error,
    Park,
    Parked,
    ParkEntry,
    Refusal,
    Stats,
    StatsReply,
)

from ._procs import ServeProcess, tcp_pairs
from ._raw import RawPeer

pytestmark = pytest.mark.linux


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _read_to_end(peer: RawPeer, timeout: float = 10.0) -> list[object]:
    """Every message until the container ends the session (ERROR, then EOF)."""
    seen: list[object] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = peer.receive(timeout=max(0.01, deadline - time.monotonic()))
        except (ConnectionError, OSError):
            break
        if msg is None:
            break
        seen.append(msg)
    return seen


def _lose_park_to_a_limit(peer: RawPeer, sock: socket.socket, request_id: int) -> None:
    """``peer`` reads nothing while it asks for many STATS: over its output limit the
    container stops reading it, so the PARK of ``sock`` it sends then waits in the
    socket; past the output timeout the container ends the session (ERROR LIMIT)
    and closes the fds of what it reads after. The worker reads to the end: the
    PARK was never answered, as its engine will see it."""
    peer.send(*[Stats() for _ in range(1500)])
    time.sleep(0.3)  # the container is over the limit: it reads no more of it
    peer.send(Park(request_id, (ParkEntry(sock.fileno(), token=b"again"),)))
    seen = _read_to_end(peer)
    assert not any(isinstance(m, Parked) for m in seen), "the PARK was answered"
    assert all(isinstance(m, (StatsReply, Error)) for m in seen)
    peer.close()


def test_a_resent_park_of_a_connection_the_lineage_got_back_is_a_new_park(
    sockdir: Path,
) -> None:
    """P parks X and its session ends before the PARKED is written: P's successor
    P2 re-sends X and gets X's ticket (its copy closed: one owner). X wakes to
    P2, which parks it again; that park is lost with P2's session (the
    container ends it for its output limit before reading it). P2's successor
    P3 sends it again, marked re-sent: it is a new park of a connection P3
    holds. Answered with X's first ticket (P's twin, P3 descending from P),
    P3's copy would be closed with nothing parked: the connection lost."""
    proc = ServeProcess(
        sockdir / "lin.sock",
        ["--end-grace", "1", "--output-timeout", "1", "--max-output-messages", "16"],
    )
    (client,), (server,) = tcp_pairs(1)
    peers: list[RawPeer] = []
    try:
        baseline = proc.fd_count()
        p = RawPeer(proc.path, pool="web", name="p")
        peers.append(p)
        p.sock.shutdown(socket.SHUT_RD)  # the container's PARKED write fails: never seen
        p.send(Park(1, (ParkEntry(server.fileno(), token=b"x"),)))
        p.close()
        assert _wait(lambda: proc.stats().pools.get("web", 0) == 0)
        assert proc.stats().parked == 1
        p2 = RawPeer(proc.path, pool="web", name="p2", resume_session=p.welcome.session_id)
        peers.append(p2)
        first = p2.park([ParkEntry(server.fileno(), token=b"x", resent=True)]).results[0]
        assert first.refusal is Refusal.OK
        server.close()  # as the engine does on OK: the container has X
        client.sendall(b"one")
        ((ticket, token, fd),) = p2.wakes(1)
        assert (ticket, token) == (first.ticket, b"x")
        assert fd is not None
        mine = socket.socket(fileno=fd)  # P2 has X now, and only P2
        mine.settimeout(5)
        assert mine.recv(10) == b"one"
        assert _wait(lambda: proc.stats().fds_held == 0)
        _lose_park_to_a_limit(p2, mine, 2)
        assert _wait(lambda: proc.stats().pools.get("web", 0) == 0)
        assert proc.stats().parked == 0  # the container never took it
        p3 = RawPeer(proc.path, pool="web", name="p3", resume_session=p2.welcome.session_id)
        peers.append(p3)
        again = p3.park([ParkEntry(mine.fileno(), token=b"again", resent=True)]).results[0]
        assert again.refusal is Refusal.OK
        mine.close()  # the engine closes its copy on OK
        assert proc.stats().parked == 1, "answered OK, yet nothing holds the connection"
        assert again.ticket != first.ticket
        client.sendall(b"two")
        assert p3.woken_bytes(1) == {again.ticket: b"two"}
        p3.close()
        assert _wait(lambda: proc.fd_count() == baseline)
    finally:
        for peer in peers:
            peer.close()
        assert proc.stop() == 0
        client.close()
        server.close()
    assert "Traceback" not in proc.log_text()
