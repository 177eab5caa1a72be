"""Known holes in holding a second park of a socket in flight (``Engine._parking``,
``_queue``, ``_release``), found by review after the hold landed: each needs
concurrent parks of one socket (caller misuse) and a first park's answer in a
particular order. Before the hold every one of these was two owners at once
(the second park always went out); the hold narrowed them to these. Strict
xfails: each must fail until fixed (then drop the mark, as for the one fixed
already: a held park re-queued now looks at the limbo). Sans-IO, as in
``test_engine.py``.
"""

from __future__ import annotations

import pytest

from connpark._errors import ParkRefused
from connpark._wire import Parked, ParkResult, Refusal
from connpark._worker import ReqState

from .test_engine import FakeSock, entry, ok, parks, started


@pytest.mark.xfail(
    strict=True,
    reason="two owners: a held park reads its socket's first occurrence in the first park only",
)
def test_dup_in_one_park_first_refused_second_ok_then_held_park_resends_closed_fd():
    """P1 = park_many([s, s]) with per-entry tokens; the container refuses the
    first (TOKEN_TOO_LARGE: its max_token may be below the protocol's) and parks
    the second. P2 = park(s), held behind P1 at index 0 only, sees a refusal and
    sends s again, though s is parked (and the caller's copy closed)."""
    engine, peer = started()
    s = FakeSock()
    engine.park([s, s], [entry(s, b"x" * 100), entry(s, b"")], None)
    (park,) = parks(peer.recv())
    engine.park([s], [entry(s)], None)
    assert peer.recv() == []  # held
    peer.send(
        Parked(park.request_id, (ParkResult(Refusal.TOKEN_TOO_LARGE), ParkResult(Refusal.OK, 77)))
    )
    peer.events()
    assert s.closed  # the container has it (ticket 77)
    again = parks(peer.recv())
    # BUG: P2 goes out with the (closed) fd number of a socket that is parked
    assert again == [], f"a parked socket's fd sent again: {again}"


@pytest.mark.xfail(
    strict=True,
    reason="two owners: a set; one occurrence answered removes a number another carries",
)
def test_dup_in_one_park_split_over_frames_unindexes_reused_fd():
    """P1 carries s at index 0 and 253 (two frames). Piece one answers index 0 OK
    (s closed); the number is reused by t; P2 = park(t) goes out (right). Piece two
    answers index 253 (DUPLICATE) and its difference_update removes t's number
    from _parking: P3 = park(t) is sent while P2 is unanswered (t parked twice)."""
    engine, peer = started()
    s = FakeSock()
    others = [FakeSock() for _ in range(252)]
    socks = [s, *others, s]
    p1 = engine.park(socks, [entry(x) for x in socks], None)
    frames = engine.data_to_send()
    assert len(frames) == 2
    for f in frames:
        peer.decoder.receive_data(f.data, f.fds)
    first, _second = parks(list(peer.decoder))
    rid = first.request_id
    peer.send(Parked(rid, ok(*range(1000, 1253))))
    peer.events()
    assert s.closed
    t = FakeSock(s.fd)  # the number, reused for a new connection
    engine.park([t], [entry(t)], None)
    (_park2,) = parks(peer.recv())
    assert engine._parking == {t.fd}
    peer.send(Parked(rid, (ParkResult(Refusal.DUPLICATE),)))
    peer.events()
    assert p1.state is ReqState.DONE
    engine.park([t], [entry(t)], None)
    sent = parks(peer.recv())
    assert sent == [], "t sent in a second PARK while its first is unanswered"


@pytest.mark.xfail(
    strict=True,
    reason="two owners: a held park loses a socket whose first park answered first",
)
def test_limbo_held_socket_not_indexed_so_a_later_park_owns_it_and_it_is_sent_twice():
    """A held park's limbo-held socket is in neither _parking nor (once that
    answer came) _limbo while the park waits for another first park. A third
    park then takes it into its `own`; the held park, released, re-queues the
    socket without finding that owner (`_owners` does not look at the held parks
    not yet walked in this `_release_once` pass), is sent; its answer removes
    the number from _parking, and the third park then sends the socket again."""
    engine, peer = started()
    s, t, g = FakeSock(), FakeSock(), FakeSock()
    p1 = engine.park([s], [entry(s)], "p1")
    (park1,) = parks(peer.recv())
    engine.withdraw(p1)  # abandoned: s in limbo
    engine.park([t], [entry(t)], "p0")
    (park0,) = parks(peer.recv())
    engine.park([s, t, g], [entry(s), entry(t), entry(g)], "p2")
    assert peer.recv() == []
    peer.send(Parked(park1.request_id, (ParkResult(Refusal.FULL),)))  # s: the caller's again
    peer.events()
    assert peer.recv() == []  # p2 still waits for p0
    engine.park([g, s], [entry(g), entry(s)], "p3")
    assert peer.recv() == []  # g is p2's: held
    peer.send(Parked(park0.request_id, (ParkResult(Refusal.FULL),)))
    peer.events()
    (park2,) = parks(peer.recv())
    sent_fds = [e.fd for e in park2.entries]
    assert sent_fds == [s.fd, t.fd, g.fd]
    peer.send(Parked(park2.request_id, ok(10, 11, 12)))
    peer.events()
    assert s.closed
    assert g.closed
    again = parks(peer.recv())
    # BUG: p3 sends s (closed; parked as ticket 10) in a new PARK
    assert again == [], (
        f"a parked (closed) socket sent again: {[e.fd for p in again for e in p.entries]}"
    )


def test_held_park_released_after_its_socket_went_out_in_an_abandoned_park():
    """P2 waits behind P1 (for s) and P0 (for t). P1's refusal frees s while P2
    still waits: s is then in neither _parking nor _limbo. P4 parks s (sent) and
    is withdrawn (abandoned: s in limbo). When P0 answers, P2 is re-queued by
    `_queue`, which checks _parking but not _limbo: s goes out a second time
    while P4's answer (maybe OK) is due."""
    engine, peer = started()
    s, t = FakeSock(), FakeSock()
    p1 = engine.park([s], [entry(s)], "p1")
    (park1,) = parks(peer.recv())  # request A
    engine.park([t], [entry(t)], "p0")
    (park0,) = parks(peer.recv())  # request B
    p2 = engine.park([s, t], [entry(s), entry(t)], "p2")
    assert peer.recv() == []
    peer.send(Parked(park1.request_id, (ParkResult(Refusal.FULL),)))  # A, in order
    peer.events()
    assert p1.state is ReqState.DONE
    assert p2.state is ReqState.QUEUED
    p4 = engine.park([s], [entry(s)], "p4")
    (_park4,) = parks(peer.recv())  # request C: s not held (p2 does not carry it in _parking)
    engine.withdraw(p4)  # abandoned: the container's answer decides (C comes after B)
    peer.send(Parked(park0.request_id, (ParkResult(Refusal.FULL),)))  # B: t refused
    peer.events()
    again = parks(peer.recv())
    fds = [e.fd for p in again for e in p.entries]
    # (s went out again while P4, abandoned: in limbo, was unanswered: fixed)
    assert s.fd not in fds, f"s sent while an abandoned park of it is unanswered: {fds}"


@pytest.mark.xfail(
    strict=True,
    reason="wrong error: a held park failed at close loses the ticket it has (one owner)",
)
def test_begin_close_fails_a_held_park_whose_first_already_gave_it_a_ticket():
    """P2 = park([s, g]) held behind P1 (s). P1 OK -> P2 has s's ticket, s closed,
    its child (g) queued. begin_close fails the child: P2 raises ParkingClosed
    ("the socket is yours") and loses s's ticket though s is parked and closed."""
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
    peer.events()
    assert p2.state is ReqState.DONE
    try:
        out = p2.outcome()
    except Exception as exc:
        out = exc
    assert out == [5, ParkRefused(Refusal.SHUTTING_DOWN)], (
        f"p2 outcome: {out!r} (s is parked as 5, closed)"
    )
