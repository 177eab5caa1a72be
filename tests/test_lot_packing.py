"""The lot's packing and tick timers: the invariants they rely on.

A state machine (``LotMachine`` of ``test_lot``, plus deadline moves, unconfirmed
parks and their confirmation, restored connections under another fd number,
and a tiny sequence space so that epochs roll over with packed tickets) that
also checks the timer bookkeeping after every step: ``_entries`` and ``_stale``
against the entries actually held, every live deadline reachable from its tick,
the packed columns against the by-fd table. Plus unit tests of ``Column``.
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

import connpark._lot as lot_module
from connpark._column import Column
from connpark._lot import (
    _PACKED,
    EPOCH_SHIFT,
    FD_BITS,
    UNCONFIRMED,
    Lot,
    SessionState,
    Slot,
    State,
    due_ms,
)
from connpark._wire import Reason

from .conftest import model_settings
from .test_lot import LotMachine, check_lot, pack_now, park, session

# -- the timer and packed-column bookkeeping -------------------------------------------


def check_timers(lot: Lot) -> None:
    """``_entries``/``_stale`` are what the tables hold; every live deadline has its entry."""
    held = sum(len(fds) for fds in lot._due.values())
    assert lot._entries == held
    assert sorted(lot._ticks) == sorted(lot._due)  # one heap entry per tick, no more
    live: dict[int, int] = {}  # fd -> its deadline tick
    packed = 0
    for fd, slot in enumerate(lot._by_fd):
        if slot is _PACKED:
            packed += 1
            assert lot._pticket[fd] != 0
            ticket = lot._pticket[fd]
            assert ticket & ((1 << FD_BITS) - 1) == fd or lot._alias.get(ticket) == fd
            if lot._pkey[fd]:
                live[fd] = lot._pkey[fd]
        else:
            if fd < len(lot._pticket):
                assert lot._pticket[fd] == 0, f"fd {fd}: a ticket left in the packed column"
            if slot is not None and slot.state is State.PARKED and slot.key:
                live[fd] = int(slot.key)
    assert lot.packed == packed
    assert set(lot._pdata) <= {fd for fd, s in enumerate(lot._by_fd) if s is _PACKED}
    for fd, tick in live.items():
        assert fd in lot._due.get(tick, ()), f"fd {fd}: no timer entry at its tick {tick}"
    assert lot._stale == held - len(live), "stale count drifted"
    assert lot._stale >= 0


#: A restored ticket's epoch: one the lot under test never reaches by itself in 60 steps.
_RESTORED_EPOCH = 0xA0


class PackingLotMachine(LotMachine):
    """``LotMachine`` plus touch, unconfirmed parks, restores, epoch rollover."""

    def __init__(self) -> None:
        super().__init__()
        # Epochs roll over every few parks (restored in ``teardown``).
        self._seq_limit = lot_module.SEQ_LIMIT
        lot_module.SEQ_LIMIT = 7
        self.unconfirmed: list[Slot] = []
        self.excused: set[int] = set()  # ids of slots parked unconfirmed
        self._restored_seq = itertools.count(1)

    def teardown(self) -> None:
        lot_module.SEQ_LIMIT = self._seq_limit

    def _refresh_unconfirmed(self) -> None:
        self.unconfirmed = [x for x in self.unconfirmed if x in self.live]

    @rule()
    def pack(self) -> None:
        self._refresh_unconfirmed()
        packable = [
            x
            for x in self.live
            if x.state is State.PARKED and not x.flags & UNCONFIRMED and x.extra is None
        ]
        n = pack_now(self.lot, self.now)
        # Restored under another fd number (an alias): packed or not, as the lot does.
        objects = [x for x in packable if x.ticket & ((1 << FD_BITS) - 1) == x.fd]
        assert all(x.state is State.MOVED for x in objects)
        assert n == sum(x.state is State.MOVED for x in packable)
        waiting = [x for x in self.live if x.state is State.PARKED and x.flags & UNCONFIRMED]
        if not waiting:
            assert self.lot.next_pack() is None
        else:
            assert self.lot.next_pack() is not None  # the unconfirmed ones: later
        assert self.lot.pack(self.now) == 0

    @rule(s=LotMachine.sessions, delay=st.integers(1, 20))
    def park_unconfirmed(self, s: SessionState, delay: int) -> None:
        """A park whose PARKED answer has not been written yet."""
        if not s.alive:
            return
        fd = self._free_fd()
        slot = park(self.lot, fd, s, deadline=self.now + delay, flags=UNCONFIRMED)
        self.live.append(slot)
        self.unconfirmed.append(slot)
        self.excused.add(id(slot))
        self.deadline[slot.ticket] = self.now + delay

    @rule()
    def confirm(self) -> None:
        """Their PARKED went out (``_Confirm`` holds the very objects it parked)."""
        Lot.confirm(self.unconfirmed)
        self.unconfirmed = []

    @rule(data=st.data(), delay=st.integers(1, 20))
    def touch(self, data: st.DataObject, delay: int) -> None:
        """An auto-response resets the idle deadline (a rounded tick, ``due_ms``)."""
        parked = [s for s in self.live if self._parked(s)]
        if not parked:
            return
        slot = self._current(data.draw(st.sampled_from(parked)))
        due = due_ms(self.now, float(delay))
        self.lot.touch(slot, due)
        self.deadline[slot.ticket] = due / 1000

    @rule(pool=st.sampled_from(["a", "b"]), alias=st.booleans(), delay=st.integers(0, 20))
    def restore(self, pool: str, alias: bool, delay: int) -> None:
        """A connection back from the mirror: same ticket, maybe another fd number."""
        fd = self._free_fd()
        bits = fd + 1000 if alias else fd
        ticket = _RESTORED_EPOCH << EPOCH_SHIFT | next(self._restored_seq) << FD_BITS | bits
        due = due_ms(self.now, float(delay))
        slot = self.lot.restore(
            ticket, fd, token=b"r", pending=b"", flags=0, pool=pool, deadline_ms=due
        )
        assert self.lot.find(ticket) is slot
        self.live.append(slot)
        self.deadline[ticket] = due / 1000

    @invariant()
    def consistent(self) -> None:
        check_lot(self.lot, self.live, frozenset(self.excused))

    @invariant()
    def timers(self) -> None:
        check_timers(self.lot)
        tickets = [x.ticket for x in self.live]
        assert len(set(tickets)) == len(tickets), "a ticket issued twice"


TestPackingLotMachine = PackingLotMachine.TestCase
TestPackingLotMachine.settings = model_settings("CONNPARK_LOT_EXAMPLES", 300, 60)


class FrozenAwarePackingLotMachine(PackingLotMachine):
    def __init__(self) -> None:
        super().__init__()
        self.lot = Lot(window=2, orphan_timeout=5.0, ack_deadline=3.0)


TestFrozenAwarePackingLotMachine = FrozenAwarePackingLotMachine.TestCase
TestFrozenAwarePackingLotMachine.settings = TestPackingLotMachine.settings


# -- deterministic cases -----------------------------------------------------------------


def test_a_packed_fd_reused_on_the_same_tick_wakes_only_its_new_connection() -> None:
    lot = Lot()
    a = session(lot)
    due = due_ms(0.0, 60.0)
    old = lot.park(5, token=b"o", pending=b"", flags=0, session=a, deadline_ms=due)
    pack_now(lot, 0.0)
    found = lot.find(old.ticket)
    assert found is not None
    lot.remove(found)  # CLOSE: the container closed fd 5; the number comes back
    new = lot.park(5, token=b"n", pending=b"", flags=0, session=a, deadline_ms=due)
    pack_now(lot, 1.0)
    check_timers(lot)
    got = lot.expired(due / 1000)
    assert [(x.ticket, x.token) for x in got] == [(new.ticket, b"n")]
    check_timers(lot)


def test_stale_count_stays_exact_through_pack_unpack_cycles() -> None:
    lot = Lot(window=1 << 20)
    a = session(lot)
    now = 0.0
    slots = [
        lot.park(fd, token=b"", pending=b"", flags=0, session=a, deadline_ms=due_ms(now, 10.0))
        for fd in range(3, 203)
    ]
    for round_ in range(20):
        now += 0.5
        lot.pack(now)
        for i in range(round_ % 3, 200, 3):  # UNPARK a third, park the fd again
            woke = lot.unpark(a, [slots[i].ticket], now)
            assert len(woke) == 1
            lot.written(lot.take_outq(a))
            done, _fds = lot.take_acked(a, [slots[i].ticket], now)
            assert done
            slots[i] = lot.park(
                slots[i].fd if slots[i].fd >= 0 else 3 + i,
                token=b"",
                pending=b"",
                flags=0,
                session=a,
                deadline_ms=due_ms(now, 10.0),
            )
        check_timers(lot)
        for slot in lot.expired(now):
            assert lot.wake(slot, Reason.TIMEOUT, now)
        check_timers(lot)


# -- Column ---------------------------------------------------------------------------------


def test_column_grows_keeping_its_values() -> None:
    column = Column("Q")
    column.reserve(10)
    column.view[7] = 1 << 63
    for size in (2000, 70_000, 1 << 20):
        column.reserve(size)
        assert len(column) >= size
        assert column.view[7] == 1 << 63
        assert column.view[size - 1] == 0
    column.close()
    assert len(column) == 0


def test_column_that_cannot_grow_in_place_stays_usable() -> None:
    """``reserve`` releases its view before ``mmap.resize``: if the resize fails
    with BufferError (any other export of the map alive, e.g. a slice of the
    view someone kept), the column is left with a released view and every later
    access raises ValueError: the lot's packed table (or the mirror's store)
    would be unusable from then on. It should fall back to a copy, or at least
    leave the old view working."""
    column = Column("q")
    column.reserve(4)
    column.view[3] = -5
    kept = column.view[0:4]  # another export of the same map
    try:
        column.reserve(1 << 16)
    except BufferError:
        pass  # refusing is acceptable; breaking the column is not
    assert column.view[3] == -5
    kept.release()


@pytest.mark.parametrize("entries", [1, 1023, 1024, 1025, 5000])
def test_column_fallback_copy_keeps_values(monkeypatch: pytest.MonkeyPatch, entries: int) -> None:
    """No mremap (macOS, BSD): grown by a copy into a new map."""
    import mmap

    import connpark._column as column_module

    class NoRemap(mmap.mmap):
        def resize(self, newsize: int) -> None:
            raise SystemError("mmap: resizing not available--no mremap()")

    def anonymous(size: int) -> mmap.mmap:
        return NoRemap(-1, size, flags=mmap.MAP_PRIVATE)

    monkeypatch.setattr(column_module, "_anonymous", anonymous)
    column = Column("I")
    column.reserve(entries)
    for i in range(entries):
        column.view[i] = i * 7 + 1
    column.reserve(entries * 3)
    assert all(column.view[i] == i * 7 + 1 for i in range(entries))
    assert column.view[entries * 3 - 1] == 0
    column.close()


def test_unpack_keeps_tokens_and_the_parker() -> None:
    lot = Lot()
    a = session(lot)
    b = session(lot)
    x = lot.park(3, token=b"tok", pending=b"pend", flags=0, session=b, deadline_ms=5000)
    pack_now(lot, 0.0)
    got = lot.by_fd(3)
    assert got is not None
    assert got is not x
    assert (got.token, got.pending, got.session, got.ticket) == (b"tok", b"pend", b, x.ticket)
    assert lot.wake(got, Reason.READABLE, 1.0)
    assert got.session is b  # to its parker, as an object would
    assert a.outq == []
    assert math.isfinite(got.key)


# -- pack: what it looks at --------------------------------------------------------------


class _CountingList(list):  # type: ignore[type-arg]
    """The by-fd table, counting the entries a full scan walks."""

    walked = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        for item in super().__iter__():
            _CountingList.walked += 1
            yield item


@pytest.mark.parametrize("rounds", [1, 300])  # 300: more listed than the table holds
def test_a_park_and_wake_storm_packs_nothing(rounds: int) -> None:
    """The same fds parked and woken over and over between packs (what a busy worker
    does): whatever a pack finds parked was parked since the last one, so it is
    marked, not packed; packing it would only mean unpacking it a moment later."""
    lot = Lot(window=1 << 20)
    a = session(lot)
    now = 0.0
    for _ in range(4):
        for _ in range(rounds):
            slots, _ = lot.park_many(
                a, *zip(*[(fd, b"", b"", 0, 60_000) for fd in range(3, 256)], strict=True)
            )
            tickets = [x.ticket for x in slots]
            lot.written(lot.unpark(a, tickets, now))
            lot.take_outq(a)
            lot.take_acked(a, tickets, now)
        lot.park_many(a, *zip(*[(fd, b"", b"", 0, 60_000) for fd in range(3, 256)], strict=True))
        now += 1.0
        assert lot.pack(now) == 0
        assert lot.packed == 0
        woke = lot.unpark(a, [lot.by_fd(fd).ticket for fd in range(3, 256)], now)  # type: ignore[union-attr]
        assert len(woke) == 253
        lot.written(lot.take_outq(a))
        lot.take_acked(a, [x.ticket for x in woke], now)
    check_lot(lot, [])


def test_pack_looks_at_its_candidates_not_at_every_fd() -> None:
    """``pack`` runs every second while one parked object may be packable, and walks
    the whole by-fd table each time: with a million packed connections and a park a
    second, ~20 ms of the event loop per second (bench: 1M packed, one candidate,
    20 ms; the first pack after a burst of 1M parks, 230 ms), during which no wake,
    PARKED or ACK moves. Its work should follow the new parks, not the parked count."""
    lot = Lot(window=1 << 20)
    a = session(lot)
    lot.park_many(a, *zip(*[(fd, b"", b"", 0, 60_000) for fd in range(3, 20_003)], strict=True))
    assert pack_now(lot, 0.0) == 20_000
    lot._by_fd = _CountingList(lot._by_fd)
    _CountingList.walked = 0
    park(lot, 1, a)
    assert pack_now(lot, 1.0) == 1
    assert _CountingList.walked <= 1000, f"pack walked {_CountingList.walked} fds for 1 park"


def test_restored_connections_are_packed_too() -> None:
    """After a crash or an upgrade every connection comes back through ``restore``;
    those under their own fd number are meant to be packed (the docstring of
    ``pack``), but ``restore`` does not count them as candidates: no ``pack`` is
    scheduled until some new park comes, and they stay ~200 B objects."""
    lot = Lot()
    for fd in range(3, 103):
        lot.restore(
            7 << EPOCH_SHIFT | 1 << FD_BITS | fd,
            fd,
            token=b"",
            pending=b"",
            flags=0,
            pool="p",
            deadline_ms=60_000,
        )
    assert lot.next_pack() is not None, "no pack scheduled for 100 restored parks"
    assert pack_now(lot, 1.0) == 100


def test_connections_restored_under_another_fd_number_are_packed_too() -> None:
    """A restarted or upgraded shard gets its connections back from the mirror under
    new fd numbers: in practice every restored ticket is an alias (the e2e test
    ``test_packed_connections_survive_a_shard_crash_and_keep_their_tickets``: 0 of
    40 packed after a crash). ``pack`` skips aliases, so after the first
    ``connpark upgrade`` the whole population is ~200 B objects again (plus an
    ``_alias`` entry each): the memory the change promises lasts until the next
    upgrade."""
    lot = Lot()
    restored = [
        lot.restore(
            7 << EPOCH_SHIFT | 1 << FD_BITS | (fd + 500),
            fd,
            token=b"t",
            pending=b"",
            flags=0,
            pool="p",
            deadline_ms=60_000,
        )
        for fd in range(3, 103)
    ]
    pack_now(lot, 1.0)
    assert lot.packed == 100
    for slot in restored:  # and each is still found by its ticket, as it was
        found = lot.find(slot.ticket)
        assert found is not None
        assert (found.fd, found.ticket, found.token) == (slot.fd, slot.ticket, b"t")
    s = session(lot)
    lot.pack(2.0)
    woke = lot.unpark(s, [restored[0].ticket], 3.0)
    assert [x.ticket for x in woke] == [restored[0].ticket]
    assert lot.find(restored[1].ticket) is not None
