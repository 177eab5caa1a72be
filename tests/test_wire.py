"""Wire codec (sans-IO) tests, h11 style.

- golden bytes for every message type (they pin the layout in docs/protocol.md);
- Hypothesis round trips for every message, including splits over FLAG_MORE;
- every message decoded whole, one byte at a time, at random cut points and
  followed by another message;
- fuzzing (random bytes, random frames, mutated valid streams): only
  RemoteProtocolError ever comes out, and no fd is leaked or closed twice;
- one test per decoder error, and the decoder stays broken with its fds closed.

fds are real (dups of a pipe) and the test that creates them closes them. The
pure codec passes fd numbers through, so a decoded message equals the one
encoded. Closes in the tests are strict (no ``except OSError``): an EBADF there
means the codec closed an fd it did not own.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import struct
import sys
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from connpark import LocalProtocolError, RemoteProtocolError
from connpark._wire import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_ENTRIES,
    FLAG_MORE,
    HEADER,
    MAX_FDS_PER_FRAME,
    MAX_RESUME_TICKETS,
    MAX_TOKEN,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Ack,
    Close,
    CloseEntry,
    Decoder,
    Error,
    ErrorCode,
    Frame,
    Hello,
    LeanPark,
    Message,
    MessageType,
    Park,
    Parked,
    ParkedRows,
    ParkEntry,
    ParkResult,
    Reason,
    Refusal,
    Result,
    Rule,
    RuleKind,
    Rules,
    Send,
    Stats,
    StatsReply,
    Tagged,
    TagOp,
    Unpark,
    Wake,
    WakeEntry,
    WakeRows,
    Welcome,
    close_fds,
    encode,
    encode_all,
    encode_park,
    encode_park_entry,
    mark_resent,
    message_fds,
)

LINUX = sys.platform.startswith("linux")


#: For tests that count /proc/self/fd (with ``@pytest.mark.linux``).
needs_proc = pytest.mark.skipif(not LINUX, reason="counts fds in /proc/self/fd")


FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ------------------------------------------------------------------ helpers

#: fd placeholder in strategies; replaced by a real fd in the test.
FD = -1


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
        return False
    return True


@contextlib.contextmanager
def real_fds(n: int) -> Iterator[list[int]]:
    """n distinct real fds, closed strictly at the end (EBADF = the codec closed one)."""
    r, w = os.pipe()
    fds = [os.dup(r if i % 2 else w) for i in range(n)]
    try:
        yield fds
    finally:
        for fd in [*fds, r, w]:
            os.close(fd)


class FdSource:
    """Hands out dups of one pipe and remembers them, for tests where fds get lost."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.made: list[int] = []

    def take(self, n: int) -> list[int]:
        fds = [os.dup(self.r) for _ in range(n)]
        self.made += fds
        return fds

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def fd_slots(msg: Message) -> int:
    return len(message_fds(msg))


def with_fds(msg: Message, fds: Iterable[int]) -> Message:
    """``msg`` with its fd placeholders replaced, in wire order, by ``fds``."""
    it = iter(fds)
    out: Message = msg
    if isinstance(msg, Park):
        out = attrs.evolve(msg, entries=tuple(attrs.evolve(e, fd=next(it)) for e in msg.entries))
    elif isinstance(msg, Wake):
        out = attrs.evolve(
            msg,
            entries=tuple(e if e.fd is None else attrs.evolve(e, fd=next(it)) for e in msg.entries),
        )
    assert next(it, None) is None, "more fds than slots"
    return out


def plain(msg: Message) -> Message:
    """A message from ``Decoder(rows=True)`` as the plain decoder gives it."""
    if isinstance(msg, WakeRows):
        return Wake(msg.entries)
    if isinstance(msg, ParkedRows):
        return Parked(msg.request_id, msg.results)
    return msg


def stream(frames: Sequence[Frame]) -> tuple[bytes, list[tuple[int, list[int]]]]:
    """Concatenate frames; each frame's fds are marked at the offset of its first byte."""
    blob = bytearray()
    marks: list[tuple[int, list[int]]] = []
    for f in frames:
        if f.fds:
            marks.append((len(blob), list(f.fds)))
        blob += f.data
    return bytes(blob), marks


def chunked(
    blob: bytes, marks: Sequence[tuple[int, list[int]]], cuts: Iterable[int]
) -> list[tuple[bytes, list[int]]]:
    """Cut ``blob`` at ``cuts``; fds go with the chunk holding their mark's byte."""
    bounds = sorted({0, len(blob), *(c for c in cuts if 0 < c < len(blob))})
    chunks: list[tuple[bytes, list[int]]] = [
        (blob[a:b], []) for a, b in itertools.pairwise(bounds)
    ] or [(b"", [])]
    for off, fds in marks:
        i = min(max(bisect_right(bounds, off) - 1, 0), len(chunks) - 1)
        chunks[i][1].extend(fds)
    return chunks


def bytewise(frames: Sequence[Frame]) -> list[tuple[bytes, list[int]]]:
    blob, marks = stream(frames)
    return chunked(blob, marks, range(len(blob)))


def decode_all(
    chunks: Iterable[tuple[bytes, Sequence[int]]], dec: Decoder | None = None
) -> list[Message]:
    dec = Decoder() if dec is None else dec
    out: list[Message] = []
    for data, fds in chunks:
        dec.receive_data(data, fds)
        out.extend(dec)
    dec.eof()
    assert dec.held_fds == 0
    assert dec.buffered == 0
    return out


def headers(frames: Sequence[Frame]) -> list[tuple[int, int, int, int]]:
    out = []
    for f in frames:
        length, mtype, flags, nfds = HEADER.unpack_from(f.data)
        assert len(f.data) == HEADER.size + length
        assert nfds == len(f.fds)
        out.append((length, mtype, flags, nfds))
    return out


def check_framing(
    msg: Message,
    frames: Sequence[Frame],
    *,
    max_body: int = DEFAULT_MAX_BODY,
    max_fds: int = MAX_FDS_PER_FRAME,
) -> None:
    """What every encoding must look like: one type, FLAG_MORE on all but the last."""
    hs = headers(frames)
    assert hs
    assert len({mtype for _, mtype, _, _ in hs}) == 1
    for i, (length, _, flags, nfds) in enumerate(hs):
        assert length <= max_body
        assert nfds <= max_fds
        assert flags == (FLAG_MORE if i < len(hs) - 1 else 0)
    assert [fd for f in frames for fd in f.fds] == message_fds(msg)
    if not isinstance(msg, (Park, Parked, Wake, Ack, Unpark, Close)):
        assert len(frames) == 1


# --------------------------------------------------------------- strategies

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
small_bytes = st.binary(max_size=40)
# 63 code points are at most 252 UTF-8 bytes; the 255-byte edge has its own test.
short_text = st.text(max_size=63)


T = TypeVar("T")


def tuples_of(elem: st.SearchStrategy[T], max_size: int) -> st.SearchStrategy[tuple[T, ...]]:
    return st.lists(elem, max_size=max_size).map(tuple)


hellos = st.builds(Hello, version=u16, pool=short_text, name=short_text)
welcomes = st.builds(
    Welcome, session_id=u64, max_token=u32, max_pending=u32, max_fds_per_frame=u16, window=u32
)
park_entries = st.builds(
    ParkEntry,
    fd=st.just(FD),
    token=small_bytes,
    pending=small_bytes,
    idle_timeout_ms=u32,
    hangup_returns=st.booleans(),
    timeout_returns=st.booleans(),
    rules=st.sampled_from([0, 0, 1, 0xFFFF]),
    tags=tuples_of(st.binary(max_size=8), 2),
    resent=st.booleans(),
)
parks = st.builds(Park, request_id=u32, entries=tuples_of(park_entries, 8))
parkeds = st.builds(
    Parked,
    request_id=u32,
    results=tuples_of(st.builds(ParkResult, refusal=st.sampled_from(Refusal), ticket=u64), 20),
)
wake_entries = st.builds(
    WakeEntry,
    ticket=u64,
    reason=st.sampled_from(Reason),
    token=small_bytes,
    pending=small_bytes,
    fd=st.sampled_from([None, FD]),
    autoresponses=st.sampled_from([0, 0, 1, 0xFFFF_FFFF]),
    last_autoresponse_ms=st.sampled_from([0, 0, 1_700_000_000_000]),
    unsent=st.binary(max_size=8),
)
wakes = st.builds(Wake, entries=tuples_of(wake_entries, 8))
acks = st.builds(Ack, tickets=tuples_of(u64, 50))
unparks = st.builds(Unpark, tickets=tuples_of(u64, 50))
closes = st.builds(
    Close, entries=tuples_of(st.builds(CloseEntry, ticket=u64, goodbye=small_bytes), 10)
)
stats = st.just(Stats())
stats_replies = st.builds(StatsReply, body=st.binary(max_size=200))
errors = st.builds(Error, code=st.sampled_from(ErrorCode) | u16, text=st.text(max_size=60))

rules_msgs = st.builds(
    Rules,
    request_id=u32,
    set_id=u16,
    rules=tuples_of(
        st.builds(
            Rule,
            kind=st.sampled_from(RuleKind),
            match=small_bytes,
            reply=small_bytes,
            resets_idle=st.booleans(),
        ),
        4,
    ),
    pool_scope=st.booleans(),
)
results = st.builds(
    Result, request_id=u32, refusal=st.sampled_from(Refusal), written=u32, woken=u32, missed=u32
)
sends = st.builds(
    Send, request_id=u32, data=small_bytes, tickets=tuples_of(u64, 5), tag=small_bytes
)
taggeds = st.builds(Tagged, op=st.sampled_from(TagOp), tag=small_bytes, goodbye=small_bytes)

#: WAKEs the bulk path decodes: no token, pending or v3 tail.
plain_wakes = st.builds(
    Wake,
    entries=tuples_of(
        st.builds(
            WakeEntry,
            ticket=u64,
            reason=st.sampled_from(Reason),
            fd=st.sampled_from([None, FD, FD]),
            inet6=st.booleans(),
        ),
        8,
    ),
)


list_messages = st.one_of(parks, parkeds, wakes, plain_wakes, acks, unparks, closes)
messages = st.one_of(
    hellos,
    welcomes,
    parks,
    parkeds,
    wakes,
    plain_wakes,
    acks,
    unparks,
    closes,
    stats,
    stats_replies,
    errors,
    rules_msgs,
    results,
    sends,
    taggeds,
)


@st.composite
def big_parks(draw: st.DrawFn) -> Park:
    """A PARK with more than 253 fds (built from a few templates, to stay cheap)."""
    n = draw(st.integers(MAX_FDS_PER_FRAME + 1, 3 * MAX_FDS_PER_FRAME + 10))
    templates = draw(st.lists(park_entries, min_size=1, max_size=4))
    return Park(draw(u32), tuple(templates[i % len(templates)] for i in range(n)))


@st.composite
def big_wakes(draw: st.DrawFn) -> Wake:
    """A WAKE with more than 253 fds, notices (no fd) mixed in."""
    n_fd = draw(st.integers(MAX_FDS_PER_FRAME + 1, 3 * MAX_FDS_PER_FRAME + 10))
    every = draw(st.integers(2, 50))  # a notice after every `every` fd entries
    templates = draw(st.lists(wake_entries, min_size=1, max_size=4))
    entries = []
    for i in range(n_fd):
        entries.append(attrs.evolve(templates[i % len(templates)], fd=FD))
        if i % every == 0:
            entries.append(attrs.evolve(templates[i % len(templates)], fd=None, ticket=i))
    return Wake(tuple(entries))


# ------------------------------------------------------- constants, golden


def test_wire_constants_are_pinned() -> None:
    # docs/protocol.md states these numbers; changing one is a protocol change.
    assert PROTOCOL_VERSION == 4
    assert SUPPORTED_VERSIONS == {1, 2, 3, 4}
    assert MAX_RESUME_TICKETS == 4096
    assert HEADER.format == "!IBBH"
    assert HEADER.size == 8
    assert MAX_FDS_PER_FRAME == 253
    assert DEFAULT_MAX_BODY == 1 << 20
    assert DEFAULT_MAX_ENTRIES == 1 << 16
    assert MAX_TOKEN == 0xFFFF
    assert FLAG_MORE == 0x01
    assert {m.name: m.value for m in MessageType} == {
        "HELLO": 1,
        "WELCOME": 2,
        "PARK": 3,
        "PARKED": 4,
        "WAKE": 5,
        "ACK": 6,
        "UNPARK": 7,
        "CLOSE": 8,
        "STATS": 9,
        "STATS_REPLY": 10,
        "ERROR": 11,
        "RULES": 12,
        "RESULT": 13,
        "SEND": 14,
        "TAGGED": 15,
    }
    assert {r.name: r.value for r in Reason} == {
        "READABLE": 1,
        "HANGUP": 2,
        "TIMEOUT": 3,
        "REQUESTED": 4,
        "SHUTDOWN": 5,
        "UNSENT": 6,
    }
    assert {r.label: r.value for r in Refusal} == {
        "ok": 0,
        "full": 1,
        "not-a-tcp-stream": 2,
        "not-connected": 3,
        "token-too-large": 4,
        "pending-too-large": 5,
        "out-of-fds": 6,
        "shutting-down": 7,
        "bad-timeout": 8,
        "not-a-socket": 9,
        "not-inet": 10,
        "listening": 11,
        "connecting": 12,
        "shut-down": 13,
        "uninspectable": 14,
        "duplicate": 15,
        "too-many-tags": 16,
        "tag-too-large": 17,
        "unknown-rules": 18,
        "too-many-rules": 19,
        "bad-rule": 20,
        "too-large": 21,
    }
    assert {k.name: k.value for k in RuleKind} == {"EXACT": 1, "WS_PING": 2, "WS_TEXT": 3}
    assert {o.name: o.value for o in TagOp} == {"UNPARK": 1, "CLOSE": 2}
    assert {c.name: c.value for c in ErrorCode} == {
        "PROTOCOL": 1,
        "VERSION": 2,
        "NOT_ALLOWED": 3,
        "TOO_MANY_SESSIONS": 4,
        "SHUTTING_DOWN": 5,
        "INTERNAL": 6,
        "LIMIT": 7,
    }


def frame(mtype: int, body: bytes, *, flags: int = 0, nfds: int = 0) -> bytes:
    return struct.pack("!IBBH", len(body), mtype, flags, nfds) + body


def p(fmt: str, *values: int) -> bytes:
    return struct.pack("!" + fmt, *values)


def golden_cases(fd_a: int, fd_b: int) -> list[tuple[Message, bytes, tuple[int, ...]]]:
    """(message, exact bytes, fds) written out independently of _wire's structs."""
    return [
        (
            Hello(1, "web", "w1"),
            frame(1, p("H", 1) + b"\x03web" + b"\x02w1"),
            (),
        ),
        (
            Welcome(7, 1024, 65536, 253, 512),
            frame(2, p("Q", 7) + p("I", 1024) + p("I", 65536) + p("H", 253) + p("I", 512)),
            (),
        ),
        (  # v4: shard 2 of 3 (sent only to a v4 worker)
            Welcome(7, 1024, 65536, 253, 512, 2, 3),
            frame(
                2,
                p("Q", 7)
                + p("I", 1024)
                + p("I", 65536)
                + p("H", 253)
                + p("I", 512)
                + p("H", 2)
                + p("H", 3),
            ),
            (),
        ),
        (
            Park(
                5,
                (
                    ParkEntry(fd_a, b"tk", b"p", 300, hangup_returns=True),
                    ParkEntry(fd_b, timeout_returns=True),
                ),
            ),
            frame(
                3,
                p("I", 5)
                + p("H", 2)
                + (p("I", 300) + p("B", 0x01) + p("H", 2) + p("I", 1) + b"tk" + b"p")
                + (p("I", 0) + p("B", 0x02) + p("H", 0) + p("I", 0)),
                nfds=2,
            ),
            (fd_a, fd_b),
        ),
        (
            Parked(5, (ParkResult(Refusal.OK, 99), ParkResult(Refusal.NOT_A_TCP_STREAM))),
            frame(4, p("I", 5) + p("I", 2) + p("B", 0) + p("Q", 99) + p("B", 2) + p("Q", 0)),
            (),
        ),
        (
            Wake(
                (
                    WakeEntry(9, Reason.READABLE, b"t", b"xy", fd_a),
                    WakeEntry(10, Reason.HANGUP, b"u"),
                )
            ),
            frame(
                5,
                p("H", 2)
                + (p("Q", 9) + p("B", 1) + p("B", 1) + p("H", 1) + p("I", 2) + b"t" + b"xy")
                + (p("Q", 10) + p("B", 2) + p("B", 0) + p("H", 1) + p("I", 0) + b"u"),
                nfds=1,
            ),
            (fd_a,),
        ),
        (Ack((1, 2)), frame(6, p("I", 2) + p("Q", 1) + p("Q", 2)), ()),
        (Unpark((3,)), frame(7, p("I", 1) + p("Q", 3)), ()),
        (
            Close((CloseEntry(3, b"bye\n"), CloseEntry(4))),
            frame(8, p("I", 2) + p("Q", 3) + p("I", 4) + b"bye\n" + p("Q", 4) + p("I", 0)),
            (),
        ),
        (Stats(), frame(9, b""), ()),
        (StatsReply(b'{"parked":0}'), frame(10, b'{"parked":0}'), ()),
        (
            Error(ErrorCode.VERSION, "v\u00e9"),
            frame(11, p("H", 2) + "v\u00e9".encode()),
            (),
        ),
        # v3: a PARK entry with rules and tags, a WAKE entry with its extension.
        (
            Park(6, (ParkEntry(fd_a, b"t", rules=2, tags=(b"room:1", b"x")),)),
            frame(
                3,
                p("I", 6)
                + p("H", 1)
                + (p("I", 0) + p("B", 0x04) + p("H", 1) + p("I", 0) + b"t")
                + (p("H", 2) + p("B", 2) + b"\x06room:1" + b"\x01x"),
                nfds=1,
            ),
            (fd_a,),
        ),
        (
            Wake((WakeEntry(11, Reason.UNSENT, b"", b"", fd_b, False, 3, 1000, b"rest"),)),
            frame(
                5,
                p("H", 1)
                + (p("Q", 11) + p("B", 6) + p("B", 0x05) + p("H", 0) + p("I", 0))
                + (p("I", 3) + p("Q", 1000) + p("I", 4) + b"rest"),
                nfds=1,
            ),
            (fd_b,),
        ),
        (
            Rules(
                8,
                1,
                (Rule(RuleKind.EXACT, b"\xc0\x00", b"\xd0\x00", True), Rule(RuleKind.WS_PING)),
                pool_scope=True,
            ),
            frame(
                12,
                p("I", 8)
                + p("H", 1)
                + p("B", 1)
                + p("H", 2)
                + (p("B", 1) + p("B", 1) + p("H", 2) + p("H", 2) + b"\xc0\x00\xd0\x00")
                + (p("B", 2) + p("B", 0) + p("H", 0) + p("H", 0)),
            ),
            (),
        ),
        (
            Result(8, Refusal.TOO_LARGE, 1, 2, 3),
            frame(13, p("I", 8) + p("B", 21) + p("I", 1) + p("I", 2) + p("I", 3)),
            (),
        ),
        (
            Send(9, b"hi", (5,), b"r"),
            frame(14, p("I", 9) + b"\x01r" + p("I", 1) + p("Q", 5) + p("I", 2) + b"hi"),
            (),
        ),
        (
            Tagged(TagOp.CLOSE, b"r", b"bye"),
            frame(15, p("B", 2) + p("B", 1) + b"r" + p("I", 3) + b"bye"),
            (),
        ),
    ]


def test_golden_bytes_every_type() -> None:
    with real_fds(2) as (a, b):
        cases = golden_cases(a, b)
        assert {type(m) for m, _, _ in cases} == {
            Hello,
            Welcome,
            Park,
            Parked,
            Wake,
            Ack,
            Unpark,
            Close,
            Stats,
            StatsReply,
            Error,
            Rules,
            Result,
            Send,
            Tagged,
        }
        for msg, data, fds in cases:
            assert encode(msg) == [Frame(data, fds)], msg
            assert decode_all([(data, list(fds))]) == [msg]


def test_encode_all_is_concatenation() -> None:
    msgs: list[Message] = [Stats(), Ack((1,)), Hello()]
    assert encode_all(msgs) == [f for m in msgs for f in encode(m)]


# --------------------------------------------------------------- round trip


@settings(max_examples=300, deadline=None)
@given(messages)
def test_round_trip(template: Message) -> None:
    with real_fds(fd_slots(template)) as fds:
        msg = with_fds(template, fds)
        frames = encode(msg)
        check_framing(msg, frames)
        blob, _ = stream(frames)
        (got,) = decode_all([(blob, fds)])
        assert got == msg
        assert type(got) is type(msg)
        # Fed frame by frame, each frame with its own fds.
        assert decode_all((f.data, f.fds) for f in frames) == [msg]


@settings(max_examples=200, deadline=None)
@given(list_messages, st.integers(120, 2000), st.integers(1, MAX_FDS_PER_FRAME))
def test_round_trip_split_by_small_limits(template: Message, max_body: int, max_fds: int) -> None:
    # Every entry the strategies make fits in 120 bytes, so the encoder must split, never refuse.
    with real_fds(fd_slots(template)) as fds:
        msg = with_fds(template, fds)
        frames = encode(msg, max_body=max_body, max_fds=max_fds)
        check_framing(msg, frames, max_body=max_body, max_fds=max_fds)
        dec = Decoder(max_body=max_body, max_fds_per_frame=max_fds)
        held = 0
        for i, f in enumerate(frames):
            dec.receive_data(f.data, f.fds)
            held += len(f.fds)
            got = dec.next_message()
            if i < len(frames) - 1:
                assert got is None
                assert dec.held_fds == held  # the partial message's fds are the decoder's
            else:
                assert got == msg
                assert dec.held_fds == 0
        dec.eof()


@settings(max_examples=25, deadline=None)
@given(st.one_of(big_parks(), big_wakes()))
def test_round_trip_more_than_253_fds(template: Message) -> None:
    n = fd_slots(template)
    assert n > MAX_FDS_PER_FRAME
    with real_fds(n) as fds:
        msg = with_fds(template, fds)
        frames = encode(msg)
        check_framing(msg, frames)
        # Entries are small: only the fd limit splits, greedily.
        assert len(frames) == -(-n // MAX_FDS_PER_FRAME)
        assert [len(f.fds) for f in frames[:-1]] == [MAX_FDS_PER_FRAME] * (len(frames) - 1)
        if isinstance(msg, Park):  # every PARK frame repeats the request id
            assert {f.data[8:12] for f in frames} == {struct.pack("!I", msg.request_id)}
        blob, marks = stream(frames)
        assert decode_all(chunked(blob, marks, [])) == [msg]
        assert decode_all((f.data, f.fds) for f in frames) == [msg]


def test_big_park_fed_one_byte_at_a_time() -> None:
    with real_fds(600) as fds:
        msg = Park(77, tuple(ParkEntry(fd, token=i.to_bytes(2, "big")) for i, fd in enumerate(fds)))
        frames = encode(msg)
        assert len(frames) == 3
        dec = Decoder()
        chunks = bytewise(frames)
        for i, (data, chunk_fds) in enumerate(chunks):
            dec.receive_data(data, chunk_fds)
            got = dec.next_message()
            assert got is None if i < len(chunks) - 1 else got == msg
        dec.eof()


@pytest.mark.parametrize(("n", "max_body"), [(5000, 300), (40_000, 4096), (65_536, 100_000)])
def test_ack_many_tickets(n: int, max_body: int) -> None:
    msg = Ack(tuple(range(10**12, 10**12 + n)))
    frames = encode(msg, max_body=max_body)
    check_framing(msg, frames, max_body=max_body)
    assert len(frames) == -(-n // ((max_body - 4) // 8))
    assert decode_all(((f.data, ()) for f in frames), Decoder(max_body=max_body)) == [msg]


def test_ack_split_at_default_body_limit() -> None:
    n = 140_000  # > (1 MiB - 4) / 8 = 131071 tickets per frame
    msg = Ack(tuple(range(n)))
    frames = encode(msg)
    check_framing(msg, frames)
    assert [HEADER.unpack_from(f.data)[0] for f in frames] == [4 + 8 * 131_071, 4 + 8 * 8929]
    blob, _ = stream(frames)
    assert decode_all([(blob, [])], Decoder(max_entries=n)) == [msg]
    # The default decoder holds at most DEFAULT_MAX_ENTRIES entries per message.
    dec = Decoder()
    dec.receive_data(blob)
    with pytest.raises(RemoteProtocolError, match="ACK message has over 65536 entries"):
        dec.next_message()


def test_token_of_exactly_max_size_and_255_byte_names() -> None:
    with real_fds(2) as (a, b):
        for msg in (
            Park(1, (ParkEntry(a, token=b"t" * MAX_TOKEN),)),
            Wake((WakeEntry(1, Reason.TIMEOUT, token=b"t" * MAX_TOKEN, fd=b),)),
            Hello(pool="p" * 255, name="\u00e9" * 127 + "n"),
        ):
            assert decode_all((f.data, f.fds) for f in encode(msg)) == [msg]


def test_stats_reply_of_exactly_max_body() -> None:
    msg = StatsReply(b"x" * 64)
    assert decode_all([(encode(msg, max_body=64)[0].data, [])], Decoder(max_body=64)) == [msg]


# ---------------------------------------------------------- feeding styles


@settings(max_examples=150, deadline=None)
@given(messages)
def test_fed_one_byte_at_a_time(template: Message) -> None:
    with real_fds(fd_slots(template)) as fds:
        msg = with_fds(template, fds)
        chunks = bytewise(encode(msg))
        dec = Decoder()
        for i, (data, chunk_fds) in enumerate(chunks):
            dec.receive_data(data, chunk_fds)
            got = dec.next_message()
            if i < len(chunks) - 1:
                assert got is None
            else:
                assert got == msg
                assert dec.next_message() is None
        dec.eof()


@settings(max_examples=200, deadline=None)
@given(messages, messages, st.lists(st.integers(0, 2000), max_size=12))
def test_followed_by_trailing_data(first: Message, second: Message, cuts: list[int]) -> None:
    n1, n2 = fd_slots(first), fd_slots(second)
    with real_fds(n1 + n2) as fds:
        m1, m2 = with_fds(first, fds[:n1]), with_fds(second, fds[n1:])
        blob, marks = stream(encode_all([m1, m2]))
        # Whole stream at once, all fds up front (a FIFO does not care).
        assert decode_all([(blob, fds)]) == [m1, m2]
        # Cut anywhere, fds with the chunk holding each frame's first byte.
        assert decode_all(chunked(blob, marks, cuts)) == [m1, m2]
        # First message complete, second one only begun: one message, then None.
        size1 = sum(len(f.data) for f in encode(m1))
        dec = Decoder()
        dec.receive_data(blob[: size1 + 1], [fd for off, fs in marks if off <= size1 for fd in fs])
        assert dec.next_message() == m1
        assert dec.next_message() is None
        assert dec.buffered == 1
        assert dec.held_fds == n2  # the second message's fds came with its first byte
        assert decode_all([(blob[size1 + 1 :], [])], dec) == [m2]


# ----------------------------------------------------------------- fuzzing


@attrs.define
class Run:
    messages: list[Message]
    error: RemoteProtocolError | None = None
    error_at_eof: bool = False
    given: list[int] = attrs.Factory(list)


def drive(dec: Decoder, chunks: Sequence[tuple[bytes, Sequence[int]]], *, eof: bool) -> Run:
    """Feed chunks; anything but RemoteProtocolError escapes and fails the test."""
    run = Run([])
    try:
        for data, fds in chunks:
            run.given += fds  # the decoder owns them from here, even if it raises
            dec.receive_data(data, fds)
            while (msg := dec.next_message()) is not None:
                run.messages.append(msg)
        if eof:
            run.error_at_eof = True
            dec.eof()
            run.error_at_eof = False
    except RemoteProtocolError as exc:
        run.error = exc
    # Which paths the fuzzers reach: see pytest --hypothesis-show-statistics.
    event(re.sub(r"0x[0-9a-f]+|\d+", "N", str(run.error)) if run.error else "no error")
    return run


def settle(dec: Decoder, run: Run, not_given: Iterable[int]) -> None:
    """Check fd ownership after a run, then close everything the test owns."""
    returned = [fd for m in run.messages for fd in message_fds(m)]
    assert len(set(returned)) == len(returned), "an fd handed out twice"
    assert set(returned) <= set(run.given), "an fd nobody sent"
    if run.error is not None:
        assert dec.held_fds == 0
        if not run.error_at_eof:
            with pytest.raises(RemoteProtocolError):
                dec.next_message()
    else:
        # No error: the decoder closed nothing, so it holds what it did not hand out.
        assert dec.held_fds == len(run.given) - len(returned)
    for fd in returned:
        os.close(fd)  # strict: EBADF means the decoder closed an fd it had handed out
    for fd in not_given:
        os.close(fd)
    dec.close()
    assert dec.held_fds == 0
    assert dec.buffered == 0


@pytest.mark.linux
@needs_proc
@settings(FUZZ, max_examples=1000)
@given(
    st.lists(st.tuples(st.binary(max_size=64), st.integers(0, 3)), max_size=6),
    st.booleans(),
)
def test_fuzz_random_bytes(spec: list[tuple[bytes, int]], eof: bool) -> None:
    before = open_fd_count()
    src = FdSource()
    chunks = [(data, src.take(n)) for data, n in spec]
    dec = Decoder()
    run = drive(dec, chunks, eof=eof)
    settle(dec, run, [fd for fd in src.made if fd not in run.given])
    src.close()
    assert open_fd_count() == before


_field = st.one_of(
    st.integers(0, 3).map(lambda v: struct.pack("!B", v)),
    st.integers(0, 6).map(lambda v: struct.pack("!H", v)),
    st.integers(0, 6).map(lambda v: struct.pack("!I", v)),
    u64.map(lambda v: struct.pack("!Q", v)),
    st.binary(max_size=8),
    st.sampled_from([b"\xff", b"\xc3", b"ok"]),
)


_raw_type = st.sampled_from([*map(int, MessageType), 0, 16, 255])
_raw_flags = st.sampled_from([0, 0, 0, FLAG_MORE, 0x02, 0xFF])
_raw_body = st.lists(_field, max_size=8).map(b"".join)
_raw_nfds = st.sampled_from([0, 0, 1, 2, 3, MAX_FDS_PER_FRAME, MAX_FDS_PER_FRAME + 1])
_raw_length_delta = st.sampled_from([0, 0, 0, 1, -1, None])  # None: over the body limit
_raw_sent = st.integers(-1, 4)  # -1: as many as announced (at most 4)


@st.composite
def raw_frames(draw: st.DrawFn) -> tuple[bytes, int]:
    """A frame with a plausible header and a body of plausible fields; fds to send."""
    mtype, flags, body = draw(_raw_type), draw(_raw_flags), draw(_raw_body)
    delta = draw(_raw_length_delta)
    length = DEFAULT_MAX_BODY + 1 if delta is None else max(len(body) + delta, 0)
    nfds, sent = draw(_raw_nfds), draw(_raw_sent)
    return HEADER.pack(length, mtype, flags, nfds) + body, min(nfds, 4) if sent < 0 else sent


@pytest.mark.linux
@needs_proc
@settings(FUZZ, max_examples=1500)
@given(
    st.lists(raw_frames(), min_size=1, max_size=4),
    st.lists(st.integers(0, 300), max_size=4),
    st.booleans(),
)
def test_fuzz_random_frames(frames: list[tuple[bytes, int]], cuts: list[int], eof: bool) -> None:
    before = open_fd_count()
    src = FdSource()
    blob, marks = stream([Frame(data, tuple(src.take(n))) for data, n in frames])
    dec = Decoder()
    run = drive(dec, chunked(blob, marks, cuts), eof=eof)
    settle(dec, run, [fd for fd in src.made if fd not in run.given])
    src.close()
    assert open_fd_count() == before


_byte_ops = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10_000), u8),
    st.tuples(st.just("xor"), st.integers(0, 10_000), st.sampled_from([1, 2, 4, 8, 0x80, 0xFF])),
    st.tuples(st.just("header"), st.integers(0, 10_000), u8),  # the start of a frame, more often
    st.tuples(st.just("insert"), st.integers(0, 10_000), u8),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
)
_frame_ops = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 100), st.just(0)),
    st.tuples(st.just("dup"), st.integers(0, 100), st.just(0)),
    st.tuples(st.just("swap"), st.integers(0, 100), st.just(0)),
)
_fd_ops = st.one_of(
    st.tuples(st.just("lose"), st.integers(0, 100), st.just(0)),  # an fd never arrives
    st.tuples(st.just("extra"), st.integers(0, 100), st.just(0)),  # one fd not announced
    st.tuples(st.just("move"), st.integers(0, 100), st.just(0)),  # fds come with another byte
)


def mutate(blob: bytes, frame_starts: Sequence[int], ops: Iterable[tuple[str, int, int]]) -> bytes:
    b = bytearray(blob)
    for op, pos, val in ops:
        if op == "header" and frame_starts:
            # a header byte, or the first body word (request id or entry count)
            pos = frame_starts[pos % len(frame_starts)] + pos % (HEADER.size + 4)
            op = "set"
        at = pos % (len(b) + 1)
        if op == "insert":
            b[at:at] = bytes([val])
        elif op == "truncate":
            del b[at:]
        elif at < len(b):
            if op == "set":
                b[at] = val
            elif op == "xor":
                b[at] ^= val
            elif op == "delete":
                del b[at : at + val]
    return bytes(b)


_LIST_TYPES = (Park, Parked, Wake, Ack, Unpark, Close)


def mutated_stream(
    src: FdSource,
    templates: Sequence[Message],
    limits: tuple[int, int],
    ops: Sequence[tuple[str, int, int]],
    cuts: Sequence[int],
) -> list[tuple[bytes, list[int]]]:
    """The messages encoded (fds from ``src``), then frames, bytes and fds mutated by ``ops``."""
    frame_ops = [op for op in ops if op[0] in ("drop", "dup", "swap")]
    fd_ops = [op for op in ops if op[0] in ("lose", "extra", "move")]
    byte_ops = [op for op in ops if op[0] not in ("drop", "dup", "swap", "lose", "extra", "move")]
    max_body, max_fds = limits
    msgs = [with_fds(t, src.take(fd_slots(t))) for t in templates]
    # Small limits split list messages (every generated entry fits in 120 bytes).
    frames = [
        f
        for m in msgs
        for f in (
            encode(m, max_body=max_body, max_fds=max_fds)
            if isinstance(m, _LIST_TYPES)
            else encode(m)
        )
    ]
    for op, i, _ in frame_ops:
        if not frames:
            break
        i %= len(frames)
        if op == "drop":
            frames = frames[:i] + frames[i + 1 :]  # its fds are never sent: ours to close
        elif op == "dup":  # the copy carries new fds (the same number twice is not a thing)
            frames.insert(i, Frame(frames[i].data, tuple(src.take(len(frames[i].fds)))))
        elif op == "swap" and i + 1 < len(frames):
            frames[i], frames[i + 1] = frames[i + 1], frames[i]
    blob, marks = stream(frames)
    starts = list(itertools.accumulate((len(f.data) for f in frames[:-1]), initial=0))
    blob = mutate(blob, starts if frames else [], byte_ops)
    for op, i, _ in fd_ops:
        if op == "extra":
            marks.append((i % (len(blob) + 1), src.take(1)))
        elif marks:
            off, fds = marks[i % len(marks)]
            if op == "lose" and fds:
                fds.pop(i % len(fds))
            elif op == "move":
                marks[i % len(marks)] = (max(off - 1 - i, 0) if i % 2 else off + 1 + i, fds)
    return chunked(blob, marks, cuts)


@pytest.mark.linux
@needs_proc
@settings(FUZZ, max_examples=2000)
@given(
    st.lists(messages, min_size=1, max_size=3),
    st.sampled_from([(DEFAULT_MAX_BODY, MAX_FDS_PER_FRAME), (120, 2), (256, 1), (200, 3)]),
    st.lists(st.one_of(_frame_ops, _byte_ops, _fd_ops), min_size=1, max_size=4),
    st.lists(st.integers(0, 3000), max_size=5),
    st.booleans(),
)
def test_fuzz_mutated_valid_streams(
    templates: list[Message],
    limits: tuple[int, int],
    ops: list[tuple[str, int, int]],
    cuts: list[int],
    eof: bool,
) -> None:
    """Also differential: the worker's decoder (``rows=True``) decodes the same
    stream to the same messages, error and fds."""
    before = open_fd_count()
    runs = []
    for rows in (False, True):
        src = FdSource()
        chunks = mutated_stream(src, templates, limits, ops, cuts)
        dec = Decoder(rows=rows)
        run = drive(dec, chunks, eof=eof)
        # fds by the order they were made in, so that the two runs compare.
        index = {fd: n for n, fd in enumerate(src.made)}
        got = [with_fds(plain(m), [index[fd] for fd in message_fds(m)]) for m in run.messages]
        runs.append((got, str(run.error), run.error_at_eof))
        settle(dec, run, [fd for fd in src.made if fd not in run.given])
        src.close()
    assert runs[0] == runs[1]
    assert open_fd_count() == before


# ------------------------------------------------------- specific errors


def reject(
    chunks: Sequence[tuple[bytes, int]],
    match: str,
    *,
    dec: Decoder | None = None,
    eof: bool = False,
) -> list[Message]:
    """Feed chunks (with that many fresh fds each); expect RemoteProtocolError.

    Then: the decoder holds and has closed every fd it was given and did not
    hand out, and it stays broken. Returns the messages decoded before the error.
    """
    dec = Decoder() if dec is None else dec
    src = FdSource()
    given: list[int] = []
    got: list[Message] = []

    def feed() -> None:
        for data, n in chunks:
            fds = src.take(n)
            given.extend(fds)
            dec.receive_data(data, fds)
            got.extend(dec)
        if eof:
            dec.eof()

    with pytest.raises(RemoteProtocolError, match=match) as info:
        feed()
    returned = {fd for m in got for fd in message_fds(m)}
    assert dec.held_fds == 0
    assert dec.buffered == 0
    # Checked before any new fd is made, so no number has been reused yet.
    assert [fd for fd in given if fd not in returned and is_open(fd)] == []
    assert all(is_open(fd) for fd in returned)
    if not eof:
        with pytest.raises(RemoteProtocolError) as again:
            dec.next_message()
        assert again.value is info.value
        (late,) = src.take(1)
        with pytest.raises(RemoteProtocolError):
            dec.receive_data(encode(Stats())[0].data, [late])
        assert not is_open(late)
        assert dec.held_fds == 0
    for fd in returned:
        os.close(fd)
    src.close()
    return got


def park_bytes(n: int, request_id: int = 1, **kw: object) -> bytes:
    (f,) = encode(Park(request_id, tuple(ParkEntry(FD, **kw) for _ in range(n))))  # type: ignore[arg-type]
    return f.data


@pytest.mark.parametrize("mtype", [0, 16, 200, 255])
def test_unknown_type(mtype: int) -> None:
    reject([(frame(mtype, b""), 0)], f"unknown message type {mtype}$")


def test_unknown_type_is_seen_from_the_header_alone() -> None:
    reject([(HEADER.pack(1000, 42, 0, 0), 2)], "unknown message type 42")


def test_body_length_over_the_limit() -> None:
    # The header alone is enough: no waiting for a body that will not be accepted.
    reject(
        [(HEADER.pack(DEFAULT_MAX_BODY + 1, MessageType.STATS_REPLY, 0, 0), 0)],
        "STATS_REPLY frame length 1048577 is over the limit 1048576",
    )
    hello = encode(Hello())[0].data  # 21-byte body (v2: resume session + count)
    reject([(hello, 0)], "HELLO frame length 21 is over the limit 10", dec=Decoder(max_body=10))


def test_too_many_fds_per_frame() -> None:
    reject(
        [(HEADER.pack(0, MessageType.PARK, 0, 254), 254)],
        "PARK frame has 254 fds, over the limit 253",
    )
    reject(
        [(park_bytes(3), 3)],
        "PARK frame has 3 fds, over the limit 2",
        dec=Decoder(max_fds_per_frame=2),
    )


def test_frame_whose_fds_are_missing() -> None:
    data = park_bytes(3)
    dec = Decoder()
    # Incomplete frame: not an error yet, the rest may still come.
    dec.receive_data(data[:10], [])
    assert dec.next_message() is None
    # Complete frame, 2 of 3 fds: they can only have been lost.
    reject([(data[10:], 2)], "PARK frame needs 3 fds, only 2 arrived", dec=dec)
    reject(
        [(encode(Wake((WakeEntry(1, Reason.READABLE, fd=FD),)))[0].data, 0)],
        "WAKE frame needs 1 fds, only 0 arrived",
    )


@pytest.mark.parametrize(
    ("data", "nfds", "match"),
    [
        (frame(1, p("H", 1) + b"\xc8abc"), 0, "truncated HELLO body"),
        (frame(1, p("H", 1)), 0, "truncated HELLO body"),
        (frame(2, b"\x00" * 21), 0, "truncated WELCOME body"),
        (frame(2, struct.pack("!QIIHIHH", 1, 2, 3, 253, 9, 3, 3)), 0, "names shard 3 of 3"),
        (
            frame(3, p("I", 1) + p("H", 1) + p("I", 0) + p("B", 0) + p("H", 9), nfds=1),
            1,
            "truncated PARK",
        ),
        (frame(3, p("I", 1) + p("H", 1) + p("I", 0), nfds=1), 1, "truncated PARK body"),
        (frame(4, p("I", 1) + p("I", 2) + p("B", 0) + p("Q", 1)), 0, "truncated PARKED body"),
        (frame(5, p("H", 1) + p("Q", 1) + p("B", 1) + p("B", 0) + p("H", 0)), 0, "truncated WAKE"),
        (
            frame(6, p("I", 3) + p("Q", 1) + p("Q", 2)),
            0,
            "bad ACK body: 3 tickets need 24 bytes, got 16",
        ),
        (frame(7, p("H", 0)), 0, "truncated UNPARK body"),
        (frame(8, p("I", 1) + p("Q", 1) + p("I", 5) + b"bye"), 0, "truncated CLOSE body"),
        (frame(11, b"\x00"), 0, "truncated ERROR body"),
    ],
)
def test_truncated_body(data: bytes, nfds: int, match: str) -> None:
    reject([(data, nfds)], match)


def body_of(msg: Message) -> bytes:
    (f,) = encode(msg)
    return f.data[HEADER.size :]


@pytest.mark.parametrize(
    ("mtype", "body", "nfds", "match"),
    [
        (MessageType.STATS, b"x", 0, "1 trailing bytes in STATS body"),
        (MessageType.HELLO, body_of(Hello()) + b"zz", 0, "2 trailing bytes in HELLO body"),
        (MessageType.WELCOME, body_of(Welcome(1, 2, 3)) + b"z", 0, "1 trailing bytes in WELCOME"),
        (
            MessageType.WELCOME,
            body_of(Welcome(1, 2, 3, shard=1, shards=2)) + b"z",
            0,
            "1 trailing bytes in WELCOME",
        ),
        (MessageType.PARK, park_bytes(2)[8:] + b"zzz", 2, "3 trailing bytes in PARK body"),
        (
            MessageType.PARKED,
            body_of(Parked(1, (ParkResult(Refusal.OK, 1),))) + b"z",
            0,
            "1 trailing bytes in PARKED body",
        ),
        (
            MessageType.WAKE,
            body_of(Wake((WakeEntry(1, Reason.TIMEOUT, fd=FD),))) + b"z",
            1,
            "1 trailing bytes in WAKE body",
        ),
        (
            MessageType.CLOSE,
            body_of(Close((CloseEntry(1, b"bye"),))) + b"z",
            0,
            "1 trailing bytes in CLOSE body",
        ),
        # ACK/UNPARK compare count * 8 with the rest of the body in one go, and
        # word a mismatch either way as "truncated".
        (MessageType.ACK, body_of(Ack((1, 2))) + b"z", 0, "ACK body"),
        (MessageType.UNPARK, body_of(Unpark(())) + b"z" * 8, 0, "UNPARK body"),
    ],
)
def test_trailing_bytes_in_a_body(mtype: MessageType, body: bytes, nfds: int, match: str) -> None:
    reject([(frame(mtype, body, nfds=nfds), nfds)], match)


def wake_body(reason: int, flags: int) -> bytes:
    return p("H", 1) + p("Q", 7) + p("B", reason) + p("B", flags) + p("H", 0) + p("I", 0)


@pytest.mark.parametrize("reason", [0, 7, 255])
def test_bad_wake_reason(reason: int) -> None:
    reject([(frame(5, wake_body(reason, 0)), 0)], f"bad WAKE field reason: {reason}$")
    # With an fd on the entry: the fd is closed too.
    reject([(frame(5, wake_body(reason, 1), nfds=1), 1)], f"bad WAKE field reason: {reason}$")


@pytest.mark.parametrize("code", [22, 200, 255])
def test_bad_parked_code(code: int) -> None:
    body = p("I", 1) + p("I", 2) + p("B", 0) + p("Q", 5) + p("B", code) + p("Q", 0)
    reject([(frame(4, body), 0)], f"bad PARKED field code: {code}$")


@pytest.mark.parametrize(
    ("data", "nfds", "match"),
    [
        (frame(MessageType.ACK, p("I", 0), flags=0x02), 0, "bad ACK frame flags 0x2"),
        (
            frame(MessageType.PARK, p("I", 0) + p("H", 0), flags=0x81),
            0,
            "bad PARK frame flags 0x81",
        ),
        # FLAG_MORE only means something on list types.
        (
            frame(MessageType.HELLO, body_of(Hello()), flags=FLAG_MORE),
            0,
            "bad HELLO frame flags 0x1",
        ),
        (frame(MessageType.STATS, b"", flags=FLAG_MORE), 0, "bad STATS frame flags 0x1"),
        (frame(MessageType.ERROR, p("H", 1), flags=FLAG_MORE), 0, "bad ERROR frame flags 0x1"),
        (
            frame(
                3, p("I", 1) + p("H", 1) + p("I", 0) + p("B", 0x10) + p("H", 0) + p("I", 0), nfds=1
            ),
            1,
            "bad PARK field flags: 0x10",
        ),
        (frame(5, wake_body(1, 0x08)), 0, "bad WAKE field flags: 0x8"),
        (frame(5, wake_body(1, 0x09), nfds=1), 1, "bad WAKE field flags: 0x9"),
    ],
)
def test_bad_flags(data: bytes, nfds: int, match: str) -> None:
    reject([(data, nfds)], match)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (frame(1, p("H", 1) + b"\x02\xc3\x28" + b"\x00"), "bad HELLO field pool: not UTF-8"),
        (frame(1, p("H", 1) + b"\x01\xff" + b"\x00"), "bad HELLO field pool: not UTF-8"),
        (frame(1, p("H", 1) + b"\x00" + b"\x01\x80"), "bad HELLO field name: not UTF-8"),
        (frame(11, p("H", 1) + b"\xed\xa0\x80"), "bad ERROR field text: not UTF-8"),
    ],
)
def test_non_utf8_text(data: bytes, match: str) -> None:
    reject([(data, 0)], match)


def test_fds_arriving_without_a_frame() -> None:
    reject([(b"", 1)], "1 fds arrived without a frame")
    # fds that came with a frame that announced none: the message is fine, the fds are not.
    got = reject([(encode(Hello())[0].data, 2)], "2 fds arrived without a frame")
    assert got == [Hello()]


@pytest.mark.parametrize(
    "mtype", [t for t in MessageType if t not in (MessageType.PARK, MessageType.WAKE)]
)
def test_fds_on_a_type_that_cannot_carry_them(mtype: MessageType) -> None:
    reject([(HEADER.pack(0, mtype, 0, 1), 1)], f"{mtype.name} frame cannot carry fds")


def test_park_entries_must_match_its_fds() -> None:
    body = park_bytes(2)[8:]
    reject([(frame(3, body, nfds=1), 1)], "PARK has 2 entries but 1 fds")
    reject([(frame(3, body, nfds=3), 3)], "PARK has 2 entries but 3 fds")


def test_wake_fd_entries_must_match_its_fds() -> None:
    two = Wake((WakeEntry(1, Reason.READABLE, fd=FD), WakeEntry(2, Reason.READABLE, fd=FD)))
    body = body_of(two)
    reject([(frame(5, body, nfds=1), 1)], "WAKE has more fd entries than fds")
    reject([(frame(5, body, nfds=3), 3)], "WAKE has 2 fd entries but 3 fds")
    notice = body_of(Wake((WakeEntry(1, Reason.HANGUP),)))
    reject([(frame(5, notice, nfds=1), 1)], "WAKE has 0 fd entries but 1 fds")


def split_park_frames(n: int = 300, request_id: int = 1) -> list[Frame]:
    frames = encode(Park(request_id, tuple(ParkEntry(FD) for _ in range(n))))
    assert len(frames) > 1
    return frames


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (encode(Stats())[0].data, "STATS frame inside a split PARK message"),
        (encode(Ack((1,)))[0].data, "ACK frame inside a split PARK message"),
        # The header alone is enough to tell.
        (encode(Hello())[0].data[:8], "HELLO frame inside a split PARK message"),
    ],
)
def test_split_message_interrupted_by_another_type(other: bytes, match: str) -> None:
    first = split_park_frames()[0]
    reject([(first.data, len(first.fds)), (other, 0)], match)


def test_split_message_that_changes_its_request_id() -> None:
    a, b = split_park_frames(request_id=1), split_park_frames(request_id=2)
    reject([(a[0].data, 253), (b[1].data, 300 - 253)], "split PARK changed its request id")
    pa = encode(Parked(1, (ParkResult(Refusal.FULL),) * 3), max_fds=1, max_body=20)
    pb = encode(Parked(2, (ParkResult(Refusal.FULL),) * 3), max_fds=1, max_body=20)
    assert len(pa) == 3
    reject([(pa[0].data, 0), (pb[1].data, 0)], "split PARKED changed its request id")


def test_too_many_entries() -> None:
    reject(
        [(encode(Ack((1, 2, 3, 4)))[0].data, 0)],
        "ACK message has over 3 entries",
        dec=Decoder(max_entries=3),
    )
    # Counted across the frames of a split message; the partial message's fds are closed.
    frames = split_park_frames(300)
    reject(
        [(frames[0].data, 253), (frames[1].data, 47)],
        "PARK message has over 256 entries",
        dec=Decoder(max_entries=256),
    )


def test_eof_mid_frame() -> None:
    data = park_bytes(2)
    for cut in (1, 7, 8, len(data) - 1):
        reject([(data[:cut], 2)], "connection closed mid-frame", eof=True)


def test_eof_mid_message() -> None:
    first = split_park_frames()[0]
    reject([(first.data, 253)], "connection closed mid-message", eof=True)


def test_eof_with_fds_left_over() -> None:
    dec = Decoder()
    r, w = os.pipe()
    dec.receive_data(b"", [r])  # no next_message: eof() is the first to look
    with pytest.raises(RemoteProtocolError, match="connection closed"):
        dec.eof()
    assert not is_open(r)
    os.close(w)


def test_clean_eof() -> None:
    dec = Decoder()
    dec.eof()
    dec.receive_data(encode(Stats())[0].data)
    assert dec.next_message() == Stats()
    dec.eof()


def test_decoder_is_broken_after_an_error_and_closed_its_fds() -> None:
    src = FdSource()
    frames = split_park_frames()
    queued = src.take(47)
    partial = src.take(253)
    dec = Decoder()
    dec.receive_data(frames[0].data, partial)
    assert dec.next_message() is None
    dec.receive_data(frames[1].data[:3], queued)  # the next frame's fds, queued
    assert dec.held_fds == 253 + 47
    dec.receive_data(b"\x00" * 5)  # header completes: type 0
    with pytest.raises(RemoteProtocolError, match="unknown message type 0") as first:
        dec.next_message()
    assert dec.held_fds == 0
    assert not any(is_open(fd) for fd in partial + queued)
    # Stays broken: the same error again, whatever comes next; new fds are closed.
    with pytest.raises(RemoteProtocolError) as again:
        dec.next_message()
    assert again.value is first.value
    late = src.take(2)
    with pytest.raises(RemoteProtocolError) as again:
        dec.receive_data(encode(Stats())[0].data, late)
    assert again.value is first.value
    assert not any(is_open(fd) for fd in late)
    assert dec.held_fds == 0
    src.close()


def test_close_closes_held_fds_and_not_handed_out_ones() -> None:
    src = FdSource()
    a = src.take(1)
    dec = Decoder()
    dec.receive_data(park_bytes(1), a)
    (msg,) = list(dec)
    assert isinstance(msg, Park)
    assert message_fds(msg) == a
    first = split_park_frames()[0]
    b = src.take(253)
    dec.receive_data(first.data, b)
    assert dec.next_message() is None
    c = src.take(2)
    dec.receive_data(b"\x00", c)
    assert dec.held_fds == 255
    dec.close()
    assert dec.held_fds == 0
    assert dec.buffered == 0
    assert is_open(a[0])
    assert not any(is_open(fd) for fd in b + c)
    os.close(a[0])
    src.close()


# ------------------------------------------------------ local (encode) errors


def test_encode_token_over_65535_bytes() -> None:
    with real_fds(1) as (fd,):
        big = b"t" * (MAX_TOKEN + 1)
        with pytest.raises(LocalProtocolError, match="token of 65536 bytes is over 65535"):
            encode(Park(1, (ParkEntry(fd, token=big),)))
        with pytest.raises(LocalProtocolError, match="token of 65536 bytes is over 65535"):
            encode(Wake((WakeEntry(1, Reason.READABLE, token=big, fd=fd),)))
        # real_fds closes strictly: encode did not touch the fd.


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (Hello(pool="p" * 256), "pool is 256 bytes, the limit is 255"),
        (Hello(pool="\u00e9" * 128), "pool is 256 bytes, the limit is 255"),  # bytes, not chars
        (Hello(name="n" * 300), "name is 300 bytes, the limit is 255"),
    ],
)
def test_encode_names_over_255_bytes(msg: Hello, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode(msg)


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (Park(1 << 32, ()), "cannot encode Park"),
        (Welcome(-1, 0, 0), "cannot encode Welcome"),
        (Hello(version=70000), "cannot encode Hello"),
        (Ack((1 << 64,)), "cannot encode Ack"),
        (Error(65536, "x"), "cannot encode Error"),
        (Park(1, (ParkEntry(FD, idle_timeout_ms=-1),)), "cannot encode Park"),
        (
            Wake((WakeEntry(1, Reason.READABLE, pending=b"x" * DEFAULT_MAX_BODY),)),
            "does not fit a frame of 1048576",
        ),
        (StatsReply(b"x" * (DEFAULT_MAX_BODY + 1)), "STATS_REPLY body of 1048577 bytes is over"),
        ("not a message", "not a connpark message"),
    ],
)
def test_encode_what_the_wire_cannot_carry(msg: Message, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode(msg)


# ------------------------------------------------------------- known bugs


@pytest.mark.parametrize("msg", [Hello(pool="\udcff"), Hello(name="\ud800"), Error(1, "\udc80")])
def test_unencodable_text_is_a_local_protocol_error(msg: Message) -> None:
    # A str with lone surrogates (e.g. os.fsdecode of a non-UTF-8 argv) cannot go on the wire.
    with pytest.raises(LocalProtocolError):
        encode(msg)


def test_decoder_stays_broken_after_an_eof_error() -> None:
    dec = Decoder()
    data = encode(Stats())[0].data
    dec.receive_data(data[:3])
    with pytest.raises(RemoteProtocolError, match="mid-frame"):
        dec.eof()

    def feed_and_decode() -> Message | None:
        dec.receive_data(data)
        return dec.next_message()

    with pytest.raises(RemoteProtocolError):
        feed_and_decode()


def test_unjoined_decoder_hands_out_each_frame_of_a_split_message() -> None:
    fds = [os.dup(0) for _ in range(600)]
    msg = Park(7, tuple(ParkEntry(fd, b"%d" % i) for i, fd in enumerate(fds)))
    frames = encode(msg)
    assert len(frames) == 3
    dec = Decoder(join_split=False)
    parts = []
    for f in frames:
        dec.receive_data(f.data, f.fds)
        part = dec.next_message()
        assert isinstance(part, Park)
        assert part.request_id == 7
        assert dec.held_fds == 0  # nothing piles up between frames
        parts.append(part)
    assert [len(p.entries) for p in parts] == [253, 253, 94]
    assert tuple(e for p in parts for e in p.entries) == msg.entries
    for fd in fds:
        os.close(fd)


def test_unjoined_decoder_still_checks_split_continuity() -> None:
    first, *_rest = encode(Ack(tuple(range(60_000))), max_body=100_000)
    other = encode(Unpark((1,)))[0]
    dec = Decoder(join_split=False)
    dec.receive_data(first.data)
    assert isinstance(dec.next_message(), Ack)
    dec.receive_data(other.data)
    with pytest.raises(RemoteProtocolError, match="inside a split ACK"):
        dec.next_message()


def test_hello_v2_resume_fields_round_trip_and_v1_stays_v1() -> None:
    v2 = Hello(2, "web", "w1", resume_session=7, resume_tickets=(1, 2**64 - 1))
    assert decode_all([(f.data, f.fds) for f in encode(v2)]) == [v2]
    v1 = Hello(1, "web", "w1")
    assert encode(v1)[0].data == bytes.fromhex(
        "00000009010000000001037765620277 31".replace(" ", "")
    )
    assert decode_all([(f.data, f.fds) for f in encode(v1)]) == [v1]
    with pytest.raises(LocalProtocolError, match="v1 cannot carry"):
        encode(Hello(1, resume_session=3))
    with pytest.raises(LocalProtocolError, match="4097 resume tickets"):
        encode(Hello(resume_tickets=tuple(range(4097))))


def test_hello_of_an_unknown_version_decodes_for_a_version_error() -> None:
    body = struct.pack("!H", 9) + b"\x01p\x00" + b"future fields"
    frame = HEADER.pack(len(body), MessageType.HELLO, 0, 0) + body
    dec = Decoder()
    dec.receive_data(frame)
    msg = dec.next_message()
    assert isinstance(msg, Hello)
    assert (msg.version, msg.pool) == (9, "p")


# ------------------------------------------------------- the container's lean PARK


def unlean(msg: Message) -> Message:
    """A ``LeanPark`` as the ``Park`` the plain decoder hands out."""
    assert isinstance(msg, LeanPark)
    entries = []
    for fd, token, pending, idle, flags, entry in msg.entries:
        if entry is None:
            assert not flags & ~0x03  # only the returns flags stay lean
            entry = ParkEntry(fd, token, pending, idle, bool(flags & 1), bool(flags & 2))
        else:
            assert (entry.fd, entry.token, entry.pending, entry.idle_timeout_ms) == (
                fd,
                token,
                pending,
                idle,
            )
        entries.append(entry)
    return Park(msg.request_id, tuple(entries))


def joined(msgs: list[Message]) -> Park:
    """Frames of one split PARK (the container's decoder does not join), joined."""
    parks = [unlean(m) for m in msgs]
    assert isinstance(parks[0], Park)
    assert {m.request_id for m in parks if isinstance(m, Park)} == {parks[0].request_id}
    return Park(
        parks[0].request_id, tuple(e for m in parks if isinstance(m, Park) for e in m.entries)
    )


@settings(max_examples=200, deadline=None)
@given(st.one_of(parks, big_parks()), st.lists(st.integers(0, 4000), max_size=6))
def test_lean_park_decodes_what_park_does(template: Message, cuts: list[int]) -> None:
    """Whole, frame by frame, at random cuts, one byte at a time, and followed by more."""
    with real_fds(fd_slots(template)) as fds:
        msg = with_fds(template, fds)
        frames = encode(msg)
        blob, marks = stream(frames)
        lean = Decoder(join_split=False, lean_park=True)
        assert joined(decode_all([(blob, fds)], lean)) == msg
        lean = Decoder(join_split=False, lean_park=True)
        assert joined(decode_all(((f.data, f.fds) for f in frames), lean)) == msg
        lean = Decoder(join_split=False, lean_park=True)
        assert joined(decode_all(chunked(blob, marks, cuts), lean)) == msg
        if len(blob) < 600:
            lean = Decoder(join_split=False, lean_park=True)
            assert joined(decode_all(bytewise(frames), lean)) == msg
        lean = Decoder(join_split=False, lean_park=True)
        got = decode_all([(blob + encode(Ack((5,)))[0].data, fds)], lean)
        assert got[-1] == Ack((5,))
        assert joined(got[:-1]) == msg
        # Joined, the lean decoder hands out one LeanPark for the whole message.
        lean = Decoder(lean_park=True)
        (whole,) = decode_all([(blob, fds)], lean)
        assert unlean(whole) == msg


@pytest.mark.parametrize(
    ("body", "nfds", "match"),
    [
        (p("I", 1) + p("H", 1) + p("I", 0) + p("B", 0) + p("H", 9), 1, "truncated PARK body"),
        (p("I", 1) + p("H", 1) + p("I", 0), 1, "truncated PARK body"),
        (p("I", 1), 0, "truncated PARK body"),
        (
            p("I", 1) + p("H", 1) + p("I", 0) + p("B", 0) + p("H", 3) + p("I", 0) + b"ab",
            1,
            "truncated",
        ),
        (
            p("I", 1) + p("H", 1) + p("I", 0) + p("B", 0) + p("H", 0) + p("I", 2) + b"a",
            1,
            "truncated",
        ),
        (p("I", 1) + p("H", 1) + p("I", 0) + p("B", 0x04) + p("H", 0) + p("I", 0), 1, "truncated"),
        (
            p("I", 1) + p("H", 1) + p("I", 0) + p("B", 0x04) + p("H", 0) + p("I", 0) + p("H", 1),
            1,
            "truncated PARK body",
        ),
        (p("I", 1) + p("H", 1) + p("I", 0) + p("B", 0x10) + p("H", 0) + p("I", 0), 1, "0x10"),
        (p("I", 1) + p("H", 1) + p("I", 0) + p("B", 0x83) + p("H", 0) + p("I", 0), 1, "0x83"),
        (park_bytes(2)[8:] + b"zzz", 2, "3 trailing bytes in PARK body"),
        # Entries' length exactly (the one-pass case), but a token claimed: cut short.
        (p("I", 1) + p("H", 1) + p("I", 0) + p("B", 0) + p("H", 0) + p("I", 0), 1, None),
        (p("I", 1) + p("H", 2) + (p("I", 0) + p("B", 0) + p("H", 1) + p("I", 0)) * 2, 2, "trunc"),
        (park_bytes(2)[8:], 1, "PARK has 2 entries but 1 fds"),
        (park_bytes(2)[8:], 3, "PARK has 2 entries but 3 fds"),
    ],
)
def test_lean_park_rejects_what_park_does(body: bytes, nfds: int, match: str | None) -> None:
    data = frame(3, body, nfds=nfds)
    if match is None:  # (a valid one, next to its bad twin)
        return
    reject([(data, nfds)], match)
    reject([(data, nfds)], match, dec=Decoder(join_split=False, lean_park=True))


@needs_proc
def test_lean_park_of_plain_entries_decodes_in_one_pass() -> None:
    """253 entries without token or pending bytes (the container's usual frame)."""
    n = 253
    flags = [i % 4 for i in range(n)]  # the returns flags stay lean
    body = (
        p("I", 7)
        + p("H", n)
        + b"".join(p("I", 1000 + i) + p("B", flags[i]) + p("H", 0) + p("I", 0) for i in range(n))
    )
    with real_fds(n) as fds:
        dec = Decoder(join_split=False, lean_park=True)
        dec.receive_data(frame(3, body, nfds=n), list(fds))
        msg = dec.next_message()
        assert isinstance(msg, LeanPark)
        assert msg.request_id == 7
        assert list(msg.entries) == [
            (fd, b"", b"", 1000 + i, flags[i], None) for i, fd in enumerate(fds)
        ]
        assert dec.next_message() is None
        assert dec.held_fds == 0


@needs_proc
def test_lean_park_error_after_good_entries_closes_each_fd_once() -> None:
    """A bad last entry: nothing is handed out, every fd of the frame is closed, once."""
    good = park_bytes(3)[8:]
    bad = good[:6] + good[6:] + p("I", 0) + p("B", 0x40) + p("H", 0) + p("I", 0)
    body = p("I", 1) + p("H", 4) + bad[6:]
    with real_fds(4) as fds:
        base = open_fd_count()
        dec = Decoder(join_split=False, lean_park=True)
        dec.receive_data(frame(3, body, nfds=4), [os.dup(fd) for fd in fds])
        with pytest.raises(RemoteProtocolError, match="bad PARK field flags: 0x40"):
            dec.next_message()
        assert dec.held_fds == 0
        assert open_fd_count() == base  # the 4 dups are closed (and only them)


# ------------------------------------------- the worker's hot path: rows, encode_park


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(parkeds, wakes, plain_wakes, big_wakes()),
    st.sampled_from([None, (120, 2), (300, 7)]),
)
def test_rows_decoder_round_trip(template: Message, limits: tuple[int, int] | None) -> None:
    with real_fds(fd_slots(template)) as fds:
        msg = with_fds(template, fds)
        max_body, max_fds = limits or (DEFAULT_MAX_BODY, MAX_FDS_PER_FRAME)
        frames = encode(msg, max_body=max_body, max_fds=max_fds)
        dec = Decoder(rows=True, max_body=max_body, max_fds_per_frame=max_fds)
        (got,) = decode_all([(f.data, f.fds) for f in frames], dec)
        assert type(got) is (WakeRows if isinstance(msg, Wake) else ParkedRows)
        assert plain(got) == msg
        assert message_fds(got) == message_fds(msg)


def test_rows_of_plain_wakes_and_parked() -> None:
    """The bulk path (no token, pending or v3 tail): the same rows as the entry loop."""
    with real_fds(300) as fds:
        entries = [
            WakeEntry(10 + i, Reason.REQUESTED, fd=None if i % 7 == 3 else fds[i], inet6=i % 2 == 0)
            for i in range(300)
        ]
        msg = Wake(tuple(entries))
        frames = encode(msg)
        assert len(frames) == 2
        (got,) = decode_all([(f.data, f.fds) for f in frames], Decoder(rows=True))
        assert isinstance(got, WakeRows)
        assert got.rows == tuple(attrs.astuple(e, recurse=False) for e in entries)
        assert all(type(row[1]) is Reason for row in got.rows)
    parked = Parked(9, tuple(ParkResult(Refusal(i % 3), i) for i in range(600)))
    (rows,) = decode_all([(f.data, f.fds) for f in encode(parked)], Decoder(rows=True))
    assert isinstance(rows, ParkedRows)
    assert rows.codes == tuple(i % 3 for i in range(600))
    assert rows.tickets == tuple(range(600))
    assert plain(rows) == parked


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(parks, big_parks()),
    st.sampled_from([None, (120, 2), (300, 7), (2000, 253)]),
    st.booleans(),
)
def test_encode_park_is_encode_of_park(
    template: Park, limits: tuple[int, int] | None, same: bool
) -> None:
    if same and template.entries:  # park_many with one policy: one encoding for all
        template = attrs.evolve(template, entries=(template.entries[0],) * len(template.entries))
    with real_fds(len(template.entries)) as fds:
        msg = with_fds(template, fds)
        assert isinstance(msg, Park)
        max_body, max_fds = limits or (DEFAULT_MAX_BODY, MAX_FDS_PER_FRAME)
        items = [encode_park_entry(e) for e in msg.entries]
        got = encode_park(msg.request_id, items, fds, max_body=max_body, max_fds=max_fds)
        assert got == encode(msg, max_body=max_body, max_fds=max_fds)


def test_encode_park_of_one_entry_too_big_for_a_frame() -> None:
    item = encode_park_entry(ParkEntry(FD, token=b"t" * 200))
    with pytest.raises(LocalProtocolError, match="does not fit a frame"):
        encode_park(1, [item, item], [5, 6], max_body=150)
    with pytest.raises(LocalProtocolError, match="token of 65536 bytes"):
        encode_park_entry(ParkEntry(FD, token=b"t" * (MAX_TOKEN + 1)))


@given(parks)
def test_mark_resent(template: Park) -> None:
    with real_fds(len(template.entries)) as fds:
        msg = with_fds(template, fds)
        assert isinstance(msg, Park)
        items = [mark_resent(encode_park_entry(e)) for e in msg.entries]
        (got,) = decode_all((f.data, f.fds) for f in encode_park(msg.request_id, items, fds))
        want = tuple(attrs.evolve(e, resent=True) for e in msg.entries)
        assert got == Park(msg.request_id, want)


@needs_proc
def test_lean_limits_send_long_tokens_and_pendings_to_the_general_path() -> None:
    """``lean_limits``: an entry over either comes out unusual (its ``ParkEntry`` with it,
    for the container to refuse), with its wire flags; the others stay plain."""
    with real_fds(4) as fds:
        msg = Park(
            7,
            (
                ParkEntry(fds[0], token=b"t" * 4, pending=b"p" * 8),
                ParkEntry(fds[1], token=b"t" * 5, hangup_returns=True),
                ParkEntry(fds[2], pending=b"p" * 9, timeout_returns=True),
                ParkEntry(fds[3]),
            ),
        )
        (f,) = encode(msg)
        dec = Decoder(join_split=False, lean_park=True, lean_limits=(4, 8))
        dec.receive_data(f.data, [os.dup(fd) for fd in f.fds])
        got = dec.next_message()
        assert isinstance(got, LeanPark)
        try:
            unusual = [e[5] for e in got.entries]
            assert unusual[0] is None
            assert unusual[3] is None
            assert unusual[1] == attrs.evolve(msg.entries[1], fd=got.entries[1][0])
            assert unusual[2] == attrs.evolve(msg.entries[2], fd=got.entries[2][0])
            assert [e[4] for e in got.entries] == [0, 0x01, 0x02, 0]  # wire flags only
            pairs = zip(msg.entries, got.entries, strict=True)
            assert unlean(got) == Park(7, tuple(attrs.evolve(e, fd=g[0]) for e, g in pairs))
        finally:
            for fd in message_fds(got):
                os.close(fd)


@needs_proc
def test_lean_limits_do_not_hide_bad_flags() -> None:
    good = park_bytes(1)[8:]
    entry = p("I", 0) + p("B", 0x40) + p("H", 3) + p("I", 0) + b"tok"
    body = p("I", 1) + p("H", 2) + good[6:] + entry
    with real_fds(2) as fds:
        dec = Decoder(join_split=False, lean_park=True, lean_limits=(1, 1))
        dec.receive_data(frame(3, body, nfds=2), [os.dup(fd) for fd in fds])
        with pytest.raises(RemoteProtocolError, match="bad PARK field flags: 0x40"):
            dec.next_message()


# ------------------------------------------- the decoder's whole-frame fast path

#: An empty frame of each list type (its head, no entries) with FLAG_MORE: the
#: frame after it is decoded by the general (split) path, not the fast one.
_SPLIT_START = {
    MessageType.PARK: p("IH", 7, 0),
    MessageType.PARKED: p("II", 7, 0),
    MessageType.WAKE: p("H", 0),
    MessageType.ACK: p("I", 0),
    MessageType.UNPARK: p("I", 0),
    MessageType.CLOSE: p("I", 0),
}

_unusual = ParkEntry(FD, b"tok", b"pend", 5, True, False, rules=3, tags=(b"a",), resent=True)
_wakes = (
    WakeEntry(1, Reason.READABLE, fd=FD),
    WakeEntry(2, Reason.HANGUP, b"t", b"p", inet6=True),
    WakeEntry(3, Reason.UNSENT, fd=FD, autoresponses=2, last_autoresponse_ms=9, unsent=b"u"),
)
_park_body = body_of(Park(7, (ParkEntry(FD, idle_timeout_ms=3, timeout_returns=True),) * 2))
_acks = body_of(Ack((1, 2, 3)))

#: (first type, frame, fds sent with it, decoder options): each decoded alone
#: (the fast path when the frame is whole) and after a split start of the type.
_FAST_CASES = [
    # whole frames of every list type, decoded
    (MessageType.PARK, frame(MessageType.PARK, _park_body, nfds=2), 2, {}),
    (MessageType.PARK, frame(MessageType.PARK, _park_body, nfds=2), 2, {"lean_park": True}),
    *[
        (MessageType.PARK, frame(MessageType.PARK, body, nfds=2), 2, {"lean_park": lean})
        for body in [body_of(Park(7, (ParkEntry(FD, b"x" * 9, b"y"), _unusual)))]
        for lean in (False, True)
    ],
    *[
        (MessageType.PARKED, frame(MessageType.PARKED, body), 0, {"rows": rows})
        for body in [body_of(Parked(7, (ParkResult(Refusal.OK, 5), ParkResult(Refusal.FULL))))]
        for rows in (False, True)
    ],
    *[
        (MessageType.WAKE, frame(MessageType.WAKE, body_of(Wake(w)), nfds=n), n, {"rows": rows})
        for w, n in [(_wakes[:1], 1), (_wakes, 2)]
        for rows in (False, True)
    ],
    (MessageType.ACK, frame(MessageType.ACK, _acks), 0, {}),
    (MessageType.UNPARK, frame(MessageType.UNPARK, body_of(Unpark((9,)))), 0, {}),
    (MessageType.CLOSE, frame(MessageType.CLOSE, body_of(Close((CloseEntry(4, b"bye"),)))), 0, {}),
    # the limits: at them, and one over (entries, then message bytes)
    (MessageType.ACK, frame(MessageType.ACK, _acks), 0, {"max_entries": 3}),
    (MessageType.ACK, frame(MessageType.ACK, _acks), 0, {"max_entries": 2}),
    (MessageType.ACK, frame(MessageType.ACK, _acks), 0, {"max_message": len(_acks)}),
    (MessageType.ACK, frame(MessageType.ACK, _acks), 0, {"max_message": len(_acks) - 1}),
    (MessageType.PARK, frame(MessageType.PARK, _park_body, nfds=2), 2, {"max_entries": 1}),
    *[
        (
            MessageType.PARK,
            frame(MessageType.PARK, _park_body, nfds=2),
            2,
            {"lean_park": True, **kw},
        )
        for kw in [{"max_entries": 1}, {"max_message": len(_park_body) - 1}]
    ],
    # bodies the decoders refuse: truncated, trailing bytes, bad fields, fds
    *[
        (MessageType.PARK, frame(MessageType.PARK, body, nfds=n), n, {"lean_park": lean})
        for body, n in [
            (_park_body[:-1], 2),
            (_park_body + b"\0", 2),
            (_park_body[:4], 0),
            (_park_body[:10] + b"\x80" + _park_body[11:], 2),  # a bad entry flag
            (_park_body, 1),  # 2 entries, 1 fd
        ]
        for lean in (False, True)
    ],
    (MessageType.ACK, frame(MessageType.ACK, _acks[:2]), 0, {}),
    (MessageType.ACK, frame(MessageType.ACK, _acks[:-1]), 0, {}),
    (MessageType.UNPARK, frame(MessageType.UNPARK, _acks + b"\0" * 8), 0, {}),
    (MessageType.PARKED, frame(MessageType.PARKED, p("IIBQ", 7, 1, 99, 1)), 0, {}),
    (MessageType.PARKED, frame(MessageType.PARKED, p("IIBQ", 7, 1, 0, 1) + b"\0"), 0, {}),
    (MessageType.WAKE, frame(MessageType.WAKE, p("HQBBHI", 1, 1, 0, 0, 0, 0)), 0, {}),  # reason 0
    (MessageType.WAKE, frame(MessageType.WAKE, body_of(Wake(_wakes[:1])), nfds=2), 2, {}),
    (MessageType.CLOSE, frame(MessageType.CLOSE, p("IQI", 1, 4, 3) + b"by"), 0, {}),
    # headers the decoder refuses: a bad type, bad flags, fds on a type without them
    (MessageType.ACK, frame(16, b""), 0, {}),
    (MessageType.ACK, frame(MessageType.ACK, _acks, flags=0x02), 0, {}),
    (MessageType.ACK, frame(MessageType.ACK, _acks, flags=FLAG_MORE | 0x80), 0, {}),
    (MessageType.ACK, frame(MessageType.ACK, _acks, nfds=1), 1, {}),
    # a split frame: not a whole message, so never the fast path's
    (MessageType.ACK, frame(MessageType.ACK, _acks, flags=FLAG_MORE), 0, {}),
    (MessageType.PARK, frame(MessageType.PARK, _park_body, flags=FLAG_MORE, nfds=2), 2, {}),
]


def outcome(
    chunks: Sequence[tuple[bytes, int]], dec: Decoder, skip: int = 0
) -> tuple[list[Message], str | None]:
    """Decode, then EOF: the messages after the first ``skip`` (fds as the order
    they were given in) and the error; checks that no fd was lost or leaked."""
    src = FdSource()
    given: list[int] = []
    msgs: list[Message] = []
    error = None
    try:
        for data, n in chunks:
            fds = src.take(n)
            given += fds
            dec.receive_data(data, fds)
            msgs.extend(dec)
        dec.eof()
    except RemoteProtocolError as exc:
        error = str(exc)
    index = {fd: i for i, fd in enumerate(given)}
    returned = [fd for m in msgs for fd in message_fds(m)]
    assert dec.held_fds == 0
    assert [fd for fd in given if fd not in returned and is_open(fd)] == []
    close_fds(returned)
    src.close()
    out = [unlean(m) if isinstance(m, LeanPark) else plain(m) for m in msgs[skip:]]
    return [with_fds(m, [index[fd] for fd in message_fds(m)]) for m in out], error


@needs_proc
@pytest.mark.parametrize(
    ("first", "data", "nfds", "options"), _FAST_CASES, ids=[str(i) for i in range(len(_FAST_CASES))]
)
@pytest.mark.parametrize("join_split", [False, True])
def test_a_whole_frame_decodes_as_the_last_frame_of_a_split_message_does(
    first: MessageType, data: bytes, nfds: int, options: dict[str, int], join_split: bool
) -> None:
    """The fast path (a frame that is a whole message) against the general one:
    the same frame after an empty split start of its type (request id 7), which
    the general path joins to nothing or hands out on its own (``skip``)."""
    before = open_fd_count()
    start = frame(first, _SPLIT_START[first], flags=FLAG_MORE)
    general_options = dict(options)
    if "max_message" in options:  # the split start's bytes count towards the message
        general_options["max_message"] += len(_SPLIT_START[first])
    fast = outcome([(data, nfds)], Decoder(join_split=join_split, **options))  # type: ignore[arg-type]
    general = outcome(
        [(start, 0), (data, nfds)],
        Decoder(join_split=join_split, **general_options),  # type: ignore[arg-type]
        skip=0 if join_split else 1,
    )
    if general[1] is not None and "max_message" in options:  # it names its own limit
        limits = str(general_options["max_message"]), str(options["max_message"])
        general = (general[0], general[1].replace(*limits))
    assert fast == general
    assert open_fd_count() == before


def test_fast_path_cases_cover_messages_and_errors() -> None:
    """The cases above decode what they should and refuse the rest, each for its reason."""
    results = [outcome([(d, n)], Decoder(**o)) for _, d, n, o in _FAST_CASES]  # type: ignore[arg-type]
    assert [len(msgs) for msgs, _ in results[:16]] == [1] * 14 + [0, 1]
    over = f"ACK message is over the limit of {len(_acks) - 1} bytes"
    lean_over = f"PARK message is over the limit of {len(_park_body) - 1} bytes"
    park = ["truncated", "1 trailing bytes in", "truncated"]
    assert [error for _, error in results] == [None] * 14 + [
        "ACK message has over 2 entries",
        None,
        over,
        *["PARK message has over 1 entries"] * 2,
        lean_over,
        *[f"{what} PARK body" for what in park for _ in "lg"],
        *["bad PARK field flags: 0x80"] * 2,
        *["PARK has 2 entries but 1 fds"] * 2,
        "truncated ACK body",
        "bad ACK body: 3 tickets need 24 bytes, got 23",
        "bad UNPARK body: 3 tickets need 24 bytes, got 32",
        "bad PARKED field code: 99",
        "1 trailing bytes in PARKED body",
        "bad WAKE field reason: 0",
        "WAKE has 1 fd entries but 2 fds",
        "truncated CLOSE body",
        "unknown message type 16",
        "bad ACK frame flags 0x2",
        "bad ACK frame flags 0x81",
        "ACK frame cannot carry fds",
        *["connection closed mid-message"] * 2,
    ]
