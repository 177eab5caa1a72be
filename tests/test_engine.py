"""Socket-free unit tests of the worker engine (``connpark._worker.Engine``).

The engine does no I/O, so these tests play the container themselves with the
codec (``FakeContainer``): whatever the engine's ``data_to_send()`` gives goes
into a container-side ``Decoder`` (``join_split=False``, as the real container
admits each PARK frame on its own), and the container's answers are encoded
and fed back with ``engine.receive_data``.

Sockets the engine may close are ``FakeSock``: ``fileno()`` and a ``close()``
that counts. The fd numbers of parked fake sockets are far above any real
fd (nothing ever uses them as fds). WAKE fds are real (``/dev/null`` opened),
because the engine or its decoder close them; those tests compare the number
of open fds before and after.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from connpark._errors import (
    ConnparkError,
    ContainerError,
    ContainerLost,
    ContainerTimeout,
    ParkingClosed,
    ParkRefused,
)
from connpark._stats import ContainerStats, LatencySummary
from connpark._trio_close import close_sockets, trio_fast_close
from connpark._wire import (
    HEADER,
    MAX_FDS_PER_FRAME,
    MAX_RESUME_TICKETS,
    PROTOCOL_VERSION,
    Ack,
    Close,
    CloseEntry,
    Decoder,
    Error,
    ErrorCode,
    Hello,
    Message,
    Park,
    Parked,
    ParkEntry,
    ParkResult,
    Reason,
    Refusal,
    Stats,
    StatsReply,
    Unpark,
    Wake,
    WakeEntry,
    Welcome,
    encode,
)
from connpark._worker import (
    Backoff,
    Engine,
    Event,
    ParkRequest,
    Phase,
    Ready,
    ReqState,
    SessionLost,
    Settled,
    SharedEntries,
    StatsRequest,
    Woke,
    Woken,
    check_container_uid,
    park_entries,
    park_many_entries,
)

# Fake fd numbers for parked fake sockets: no process can have fds this high
# (the kernel caps RLIMIT_NOFILE at about 2**30), so a stray close is harmless.
_fake_fds = itertools.count(2_000_000_000)
_tickets = itertools.count(1 << 40)


class FakeSock:
    """A socket stand-in: ``fileno()`` and a ``close()`` that counts (and closes a real fd)."""

    def __init__(self, fd: int | None = None, *, real: bool = False) -> None:
        self.fd = next(_fake_fds) if fd is None else fd
        self.real = real
        self.closes = 0

    def fileno(self) -> int:
        return -1 if self.closes else self.fd

    def close(self) -> None:
        if self.real and not self.closes:
            os.close(self.fd)
        self.closes += 1

    @property
    def closed(self) -> bool:
        return self.closes > 0


def entry(sock: FakeSock, token: bytes = b"") -> ParkEntry:
    return ParkEntry(sock.fileno(), token)


def open_fds(n: int) -> list[int]:
    """Real fds to travel in WAKE frames (the engine or its decoder may close them)."""
    return [os.open(os.devnull, os.O_RDONLY) for _ in range(n)]


def fd_count() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: the leak checks are skipped
        return None


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    before = fd_count()
    yield
    assert fd_count() == before


def stats_body(n: int) -> bytes:
    """A valid STATS_REPLY body whose ``parks_total`` tells the replies apart."""
    snapshot = ContainerStats(
        parked=0,
        queued=0,
        unacked=0,
        orphaned=0,
        sessions=1,
        woken_total={},
        refused_total={},
        parks_total=n,
        acks_total=0,
        closed_total=0,
        orphans_closed_total=0,
        protocol_errors_total=0,
        pools={},
        fds_held=0,
        fd_budget=0,
        wake_latency=LatencySummary(),
        uptime_s=0.0,
        shutting_down=False,
    )
    return snapshot.to_json().encode()


class FakeContainer:
    """The container's side of one engine, written with the codec only."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.decoder = Decoder(join_split=False)
        self.session_ids = itertools.count(100)
        self.session_id = 0

    def connect(self, peer_uid: int | None = None) -> Hello:
        """A new session: the engine's HELLO."""
        self.decoder.close()
        self.decoder = Decoder(join_split=False)
        self.engine.start_session(peer_uid)
        (hello,) = self.recv()
        assert isinstance(hello, Hello)
        return hello

    def welcome(self, session_id: int | None = None) -> list[Event]:
        self.session_id = next(self.session_ids) if session_id is None else session_id
        self.send(Welcome(self.session_id, 0xFFFF, 1 << 16))
        events = self.events()
        assert isinstance(events[0], Ready)
        assert events[0].welcome.session_id == self.session_id
        return events

    def recv(self) -> list[Message]:
        """What the engine has to send, decoded."""
        for frame in self.engine.data_to_send():
            self.decoder.receive_data(frame.data, frame.fds)
        return list(self.decoder)

    def send(self, *msgs: Message) -> None:
        for msg in msgs:
            for frame in encode(msg):
                self.engine.receive_data(frame.data, frame.fds)

    def events(self) -> list[Event]:
        out = []
        while (ev := self.engine.next_event()) is not None:
            out.append(ev)
        return out


def started(**kw: Any) -> tuple[Engine, FakeContainer]:
    """An engine with a session up (READY), its events drained."""
    engine = Engine("pool", "w1", **kw)
    peer = FakeContainer(engine)
    peer.connect()
    peer.welcome()
    return engine, peer


def phase(engine: Engine) -> Phase:
    """The phase, read again (mypy narrows ``engine.phase`` after an assert)."""
    return engine.phase


def state(req: ParkRequest | StatsRequest) -> ReqState:
    return req.state


def settled(events: Sequence[Event]) -> list[ParkRequest | StatsRequest]:
    return [ev.request for ev in events if isinstance(ev, Settled)]


def parks(msgs: Sequence[Message]) -> list[Park]:
    return [m for m in msgs if isinstance(m, Park)]


def ok(*tickets: int) -> tuple[ParkResult, ...]:
    return tuple(ParkResult(Refusal.OK, t) for t in tickets)


# -- handshake ---------------------------------------------------------------------


def test_hello_v2_on_the_first_session() -> None:
    engine = Engine("pool-a", "worker-7")
    assert engine.phase is Phase.IDLE
    assert engine.data_to_send() == []
    peer = FakeContainer(engine)
    hello = peer.connect()
    assert hello == Hello(PROTOCOL_VERSION, "pool-a", "worker-7", 0, ())
    assert hello.version == 4
    assert phase(engine) is Phase.HANDSHAKE
    assert not engine.ready
    assert peer.recv() == []  # HELLO goes once
    events = peer.welcome(41)
    assert events == [Ready(Welcome(41, 0xFFFF, 1 << 16))]
    assert engine.ready
    assert engine.sessions == 1
    assert engine.welcome is not None
    assert engine.welcome.session_id == 41


def test_requests_made_before_welcome_go_out_after_it() -> None:
    engine = Engine()
    peer = FakeContainer(engine)
    sock = FakeSock()
    req = engine.park([sock], [entry(sock)], "waiter")  # IDLE: queued
    peer.connect()
    stats = engine.stats("waiter")
    assert peer.recv() == []  # nothing but HELLO before WELCOME
    assert req.state is ReqState.QUEUED
    assert stats.state is ReqState.QUEUED
    peer.welcome()
    msgs = peer.recv()
    assert [type(m) for m in msgs] == [Stats, Park]
    assert parks(msgs)[0].entries == (entry(sock),)
    assert state(req) is ReqState.SENT
    assert state(stats) is ReqState.SENT


def test_hello_after_a_reconnect_reports_the_previous_session_and_its_tickets() -> None:
    engine, peer = started()
    first = peer.session_id
    peer.send(Wake((WakeEntry(11, Reason.HANGUP), WakeEntry(12, Reason.TIMEOUT))))
    assert isinstance(peer.events()[0], Woke)
    peer.engine.receive_eof()
    (lost,) = peer.events()
    assert isinstance(lost, SessionLost)
    assert isinstance(lost.error, ContainerLost)
    assert engine.phase is Phase.LOST

    assert peer.connect() == Hello(PROTOCOL_VERSION, "pool", "w1", first, (11, 12))
    # A session lost during its handshake does not replace what HELLO reports.
    engine.receive_eof()
    assert [type(e) for e in peer.events()] == [SessionLost]
    assert peer.connect() == Hello(PROTOCOL_VERSION, "pool", "w1", first, (11, 12))
    peer.welcome(77)
    assert engine.sessions == 2
    peer.send(Wake((WakeEntry(13, Reason.HANGUP),)))
    peer.events()
    engine.receive_data(b"")  # b"" is EOF too
    assert [type(e) for e in peer.events()] == [SessionLost]
    assert peer.connect() == Hello(PROTOCOL_VERSION, "pool", "w1", 77, (13,))
    peer.welcome(78)
    engine.receive_eof()
    peer.events()
    assert peer.connect() == Hello(PROTOCOL_VERSION, "pool", "w1", 78, ())  # nothing woken in 78


def test_resume_tickets_are_bounded() -> None:
    engine, peer = started()
    n = MAX_RESUME_TICKETS + 5
    peer.send(Wake(tuple(WakeEntry(t, Reason.HANGUP) for t in range(1, n + 1))))
    (woke,) = peer.events()
    assert isinstance(woke, Woke)
    assert len(woke.entries) == n
    engine.receive_eof()
    hello = peer.connect()
    assert hello.resume_session == peer.session_id
    assert hello.resume_tickets == tuple(range(6, n + 1))  # the most recent ones
    assert len(hello.resume_tickets) == MAX_RESUME_TICKETS


def test_container_uid_check() -> None:
    mine = os.geteuid()
    other = mine + 4242
    check_container_uid(None, None)  # the OS cannot tell: nothing to check
    check_container_uid(None, other)
    check_container_uid(mine, None)
    check_container_uid(0, None)
    check_container_uid(other, other)  # named by container_uid=
    with pytest.raises(ContainerError) as info:
        check_container_uid(other, None)
    assert f"uid {other}" in str(info.value)
    assert f"{mine} (ours) or 0" in str(info.value)
    with pytest.raises(ContainerError) as info:
        check_container_uid(mine, other)  # a named uid replaces the defaults
    assert f"uid {mine}" in str(info.value)
    assert f"expected uid {other}" in str(info.value)
    if mine != 0:
        with pytest.raises(ContainerError):
            check_container_uid(0, other)


def test_start_session_refuses_an_untrusted_container_before_sending_anything() -> None:
    mine = os.geteuid()
    engine = Engine(container_uid=mine + 1)
    with pytest.raises(ContainerError, match=f"uid {mine}"):
        engine.start_session(mine)
    assert engine.phase is Phase.IDLE
    assert engine.data_to_send() == []
    engine.start_session(mine + 1)
    assert phase(engine) is Phase.HANDSHAKE


def test_start_session_only_from_idle_or_lost() -> None:
    engine, peer = started()
    with pytest.raises(ConnparkError, match="ready"):
        engine.start_session(None)
    engine.receive_eof()
    peer.connect()
    with pytest.raises(ConnparkError, match="handshake"):
        engine.start_session(None)


# -- park ----------------------------------------------------------------------------


def test_parks_are_batched_into_one_request() -> None:
    engine, peer = started()
    socks = [FakeSock() for _ in range(4)]
    r1 = engine.park(socks[:1], [entry(socks[0], b"a")], "w1")
    r2 = engine.park(socks[1:3], [entry(socks[1], b"b"), entry(socks[2], b"c")], "w2")
    r3 = engine.park(socks[3:], [entry(socks[3], b"d")], "w3")
    assert engine.busy is False  # nothing sent yet
    (park,) = peer.recv()
    assert isinstance(park, Park)
    assert [e.token for e in park.entries] == [b"a", b"b", b"c", b"d"]
    assert [e.fd for e in park.entries] == [s.fd for s in socks]
    assert all(r.state is ReqState.SENT for r in (r1, r2, r3))
    assert engine.busy
    assert peer.recv() == []  # sent once
    peer.send(
        Parked(
            park.request_id,
            (
                ParkResult(Refusal.OK, 5),
                ParkResult(Refusal.FULL),
                ParkResult(Refusal.OK, 6),
                ParkResult(Refusal.NOT_CONNECTED),
            ),
        )
    )
    assert settled(peer.events()) == [r1, r2, r3]
    assert [s.closed for s in socks] == [True, False, True, False]
    assert all(s.closes <= 1 for s in socks)
    assert r1.outcome() == [5]
    got = r2.outcome()
    assert isinstance(got[0], ParkRefused)
    assert got[0].reason is Refusal.FULL
    assert got[1] == 6
    (refused,) = r3.outcome()
    assert isinstance(refused, ParkRefused)
    assert refused.reason is Refusal.NOT_CONNECTED
    assert refused.reason.label == "not-connected"
    assert not engine.busy


def test_a_refusal_leaves_the_socket_open() -> None:
    engine, peer = started()
    sock = FakeSock()
    req = engine.park([sock], [entry(sock)], None)
    (park,) = parks(peer.recv())
    peer.send(Parked(park.request_id, (ParkResult(Refusal.SHUTTING_DOWN),)))
    assert settled(peer.events()) == [req]
    assert not sock.closed
    assert sock.fileno() == sock.fd
    (result,) = req.outcome()
    assert isinstance(result, ParkRefused)
    assert isinstance(result.reason, Refusal)
    assert result.reason is Refusal.SHUTTING_DOWN


def test_empty_park_settles_at_once() -> None:
    engine, peer = started()
    req = engine.park([], [], None)
    assert req.state is ReqState.DONE
    assert settled(peer.events()) == [req]
    assert req.outcome() == []
    assert peer.recv() == []


def test_more_than_253_fds_are_split_and_answered_in_pieces_in_order() -> None:
    engine, peer = started()
    big = [FakeSock() for _ in range(300)]
    small = [FakeSock() for _ in range(10)]
    r_big = engine.park(big, [entry(s) for s in big], None)
    r_small = engine.park(small, [entry(s) for s in small], None)
    frames = engine.data_to_send()
    assert [len(f.fds) for f in frames] == [MAX_FDS_PER_FRAME, 310 - MAX_FDS_PER_FRAME]
    for f in frames:
        peer.decoder.receive_data(f.data, f.fds)
    first, second = parks(list(peer.decoder))
    assert first.request_id == second.request_id
    assert [e.fd for e in first.entries + second.entries] == [s.fd for s in big + small]

    # Piece one: 253 answers, every 7th refused. Nothing is settled yet.
    refuse = {i for i in range(310) if i % 7 == 3}

    def result(i: int) -> ParkResult:
        return ParkResult(Refusal.FULL) if i in refuse else ParkResult(Refusal.OK, 1000 + i)

    peer.send(Parked(first.request_id, tuple(result(i) for i in range(253))))
    assert peer.events() == []
    assert engine.busy
    assert [s.closed for s in big[:253]] == [i not in refuse for i in range(253)]
    assert not any(s.closed for s in big[253:] + small)
    # Piece two answers the rest of the big park, then the small one.
    peer.send(Parked(first.request_id, tuple(result(i) for i in range(253, 310))))
    assert settled(peer.events()) == [r_big, r_small]
    everything = big + small
    assert [s.closes for s in everything] == [int(i not in refuse) for i in range(310)]
    outcome = r_big.outcome() + r_small.outcome()
    for i, got in enumerate(outcome):
        if i in refuse:
            assert isinstance(got, ParkRefused)
        else:
            assert got == 1000 + i
    assert not engine.busy


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda rid: Parked(rid + 1, ok(1)), id="unknown-request"),
        pytest.param(lambda rid: Parked(rid, ok(1, 2, 3)), id="too-many-answers"),
    ],
)
def test_a_wrong_parked_ends_the_session(bad: Any) -> None:
    engine, peer = started()
    socks = [FakeSock(), FakeSock()]
    req = engine.park(socks, [entry(s) for s in socks], None)
    (park,) = parks(peer.recv())
    peer.send(bad(park.request_id))
    events = peer.events()
    assert isinstance(events[-1], SessionLost)
    assert engine.phase is Phase.LOST
    # Whatever was answered before the mistake stays answered; the rest is re-sent.
    answered = req.answered
    assert all(s.closed == (i < answered) for i, s in enumerate(socks))
    peer.connect()
    peer.welcome()
    if answered < 2:
        (again,) = parks(peer.recv())
        assert again.request_id != park.request_id
        assert [e.fd for e in again.entries] == [s.fd for s in socks[answered:]]


# -- withdraw ----------------------------------------------------------------------


def test_withdraw_a_queued_park() -> None:
    engine, peer = started()
    sock, kept = FakeSock(), FakeSock()
    req = engine.park([sock], [entry(sock)], None)
    other = engine.park([kept], [entry(kept)], None)
    engine.withdraw(req)
    assert req.state is ReqState.DONE
    with pytest.raises(ParkingClosed):
        req.outcome()
    (park,) = parks(peer.recv())
    assert [e.fd for e in park.entries] == [kept.fd]  # the withdrawn one is not sent
    assert peer.events() == []  # no Settled for a withdrawn park
    peer.send(Parked(park.request_id, ok(9)))
    assert settled(peer.events()) == [other]
    assert not sock.closed
    engine.withdraw(req)  # again: nothing happens
    engine.withdraw(other)  # done already: nothing happens
    assert other.outcome() == [9]


@pytest.mark.parametrize("answer", [Refusal.OK, Refusal.FULL])
def test_withdraw_a_sent_park_abandons_it(answer: Refusal) -> None:
    engine, peer = started()
    sock, other_sock = FakeSock(), FakeSock()
    req = engine.park([sock], [entry(sock)], None)
    other = engine.park([other_sock], [entry(other_sock)], None)
    (park,) = parks(peer.recv())
    engine.withdraw(req)
    assert req.state is ReqState.SENT
    assert req.abandoned
    assert engine.busy  # its answer is still due
    peer.send(Parked(park.request_id, (ParkResult(answer, 4), ParkResult(Refusal.OK, 5))))
    assert settled(peer.events()) == [other]  # none for the abandoned one
    assert state(req) is ReqState.DONE
    # The answer still decides who owns the socket.
    assert sock.closes == (1 if answer is Refusal.OK else 0)
    assert other_sock.closes == 1
    assert not engine.busy


def test_an_abandoned_park_is_sent_again_after_a_lost_session() -> None:
    """The dead session's container may have taken it: sent again (RESENT), an OK
    closes the caller's copy, so the socket never has two owners."""
    engine, peer = started()
    sock, kept, third = FakeSock(), FakeSock(), FakeSock()
    req = engine.park([sock], [entry(sock)], None)
    other = engine.park([kept], [entry(kept)], None)
    peer.recv()
    engine.withdraw(req)
    engine.receive_eof()
    assert [type(e) for e in peer.events()] == [SessionLost]
    assert req.state is ReqState.QUEUED
    assert not sock.closed
    peer.connect()
    peer.welcome()
    (park,) = parks(peer.recv())
    assert [e.fd for e in park.entries] == [sock.fd, kept.fd]
    assert [e.resent for e in park.entries] == [True, True]
    peer.send(Parked(park.request_id, ok(3, 4)))
    assert settled(peer.events()) == [other]  # nobody waits for the abandoned one
    assert sock.closes == 1  # the container has it: our copy goes
    # A refused abandoned park leaves the socket the caller's.
    req3 = engine.park([third], [entry(third)], None)
    (park3,) = parks(peer.recv())
    engine.withdraw(req3)
    peer.send(Parked(park3.request_id, (ParkResult(Refusal.FULL),)))
    assert peer.events() == []
    assert not third.closed


def test_withdraw_stats() -> None:
    engine = Engine()
    peer = FakeContainer(engine)
    peer.connect()
    queued = engine.stats(None)
    engine.withdraw(queued)  # not sent yet: done at once
    assert queued.state is ReqState.DONE
    peer.welcome()
    assert peer.recv() == []  # the withdrawn request is not sent after WELCOME
    assert not engine.busy


# -- wake and ack --------------------------------------------------------------------


@pytest.mark.usefixtures("no_fd_leak")
def test_wake_is_acked_with_exactly_its_tickets() -> None:
    engine, peer = started()
    fds = open_fds(2)
    wake = Wake(
        (
            WakeEntry(21, Reason.READABLE, b"t1", b"p1", fds[0]),
            WakeEntry(22, Reason.HANGUP, b"t2"),  # a notice
            WakeEntry(23, Reason.REQUESTED, b"t3", b"", fds[1], inet6=True),
        )
    )
    (frame,) = encode(wake)
    engine.receive_data(frame.data, frame.fds)
    assert peer.recv() == []  # the ACK is queued once the WAKE is decoded
    (woke,) = peer.events()
    assert isinstance(woke, Woke)
    assert [e.ticket for e in woke.entries] == [21, 22, 23]
    assert woke.entries[1].fd is None
    assert woke.entries[2].inet6
    woken_fds = [e.fd for e in woke.entries if e.fd is not None]
    assert all(is_open(fd) for fd in woken_fds)
    assert peer.recv() == [Ack((21, 22, 23))]
    assert peer.recv() == []  # ACKed once
    for fd in woken_fds:
        os.close(fd)


def test_ack_goes_before_other_frames() -> None:
    engine, peer = started()
    sock = FakeSock()
    engine.park([sock], [entry(sock)], None)
    engine.stats(None)
    engine.unpark([7])
    engine.close_ticket(8, b"bye")
    peer.send(Wake((WakeEntry(31, Reason.TIMEOUT),)), Wake((WakeEntry(32, Reason.TIMEOUT),)))
    peer.events()
    msgs = peer.recv()
    assert [type(m) for m in msgs] == [Ack, Stats, Unpark, Close, Park]
    assert msgs[0] == Ack((31, 32))
    assert msgs[2] == Unpark((7,))
    assert msgs[3] == Close((CloseEntry(8, b"bye"),))


def test_unpark_and_close_without_a_session_go_out_with_the_next_one() -> None:
    engine, peer = started()
    engine.unpark([7])  # sent, but the container may die before it reads it
    engine.close_ticket(8, b"bye")
    assert peer.recv() == [Unpark((7,)), Close((CloseEntry(8, b"bye"),))]
    engine.receive_eof()
    assert [type(e) for e in peer.events()] == [SessionLost]
    engine.unpark([1])
    engine.close_ticket(2)
    with pytest.raises(TypeError):
        engine.close_ticket(2, "bye")  # type: ignore[arg-type]
    peer.connect()
    peer.welcome()
    # Idempotent requests the last container may not have read, sent again.
    assert peer.recv() == [
        Unpark((7, 1)),
        Close((CloseEntry(8, b"bye"), CloseEntry(2, b""))),
    ]
    # A WAKE settles an UNPARK: not repeated after the next reconnect.
    peer.send(Wake((WakeEntry(7, Reason.REQUESTED),)))
    peer.events()
    peer.recv()
    engine.receive_eof()
    peer.events()
    peer.connect()
    peer.welcome()
    assert peer.recv() == [Unpark((1,))]


# -- stats ---------------------------------------------------------------------------


def test_stats_replies_match_requests_in_order() -> None:
    engine, peer = started()
    a, b, c = engine.stats("a"), engine.stats("b"), engine.stats("c")
    assert peer.recv() == [Stats(), Stats(), Stats()]
    assert engine.busy
    engine.withdraw(a)  # abandoned: its reply is dropped, not given to b
    peer.send(StatsReply(stats_body(1)))
    assert peer.events() == []
    peer.send(StatsReply(stats_body(2)))
    assert settled(peer.events()) == [b]
    assert b.outcome().parks_total == 2
    assert engine.busy
    peer.send(StatsReply(stats_body(3)))
    assert settled(peer.events()) == [c]
    assert c.outcome().parks_total == 3
    assert not engine.busy
    peer.send(StatsReply(stats_body(4)))  # nobody asked: dropped
    assert peer.events() == []
    assert engine.ready


def test_bad_statistics_fail_that_request_only() -> None:
    engine, peer = started()
    req = engine.stats(None)
    peer.recv()
    peer.send(StatsReply(b"{not json"))
    assert settled(peer.events()) == [req]
    with pytest.raises(ContainerLost, match="bad statistics"):
        req.outcome()
    assert engine.ready


def test_abandoned_stats_is_not_resent_and_does_not_steal_a_reply() -> None:
    engine, peer = started()
    a, b = engine.stats("a"), engine.stats("b")
    peer.recv()
    engine.withdraw(a)
    engine.receive_eof()
    peer.events()
    peer.connect()
    peer.welcome()
    assert peer.recv() == [Stats()]  # b only
    c = engine.stats("c")
    assert peer.recv() == [Stats()]
    peer.send(StatsReply(stats_body(1)), StatsReply(stats_body(2)))
    assert settled(peer.events()) == [b, c]
    assert b.outcome().parks_total == 1
    assert c.outcome().parks_total == 2


def test_an_abandoned_stats_request_lost_in_flight_is_done() -> None:
    engine, peer = started()
    a = engine.stats(None)
    peer.recv()
    engine.withdraw(a)
    engine.receive_eof()
    peer.events()
    peer.connect()
    peer.welcome()
    b = engine.stats(None)
    assert peer.recv() == [Stats()]
    peer.send(StatsReply(stats_body(1)))
    assert settled(peer.events()) == [b]
    assert a.state is ReqState.DONE


def test_a_stats_reply_before_welcome_does_not_lose_queued_requests() -> None:
    engine = Engine()
    peer = FakeContainer(engine)
    peer.connect()
    req = engine.stats(None)
    peer.send(StatsReply(stats_body(1)))
    peer.events()
    if engine.phase is Phase.HANDSHAKE:
        peer.welcome()
        assert peer.recv() == [Stats()]  # still waited for: sent now
    engine.begin_close()
    engine.finish_close()
    assert settled(peer.events()) == [req]  # settled, one way or the other


# -- lost sessions -------------------------------------------------------------------


def _lose_by_eof(engine: Engine, peer: FakeContainer) -> None:
    engine.receive_eof()


def _lose_by_eof_mid_frame(engine: Engine, peer: FakeContainer) -> None:
    (frame,) = encode(StatsReply(b"{}"))
    engine.receive_data(frame.data[:5])
    engine.receive_eof()


def _lose_by_error(engine: Engine, peer: FakeContainer) -> None:
    peer.send(Error(ErrorCode.SHUTTING_DOWN, "bye"))


def _lose_by_garbage(engine: Engine, peer: FakeContainer) -> None:
    engine.receive_data(HEADER.pack(0, 99, 0, 0))


def _lose_by_second_welcome(engine: Engine, peer: FakeContainer) -> None:
    peer.send(Welcome(1, 1, 1))


def _lose_by_worker_message(engine: Engine, peer: FakeContainer) -> None:
    peer.send(Ack((1,)))


def _lose_by_reset(engine: Engine, peer: FakeContainer) -> None:
    engine.connection_failed(ContainerLost("reset"))


LOSSES = [
    _lose_by_eof,
    _lose_by_eof_mid_frame,
    _lose_by_error,
    _lose_by_garbage,
    _lose_by_second_welcome,
    _lose_by_worker_message,
    _lose_by_reset,
]


@pytest.mark.parametrize("lose", LOSSES)
def test_a_lost_session_requeues_what_was_not_answered(lose: Any) -> None:
    engine, peer = started()
    first_session = peer.session_id
    done = [FakeSock(), FakeSock()]
    half = [FakeSock(), FakeSock(), FakeSock()]
    unanswered = [FakeSock()]
    r_done = engine.park(done, [entry(s) for s in done], None)
    r_half = engine.park(half, [entry(s) for s in half], None)
    r_none = engine.park(unanswered, [entry(s) for s in unanswered], None)
    stats = engine.stats(None)
    msgs = peer.recv()
    (park,) = parks(msgs)
    peer.send(Wake((WakeEntry(51, Reason.HANGUP),)))
    peer.send(Parked(park.request_id, ok(1, 2, 3)))  # r_done and half of r_half
    events = peer.events()
    assert settled(events) == [r_done]
    late = FakeSock()
    r_late = engine.park([late], [entry(late)], None)  # queued, never sent

    lose(engine, peer)
    events = peer.events()
    assert isinstance(events[-1], SessionLost)
    assert isinstance(events[-1].error, ContainerLost)
    assert engine.last_error is events[-1].error
    assert settled(events) == []
    assert engine.phase is Phase.LOST
    # The WAKE's ACK had not gone out: it is the dead session's last word.
    assert peer.recv() == [Ack((51,))]
    assert engine.data_to_send() == []
    assert r_half.state is ReqState.QUEUED
    assert r_none.state is ReqState.QUEUED
    assert stats.state is ReqState.QUEUED
    assert [s.closed for s in half] == [True, False, False]
    assert not unanswered[0].closed
    assert engine.retry_delay(0.0) is not None

    hello = peer.connect()
    assert hello.resume_session == first_session
    assert hello.resume_tickets == (51,)
    assert peer.recv() == []
    peer.welcome()
    msgs = peer.recv()
    assert [type(m) for m in msgs] == [Stats, Park]
    again = parks(msgs)[0]
    assert again.request_id != park.request_id
    # Only what was not answered, in the original order, then the newer park.
    assert [e.fd for e in again.entries] == [s.fd for s in [*half[1:], *unanswered, late]]
    # Sent again: marked so, the container may have taken them before it died.
    assert [e.resent for e in again.entries] == [True, True, True, False]
    peer.send(Parked(again.request_id, (ParkResult(Refusal.FULL), *ok(4, 5, 6))))
    assert settled(peer.events()) == [r_half, r_none, r_late]
    got = r_half.outcome()
    assert got[0] == 3
    assert isinstance(got[1], ParkRefused)
    assert got[2] == 4
    assert [s.closes for s in half] == [1, 0, 1]
    assert r_none.outcome() == [5]
    assert r_late.outcome() == [6]
    peer.send(StatsReply(stats_body(9)))
    assert settled(peer.events()) == [stats]
    assert engine.sessions == 2


def test_acks_pending_when_a_session_ends_are_its_last_words() -> None:
    _, peer = started()
    first = peer.session_id
    peer.send(Wake((WakeEntry(61, Reason.HANGUP),)), Error(ErrorCode.SHUTTING_DOWN, "bye"))
    assert [type(e) for e in peer.events()] == [Woke, SessionLost]
    assert peer.recv() == [Ack((61,))]  # the container that ended it still reads them
    assert peer.recv() == []  # once
    assert peer.connect() == Hello(
        PROTOCOL_VERSION, "pool", "w1", first, (61,)
    )  # reported all the same


def test_acks_not_written_before_the_next_session_are_dropped() -> None:
    engine, peer = started()
    first = peer.session_id
    peer.send(Wake((WakeEntry(62, Reason.HANGUP),)))
    peer.events()
    engine.receive_eof()
    peer.events()
    # The hook reconnects without writing them: HELLO alone, and it reports 62.
    assert peer.connect() == Hello(PROTOCOL_VERSION, "pool", "w1", first, (62,))
    assert peer.recv() == []
    peer.welcome()
    assert peer.recv() == []  # not ACKed to the new session


def test_welcomed() -> None:
    engine = Engine()
    peer = FakeContainer(engine)
    assert not engine.welcomed
    peer.connect()
    assert not engine.welcomed
    peer.welcome()
    assert engine.welcomed
    engine.receive_eof()
    peer.events()
    assert engine.welcomed  # the session started last got its WELCOME
    peer.connect()
    assert not engine.welcomed
    engine.receive_eof()
    peer.events()
    assert not engine.welcomed  # lost in its handshake


@pytest.mark.parametrize("code", [ErrorCode.VERSION, ErrorCode.NOT_ALLOWED])
@pytest.mark.parametrize("when", ["handshake", "ready"])
def test_a_fatal_error_gives_up(code: ErrorCode, when: str) -> None:
    engine = Engine()
    peer = FakeContainer(engine)
    sock, sent = FakeSock(), FakeSock()
    queued = engine.park([sock], [entry(sock)], None)
    stats = engine.stats(None)
    peer.connect()
    if when == "ready":
        peer.welcome()
        engine.park([sent], [entry(sent)], None)
        peer.recv()
    peer.send(Error(code, "not you"))
    events = peer.events()
    assert any(isinstance(e, SessionLost) for e in events)
    assert engine.phase is Phase.CLOSED
    assert isinstance(engine.error, ContainerError)
    assert engine.error.code == code
    assert "not you" in str(engine.error)
    reqs = settled(events)
    assert queued in reqs
    assert stats in reqs
    for req in reqs:
        with pytest.raises(ContainerError):
            req.outcome()
    assert not sock.closed
    assert not sent.closed
    assert engine.retry_delay(0.0) is None
    with pytest.raises(ContainerError):
        engine.park([FakeSock()], [ParkEntry(5)], None)
    with pytest.raises(ContainerError):
        engine.stats(None)


@pytest.mark.parametrize(
    "code", [*(c for c in ErrorCode if c not in (ErrorCode.VERSION, ErrorCode.NOT_ALLOWED)), 99]
)
def test_other_error_codes_are_not_fatal(code: int) -> None:
    engine, peer = started()
    peer.send(Error(code, "why"))
    (lost,) = peer.events()
    assert isinstance(lost, SessionLost)
    assert isinstance(lost.error, ContainerLost)
    assert "why" in str(lost.error)
    assert engine.phase is Phase.LOST
    assert engine.retry_delay(0.0) is not None


def test_a_non_fatal_error_during_the_handshake_can_be_retried() -> None:
    engine = Engine()
    peer = FakeContainer(engine)
    peer.connect()
    peer.send(Error(ErrorCode.TOO_MANY_SESSIONS, "busy"))
    (lost,) = peer.events()
    assert isinstance(lost, SessionLost)
    assert "busy" in str(lost.error)
    assert engine.phase is Phase.LOST
    assert engine.retry_delay(0.0) is not None
    assert peer.connect() == Hello(PROTOCOL_VERSION, "default", "", 0, ())


def test_without_reconnect_every_waiter_fails_with_container_lost() -> None:
    engine, peer = started(reconnect=False)
    sent, queued = FakeSock(), FakeSock()
    r_sent = engine.park([sent], [entry(sent)], None)
    stats = engine.stats(None)
    peer.recv()
    r_queued = engine.park([queued], [entry(queued)], None)
    engine.receive_eof()
    events = peer.events()
    assert isinstance(events[0], SessionLost)
    assert set(map(id, settled(events))) == {id(r_sent), id(r_queued), id(stats)}
    for req in (r_sent, r_queued, stats):
        with pytest.raises(ContainerLost):
            req.outcome()
    assert not sent.closed
    assert not queued.closed
    assert engine.phase is Phase.CLOSED
    assert engine.retry_delay(0.0) is None
    with pytest.raises(ContainerLost):
        engine.park([FakeSock()], [ParkEntry(5)], None)


@pytest.mark.usefixtures("no_fd_leak")
def test_what_follows_the_end_of_a_session_is_dropped_and_its_fds_closed() -> None:
    engine, peer = started()
    fds = open_fds(2)
    frames = [
        *encode(Error(ErrorCode.INTERNAL, "oops")),
        *encode(Wake((WakeEntry(61, Reason.READABLE, fd=fds[0]),))),
    ]
    data = b"".join(f.data for f in frames)
    engine.receive_data(data, [fds[0]])
    events = peer.events()
    assert [type(e) for e in events] == [SessionLost]
    assert not is_open(fds[0])
    engine.receive_data(b"late", [fds[1]])  # a session that is over
    assert not is_open(fds[1])
    assert peer.connect().resume_tickets == ()


@pytest.mark.usefixtures("no_fd_leak")
def test_a_park_from_the_container_is_a_protocol_error_and_its_fds_are_closed() -> None:
    _, peer = started()
    fds = open_fds(2)
    peer.send(Park(1, (ParkEntry(fds[0]), ParkEntry(fds[1]))))
    assert [type(e) for e in peer.events()] == [SessionLost]
    assert not any(is_open(fd) for fd in fds)


# -- reconnect schedule ----------------------------------------------------------------


def test_retry_delay_doubles_caps_and_gives_up() -> None:
    engine, peer = started(backoff=Backoff(first=0.1, most=0.5, give_up_after=3.0), path="/x/ctl")
    assert engine.retry_delay(0.0) is None  # not lost
    sock = FakeSock()
    req = engine.park([sock], [entry(sock)], None)
    engine.receive_eof()
    peer.events()
    delays = [engine.retry_delay(10.0 + i * 0.5) for i in range(6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5, 0.5])
    assert engine.retry_delay(12.9) == pytest.approx(0.5)
    # A session lost in its handshake does not restart the clock.
    peer.connect()
    engine.receive_eof()
    peer.events()
    assert engine.phase is Phase.LOST
    assert engine.retry_delay(12.95) == pytest.approx(0.5)
    # give_up_after since the first call: the engine gives up by itself.
    assert engine.retry_delay(13.0) is None
    assert phase(engine) is Phase.CLOSED
    assert isinstance(engine.error, ContainerLost)
    assert "/x/ctl" in str(engine.error)
    assert "3 s" in str(engine.error)
    assert settled(peer.events()) == [req]
    with pytest.raises(ContainerLost, match="could not reconnect"):
        req.outcome()
    assert not sock.closed
    assert engine.retry_delay(14.0) is None


def test_a_welcome_restarts_the_backoff() -> None:
    engine, peer = started(backoff=Backoff(first=0.1, most=0.5, give_up_after=3.0))
    engine.receive_eof()
    peer.events()
    assert engine.retry_delay(0.0) == pytest.approx(0.1)
    assert engine.retry_delay(2.0) == pytest.approx(0.2)
    peer.connect()
    peer.welcome()
    engine.receive_eof()
    peer.events()
    assert engine.retry_delay(100.0) == pytest.approx(0.1)
    assert engine.retry_delay(102.9) == pytest.approx(0.2)
    assert engine.phase is Phase.LOST


def test_handshake_timed_out() -> None:
    engine = Engine(path="/run/ctl")
    peer = FakeContainer(engine)
    sock = FakeSock()
    req = engine.park([sock], [entry(sock)], None)
    peer.connect()
    error = engine.handshake_timed_out(2.5)
    assert isinstance(error, ContainerTimeout)
    assert "/run/ctl" in str(error)
    assert "2.5 s" in str(error)
    assert [type(e) for e in peer.events()] == [SessionLost]
    assert engine.phase is Phase.LOST
    assert engine.session_error() is error
    assert req.state is ReqState.QUEUED  # still waits for the next session
    peer.connect()
    peer.welcome()
    (park,) = parks(peer.recv())
    assert [e.fd for e in park.entries] == [sock.fd]


def test_session_error_and_reconnect_failed() -> None:
    engine = Engine()
    assert isinstance(engine.session_error(), ContainerLost)  # nothing happened yet
    peer = FakeContainer(engine)
    peer.connect()
    peer.welcome()
    assert engine.connected
    engine.receive_eof()
    peer.events()
    assert not engine.connected
    lost = engine.session_error()
    assert isinstance(lost, ContainerLost)
    assert lost is engine.last_error
    # A failed attempt that left the engine LOST: keep trying.
    engine.reconnect_failed(ContainerLost("refused"))
    assert engine.phase is Phase.LOST
    # A fatal answer closed it: reconnect_failed does not replace the error.
    peer.connect()
    peer.send(Error(ErrorCode.VERSION, "too new"))
    peer.events()
    assert phase(engine) is Phase.CLOSED
    fatal = engine.session_error()
    assert isinstance(fatal, ContainerError)
    engine.reconnect_failed(ContainerLost("other"))
    assert engine.session_error() is fatal


def test_connected_while_closing() -> None:
    engine, _ = started()
    assert engine.connected
    assert engine.ready
    engine.begin_close()
    assert engine.connected  # keep reading: answers may still come
    assert not engine.ready
    engine.finish_close()
    assert not engine.connected


def test_give_up_fails_every_waiter() -> None:
    engine, peer = started()
    sock = FakeSock()
    req = engine.park([sock], [entry(sock)], None)
    peer.recv()
    stats = engine.stats(None)
    engine.receive_eof()
    peer.events()
    error = ContainerLost("could not reconnect")
    engine.give_up(error)
    assert set(map(id, settled(peer.events()))) == {id(req), id(stats)}
    for r in (req, stats):
        with pytest.raises(ContainerLost, match="could not reconnect"):
            r.outcome()
    assert not sock.closed
    assert engine.error is error
    engine.give_up(ContainerLost("again"))  # once closed: nothing
    assert engine.error is error


def test_without_reconnect_retry_delay_is_none() -> None:
    engine, _ = started(reconnect=False)
    engine.receive_eof()
    assert engine.retry_delay(0.0) is None


# -- closing ---------------------------------------------------------------------------


def _woken(engine: Engine, peer: FakeContainer, tickets: Sequence[int]) -> list[Woken[FakeSock]]:
    """Wake ``tickets`` with real fds and wrap them the way a hook does."""
    fds = open_fds(len(tickets))
    peer.send(
        Wake(
            tuple(
                WakeEntry(t, Reason.READABLE, b"tok%d" % t, b"pend", fd)
                for t, fd in zip(tickets, fds, strict=True)
            )
        )
    )
    out: list[Woken[FakeSock]] = []
    for ev in peer.events():
        assert isinstance(ev, Woke)
        for e in ev.entries:
            assert e.fd is not None
            out.append(Woken(e.ticket, e.reason, e.token, e.pending, FakeSock(e.fd, real=True)))
    return out


@pytest.mark.usefixtures("no_fd_leak")
def test_begin_close_hands_untaken_wakes_back() -> None:
    engine, peer = started()
    taken, *untaken = _woken(engine, peer, [71, 72, 73])
    assert taken.socket is not None
    taken.socket.close()  # the user's
    notice: Woken[FakeSock] = Woken(74, Reason.HANGUP, b"", b"", None)
    sent = FakeSock()
    r_sent = engine.park([sent], [entry(sent)], None)
    (park,) = parks(peer.recv())  # after the ACK of 71..73
    queued = FakeSock()
    r_queued = engine.park([queued], [entry(queued)], None)

    handback = engine.begin_close([*untaken, notice], "closing")
    assert handback is not None
    assert handback.handback
    assert engine.phase is Phase.CLOSING
    assert settled(peer.events()) == [r_queued]
    with pytest.raises(ParkingClosed):
        r_queued.outcome()
    assert not queued.closed
    with pytest.raises(ParkingClosed):
        engine.park([FakeSock()], [ParkEntry(5)], None)
    with pytest.raises(ParkingClosed):
        engine.stats(None)
    assert engine.begin_close() is None  # once

    (hb,) = parks(peer.recv())
    assert [(e.token, e.pending) for e in hb.entries] == [(b"tok72", b"pend"), (b"tok73", b"pend")]
    assert [e.fd for e in hb.entries] == [w.socket.fd for w in untaken if w.socket]

    # A WAKE now is not ACKed and its fds are closed: the container re-routes it.
    late = open_fds(1)
    peer.send(Wake((WakeEntry(75, Reason.READABLE, fd=late[0]),)))
    assert peer.events() == []
    assert not is_open(late[0])
    assert peer.recv() == []

    # The parks already sent are still answered.
    peer.send(Parked(park.request_id, ok(8)))
    assert settled(peer.events()) == [r_sent]
    assert sent.closed
    peer.send(Parked(hb.request_id, ok(72, 73)))
    assert settled(peer.events()) == [handback]
    assert all(w.socket is not None and w.socket.closes == 1 for w in untaken)
    assert not engine.busy
    engine.finish_close()
    assert phase(engine) is Phase.CLOSED
    assert peer.events() == []


def test_wakes_acked_before_begin_close_are_still_acked() -> None:
    engine, peer = started()
    peer.send(Wake((WakeEntry(81, Reason.HANGUP),)))
    peer.events()
    assert engine.begin_close() is None  # nothing to hand back
    assert engine.phase is Phase.CLOSING
    assert peer.recv() == [Ack((81,))]


@pytest.mark.usefixtures("no_fd_leak")
def test_finish_close_fails_what_waits() -> None:
    engine, peer = started()
    untaken = _woken(engine, peer, [91, 92])
    sent = FakeSock()
    r_sent = engine.park([sent], [entry(sent)], None)
    stats = engine.stats(None)
    peer.recv()
    handback = engine.begin_close(untaken, None)
    assert handback is not None
    (hb,) = parks(peer.recv())
    peer.send(Parked(hb.request_id, ok(91)))  # half of the hand-back
    assert peer.events() == []
    assert engine.busy
    engine.finish_close()
    reqs = settled(peer.events())
    assert set(map(id, reqs)) == {id(r_sent), id(stats), id(handback)}
    for req in reqs:
        with pytest.raises(ParkingClosed):
            req.outcome()
    assert not sent.closed  # never answered: still the caller's
    # The hand-back's sockets are the engine's own: closed, the answered one once.
    assert [w.socket.closes for w in untaken if w.socket] == [1, 1]
    assert engine.phase is Phase.CLOSED
    with pytest.raises(ParkingClosed):
        engine.park([FakeSock()], [ParkEntry(5)], None)


@pytest.mark.usefixtures("no_fd_leak")
def test_begin_close_without_a_session_closes_untaken_wakes() -> None:
    engine, peer = started()
    untaken = _woken(engine, peer, [95])
    sock = FakeSock()
    req = engine.park([sock], [entry(sock)], None)
    engine.receive_eof()
    peer.events()
    assert engine.begin_close(untaken, None) is None
    assert engine.phase is Phase.CLOSED
    assert untaken[0].socket is not None
    assert untaken[0].socket.closes == 1
    assert settled(peer.events()) == [req]
    with pytest.raises(ParkingClosed):
        req.outcome()
    assert not sock.closed


@pytest.mark.usefixtures("no_fd_leak")
def test_a_lost_session_while_closing_closes_the_handback() -> None:
    engine, peer = started()
    untaken = _woken(engine, peer, [96, 97])
    handback = engine.begin_close(untaken, None)
    peer.recv()
    engine.receive_eof()
    events = peer.events()
    assert isinstance(events[0], SessionLost)
    assert settled(events) == [handback]
    assert engine.phase is Phase.CLOSED
    assert [w.socket.closes for w in untaken if w.socket] == [1, 1]
    with pytest.raises(ParkingClosed):
        engine.park([FakeSock()], [ParkEntry(5)], None)


@pytest.mark.usefixtures("no_fd_leak")
def test_a_refused_handback_socket_is_closed() -> None:
    engine, peer = started()
    untaken = _woken(engine, peer, [98, 99])
    handback = engine.begin_close(untaken, None)
    (hb,) = parks(peer.recv())
    try:
        peer.send(Parked(hb.request_id, (ParkResult(Refusal.SHUTTING_DOWN), *ok(99))))
        assert settled(peer.events()) == [handback]
        assert [w.socket.closes for w in untaken if w.socket] == [1, 1]
    finally:
        for w in untaken:
            if w.socket is not None and not w.socket.closed:
                w.socket.close()  # keep the fd check of this test meaningful
        engine.finish_close()


def test_begin_close_during_the_handshake_closes_the_decoder() -> None:
    engine = Engine()
    peer = FakeContainer(engine)
    peer.connect()
    fds = open_fds(1)
    (frame,) = encode(Wake((WakeEntry(1, Reason.READABLE, fd=fds[0]),)))
    engine.receive_data(frame.data[:-1], fds)  # the WAKE is not complete yet
    assert engine.next_event() is None
    try:
        engine.begin_close()
        engine.finish_close()
        assert not is_open(fds[0])
    finally:
        if is_open(fds[0]):
            os.close(fds[0])


# -- random sequences ----------------------------------------------------------------------


class EngineMachine(RuleBasedStateMachine):
    """A hook and a container around one engine, in random order; invariants after each step.

    The fake container answers PARK frames in the order it got them (as the
    real one does), issues unique tickets, wakes tickets it holds, and on a
    lost session forgets what it had not answered. The hook side wraps woken
    fds in ``FakeSock`` and keeps them in a wake queue that outlives sessions.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fd_baseline = fd_count()
        self.engine = Engine("p", "m", backoff=Backoff(0.01, 0.04, 1000.0))
        self.peer = FakeContainer(self.engine)
        # Hook side.
        self.callers: dict[int, FakeSock] = {}  # fd -> the caller's socket
        self.requests: list[ParkRequest] = []
        self.withdrawn: set[int] = set()
        self.settles: dict[int, int] = {}  # id(request) -> Settled events
        self.stats_reqs: list[StatsRequest] = []
        self.wake_queue: list[Woken[FakeSock]] = []
        self.handback_socks: list[FakeSock] = []
        self.handback: ParkRequest | None = None
        # Container side.
        self.pieces: list[tuple[int, list[int]]] = []  # (request id, fds) to answer, in order
        self.answered_ids: dict[int, int] = {}  # request id -> entries answered
        self.ok_fds: set[int] = set()  # fds the container said OK to
        self.parked: dict[int, int] = {}  # ticket -> fd, parked in the container
        self.stats_due = 0
        self.stats_replies = 0
        self.received: list[int] = []  # tickets woken to this session, in order
        self.unacked: set[int] = set()
        self.acked: set[int] = set()
        self.session_up = False
        #: The hook's send failed this session (``send_failed``): the error it gave.
        self.send_error: ContainerLost | None = None
        self.resume: tuple[int, tuple[int, ...]] = (0, ())
        self.connect()
        self.welcome()

    # -- plumbing ----------------------------------------------------------------------

    def flush(self) -> None:
        """Take the engine's events, then deliver what it sends, as a hook does."""
        self.take_events()
        msgs = self.peer.recv()
        assert not (msgs and self.send_error), "sent after the send failed"
        for msg in msgs:
            if isinstance(msg, Park):
                fds = [e.fd for e in msg.entries]
                assert all(fd not in self.ok_fds for fd in fds), "a parked fd sent again"
                # (The container's duplicate check covers one frame, not these.)
                flight = {fd for _, piece in self.pieces for fd in piece}
                assert len(set(fds)) == len(fds), "one socket twice in one PARK frame"
                assert flight.isdisjoint(fds), "one socket in two PARK frames in flight"
                self.pieces.append((msg.request_id, fds))
            elif isinstance(msg, Ack):
                assert self.session_up
                for t in msg.tickets:
                    assert t in self.unacked, f"ACK of {t}: not received, or ACKed already"
                    self.unacked.discard(t)
                    self.acked.add(t)
            elif isinstance(msg, Stats):
                self.stats_due += 1
            else:
                raise AssertionError(f"unexpected {msg!r}")
        self.take_events()

    def take_events(self) -> None:
        for ev in self.peer.events():
            if isinstance(ev, Settled):
                key = id(ev.request)
                assert key not in self.withdrawn, "a withdrawn request was settled"
                self.settles[key] = self.settles.get(key, 0) + 1
                assert ev.request.state is ReqState.DONE
            elif isinstance(ev, Woke):
                for e in ev.entries:
                    sock = None if e.fd is None else FakeSock(e.fd, real=True)
                    self.wake_queue.append(Woken(e.ticket, e.reason, e.token, e.pending, sock))

    def connect(self) -> None:
        hello = self.peer.connect()
        self.send_error = None
        assert (hello.resume_session, hello.resume_tickets) == self.resume
        self.pieces.clear()
        self.stats_due = 0

    def welcome(self) -> None:
        self.peer.session_id = next(self.peer.session_ids)
        self.peer.send(Welcome(self.peer.session_id, 0xFFFF, 1 << 16))
        self.session_up = True
        self.received = []
        self.unacked = set()
        self.acked = set()
        self.flush()

    @property
    def live(self) -> bool:
        return self.engine.phase in (Phase.READY, Phase.CLOSING)

    # -- the hook's calls ---------------------------------------------------------------

    @precondition(lambda self: self.engine.phase not in (Phase.CLOSING, Phase.CLOSED))
    @rule(
        n=st.integers(1, 4),
        big=st.sampled_from([False, False, False, True]),
        repeat=st.sampled_from([False, False, False, True]),
    )
    def park(self, n: int, big: bool, repeat: bool) -> None:
        if big:
            n += 250  # over one frame's fds with what may already be queued
        socks = [FakeSock() for _ in range(n)]
        for s in socks:
            self.callers[s.fd] = s
        if repeat:  # the first socket again at the end: refused (DUPLICATE), not sent
            socks.append(socks[0])
        self.requests.append(self.engine.park(socks, [entry(s) for s in socks], None))
        self.flush()

    def _pending(self) -> list[ParkRequest]:
        return [r for r in self.requests if r.state is not ReqState.DONE and not r.handback]

    @precondition(
        lambda self: (
            self.engine.phase not in (Phase.CLOSING, Phase.CLOSED)
            and any(not s.closed for r in self._pending() for s in r.socks)
        )
    )
    @rule(data=st.data())
    def park_again(self, data: st.DataObject) -> None:
        """A socket whose park is not answered yet parked again (with a new one):
        held behind the first, never sent twice (``Engine._queue``)."""
        socks = [s for r in self._pending() for s in r.socks if not s.closed]
        again = data.draw(st.sampled_from(socks))
        new = FakeSock()
        self.callers[new.fd] = new
        pair = data.draw(
            st.sampled_from(
                [[again], [again, new], [new, again], [again, again], [new, again, new]]
            )
        )
        self.requests.append(self.engine.park(pair, [entry(s) for s in pair], None))
        self.flush()

    @precondition(lambda self: bool(self._pending()))
    @rule(data=st.data())
    def withdraw(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self._pending()))
        was = req.state
        self.engine.withdraw(req)
        self.withdrawn.add(id(req))
        if was is ReqState.QUEUED and not req.resent:  # never sent: dropped
            assert req.state is ReqState.DONE
            assert not any(s.closed for s in req.socks[req.answered :])
        else:
            assert req.abandoned
        self.flush()

    @precondition(lambda self: self.engine.phase not in (Phase.CLOSING, Phase.CLOSED))
    @rule(abandon=st.booleans())
    def stats(self, abandon: bool) -> None:
        req = self.engine.stats(None)
        self.stats_reqs.append(req)
        if abandon:
            self.engine.withdraw(req)
            self.withdrawn.add(id(req))
        self.flush()

    @precondition(lambda self: bool(self.wake_queue))
    @rule(now=st.integers(0, 2))
    def take_wake(self, now: int) -> None:
        if not now:  # rarer, so that some are left to hand back at close
            woken = self.wake_queue.pop(0)
            if woken.socket is not None:
                woken.socket.close()  # the user is done with it

    # -- the container ------------------------------------------------------------------

    @precondition(lambda self: self.live and bool(self.pieces))
    @rule(data=st.data(), many=st.booleans())
    def answer_parks(self, data: st.DataObject, many: bool) -> None:
        """Answer the oldest PARK frame (or all of them), in order."""
        for _ in range(len(self.pieces) if many else 1):
            self._answer_piece(data, *self.pieces.pop(0))
        self.flush()

    def _answer_piece(self, data: st.DataObject, request_id: int, fds: list[int]) -> None:
        codes = data.draw(
            st.lists(
                st.sampled_from([Refusal.OK, Refusal.OK, Refusal.FULL, Refusal.OUT_OF_FDS]),
                min_size=len(fds),
                max_size=len(fds),
            )
        )
        handback = {s.fd for s in self.handback_socks}
        results = []
        for fd, code in zip(fds, codes, strict=True):
            if fd in handback:
                code = Refusal.OK  # see test_a_refused_handback_socket_is_closed
            if code is Refusal.OK:
                ticket = next(_tickets)
                self.ok_fds.add(fd)
                if fd in self.callers:
                    self.parked[ticket] = fd
                results.append(ParkResult(code, ticket))
            else:
                results.append(ParkResult(code))
        self.peer.send(Parked(request_id, tuple(results)))

    @precondition(lambda self: self.live and self.stats_due > 0)
    @rule()
    def answer_stats(self) -> None:
        self.stats_due -= 1
        self.stats_replies += 1
        self.peer.send(StatsReply(stats_body(self.stats_replies)))
        self.flush()

    @precondition(lambda self: self.live and bool(self.parked))
    @rule(data=st.data(), with_fd=st.lists(st.booleans(), min_size=1, max_size=3))
    def wake(self, data: st.DataObject, with_fd: list[bool]) -> None:
        tickets = data.draw(
            st.lists(
                st.sampled_from(sorted(self.parked)),
                min_size=1,
                max_size=len(with_fd),
                unique=True,
            )
        )
        fds = open_fds(sum(with_fd[: len(tickets)]))
        it = iter(fds)
        entries = []
        for t, has_fd in zip(tickets, with_fd, strict=False):
            del self.parked[t]
            entries.append(WakeEntry(t, Reason.READABLE, b"", b"", next(it) if has_fd else None))
        closing = self.engine.phase is Phase.CLOSING
        if not closing:
            self.received.extend(tickets)
            self.unacked.update(tickets)
        self.peer.send(Wake(tuple(entries)))
        self.flush()
        if closing:
            assert not any(is_open(fd) for fd in fds), "a WAKE while closing leaked its fds"
            assert all(t not in self.acked for t in tickets), "a WAKE while closing was ACKed"

    @precondition(
        lambda self: (
            self.engine.phase in (Phase.HANDSHAKE, Phase.READY, Phase.CLOSING)
            and self.send_error is None
        )
    )
    @rule(now=st.integers(0, 2))
    def send_fails(self, now: int) -> None:
        """The hook's write failed (the container died after writing some answers):
        nothing more goes out, but what the container wrote is still read (the
        container rules go on answering and waking until the session is lost)."""
        if now:
            return
        self.send_error = ContainerLost("broken pipe")
        self.engine.send_failed(self.send_error)
        assert self.engine.send_broken
        assert not self.engine.ready
        assert self.engine.phase in (Phase.HANDSHAKE, Phase.READY, Phase.CLOSING)
        self.flush()

    @precondition(lambda self: self.engine.phase in (Phase.HANDSHAKE, Phase.READY, Phase.CLOSING))
    @rule(how=st.sampled_from(["eof", "error", "reset", "garbage"]), now=st.integers(0, 2))
    def lose_session(self, how: str, now: int) -> None:
        if now:
            return  # rarer than the rest, so that sessions get some work done
        was_ready = self.engine.phase is Phase.READY
        if how == "eof":
            self.engine.receive_eof()
        elif how == "error":
            self.peer.send(Error(ErrorCode.SHUTTING_DOWN, "bye"))
        elif how == "reset":
            self.engine.connection_failed(ContainerLost("reset"))
        else:
            self.engine.receive_data(HEADER.pack(0, 0, 0, 0))
        if was_ready:
            self.resume = (self.peer.session_id, tuple(self.received[-MAX_RESUME_TICKETS:]))
        self.flush()
        if self.send_error is not None and how in ("eof", "reset"):
            assert self.engine.last_error is self.send_error, "not the failed send's error"
        self.session_up = False
        self.pieces.clear()  # what it did not answer, it did not keep
        self.stats_due = 0
        assert self.engine.phase in (Phase.LOST, Phase.CLOSED)

    @precondition(lambda self: self.engine.phase is Phase.LOST)
    @rule(welcome=st.booleans())
    def reconnect(self, welcome: bool) -> None:
        assert self.engine.retry_delay(0.0) is not None
        self.connect()
        if welcome:
            self.welcome()

    @precondition(lambda self: self.engine.phase is Phase.HANDSHAKE)
    @rule()
    def finish_handshake(self) -> None:
        self.welcome()

    @precondition(lambda self: self.engine.phase not in (Phase.CLOSING, Phase.CLOSED))
    @rule(now=st.integers(0, 3))
    def begin_close(self, now: int) -> None:
        if now:
            return  # rare: after it, most rules are off
        untaken, self.wake_queue = self.wake_queue, []
        self.handback_socks = [w.socket for w in untaken if w.socket is not None]
        live = self.engine.phase is Phase.READY
        waited = self.engine.begin_close(untaken, None)
        if isinstance(waited, StatsRequest):  # parks in flight: their answers come first
            assert live
            assert not self.handback_socks
            self.stats_reqs.append(waited)
            waited = None
        self.handback = waited
        assert (self.handback is not None) == (live and bool(self.handback_socks))
        if self.handback is not None:
            self.requests.append(self.handback)
        self.flush()

    @precondition(lambda self: self.engine.phase is Phase.CLOSING)
    @rule()
    def finish_close(self) -> None:
        self.engine.finish_close()
        self.flush()
        assert self.engine.phase is Phase.CLOSED

    @precondition(lambda self: self.engine.phase is Phase.CLOSED)
    @rule()
    def calls_after_close(self) -> None:
        sock = FakeSock()
        with pytest.raises(ConnparkError):
            self.engine.park([sock], [entry(sock)], None)
        with pytest.raises(ConnparkError):
            self.engine.stats(None)
        with pytest.raises(ConnparkError):
            self.engine.unpark([1])
        assert self.engine.begin_close() is None
        assert self.engine.retry_delay(0.0) is None
        assert self.engine.data_to_send() == []
        assert not sock.closed

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def one_owner_per_socket(self) -> None:
        for fd, sock in self.callers.items():
            assert sock.closes <= 1, "a caller's socket closed twice"
            assert sock.closed == (fd in self.ok_fds), (
                "a socket is the caller's iff it is not parked"
            )
        for sock in self.handback_socks:
            assert sock.closes <= 1
            if sock.fd in self.ok_fds:
                assert sock.closed

    @invariant()
    def requests_settle_once(self) -> None:
        assert all(n == 1 for n in self.settles.values()), "a request was answered twice"
        parks_of: dict[int, int] = {}  # id(socket) -> requests that park it (park_again)
        for req in self.requests:
            for sock in req.socks:
                parks_of[id(sock)] = parks_of.get(id(sock), 0) + 1
        for req in self.requests:
            if req.state is ReqState.DONE and req.error is None:
                for sock, result in zip(req.socks, req.results, strict=True):
                    assert result is not None
                    if parks_of[id(sock)] == 1:
                        assert isinstance(result, int) == sock.closed
                    elif isinstance(result, int):
                        assert sock.closed  # (refused here, another park may have it)
            if id(req) in self.settles and req.error is None:
                assert req.answered == len(req.entries)
        if self.engine.phase is Phase.CLOSED:
            everything: list[ParkRequest | StatsRequest] = [*self.requests, *self.stats_reqs]
            for r in everything:
                # (see test_an_abandoned_stats_request_lost_in_flight_is_done)
                if id(r) not in self.withdrawn or isinstance(r, ParkRequest):
                    assert r.state is ReqState.DONE
                if id(r) not in self.withdrawn and not getattr(r, "abandoned", False):
                    assert self.settles.get(id(r)) == 1, "a waiter was forgotten"
            assert all(s.closes == 1 for s in self.handback_socks), "a hand-back leaked"

    @invariant()
    def parking_index_is_exact(self) -> None:
        """``_parking``: the unanswered fds of queued or sent parks, neither
        withdrawn nor held; two of them never share a socket."""
        engine = self.engine
        reqs = [*engine._batch, *(r for b in engine._sent.values() for r in b.unanswered())]
        want: list[int] = []
        for req in reqs:
            if req.indexed:
                assert not req.abandoned
                assert not req.handback
                assert not req.after
                want.extend(req.fds[req.answered :])
        for req in engine._held:
            assert not req.indexed
            want.extend(req.own)
        assert len(want) == len(set(want)), "one socket in two parks in flight"
        assert engine._parking == set(want)
        if engine.phase is Phase.CLOSED:
            assert not engine._parking

    @invariant()
    def held_parks_hold_their_sockets(self) -> None:
        """A held park waits for an answer, and each of its sockets stays held in
        ``_parking`` until it goes out (its own, or the park's it waits for),
        but one parked ahead of it: its ticket taken at once, closed, its
        number free for a new socket."""
        engine = self.engine
        for req in engine._held:
            assert req.state is ReqState.QUEUED
            assert len(set(req.fds)) == len(req.fds), "a socket twice in a held park"
            waits = False
            for i, fd in enumerate(req.fds):
                link = req.after.get(i)
                if isinstance(req.results[i], int):  # parked ahead of it: taken at once
                    assert link is None
                    assert fd not in req.own, "a parked socket's number still held"
                    continue
                assert fd in engine._parking, "a socket of a held park not held"
                if link is not None:
                    old, j = link
                    assert not isinstance(old.results[j], int), "a ticket not taken"
                    assert old.state is not ReqState.DONE, "an answer not acted on"
                    assert old.answered <= j, "an answer not acted on"
                    waits = True
            assert waits, "held, waiting for nothing"

    @invariant()
    def stats_in_order(self) -> None:
        got = [r.result.parks_total for r in self.stats_reqs if r.result is not None]
        assert got == sorted(got)
        assert len(set(got)) == len(got), "one reply given to two requests"
        for r in self.stats_reqs:
            if id(r) in self.withdrawn:
                assert id(r) not in self.settles

    def teardown(self) -> None:
        self.engine.finish_close()
        self.take_events()
        for w in self.wake_queue:
            if w.socket is not None:
                w.socket.close()
        if self.fd_baseline is not None:
            assert fd_count() == self.fd_baseline, "the engine leaked fds"


TestEngineMachine = EngineMachine.TestCase
TestEngineMachine.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_park_entries_share_one_policy_whole() -> None:
    from connpark._worker import park_entries

    entries = park_entries(
        [7, 8], None, None, idle_timeout=2.5, on_hangup="return", rules=3, tags=(b"room:1",)
    )
    assert [e.fd for e in entries] == [7, 8]
    for e in entries:
        assert (e.idle_timeout_ms, e.hangup_returns, e.timeout_returns) == (2500, True, False)
        assert (e.rules, e.tags, e.token, e.pending) == (3, (b"room:1",), b"", b"")
    with pytest.raises(ValueError, match="closed socket"):
        park_entries([7, -1], None, None)


# -- the hot path: park_many with one policy, rows, closing for the owner -------------


def test_park_many_with_one_policy_is_the_park_of_its_entries() -> None:
    """One encoded entry for all the sockets: the same PARK as entry by entry."""
    engine, peer = started()
    socks = [FakeSock() for _ in range(300)]
    policy: dict[str, Any] = {"idle_timeout": 2.5, "on_hangup": "return", "rules": 3}
    shared = park_many_entries([s.fd for s in socks], None, None, tags=["a", b"b"], **policy)
    assert isinstance(shared, SharedEntries)
    req = engine.park(socks, shared, None)
    first, second = parks(peer.recv())
    same = [s for s in (FakeSock() for _ in range(300))]
    engine.park(
        same, park_entries([s.fd for s in same], None, None, tags=["a", b"b"], **policy), None
    )
    want = parks(peer.recv())
    strip = [attrs.evolve(e, fd=0) for p in want for e in p.entries]
    assert [attrs.evolve(e, fd=0) for e in first.entries + second.entries] == strip
    assert [e.fd for e in first.entries + second.entries] == [s.fd for s in socks]
    assert req.entries[5] == attrs.evolve(want[0].entries[5], fd=socks[5].fd)
    assert [e.fd for e in req.entries[298:]] == [s.fd for s in socks[298:]]
    assert len(req.entries) == 300
    peer.send(Parked(first.request_id, ok(*range(1, 254))))
    assert not settled(peer.events())
    peer.send(Parked(second.request_id, (ParkResult(Refusal.FULL), *ok(*range(255, 301)))))
    assert settled(peer.events()) == [req]
    results = req.outcome()
    assert results[:253] == list(range(1, 254))
    refused = results[253]
    assert isinstance(refused, ParkRefused)
    assert refused.reason is Refusal.FULL
    assert results[254:] == list(range(255, 301))
    assert [s.closes for s in socks] == [1] * 253 + [0] + [1] * 46


def test_park_many_entries_checks_its_arguments_first() -> None:
    with pytest.raises(ValueError, match="closed socket"):
        park_many_entries([5, -1], None, None)
    with pytest.raises(ValueError, match="on_hangup"):
        park_many_entries([5], None, None, on_hangup="keep")
    with pytest.raises(ValueError, match="tokens must pair up"):
        park_many_entries([5], [b"a", b"b"], None)
    assert park_many_entries([5], [b"tok"], None) == [ParkEntry(5, b"tok")]
    assert park_many_entries([], None, None) == []
    engine, peer = started()
    sock = FakeSock()
    req = engine.park([sock], park_many_entries([sock.fd], None, None), None)
    (park,) = parks(peer.recv())
    assert park.entries == (ParkEntry(sock.fd),)
    engine.begin_close()
    with pytest.raises(ParkingClosed):
        engine.park([sock], park_many_entries([sock.fd], None, None), None)
    assert req.state is ReqState.SENT


def test_park_many_sent_again_is_marked_resent_from_where_it_was_answered() -> None:
    engine, peer = started()
    socks = [FakeSock() for _ in range(4)]
    entries = park_many_entries([s.fd for s in socks], None, None, idle_timeout=1)
    req = engine.park(socks, entries, None)
    (park,) = parks(peer.recv())
    peer.send(Parked(park.request_id, ok(1)))  # one answered, then the session is lost
    assert peer.events() == []
    assert socks[0].closed
    engine.receive_eof()
    peer.events()
    peer.connect()
    peer.welcome()
    (again,) = parks(peer.recv())
    assert [e.fd for e in again.entries] == [s.fd for s in socks[1:]]
    assert [e.resent for e in again.entries] == [True] * 3
    assert {e.idle_timeout_ms for e in again.entries} == {1000}
    peer.send(Parked(again.request_id, ok(2, 3, 4)))
    assert settled(peer.events()) == [req]
    assert req.outcome() == [1, 2, 3, 4]


def socket_fds(n: int) -> list[int]:
    """Real socket fds (``socket.socket(fileno=)`` checks it has one), the far ends closed."""
    out = []
    for _ in range(n):
        a, b = socket.socketpair()
        b.close()
        out.append(a.detach())
    return out


def test_woke_makes_woken_as_woken_of_did() -> None:
    _engine, peer = started()
    fds = socket_fds(3)
    entries = (
        WakeEntry(1, Reason.READABLE, b"t", b"p", fds[0]),
        WakeEntry(2, Reason.HANGUP, b"n"),  # a notice
        WakeEntry(3, Reason.UNSENT, b"", b"", fds[1], True, 4, 1_700_000_000_123, b"rest"),
        WakeEntry(4, Reason.REQUESTED, fd=fds[2], inet6=True),
    )
    peer.send(Wake(entries))
    (woke,) = peer.events()
    assert isinstance(woke, Woke)
    assert woke.entries == entries
    made: list[socket.socket] = []

    def wrap(sock: socket.socket) -> FakeSock:
        made.append(sock)
        return FakeSock(sock.detach(), real=True)

    woken = woke.woken(wrap)
    assert [(s.family, s.type) for s in made] == [
        (socket.AF_INET, socket.SOCK_STREAM),
        (socket.AF_INET6, socket.SOCK_STREAM),
        (socket.AF_INET6, socket.SOCK_STREAM),
    ]
    assert [w.socket.fd if w.socket else None for w in woken] == [fds[0], None, fds[1], fds[2]]
    assert woken == [Woken.of(e, w.socket) for e, w in zip(entries, woken, strict=True)]
    assert woken[2].last_autoresponse == 1_700_000_000.123
    for w in woken:
        if w.socket is not None:
            w.socket.close()


@pytest.mark.usefixtures("no_fd_leak")
def test_woke_closes_the_fds_after_a_wrap_that_fails() -> None:
    _engine, peer = started()
    fds = socket_fds(4)
    peer.send(Wake(tuple(WakeEntry(10 + i, Reason.READABLE, fd=fd) for i, fd in enumerate(fds))))
    (woke,) = peer.events()
    assert isinstance(woke, Woke)
    calls = 0

    def wrap(sock: socket.socket) -> socket.socket:
        nonlocal calls
        calls += 1
        if calls == 2:
            sock.close()  # what garbage collection does to it
            raise OSError("no")
        return sock

    with pytest.raises(OSError, match="no"):
        woke.woken(wrap)
    assert [is_open(fd) for fd in fds] == [False] * 4  # wrapped before, failed, after


def test_trio_sockets_are_closed_without_notify_closing_unless_a_task_waits() -> None:
    """The engine closes parked trio sockets itself when no task waits on them.

    It needs trio's private epoll bookkeeping: if a trio release moves it, the
    engine falls back to trio's close and this test says so.
    """

    async def main() -> None:
        if not sys.platform.startswith("linux"):
            assert not trio_fast_close()
            return
        assert trio_fast_close(), "trio changed: parked trio sockets are closed the slow way"
        a, b = trio.socket.socketpair()
        c, d = trio.socket.socketpair()
        notified = []
        seen = []
        real_notify = trio.lowlevel.notify_closing

        def spy(fd: Any) -> None:
            notified.append(fd if isinstance(fd, int) else fd.fileno())
            real_notify(fd)

        trio.lowlevel.notify_closing = spy  # type: ignore[assignment]
        try:
            async with trio.open_nursery() as nursery:

                async def reader() -> None:
                    try:
                        await c.recv(1)
                    except trio.ClosedResourceError:
                        seen.append("closed")

                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                fd_a, fd_c = a.fileno(), c.fileno()
                close_sockets([a, c])  # a: nobody waits; c: a task does
            assert notified == [fd_c]
            assert seen == ["closed"]
            assert a.fileno() == -1
            assert c.fileno() == -1
            assert not is_open(fd_a)
            assert not is_open(fd_c) or fd_c == fd_a  # (a number may be reused)
        finally:
            trio.lowlevel.notify_closing = real_notify  # type: ignore[assignment]
            for s in (a, b, c, d):
                s.close()

    trio.run(main)
    # Outside trio.run: the ordinary close.
    s = FakeSock()
    close_sockets([s])
    assert s.closes == 1
