"""The parking table: who owns each connection, when it wakes, where it goes. No I/O.

Theory of operation
-------------------
A parked connection is a ``Slot``. Its life is an explicit transition table
(``TRANSITIONS``); at every instant exactly one side owns the connection::

    PARKED --wake(reason)--> QUEUED --assign--> SENT --written--> WRITTEN --ack--> (gone)
       |                       ^   ^              |                   |
       +--close--> (gone)      |   +--not written-+                   |
                               +--- the worker can no longer read it --+

- PARKED: in the watcher, with an idle deadline in the heap.
- QUEUED: woken, waiting for a session of its pool with room in its window
  (or, with no session at all, for the orphan timeout).
- SENT: assigned to one session, not yet written to its socket. If that
  session ends first, it goes straight back to QUEUED: the worker never saw it.
- WRITTEN: its fd went out to the session; the container keeps its copy until
  the ACK (an ACK of a SENT slot is ignored: its fd may still be queued). It
  goes back to QUEUED only once the worker can no longer read it (its end of
  the socket is closed and nothing we wrote is left unread); a session that
  stays open past the grace period keeps it (``abandon``): one owner, always.

A session whose oldest un-ACKed wake is older than ``ack_deadline`` (a frozen
worker) gets no new wakes while another session of its pool has room.

Waking a slot that is not PARKED is a no-op (recall races: an UNPARK that
crosses a READABLE wake). The caller does the I/O the lot asks for: it
unregisters and closes fds, and writes each session's ``outq``.

Memory: a slot is one slotted object (~200 B with its ints) while it is
looked at; a plain one still PARKED a second later is **packed** (``pack``):
its ticket, deadline, flags and parker go into arrays indexed by fd (~40 B),
the object is retired (``MOVED``), and looking the connection up by fd or
ticket (a wake, an UNPARK, expiry) makes a new object. The table is a list
indexed by fd (not a dict), and tickets encode the fd so lookups need no map. Deadlines are
rounded up to a tick (``due_ms``: at most 1/64 of the timeout, 1 s at most),
so the parks of a tick share one timer entry: a dict of tick -> fds
(``array('i')``, 4 B per connection) and a heap of the ticks, lazily pruned.
"""

from __future__ import annotations

import enum
import heapq
import math
import operator
from array import array
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import Any

from ._column import Column
from ._errors import InternalError
from ._tags import TagIndex
from ._wire import TICKET_SHARD_SHIFT, Reason

FD_BITS = 24
_FD_MASK = (1 << FD_BITS) - 1
#: A ticket is ``epoch << 56 | shard << 48 | seq << 24 | fd``: the epoch (how
#: many times this shard was started) keeps tickets unique across restarts,
#: restored ones valid; the shard tells a worker where to send an UNPARK.
EPOCH_SHIFT = 56
SHARD_SHIFT = TICKET_SHARD_SHIFT
_LOCAL_MASK = (1 << SHARD_SHIFT) - 1
#: Sequence numbers per epoch: past it the Lot moves to an epoch no live ticket
#: uses, so a ticket is not issued twice in 256 x 2**24 parks.
SEQ_LIMIT = 1 << (SHARD_SHIFT - FD_BITS)
#: The coarsest deadline tick (ms): a timeout of a minute or more fires <= 1 s late.
MAX_TICK_MS = 1024


def due_ms(now: float, idle: float) -> int:
    """The deadline ``idle`` seconds after ``now``, in whole ms rounded up to a
    tick: a power of two of at most 1/64 of ``idle`` (1 ms to ``MAX_TICK_MS``).

    Never early, at most ~1.6% late: in return every park of a tick shares one
    timer entry, so a deadline costs 4 B per connection instead of ~56.
    """
    ms = math.ceil((now + idle) * 1000)
    tick = min(MAX_TICK_MS, 1 << max(0, (int(idle * 1000) >> 6).bit_length() - 1))
    return max(tick, -(-ms // tick) * tick)


class State(enum.IntEnum):
    PARKED = 1
    QUEUED = 2
    SENT = 3
    WRITTEN = 4
    GONE = 5
    #: Not a connection's state: this object was retired when the lot packed its
    #: connection (still PARKED there); look the connection up again (fd, ticket).
    MOVED = 6


#: Allowed transitions; anything else raises ``InternalError`` in ``_move``.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.PARKED: frozenset({State.QUEUED, State.GONE}),
    State.QUEUED: frozenset({State.SENT, State.GONE}),
    State.SENT: frozenset({State.WRITTEN, State.QUEUED, State.GONE}),
    State.WRITTEN: frozenset({State.QUEUED, State.GONE}),
    State.GONE: frozenset(),
    State.MOVED: frozenset(),
}

# Bound once: an enum member costs an attribute lookup on its class each time
# it is named, and the hot paths below name them once per connection.
_PARKED, _QUEUED, _SENT, _WRITTEN, _GONE, _MOVED = (
    State.PARKED,
    State.QUEUED,
    State.SENT,
    State.WRITTEN,
    State.GONE,
    State.MOVED,
)
_NO_DATA = (b"", b"")
_READABLE = Reason.READABLE
_REQUESTED = Reason.REQUESTED
_REQUESTED_NAME = _REQUESTED.name

HANGUP_RETURNS = 1
TIMEOUT_RETURNS = 2
INET6 = 4
#: Its PARKED answer has not been written yet: its wake may only go to its
#: parker (stream order then puts PARKED first), or the parker, never told,
#: would send it again while another worker has it. (The container sets it
#: only when the PARKED could not be written at once: the usual one is.)
UNCONFIRMED = 8
#: ``pack`` found it PARKED (and confirmed) once: it packs it the next time, so
#: only a connection parked over a second is packed, never one about to be woken.
SEEN = 16


class Slot:
    """One parked connection. ``fd`` is -1 once the container closed it (a notice)."""

    __slots__ = (
        "extra",
        "fd",
        "flags",
        "key",
        "pending",
        "pool",
        "reason",
        "session",
        "state",
        "ticket",
        "token",
    )

    def __init__(
        self,
        ticket: int,
        fd: int,
        token: bytes,
        pending: bytes,
        flags: int,
        pool: Pool,
        session: SessionState | None = None,
    ) -> None:
        self.ticket = ticket
        self.fd = fd
        self.token = token
        self.pending = pending
        self.flags = flags
        self.pool = pool
        self.state = _PARKED
        #: PARKED: its deadline tick (ms; 0: none). QUEUED/SENT: when readiness was seen.
        self.key: float | int = 0
        self.reason = _READABLE
        #: The session this slot's wake should go to first (its parker, or its asker).
        self.session = session
        #: ``_serving.Extra`` for a park with rules or tags (or bytes left unsent), else
        #: None: a plain park pays one pointer for the feature.
        self.extra: Any = None

    def data(self) -> tuple[bytes, bytes]:
        """(token, pending): what goes back with the connection."""
        return self.token, self.pending

    def returns_fd(self, reason: Reason) -> bool:
        if reason is Reason.HANGUP:
            return bool(self.flags & HANGUP_RETURNS)
        if reason is Reason.TIMEOUT:
            return bool(self.flags & TIMEOUT_RETURNS)
        return True


_new_slot = Slot.__new__
#: What the by-fd table holds at a packed connection's fd (a ticket matches none).
_PACKED = _new_slot(Slot)
_PACKED.ticket = -1
_PACKED.state = State.MOVED
_PACKED.key = 0
_PACKED.extra = None
#: How often ``pack`` runs while some parked connection is still an object (seconds).
PACK_EVERY = 1.0
_ticket_of = operator.attrgetter("ticket")
_index_of = operator.attrgetter("index")


class SessionState:
    """The lot's view of one worker session: its pool, window and wakes in flight."""

    __slots__ = ("alive", "id", "inflight", "logged", "name", "outq", "pool", "rank", "sent_log")

    def __init__(self, session_id: int, pool: Pool, name: str = "") -> None:
        self.id = session_id
        self.pool = pool
        self.name = name
        #: Its place among the pool's sessions (``Lot.add_session``): ties in
        #: load go to the one that came first.
        self.rank = 0
        #: Takes new wakes (False once the session is ending).
        self.alive = True
        #: Slots assigned to this session, not yet ACKed (SENT or WRITTEN).
        self.inflight: dict[int, Slot] = {}
        #: Assigned slots the writer has not taken yet.
        self.outq: list[Slot] = []
        #: (assigned at, slots) in assignment order: finds the oldest un-ACKed wake.
        self.sent_log: deque[tuple[float, list[Slot]]] = deque()
        #: Slots in ``sent_log`` (ACKed ones too, until they are dropped).
        self.logged = 0

    @property
    def load(self) -> int:
        return len(self.inflight)


def _more(size: int, fd: int) -> int:
    """How far to grow a table of ``size`` to hold ``fd``: doubling, so that the
    copies (each in the malloc heap shared with the zygote) stay few."""
    return max(fd + 1 - size, size, 64)


class Pool:
    """A named group of interchangeable sessions, and the wakes waiting for one."""

    __slots__ = ("by_load", "held", "index", "name", "sessions", "waiting")

    def __init__(self, name: str, index: int = 0) -> None:
        #: Its number in its lot (the packed table names pools by number).
        self.index = index
        self.name = name
        self.sessions: list[SessionState] = []
        #: A heap of (load, rank, session), updated lazily (``Lot._pick``): each
        #: live session has an entry no higher than its load (pushed when it
        #: joins and when its load drops), so a route costs O(log sessions).
        self.by_load: list[tuple[int, int, SessionState]] = []
        self.waiting: deque[Slot] = deque()
        #: Its connections in the lot (any state but GONE): while there are
        #: some, or sessions, the lot keeps the pool (``drop_unused``).
        self.held = 0


class Lot:
    """Every parked connection, its deadline, and where its wake goes."""

    def __init__(
        self,
        *,
        window: int = 1024,
        orphan_timeout: float = 60.0,
        ack_deadline: float = math.inf,
        epoch: int = 0,
        shard: int = 0,
    ) -> None:
        self.window = window
        self._epoch = (epoch & 0xFF) << EPOCH_SHIFT | (shard & 0xFF) << SHARD_SHIFT
        #: Restored tickets whose fd number changed with the process: ticket -> slot
        #: (its fd while it is packed).
        self._alias: dict[int, Slot | int] = {}
        self.orphan_timeout = orphan_timeout
        #: A session with an un-ACKed wake older than this is routed around.
        self.ack_deadline = ack_deadline
        self._by_fd: list[Slot | None] = []
        #: Deadline tick (ms) -> the fds parked with it; a heap of those ticks.
        self._due: dict[int, array[int]] = {}
        self._ticks: list[int] = []
        #: Entries in ``_due``, and how many of them no longer stand for a deadline.
        self._entries = 0
        self._stale = 0
        #: Tick -> stale entries there since its last sweep (``_staled``), and
        #: how many ticks a sweep left empty (kept till due: one heap entry each).
        self._tick_stale: dict[int, int] = {}
        self._empty = 0
        self._pool_list: list[Pool] = []
        #: Numbers of dropped pools (``drop_unused``), for new pools to take.
        self._free_pool_ix: list[int] = []
        #: Live sessions by id (a packed connection names its parker by id).
        self._sessions: dict[int, SessionState] = {}
        self._ranks = 0  # sessions added (``SessionState.rank``)
        #: Pools that had no session when a wake waited in them: the only ones
        #: ``next_orphan_deadline`` (each flush) and ``orphans`` look at.
        self._orphan_pools: set[Pool] = set()
        #: Packed PARKED connections, by fd (``pack``): ticket (0: none), deadline
        #: tick, flags, pool, parker; token and pending only where one is not empty.
        self._pcolumns = (Column("Q"), Column("q"), Column("B"), Column("I"), Column("Q"))
        self._pticket, self._pkey, self._pflags, self._ppool, self._psession = (
            c.view for c in self._pcolumns
        )
        self._pdata: dict[int, tuple[bytes, bytes]] = {}
        self._packed = 0
        self._pack_at = 0.0
        #: fds of parked objects that may be packable (parked, restored or unpacked
        #: since ``pack``, or left unconfirmed by it): all ``pack`` looks at; no
        #: ``pack`` timer while there are none.
        self._fresh: array[int] = array("i")
        #: The last sequence number used in the current epoch.
        self._seq = 0
        self.pools: dict[str, Pool] = {}
        #: Sessions whose ``outq`` gained slots since the caller last looked.
        self.dirty: set[SessionState] = set()
        #: Slots per state, indexed by State (index 0 unused).
        self._counts = [0] * (max(State) + 1)
        self.woken_total: Counter[str] = Counter()
        self.orphans_closed = 0
        #: Tags of PARKED slots (a slot leaves it when it leaves PARKED).
        self.tags = TagIndex()

    # -- lookups -----------------------------------------------------------

    def pool(self, name: str) -> Pool:
        pool = self.pools.get(name)
        if pool is None:
            if self._free_pool_ix:  # a dropped pool's number: no packed entry names it
                pool = self.pools[name] = Pool(name, self._free_pool_ix.pop())
                self._pool_list[pool.index] = pool
            else:
                pool = self.pools[name] = Pool(name, len(self._pool_list))
                self._pool_list.append(pool)
        return pool

    def drop_unused(self, names: Iterable[str]) -> list[str]:
        """Forget the pools of ``names`` that have no session and no connection
        (pool names are the peers' choice: unused ones must not pile up).
        Returns the names dropped; a session of one later makes it anew."""
        dropped = []
        for name in names:
            pool = self.pools.get(name)
            if pool is not None and not pool.sessions and not pool.held:
                del self.pools[name]
                pool.waiting.clear()  # (GONE slots only: a QUEUED one counts in ``held``)
                self._orphan_pools.discard(pool)
                self._free_pool_ix.append(pool.index)
                dropped.append(name)
        return dropped

    def by_fd(self, fd: int) -> Slot | None:
        slot = self._by_fd[fd] if 0 <= fd < len(self._by_fd) else None
        return self._unpack(fd) if slot is _PACKED else slot

    def find(self, ticket: int) -> Slot | None:
        """The slot holding ``ticket``'s fd, if that ticket is still in the container."""
        fd = ticket & _FD_MASK
        slot = self._by_fd[fd] if fd < len(self._by_fd) else None
        if slot is not None:
            if slot.ticket == ticket:
                return slot
            if slot is _PACKED and self._pticket[fd] == ticket:
                return self._unpack(fd)
        if self._alias:
            found = self._alias.get(ticket)
            return self._unpack(found) if isinstance(found, int) else found
        return None

    def slots(self) -> list[Slot]:
        """Every connection's slot (packed ones unpacked: for a shutdown, not a hot path)."""
        self._unpack_all()
        return [s for s in self._by_fd if s is not None]

    def parked_slots(self) -> list[Slot]:
        self._unpack_all()
        return [s for s in self._by_fd if s is not None and s.state is State.PARKED]

    # -- packing ---------------------------------------------------------------

    @property
    def packed(self) -> int:
        """PARKED connections held packed (the rest of ``parked`` are objects)."""
        return self._packed

    def next_pack(self) -> float | None:
        """When ``pack`` should run next; None while no parked object may be packable."""
        return self._pack_at if self._fresh else None

    def pack(self, now: float) -> int:
        """Pack every plain PARKED slot whose PARKED answer went out and that the
        last ``pack`` found so already (``SEEN``): ~40 B instead of ~200 each.
        Returns how many. Slots with rules or tags and unconfirmed ones stay
        objects. Looks only at the fds parked, restored or unpacked since (or, if
        those outnumber the table, at the table): bounded either way.
        """
        self._pack_at = now + PACK_EVERY
        by_fd = self._by_fd
        if len(by_fd) > len(self._pticket):
            for column in self._pcolumns:
                column.reserve(len(by_fd))
            self._pticket, self._pkey, self._pflags, self._ppool, self._psession = (
                c.view for c in self._pcolumns
            )
        tickets, keys, flags, pools, sessions, data = (
            self._pticket,
            self._pkey,
            self._pflags,
            self._ppool,
            self._psession,
            self._pdata,
        )
        parked, moved = _PARKED, _MOVED
        n = 0
        fresh, later = self._fresh, array("i")
        # Listed more often than the table has fds (a park+wake storm, each fd many
        # times over): the table is the shorter walk.
        for fd in fresh if len(fresh) <= len(by_fd) else range(len(by_fd)):
            slot = by_fd[fd]  # (an fd listed twice: _PACKED the second time)
            if slot is None or slot.state is not parked or slot.extra is not None:
                continue
            if not slot.flags & SEEN:  # parked since the last pack: next time, if still parked
                later.append(fd)
                continue
            if slot.ticket & _FD_MASK != fd:  # restored under another fd number
                self._alias[slot.ticket] = fd
            tickets[fd] = slot.ticket
            keys[fd] = slot.key  # type: ignore[assignment]
            flags[fd] = slot.flags & ~SEEN  # unpacked, it is new to ``pack`` again
            pools[fd] = slot.pool.index
            session = slot.session
            sessions[fd] = 0 if session is None else session.id  # ids start at 1
            if slot.token or slot.pending:
                data[fd] = (slot.token, slot.pending)
            by_fd[fd] = _PACKED
            slot.state = moved  # retired: nothing may act on this object any more
            n += 1
        for fd in later:  # seen now (not in the walk: an fd may be listed twice)
            slot = by_fd[fd]
            if slot is not None and not slot.flags & UNCONFIRMED:  # (else its PARKED
                slot.flags |= SEEN  # is still on its way)
        self._packed += n
        self._fresh = later
        return n

    def _unpack(self, fd: int) -> Slot:
        """The packed connection at ``fd`` as an object again (still PARKED); its
        parker, if that session has ended since, is gone (None: as a restored one)."""
        if self._by_fd[fd] is not _PACKED:
            raise InternalError(f"fd {fd}: not packed")
        token, pending = self._pdata.pop(fd, _NO_DATA)
        slot = Slot(
            self._pticket[fd],
            fd,
            token,
            pending,
            self._pflags[fd],
            self._pool_list[self._ppool[fd]],
            self._sessions.get(self._psession[fd]),
        )
        slot.key = self._pkey[fd]
        self._pticket[fd] = 0
        self._by_fd[fd] = slot
        self._packed -= 1
        self._fresh.append(fd)
        if slot.ticket & _FD_MASK != fd:
            self._alias[slot.ticket] = slot
        return slot

    def _unpack_all(self) -> None:
        if self._packed:
            for fd, slot in enumerate(self._by_fd):
                if slot is _PACKED:
                    self._unpack(fd)

    # -- transitions ---------------------------------------------------------

    @property
    def parked(self) -> int:
        return self._counts[State.PARKED]

    @property
    def queued(self) -> int:
        return self._counts[State.QUEUED]

    @property
    def sent(self) -> int:
        """Wakes assigned to a session and not ACKed (written or not)."""
        return self._counts[State.SENT] + self._counts[State.WRITTEN]

    def _move(self, slot: Slot, new: State) -> None:
        old = slot.state
        if new not in TRANSITIONS[old]:
            raise InternalError(f"ticket {slot.ticket:#x}: {old.name} -> {new.name}")
        counts = self._counts
        counts[old] -= 1
        counts[new] += 1
        slot.state = new

    def _move_all(self, old: State, new: State, n: int) -> None:
        """Count ``n`` slots moving ``old`` -> ``new``, checked against the table once.

        The batch form of ``_move`` for the hot path: the caller has checked
        that each slot is in ``old`` (else ``InternalError``) and sets its state.
        """
        if new not in TRANSITIONS[old]:
            raise InternalError(f"{n} slots: {old.name} -> {new.name}")
        counts = self._counts
        counts[old] -= n
        counts[new] += n

    def park(
        self,
        fd: int,
        *,
        token: bytes,
        pending: bytes,
        flags: int,
        session: SessionState,
        deadline_ms: int,
    ) -> Slot:
        """Record a new parked fd (already validated and in the watcher) with its
        deadline (``due_ms``)."""
        return self.park_many(session, (fd,), (token,), (pending,), (flags,), (deadline_ms,))[0][0]

    def park_many(
        self,
        session: SessionState,
        fds: Sequence[int],
        tokens: Sequence[bytes],
        pendings: Sequence[bytes],
        flags: Sequence[int],
        deadlines: Sequence[int],
    ) -> tuple[list[Slot], list[int]]:
        """``park`` for the hot path, a PARK frame at once, in columns: fds, tokens,
        pending bytes, flags, ``due_ms`` deadlines. Returns their slots and
        tickets, in order."""
        n = len(fds)
        if not n:
            return [], []
        by_fd = self._by_fd
        top = max(fds)
        if top >= len(by_fd):
            by_fd.extend([None] * _more(len(by_fd), top))
        if any(map(by_fd.__getitem__, fds)) or len(set(fds)) != n:
            raise InternalError(f"an fd of {list(fds)} parked twice")
        seq = self._seq
        if seq + n >= SEQ_LIMIT:
            self._next_epoch()
            seq = 0
        self._seq = seq + n
        pool = session.pool
        parked, readable = _PARKED, _READABLE
        slots: list[Slot] = []
        keep = slots.append
        # A ticket is its fd and a sequence number (a step each) over the epoch.
        base = self._epoch | seq << FD_BITS
        step = 1 << FD_BITS
        tickets = list(map(operator.or_, range(base + step, base + step * (n + 1), step), fds))
        for ticket, fd, token, pending, flag, deadline_ms in zip(
            tickets, fds, tokens, pendings, flags, deadlines, strict=True
        ):
            # Slot(...) inlined: calling the class costs three times these stores.
            # Keep in step with Slot.__init__.
            slot = _new_slot(Slot)
            slot.ticket = ticket
            slot.fd = fd
            slot.token = token
            slot.pending = pending
            slot.flags = flag
            slot.pool = pool
            slot.state = parked
            slot.key = deadline_ms
            slot.reason = readable
            slot.session = session
            slot.extra = None
            by_fd[fd] = slot
            keep(slot)
        first = deadlines[0]
        if deadlines.count(first) == n:  # a frame's entries mostly share one
            self._timer(first).extend(fds)
        else:
            for fd, deadline_ms in zip(fds, deadlines, strict=True):
                self._timer(deadline_ms).append(fd)
        self._fresh.extend(fds)
        self._counts[parked] += n
        pool.held += n
        self._entries += n
        return slots, tickets

    def _timer(self, tick: int) -> array[int]:
        """The fds due at ``tick`` (a new, empty entry the first time)."""
        fds = self._due.get(tick)
        if fds is None:
            if self._empty > len(self._due) // 2 + 512:  # swept empty: drop them now
                self._due = {t: a for t, a in self._due.items() if a}
                self._ticks = list(self._due)
                heapq.heapify(self._ticks)
                self._empty = 0
            fds = self._due[tick] = array("i")
            heapq.heappush(self._ticks, tick)
        elif not fds:
            self._empty -= 1  # (the caller adds to it)
        return fds

    def _next_epoch(self) -> None:
        """The sequence ran out: the next epoch that no live ticket uses."""
        shard = self._epoch & ~(0xFF << EPOCH_SHIFT)
        live = {slot.ticket >> EPOCH_SHIFT for slot in self._by_fd if slot is not None}
        live |= {ticket >> EPOCH_SHIFT for ticket in self._alias}
        live |= {ticket >> EPOCH_SHIFT for ticket in self._pticket if ticket}
        current = self._epoch >> EPOCH_SHIFT
        for step in range(1, 257):
            epoch = (current + step) & 0xFF
            if epoch not in live:
                break
        self._epoch = epoch << EPOCH_SHIFT | shard

    def restore(
        self,
        ticket: int,
        fd: int,
        *,
        token: bytes,
        pending: bytes,
        flags: int,
        pool: str,
        deadline_ms: int,
    ) -> Slot:
        """A connection back from the mirror after a restart: same ticket, any fd number."""
        if fd >= len(self._by_fd):
            self._by_fd.extend([None] * _more(len(self._by_fd), fd))
        if self._by_fd[fd] is not None:
            raise InternalError(f"fd {fd} parked twice")
        slot = Slot(ticket, fd, token, pending, flags, self.pool(pool))
        slot.pool.held += 1
        self._counts[State.PARKED] += 1
        self._by_fd[fd] = slot
        slot.key = deadline_ms
        self._timer(deadline_ms).append(fd)
        self._entries += 1
        self._fresh.append(fd)
        if ticket & _FD_MASK != fd:
            self._alias[ticket] = slot
        return slot

    def wake(
        self, slot: Slot, reason: Reason, now: float, *, to: SessionState | None = None
    ) -> bool:
        """PARKED -> QUEUED and route it. False (a no-op) if it was not parked.

        The caller has unregistered the fd and, for a notice, closed it and
        called ``forget_fd`` first.
        """
        if slot.state is not State.PARKED:
            return False
        self._untag(slot)
        self._move(slot, State.QUEUED)
        self._drop_deadline(slot)
        slot.reason = reason
        slot.key = now
        if to is not None:
            slot.session = to
        self.woken_total[reason.name] += 1
        self._route(slot, now)
        return True

    def unpark(self, session: SessionState, tickets: Sequence[int], now: float) -> list[Slot]:
        """UNPARK: wake (REQUESTED) the tickets still PARKED in the session's pool, and
        send them to it first. Returns them: the caller takes their fds out of the watcher.

        The batch form of ``wake(slot, REQUESTED, now, to=session)`` for each
        (the same routing as ``_route``); unknown, other pools' and not-parked
        tickets are no-ops.
        """
        # To the asker while it has room and is not frozen (UNCONFIRMED: in any case).
        alive = session.alive
        room = 0
        if alive:
            room = self.window - len(session.inflight)
            if room > 0 and self.ack_deadline != math.inf and self.stale(session, now):
                room = 0
        by_fd = self._by_fd
        alias = self._alias
        pool = session.pool
        inflight = session.inflight
        parked, queued, sent, requested = _PARKED, _QUEUED, _SENT, _REQUESTED
        fd_mask = _FD_MASK
        mine: list[Slot] = []  # assigned to the session: SENT
        others: list[Slot] = []  # QUEUED: routed below
        take, defer = mine.append, others.append
        stale: list[int] = []  # the ticks of their timer entries
        staled = stale.append
        try:  # each ticket's slot by its fd (the ticket's low bits), at C speed
            held = list(map(by_fd.__getitem__, map(operator.and_, tickets, repeat(fd_mask))))
        except IndexError:  # an fd number above any we hold
            size = len(by_fd)
            held = [by_fd[t & fd_mask] if t & fd_mask < size else None for t in tickets]
        for ticket, slot in zip(tickets, held, strict=True):
            if slot is None or slot.ticket != ticket:
                fd = ticket & fd_mask
                if slot is _PACKED and self._pticket[fd] == ticket:
                    slot = self._unpack(fd)
                else:
                    found = alias.get(ticket) if alias else None
                    if found is None:
                        continue
                    slot = self._unpack(found) if isinstance(found, int) else found
            if slot.state is not parked or slot.pool is not pool:
                continue  # (a ticket twice in the list: not parked the second time)
            if slot.key:
                staled(slot.key)  # type: ignore[arg-type]  # (PARKED: an int tick)
            slot.key = now
            slot.reason = requested
            slot.session = session
            if slot.extra is not None:
                self._untag(slot)
            if room > 0 or (alive and slot.flags & UNCONFIRMED):
                room -= 1
                slot.state = sent
                inflight[ticket] = slot
                take(slot)
            else:
                slot.state = queued
                defer(slot)
        woke = len(mine) + len(others)
        if not woke:
            return mine
        self._move_all(parked, queued, woke)
        self._move_all(queued, sent, len(mine))
        self.woken_total[_REQUESTED_NAME] += woke
        if stale:
            if stale.count(stale[0]) == len(stale):  # one frame's parks share a tick, mostly
                self._staled(stale[0], len(stale))
            else:
                for tick, n in Counter(stale).items():
                    if self._staled(tick, n):
                        # The timer was rebuilt from the parked connections (not
                        # these): the other ticks' entries of theirs are gone
                        # already; counted stale, a tick could be swept empty
                        # without a look, its live deadlines lost.
                        break
        if mine:
            session.outq.extend(mine)
            self._log_sent(session, now, mine)
            self.dirty.add(session)
        for slot in others:
            self._route(slot, now)  # another session, or the pool's queue
        mine.extend(others)
        return mine

    def forget_fd(self, slot: Slot) -> None:
        """The slot's fd was closed by the container: it travels on as a notice."""
        if slot.fd >= 0 and self._by_fd[slot.fd] is slot:
            self._by_fd[slot.fd] = None
        slot.fd = -1

    def _drop_deadline(self, slot: Slot) -> None:
        """The slot's timer entry (if ``expired`` has not taken it) is stale now."""
        if slot.key:
            tick = int(slot.key)
            slot.key = 0
            self._staled(tick, 1)

    def _staled(self, tick: int, n: int) -> bool:
        """``n`` timer entries at ``tick`` are stale now. Once over half of a tick's
        are, that tick is swept (``_sweep``): wakes never make the lot walk
        every parked connection (a whole-table compaction paused the container
        ~2 ms at 10,000 parked, ~20 ms at 100,000), only the tick they left.
        True if it compacted the whole timer (no stale entry is left anywhere)."""
        fds = self._due.get(tick)
        if fds is None:
            return False  # (``expired`` took that tick already)
        self._stale += n
        count = self._tick_stale[tick] = self._tick_stale.get(tick, 0) + n
        if 2 * count > len(fds):
            self._sweep(tick, fds)
        elif self._stale > 1024 and self._stale > self._entries // 2:
            self._compact()  # (stale entries spread thin over many ticks)
            return True
        return False

    def _sweep(self, tick: int, fds: array[int]) -> None:
        """Keep only the entries at ``tick`` that still stand for a deadline (an
        emptied tick stays, with its heap entry, until ``_timer`` drops it)."""
        if self._tick_stale.pop(tick) >= len(fds):  # all stale (the usual: a frame
            live = array("i")  # parked and woken at once): nothing to look at
        else:
            by_fd, keys, parked, packed = self._by_fd, self._pkey, _PARKED, _PACKED
            live = array("i")
            keep = live.append
            for fd in fds:
                slot = by_fd[fd]
                if slot is packed:
                    if keys[fd] == tick:
                        keep(fd)
                elif slot is not None and slot.key == tick and slot.state is parked:
                    keep(fd)
            if len(set(live)) != len(live):
                # An fd number reused within the tick (a connection closed, the
                # next park got its number): both entries looked live; one is
                # not. Kept once, the stale counts stay exact, so no tick is
                # ever over half stale unswept and ``_compact`` stays a backstop.
                live = array("i", dict.fromkeys(live))
        gone = len(fds) - len(live)
        self._stale -= gone
        self._entries -= gone
        self._due[tick] = live
        if not live:
            self._empty += 1

    def remove(self, slot: Slot) -> None:
        """Drop a slot (closed by request, ACKed, or orphaned); caller closed its fd."""
        if State.GONE not in TRANSITIONS[slot.state]:  # before anything changes
            raise InternalError(f"ticket {slot.ticket:#x}: {slot.state.name} -> GONE")
        if slot.state is State.PARKED:
            self._untag(slot)
            self._drop_deadline(slot)
        self.forget_fd(slot)
        self._move(slot, State.GONE)
        slot.pool.held -= 1
        if self._alias:
            self._alias.pop(slot.ticket, None)

    def tag(self, slot: Slot, tags: tuple[bytes, ...]) -> tuple[bytes, ...]:
        """Index a PARKED slot's tags; returns them as shared objects to keep in the slot."""
        return self.tags.add(slot.pool.name, tags, slot)

    def _untag(self, slot: Slot) -> None:
        extra = slot.extra
        if extra is not None and extra.tags:
            self.tags.discard(slot.pool.name, extra.tags, slot)

    def touch(self, slot: Slot, deadline_ms: int) -> None:
        """Move a PARKED slot's idle deadline to ``deadline_ms`` (``due_ms``; an
        auto-response resets it)."""
        if slot.state is State.PARKED and slot.key != deadline_ms:
            old = int(slot.key)
            slot.key = deadline_ms
            self._timer(deadline_ms).append(slot.fd)
            self._entries += 1
            if old:
                self._staled(old, 1)  # the old timer entry

    def stale(self, session: SessionState, now: float) -> bool:
        """The session's oldest un-ACKed wake is older than the ACK deadline (frozen?)."""
        log = session.sent_log
        live = session.inflight.keys()
        while log:
            at, group = log[0]
            if now - at <= self.ack_deadline:
                return False  # the oldest logged is recent: so is every un-ACKed one
            if not live.isdisjoint(map(_ticket_of, group)):
                return True
            log.popleft()  # all ACKed
            session.logged -= len(group)
        return False

    def _route(self, slot: Slot, now: float) -> None:
        """QUEUED slot: its own session if alive with room and not frozen, else the best."""
        target = slot.session
        if slot.flags & UNCONFIRMED and target is not None and target.alive:
            self._assign(slot, target, now)
            return
        if (
            target is None
            or not target.alive
            or len(target.inflight) >= self.window
            or (self.ack_deadline != math.inf and self.stale(target, now))
        ):
            target = self._pick(slot.pool, now)
        if target is None:
            slot.pool.waiting.append(slot)
            if not slot.pool.sessions:
                self._orphan_pools.add(slot.pool)
            return
        self._assign(slot, target, now)

    def _pick(self, pool: Pool, now: float) -> SessionState | None:
        """The least-loaded session with room, preferring those not past the ACK
        deadline (the first to come among equals): the top of ``pool.by_load``
        once its entries there are checked against the sessions' loads."""
        heap = pool.by_load
        frozen: list[tuple[int, int, SessionState]] = []
        best = None
        while heap:
            load, rank, s = heap[0]
            if not s.alive:
                heapq.heappop(heap)
            elif load != len(s.inflight):  # it grew since: its true place
                heapq.heapreplace(heap, (len(s.inflight), rank, s))
            elif load >= self.window:
                break  # (and so are all the others)
            elif self.ack_deadline != math.inf and self.stale(s, now):
                frozen.append(heapq.heappop(heap))
            else:
                best = s
                break
        for entry in frozen:
            heapq.heappush(heap, entry)
        if best is None and frozen:
            best = frozen[0][2]  # the least-loaded of those past the deadline
        return best

    def _lighter(self, session: SessionState) -> None:
        """The session's load dropped: its entry in its pool's heap (``_pick``)."""
        if session.alive:
            pool = session.pool
            heap = pool.by_load
            if len(heap) > 2 * len(pool.sessions) + 16:  # old entries: start afresh
                heap[:] = [(len(x.inflight), x.rank, x) for x in pool.sessions]
                heapq.heapify(heap)
            else:
                heapq.heappush(heap, (len(session.inflight), session.rank, session))

    def _assign(self, slot: Slot, session: SessionState, now: float) -> None:
        self._move(slot, State.SENT)
        slot.session = session
        session.inflight[slot.ticket] = slot
        session.outq.append(slot)
        self._log_sent(session, now, [slot])
        self.dirty.add(session)

    def _log_sent(self, session: SessionState, now: float, slots: list[Slot]) -> None:
        """Note when these were assigned (for ``stale``); only with an ACK deadline."""
        if self.ack_deadline == math.inf:
            return
        session.sent_log.append((now, slots))
        session.logged += len(slots)
        if session.logged > 4 * (self.window + len(session.inflight)):
            # Drop the entries all ACKed (``stale`` looks no further than a recent one).
            live = session.inflight.keys()
            session.sent_log = deque(
                e for e in session.sent_log if not live.isdisjoint(map(_ticket_of, e[1]))
            )
            session.logged = sum(len(e[1]) for e in session.sent_log)

    def _drain_waiting(self, pool: Pool, now: float) -> None:
        while pool.waiting:
            if pool.waiting[0].state is not State.QUEUED:
                pool.waiting.popleft()
                continue
            best = self._pick(pool, now)
            if best is None:
                return
            self._assign(pool.waiting.popleft(), best, now)

    def take_outq(
        self, session: SessionState, max_bytes: int | None = None, *, count: int | None = None
    ) -> list[Slot]:
        """Slots for the writer to encode now (at least one; their token and pending
        bytes within ``max_bytes``; or the first ``count``); they stay inflight until ACK."""
        outq = session.outq
        if count is not None:
            out = outq[:count]
            del outq[:count]
            return out
        if max_bytes is None or not outq:
            session.outq = []
            return outq
        size = 0
        n = 0
        for slot in outq:
            size += len(slot.token) + len(slot.pending) + 16
            if size > max_bytes and n:
                break
            n += 1
        out = outq[:n]
        del outq[:n]
        return out

    @staticmethod
    def unconfirm(slots: Iterable[Slot]) -> None:
        """Their PARKED is not written yet: their wakes go to their parker only."""
        for slot in slots:
            slot.flags |= UNCONFIRMED

    @staticmethod
    def confirm(slots: Iterable[Slot]) -> None:
        """Their PARKED went out: their wakes may go to any worker of the pool now."""
        keep = ~UNCONFIRMED
        for slot in slots:
            slot.flags &= keep

    def written(self, slots: Sequence[Slot]) -> None:
        """Their fds went out to the session (SENT -> WRITTEN): an ACK may now free them."""
        sent, written = _SENT, _WRITTEN
        n = len(slots)
        for slot in slots:
            if slot.state is not sent:
                n -= 1
                continue
            slot.state = written
        if n:
            self._move_all(sent, written, n)

    def ack(self, session: SessionState, tickets: Iterable[int], now: float = 0.0) -> list[Slot]:
        """The session has these; returns their slots for the caller to close and ``remove``.

        Unknown tickets (already ACKed, or not this session's) are ignored, and
        so are wakes not yet written: their fds may still be in our send queue.
        """
        done = []
        inflight = session.inflight
        for ticket in tickets:
            slot = inflight.get(ticket)
            if slot is not None and slot.state is State.WRITTEN:
                del inflight[ticket]
                done.append(slot)
        if done:
            self._lighter(session)
        if session.pool.waiting:
            self._drain_waiting(session.pool, now)
        return done

    def take_acked(
        self, session: SessionState, tickets: Iterable[int], now: float = 0.0
    ) -> tuple[list[Slot], list[int]]:
        """``ack`` and ``remove`` in one pass, for the hot path: (the ACKed slots, gone
        from the table; their fds, which the caller closes now; notices have none)."""
        done: list[Slot] = []
        append = done.append
        fds: list[int] = []
        close = fds.append
        inflight = session.inflight
        written, gone = _WRITTEN, _GONE
        by_fd = self._by_fd
        for slot in map(inflight.pop, tickets, repeat(None)):
            if slot is None:
                continue
            if slot.state is not written:  # SENT: its fd may still be in our send queue
                inflight[slot.ticket] = slot
                continue
            slot.state = gone
            fd = slot.fd
            if fd >= 0:
                close(fd)
                slot.fd = -1
                if by_fd[fd] is slot:
                    by_fd[fd] = None
            append(slot)
        if done:
            self._move_all(written, gone, len(done))
            session.pool.held -= len(done)  # a session's wakes are of its pool
            self._lighter(session)
            if self._alias:
                for slot in done:
                    self._alias.pop(slot.ticket, None)
            if not inflight and session.logged:  # all ACKed: nothing in the log counts
                session.sent_log.clear()
                session.logged = 0
        if session.pool.waiting:
            self._drain_waiting(session.pool, now)
        return done, fds

    # -- sessions --------------------------------------------------------------

    def add_session(self, session: SessionState, now: float = 0.0) -> None:
        session.pool.sessions.append(session)
        session.rank = self._ranks = self._ranks + 1
        self._lighter(session)
        self._sessions[session.id] = session
        self._drain_waiting(session.pool, now)

    def retire(
        self, session: SessionState, now: float | None = None, unwritten: Iterable[Slot] = ()
    ) -> int:
        """The session takes no more wakes. Those assigned but never written
        (its ``outq``, and ``unwritten`` the caller took back) go back to the
        pool now; WRITTEN ones stay until ``release`` or ``abandon``. Returns
        how many were re-routed.
        """
        if session.alive:
            session.alive = False
            session.pool.sessions.remove(session)
            self.dirty.discard(session)
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]
        back = [*session.outq, *unwritten]
        session.outq.clear()
        moved = 0
        for slot in back:
            if slot.state is State.SENT and session.inflight.pop(slot.ticket, None) is slot:
                self._requeue(slot, now)
                moved += 1
        self._start_orphan_clock(session.pool, now)
        return moved

    def release(self, session: SessionState, now: float | None = None) -> int:
        """The worker can no longer read what we wrote: its un-ACKed wakes go back."""
        self.retire(session, now)
        lost = list(session.inflight.values())
        session.inflight.clear()
        session.sent_log.clear()
        session.logged = 0
        for slot in lost:
            self._requeue(slot, now)
        self._start_orphan_clock(session.pool, now)
        return len(lost)

    def abandon(self, session: SessionState) -> list[Slot]:
        """The worker may still read what we wrote: its un-ACKed wakes stay its own.

        Returns them for the caller to close its copies and ``remove``.
        """
        self.retire(session)
        left = list(session.inflight.values())
        session.inflight.clear()
        session.sent_log.clear()
        session.logged = 0
        return left

    def remove_session(self, session: SessionState, now: float | None = None) -> int:
        """A session ended and its worker cannot read any more: every un-ACKed wake
        goes back to the pool. Returns how many.

        When it was the pool's last session, the orphan clock of every wake
        waiting in the pool starts ``now``: they get a full orphan timeout to
        meet the pool's next session.
        """
        return self.retire(session, now) + self.release(session, now)

    def _requeue(self, slot: Slot, now: float | None) -> None:
        self._move(slot, State.QUEUED)
        slot.session = None
        self._route(slot, 0.0 if now is None else now)

    def _start_orphan_clock(self, pool: Pool, now: float | None) -> None:
        if not pool.sessions and pool.waiting:
            self._orphan_pools.add(pool)
            if now is not None:
                for slot in pool.waiting:
                    slot.key = now

    def _orphaned_pools(self) -> list[Pool]:
        """The pools with wakes waiting and no session (the set, pruned)."""
        pools = self._orphan_pools
        if not pools:  # (the usual: every flush asks)
            return []
        for pool in [p for p in pools if p.sessions or not p.waiting]:
            pools.discard(pool)  # a session came, or the wakes went
        return sorted(pools, key=_index_of)

    # -- time ------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest idle deadline (seconds), stale entries included (harmless)."""
        return self._ticks[0] / 1000 if self._ticks else None

    def expired(self, now: float) -> list[Slot]:
        """PARKED slots whose idle deadline has passed (the caller wakes them), by
        deadline tick."""
        limit = int(now * 1000 + 0.001)  # float error must not leave a due deadline behind
        out: list[Slot] = []
        ticks = self._ticks
        by_fd = self._by_fd
        parked = _PARKED
        while ticks and ticks[0] <= limit:
            tick = heapq.heappop(ticks)
            fds = self._due.pop(tick)
            if not fds:
                self._empty -= 1  # swept empty (``_sweep``)
                continue
            self._tick_stale.pop(tick, None)
            self._entries -= len(fds)
            for fd in fds:
                slot = by_fd[fd]
                if slot is _PACKED and self._pkey[fd] == tick:
                    slot = self._unpack(fd)
                # An fd reused since, a deadline moved, a slot woken: a stale entry.
                if slot is not None and slot.key == tick and slot.state is parked:
                    slot.key = 0  # taken: no stale entry left behind when it wakes
                    out.append(slot)
                else:
                    self._stale -= 1
        return out

    def _compact(self) -> None:
        """Drop stale timer entries so memory tracks the parked count, not the history."""
        self._due = {}
        self._ticks = []
        self._tick_stale = {}
        self._entries = self._stale = self._empty = 0
        if self._counts[_PARKED]:  # else all stale (a mass wake): no scan
            keys = self._pkey
            for fd, slot in enumerate(self._by_fd):
                if slot is _PACKED:
                    key = keys[fd]
                elif slot is not None and slot.state is _PARKED:
                    key = slot.key  # type: ignore[assignment]
                else:
                    continue
                if key:
                    self._timer(key).append(fd)
                    self._entries += 1

    def orphans(self, now: float) -> list[Slot]:
        """QUEUED slots of pools with no session, waiting past the orphan timeout."""
        out = []
        for pool in self._orphaned_pools():
            while pool.waiting:
                slot = pool.waiting[0]
                if slot.state is not State.QUEUED:
                    pool.waiting.popleft()
                    continue
                if now - float(slot.key) < self.orphan_timeout:
                    break
                pool.waiting.popleft()
                out.append(slot)
        return out

    def next_due(self) -> float:
        """When the timer has work next: the first idle deadline, orphan deadline
        or ``pack`` (inf: none)."""
        at = min(self.next_deadline() or math.inf, self.next_orphan_deadline() or math.inf)
        pack_at = self.next_pack()
        return at if pack_at is None or pack_at > at else pack_at

    def next_orphan_deadline(self) -> float | None:
        """When the first wake queued for a pool with no session is closed."""
        first = None
        for p in self._orphaned_pools():
            at = float(p.waiting[0].key) + self.orphan_timeout
            if first is None or at < first:
                first = at
        return first

    @property
    def orphaned(self) -> int:
        return sum(len(p.waiting) for p in self._orphaned_pools())
