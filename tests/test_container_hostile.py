"""Hostile and unlucky peers against a real ``connpark serve`` (issue 9).

Every test speaks the wire protocol by hand (``_raw.RawPeer``: ``_wire`` +
``_fdpass``, as docs/protocol.md describes) with real TCP clients on
loopback, and checks the one-owner promise: each connection wakes exactly
once, with its bytes, and the container's fd count comes back to baseline.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import connpark
from connpark._wire import (
    Ack,
    Error,
    ErrorCode,
    Park,
    Parked,
    ParkEntry,
    Reason,
    Refusal,
    Stats,
    StatsReply,
    Wake,
    Welcome,
)

from ._procs import ServeProcess, tcp_pairs
from ._procs import wait_until as _wait
from ._raw import RawPeer, partial_park, tcp_state

pytestmark = pytest.mark.linux

HERE = Path(__file__).parent


def _settled_fd_count(proc: ServeProcess, timeout: float = 10.0) -> int:
    """The process's fd count once it holds still (three equal reads 50 ms apart)."""
    deadline = time.monotonic() + timeout
    seen = [proc.fd_count()]
    while time.monotonic() < deadline:
        time.sleep(0.05)
        seen.append(proc.fd_count())
        if len(set(seen[-3:])) == 1 and len(seen) >= 3:
            return seen[-1]
    return seen[-1]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _read_wakes(peer: RawPeer, n: int) -> dict[bytes, bytes]:
    """token -> the client's bytes, read from each woken fd (then closed)."""
    got: dict[bytes, bytes] = {}
    for _ticket, token, fd in peer.wakes(n):
        assert fd is not None
        assert token not in got, "woken twice"
        s = socket.socket(fileno=fd)
        s.settimeout(5)
        got[token] = s.recv(100)
        s.close()
    return got


def test_a_frame_of_every_kind_of_fd_gets_one_result_per_entry(serve: ServeProcess) -> None:
    peer = RawPeer(serve.path)
    baseline = serve.fd_count()
    (ca, cb, cs), (a, b, shut) = tcp_pairs(3)
    shut.shutdown(socket.SHUT_WR)
    r, w = os.pipe()
    efd = os.eventfd(0)
    mfd = os.memfd_create("x")
    opath = os.open("/", os.O_PATH)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.connect(("127.0.0.1", 9))
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(0)
    queued = socket.create_connection(listening.getsockname())  # fills the backlog
    connecting = socket.socket()
    connecting.setblocking(False)
    assert connecting.connect_ex(listening.getsockname()) == 115  # EINPROGRESS
    assert _wait(lambda: tcp_state(connecting) == 2, 5)  # SYN_SENT: its SYNs are dropped
    ux, uy = socket.socketpair()
    dup_a = os.dup(a.fileno())
    kinds = [
        (a.fileno(), Refusal.OK),
        (r, Refusal.NOT_A_SOCKET),
        (efd, Refusal.NOT_A_SOCKET),
        (mfd, Refusal.NOT_A_SOCKET),
        (udp.fileno(), Refusal.NOT_A_TCP_STREAM),
        (listening.fileno(), Refusal.LISTENING),
        (ux.fileno(), Refusal.NOT_INET),
        (connecting.fileno(), Refusal.CONNECTING),
        (b.fileno(), Refusal.OK),
        (dup_a, Refusal.DUPLICATE),
        (shut.fileno(), Refusal.SHUT_DOWN),
        (opath, Refusal.UNINSPECTABLE),
    ]
    parked = peer.park([ParkEntry(fd, token=b"e%d" % i) for i, (fd, _) in enumerate(kinds)])
    assert [res.refusal for res in parked.results] == [code for _, code in kinds]
    assert parked.results[0].ticket
    assert parked.results[8].ticket
    a.close()
    b.close()
    os.close(dup_a)
    # The session is fine: a STATS round trip, with every refusal counted by its label.
    peer.send(Stats())
    reply = peer.receive()
    assert isinstance(reply, StatsReply)
    assert b'"not-a-socket": 3' in reply.body
    assert serve.fd_count() == baseline + 2
    # The good entries wake with their bytes.
    ca.sendall(b"hello A")
    cb.sendall(b"hello B")
    assert _read_wakes(peer, 2) == {b"e0": b"hello A", b"e8": b"hello B"}
    assert _wait(lambda: serve.fd_count() == baseline)
    # Everything refused is still ours and works.
    os.write(w, b"p")
    assert os.read(r, 1) == b"p"
    ux.sendall(b"u")
    assert uy.recv(1) == b"u"
    peer.close()
    for fd in (r, w, efd, mfd, opath):
        os.close(fd)
    for s in (ca, cb, cs, shut, udp, listening, queued, connecting, ux, uy):
        s.close()


@pytest.mark.parametrize("where", [0, 3, 6])
@pytest.mark.parametrize("odd", ["pipe", "dup", "listening"])
def test_one_odd_fd_in_a_frame_of_plain_entries_is_refused_alone(
    serve: ServeProcess, odd: str, where: int
) -> None:
    """A frame the hot path admits at once (no tokens, one decode) but for one entry:
    that one is refused, wherever it is, and every other parks and wakes."""
    peer = RawPeer(serve.path)
    baseline = serve.fd_count()
    clients, servers = tcp_pairs(6)
    spare = socket.socket()
    if odd == "pipe":
        r, w = os.pipe()
        extra, others, expected = r, [r, w], Refusal.NOT_A_SOCKET
    elif odd == "dup":
        extra = os.dup(servers[2].fileno())
        others, expected = [extra], Refusal.DUPLICATE
    else:
        spare.bind(("127.0.0.1", 0))
        spare.listen(1)
        extra, others, expected = spare.fileno(), [], Refusal.LISTENING
    fds = [s.fileno() for s in servers]
    fds.insert(where, extra)
    # The later of two entries of one socket is the duplicate: the dup or server 2.
    refused = max(where, fds.index(servers[2].fileno())) if odd == "dup" else where
    parked = peer.park([ParkEntry(fd) for fd in fds])
    codes = [res.refusal for res in parked.results]
    assert codes == [expected if i == refused else Refusal.OK for i in range(7)]
    owner = [*range(6)]  # the client of each entry's socket
    owner.insert(where, 2)  # (the dup's: server 2's)
    expected_bytes = {
        res.ticket: b"client %d" % owner[i] for i, res in enumerate(parked.results) if i != refused
    }
    for s in servers:
        s.close()
    for fd in others:
        os.close(fd)
    assert serve.fd_count() == baseline + 6
    for i, c in enumerate(clients):
        c.sendall(b"client %d" % i)
    assert peer.woken_bytes(6) == expected_bytes
    assert _wait(lambda: serve.fd_count() == baseline)
    peer.close()
    spare.close()
    for c in clients:
        c.close()


def _junk_fds(n: int) -> list[int]:
    """n fds a hostile peer might send (dups of one pipe end)."""
    r, w = os.pipe()
    fds = [os.dup(r) for _ in range(n)]
    os.close(r)
    os.close(w)
    return fds


def test_partial_frames_at_the_fd_limit_do_not_hurt_a_legitimate_worker(sockdir: Path) -> None:
    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1600, 1600))

    proc = ServeProcess(sockdir / "lim.sock", preexec_fn=low_fd_limit)
    baseline = _settled_fd_count(proc)  # not while the readiness probe is being closed
    hostile: list[socket.socket] = []
    clients, servers = tcp_pairs(4 * 253)
    try:
        for _ in range(2):  # two hold a partial 253-fd frame before the worker parks...
            junk = _junk_fds(253)
            hostile.append(partial_park(proc.path, junk))
            for fd in junk:
                os.close(fd)
        assert _wait(lambda: proc.fd_count() >= baseline + 2 * 254)
        legit = RawPeer(proc.path, name="legit")
        parked: dict[bytes, socket.socket] = {}
        refused: list[str] = []
        for start in range(0, len(servers), 253):
            batch = list(enumerate(servers))[start : start + 253]
            out = legit.park([ParkEntry(s.fileno(), token=b"t%d" % i) for i, s in batch])
            for (i, _s), res in zip(batch, out.results, strict=True):
                if res.refusal is Refusal.OK:
                    parked[b"t%d" % i] = clients[i]
                else:
                    refused.append(res.refusal.label)
            if refused:
                break
        assert set(refused) == {"out-of-fds"}
        assert len(parked) > 253
        for _ in range(2):  # ...and two more when the container is at its limit
            junk = _junk_fds(253)
            hostile.append(partial_park(proc.path, junk))
            for fd in junk:
                os.close(fd)
        time.sleep(0.3)
        for s in servers:
            s.close()
        # Every parked connection wakes, with its bytes, in the legitimate session.
        for token, c in parked.items():
            c.sendall(b"bytes of " + token)
        woken = _read_wakes(legit, len(parked))
        assert woken == {t: b"bytes of " + t for t in parked}
        legit.send(Stats())
        reply = legit.receive()
        assert isinstance(reply, StatsReply), reply
        assert b'"protocol_errors_total": 0' in reply.body  # nobody hit MSG_CTRUNC
        legit.close()
        for h in hostile:
            h.close()
        assert _wait(lambda: proc.fd_count() == baseline), (proc.fd_count(), baseline)
    finally:
        assert proc.stop() == 0
        for s in (*clients, *servers, *hostile):
            s.close()
    assert "MSG_CTRUNC" not in proc.log_text()


def _flood_stats(sock: socket.socket, seconds: float) -> int:
    """Send STATS requests without reading, until the socket stays full."""
    frame = b"\0\0\0\0\x09\0\0\0"  # STATS, empty body
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sent += sock.send(frame * 512) // len(frame)
        except BlockingIOError:
            select.select([], [sock], [], 0.05)
        except OSError:
            break  # the container ended the session
    return sent


def test_a_stats_flood_that_never_reads_stays_within_the_output_bound(sockdir: Path) -> None:
    proc = ServeProcess(sockdir / "flood.sock", ["--output-timeout", "1", "--end-grace", "1"])
    try:
        time.sleep(0.2)
        before = _rss(proc.pid)
        flooder = RawPeer(proc.path, name="flood")
        peak = 0
        sent = 0
        for _ in range(20):  # ~3 s: past the output timeout
            sent += _flood_stats(flooder.sock, 0.15)
            peak = max(peak, _rss(proc.pid))
        # The documented bound: max_output_bytes (1 MiB) + one message, per session;
        # plus the decoder's read buffer and Python's own slack.
        assert peak - before < 8 << 20, (peak - before, sent)
        assert "output over its limit" in proc.log_text()
        # Others are served all along.
        other = RawPeer(proc.path, name="other")
        other.send(Stats())
        assert isinstance(other.receive(), StatsReply)
        other.close()
        flooder.close()
    finally:
        assert proc.stop() == 0


def test_requests_past_the_output_cap_are_all_answered_as_the_worker_reads(
    sockdir: Path,
) -> None:
    """A worker that sends more requests at once than the output cap allows and
    reads the answers as they come: the container stops dispatching at the cap,
    and when its flush takes the output under it at once, the requests still in
    its buffer come next. (They waited for more data from the socket, which
    never came: the session stalled with its PARK unanswered.)"""
    proc = ServeProcess(sockdir / "cap.sock", ["--max-output-messages", "16"])
    (client,), (server,) = tcp_pairs(1)
    peer = RawPeer(proc.path, name="pipelined")
    try:
        peer.send(*[Stats() for _ in range(400)], Park(7, (ParkEntry(server.fileno()),)))
        stats = 0
        while True:
            msg = peer.receive(timeout=10)  # TimeoutError: the session stalled
            if not isinstance(msg, StatsReply):
                break
            stats += 1
        assert stats == 400
        assert isinstance(msg, Parked), msg
        assert msg.results[0].refusal is Refusal.OK
    finally:
        peer.close()
        client.close()
        server.close()
        assert proc.stop() == 0


def test_a_worker_that_never_reads_big_wakes_stays_within_the_output_bound(
    sockdir: Path,
) -> None:
    proc = ServeProcess(sockdir / "big.sock", ["--output-timeout", "60"])
    clients, servers = tcp_pairs(300)
    try:
        time.sleep(0.2)
        stuck = RawPeer(proc.path, name="stuck")
        pending = b"p" * 60_000
        out = stuck.park([ParkEntry(s.fileno(), pending=pending) for s in servers])
        assert all(r.ticket for r in out.results)
        for s in servers:
            s.close()
        time.sleep(0.3)
        before = _rss(proc.pid)  # 300 x 60 KB of pending is parked data: counted here
        for c in clients:
            c.sendall(b"x")  # 300 wakes of ~60 KB each: 18 MB if all were encoded
        time.sleep(1.0)
        growth = _rss(proc.pid) - before
        assert growth < 6 << 20, growth  # 1 MiB cap + one entry + slack
        # The worker reads at last: every wake arrives, pending intact.
        got = stuck.wakes(300, timeout=30)
        assert len({t for t, _, _ in got}) == 300
        for _t, _tok, fd in got:
            assert fd is not None
            os.close(fd)
        stuck.close()
    finally:
        assert proc.stop() == 0
        for s in (*clients, *servers):
            s.close()


def _spawn_worker(path: Path, pool: str, n: int) -> tuple[subprocess.Popen[str], int]:
    """A raw worker process (tests/_raw.py) that parks n connections; returns its port."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests._raw", str(path), pool, str(n)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
    )
    assert worker.stdout is not None
    return worker, int(worker.stdout.readline())


def test_a_frozen_worker_pool_mate_gets_the_new_wakes_and_nothing_is_lost(
    sockdir: Path,
) -> None:
    proc = ServeProcess(sockdir / "frz.sock", ["--ack-deadline", "0.5"])
    worker, port = _spawn_worker(proc.path, "web", 6)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
    mate = None
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "parked"
        mate = RawPeer(proc.path, pool="web", name="mate")
        os.kill(worker.pid, signal.SIGSTOP)
        clients[0].sendall(b"zero")  # goes to its frozen parker: never ACKed
        time.sleep(1.0)  # past the ACK deadline
        for i in range(1, 6):
            clients[i].sendall(b"n%d" % i)
        got = _read_wakes(mate, 5)
        assert got == {b"c%d" % i: b"n%d" % i for i in range(1, 6)}
        os.kill(worker.pid, signal.SIGCONT)
        assert worker.stdout.readline().strip() == "woke c0 zero"  # its own, once
        with pytest.raises(TimeoutError):
            mate.receive(timeout=0.5)  # nothing more, nothing twice
        stats = proc.stats()
        assert (stats.parked, stats.queued, stats.unacked, stats.fds_held) == (0, 0, 0, 0)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        worker.kill()
        worker.wait()
        if worker.stdout is not None:
            worker.stdout.close()
        if mate is not None:
            mate.close()
        assert proc.stop() == 0
        for c in clients:
            c.close()


def test_a_park_whose_parked_is_not_written_yet_wakes_only_to_its_parker(
    sockdir: Path,
) -> None:
    """A worker that does not read, past the ACK deadline: its pool's new wakes go
    to its mate, but not the wake of a connection whose PARKED still waits in
    the container (the worker would send it again while the mate has it)."""
    proc = ServeProcess(sockdir / "unc.sock", ["--ack-deadline", "0.5"])
    clients, servers = tcp_pairs(3)
    slow = mate = None
    try:
        slow = RawPeer(proc.path, pool="web", name="slow")
        mate = RawPeer(proc.path, pool="web", name="mate")
        early = slow.park([ParkEntry(servers[0].fileno(), token=b"early")])
        confirmed = slow.park([ParkEntry(servers[1].fileno(), token=b"confirmed")])
        assert early.results[0].refusal is Refusal.OK
        assert confirmed.results[0].refusal is Refusal.OK
        clients[0].sendall(b"x")  # a wake to slow, never ACKed: slow is frozen in 0.5 s
        # Fill slow's socket: its output waits in the container (under the cap).
        slow.send(*[Stats() for _ in range(500)])
        slow.send(Park(99, (ParkEntry(servers[2].fileno(), token=b"unwritten"),)))
        time.sleep(1.0)
        assert proc.stats().parked == 2  # the PARK was taken: its PARKED waits
        for s in servers:
            s.close()
        clients[1].sendall(b"to the mate")
        clients[2].sendall(b"to the parker")
        # The connection slow knows is parked goes to the mate; the other does not.
        assert _read_wakes(mate, 1) == {b"confirmed": b"to the mate"}
        with pytest.raises(TimeoutError):
            mate.receive(timeout=1.0)
        # slow reads at last: the early wake, its STATS, the PARKED, then the wake.
        seen: list[object] = []
        got: dict[bytes, bytes] = {}
        while len(got) < 2:
            msg = slow.receive()
            if isinstance(msg, Wake):
                slow.send(Ack(tuple(e.ticket for e in msg.entries)))
                for e in msg.entries:
                    assert e.fd is not None
                    with socket.socket(fileno=e.fd) as c:
                        c.settimeout(5)
                        got[e.token] = c.recv(100)
            seen.append(type(msg).__name__)
        assert got == {b"early": b"x", b"unwritten": b"to the parker"}
        assert seen.index("Parked") < len(seen) - 1  # the PARKED first, then its wake
    finally:
        for peer in (slow, mate):
            if peer is not None:
                peer.close()
        assert proc.stop() == 0
        for c in clients:
            c.close()


@pytest.mark.parametrize("worker_closes", [True, False])
def test_an_ended_session_never_makes_a_second_owner(sockdir: Path, worker_closes: bool) -> None:
    proc = ServeProcess(sockdir / "end.sock", ["--end-grace", "1"])
    (client,), (server,) = tcp_pairs(1)
    w1 = RawPeer(proc.path, pool="p", name="w1")
    w2 = RawPeer(proc.path, pool="p", name="w2")
    try:
        baseline = proc.fd_count()
        assert w1.park([ParkEntry(server.fileno(), token=b"A")]).results[0].ticket
        server.close()
        client.sendall(b"ping")
        assert _wait(lambda: proc.stats().unacked == 1)  # written to w1, which does not read
        w1.send(Welcome(1, 1, 1))  # not a worker message: the container ends the session
        if worker_closes:
            # Its end is closed, nothing it was sent is readable: the wake goes to w2.
            w1.close()
            assert _read_wakes(w2, 1) == {b"A": b"ping"}
        else:
            # w1 may still read what it was sent: the wake stays its own, and w2 gets nothing.
            with pytest.raises(TimeoutError):
                w2.receive(timeout=2.0)
            wake = w1.receive()
            assert isinstance(wake, Wake)
            (entry,) = wake.entries
            assert entry.token == b"A"
            assert entry.reason is Reason.READABLE
            assert entry.fd is not None
            mine = socket.socket(fileno=entry.fd)
            assert mine.recv(10) == b"ping"
            mine.close()
            err = w1.receive()
            assert isinstance(err, Error)
            assert err.code == ErrorCode.PROTOCOL
            assert w1.receive() is None  # the container closed the session
            w1.close()
        assert _wait(lambda: proc.fd_count() == baseline - 1)  # less w1's session
        stats = proc.stats()
        assert (stats.parked, stats.unacked, stats.fds_held) == (0, 0, 0)
    finally:
        w2.close()
        assert proc.stop() == 0
        client.close()


def test_a_session_ending_with_its_parked_unsent_hurts_nobody(serve: ServeProcess) -> None:
    """A worker that reads nothing, parks, and leaves: its queued PARKED is no reason
    to fail, and every other pool's connections stay parked."""
    clients, servers = tcp_pairs(20)
    with connpark.BlockingParking(serve.path, pool="innocent") as other:
        other.park_many(servers[:19], tokens=[b"o%d" % i for i in range(19)])
        slow = RawPeer(serve.path, pool="slow", name="slow")
        for _ in range(400):
            slow.send(Stats())  # the replies fill its socket: PARKED will queue behind them
        time.sleep(0.3)
        slow.send(Park(7, (ParkEntry(servers[19].fileno(), token=b"C"),)))
        time.sleep(0.3)
        slow.close()
        assert _wait(lambda: serve.stats().parked == 20)  # the container lives
        for i, c in enumerate(clients[:19]):
            c.sendall(b"still %d" % i)
        got = {}
        for _ in range(19):
            w = other.next_wake(timeout=10)
            assert w is not None
            assert w.socket is not None
            got[w.token] = w.socket.recv(20)
            w.socket.close()
        assert got == {b"o%d" % i: b"still %d" % i for i in range(19)}
    assert "Traceback" not in serve.log_text()
    for s in (*clients, *servers):
        s.close()


def test_entries_over_the_limits_are_refused_alone_in_their_frame(serve: ServeProcess) -> None:
    """Long tokens and pendings take the general path (the decoder's ``lean_limits``):
    each gets its refusal in its place, the entries around it are parked."""
    peer = RawPeer(serve.path)
    clients, servers = tcp_pairs(5)
    entries = [
        ParkEntry(servers[0].fileno(), token=b"a"),
        ParkEntry(servers[1].fileno(), token=b"t" * 4097),
        ParkEntry(servers[2].fileno(), token=b"c", pending=b"p" * 65536),
        ParkEntry(servers[3].fileno(), token=b"d", pending=b"p" * 65537),
        ParkEntry(servers[4].fileno(), token=b"e"),
    ]
    parked = peer.park(entries)
    assert [r.refusal for r in parked.results] == [
        Refusal.OK,
        Refusal.TOKEN_TOO_LARGE,
        Refusal.OK,
        Refusal.PENDING_TOO_LARGE,
        Refusal.OK,
    ]
    tickets = [r.ticket for r in parked.results]
    assert all(tickets[i] for i in (0, 2, 4))
    assert len({tickets[i] for i in (0, 2, 4)}) == 3
    assert tickets[1] == tickets[3] == 0
    for i in (0, 2, 4):
        servers[i].close()
    # The refused sockets are still the worker's, and work.
    servers[1].sendall(b"x")
    assert clients[1].recv(1) == b"x"
    clients[0].sendall(b"hi")
    clients[4].sendall(b"ho")
    assert _read_wakes(peer, 2) == {b"a": b"hi", b"e": b"ho"}
    peer.close()
    for s in (*clients, servers[1], servers[3]):
        s.close()


def test_watcher_unregister_many_carries_on_past_a_gone_fd() -> None:
    from connpark._watcher import EpollWatcher

    watcher = EpollWatcher()
    clients, servers = tcp_pairs(4)
    try:
        for s in servers:
            watcher.register(s.fileno())
        watcher.unregister(servers[1].fileno())  # out already: ENOENT in the middle
        gone = os.open("/", os.O_RDONLY)
        os.close(gone)  # closed: EBADF at the end
        watcher.unregister_many([s.fileno() for s in servers] + [gone])
        for s in servers:  # all out: registering again works
            watcher.register(s.fileno())
    finally:
        watcher.close()
        for s in (*clients, *servers):
            s.close()
