"""The mirror: a second copy of every parked fd and its record, outside the shard.

A shard sends its supervisor one message per batch, never one per fd:

- ADD: the connections one PARK frame admitted (records + their fds), sent
  before the PARKED answer, so the worker never closes its copy of a
  connection that only a crashing shard held;
- WOKEN: tickets handed to a session (sent before the WAKE is written): after
  a crash they may be in a worker's hands, so they are *quarantined*, not
  re-parked at once;
- CONFIRMED: tickets whose PARKED answer was written (one per PARKED frame);
- DEL: tickets whose fd the shard closed (ACKed, closed, notice sent).

When a shard dies, its replacement gets every record back (RESTORE frames,
then DONE) with the fds, and the same tickets. The supervisor trusts its
shards (its own children); still, nothing here is ever unpickled or evaluated.

Frame: ``!IBH`` (body length, kind, nfds) then the body; a frame's fds go
with its first byte (``_fdpass``). ADD/RESTORE body: per fd, ``!QqBBBHI``
(ticket, deadline in wall-clock ms, flags, woken, pool length, token length,
pending length) then pool, token and pending. WOKEN body: ``!QB`` (ticket,
reason) pairs. DEL body: u64 tickets.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Iterable, Iterator

import attrs

from ._column import Column
from ._errors import RemoteProtocolError
from ._wire import MAX_FDS_PER_FRAME, Frame, close_fds

HEADER = struct.Struct("!IBH")
_ENTRY = struct.Struct(
    "!QqBBBHI"
)  # ticket, deadline_ms, flags, woken, pool len, token len, pending len
_U64 = struct.Struct("!Q")
_WOKEN = struct.Struct("!QB")
#: Body bytes per frame before a batch is split (fds split at 253 anyway).
_MAX_BODY = 1 << 20


class Kind(enum.IntEnum):
    ADD = 1
    WOKEN = 2
    DEL = 3
    RESTORE = 4
    DONE = 5
    #: Their PARKED went out to the worker: it holds no copy of its own any more.
    CONFIRMED = 6


#: In a record's flags: its PARKED was written (CONFIRMED). Without it, after a
#: restart, the parker may still hold the socket and send its park again.
FLAG_CONFIRMED = 0x80


@attrs.frozen
class Record:
    """One parked connection as the mirror keeps it (``fd`` is the holder's copy)."""

    ticket: int
    fd: int
    deadline_ms: int
    flags: int
    pool: str
    token: bytes
    pending: bytes
    #: Handed to a session at some point (the wake's ``Reason``; 0: never): maybe
    #: in a worker's hands.
    woken: int = 0


def encode_records(kind: Kind, records: Iterable[Record]) -> list[Frame]:
    """ADD or RESTORE frames, at most 253 fds and ~1 MiB each."""
    frames: list[Frame] = []
    body = bytearray()
    fds: list[int] = []

    def cut() -> None:
        if fds:
            frames.append(Frame(HEADER.pack(len(body), kind, len(fds)) + bytes(body), tuple(fds)))
            body.clear()
            fds.clear()

    for r in records:
        body += _pack_entry(r)
        fds.append(r.fd)
        if len(fds) == MAX_FDS_PER_FRAME or len(body) > _MAX_BODY:
            cut()
    cut()
    return frames


def encode_tickets(kind: Kind, tickets: Iterable[int]) -> list[Frame]:
    """DEL frames."""
    return _encode_items(kind, [_U64.pack(t) for t in tickets])


def encode_woken(woken: Iterable[tuple[int, int]]) -> list[Frame]:
    """WOKEN frames: (ticket, reason) pairs."""
    return _encode_items(Kind.WOKEN, [_WOKEN.pack(t, r) for t, r in woken])


def _encode_items(kind: Kind, items: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    step = _MAX_BODY // 16
    for i in range(0, len(items), step):
        body = b"".join(items[i : i + step])
        out.append(Frame(HEADER.pack(len(body), kind, 0) + body))
    return out


def encode_done() -> list[Frame]:
    return [Frame(HEADER.pack(0, Kind.DONE, 0))]


@attrs.frozen
class Message:
    kind: Kind
    records: tuple[Record, ...] = ()
    tickets: tuple[int, ...] = ()
    #: WOKEN: the reason of each ticket's wake.
    reasons: tuple[int, ...] = ()


class Decoder:
    """Bytes + fds in, ``Message`` out; owns the fds until it hands them out."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: deque[int] = deque()

    def receive_data(self, data: bytes, fds: Iterable[int] = ()) -> None:
        self._fds.extend(fds)
        self._buf += data

    def __iter__(self) -> Iterator[Message]:
        while (msg := self.next_message()) is not None:
            yield msg

    def next_message(self) -> Message | None:
        buf = self._buf
        if len(buf) < HEADER.size:
            return None
        length, raw, nfds = HEADER.unpack_from(buf)
        if len(buf) < HEADER.size + length:
            return None
        try:
            kind = Kind(raw)
        except ValueError:
            raise RemoteProtocolError(f"unknown mirror message {raw}") from None
        if len(self._fds) < nfds:
            raise RemoteProtocolError(f"mirror frame needs {nfds} fds, {len(self._fds)} arrived")
        body = bytes(buf[HEADER.size : HEADER.size + length])
        del buf[: HEADER.size + length]
        fds = [self._fds.popleft() for _ in range(nfds)]
        if kind in (Kind.ADD, Kind.RESTORE):
            return Message(kind, records=_records(body, fds))
        if fds:
            close_fds(fds)
            raise RemoteProtocolError(f"mirror {kind.name} frame cannot carry fds")
        if kind is Kind.DONE:
            return Message(kind)
        if kind is Kind.WOKEN:
            pairs = list(_WOKEN.iter_unpack(body))
            return Message(
                kind, tickets=tuple(t for t, _ in pairs), reasons=tuple(r for _, r in pairs)
            )
        return Message(kind, tickets=tuple(t for (t,) in _U64.iter_unpack(body)))

    def detach(self) -> tuple[bytes, list[int]]:
        """What is buffered (a frame not complete yet) and its fds: the caller owns them now."""
        out = (bytes(self._buf), list(self._fds))
        self._buf.clear()
        self._fds.clear()
        return out

    def close(self) -> None:
        close_fds(list(self._fds))
        self._fds.clear()
        self._buf.clear()


def _records(body: bytes, fds: list[int]) -> tuple[Record, ...]:
    out = []
    pos = 0
    try:
        for fd in fds:
            ticket, deadline, flags, woken, plen, tlen, nlen = _ENTRY.unpack_from(body, pos)
            pos += _ENTRY.size
            pool = body[pos : pos + plen].decode()
            pos += plen
            token = body[pos : pos + tlen]
            pos += tlen
            pending = body[pos : pos + nlen]
            pos += nlen
            out.append(Record(ticket, fd, deadline, flags, pool, token, pending, woken))
    except (struct.error, UnicodeDecodeError) as exc:
        close_fds(fds)
        raise RemoteProtocolError(f"bad mirror record: {exc}") from exc
    if pos != len(body):
        close_fds(fds)
        raise RemoteProtocolError("mirror frame has trailing bytes")
    return tuple(out)


class Store:
    """The holder's side: ticket -> record and the fd it owns, no I/O.

    Kept in flat columns indexed by the shard's fd number (a ticket's low 24
    bits: unique among one shard's live tickets), 24 B per connection,
    against ~150 B as an object or a packed bytes in a dict: the mirror holds
    a record for every parked connection and reads it back only after a
    crash. Columns, not arrays: they grow without copies in the malloc heap
    the mirror shares with the zygote (``_column``). Token and pending, when
    a park has them, sit in a dict beside; a restored ticket whose fd bits
    another ticket uses goes to a spill dict.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._columns = (
            ticket := Column("Q"),  # 0: free
            fd := Column("i"),
            deadline := Column("q"),
            flags := Column("B"),
            woken := Column("B"),
            pool := Column("H"),
        )
        self._ticket, self._fd, self._deadline = ticket.view, fd.view, deadline.view
        self._flags, self._woken, self._pool = flags.view, woken.view, pool.view
        self._pools: list[str] = []
        self._pool_ids: dict[str, int] = {}
        #: slot -> (token, pending), only where one is not empty.
        self._data: dict[int, tuple[bytes, bytes]] = {}
        #: Tickets whose slot another ticket holds: ticket -> record.
        self._spill: dict[int, Record] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count + len(self._spill)

    def _grow(self, slot: int) -> None:
        if slot >= len(self._ticket):
            for column in self._columns:
                column.reserve(slot + 1)
            ticket, fd, deadline, flags, woken, pool = (c.view for c in self._columns)
            self._ticket, self._fd, self._deadline = ticket, fd, deadline
            self._flags, self._woken, self._pool = flags, woken, pool

    def _pool_id(self, pool: str) -> int:
        pid = self._pool_ids.get(pool)
        if pid is None:
            pid = self._pool_ids[pool] = len(self._pools)
            self._pools.append(pool)
        return pid

    def add(self, r: Record) -> None:
        slot = r.ticket & _SLOT_MASK
        self._grow(slot)
        held = self._ticket[slot]
        if held and held != r.ticket:  # a restored alias: its fd bits are taken
            old = self._spill.pop(r.ticket, None)
            if old is not None:
                close_fds((old.fd,))
            self._spill[r.ticket] = r
            return
        if held:
            close_fds((self._fd[slot],))
        else:
            self._count += 1
        self._ticket[slot] = r.ticket
        self._fd[slot] = r.fd
        self._deadline[slot] = r.deadline_ms
        self._flags[slot] = r.flags
        self._woken[slot] = r.woken
        self._pool[slot] = self._pool_id(r.pool)
        if r.token or r.pending:
            self._data[slot] = (r.token, r.pending)
        else:
            self._data.pop(slot, None)

    def _slot(self, ticket: int) -> int:
        slot = ticket & _SLOT_MASK
        return slot if slot < len(self._ticket) and self._ticket[slot] == ticket else -1

    def _record(self, slot: int) -> Record:
        token, pending = self._data.get(slot, (b"", b""))
        return Record(
            self._ticket[slot],
            self._fd[slot],
            self._deadline[slot],
            self._flags[slot],
            self._pools[self._pool[slot]],
            token,
            pending,
            self._woken[slot],
        )

    def records(self) -> list[Record]:
        """Every record (with the fd we hold)."""
        tickets = self._ticket
        out = [self._record(slot) for slot in range(len(tickets)) if tickets[slot]]
        return out + list(self._spill.values())

    def apply(self, msg: Message) -> None:
        if msg.kind is Kind.ADD:
            for r in msg.records:
                self.add(r)
        elif msg.kind is Kind.WOKEN:
            for t, reason in zip(msg.tickets, msg.reasons, strict=True):
                if (slot := self._slot(t)) >= 0:
                    self._woken[slot] = reason
                elif (spilled := self._spill.get(t)) is not None:
                    self._spill[t] = attrs.evolve(spilled, woken=reason)
        elif msg.kind is Kind.CONFIRMED:
            for t in msg.tickets:
                if (slot := self._slot(t)) >= 0:
                    self._flags[slot] |= FLAG_CONFIRMED
                elif (spilled := self._spill.get(t)) is not None:
                    self._spill[t] = attrs.evolve(spilled, flags=spilled.flags | FLAG_CONFIRMED)
        elif msg.kind is Kind.DEL:
            gone = []
            for t in msg.tickets:
                if (slot := self._slot(t)) >= 0:
                    gone.append(self._fd[slot])
                    self._ticket[slot] = 0
                    self._data.pop(slot, None)
                    self._count -= 1
                elif (spilled := self._spill.pop(t, None)) is not None:
                    gone.append(spilled.fd)
            close_fds(gone)
        else:
            raise RemoteProtocolError(f"a shard does not send {msg.kind.name}")

    def close(self) -> None:
        close_fds([r.fd for r in self.records()])
        for column in self._columns:
            column.close()
        self._reset()


#: A ticket's shard-local fd bits (``_lot.FD_BITS``): the store's slot.
_SLOT_MASK = (1 << 24) - 1


def _pack_entry(r: Record) -> bytes:
    pool = r.pool.encode()
    head = _ENTRY.pack(
        r.ticket, r.deadline_ms, r.flags, r.woken, len(pool), len(r.token), len(r.pending)
    )
    return head + pool + r.token + r.pending
