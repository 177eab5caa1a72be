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
from connpark._errors import ParkingClosed, ParkRefused
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
    assert engine._parking == set()
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


def test_the_same_socket_twice_in_one_park_still_goes_out_for_the_container_to_refuse() -> None:
    engine, peer = started()
    sock = FakeSock()
    req = engine.park([sock, sock], [entry(sock), entry(sock)], None)
    (park,) = parks(peer.recv())
    assert [e.fd for e in park.entries] == [sock.fd, sock.fd]
    peer.send(Parked(park.request_id, (*ok(1), ParkResult(Refusal.DUPLICATE))))
    assert settled(peer.events()) == [req]
    got, dup = req.outcome()
    assert got == 1
    assert isinstance(dup, ParkRefused)
    assert dup.reason is Refusal.DUPLICATE
    assert req.state is ReqState.DONE
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
