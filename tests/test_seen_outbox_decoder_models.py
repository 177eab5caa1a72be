"""Models checked against ``Lot.pack``'s SEEN mark, ``Lot.next_due``, the Outbox and the Decoder.

- SEEN (a flag bit of ``Slot.flags``) never reaches the wire, the packed flags
  column or an unpacked slot; a pack packs exactly what the pack before found
  PARKED, plain and confirmed (the very object: a young connection at the fd
  of an old, SEEN one is new to ``pack``); ``_fresh`` stays bounded;
  ``next_due`` is the earliest of the idle deadlines, the orphans and the pack.
- ``Outbox`` (a state machine over a real socketpair with a small send
  buffer, so sends are partial): every byte goes out once and in order, whole
  frames only (a dropped frame is dropped whole), each fd with its frame's
  first byte; with ``own_fds`` every dup is closed exactly once (the process's
  open fd count is exactly what the outbox should hold), without it the
  outbox closes nothing; each tag comes back exactly once (``take_sent`` or
  ``take_unstarted``); ``queued_bytes``/``queued_frames`` match the chunks.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import socket
import struct
from collections import Counter
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import connpark._wire as wire
from connpark import LocalProtocolError
from connpark._encode import _plain_wake, wake_frames
from connpark._fdpass import Outbox, recv_fds
from connpark._lot import (
    _PACKED,
    HANGUP_RETURNS,
    INET6,
    SEEN,
    TIMEOUT_RETURNS,
    UNCONFIRMED,
    Lot,
    Slot,
    State,
)
from connpark._wire import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_MESSAGE,
    MAX_FDS_PER_FRAME,
    Decoder,
    Frame,
    Message,
    MessageType,
    Reason,
    close_fds,
    message_fds,
)

from .conftest import model_settings, open_fd_count
from .test_lot import check_lot, park, session
from .test_lot_packing import PackingLotMachine, check_timers
from .test_wire import (
    FUZZ,
    FdSource,
    _byte_ops,
    _fd_ops,
    _frame_ops,
    drive,
    list_messages,
    messages,
    mutated_stream,
    needs_proc,
)

# -- Lot: SEEN ---------------------------------------------------------------------------


def _confirmed_park(lot: Lot, fd: int, flags: int = 0) -> Slot:
    a = lot.pools["a"].sessions[0] if "a" in lot.pools else session(lot, "a")
    slot = park(lot, fd, a, deadline=100.0, flags=flags | UNCONFIRMED)
    Lot.confirm([slot])
    return slot


@pytest.mark.parametrize("flags", [0, HANGUP_RETURNS, TIMEOUT_RETURNS, INET6, 7])
def test_seen_changes_no_wake_bytes_no_returns_and_no_packed_flags(flags: int) -> None:
    """A woken slot may carry SEEN (its pack marked it): its WAKE is the same bytes
    as without, ``returns_fd`` the same; packed and unpacked, the flags have no SEEN."""
    lot = Lot(window=1 << 20)
    marked = _confirmed_park(lot, 5, flags)
    lot.pack(1.0)
    assert marked.state is State.PARKED
    assert marked.flags & SEEN  # marked, not packed
    same = _confirmed_park(lot, 6, flags)  # never seen by a pack
    for slot in (marked, same):
        slot.reason = Reason.TIMEOUT
        slot.token = slot.pending = b""  # plain entries: 16 bytes, the ticket first
    assert _plain_wake([marked])[-8:] == _plain_wake([same])[-8:]  # reason, flags, lengths
    one = wake_frames([marked], 1 << 16)[0][0].data
    other = wake_frames([same], 1 << 16)[0][0].data
    assert one[:-16] == other[:-16]
    assert one[-8:] == other[-8:]
    for reason in Reason:
        assert marked.returns_fd(reason) == same.returns_fd(reason)
    lot.pack(2.0)  # packs the marked one; marks the other
    assert lot._by_fd[5] is _PACKED
    assert lot._pflags[5] == flags  # the column keeps the slot's flags, less SEEN
    back = lot.by_fd(5)
    assert back is not None
    assert back.flags == flags
    check_lot(lot)


def test_a_young_connection_at_the_fd_of_a_seen_one_waits_its_own_two_packs() -> None:
    """The old object at fd 5 is SEEN, then woken and ACKed; a new connection
    parks at fd 5 (in ``_fresh`` twice now): the next pack marks it, never packs it."""
    lot = Lot(window=1 << 20)
    a = session(lot, "a")
    old = park(lot, 5, a, deadline=100.0)
    lot.pack(1.0)
    assert old.flags & SEEN
    woke = lot.unpark(a, [old.ticket], 1.5)
    lot.written(lot.take_outq(a))
    done, fds = lot.take_acked(a, [x.ticket for x in woke], 1.5)
    assert done == [old]
    assert fds == [5]
    young = park(lot, 5, a, deadline=100.0, flags=UNCONFIRMED)
    assert lot.pack(2.0) == 0  # unconfirmed: not marked either
    assert not young.flags & SEEN
    Lot.confirm([young])
    assert lot.pack(3.0) == 0  # confirmed since the last pack: marked now
    assert young.state is State.PARKED
    assert young.flags & SEEN
    assert lot.pack(4.0) == 1
    assert young.state is State.MOVED
    again = lot.by_fd(5)
    assert again is not None
    assert again.ticket == young.ticket
    assert not again.flags & SEEN
    assert lot.pack(5.0) == 0  # unpacked: new to ``pack`` again
    assert lot.pack(6.0) == 1
    check_lot(lot, [again])


def _old_next_timer(lot: Lot) -> float:
    """The container's ``_next_timer`` before ``Lot.next_due`` replaced it."""
    times = [t for t in (lot.next_deadline(), lot.next_orphan_deadline()) if t is not None]
    pack_at = lot.next_pack()
    if pack_at is not None:
        times.append(pack_at)
    return min(times) if times else math.inf


class SeenPackingMachine(PackingLotMachine):
    """``PackingLotMachine``, every ``pack`` call checked against a model of SEEN:
    it packs exactly the objects the pack before found PARKED, plain and
    confirmed, that are still parked objects (the very objects: not a young
    connection at one of their fds)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[int, Slot] = {}  # id -> object (kept alive: ids stay unique)
        self.lot.pack = self._checked_pack  # type: ignore[method-assign]

    def _objects(self) -> list[Slot]:
        return [
            s
            for s in self.lot._by_fd
            if s is not None and s is not _PACKED and s.state is State.PARKED
        ]

    def _checked_pack(self, now: float) -> int:
        lot = self.lot
        objects = self._objects()
        n = Lot.pack(lot, now)
        packed = [x for x in objects if x.state is State.MOVED]
        assert n == len(packed)
        for x in packed:
            assert id(x) in self._seen, f"fd {x.fd}: packed, but the pack before did not see it"
            assert not x.flags & UNCONFIRMED
        for x in self._seen.values():
            if any(x is y for y in objects) and x.extra is None:
                assert x.state is State.MOVED, f"fd {x.fd}: seen parked, still parked, not packed"
        self._seen = {
            id(x): x
            for x in objects
            if x.state is State.PARKED and not x.flags & UNCONFIRMED and x.extra is None
        }
        assert len(lot._fresh) <= len(lot._by_fd), "_fresh outgrew the table"
        for fd in lot._fresh:  # what the next pack looks at: parked objects only
            slot = lot._by_fd[fd]
            assert slot is not None
            assert slot is not _PACKED
            assert slot.state is State.PARKED
        return n

    @rule()
    def pack_once(self) -> None:
        self.lot.pack(self.now)
        self._refresh()

    @rule(dt=st.sampled_from([0.25, 0.5, 1.0, 2.0]))
    def later(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def no_seen_outside_objects(self) -> None:
        lot = self.lot
        for fd, slot in enumerate(lot._by_fd):
            if slot is _PACKED:
                assert not lot._pflags[fd] & SEEN
                assert not lot._pflags[fd] & UNCONFIRMED
            elif slot is not None and slot.state is State.PARKED and slot.flags & SEEN:
                # (a woken slot may keep its SEEN: nothing reads it there)
                assert not slot.flags & UNCONFIRMED
                assert fd in lot._fresh  # the next pack packs it: it must look at it

    @invariant()
    def next_due_is_the_old_timer(self) -> None:
        assert self.lot.next_due() == _old_next_timer(self.lot)


TestSeenPackingMachine = SeenPackingMachine.TestCase
TestSeenPackingMachine.settings = model_settings("CONNPARK_LOT_EXAMPLES", 200, 60)


def _columns(fds: range) -> tuple[range, list[bytes], list[bytes], list[int], list[int]]:
    """``park_many``'s columns for plain fds, unconfirmed, one minute each."""
    n = len(fds)
    return fds, [b""] * n, [b""] * n, [UNCONFIRMED] * n, [60_000] * n


def test_fresh_stays_bounded_while_a_parker_never_reads_its_parked() -> None:
    """Unconfirmed for ever (a worker that does not read): the same fds parked and
    woken many times between packs; ``_fresh`` never grows past the table."""
    lot = Lot(window=1 << 20)
    a = session(lot, "a")
    now = 0.0
    for _ in range(20):
        for _ in range(30):
            slots, _ = lot.park_many(a, *_columns(range(3, 40)))
            lot.unpark(a, [x.ticket for x in slots], now)
            lot.written(lot.take_outq(a))
            lot.take_acked(a, [x.ticket for x in slots], now)
        lot.park_many(a, *_columns(range(3, 40)))
        now += 1.0
        assert lot.pack(now) == 0
        assert len(lot._fresh) <= len(lot._by_fd)
        lot.unpark(a, [lot.by_fd(fd).ticket for fd in range(3, 40)], now)  # type: ignore[union-attr]
        lot.written(lot.take_outq(a))
        lot.take_acked(a, list(a.inflight), now)
    check_timers(lot)


# -- Outbox ------------------------------------------------------------------------------

_SEQ = struct.Struct("!II")  # a test frame: its number, its length (whole), then filler


def _inode(fd: int) -> tuple[int, int]:
    st_ = os.fstat(fd)
    return st_.st_dev, st_.st_ino


class OutboxMachine(RuleBasedStateMachine):
    own_fds = True

    def __init__(self) -> None:
        super().__init__()
        self.before = open_fd_count()
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.a.setblocking(False)
        self.b.setblocking(False)
        pipes = [os.pipe() for _ in range(2)]
        self.files = [fd for pair in pipes for fd in pair]  # the caller's: distinct files
        self.base = open_fd_count()
        self.ob = Outbox(own_fds=self.own_fds)
        self.seq = itertools.count()
        #: seq -> (its bytes, the inodes of its fds, its tag)
        self.frames: dict[int, tuple[bytes, list[tuple[int, int]], object]] = {}
        self.order: list[int] = []
        self.rx = bytearray()
        #: Each read that brought fds: (its first offset, its end, their inodes).
        self.rx_fds: list[tuple[int, int, list[tuple[int, int]]]] = []
        self.sent_tags: list[object] = []
        self.dropped_tags: list[object] = []
        self.closed = False
        self.peer_gone = False

    # rules

    @precondition(lambda self: not self.closed)
    @rule(
        specs=st.lists(
            st.tuples(
                st.sampled_from([8, 9, 100, 3000, 9000, 40_000]),
                st.integers(0, 3),
                st.booleans(),
            ),
            min_size=1,
            max_size=5,
        ),
        tags_given=st.booleans(),
    )
    def add(self, specs: list[tuple[int, int, bool]], tags_given: bool) -> None:
        frames, tags = [], []
        for size, nfds, tagged in specs:
            n = next(self.seq)
            data = _SEQ.pack(n, size) + bytes([n % 251]) * (size - _SEQ.size)
            fds = tuple(self.files[(n + i) % len(self.files)] for i in range(nfds))
            tag = ("tag", n) if tagged and tags_given else None
            frames.append(Frame(data, fds))
            tags.append(tag)
            self.frames[n] = (data, [_inode(fd) for fd in fds], tag)
            self.order.append(n)
        self.ob.add(frames, tags if tags_given else None)

    @precondition(lambda self: not self.closed)
    @rule()
    def send(self) -> None:
        try:
            self.ob.send_some(self.a)
        except BlockingIOError:
            pass
        except OSError as exc:
            errno_ = exc.errno
            assert self.peer_gone
            assert errno_ in (errno.EPIPE, errno.ECONNRESET)

    @precondition(lambda self: not self.peer_gone)
    @rule()
    def drain(self) -> None:
        while True:
            try:
                data, fds = recv_fds(self.b)
            except BlockingIOError:
                return
            if not data:
                return
            if fds:
                end = len(self.rx) + len(data)
                self.rx_fds.append((len(self.rx), end, [_inode(fd) for fd in fds]))
                for fd in fds:
                    os.close(fd)
            self.rx += data

    @rule()
    def take_sent(self) -> None:
        self.sent_tags += self.ob.take_sent()

    @precondition(lambda self: not self.closed)
    @rule(only_tagged=st.booleans(), keep=st.sampled_from([None, 0, 1, 2]))
    def take_unstarted(self, only_tagged: bool, keep: int | None) -> None:
        keep_tag = None if keep is None else (lambda tag: tag is not None and tag[1] % 3 == keep)  # type: ignore[index]
        _, tags = self.ob.take_unstarted(only_tagged=only_tagged, keep_tag=keep_tag)
        assert None not in tags
        self.dropped_tags += tags

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self) -> None:
        self.sent_tags += self.ob.take_sent()
        self.ob.close()
        self.closed = True

    @precondition(lambda self: not self.peer_gone)
    @rule()
    def peer_closes(self) -> None:
        self.drain()
        self.b.close()
        self.peer_gone = True

    # invariants

    @invariant()
    def accounting(self) -> None:
        chunks = self.ob._chunks
        assert self.ob.queued_bytes == sum(len(c[0]) for c in chunks)
        assert self.ob.queued_frames == sum(c[3] for c in chunks)
        assert bool(self.ob) == bool(chunks)
        assert all(c[3] >= 1 for c in chunks)
        # (Our copies of a frame half sent stay open until it is all out.)
        part = self.ob._part or ()
        held = sum(len(c[1]) for c in chunks) + len(part) if self.own_fds else 0
        if part:
            assert len(chunks) >= 1, "a half-sent frame outlived its chunk"
            assert not chunks[0][1], "its fds went with its first byte"
        base = self.base - self.peer_gone  # (the peer's socket was one of ours)
        assert open_fd_count() == base + held, "a dup leaked or was closed twice"
        for fd in self.files:
            os.fstat(fd)  # the caller's fds: never closed by the outbox

    # the end

    def teardown(self) -> None:
        try:
            if not self.closed and not self.peer_gone:
                while self.ob:
                    self.send()
                    self.drain()
                self.drain()
                self.take_sent()
                assert (self.ob.queued_bytes, self.ob.queued_frames) == (0, 0)
            elif not self.peer_gone:
                self.drain()
            self.take_sent()
            if not self.closed:
                self.ob.close()
            assert open_fd_count() == self.base - self.peer_gone
            self._check_stream()
        finally:
            self.a.close()
            if not self.peer_gone:
                self.b.close()
            for fd in self.files:
                os.close(fd)  # strict: EBADF means the outbox closed one of ours
        assert open_fd_count() == self.before

    def _check_stream(self) -> None:
        """What arrived: whole frames in order (the last may be cut short only if the
        outbox was closed or the peer left), each fd with its frame's first byte."""
        pos, got, last = 0, [], -1
        starts: dict[int, int] = {}
        rx = bytes(self.rx)
        while pos < len(rx):
            if len(rx) - pos < _SEQ.size:
                assert self.closed or self.peer_gone, "a frame cut short"
                break
            n, size = _SEQ.unpack_from(rx, pos)
            assert n > last, "frames out of order or twice"
            data = self.frames[n][0]
            part = rx[pos : pos + size]
            assert data.startswith(part)
            if len(part) < size:
                assert self.closed or self.peer_gone, "a frame cut short"
            starts[pos] = n
            got.append(n)
            last = n
            pos += size
        # (A read may glue fd-less bytes before the bytes that brought fds: the
        # fds came with the one frame with fds that starts in that read.)
        came = set()
        for off, end, inodes in self.rx_fds:
            ns = [n for s, n in starts.items() if off <= s < end and self.frames[n][1]]
            assert len(ns) == 1, "fds arrived without their frame's first byte"
            assert self.frames[ns[0]][1] == inodes, "fds arrived with the wrong frame"
            came.add(ns[0])
        with_fds = {n for n in got if self.frames[n][1]}
        assert with_fds == came, "a frame's fds never came"
        # Tags: each once; the frames that went out, in order, from take_sent.
        tagged_out = [self.frames[n][2] for n in got if self.frames[n][2] is not None]
        assert self.sent_tags == tagged_out, "take_sent is not the tagged frames that went out"
        assert not set(self.sent_tags) & set(self.dropped_tags), "a tag reported twice"
        for tag in self.dropped_tags:
            assert tag[1] not in got  # type: ignore[index]
        missing = [
            n
            for n in self.order
            if n not in got and self.frames[n][2] is not None
            if self.frames[n][2] not in self.dropped_tags
        ]
        assert not missing or self.closed or self.peer_gone, f"tagged frames lost: {missing}"


TestOutboxMachine = OutboxMachine.TestCase
TestOutboxMachine.settings = model_settings("CONNPARK_OUTBOX_EXAMPLES", 150, 40)


class OutboxNoDupMachine(OutboxMachine):
    own_fds = False


TestOutboxNoDupMachine = OutboxNoDupMachine.TestCase
TestOutboxNoDupMachine.settings = TestOutboxMachine.settings


# -- Decoder: every option, every limit ---------------------------------------------------

_decoder_options = st.fixed_dictionaries(
    {
        "join_split": st.booleans(),
        "lean_park": st.booleans(),
        "rows": st.booleans(),
        "max_entries": st.sampled_from([DEFAULT_MAX_ENTRIES, 1, 3, 10]),
        "max_message": st.sampled_from([DEFAULT_MAX_MESSAGE, 40, 200, 1000]),
        "max_body": st.sampled_from([DEFAULT_MAX_BODY, 100, 300]),
        "max_fds_per_frame": st.sampled_from([MAX_FDS_PER_FRAME, 2, 5]),
        "lean_limits": st.sampled_from([(0xFFFF, 0xFFFF_FFFF), (3, 3), (0, 0)]),
    }
)


@pytest.mark.linux
@needs_proc
@settings(FUZZ, max_examples=int(os.environ.get("CONNPARK_DECODER_EXAMPLES", "1500")))
@given(
    st.lists(st.one_of(list_messages, messages), min_size=1, max_size=4),
    st.sampled_from([(DEFAULT_MAX_BODY, MAX_FDS_PER_FRAME), (120, 2), (256, 1), (60, 1)]),
    st.lists(st.one_of(_frame_ops, _byte_ops, _fd_ops), max_size=4),
    st.lists(st.integers(0, 3000), max_size=5),
    st.booleans(),
    _decoder_options,
)
def test_decoder_fd_ownership_with_every_option_and_limit(
    templates: list[Message],
    limits: tuple[int, int],
    ops: list[tuple[str, int, int]],
    cuts: list[int],
    eof: bool,
    options: dict[str, object],
) -> None:
    """The fast path (an unsplit frame) and the split path (FLAG_MORE, joined or
    not), lean PARK or not, over small limits: every fd the decoder got is handed
    out once or closed once by it, never both, never twice."""
    before = open_fd_count()
    src = FdSource()
    try:
        chunks = mutated_stream(src, templates, limits, ops, cuts)
    except LocalProtocolError:  # (an entry over the frame limit: nothing to decode)
        close_fds(src.made)
        src.close()
        return
    dec = Decoder(**options)  # type: ignore[arg-type]
    closed: list[int] = []
    real_close = wire.close_fds

    def recording_close(fds: Iterable[int]) -> None:
        fds = list(fds)
        closed.extend(fds)
        real_close(fds)

    wire.close_fds = recording_close  # type: ignore[assignment]
    try:
        run = drive(dec, chunks, eof=eof)
        handed = [fd for m in run.messages for fd in message_fds(m)]
        held = dec.held_fds
        closed_before = len(closed)
        dec.close()
    finally:
        wire.close_fds = real_close  # type: ignore[assignment]
    assert len(closed) - closed_before == held, "held_fds is not what close() closes"
    if run.error is not None:
        assert held == 0
    counts = Counter(handed) + Counter(closed)
    assert [fd for fd, n in counts.items() if n > 1] == [], "an fd handed out or closed twice"
    assert set(counts) == set(run.given), "an fd lost, or one the decoder never got"
    for fd in handed:
        os.close(fd)  # strict
    for fd in src.made:
        if fd not in run.given:
            os.close(fd)
    src.close()
    assert open_fd_count() == before


def test_decoder_options_fix_its_type_table() -> None:
    """``_kinds`` is chosen at construction (and shared): decoders with other
    options do not share one, and one decoder's table serves every type."""
    plain_, lean, rows = Decoder(), Decoder(lean_park=True), Decoder(rows=True)
    assert plain_._kinds is Decoder()._kinds
    assert len({id(plain_._kinds), id(lean._kinds), id(rows._kinds)}) == 3
    assert Decoder(lean_park=True, lean_limits=(1, 2))._kinds is not lean._kinds
    assert set(plain_._kinds) == {int(t) for t in MessageType}


def test_outbox_reused_after_close_reports_its_next_tag() -> None:
    """``close()`` with a chunk half sent forgets that too: the next head chunk is a
    new one (its tag reported, ``take_unstarted`` takes it)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    try:
        outbox = Outbox(own_fds=False)
        outbox.add([Frame(b"x" * 1_000_000)], ["big"])
        with pytest.raises(BlockingIOError):
            outbox.send_some(a)  # half sent
        assert outbox.take_sent() == ["big"]
        outbox.close()
        outbox.add([Frame(b"y")], ["small"])
        assert outbox.take_unstarted() == (True, ["small"])
    finally:
        a.close()
        b.close()
