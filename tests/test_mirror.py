"""The mirror's codec and store, socket-free: what a shard sends is what comes back."""

from __future__ import annotations

import os

import attrs
import pytest

from connpark._errors import RemoteProtocolError
from connpark._mirror import (
    FLAG_CONFIRMED,
    HEADER,
    Decoder,
    Kind,
    Record,
    Store,
    encode_done,
    encode_records,
    encode_tickets,
    encode_woken,
)

from .conftest import open_fd_count


def _fds(n: int) -> list[int]:
    r, w = os.pipe()
    out = [os.dup(r) for _ in range(n)]
    os.close(r)
    os.close(w)
    return out


def _feed(dec: Decoder, frames: list) -> list:  # type: ignore[type-arg]
    out = []
    for f in frames:
        dec.receive_data(f.data, [os.dup(fd) for fd in f.fds])  # as SCM_RIGHTS would
        out.extend(dec)
    return out


def test_records_round_trip_through_frames_and_the_store() -> None:
    before = open_fd_count()
    fds = _fds(300)  # more than one frame's 253
    records = [
        Record(1 << 56 | i, fd, 1_700_000_000_000 + i, i % 8, "pool-é", b"t%d" % i, b"p" * (i % 3))
        for i, fd in enumerate(fds)
    ]
    frames = encode_records(Kind.ADD, records)
    assert [len(f.fds) for f in frames] == [253, 47]
    dec = Decoder()
    store = Store()
    for msg in _feed(dec, frames):
        store.apply(msg)
    assert len(store) == 300
    got = store.records()
    assert [(r.ticket, r.deadline_ms, r.flags, r.pool, r.token, r.pending) for r in got] == [
        (r.ticket, r.deadline_ms, r.flags, r.pool, r.token, r.pending) for r in records
    ]
    assert all(r.woken == 0 for r in got)
    # WOKEN marks the reason, DEL closes the store's copy of the fd.
    for msg in _feed(dec, encode_woken([(records[5].ticket, 4), (12345, 1)])):
        store.apply(msg)
    assert {r.ticket: r.woken for r in store.records()}[records[5].ticket] == 4
    # CONFIRMED: the worker got its PARKED; the flag survives a later WOKEN.
    for msg in _feed(dec, encode_tickets(Kind.CONFIRMED, [records[6].ticket])):
        store.apply(msg)
    flags = {r.ticket: r.flags for r in store.records()}
    assert flags[records[6].ticket] == records[6].flags | FLAG_CONFIRMED
    assert flags[records[7].ticket] == records[7].flags
    for msg in _feed(dec, encode_tickets(Kind.DEL, [r.ticket for r in records[:100]])):
        store.apply(msg)
    assert len(store) == 200
    (done,) = _feed(dec, encode_done())
    assert done.kind is Kind.DONE
    for fd in fds:
        os.close(fd)
    store.close()
    assert open_fd_count() == before


def test_a_broken_mirror_frame_is_an_error_and_closes_its_fds() -> None:
    before = open_fd_count()
    dec = Decoder()
    (frame,) = encode_records(Kind.ADD, [Record(7, 0, 0, 0, "p", b"", b"")])
    fds = _fds(1)
    body = frame.data[HEADER.size :] + b"\x00"  # a byte past the record: trailing
    dec.receive_data(HEADER.pack(len(body), Kind.ADD, 1) + body, fds)
    with pytest.raises(RemoteProtocolError):
        dec.next_message()
    dec.close()
    assert open_fd_count() == before


def test_store_keeps_aliases_replacements_and_data_apart() -> None:
    """Two live tickets with the same fd bits (a restored one and a new one) both
    stay; a record added again replaces (and closes) the old copy."""
    before = open_fd_count()
    fds = _fds(4)
    store = Store()
    old = Record(1 << 56 | 1 << 24 | 7, fds[0], 1, 0, "a", b"tok", b"")
    new = Record(2 << 56 | 5 << 24 | 7, fds[1], 2, 0, "b", b"", b"pend")
    plain = Record(2 << 56 | 6 << 24 | 9, fds[2], 3, 1, "a", b"", b"")
    for r in (old, new, plain):
        store.add(r)
    assert len(store) == 3
    assert {r.ticket: r for r in store.records()} == {r.ticket: r for r in (old, new, plain)}
    again = attrs.evolve(plain, fd=fds[3], deadline_ms=4)
    store.add(again)  # the same ticket: the first copy's fd is closed
    assert len(store) == 3
    assert again in store.records()
    dec = Decoder()
    for msg in _feed(dec, encode_woken([(new.ticket, 4), (old.ticket, 1)])):
        store.apply(msg)
    for msg in _feed(dec, encode_tickets(Kind.CONFIRMED, [new.ticket])):
        store.apply(msg)
    got = {r.ticket: r for r in store.records()}
    assert (got[new.ticket].woken, got[new.ticket].flags) == (4, FLAG_CONFIRMED)
    assert got[old.ticket].woken == 1
    assert got[new.ticket].pending == b"pend"
    assert got[old.ticket].token == b"tok"
    for msg in _feed(dec, encode_tickets(Kind.DEL, [old.ticket, new.ticket])):
        store.apply(msg)
    assert [r.ticket for r in store.records()] == [plain.ticket]
    store.close()
    assert len(store) == 0
    assert open_fd_count() == before
