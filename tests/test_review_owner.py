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

import os
import signal
import socket
import time
from pathlib import Path

import pytest

import connpark
from connpark._wire import (
    Error,
    Park,
    Parked,
    ParkEntry,
    Refusal,
    Stats,
    StatsReply,
    Tagged,
    TagOp,
    Wake,
)

from ._procs import ServeProcess, tcp_pairs
from ._procs import wait_until as _wait
from ._raw import RawPeer

pytestmark = pytest.mark.linux


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
    time.sleep(1.5)  # unread past the output timeout (1 s): the container ends the session
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


def _shard_pid(serve: ServeProcess, not_: int = 0, timeout: float = 20.0) -> int:
    """The shard's pid, once one other than ``not_`` answers STATS."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pids = [p.pid for p in serve.stats().processes if p.role == "shard"]
        except connpark.ConnparkError:  # between shards: ask again
            pids = []
        if pids and pids[0] != not_:
            return pids[0]
        time.sleep(0.05)
    raise AssertionError("no shard")


def test_a_session_resumed_from_a_dead_shard_does_not_descend_from_a_new_one(
    sockdir: Path,
) -> None:
    """Session ids must not repeat across a shard's restarts: a worker reconnecting
    after a crash resumes its session of the dead shard (HELLO resume_session).
    Had the new shard given that id to another worker Q, whose park of X was
    never answered (Q gone), the returning worker's lineage would run through
    Q: when X later wakes to it and its own new park of X is lost and sent
    again, that park would be matched to Q's ticket and X closed (lost)."""
    path = sockdir / "c.sock"
    serve = ServeProcess(
        path,
        [
            "--crash-recovery",
            "--end-grace", "1",
            "--output-timeout", "1",
            "--max-output-messages", "16",
        ],
    )  # fmt: skip
    (client,), (server,) = tcp_pairs(1)
    peers: list[RawPeer] = []
    try:
        shard = _shard_pid(serve)
        for _ in range(3):  # W's id is not the first
            peers.append(RawPeer(path, pool="filler"))
        w = RawPeer(path, pool="web", name="w")
        peers.append(w)
        old_id = w.welcome.session_id
        for peer in peers:
            peer.close()
        os.kill(shard, signal.SIGKILL)
        _shard_pid(serve, not_=shard)
        # Sessions of the new shard until one gets W's old id or passes it (ids
        # from 1 in each process: within a few), or 16 (random starts: any).
        for i in range(16):
            q = RawPeer(path, pool="web", name="q")
            peers.append(q)
            if q.welcome.session_id >= old_id or i == 15:
                break
            q.close()
        # Q parks X and goes before its PARKED is written, never to come back.
        q.sock.shutdown(socket.SHUT_RD)
        q.send(Park(1, (ParkEntry(server.fileno(), token=b"x"),)))
        q.close()
        assert _wait(lambda: serve.stats().pools.get("web", 0) == 0)
        server.close()  # Q's process is gone: the container alone has X
        assert serve.stats().parked == 1
        # W comes back, resuming its session of the dead shard; X wakes to it.
        w2 = RawPeer(path, pool="web", name="w2", resume_session=old_id)
        peers.append(w2)
        client.sendall(b"one")
        ((_ticket, token, fd),) = w2.wakes(1)
        assert token == b"x"
        assert fd is not None
        mine = socket.socket(fileno=fd)
        mine.settimeout(5)
        assert mine.recv(10) == b"one"
        _lose_park_to_a_limit(w2, mine, 2)
        assert _wait(lambda: serve.stats().pools.get("web", 0) == 0)
        w3 = RawPeer(path, pool="web", name="w3", resume_session=w2.welcome.session_id)
        peers.append(w3)
        again = w3.park([ParkEntry(mine.fileno(), token=b"again", resent=True)]).results[0]
        assert again.refusal is Refusal.OK
        mine.close()
        assert serve.stats().parked == 1, "answered OK, yet nothing holds the connection"
        client.sendall(b"two")
        assert w3.woken_bytes(1) == {again.ticket: b"two"}
    finally:
        for peer in peers:
            peer.close()
        client.close()
        server.close()
        assert serve.stop() == 0


@pytest.mark.parametrize("first", ["parker", "taker"])
def test_a_restored_wake_another_worker_took_stays_its_own(sockdir: Path, first: str) -> None:
    """P parks X while its socket is full (its PARKED waits in the shard); a
    pool-mate M takes X (UNPARK by tag) and has its fd, but the shard is
    SIGKILLed before M's ACK. Restored, X is both a twin (P never saw its
    PARKED) and in quarantine (woken). P comes back and sends X again; M comes
    back and names X in its HELLO (resume tickets), in either order. M keeps
    X; P's copy is closed (answer OK); the shard holds nothing: X must not be
    parked again (from P's re-send, or as a new park once M's claim dropped
    the twin), or its next bytes would wake it to a second worker."""
    path = sockdir / "c.sock"
    serve = ServeProcess(path, ["--crash-recovery", "--restore-grace", "3"])
    (client,), (server,) = tcp_pairs(1)
    peers: list[RawPeer] = []
    try:
        shard = _shard_pid(serve)
        p = RawPeer(path, pool="web", name="p")
        m = RawPeer(path, pool="web", name="m")
        peers += [p, m]
        p.send(*[Stats() for _ in range(500)])  # read by nobody: P's PARKED will wait
        p.send(Park(9, (ParkEntry(server.fileno(), token=b"x", tags=(b"t",)),)))
        assert _wait(lambda: serve.stats().parked == 1)
        m.send(Tagged(TagOp.UNPARK, b"t"))
        wake = m.receive()
        assert isinstance(wake, Wake), wake
        ((ticket, fd),) = [(e.ticket, e.fd) for e in wake.entries]
        assert fd is not None
        mine = socket.socket(fileno=fd)  # M has X; its ACK never reaches the shard
        os.kill(shard, signal.SIGKILL)
        _shard_pid(serve, not_=shard)
        for peer in peers:
            peer.close()

        def parker_sends_again() -> None:
            p2 = RawPeer(path, pool="web", name="p2", resume_session=p.welcome.session_id)
            peers.append(p2)
            again = p2.park([ParkEntry(server.fileno(), token=b"x", resent=True)]).results[0]
            assert (again.refusal, again.ticket) == (Refusal.OK, ticket)

        def taker_claims() -> None:
            m2 = RawPeer(
                path,
                pool="web",
                name="m2",
                resume_session=m.welcome.session_id,
                resume_tickets=(ticket,),
            )
            peers.append(m2)

        steps = [parker_sends_again, taker_claims]
        for step in steps if first == "parker" else steps[::-1]:
            step()
        server.close()  # P's copy: the shard answered OK
        time.sleep(4)  # past the restore grace: an unclaimed wake would go out again
        stats = serve.stats()
        assert (stats.parked, stats.queued, stats.unacked, stats.fds_held) == (0, 0, 0, 0)
        client.sendall(b"mine")
        mine.settimeout(5)
        assert mine.recv(10) == b"mine"  # M's, and only M's
        for peer in peers[2:]:
            with pytest.raises(TimeoutError):
                peer.receive(timeout=0.5)
        mine.close()
    finally:
        for peer in peers:
            peer.close()
        client.close()
        server.close()
        assert serve.stop() == 0
