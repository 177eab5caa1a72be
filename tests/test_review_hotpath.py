"""Review of the PARK hot path (review 6) against a real ``connpark serve``.

The column-wise admission of plain frames (``inspect_many``, ``_admit_plain``,
``Lot.park_many``), big frames (a stream of them, refused whole) and the
lazily set UNCONFIRMED flag, attacked by raw peers (``_raw.RawPeer``) with
real loopback TCP clients: every entry
gets its own answer in its place, every connection wakes once with its
flags and bytes, the container's fd count comes back to its baseline, and a
worker that never saw its PARKED cannot end up sharing a connection.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from connpark._wire import (
    Ack,
    Park,
    ParkEntry,
    Reason,
    Refusal,
    Stats,
    Tagged,
    TagOp,
    Unpark,
    Wake,
    WakeEntry,
    Welcome,
)

from ._procs import ServeProcess, tcp_pairs
from ._procs import wait_until as _wait
from ._raw import RawPeer

pytestmark = pytest.mark.linux


def _v6_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """n connected IPv6 loopback TCP pairs: (clients, server-side sockets)."""
    listener = socket.socket(socket.AF_INET6)
    listener.bind(("::1", 0))
    listener.listen(n)
    clients, servers = [], []
    try:
        for _ in range(n):
            clients.append(socket.create_connection(listener.getsockname()[:2]))
            servers.append(listener.accept()[0])
    finally:
        listener.close()
    return clients, servers


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fd_in(pid: int, sock: socket.socket) -> int:
    """The fd number under which process ``pid`` holds ``sock``'s open file."""
    target = f"socket:[{os.fstat(sock.fileno()).st_ino}]"
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == target:
                return int(name)
        except OSError:
            continue
    raise AssertionError("the process does not hold this socket")


def _entries(peer: RawPeer, n: int, timeout: float = 10.0) -> list[WakeEntry]:
    """n wake entries, each WAKE ACKed as it arrives."""
    out: list[WakeEntry] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        msg = peer.receive(timeout=max(0.01, deadline - time.monotonic()))
        assert isinstance(msg, Wake), msg
        out += msg.entries
        peer.send(Ack(tuple(e.ticket for e in msg.entries)))
    return out


#: What each entry of the big frame below is for (its index modulo 6).
_EARLY, _DATA, _HUP_FD, _HUP_NOTICE, _TIMEOUT_FD, _TIMEOUT_NOTICE = range(6)
#: ... and the reason it wakes for.
_REASONS = [Reason.READABLE] * 2 + [Reason.HANGUP] * 2 + [Reason.TIMEOUT] * 2


def test_a_big_plain_frame_wakes_each_entry_with_its_family_flags_and_deadline(
    serve: ServeProcess,
) -> None:
    """144 plain entries in one frame (the hot path): IPv4 and
    IPv6, hang-up and timeout returns in every combination, per-entry idle
    timeouts, clients that sent before the park. Each entry wakes once, for its
    reason, with or without its fd as its flags say, INET6 where it is."""
    peer = RawPeer(serve.path)
    baseline = serve.fd_count()
    n = 144
    v4c, v4s = tcp_pairs(n // 2)
    v6c, v6s = _v6_pairs(n // 2)
    # Blocks of six entries, one of each kind, alternately IPv4 and IPv6.
    clients = [(v6c if i // 6 % 2 else v4c)[i // 12 * 6 + i % 6] for i in range(n)]
    servers = [(v6s if i // 6 % 2 else v4s)[i // 12 * 6 + i % 6] for i in range(n)]
    entries = []
    for i, s in enumerate(servers):
        kind, other = i % 6, i % 12 >= 6  # other: the flag that does not matter, set
        entries.append(
            ParkEntry(
                s.fileno(),
                token=b"e%d" % i,
                idle_timeout_ms={_TIMEOUT_FD: 400, _TIMEOUT_NOTICE: 600}.get(kind, 0),
                hangup_returns=kind == _HUP_FD or (other and kind >= _TIMEOUT_FD),
                timeout_returns=kind == _TIMEOUT_FD or (other and kind < _TIMEOUT_FD),
            )
        )
        if kind == _EARLY:
            clients[i].sendall(b"early %d" % i)
    time.sleep(0.05)  # those bytes are in before the park: their watch fires at once
    parked = peer.park(entries)
    assert [r.refusal for r in parked.results] == [Refusal.OK] * n
    tickets = [r.ticket for r in parked.results]
    assert len(set(tickets)) == n
    for s in servers:
        s.close()
    assert serve.fd_count() == baseline + n
    for i, c in enumerate(clients):
        if i % 6 == _DATA:
            c.sendall(b"data %d" % i)
        elif i % 6 in (_HUP_FD, _HUP_NOTICE):
            c.close()
    woken = _entries(peer, n)
    assert sorted(e.ticket for e in woken) == sorted(tickets)  # each once
    for e in woken:
        i = tickets.index(e.ticket)
        kind = i % 6
        assert e.token == b"e%d" % i
        assert e.inet6 == bool(i // 6 % 2), i
        assert e.reason is _REASONS[kind], i
        assert (e.fd is not None) == (kind in (_EARLY, _DATA, _HUP_FD, _TIMEOUT_FD)), i
        if e.fd is None:
            continue
        with socket.socket(fileno=e.fd) as s:
            assert s.family == (socket.AF_INET6 if e.inet6 else socket.AF_INET)
            s.settimeout(5)
            if kind == _TIMEOUT_FD:  # a live connection: bytes sent now reach us
                clients[i].sendall(b"late %d" % i)
            expected = {_EARLY: b"early", _DATA: b"data", _TIMEOUT_FD: b"late"}.get(kind)
            # (a hung-up client's connection: at its end, nothing more to read)
            assert s.recv(100) == (b"" if expected is None else b"%s %d" % (expected, i)), i
    assert _wait(lambda: serve.fd_count() == baseline)
    peer.close()
    for c in clients:
        c.close()


def test_a_frame_bigger_than_the_room_left_parks_what_fits_in_order(sockdir: Path) -> None:
    """max_parked 12, five parked: a plain frame of ten (IPv4 and IPv6) cannot go
    in at once. The first seven are parked, the last three refused FULL (their
    sockets stay the worker's, and work); a frame after that is refused whole."""
    proc = ServeProcess(sockdir / "room.sock", ["--max-parked", "12"])
    peer = RawPeer(proc.path)
    baseline = proc.fd_count()
    v4c, v4s = tcp_pairs(11)
    v6c, v6s = _v6_pairs(6)
    clients, servers = v4c + v6c, v4s + v6s
    try:
        first = peer.park([ParkEntry(s.fileno()) for s in servers[:5]])
        assert [r.refusal for r in first.results] == [Refusal.OK] * 5
        frame = servers[5:9] + servers[11:15] + servers[9:11]  # v4, v6, v4 again
        second = peer.park([ParkEntry(s.fileno()) for s in frame])
        assert [r.refusal for r in second.results] == [Refusal.OK] * 7 + [Refusal.FULL] * 3
        assert all(r.ticket for r in second.results[:7])
        assert not any(r.ticket for r in second.results[7:])
        third = peer.park([ParkEntry(s.fileno()) for s in servers[15:17]])
        assert [r.refusal for r in third.results] == [Refusal.FULL] * 2
        assert proc.fd_count() == baseline + 12  # the refused ones were closed
        refused = set(frame[7:] + servers[15:17])
        by_ticket = {}
        for res, s in zip(first.results + second.results, servers[:5] + frame, strict=True):
            if res.ticket:
                by_ticket[res.ticket] = clients[servers.index(s)]
        for s in refused:  # still the worker's, and working
            s.sendall(b"kept")
            assert clients[servers.index(s)].recv(10) == b"kept"
        for s in set(servers) - refused:
            s.close()
        for t, c in by_ticket.items():
            c.sendall(b"%d" % t)
        assert peer.woken_bytes(12, 30) == {t: b"%d" % t for t in by_ticket}
        assert _wait(lambda: proc.fd_count() == baseline)
        peer.close()
    finally:
        assert proc.stop() == 0
        for s in (*clients, *servers):
            s.close()
    assert "Traceback" not in proc.log_text()


def test_a_stream_of_big_frames_holds_up_no_wake_and_the_watcher_never_spins(
    serve: ServeProcess,
) -> None:
    """A hostile peer sending big frames (128 pipes each, refused whole) back to
    back must not delay anybody's wakes, nor leave the watch loop spinning
    afterwards; nothing it sent stays open."""
    worker = RawPeer(serve.path, pool="p", name="worker")
    baseline = serve.fd_count()
    clients, servers = tcp_pairs(8)
    hostile = None
    try:
        parked = worker.park(
            [ParkEntry(s.fileno(), token=b"w%d" % i) for i, s in enumerate(servers)]
        )
        assert all(r.refusal is Refusal.OK for r in parked.results)
        for s in servers:
            s.close()
        hostile = RawPeer(serve.path, pool="h", name="hostile")
        stop = threading.Event()
        frames = [0]

        def flood() -> None:
            r, w = os.pipe()
            try:
                while not stop.is_set():
                    out = hostile.park([ParkEntry(r) for _ in range(128)])
                    assert all(x.refusal is Refusal.NOT_A_SOCKET for x in out.results)
                    frames[0] += 1
            finally:
                os.close(r)
                os.close(w)

        flooder = threading.Thread(target=flood)
        flooder.start()
        try:
            for i, c in enumerate(clients):
                time.sleep(0.1)
                sent = time.monotonic()
                c.sendall(b"b%d" % i)
                ((_ticket, token, fd),) = worker.wakes(1)
                assert time.monotonic() - sent < 1.0, i  # (a wake takes < 5 ms here)
                assert token == b"w%d" % i
                assert fd is not None
                with socket.socket(fileno=fd) as s:
                    s.settimeout(5)
                    assert s.recv(10) == b"b%d" % i
        finally:
            stop.set()
            flooder.join()
        assert frames[0] > 20  # the frames did come while the wakes were taken
        hostile.close()
        # The hostile session closed and all it sent with it (the worker's is in ``baseline``).
        assert _wait(lambda: serve.fd_count() == baseline)
        # Now idle: a watch loop that spun would burn a core.
        before = _cpu_seconds(serve.pid)
        time.sleep(0.5)
        assert _cpu_seconds(serve.pid) - before < 0.1
    finally:
        worker.close()
        if hostile is not None:
            hostile.close()
        for c in clients + servers:
            c.close()


def _flood_unread(peer: RawPeer) -> None:
    """Requests whose replies the peer will not read: its PARKED waits behind them."""
    peer.send(*[Stats() for _ in range(500)])


@pytest.mark.parametrize("how", ["ended", "unpark", "tagged"])
def test_a_resent_park_of_a_connection_another_worker_took_is_not_parked_again(
    sockdir: Path, how: str
) -> None:
    """P parks X while its socket is full: X's PARKED waits in the container. X
    still reaches P's pool-mate M, which ACKs it: re-routed when the container
    ends P (``ended``), or asked for by M with a guessed ticket (``unpark``) or
    by tag (``tagged``). P never saw the PARKED, so once its session is over it
    parks X again, marked re-sent: the answer must be the ticket M has, and X
    must not be parked a second time (two owners: X's next bytes would wake
    it to a second worker while M has it)."""
    proc = ServeProcess(sockdir / "twin.sock", ["--end-grace", "1"])
    (client,), (server,) = tcp_pairs(1)
    p = RawPeer(proc.path, pool="web", name="p")
    m = RawPeer(proc.path, pool="web", name="m")
    p2 = m2 = None
    try:
        baseline = proc.fd_count()
        _flood_unread(p)
        tags = (b"t",) if how == "tagged" else ()
        p.send(Park(9, (ParkEntry(server.fileno(), token=b"x", tags=tags),)))
        assert _wait(lambda: proc.stats().parked == 1)  # taken; its PARKED is not written
        if how == "ended":
            client.sendall(b"one")  # the wake goes to P, behind the PARKED...
            assert _wait(lambda: proc.stats().unacked == 1)
            p.send(Welcome(1, 1, 1))  # ...until the container ends P: then to M
        elif how == "unpark":
            fd = _fd_in(proc.pid, server)
            m.send(Unpark(tuple(seq << 24 | fd for seq in range(1, 5))))
        else:
            m.send(Tagged(TagOp.UNPARK, b"t"))
        (woken,) = _entries(m, 1, timeout=5)
        assert woken.token == b"x"
        assert woken.fd is not None
        mine = socket.socket(fileno=woken.fd)  # M has X now
        if how != "ended":
            client.sendall(b"one")
        mine.settimeout(5)
        assert mine.recv(10) == b"one"
        assert _wait(lambda: proc.stats().fds_held == 0)  # ACKed: the container's copy is closed
        if how != "ended":
            p.send(Welcome(1, 1, 1))  # P's session ends with its PARKED never written
        p.close()
        assert _wait(lambda: proc.stats().pools.get("web") == 1)  # P's session is over
        # P comes back (resuming its session) and sends again what was never answered.
        p2 = RawPeer(proc.path, pool="web", name="p2", resume_session=p.welcome.session_id)
        again = p2.park([ParkEntry(server.fileno(), token=b"x", resent=True)])
        assert again.results[0].refusal is Refusal.OK  # P closes its copy
        assert again.results[0].ticket == woken.ticket
        stats = proc.stats()
        assert (stats.parked, stats.fds_held) == (0, 0)
        server.close()
        client.sendall(b"two")  # M's, and only M's
        assert mine.recv(10) == b"two"
        for peer in (m, p2):
            with pytest.raises(TimeoutError):
                peer.receive(timeout=0.5)
        # M parks X in its turn and loses that park with its session: sent again
        # from M's next session, it is a new park, not a copy of P's (P's old
        # ticket would close X: nobody would have it).
        m2 = RawPeer(proc.path, pool="web", name="m2", resume_session=m.welcome.session_id)
        anew = m2.park([ParkEntry(mine.fileno(), token=b"m", resent=True)])
        assert anew.results[0].refusal is Refusal.OK
        assert anew.results[0].ticket not in (0, woken.ticket)
        mine.close()
        assert proc.stats().parked == 1
        client.sendall(b"three")
        (back,) = _entries(m2, 1, timeout=5)
        assert (back.ticket, back.token) == (anew.results[0].ticket, b"m")
        assert back.fd is not None
        with socket.socket(fileno=back.fd) as x:
            x.settimeout(5)
            assert x.recv(10) == b"three"
        m2.close()
        assert _wait(lambda: proc.fd_count() == baseline)  # (+ p2 - p)
    finally:
        for peer in (p, m, p2, m2):
            if peer is not None:
                peer.close()
        assert proc.stop() == 0
        client.close()
        server.close()
    assert "Traceback" not in proc.log_text()


def test_a_parker_gone_before_its_parked_is_written_gets_its_tickets_when_it_sends_again(
    serve: ServeProcess,
) -> None:
    """P sends a big plain frame and closes its end: writing the PARKED fails
    inside the admission (the session ends there, its slots parked and
    unconfirmed). Sent again, marked re-sent, from P's next session: each entry
    gets the ticket it has, nothing is parked twice, and each connection wakes
    once, with its bytes."""
    baseline = serve.fd_count()
    clients, servers = tcp_pairs(40)
    p = RawPeer(serve.path, pool="web", name="p")
    p.sock.shutdown(socket.SHUT_RD)  # the container's next write fails (EPIPE)
    p.send(Park(1, tuple(ParkEntry(s.fileno()) for s in servers)))
    p.close()
    assert _wait(lambda: serve.stats().pools.get("web", 0) == 0)
    assert "send failed" in serve.log_text()
    stats = serve.stats()
    assert (stats.parked, stats.fds_held) == (40, 40)
    p2 = RawPeer(serve.path, pool="web", name="p2", resume_session=p.welcome.session_id)
    again = p2.park([ParkEntry(s.fileno(), resent=True) for s in servers])
    assert [r.refusal for r in again.results] == [Refusal.OK] * 40
    tickets = [r.ticket for r in again.results]
    assert len(set(tickets)) == 40
    stats = serve.stats()
    assert (stats.parked, stats.fds_held) == (40, 40)
    # (+ p2's session; the STATS session just made may take a moment to go)
    assert _wait(lambda: serve.fd_count() == baseline + 40 + 1)
    for s in servers:
        s.close()
    for i, c in enumerate(clients):
        c.sendall(b"c%d" % i)
    assert p2.woken_bytes(40, 10) == {t: b"c%d" % i for i, t in enumerate(tickets)}
    p2.close()
    assert _wait(lambda: serve.fd_count() == baseline)
    for c in clients:
        c.close()
