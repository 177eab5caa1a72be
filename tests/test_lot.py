"""Deterministic unit tests of the parking table (``connpark._lot``).

The lot does no I/O, so fds here are arbitrary small ints and time is an
explicit ``now``. Tests drive it the way the container does: the caller
unregisters/closes fds itself, calls ``forget_fd`` before waking a notice, and
calls ``remove`` on every slot ``ack`` or ``orphans`` hands back.
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from connpark._lot import (
    _PACKED,
    EPOCH_SHIFT,
    FD_BITS,
    HANGUP_RETURNS,
    MAX_TICK_MS,
    PACK_EVERY,
    SEQ_LIMIT,
    SHARD_SHIFT,
    TIMEOUT_RETURNS,
    TRANSITIONS,
    UNCONFIRMED,
    InternalError,
    Lot,
    SessionState,
    Slot,
    State,
    due_ms,
)
from connpark._wire import Reason

_ids = itertools.count(1)


def session(lot: Lot, pool: str = "p", *, add: bool = True) -> SessionState:
    s = SessionState(next(_ids), lot.pool(pool), name=f"w{pool}")
    if add:
        lot.add_session(s)
    return s


def park(lot: Lot, fd: int, owner: SessionState, deadline: float = 100.0, flags: int = 0) -> Slot:
    return lot.park(
        fd,
        token=b"tok%d" % fd,
        pending=b"",
        flags=flags,
        session=owner,
        deadline_ms=math.ceil(deadline * 1000),
    )


def pack_now(lot: Lot, now: float) -> int:
    """Two packs: the first marks what it finds parked, the second packs those (a
    pack packs only what the one before found parked already). Returns how many."""
    return lot.pack(now) + lot.pack(now)


def ack_and_remove(lot: Lot, s: SessionState, tickets: list[int]) -> list[Slot]:
    """A worker ACKs what it received (the writer wrote it); the container removes each."""
    lot.written(lot.take_outq(s))
    done = lot.ack(s, tickets)
    for slot in done:
        lot.remove(slot)
    return done


def check_lot(
    lot: Lot, live: list[Slot] | None = None, excused: frozenset[int] = frozenset()
) -> None:
    """Recompute the lot's counters from its tables and check each slot's one home.

    ``live`` is every slot the test parked and has not removed; it is needed
    because notice slots (fd closed, ``forget_fd``) are in no by-fd entry.
    ``excused``: ids of slots parked unconfirmed, whose wake goes to their
    parker past its window (``_route``).
    """
    table = [s for s in lot._by_fd if s is not None and s.state is not State.MOVED]
    if live is None:
        live = table
    live_ids = {id(s) for s in live}
    assert len(live_ids) == len(live)
    assert all(s.state is not State.GONE for s in live)
    # Everything in the by-fd table is live and sits at its own fd.
    for slot in table:
        assert id(slot) in live_ids
        assert slot.fd >= 0
        assert lot._by_fd[slot.fd] is slot
    # A retired object's connection is packed at its fd, under its ticket.
    moved = [s for s in live if s.state is State.MOVED]
    assert lot.packed == len(moved)
    for slot in moved:
        assert lot._by_fd[slot.fd] is _PACKED
        assert lot._pticket[slot.fd] == slot.ticket
    # Every live slot that still has its fd is findable at it.
    for slot in live:
        if slot.state is State.MOVED:
            continue
        if slot.fd >= 0:
            assert lot.by_fd(slot.fd) is slot
            assert lot.find(slot.ticket) is slot
        else:
            assert slot.state is not State.PARKED, "a parked slot always holds its fd"

    sessions = [s for pool in lot.pools.values() for s in pool.sessions]
    inflight: dict[int, list[SessionState]] = {}
    for s in sessions:
        assert s.alive
        over = sum(1 for x in s.inflight.values() if id(x) in excused) if excused else 0
        assert s.load - over <= lot.window
        for ticket, slot in s.inflight.items():
            assert slot.ticket == ticket
            assert slot.pool is s.pool
            inflight.setdefault(id(slot), []).append(s)
        for slot in s.outq:
            assert s.inflight.get(slot.ticket) is slot, "outq entries are inflight"
    waiting: dict[int, int] = {}
    for pool in lot.pools.values():
        for slot in pool.waiting:
            if slot.state is State.QUEUED:
                assert slot.pool is pool
                waiting[id(slot)] = waiting.get(id(slot), 0) + 1
        if any(s.state is State.QUEUED for s in pool.waiting):
            # Work-conserving: nothing waits while a session of its pool has room.
            assert all(s.load >= lot.window for s in pool.sessions)

    counts = dict.fromkeys(State, 0)
    for slot in live:
        counts[State.PARKED if slot.state is State.MOVED else slot.state] += 1
        if slot.state in (State.PARKED, State.MOVED):
            assert id(slot) not in inflight
            assert id(slot) not in waiting
        elif slot.state is State.QUEUED:
            assert waiting.get(id(slot)) == 1, "a queued slot waits exactly once"
            assert id(slot) not in inflight
        else:
            assert slot.state in (State.SENT, State.WRITTEN)
            assert id(slot) not in waiting
            owners = inflight.get(id(slot), [])
            assert len(owners) == 1, "a sent slot is in exactly one session's inflight"
            assert slot.session is owners[0]
    # Nothing is in flight or waiting that the test does not know about.
    assert set(inflight) <= live_ids
    assert set(waiting) <= live_ids

    assert lot.parked == counts[State.PARKED]
    assert lot.queued == counts[State.QUEUED]
    assert lot.sent == counts[State.SENT] + counts[State.WRITTEN]
    assert lot.queued == sum(waiting.values())
    assert lot.sent == sum(s.load for s in sessions)
    held = {s.ticket for s in table if s.state is State.PARKED}
    held |= {t for t in lot._pticket if t}
    assert held == {s.ticket for s in live if s.state in (State.PARKED, State.MOVED)}


# -- tickets -----------------------------------------------------------------------


def test_park_tickets_are_unique_and_encode_the_fd() -> None:
    lot = Lot()
    a = session(lot)
    slots = [park(lot, fd, a) for fd in (3, 4, 5, 200, 7)]
    assert len({s.ticket for s in slots}) == len(slots)
    for slot in slots:
        assert slot.state is State.PARKED
        assert slot.ticket & ((1 << FD_BITS) - 1) == slot.fd
        assert lot.find(slot.ticket) is slot
        assert lot.by_fd(slot.fd) is slot
        assert slot.session is a
        assert slot.pool is a.pool
    assert lot.parked == 5
    assert lot.find(12345 << FD_BITS | 3) is None
    assert lot.find(slots[0].ticket | 1 << 60) is None
    assert lot.by_fd(-1) is None
    assert lot.by_fd(10_000) is None
    check_lot(lot)


def test_a_sequence_that_runs_out_moves_to_an_epoch_no_live_ticket_uses() -> None:
    """2**24 parks per epoch: then the next epoch that no parked ticket uses, so that
    the same fd with the same (wrapped) sequence never gets an old ticket again."""
    lot = Lot(epoch=7, shard=3)
    a = session(lot)
    old = park(lot, 9, a)  # stays parked in epoch 7
    assert old.ticket >> EPOCH_SHIFT == 7
    lot._seq = SEQ_LIMIT - 3  # as after 2**24 - 3 parks
    lot._epoch = 8 << EPOCH_SHIFT | 3 << SHARD_SHIFT  # (the Lot moved on once)
    lot._by_fd[9] = old  # and the epoch-7 ticket is still parked
    near = [park(lot, fd, a) for fd in (10, 11)]
    assert all(s.ticket >> EPOCH_SHIFT == 8 for s in near)
    later = [park(lot, fd, a) for fd in (12, 13)]  # the sequence runs out here
    epochs = {s.ticket >> EPOCH_SHIFT for s in later}
    assert epochs == {9}  # not 7: a live ticket uses it
    assert all((s.ticket >> SHARD_SHIFT) & 0xFF == 3 for s in [*near, *later])
    assert len({s.ticket for s in [old, *near, *later]}) == 5
    lot._seq = SEQ_LIMIT - 1
    lot._epoch = 6 << EPOCH_SHIFT | 3 << SHARD_SHIFT
    (skip,) = [park(lot, 14, a)]
    assert skip.ticket >> EPOCH_SHIFT == 10  # 7, 8 and 9 are all live
    check_lot(lot)


def test_stale_ticket_of_reused_fd_is_not_found() -> None:
    lot = Lot()
    a = session(lot)
    old = park(lot, 9, a)
    lot.remove(old)  # CLOSE: the container closed fd 9
    assert old.state is State.GONE
    assert old.fd == -1
    assert lot.find(old.ticket) is None
    assert lot.by_fd(9) is None
    new = park(lot, 9, a)  # the OS hands out fd 9 again
    assert new.ticket != old.ticket
    assert new.ticket & ((1 << FD_BITS) - 1) == 9
    assert lot.find(old.ticket) is None
    assert lot.find(new.ticket) is new
    check_lot(lot)


def test_stale_ticket_after_notice_fd_reuse() -> None:
    """A HANGUP notice frees its fd number at once; a new park may take it."""
    lot = Lot()
    a = session(lot)
    old = park(lot, 6, a)  # no HANGUP_RETURNS: the container closes the fd
    lot.forget_fd(old)
    assert lot.wake(old, Reason.HANGUP, 1.0)
    assert old.fd == -1
    assert old.state is State.SENT
    new = park(lot, 6, a)
    assert lot.find(old.ticket) is None
    assert lot.find(new.ticket) is new
    check_lot(lot, [old, new])
    assert ack_and_remove(lot, a, [old.ticket]) == [old]
    assert lot.by_fd(6) is new, "removing the notice must not evict the new fd 6"
    check_lot(lot, [new])


def test_park_twice_on_same_fd_raises_internal_error() -> None:
    lot = Lot()
    a = session(lot)
    park(lot, 4, a)
    with pytest.raises(InternalError, match="parked twice"):
        park(lot, 4, a)


def test_returns_fd_policy() -> None:
    lot = Lot()
    a = session(lot)
    none = park(lot, 1, a, flags=0)
    both = park(lot, 2, a, flags=HANGUP_RETURNS | TIMEOUT_RETURNS)
    for reason in (Reason.READABLE, Reason.REQUESTED, Reason.SHUTDOWN):
        assert none.returns_fd(reason)
        assert both.returns_fd(reason)
    assert not none.returns_fd(Reason.HANGUP)
    assert not none.returns_fd(Reason.TIMEOUT)
    assert both.returns_fd(Reason.HANGUP)
    assert both.returns_fd(Reason.TIMEOUT)
    only_hup = park(lot, 3, a, flags=HANGUP_RETURNS)
    assert only_hup.returns_fd(Reason.HANGUP)
    assert not only_hup.returns_fd(Reason.TIMEOUT)


# -- wake and routing ----------------------------------------------------------------


def test_wake_goes_to_the_parking_session() -> None:
    lot = Lot(window=8)
    a = session(lot)
    b = session(lot)
    slots = [park(lot, fd, b) for fd in (3, 4)]
    assert not lot.dirty
    assert lot.wake(slots[0], Reason.READABLE, 5.0)
    assert slots[0].state is State.SENT
    assert slots[0].session is b
    assert slots[0].reason is Reason.READABLE
    assert slots[0].key == 5.0
    assert b.inflight == {slots[0].ticket: slots[0]}
    assert b.outq == [slots[0]]
    assert a.inflight == {}
    assert lot.dirty == {b}
    assert lot.woken_total["READABLE"] == 1
    check_lot(lot)
    # take_outq empties the queue but the slot stays inflight until ACK.
    assert lot.take_outq(b) == [slots[0]]
    assert b.outq == []
    assert b.inflight == {slots[0].ticket: slots[0]}
    check_lot(lot)
    lot.written([slots[0]])
    done = ack_and_remove(lot, b, [slots[0].ticket])
    assert done == [slots[0]]
    assert slots[0].state is State.GONE
    assert lot.find(slots[0].ticket) is None
    check_lot(lot)


def test_wake_of_non_parked_slot_is_a_noop() -> None:
    """Recall race: an UNPARK that crosses a READABLE wake changes nothing."""
    lot = Lot(window=8)
    a = session(lot)
    b = session(lot)
    slot = park(lot, 3, a)
    assert lot.wake(slot, Reason.READABLE, 1.0)
    lot.dirty.clear()
    before = (slot.state, slot.session, slot.reason, slot.key, dict(a.inflight), list(a.outq))
    assert lot.wake(slot, Reason.REQUESTED, 2.0, to=b) is False
    assert (slot.state, slot.session, slot.reason, slot.key, a.inflight, a.outq) == before
    assert b.inflight == {}
    assert not lot.dirty
    assert lot.woken_total == {"READABLE": 1}
    # Also a no-op once it is gone.
    ack_and_remove(lot, a, [slot.ticket])
    assert lot.wake(slot, Reason.READABLE, 3.0) is False
    assert slot.state is State.GONE
    check_lot(lot)


def test_wake_of_queued_slot_is_a_noop() -> None:
    lot = Lot(window=1)
    a = session(lot)
    slot = park(lot, 3, a)
    lot.remove_session(a)
    assert lot.wake(slot, Reason.READABLE, 1.0)
    assert slot.state is State.QUEUED
    assert lot.wake(slot, Reason.TIMEOUT, 2.0) is False
    assert slot.state is State.QUEUED
    assert slot.reason is Reason.READABLE
    assert slot.key == 1.0
    assert list(a.pool.waiting) == [slot]
    check_lot(lot)


def test_wake_with_to_goes_to_the_asker() -> None:
    lot = Lot(window=8)
    a = session(lot)
    b = session(lot)
    slot = park(lot, 3, a)
    assert lot.wake(slot, Reason.REQUESTED, 1.0, to=b)
    assert slot.session is b
    assert slot.ticket in b.inflight
    assert a.inflight == {}
    assert lot.dirty == {b}
    check_lot(lot)


def test_wake_of_dead_owner_goes_to_least_loaded_of_same_pool() -> None:
    lot = Lot(window=8)
    owner = session(lot, "p")
    busy = session(lot, "p")
    idle = session(lot, "p")
    other_pool = session(lot, "q")  # least loaded of all, but the wrong pool
    filler = [park(lot, fd, busy) for fd in range(10, 13)]
    for s in filler:
        lot.wake(s, Reason.READABLE, 0.0)
    one = park(lot, 20, idle)
    lot.wake(one, Reason.READABLE, 0.0)
    assert (busy.load, idle.load, owner.load) == (3, 1, 0)
    slot = park(lot, 3, owner)
    lot.remove_session(owner)
    assert not owner.alive
    lot.dirty.clear()
    assert lot.wake(slot, Reason.READABLE, 1.0)
    assert slot.session is idle
    assert idle.load == 2
    assert other_pool.load == 0
    assert lot.dirty == {idle}
    check_lot(lot)


def test_window_full_goes_to_next_session_with_room_then_waits() -> None:
    lot = Lot(window=2)
    a = session(lot)
    b = session(lot)
    slots = [park(lot, fd, a) for fd in range(3, 9)]
    for s in slots[:2]:
        lot.wake(s, Reason.READABLE, 1.0)
    assert a.load == 2
    assert b.load == 0
    lot.wake(slots[2], Reason.READABLE, 2.0)  # a is full: b, which has room
    assert slots[2].session is b
    lot.wake(slots[3], Reason.READABLE, 3.0)
    assert slots[3].session is b
    check_lot(lot)
    lot.wake(slots[4], Reason.READABLE, 4.0)  # everyone full: waits
    lot.wake(slots[5], Reason.READABLE, 5.0)
    pool = a.pool
    assert list(pool.waiting) == [slots[4], slots[5]]
    assert slots[4].state is State.QUEUED
    assert (lot.queued, lot.sent) == (2, 4)
    assert lot.orphaned == 0, "a pool with sessions has no orphans"
    check_lot(lot)
    # ACK frees window space and drains waiting, oldest first, to the acker.
    lot.dirty.clear()
    assert ack_and_remove(lot, b, [slots[2].ticket]) == [slots[2]]
    assert slots[4].state is State.SENT
    assert slots[4].session is b
    assert b.outq[-1] is slots[4]
    assert list(pool.waiting) == [slots[5]]
    assert lot.dirty == {b}
    check_lot(lot)
    # Unknown or foreign tickets are ignored; they drain nothing.
    assert lot.ack(a, [slots[3].ticket, 999 << FD_BITS | 3]) == []
    assert slots[3].state is State.WRITTEN
    assert list(pool.waiting) == [slots[5]]
    check_lot(lot)
    assert ack_and_remove(lot, a, [slots[0].ticket, slots[1].ticket, slots[0].ticket]) == [
        slots[0],
        slots[1],
    ]
    assert slots[5].session is a
    assert not pool.waiting
    assert (lot.queued, lot.sent) == (0, 3)
    check_lot(lot)


def test_ack_of_unwritten_wake_is_ignored_until_written() -> None:
    lot = Lot(window=8)
    a = session(lot)
    slot = park(lot, 3, a)
    lot.wake(slot, Reason.READABLE, 1.0)
    assert a.outq == [slot]
    # A confused worker ACKs the ticket (it knows it from PARKED) before the writer ran:
    # ignored, so the writer never sends a WAKE for a connection already closed.
    assert lot.ack(a, [slot.ticket]) == []
    assert slot.state is State.SENT
    assert lot.take_outq(a) == [slot]
    # Taken by the writer but not yet written (its fd still queued): ignored too.
    assert lot.ack(a, [slot.ticket]) == []
    lot.written([slot])
    assert slot.state is State.WRITTEN
    for done in lot.ack(a, [slot.ticket]):
        lot.remove(done)
    assert slot.state is State.GONE
    assert lot.sent == 0
    check_lot(lot, [])


def test_add_session_drains_waiting() -> None:
    lot = Lot(window=2)
    a = session(lot)
    slots = [park(lot, fd, a) for fd in range(3, 8)]
    lot.remove_session(a)
    for s in slots:
        lot.wake(s, Reason.READABLE, 1.0)
    assert lot.queued == 5
    assert lot.orphaned == 5
    check_lot(lot)
    b = session(lot)  # takes only what fits in its window
    assert b.load == 2
    assert [s.session for s in slots[:2]] == [b, b]
    assert list(a.pool.waiting) == slots[2:]
    assert lot.dirty == {b}
    check_lot(lot)
    c = session(lot)
    assert c.load == 2
    assert list(a.pool.waiting) == slots[4:]
    assert lot.orphaned == 0
    check_lot(lot)


# -- sessions dying ------------------------------------------------------------------


def test_remove_session_reroutes_inflight_to_other_session() -> None:
    lot = Lot(window=8)
    a = session(lot)
    b = session(lot)
    c = session(lot)
    slots = [park(lot, fd, a) for fd in range(3, 7)]
    for s in slots:
        lot.wake(s, Reason.READABLE, 1.0)
    lot.written(lot.take_outq(a))  # written, not ACKed
    ack_and_remove(lot, a, [slots[0].ticket])
    one = park(lot, 20, b)
    lot.wake(one, Reason.READABLE, 1.0)
    lot.dirty.clear()
    assert lot.remove_session(a) == 3
    assert not a.alive
    assert a not in a.pool.sessions
    assert a.inflight == {}
    assert a.outq == []
    assert a not in lot.dirty
    # Least loaded each time: c (0), then b/c tie at 1 -> b (first), then c.
    assert [s.session for s in slots[1:]] == [c, b, c]
    assert all(s.state is State.SENT for s in slots[1:])
    assert lot.dirty == {b, c}
    assert (b.load, c.load) == (2, 2)
    assert set(c.outq) == {slots[1], slots[3]}
    check_lot(lot)


def test_remove_session_reroutes_to_waiting_when_no_room() -> None:
    lot = Lot(window=1)
    a = session(lot)
    b = session(lot)
    pa = [park(lot, fd, a) for fd in (3, 4)]
    pb = park(lot, 5, b)
    lot.wake(pb, Reason.READABLE, 1.0)
    lot.wake(pa[0], Reason.READABLE, 1.0)
    assert pa[0].session is a
    assert lot.remove_session(a) == 1
    assert pa[0].state is State.QUEUED  # b is full
    assert pa[0].session is None
    assert list(a.pool.waiting) == [pa[0]]
    assert lot.orphaned == 0
    check_lot(lot)
    # A wake whose owner is dead and pool is full waits behind it.
    lot.wake(pa[1], Reason.READABLE, 2.0)
    assert list(a.pool.waiting) == [pa[0], pa[1]]
    check_lot(lot)
    ack_and_remove(lot, b, [pb.ticket])
    assert pa[0].session is b
    check_lot(lot)
    assert lot.remove_session(b) == 1
    assert lot.orphaned == 2
    assert lot.queued == 2
    assert lot.sent == 0
    check_lot(lot)


def test_remove_session_keeps_its_parked_slots_parked() -> None:
    """Parked connections belong to the pool, not to the session that parked them."""
    lot = Lot(window=8)
    a = session(lot)
    slots = [park(lot, fd, a) for fd in (3, 4)]
    assert lot.remove_session(a) == 0
    assert all(s.state is State.PARKED for s in slots)
    assert lot.parked == 2
    check_lot(lot)
    b = session(lot)
    assert lot.wake(slots[0], Reason.READABLE, 1.0)
    assert slots[0].session is b
    check_lot(lot)


def test_sessions_of_other_pools_are_never_used() -> None:
    lot = Lot(window=8)
    a = session(lot, "p")
    session(lot, "q")
    slot = park(lot, 3, a)
    lot.remove_session(a)
    lot.wake(slot, Reason.READABLE, 1.0)
    assert slot.state is State.QUEUED
    assert list(lot.pool("p").waiting) == [slot]
    assert not lot.pool("q").waiting
    check_lot(lot)


# -- deadlines -----------------------------------------------------------------------


def test_expired_returns_exactly_the_due_slots_in_deadline_order() -> None:
    lot = Lot()
    a = session(lot)
    deadlines = {3: 30.0, 4: 10.0, 5: 20.5, 6: 10.0, 7: 50.0, 8: 40.0}
    slots = {fd: park(lot, fd, a, deadline=d) for fd, d in deadlines.items()}
    assert lot.next_deadline() == 10.0
    assert lot.expired(9.999) == []
    got = lot.expired(20.5)
    assert {s.fd for s in got} == {4, 6, 5}
    assert [deadlines[s.fd] for s in got] == [10.0, 10.0, 20.5]
    # expired does not wake: the caller does, and they are still PARKED.
    assert all(s.state is State.PARKED for s in got)
    for s in got:
        assert lot.wake(s, Reason.TIMEOUT, 20.5)
    assert lot.woken_total["TIMEOUT"] == 3
    assert lot.expired(20.5) == []
    assert lot.next_deadline() == 30.0
    # A slot woken (READABLE) or closed before its deadline never comes back.
    lot.wake(slots[3], Reason.READABLE, 25.0)
    lot.remove(slots[8])
    assert lot.next_deadline() == 30.0  # stale entries may linger: harmless
    assert lot.expired(45.0) == []
    assert lot.next_deadline() == 50.0
    assert lot.expired(1000.0) == [slots[7]]
    lot.wake(slots[7], Reason.TIMEOUT, 1000.0)
    assert lot.expired(10_000.0) == []
    assert lot.next_deadline() is None
    check_lot(lot, [s for s in slots.values() if s.state is not State.GONE])


def test_expired_skips_slot_whose_fd_was_reused() -> None:
    lot = Lot()
    a = session(lot)
    old = park(lot, 3, a, deadline=10.0)
    lot.remove(old)
    new = park(lot, 3, a, deadline=20.0)
    assert lot.expired(15.0) == []
    assert lot.expired(20.0) == [new]


def test_next_deadline_empty() -> None:
    lot = Lot()
    assert lot.next_deadline() is None
    assert lot.expired(1e9) == []
    assert lot.next_orphan_deadline() is None


def test_next_due_is_the_first_of_deadlines_pack_and_orphans() -> None:
    """The container's timer sleeps until ``next_due``: whichever comes first."""
    lot = Lot(orphan_timeout=5.0)
    assert lot.next_due() == math.inf
    a = session(lot)
    slot = park(lot, 3, a, deadline=50.0)
    assert lot.next_due() == 0.0  # a fresh park: the first pack is due at once
    pack_now(lot, 1.0)
    assert lot.next_due() == 50.0  # packed: only its deadline is left
    lot.remove_session(a)
    assert lot.wake(lot.by_fd(3), Reason.READABLE, 7.0)  # type: ignore[arg-type]
    assert lot.next_due() == 2.0  # unpacked to wake: a pack looks again, a second on
    assert lot.pack(2.0) == 0
    assert lot.next_due() == 12.0  # no session to take it: an orphan at 7 + 5 s
    assert slot.state is State.MOVED


def test_heap_compaction_keeps_heap_small() -> None:
    lot = Lot(window=1 << 20)
    a = session(lot)
    keep = [park(lot, fd, a, deadline=1e6 + fd) for fd in range(100, 150)]
    now = 0.0
    for i in range(5000):
        now += 0.001
        slot = park(lot, 3 + i % 7, a, deadline=now + 300.0)
        assert lot.wake(slot, Reason.READABLE, now)
        ack_and_remove(lot, a, [slot.ticket])
        if i % 10 == 0:
            assert lot.expired(now) == []  # the timer firing for unrelated reasons
        # Right after expired(): stale <= 1024, or compacted; plus <= 10 parks since.
        assert lot._entries <= lot.parked + 1024 + 11
    assert lot.parked == len(keep)
    check_lot(lot)
    # Compaction lost no live deadline.
    assert lot.expired(100_000.0) == []
    assert lot.next_deadline() == 1e6 + 100
    got = lot.expired(1e6 + 149)
    assert got == keep


def test_heap_stays_small_under_timer_driven_expiry() -> None:
    lot = Lot(window=1 << 20)
    a = session(lot)
    now = 0.0
    for i in range(5000):
        now += 0.001
        # The container's timer: expired() only once the earliest deadline is due.
        nxt = lot.next_deadline()
        if nxt is not None and nxt <= now:
            lot.expired(now)
        slot = park(lot, 3 + i % 7, a, deadline=now + 300.0)  # default idle_timeout
        assert lot.wake(slot, Reason.READABLE, now)
        ack_and_remove(lot, a, [slot.ticket])
    assert lot.parked == 0
    assert lot._entries <= lot.parked + 1100


# -- orphans -------------------------------------------------------------------------


def test_orphan_waits_for_timeout_without_session() -> None:
    lot = Lot(orphan_timeout=60.0)
    a = session(lot)
    slots = [park(lot, fd, a) for fd in (3, 4)]
    lot.remove_session(a)  # the worker restarts
    lot.wake(slots[0], Reason.READABLE, 100.0)
    lot.wake(slots[1], Reason.READABLE, 110.0)
    assert lot.orphaned == 2
    assert lot.next_orphan_deadline() == 160.0
    assert lot.orphans(100.0) == []
    assert lot.orphans(159.9) == []
    assert slots[0].state is State.QUEUED
    assert lot.orphans(160.0) == [slots[0]]
    assert lot.orphaned == 1
    lot.remove(slots[0])
    assert lot.next_orphan_deadline() == 170.0
    check_lot(lot)
    assert lot.orphans(169.0) == []
    assert lot.orphans(500.0) == [slots[1]]
    lot.remove(slots[1])
    assert lot.orphans(1000.0) == []
    assert lot.next_orphan_deadline() is None
    assert (lot.parked, lot.queued, lot.sent) == (0, 0, 0)


def test_orphan_delivered_when_session_arrives_in_time() -> None:
    lot = Lot(orphan_timeout=60.0)
    a = session(lot)
    slot = park(lot, 3, a)
    lot.remove_session(a)
    lot.wake(slot, Reason.READABLE, 100.0)
    assert lot.orphans(159.0) == []
    b = session(lot)
    assert slot.state is State.SENT
    assert slot.session is b
    assert lot.orphans(1000.0) == []
    assert lot.next_orphan_deadline() is None
    check_lot(lot)


def test_no_orphans_while_pool_has_a_session() -> None:
    lot = Lot(window=1, orphan_timeout=1.0)
    a = session(lot)
    slots = [park(lot, fd, a) for fd in (3, 4, 5)]
    for s in slots:
        lot.wake(s, Reason.READABLE, 0.0)
    assert len(a.pool.waiting) == 2  # window full: waiting, but not orphaned
    assert lot.orphaned == 0
    assert lot.next_orphan_deadline() is None
    assert lot.orphans(1e6) == []
    assert all(s.state is not State.GONE for s in slots)
    check_lot(lot)


@pytest.mark.parametrize("where", ["unacked", "window-full"])
def test_requeued_wake_gets_a_full_orphan_timeout(where: str) -> None:
    lot = Lot(window=1, orphan_timeout=60.0)
    a = session(lot)
    first = park(lot, 3, a)
    slot = park(lot, 4, a)
    lot.wake(first, Reason.READABLE, 0.0)  # a's window is now full
    lot.wake(slot, Reason.READABLE, 0.0)
    if where == "unacked":
        ack_and_remove(lot, a, [first.ticket])
        assert slot.state is State.SENT  # sent to a, which hangs and never ACKs
    else:
        assert slot.state is State.QUEUED  # waiting behind a's full window
    # t=100: the hung worker is killed; its replacement connects within 60 s.
    lot.remove_session(a, now=100.0)
    assert slot.state is State.QUEUED
    assert lot.orphans(100.0) == [], "closed at once: no session had 60 s to come"


# -- the transition table ------------------------------------------------------------


def test_transition_table_shape() -> None:
    assert TRANSITIONS[State.GONE] == frozenset()
    assert TRANSITIONS[State.MOVED] == frozenset()  # a retired object: nothing acts on it
    for state in State:
        assert state not in TRANSITIONS[state]
        if state not in (State.GONE, State.MOVED):
            assert State.GONE in TRANSITIONS[state]
            assert State.MOVED not in TRANSITIONS[state]
    assert State.PARKED not in set().union(*TRANSITIONS.values())  # parking is not a move


def test_remove_of_gone_slot_raises_internal_error() -> None:
    lot = Lot()
    a = session(lot)
    slot = park(lot, 3, a)
    lot.remove(slot)
    with pytest.raises(InternalError, match=r"GONE -> GONE"):
        lot.remove(slot)
    assert lot.parked == 0
    assert slot.state is State.GONE


def test_illegal_moves_raise_internal_error() -> None:
    lot = Lot()
    a = session(lot)
    slot = park(lot, 3, a)
    with pytest.raises(InternalError, match=r"PARKED -> SENT"):
        lot._move(slot, State.SENT)
    assert lot.parked == 1
    assert slot.state is State.PARKED
    lot.wake(slot, Reason.READABLE, 1.0)
    with pytest.raises(InternalError, match=r"SENT -> SENT"):
        lot._move(slot, State.SENT)
    lot.written(lot.take_outq(a))
    with pytest.raises(InternalError, match=r"WRITTEN -> SENT"):
        lot._move(slot, State.SENT)
    check_lot(lot)


# -- the hot path's batch forms ---------------------------------------------------


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("confirmed", [True, False])
def test_unpark_batch_routes_like_one_wake_each(window: int, confirmed: bool) -> None:
    """``unpark`` = ``wake(REQUESTED, to=asker)`` per ticket: same states, same sessions."""
    result = []
    for batch in (True, False):
        lot = Lot(window=window)
        a, b, other = session(lot), session(lot), session(lot, "q")
        mine = [park(lot, fd, a, flags=0 if confirmed else UNCONFIRMED) for fd in range(3, 9)]
        theirs = park(lot, 9, other)
        lot.wake(mine[1], Reason.READABLE, 0.5)  # not parked any more: a no-op
        unknown = 777 << FD_BITS | 4
        tickets = [x.ticket for x in mine] + [mine[0].ticket, theirs.ticket, unknown]
        if batch:
            woke = lot.unpark(b, tickets, 1.0)
            assert {id(x) for x in woke} == {id(x) for x in mine if x is not mine[1]}
        else:
            for t in tickets:
                found = lot.find(t)
                if found is not None and found.pool is b.pool:
                    lot.wake(found, Reason.REQUESTED, 1.0, to=b)
        if confirmed:  # (unconfirmed wakes go to their session past its window)
            check_lot(lot)
        assert theirs.state is State.PARKED
        result.append(
            [(x.state, x.reason, x.key, x.session and x.session.id - a.id) for x in (*mine, theirs)]
        )
        assert lot.woken_total == {"READABLE": 1, "REQUESTED": 5}
    assert result[0] == result[1]


def test_unpark_takes_unknown_and_out_of_range_tickets_as_no_ops() -> None:
    """Tickets whose fd is past the table's end (or unknown, or repeated) among
    good ones: the good ones wake, in order, once each."""
    lot = Lot(window=8)
    a = session(lot)
    slots = [park(lot, fd, a) for fd in (3, 4, 5)]
    t3, t4, t5 = (x.ticket for x in slots)
    far = (t3 & ~0xFFFFFF) | 0xFFFFF0  # an fd number far past any we hold
    woken = lot.unpark(a, [far, t3, t3 + (1 << 24), t4, far, t3, t5], 1.0)
    assert woken == slots
    assert all(x.state is State.SENT for x in slots)
    assert lot.unpark(a, [far, t4], 2.0) == []  # not parked any more
    check_lot(lot, slots)


def test_unpark_batch_skips_a_frozen_asker_like_route() -> None:
    lot = Lot(window=8, ack_deadline=2.0)
    a, b = session(lot), session(lot)
    old = park(lot, 3, a)
    lot.unpark(a, [old.ticket], 1.0)  # a's first wake, never ACKed
    assert old.session is a
    fresh = [park(lot, fd, a) for fd in (4, 5)]
    lot.unpark(a, [x.ticket for x in fresh], 10.0)  # a is frozen: b takes them
    assert all(x.session is b and x.state is State.SENT for x in fresh)
    assert lot.stale(a, 10.0)
    assert not lot.stale(b, 10.0)
    check_lot(lot)


def test_stale_looks_at_the_oldest_unacked_wake_of_batches() -> None:
    lot = Lot(window=16, ack_deadline=5.0)
    a = session(lot)
    first = [park(lot, fd, a) for fd in (3, 4, 5)]
    second = [park(lot, fd, a) for fd in (6, 7)]
    lot.unpark(a, [x.ticket for x in first], 1.0)
    lot.unpark(a, [x.ticket for x in second], 4.0)
    lot.written(lot.take_outq(a))
    assert not lot.stale(a, 6.0)  # the oldest batch is 5 s old, not older
    assert lot.stale(a, 6.5)
    # Two of the first batch ACKed: its last one still counts.
    assert lot.take_acked(a, [first[0].ticket, first[2].ticket]) == ([first[0], first[2]], [3, 5])
    assert lot.stale(a, 6.5)
    lot.take_acked(a, [first[1].ticket])  # the first batch is all ACKed: the second counts
    assert not lot.stale(a, 8.5)
    assert lot.stale(a, 9.5)
    lot.take_acked(a, [x.ticket for x in second])
    assert not lot.stale(a, 100.0)
    assert a.logged == 0  # all ACKed: the log is empty
    assert not a.sent_log
    check_lot(lot, [])


def test_sent_log_stays_bounded_when_acks_come_out_of_order() -> None:
    lot = Lot(window=4, ack_deadline=60.0)
    a = session(lot)
    never = park(lot, 3, a)
    lot.unpark(a, [never.ticket], 0.0)  # never ACKed: the log keeps everything after it
    fd = 4
    for step in range(200):
        x = park(lot, fd, a)
        lot.unpark(a, [x.ticket], float(step))
        lot.written(lot.take_outq(a))
        assert lot.take_acked(a, [x.ticket]) == ([x], [x.ticket & ((1 << FD_BITS) - 1)])
        assert a.logged <= 4 * (lot.window + 2)  # (it trims when over 4x window + inflight)
    assert sum(len(group) for _, group in a.sent_log) == a.logged
    assert lot.stale(a, 61.0)


def test_take_acked_is_ack_and_remove_in_one() -> None:
    lot = Lot(window=8)
    a = session(lot)
    slots = [park(lot, fd, a) for fd in (3, 4, 5)]
    lot.unpark(a, [x.ticket for x in slots], 1.0)
    lot.written(lot.take_outq(a)[:2])  # the third is not written yet: its ACK is ignored
    done, fds = lot.take_acked(
        a, [slots[2].ticket, slots[0].ticket, slots[0].ticket, 99, slots[1].ticket]
    )
    assert done == [slots[0], slots[1]]
    assert fds == [3, 4]  # for the caller to close
    for x in done:
        assert x.state is State.GONE
        assert x.fd == -1
        assert lot.find(x.ticket) is None
    assert lot.by_fd(3) is None
    assert lot.by_fd(4) is None
    assert slots[2].state is State.SENT
    check_lot(lot, [slots[2]])


def test_park_many_is_park_of_each() -> None:
    lot = Lot(window=8)
    a = session(lot)
    got, tickets = lot.park_many(
        a, (3, 70), (b"t", b""), (b"p", b""), (HANGUP_RETURNS, 0), (2500, 1000)
    )
    assert [x.fd for x in got] == [3, 70]
    assert tickets == [x.ticket for x in got]
    assert len(set(tickets)) == 2
    assert [t & 0xFFFFFF for t in tickets] == [3, 70]  # the fd is the ticket's low bits
    assert [(x.token, x.pending, x.flags) for x in got] == [
        (b"t", b"p", HANGUP_RETURNS),
        (b"", b"", 0),
    ]
    assert all(x.session is a and x.state is State.PARKED for x in got)
    assert lot.next_deadline() == 1.0
    assert lot.expired(1.0) == [got[1]]
    # An fd already parked, or one fd twice in the frame: nothing of the frame goes in.
    for fds in ((5, 3), (5, 5)):
        with pytest.raises(InternalError, match="parked twice"):
            lot.park_many(a, fds, (b"", b""), (b"", b""), (0, 0), (9000, 9000))
        assert lot.parked == 2
        assert lot.by_fd(5) is None
    check_lot(lot)


def test_a_mass_wake_sweeps_its_tick_only() -> None:
    lot = Lot(window=4096)
    a = session(lot)
    slots = [park(lot, fd, a) for fd in range(3, 1203)]
    lot.unpark(a, [x.ticket for x in slots], 1.0)  # 1200 stale entries at one tick: swept
    assert (lot._entries, lot._stale) == (0, 0)
    kept = park(lot, 2000, a, deadline=50.0)
    assert lot.expired(60.0) == [kept]
    assert lot.expired(200.0) == []  # (the swept tick's heap entry: nothing there)


def test_wakes_never_make_the_lot_walk_the_idle_connections() -> None:
    """Connections parked and woken while 5,000 stay idle: the stale timer entries
    they leave are swept tick by tick. A whole-table compaction (every parked
    connection walked: ~2 ms at 10,000, ~20 ms at 100,000, the container paused)
    must not run; it did, once stale entries outnumbered live ones."""
    walks = [0]

    class Counting(Lot):
        def _compact(self) -> None:
            walks[0] += 1
            super()._compact()

    lot = Counting(window=1 << 20)
    a = session(lot)
    idle = [park(lot, fd, a, deadline=10_000.0) for fd in range(3, 5003)]
    for round_ in range(40):  # 40 frames of 253: parked, then woken at once
        busy = [park(lot, fd, a, deadline=300.0 + round_) for fd in range(6000, 6253)]
        lot.unpark(a, [x.ticket for x in busy], 1.0)
        lot.written(busy)
        for done in lot.ack(a, [x.ticket for x in busy]):  # (their fd numbers come back)
            lot.remove(done)
    assert walks[0] == 0
    assert lot._entries == len(idle)
    assert lot._stale == 0
    assert lot.expired(10_001.0) == idle


def _stale_entries(lot: Lot) -> int:
    """Timer entries that stand for no deadline, counted by looking (each live
    one once: an fd number twice at one tick is one live entry and one stale)."""
    stale = 0
    for tick, fds in lot._due.items():
        live = {fd for fd in fds if (x := lot.by_fd(fd)) is not None and x.key == tick}
        stale += len(fds) - len(live)
    return stale


def test_fd_numbers_reused_within_a_tick_keep_the_stale_counts_exact() -> None:
    """A connection closed and its fd number taken by the next park at the same
    tick: two entries look alike to a sweep. Both were kept, the tick's stale
    count reset: the lot's count then overstated the stale entries left (1,100
    here), until the whole-table compaction ran under ordinary churn."""
    walks = [0]

    class Counting(Lot):
        def _compact(self) -> None:
            walks[0] += 1
            super()._compact()

    lot = Counting(window=1 << 20)
    a = session(lot)
    reused = []
    for i in range(1100):
        fd, other = 10 + 2 * i, 11 + 2 * i
        tick = 100.0 + i
        gone = park(lot, fd, a, deadline=tick)
        park(lot, other, a, deadline=tick)
        lot.remove(gone)  # its client hung up, its fd closed ...
        reused.append(park(lot, fd, a, deadline=tick))  # ... the next park got its number
        assert lot.wake(lot.by_fd(other), Reason.READABLE, 1.0)  # the tick swept
        assert lot._stale == _stale_entries(lot)
    for slot in reused[:600]:
        assert lot.wake(slot, Reason.READABLE, 1.0)
    assert lot._stale == _stale_entries(lot)
    assert walks[0] == 0
    assert lot.expired(1200.0) == reused[600:]
    assert (lot._entries, lot._stale) == (0, 0)


def test_an_unpark_that_compacts_the_timer_loses_no_other_deadline() -> None:
    """An UNPARK of connections at two ticks whose first stale report runs the
    backstop compaction (``_compact``: the timer rebuilt from the parked ones,
    the unparked no longer among them) must not report the second tick's
    against the rebuilt entries. It did: counted all stale, that tick was swept
    empty without a look, and a connection still parked there never timed out.
    (The backstop runs only if the stale counts are off: forced here.)"""

    class Compacting(Lot):
        force = False

        def _staled(self, tick: int, n: int) -> bool:
            if self.force:
                self.force = False
                self._compact()
                return True
            return super()._staled(tick, n)

    lot = Compacting(window=1 << 20)
    a = session(lot)
    first = [park(lot, fd, a, deadline=2000.0) for fd in range(5000, 5003)]
    second = park(lot, 5003, a, deadline=3000.0)
    idle = park(lot, 5004, a, deadline=3000.0)
    lot.force = True
    lot.unpark(a, [first[0].ticket, second.ticket], 2.0)
    assert not lot.force  # (it ran, at the first tick's report)
    assert lot.expired(2500.0) == first[1:]
    assert lot.expired(3001.0) == [idle]  # ([] before: its entry was dropped)


# -- random sequences ----------------------------------------------------------------

POOLS = ("a", "b")


def least_loaded(lot: Lot, sessions: list[SessionState], now: float) -> SessionState | None:
    """``Lot._pick`` by brute force: the least-loaded session with room, those past
    the ACK deadline last, the first to come among equals."""
    with_room = [s for s in sessions if s.load < lot.window]
    fresh = [s for s in with_room if not lot.stale(s, now)]
    return min(fresh or with_room, key=lambda s: s.load, default=None)


def test_routing_a_wake_looks_at_few_of_many_sessions() -> None:
    """A pool of 256 sessions: routing a wake (its parker gone) must not look at
    each session (it did: 256 ACK-deadline checks per wake, ~40 us at 64 sessions
    in a real container). The picks stay the least loaded, spread evenly."""
    looked = [0]

    class Counting(Lot):
        def stale(self, session: SessionState, now: float) -> bool:
            looked[0] += 1
            return super().stale(session, now)

    lot = Counting(window=8, ack_deadline=5.0)
    gone = session(lot)
    sessions = [session(lot) for _ in range(256)]
    slots = [park(lot, fd, gone) for fd in range(3, 1027)]
    lot.remove_session(gone)
    looked[0] = 0
    for slot in slots:
        assert lot.wake(slot, Reason.READABLE, 1.0)
    assert looked[0] <= 3 * len(slots)  # (256 per wake before)
    assert sorted(s.load for s in sessions) == [4] * 256  # 1,024 wakes, evenly


def test_the_routing_heap_stays_bounded_when_nothing_is_routed() -> None:
    """Each ACK pushes its session's new load (``_lighter``); with no wake ever
    routed (``_pick`` never runs: the asker always has room) it must not grow."""
    lot = Lot(window=8)
    a = session(lot)
    for fd in range(3, 2003):
        slot = park(lot, fd, a)
        lot.unpark(a, [slot.ticket], 1.0)
        lot.written([slot])
        for done in lot.ack(a, [slot.ticket]):
            lot.remove(done)
    assert len(a.pool.by_load) <= 2 * len(a.pool.sessions) + 17


class LotMachine(RuleBasedStateMachine):
    """Random park / wake / ack / sessions / expiry / orphans; invariants after each step."""

    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.lot = Lot(window=2, orphan_timeout=5.0)
        self.live: list[Slot] = []
        self.deadline: dict[int, float] = {}
        self.now = 0.0

    def _alive(self) -> list[SessionState]:
        return [s for p in self.lot.pools.values() for s in p.sessions]

    def _free_fd(self) -> int:
        used = {s.fd for s in self.live if s.fd >= 0}
        return next(fd for fd in itertools.count(3) if fd not in used)

    def _current(self, slot: Slot) -> Slot:
        """A retired (packed) slot's connection as an object again, as the container
        gets it: by ticket."""
        if slot.state is not State.MOVED:
            return slot
        found = self.lot.find(slot.ticket)
        assert found is not None
        assert found.state is State.PARKED
        parker = slot.session if slot.session is not None and slot.session.alive else None
        assert (found.ticket, found.fd, found.pool, found.session) == (
            slot.ticket,
            slot.fd,
            slot.pool,
            parker,  # one that ended is forgotten (it would not get the wake anyway)
        )
        self.live[self.live.index(slot)] = found
        return found

    def _refresh(self) -> None:
        """Retired slots whose connection a lot call unpacked: take the new objects."""
        for i, x in enumerate(self.live):
            if x.state is State.MOVED and self.lot._by_fd[x.fd] is not _PACKED:
                found = self.lot._by_fd[x.fd]
                assert found is not None
                assert found.ticket == x.ticket
                self.live[i] = found

    @staticmethod
    def _parked(slot: Slot) -> bool:
        return slot.state in (State.PARKED, State.MOVED)

    @rule()
    def pack(self) -> None:
        objects = [x for x in self.live if x.state is State.PARKED]
        assert pack_now(self.lot, self.now) == len(objects)
        assert all(x.state is State.MOVED for x in objects)
        assert self.lot.next_pack() is None  # every parked one is packed
        assert self.lot.pack(self.now) == 0

    def _drop(self, slot: Slot) -> None:
        self.lot.remove(slot)
        assert slot.state is State.GONE
        assert slot.fd == -1
        assert self.lot.find(slot.ticket) is None
        self.live.remove(slot)

    @initialize(target=sessions)
    def first_session(self) -> SessionState:
        return session(self.lot, "a")

    @rule(target=sessions, pool=st.sampled_from(POOLS))
    def add_session(self, pool: str) -> SessionState:
        return session(self.lot, pool)

    @rule(s=consumes(sessions))
    def remove_session(self, s: SessionState) -> None:
        if not s.alive:
            return
        unacked = set(s.inflight)
        before = self.lot.sent
        assert self.lot.remove_session(s) == len(unacked)
        assert s not in self.lot.dirty
        assert self.lot.sent <= before
        for slot in self.live:
            if slot.ticket in unacked:
                assert slot.state in (State.SENT, State.QUEUED)
                assert slot.session is not s

    @rule(s=sessions, delay=st.integers(1, 20), flags=st.integers(0, 3))
    def park(self, s: SessionState, delay: int, flags: int) -> None:
        if not s.alive:
            return
        fd = self._free_fd()
        slot = park(self.lot, fd, s, deadline=self.now + delay, flags=flags)
        assert all(slot.ticket != other.ticket for other in self.live)
        self.live.append(slot)
        self.deadline[slot.ticket] = self.now + delay

    @rule(
        data=st.data(),
        reason=st.sampled_from([Reason.READABLE, Reason.HANGUP, Reason.REQUESTED]),
        to=st.none() | sessions,
    )
    def wake(self, data: st.DataObject, reason: Reason, to: SessionState | None) -> None:
        """A readiness event or an UNPARK, mostly of a parked slot."""
        parked = [s for s in self.live if self._parked(s)]
        if parked:
            self._wake(self._current(data.draw(st.sampled_from(parked))), reason, to)

    @rule(
        data=st.data(),
        reason=st.sampled_from([Reason.READABLE, Reason.REQUESTED]),
        to=st.none() | sessions,
    )
    def wake_any(self, data: st.DataObject, reason: Reason, to: SessionState | None) -> None:
        """Recall races: an UNPARK of a slot whose wake may already be under way."""
        if self.live:
            self._wake(self._current(data.draw(st.sampled_from(self.live))), reason, to)

    def _wake(self, slot: Slot, reason: Reason, to: SessionState | None) -> None:
        was_parked = slot.state is State.PARKED
        if to is not None and (not to.alive or to.pool is not slot.pool):
            to = None
        self.lot.dirty.clear()
        if was_parked and not slot.returns_fd(reason):
            self.lot.forget_fd(slot)  # a notice: the container closed the fd
        state, owner = slot.state, slot.session
        room = {  # (a frozen session, past the ACK deadline, is routed around)
            id(s): s.load < self.lot.window and not self.lot.stale(s, self.now)
            for s in slot.pool.sessions
        }
        best = least_loaded(self.lot, slot.pool.sessions, self.now)
        unconfirmed = bool(slot.flags & UNCONFIRMED)
        assert self.lot.wake(slot, reason, self.now, to=to) is was_parked
        if not was_parked:
            assert slot.state is state
            assert slot.session is owner
            assert not self.lot.dirty
            return
        assert slot.reason is reason
        first = to if to is not None else owner
        if slot.state is State.SENT:
            assert slot.session is not None
            assert self.lot.dirty == {slot.session}
            if first is not None and first.alive and room[id(first)]:
                assert slot.session is first  # its parker (or asker) when it has room
            elif not (unconfirmed and first is not None and first.alive):
                assert slot.session is best  # else the least loaded (``_pick``'s heap)
        else:
            assert slot.state is State.QUEUED
            assert all(s.load >= self.lot.window for s in slot.pool.sessions)

    @rule(s=sessions, data=st.data())
    def ack(self, s: SessionState, data: st.DataObject) -> None:
        if not s.alive:
            return
        tickets = data.draw(
            st.lists(st.sampled_from([*s.inflight, 12345 << FD_BITS]), min_size=1, max_size=4)
        )
        taken = self.lot.take_outq(s)  # a worker only ACKs the wakes it received
        assert s.outq == []
        assert all(s.inflight.get(x.ticket) is x for x in taken)
        written = taken[: data.draw(st.integers(0, len(taken)))]  # the socket took these
        self.lot.written(written)
        expected = [
            t
            for t in dict.fromkeys(tickets)
            if t in s.inflight and s.inflight[t].state is State.WRITTEN
        ]
        done = self.lot.ack(s, tickets)
        assert [x.ticket for x in done] == expected
        for slot in done:
            assert slot.state is State.WRITTEN
            self._drop(slot)

    @rule(s=sessions, data=st.data())
    def unpark(self, s: SessionState, data: st.DataObject) -> None:
        """The UNPARK batch: any tickets (live, duplicated, unknown, other pools)."""
        if not s.alive:
            return
        pool = [x.ticket for x in self.live]
        tickets = data.draw(
            st.lists(st.sampled_from([*pool, 4321 << FD_BITS]), max_size=6) if pool else st.just([])
        )
        want = {
            x.ticket
            for x in self.live
            if x.ticket in tickets and self._parked(x) and x.pool is s.pool
        }
        room = s.load < self.lot.window and not self.lot.stale(s, self.now)
        woke = self.lot.unpark(s, tickets, self.now)
        self._refresh()
        assert {x.ticket for x in woke} == want
        assert len(woke) == len(want)
        for x in woke:
            assert x.reason is Reason.REQUESTED
            assert x.state in (State.SENT, State.QUEUED)
        if woke and room:
            assert woke[0].session is s

    @rule(s=sessions, data=st.data())
    def take_acked(self, s: SessionState, data: st.DataObject) -> None:
        if not s.alive:
            return
        tickets = data.draw(
            st.lists(st.sampled_from([*s.inflight, 12345 << FD_BITS]), min_size=1, max_size=4)
        )
        taken = self.lot.take_outq(s)
        written = taken[: data.draw(st.integers(0, len(taken)))]
        self.lot.written(written)
        expected = [
            t
            for t in dict.fromkeys(tickets)
            if t in s.inflight and s.inflight[t].state is State.WRITTEN
        ]
        had = {x.ticket: x.fd for x in self.live}
        done, fds = self.lot.take_acked(s, tickets, self.now)
        assert [x.ticket for x in done] == expected
        assert fds == [had[x.ticket] for x in done if had[x.ticket] >= 0]
        for slot in done:
            assert slot.state is State.GONE
            assert slot.fd == -1
            assert self.lot.find(slot.ticket) is None
            self.live.remove(slot)

    @rule(s=sessions, n=st.integers(1, 4), delay=st.integers(1, 20))
    def park_many(self, s: SessionState, n: int, delay: int) -> None:
        if not s.alive:
            return
        entries = []
        for _ in range(n):
            fd = self._free_fd()
            entries.append((fd, b"m%d" % fd, b"", 0, math.ceil((self.now + delay) * 1000)))
            self.live.append(Slot(0, fd, b"", b"", 0, s.pool))  # holds the fd number
        del self.live[-n:]
        got, _ = self.lot.park_many(s, *zip(*entries, strict=True))
        assert [x.fd for x in got] == [e[0] for e in entries]
        for slot in got:
            self.live.append(slot)
            self.deadline[slot.ticket] = self.now + delay

    @rule(s=sessions)
    def ack_foreign(self, s: SessionState) -> None:
        """Tickets of another session's wakes are ignored."""
        if not s.alive:
            return
        foreign = [x.ticket for x in self.live if x.ticket not in s.inflight]
        assert self.lot.ack(s, foreign) == []

    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        parked = [s for s in self.live if self._parked(s)]
        if parked:
            self._drop(self._current(data.draw(st.sampled_from(parked))))

    @rule(dt=st.integers(0, 8))
    def expire(self, dt: int) -> None:
        self.now += dt
        got = self.lot.expired(self.now)
        self._refresh()
        due = [s for s in self.live if self._parked(s) and self.deadline[s.ticket] <= self.now]
        assert {s.ticket for s in got} == {s.ticket for s in due}
        assert len(got) == len(due)
        keys = [self.deadline[s.ticket] for s in got]
        assert keys == sorted(keys)  # by deadline (within one tick: any order)
        for slot in got:
            if not slot.returns_fd(Reason.TIMEOUT):
                self.lot.forget_fd(slot)
            assert self.lot.wake(slot, Reason.TIMEOUT, self.now)
        assert self.lot.expired(self.now) == []
        nxt = self.lot.next_deadline()
        future = [self.deadline[s.ticket] for s in self.live if self._parked(s)]
        if future:
            assert nxt is not None
            assert nxt <= min(future)
            assert nxt > self.now

    @rule()
    def orphans(self) -> None:
        got = self.lot.orphans(self.now)
        for slot in got:
            assert slot.state is State.QUEUED
            assert not slot.pool.sessions
            assert self.now - float(slot.key) >= self.lot.orphan_timeout
            self._drop(slot)

    @invariant()
    def consistent(self) -> None:
        check_lot(self.lot, self.live)
        for s in self._alive():
            assert s.load <= self.lot.window
        # The orphan pools the lot keeps track of are all there are.
        orphaned = [p for p in self.lot.pools.values() if p.waiting and not p.sessions]
        assert self.lot.orphaned == sum(len(p.waiting) for p in orphaned)
        firsts = [float(p.waiting[0].key) + self.lot.orphan_timeout for p in orphaned]
        assert self.lot.next_orphan_deadline() == min(firsts, default=None)


TestLotMachine = LotMachine.TestCase
TestLotMachine.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class FrozenAwareLotMachine(LotMachine):
    """The same with an ACK deadline: routing around frozen sessions, the sent log."""

    def __init__(self) -> None:
        super().__init__()
        self.lot = Lot(window=2, orphan_timeout=5.0, ack_deadline=3.0)


TestFrozenAwareLotMachine = FrozenAwareLotMachine.TestCase
TestFrozenAwareLotMachine.settings = TestLotMachine.settings


# -- deadline ticks ------------------------------------------------------------------


@pytest.mark.parametrize("idle", [0.0, 0.001, 0.05, 0.2, 1.0, 7.5, 60.0, 300.0, 86_400.0])
@pytest.mark.parametrize("now", [0.0, 0.0004, 12.3456, 98_765.4321])
def test_due_ms_is_never_early_and_at_most_a_64th_late(now: float, idle: float) -> None:
    due = due_ms(now, idle)
    exact = (now + idle) * 1000
    assert due >= exact - 1e-6
    assert due - exact <= max(1.0, min(idle * 1000 / 64, MAX_TICK_MS)) + 1e-6
    assert due > 0


def test_parks_of_one_tick_share_one_timer_entry() -> None:
    """What makes a deadline cost 4 B: a frame of parks with one timeout is one entry."""
    lot = Lot(window=4096)
    a = session(lot)
    due = due_ms(1000.0, 300.0)
    assert due == due_ms(1000.3, 300.0)  # 0.3 s later: the same tick (of 1,024 ms)
    lot.park_many(a, *zip(*[(fd, b"", b"", 0, due) for fd in range(3, 503)], strict=True))
    lot.park_many(
        a, *zip(*[(fd, b"", b"", 0, due_ms(1000.3, 300.0)) for fd in range(503, 603)], strict=True)
    )
    assert len(lot._due) == 1
    assert lot._entries == 600
    assert lot.expired(due / 1000 - 0.002) == []
    assert len(lot.expired(due / 1000)) == 600


def test_touch_moves_a_deadline_and_sweeps_the_old_entry() -> None:
    lot = Lot()
    a = session(lot)
    slot = park(lot, 3, a, deadline=10.0)
    lot.touch(slot, 20_000)
    lot.touch(slot, 20_000)  # the same tick again: no second entry
    assert lot._entries == 1  # (the old one swept: its tick had that entry only)
    assert lot._stale == 0
    assert lot.expired(15.0) == []
    assert lot.expired(20.0) == [slot]


# -- packing -------------------------------------------------------------------------


def _packed_lot() -> tuple[Lot, SessionState, list[Slot]]:
    """Six parks: plain (fds 3-5, fd 4 with token and pending), unconfirmed (6),
    with rules or tags (7), restored under another fd (8: packed too)."""
    lot = Lot(window=64)
    a = session(lot)
    slots = [
        lot.park(3, token=b"", pending=b"", flags=HANGUP_RETURNS, session=a, deadline_ms=10_000),
        lot.park(4, token=b"tk", pending=b"pd", flags=0, session=a, deadline_ms=20_000),
        lot.park(5, token=b"", pending=b"", flags=TIMEOUT_RETURNS, session=a, deadline_ms=30_000),
        lot.park(6, token=b"", pending=b"", flags=UNCONFIRMED, session=a, deadline_ms=30_000),
        lot.park(7, token=b"", pending=b"", flags=0, session=a, deadline_ms=30_000),
    ]
    slots[4].extra = object()  # rules or tags: stays an object
    slots.append(
        lot.restore(
            9 << FD_BITS | 99, 8, token=b"", pending=b"", flags=0, pool="p", deadline_ms=30_000
        )
    )
    return lot, a, slots


def test_pack_retires_plain_confirmed_slots_and_keeps_the_rest() -> None:
    lot, _a, slots = _packed_lot()
    assert lot.next_pack() == 0.0  # parked objects: pack at the first chance
    assert lot.pack(5.0) == 0  # parked since the last pack (none): marked, not packed
    assert lot.packed == 0
    assert lot.pack(5.0) == 4
    assert lot.packed == 4
    assert lot.parked == 6  # counts do not change: packed is a way of holding PARKED
    assert [s.state for s in slots] == [State.MOVED] * 3 + [State.PARKED] * 2 + [State.MOVED]
    assert lot.next_pack() == 5.0 + PACK_EVERY  # the unconfirmed one may qualify later
    assert slots[0].fd == 3
    with pytest.raises(InternalError):
        lot.remove(slots[0])  # a retired object cannot act for its connection
    assert slots[0].fd == 3  # (and it was not touched on the way)
    assert not lot.wake(slots[1], Reason.READABLE, 6.0)  # nor be woken (a no-op)
    Lot.confirm([slots[3]])
    assert lot.pack(6.0) == 0  # confirmed since: packed by the pack after
    assert pack_now(lot, 7.0) == 1
    assert lot.next_pack() is None  # the rest are not for packing: no timer
    check_lot(lot, slots)


def test_packed_connections_unpack_as_they_were_by_fd_and_by_ticket() -> None:
    lot, a, slots = _packed_lot()
    pack_now(lot, 5.0)
    by_fd = lot.by_fd(4)
    assert by_fd is not None
    assert by_fd is not slots[1]
    assert (by_fd.ticket, by_fd.fd, by_fd.token, by_fd.pending, by_fd.flags) == (
        slots[1].ticket,
        4,
        b"tk",
        b"pd",
        0,
    )
    assert (by_fd.state, by_fd.session, by_fd.pool, by_fd.key) == (State.PARKED, a, a.pool, 20_000)
    assert lot.packed == 3
    # A stale ticket of a packed fd finds nothing and leaves it packed.
    assert lot.find(slots[0].ticket ^ 1 << 30) is None
    assert lot.packed == 3
    found = lot.find(slots[2].ticket)
    assert found is not None
    assert found.flags == TIMEOUT_RETURNS
    assert lot.packed == 2
    slots[1:3] = [by_fd, found]
    check_lot(lot, slots)


def test_unpark_and_expiry_reach_packed_connections() -> None:
    lot, a, slots = _packed_lot()
    pack_now(lot, 5.0)
    woke = lot.unpark(a, [slots[1].ticket, slots[1].ticket, 77 << FD_BITS | 4], 6.0)
    assert [(w.ticket, w.state, w.reason, w.token) for w in woke] == [
        (slots[1].ticket, State.SENT, Reason.REQUESTED, b"tk")
    ]
    assert a.outq == woke
    due = lot.expired(10.0)
    assert [s.ticket for s in due] == [slots[0].ticket]
    assert due[0].flags == HANGUP_RETURNS
    assert lot.wake(due[0], Reason.TIMEOUT, 10.0)
    assert lot.packed == 2  # fds 5 and 8 (deadline 30 s)
    assert lot.expired(20.0) == []  # fd 4's entry: stale (woken by the UNPARK)
    assert lot.next_deadline() == 30.0
    got = lot.expired(30.0)
    assert {s.fd for s in got} == {5, 6, 7, 8}
    assert lot.packed == 0


def test_compaction_and_epochs_see_packed_connections() -> None:
    lot = Lot(window=1 << 20)
    a = session(lot)
    keep = [park(lot, fd, a, deadline=1e6 + fd) for fd in range(100, 150)]
    assert pack_now(lot, 0.0) == 50
    now = 0.0
    for i in range(3000):  # stale timer entries: compacted, packed deadlines kept
        now += 0.001
        slot = park(lot, 3 + i % 7, a, deadline=now + 300.0)
        assert lot.wake(slot, Reason.READABLE, now)
        ack_and_remove(lot, a, [slot.ticket])
    assert lot._entries <= 50 + 1024 + 1
    assert lot.packed == 50
    lot._seq = SEQ_LIMIT - 1  # the next park moves to an epoch no packed ticket uses
    fresh = park(lot, 3, a)
    assert fresh.ticket >> EPOCH_SHIFT not in {s.ticket >> EPOCH_SHIFT for s in keep}
    got = lot.expired(1e6 + 149)
    assert sorted(s.ticket for s in got) == sorted(s.ticket for s in [*keep, fresh])
    assert lot.packed == 0


def test_parked_slots_unpacks_everything_for_a_shutdown() -> None:
    lot, _a, slots = _packed_lot()
    pack_now(lot, 5.0)
    parked = lot.parked_slots()
    assert len(parked) == 6
    assert all(s.state is State.PARKED for s in parked)
    assert lot.packed == 0
    assert {s.ticket for s in parked} == {s.ticket for s in slots}
