"""One socket parked twice at once (two ``park()``/``park_many`` calls, the first
still unanswered and not withdrawn): the second is held behind the first and never
goes out as a second park. Before, both went out as two PARK frames; the container
(whose duplicate check covers one frame) parked the socket twice under two tickets,
and one client byte woke it twice: two owners.

The engine tests play the container (``FakeContainer``); the end-to-end ones run a
real ``connpark serve`` frozen with SIGSTOP while the two parks are made.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

import pytest

import connpark
from connpark._errors import ContainerLost, ParkingClosed, ParkRefused
from connpark._wire import Parked, ParkResult, Refusal
from connpark._worker import Engine, ReqState, park_many_entries

from . import test_hooks
from ._procs import ServeProcess, tcp_pairs, wait_until
from .conftest import open_fd_count
from .test_engine import FakeSock, entry, ok, parks, settled, started
from .test_hooks import Factory
from .test_review_hooks import closing, no_wake_within, proc

make = test_hooks.make

__all__ = ["closing", "make", "proc"]  # fixtures


def index_is_exact(engine: Engine) -> None:
    """``_parking`` holds exactly the unanswered fds of indexed parks."""
    want: set[int] = set()
    reqs = [*engine._batch, *(r for b in engine._sent.values() for r in b.unanswered())]
    for req in reqs:
        if req.indexed:
            want.update(req.fds[req.answered :])
    for req in engine._held:
        want.update(req.own)
    assert engine._parking == want


# -- the engine ----------------------------------------------------------------------


def test_a_second_park_of_a_socket_in_flight_is_held_and_gets_its_ticket() -> None:
    engine, peer = started()
    sock, other = FakeSock(), FakeSock()
    first = engine.park([sock], [entry(sock, b"1")], "w1")
    (park,) = parks(peer.recv())
    second = engine.park([other, sock], [entry(other), entry(sock, b"2")], "w2")
    assert peer.recv() == []  # held, whole, behind the first
    assert second.state is ReqState.QUEUED
    index_is_exact(engine)
    peer.send(Parked(park.request_id, ok(7)))
    assert settled(peer.events()) == [first]
    (park2,) = parks(peer.recv())
    assert [e.fd for e in park2.entries] == [other.fd]  # the rest goes out now
    index_is_exact(engine)
    peer.send(Parked(park2.request_id, ok(8)))
    assert settled(peer.events()) == [second]
    assert first.outcome() == [7]
    assert second.outcome() == [8, 7]  # one ticket: one parked connection
    assert sock.closes == 1  # closed once, by the first
    assert engine._parking == set()
    assert peer.recv() == []
    assert not engine.busy


def test_a_second_park_of_a_socket_queued_is_held_not_batched_with_it() -> None:
    engine, peer = started()
    sock = FakeSock()
    first = engine.park([sock], [entry(sock)], None)
    second = engine.park([sock], [entry(sock)], None)
    (park,) = parks(peer.recv())
    assert [e.fd for e in park.entries] == [sock.fd]
    peer.send(Parked(park.request_id, ok(3)))
    assert settled(peer.events()) == [first, second]
    assert first.outcome() == second.outcome() == [3]
    assert sock.closes == 1


@pytest.mark.parametrize("refusal", [Refusal.FULL, Refusal.NOT_CONNECTED])
def test_after_a_refusal_the_held_park_goes_out_and_a_third_waits_for_it(
    refusal: Refusal,
) -> None:
    engine, peer = started()
    sock = FakeSock()
    reqs = [engine.park([sock], [entry(sock)], i) for i in range(3)]
    (park,) = parks(peer.recv())
    assert peer.recv() == []
    peer.send(Parked(park.request_id, (ParkResult(refusal),)))
    assert settled(peer.events()) == [reqs[0]]
    assert not sock.closed
    (park2,) = parks(peer.recv())  # one park of it, never two
    assert [e.fd for e in park2.entries] == [sock.fd]
    assert peer.recv() == []
    index_is_exact(engine)
    peer.send(Parked(park2.request_id, ok(5)))
    assert settled(peer.events()) == [reqs[1], reqs[2]]
    assert reqs[1].outcome() == reqs[2].outcome() == [5]
    assert sock.closes == 1
    assert engine._parking == set()


def test_a_park_many_held_behind_another_gets_one_ticket_per_socket() -> None:
    """The hot path's ``SharedEntries``: held per socket, the rest sent."""
    engine, peer = started()
    socks = [FakeSock() for _ in range(6)]
    fds = [s.fd for s in socks]
    first = engine.park(socks[:4], park_many_entries(fds[:4], None, None), None)
    (park,) = parks(peer.recv())
    second = engine.park(socks[2:], park_many_entries(fds[2:], None, None), None)
    assert peer.recv() == []
    peer.send(Parked(park.request_id, (*ok(1, 2), ParkResult(Refusal.FULL), *ok(4))))
    assert settled(peer.events()) == [first]
    (park2,) = parks(peer.recv())  # the refused one, now the second's, and the rest
    assert [e.fd for e in park2.entries] == [fds[2], *fds[4:]]
    peer.send(Parked(park2.request_id, ok(9, 5, 6)))
    assert settled(peer.events()) == [second]
    assert second.outcome() == [9, 4, 5, 6]
    assert [s.closes for s in socks] == [1] * 6
    assert engine._parking == set()


@pytest.mark.parametrize("answer_first", [Refusal.OK, Refusal.FULL])
def test_a_socket_of_a_held_park_parked_again_waits_for_the_held_one(
    answer_first: Refusal,
) -> None:
    """The held park's other sockets are held with it: parked again meanwhile,
    they wait for its answer (else the held one would send a number whose socket
    the other park gave away)."""
    engine, peer = started()
    a, b = FakeSock(), FakeSock()
    first = engine.park([a], [entry(a)], None)
    (park,) = parks(peer.recv())
    second = engine.park([a, b], [entry(a), entry(b)], None)  # held: a is out
    third = engine.park([b], [entry(b)], None)  # b waits for the second
    assert peer.recv() == []
    index_is_exact(engine)
    peer.send(Parked(park.request_id, (ParkResult(answer_first, 1),)))
    assert settled(peer.events()) == [first]
    (park2,) = parks(peer.recv())
    want = [b.fd] if answer_first is Refusal.OK else [a.fd, b.fd]
    assert [e.fd for e in park2.entries] == want
    assert peer.recv() == []
    peer.send(Parked(park2.request_id, ok(*range(2, 2 + len(want)))))
    assert settled(peer.events()) == [second, third]
    b_ticket = second.outcome()[1]
    assert third.outcome() == [b_ticket]
    assert (a.closes, b.closes) == (1, 1)
    assert engine._parking == set()


def test_withdrawing_a_queued_first_park_lets_the_held_one_go() -> None:
    engine, peer = started()
    sock = FakeSock()
    first = engine.park([sock], [entry(sock)], None)
    second = engine.park([sock], [entry(sock)], None)
    engine.withdraw(first)
    (park,) = parks(peer.recv())
    assert [e.fd for e in park.entries] == [sock.fd]
    peer.send(Parked(park.request_id, ok(4)))
    assert settled(peer.events()) == [second]
    assert second.outcome() == [4]
    assert sock.closes == 1


def test_withdrawing_a_sent_first_park_keeps_the_held_one_waiting_for_its_answer() -> None:
    engine, peer = started()
    sock = FakeSock()
    first = engine.park([sock], [entry(sock)], None)
    (park,) = parks(peer.recv())
    second = engine.park([sock], [entry(sock)], None)
    engine.withdraw(first)  # limbo: its answer still decides
    assert engine._parking == {sock.fd}  # the second's now: it is next in line
    assert sock.fd in engine._held[0].own
    third = engine.park([sock], [entry(sock)], None)
    assert peer.recv() == []
    peer.send(Parked(park.request_id, (ParkResult(Refusal.FULL),)))
    assert settled(peer.events()) == []
    (park2,) = parks(peer.recv())  # the second, alone: the third waits for it
    assert [e.fd for e in park2.entries] == [sock.fd]
    assert peer.recv() == []
    peer.send(Parked(park2.request_id, ok(6)))
    assert settled(peer.events()) == [second, third]
    assert second.outcome() == third.outcome() == [6]


def test_an_fd_leaves_the_index_when_its_park_is_answered() -> None:
    """A number reused by a new socket after the first was parked and closed is
    not taken for the old one."""
    engine, peer = started()
    sock = FakeSock()
    engine.park([sock], [entry(sock)], None)
    (park,) = parks(peer.recv())
    peer.send(Parked(park.request_id, ok(1)))
    peer.events()
    new = FakeSock(sock.fd)  # the number again, another socket
    req = engine.park([new], [entry(new)], None)
    assert [e.fd for e in parks(peer.recv())[0].entries] == [new.fd]
    assert req.state is ReqState.SENT


def test_a_park_requeued_after_a_lost_session_stays_in_flight() -> None:
    engine, peer = started()
    sock = FakeSock()
    first = engine.park([sock], [entry(sock)], None)
    peer.recv()
    engine.receive_eof()
    peer.events()
    second = engine.park([sock], [entry(sock)], None)
    peer.connect()
    peer.welcome()
    (park,) = parks(peer.recv())
    assert [e.fd for e in park.entries] == [sock.fd]
    assert peer.recv() == []
    peer.send(Parked(park.request_id, ok(2)))
    assert settled(peer.events()) == [first, second]
    assert second.outcome() == [2]


def test_the_same_socket_twice_in_one_park_goes_out_once() -> None:
    """The repeat is refused here (DUPLICATE), as the container refuses it within
    one frame: it never goes out (see the two-frame test below for why)."""
    engine, peer = started()
    sock = FakeSock()
    req = engine.park([sock, sock], [entry(sock), entry(sock)], None)
    (park,) = parks(peer.recv())
    assert [e.fd for e in park.entries] == [sock.fd]
    assert engine._parking == {sock.fd}
    index_is_exact(engine)
    peer.send(Parked(park.request_id, ok(1)))
    assert settled(peer.events()) == [req]
    got, dup = req.outcome()
    assert got == 1
    assert isinstance(dup, ParkRefused)
    assert dup.reason is Refusal.DUPLICATE
    assert req.state is ReqState.DONE
    assert sock.closes == 1
    assert engine._parking == set()


@pytest.mark.parametrize("how", ["give_up", "finish_close", "begin_close"])
def test_closing_empties_the_index(how: str) -> None:
    engine, peer = started()
    sock, queued = FakeSock(), FakeSock()
    first = engine.park([sock], [entry(sock)], None)
    peer.recv()
    second = engine.park([sock], [entry(sock)], None)
    third = engine.park([queued], [entry(queued)], None)
    if how == "give_up":
        engine.give_up(ParkingClosed("gone"))
    elif how == "finish_close":
        engine.finish_close()
    else:
        engine.begin_close()
        assert engine._parking == {sock.fd}  # the first's answer is still due
        assert isinstance(third.error, ParkingClosed)
        engine.finish_close()
    assert engine._parking == set()
    for req in (first, second, third):
        assert req.state is ReqState.DONE
        with pytest.raises(connpark.ConnparkError):
            req.outcome()


# -- holes found by review after the hold (once strict xfails) -----------------------------
# Each needs concurrent parks of one socket (caller misuse) and answers in a
# particular order; before the hold each was two owners at once.


def test_a_held_park_keeps_a_socket_its_limbo_park_refused_while_it_waits() -> None:
    """A held park's socket behind an abandoned park (limbo) was held in neither
    _parking nor, once that answer came, _limbo while the park waited for another
    first park. A third park took it as its own; the held park went out with it,
    and its answer removed the number from _parking: the third then sent the
    socket again, parked and closed. Now the held park holds every socket of its
    own until it goes out: the third waits for it, for both."""
    engine, peer = started()
    s, t, g = FakeSock(), FakeSock(), FakeSock()
    p1 = engine.park([s], [entry(s)], "p1")
    (park1,) = parks(peer.recv())
    engine.withdraw(p1)  # abandoned: s in limbo
    engine.park([t], [entry(t)], "p0")
    (park0,) = parks(peer.recv())
    p2 = engine.park([s, t, g], [entry(s), entry(t), entry(g)], "p2")
    assert peer.recv() == []
    index_is_exact(engine)
    peer.send(Parked(park1.request_id, (ParkResult(Refusal.FULL),)))  # s: the caller's again
    peer.events()
    assert peer.recv() == []  # p2 still waits for p0
    assert s.fd in engine._parking  # p2 holds it
    p3 = engine.park([g, s], [entry(g), entry(s)], "p3")
    assert peer.recv() == []  # g and s are p2's: held
    index_is_exact(engine)
    peer.send(Parked(park0.request_id, (ParkResult(Refusal.FULL),)))
    peer.events()
    (park2,) = parks(peer.recv())
    assert [e.fd for e in park2.entries] == [s.fd, t.fd, g.fd]
    index_is_exact(engine)
    peer.send(Parked(park2.request_id, ok(10, 11, 12)))
    assert settled(peer.events()) == [p2, p3]
    assert parks(peer.recv()) == [], "a parked (closed) socket sent again"
    assert p2.outcome() == [10, 11, 12]
    assert p3.outcome() == [12, 10]
    assert (s.closes, t.closes, g.closes) == (1, 1, 1)
    assert engine._parking == set()


def test_a_socket_refused_ahead_of_a_held_park_waits_for_the_park_sent_next() -> None:
    """The same hole without the limbo: h0 and h wait for q's answer for x, h also
    for r's. q refuses x: h0 goes out with it (first in line) and parks it; then
    r answers and h, released, sent x again (a parked, closed socket), as it only
    knew q's refusal. Now h waits for h0 for x once q refused it, and takes its ticket."""
    engine, peer = started()
    x, y = FakeSock(), FakeSock()
    engine.park([x], [entry(x)], "q")
    (park_q,) = parks(peer.recv())
    engine.park([y], [entry(y)], "r")
    (park_r,) = parks(peer.recv())
    h0 = engine.park([x], [entry(x)], "h0")
    h = engine.park([x, y], [entry(x), entry(y)], "h")
    assert peer.recv() == []
    peer.send(Parked(park_q.request_id, (ParkResult(Refusal.FULL),)))
    peer.events()
    (park_h0,) = parks(peer.recv())
    assert [e.fd for e in park_h0.entries] == [x.fd]
    index_is_exact(engine)
    assert h.after[0][0] is h0
    peer.send(Parked(park_h0.request_id, ok(7)))
    assert settled(peer.events()) == [h0]
    assert x.closes == 1
    assert x.fd not in engine._parking  # closed: the number may name a new socket
    peer.send(Parked(park_r.request_id, (ParkResult(Refusal.FULL),)))
    peer.events()
    (park_h,) = parks(peer.recv())
    assert [e.fd for e in park_h.entries] == [y.fd], "a parked (closed) socket sent again"
    peer.send(Parked(park_h.request_id, ok(8)))
    assert settled(peer.events()) == [h]
    assert h.outcome() == [7, 8]
    assert (x.closes, y.closes) == (1, 1)
    assert engine._parking == set()


def test_a_new_socket_under_the_number_of_one_parked_ahead_of_a_held_park_is_not_held() -> None:
    """A held park's socket parked by the park ahead is closed: its number leaves
    _parking at once (the held park still waits for another), so a new socket
    under it is parked at once, not held and closed with the old one's ticket."""
    engine, peer = started()
    s, g = FakeSock(), FakeSock()
    engine.park([s], [entry(s)], "p1")
    (park1,) = parks(peer.recv())
    engine.park([g], [entry(g)], "p0")
    (park0,) = parks(peer.recv())
    p2 = engine.park([s, g], [entry(s), entry(g)], "p2")
    peer.send(Parked(park1.request_id, ok(5)))
    peer.events()
    assert s.closed
    assert s.fd not in engine._parking
    new = FakeSock(s.fd)
    p3 = engine.park([new], [entry(new)], "p3")
    (park3,) = parks(peer.recv())
    assert [e.fd for e in park3.entries] == [new.fd]
    peer.send(Parked(park0.request_id, (ParkResult(Refusal.FULL),)))
    peer.events()
    (park2,) = parks(peer.recv())
    assert [e.fd for e in park2.entries] == [g.fd]
    peer.send(Parked(park3.request_id, ok(6)), Parked(park2.request_id, ok(7)))
    assert settled(peer.events()) == [p3, p2]
    assert p3.outcome() == [6]
    assert p2.outcome() == [5, 7]
    assert (s.closes, new.closes, g.closes) == (1, 1, 1)


def test_a_held_copy_of_a_connection_parked_ahead_closes_at_once() -> None:
    """A retry through a dup, held behind the abandoned park of the connection
    (limbo, by inode) and behind another park for its other socket: when the
    first answers OK the container has the connection, so the dup closes then,
    not when the retry is released (after the other answer): until then the
    caller held a copy of a parked connection."""
    engine, peer = started()
    a, a_peer = socket.socketpair()
    twin = FakeSock(os.dup(a.fileno()), real=True)
    try:
        s, g = FakeSock(a.fileno()), FakeSock()
        p1 = engine.park([s], [entry(s)], "p1")
        (park1,) = parks(peer.recv())
        engine.withdraw(p1)
        engine.park([g], [entry(g)], "p0")
        (park0,) = parks(peer.recv())
        retry = engine.park([twin, g], [entry(twin), entry(g)], "retry")
        assert peer.recv() == []
        peer.send(Parked(park1.request_id, ok(5)))
        peer.events()
        assert s.closed
        assert twin.closed, "the caller's dup of a parked connection left open"
        assert retry.results[0] == 5
        assert twin.fd not in engine._parking  # closed: its number is free
        peer.send(Parked(park0.request_id, (ParkResult(Refusal.FULL),)))
        peer.events()
        (park2,) = parks(peer.recv())
        assert [e.fd for e in park2.entries] == [g.fd]
        peer.send(Parked(park2.request_id, ok(6)))
        assert settled(peer.events())[-1] is retry
        assert retry.outcome() == [5, 6]
        assert twin.closes == 1
    finally:
        twin.close()
        a.close()
        a_peer.close()


def test_a_park_behind_a_held_park_takes_the_ticket_parked_ahead_of_both() -> None:
    """T waits for an abandoned park of s (limbo) and a park of g, holding s by
    number; H = park(s) waits for T. The abandoned park's OK parks s: T has the
    ticket at once, and so has H, settled then (not when T goes out); s's number
    is free: a new socket under it is parked at once."""
    engine, peer = started()
    s, g = FakeSock(), FakeSock()
    p1 = engine.park([s], [entry(s)], "p1")
    (park1,) = parks(peer.recv())
    engine.withdraw(p1)  # limbo: s by number (no inode for a fake fd)
    engine.park([g], [entry(g)], "p0")
    (park0,) = parks(peer.recv())
    t = engine.park([s, g], [entry(s), entry(g)], "t")
    h = engine.park([s], [entry(s)], "h")
    assert h.after == {0: (t, 0)}
    index_is_exact(engine)
    peer.send(Parked(park1.request_id, ok(5)))
    assert settled(peer.events()) == [h]
    assert h.outcome() == [5]
    assert t.results[0] == 5
    assert s.fd not in engine._parking
    new = FakeSock(s.fd)
    engine.park([new], [entry(new)], "new")
    assert [e.fd for p in parks(peer.recv()) for e in p.entries] == [new.fd]
    peer.send(Parked(park0.request_id, (ParkResult(Refusal.FULL),)))
    peer.events()
    (park_t,) = parks(peer.recv())
    assert [e.fd for e in park_t.entries] == [g.fd]
    assert s.closes == 1


def test_a_held_park_released_with_its_socket_in_limbo_by_inode_waits_again() -> None:
    """P2 waits for P1 (s) and P0 (t). P1's refusal leaves s to P2. A park of a dup
    of s (another number: not in _parking) goes out and is withdrawn: the limbo
    holds it by inode. When P0 answers, P2 is queued again with a look at the
    limbo: held behind that answer, not sent while it is due. (By number, a
    park of s itself now waits for P2: the next test.)"""
    engine, peer = started()
    a, a_peer = socket.socketpair()
    twin = FakeSock(os.dup(a.fileno()), real=True)
    try:
        s, t = FakeSock(a.fileno()), FakeSock()
        engine.park([s], [entry(s)], "p1")
        (park1,) = parks(peer.recv())
        engine.park([t], [entry(t)], "p0")
        (park0,) = parks(peer.recv())
        p2 = engine.park([s, t], [entry(s), entry(t)], "p2")
        peer.send(Parked(park1.request_id, (ParkResult(Refusal.FULL),)))
        peer.events()
        p4 = engine.park([twin], [entry(twin)], "p4")
        (park4,) = parks(peer.recv())  # another number: not known to be s
        engine.withdraw(p4)  # abandoned: its answer decides (it comes after P0's)
        peer.send(Parked(park0.request_id, (ParkResult(Refusal.FULL),)))
        peer.events()
        assert parks(peer.recv()) == [], "s sent while an abandoned park of it is unanswered"
        index_is_exact(engine)
        peer.send(Parked(park4.request_id, ok(9)))
        assert settled(peer.events()) == []
        (park2,) = parks(peer.recv())
        assert [e.fd for e in park2.entries] == [t.fd]
        peer.send(Parked(park2.request_id, ok(3)))
        assert settled(peer.events()) == [p2]
        assert p2.outcome() == [9, 3]
        assert twin.closed
        assert s.closed  # P4's ticket is P2's: its copy closed too
    finally:
        twin.close()
        a.close()
        a_peer.close()


def test_a_park_of_a_socket_a_held_park_waits_with_is_held_behind_it() -> None:
    """Once P1 refused s, s is P2's to send (P2 still waits for P0): a park of s
    then waits for P2, is never sent while P2 waits; withdrawn, it is dropped."""
    engine, peer = started()
    s, t = FakeSock(), FakeSock()
    engine.park([s], [entry(s)], "p1")
    (park1,) = parks(peer.recv())
    engine.park([t], [entry(t)], "p0")
    (park0,) = parks(peer.recv())
    p2 = engine.park([s, t], [entry(s), entry(t)], "p2")
    peer.send(Parked(park1.request_id, (ParkResult(Refusal.FULL),)))
    peer.events()
    p4 = engine.park([s], [entry(s)], "p4")
    assert peer.recv() == []
    assert p4.after == {0: (p2, 0)}
    engine.withdraw(p4)
    assert p4.state is ReqState.DONE
    index_is_exact(engine)
    peer.send(Parked(park0.request_id, (ParkResult(Refusal.FULL),)))
    peer.events()
    (park2,) = parks(peer.recv())
    assert [e.fd for e in park2.entries] == [s.fd, t.fd]
    peer.send(Parked(park2.request_id, ok(1, 2)))
    assert settled(peer.events()) == [p2]
    assert p2.outcome() == [1, 2]


def test_a_socket_twice_in_a_first_park_goes_out_once_and_a_held_park_follows_it() -> None:
    """P1 = park_many([s, s]), tokens differing. Both went out: the container
    refused the first (TOKEN_TOO_LARGE: its max_token may be below the
    protocol's) and parked the second, and P2 = park(s), held behind the first
    entry only, saw the refusal and sent s again (parked, closed). Now the
    repeat never goes out (DUPLICATE here): the held park follows the one entry."""
    engine, peer = started()
    s = FakeSock()
    p1 = engine.park([s, s], [entry(s, b"x" * 100), entry(s, b"")], None)
    (park,) = parks(peer.recv())
    assert [(e.fd, e.token) for e in park.entries] == [(s.fd, b"x" * 100)]
    p2 = engine.park([s], [entry(s)], None)
    assert peer.recv() == []  # held
    peer.send(Parked(park.request_id, (ParkResult(Refusal.TOKEN_TOO_LARGE),)))
    assert settled(peer.events()) == [p1]
    assert [r.reason for r in p1.outcome() if isinstance(r, ParkRefused)] == [
        Refusal.TOKEN_TOO_LARGE,
        Refusal.DUPLICATE,
    ]
    assert not s.closed  # the caller's: P2 parks it now, once
    (again,) = parks(peer.recv())
    assert [e.fd for e in again.entries] == [s.fd]
    peer.send(Parked(again.request_id, ok(77)))
    assert settled(peer.events()) == [p2]
    assert p2.outcome() == [77]
    assert s.closes == 1


def test_a_socket_twice_253_apart_goes_out_in_one_frame_once() -> None:
    """P1 carries s at index 0 and 253: two frames, the container's duplicate check
    covering one, so a real one parks s twice (see the end-to-end test). And the
    answer to index 253 removed s's number from the set _parking after a new
    socket t took that number (s parked and closed at index 0) and a park of t
    went out: a second park of t was sent too. Now the repeat is refused here:
    one frame, one answer per socket."""
    engine, peer = started()
    s = FakeSock()
    others = [FakeSock() for _ in range(252)]
    socks = [s, *others, s]
    p1 = engine.park(socks, [entry(x) for x in socks], None)
    frames = engine.data_to_send()
    assert len(frames) == 1
    for f in frames:
        peer.decoder.receive_data(f.data, f.fds)
    (first,) = parks(list(peer.decoder))
    assert [e.fd for e in first.entries] == [x.fd for x in socks[:253]]
    peer.send(Parked(first.request_id, ok(*range(1000, 1253))))
    assert settled(peer.events()) == [p1]
    result = p1.outcome()
    assert result[:253] == list(range(1000, 1253))
    assert isinstance(result[253], ParkRefused)
    assert result[253].reason is Refusal.DUPLICATE
    assert s.closes == 1
    t = FakeSock(s.fd)  # the number, reused for a new connection
    engine.park([t], [entry(t)], None)
    (_park2,) = parks(peer.recv())
    assert engine._parking == {t.fd}
    engine.park([t], [entry(t)], None)
    assert parks(peer.recv()) == [], "t sent in a second PARK while its first is unanswered"


def test_a_socket_twice_in_a_park_held_whole_goes_out_once() -> None:
    """A park with a repeat and a socket in flight: the repeat refused, the rest held."""
    engine, peer = started()
    s, g = FakeSock(), FakeSock()
    engine.park([s], [entry(s)], None)
    (park1,) = parks(peer.recv())
    p2 = engine.park([g, s, g], [entry(g), entry(s), entry(g)], None)
    assert peer.recv() == []
    index_is_exact(engine)
    peer.send(Parked(park1.request_id, (ParkResult(Refusal.FULL),)))
    peer.events()
    (park2,) = parks(peer.recv())
    assert [e.fd for e in park2.entries] == [g.fd, s.fd]
    peer.send(Parked(park2.request_id, ok(4, 5)))
    assert settled(peer.events()) == [p2]
    out = p2.outcome()
    assert out[:2] == [4, 5]
    assert isinstance(out[2], ParkRefused)
    assert out[2].reason is Refusal.DUPLICATE
    assert (s.closes, g.closes) == (1, 1)
    assert engine._parking == set()


def test_begin_close_answers_a_held_park_that_has_a_ticket_from_its_first() -> None:
    """P2 = park([s, g]) held behind P1 (s). P1 OK: P2 has s's ticket, s closed,
    its part for g queued. begin_close failed that part, and with it P2:
    ParkingClosed ("the socket is yours") though s is parked, its ticket lost.
    Now P2 is answered: the ticket, and a refusal for g (the caller's)."""
    engine, peer = started()
    s, g = FakeSock(), FakeSock()
    engine.park([s], [entry(s)], "p1")
    (park1,) = parks(peer.recv())
    p2 = engine.park([s, g], [entry(s), entry(g)], "p2")
    peer.send(Parked(park1.request_id, ok(5)))
    peer.events()
    assert s.closed
    assert p2.results[0] == 5
    engine.begin_close((), None)
    assert settled(peer.events()) == [p2]
    assert p2.state is ReqState.DONE
    # (ParkRefused compares by identity: its reason is what to compare.)
    ticket, refused = p2.outcome()
    assert ticket == 5
    assert isinstance(refused, ParkRefused)
    assert refused.reason is Refusal.SHUTTING_DOWN
    assert not g.closed


@pytest.mark.parametrize("how", ["give_up", "no_reconnect"])
def test_a_park_answered_in_part_keeps_its_tickets_when_the_engine_gives_up(how: str) -> None:
    """Over 253 sockets: the first frame's PARKED came (253 sockets parked, closed),
    then the engine gave up: the park failed with the error, its 253 tickets
    lost. Now it is answered: those tickets, the rest refused (the caller's)."""
    engine, peer = started(reconnect=how != "give_up")
    if how == "no_reconnect":
        engine.reconnect = False
    socks = [FakeSock() for _ in range(300)]
    req = engine.park(socks, [entry(x) for x in socks], None)
    for f in engine.data_to_send():
        peer.decoder.receive_data(f.data, f.fds)
    first, _second = parks(list(peer.decoder))
    peer.send(Parked(first.request_id, ok(*range(1, 254))))
    assert settled(peer.events()) == []
    if how == "give_up":
        engine.give_up(ContainerLost("gone"))
    else:
        engine.receive_eof()
    assert req in settled(peer.events())
    out = req.outcome()
    assert out[:253] == list(range(1, 254))
    assert all(isinstance(r, ParkRefused) and r.reason is Refusal.SHUTTING_DOWN for r in out[253:])
    assert [x.closes for x in socks] == [1] * 253 + [0] * 47


# -- end to end, a real container ------------------------------------------------------


def _park_in_thread(driver: Any, how: str, sock: socket.socket, out: list[Any]) -> threading.Thread:
    def go() -> None:
        try:
            if how == "many":
                out.append(driver.park_many([sock])[0])
            else:
                out.append(driver.park(sock))
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("how", ["park", "many"])
def test_two_concurrent_parks_of_one_socket_park_one_connection(
    make: Factory, proc: ServeProcess, closing: list[socket.socket], how: str
) -> None:
    driver = make(proc.path, pool="twice")
    baseline = open_fd_count()
    (client,), (server,) = tcp_pairs(1)
    closing.append(client)
    os.kill(proc.pid, signal.SIGSTOP)  # neither park is answered while both are made
    guard = threading.Timer(20.0, os.kill, (proc.pid, signal.SIGCONT))
    guard.start()
    outs: list[list[Any]] = [[], []]
    try:
        first = _park_in_thread(driver, how, server, outs[0])
        time.sleep(0.3)  # the first is out (or queued) and unanswered
        second = _park_in_thread(driver, "park", server, outs[1])
        time.sleep(0.3)
    finally:
        guard.cancel()
        os.kill(proc.pid, signal.SIGCONT)
    first.join(10)
    second.join(10)
    (t1,), (t2,) = outs
    assert isinstance(t1, int), t1
    assert t1 == t2, "two tickets: the socket was parked twice"
    assert server.fileno() == -1
    stats = driver.stats()
    assert stats.parked == 1
    client.sendall(b"x")
    woken = driver.next_wake(timeout=5)
    assert woken.ticket == t1
    assert woken.socket is not None
    assert woken.socket.recv(1) == b"x"
    woken.socket.close()
    assert no_wake_within(driver, 0.5), "one client byte woke it twice"
    assert wait_until(lambda: open_fd_count() == baseline + 1)  # (+1: the client)


def test_a_socket_twice_253_apart_in_park_many_is_parked_once(
    make: Factory, proc: ServeProcess, closing: list[socket.socket]
) -> None:
    """Over 253 sockets go in two PARK frames, and the container's duplicate check
    covers one frame: a socket at index 0 and 253 was parked twice (two tickets,
    and one client byte woke it twice). The worker refuses the repeat itself."""
    driver = make(proc.path, pool="apart")
    clients, servers = tcp_pairs(253)
    closing += [*clients, *servers]
    out = driver.park_many([*servers, servers[0]])
    assert all(isinstance(t, int) for t in out[:253]), out
    assert isinstance(out[253], ParkRefused)
    assert out[253].reason is Refusal.DUPLICATE
    assert proc.stats().parked == 253
    clients[0].sendall(b"x")
    woken = driver.next_wake(timeout=5)
    assert woken.ticket == out[0]
    assert woken.socket is not None
    woken.socket.close()
    assert no_wake_within(driver, 0.5), "one client byte woke it twice"
