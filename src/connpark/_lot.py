"""The parking table: who owns each connection, when it wakes, where it goes. No I/O.

Theory of operation
-------------------
A parked connection is a ``Slot``. Its life is an explicit transition table
(``TRANSITIONS``); at every instant exactly one side owns the connection::

    PARKED --wake(reason)--> QUEUED --assign--> SENT --ack--> (gone)
       |                       ^                  |
       +--close--> (gone)      +---session died---+

- PARKED: in the watcher, with an idle deadline in the heap.
- QUEUED: woken, waiting for a session of its pool with room in its window
  (or, with no session at all, for the orphan timeout).
- SENT: written (or about to be) to one session; the container keeps the fd
  until that session ACKs. If the session dies first, back to QUEUED.

Waking a slot that is not PARKED is a no-op (recall races: an UNPARK that
crosses a READABLE wake). The caller does the I/O the lot asks for: it
unregisters and closes fds, and writes each session's ``outq``.

Memory: a slot is one slotted object; the table is a list indexed by fd (not
a dict), and tickets encode the fd so lookups need no map. Deadlines live in
one heap of ints ``deadline_ms << 64 | ticket``, lazily pruned.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import Counter, deque
from collections.abc import Iterable

from ._wire import Reason

FD_BITS = 24
_FD_MASK = (1 << FD_BITS) - 1
_TICKET_MASK = (1 << 64) - 1


class State(enum.IntEnum):
    PARKED = 1
    QUEUED = 2
    SENT = 3
    GONE = 4


#: Allowed transitions; anything else is a bug, asserted in ``_move``.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.PARKED: frozenset({State.QUEUED, State.GONE}),
    State.QUEUED: frozenset({State.SENT, State.GONE}),
    State.SENT: frozenset({State.QUEUED, State.GONE}),
    State.GONE: frozenset(),
}

HANGUP_RETURNS = 1
TIMEOUT_RETURNS = 2
INET6 = 4


class Slot:
    """One parked connection. ``fd`` is -1 once the container closed it (a notice)."""

    __slots__ = (
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
        self, ticket: int, fd: int, token: bytes, pending: bytes, flags: int, pool: Pool
    ) -> None:
        self.ticket = ticket
        self.fd = fd
        self.token = token
        self.pending = pending
        self.flags = flags
        self.pool = pool
        self.state = State.PARKED
        #: PARKED: the heap key. QUEUED/SENT: when readiness was seen (for latency).
        self.key: float | int = 0
        self.reason = Reason.READABLE
        #: The session this slot's wake should go to first (its parker, or its asker).
        self.session: SessionState | None = None

    def returns_fd(self, reason: Reason) -> bool:
        if reason is Reason.HANGUP:
            return bool(self.flags & HANGUP_RETURNS)
        if reason is Reason.TIMEOUT:
            return bool(self.flags & TIMEOUT_RETURNS)
        return True


class SessionState:
    """The lot's view of one worker session: its pool, window and wakes in flight."""

    __slots__ = ("alive", "id", "inflight", "name", "outq", "pool")

    def __init__(self, session_id: int, pool: Pool, name: str = "") -> None:
        self.id = session_id
        self.pool = pool
        self.name = name
        self.alive = True
        #: Slots assigned to this session, not yet ACKed (written or not).
        self.inflight: dict[int, Slot] = {}
        #: Assigned slots the writer has not written yet.
        self.outq: list[Slot] = []

    @property
    def load(self) -> int:
        return len(self.inflight)


class Pool:
    """A named group of interchangeable sessions, and the wakes waiting for one."""

    __slots__ = ("name", "sessions", "waiting")

    def __init__(self, name: str) -> None:
        self.name = name
        self.sessions: list[SessionState] = []
        self.waiting: deque[Slot] = deque()


class Lot:
    """Every parked connection, its deadline, and where its wake goes."""

    def __init__(self, *, window: int = 1024, orphan_timeout: float = 60.0) -> None:
        self.window = window
        self.orphan_timeout = orphan_timeout
        self._by_fd: list[Slot | None] = []
        self._heap: list[int] = []
        self._stale = 0
        self._seq = itertools.count(1)
        self.pools: dict[str, Pool] = {}
        #: Sessions whose ``outq`` gained slots since the caller last looked.
        self.dirty: set[SessionState] = set()
        #: Slots per state, indexed by State (index 0 unused).
        self._counts = [0] * (max(State) + 1)
        self.woken_total: Counter[str] = Counter()
        self.orphans_closed = 0

    # -- lookups -----------------------------------------------------------

    def pool(self, name: str) -> Pool:
        pool = self.pools.get(name)
        if pool is None:
            pool = self.pools[name] = Pool(name)
        return pool

    def by_fd(self, fd: int) -> Slot | None:
        return self._by_fd[fd] if 0 <= fd < len(self._by_fd) else None

    def find(self, ticket: int) -> Slot | None:
        """The slot holding ``ticket``'s fd, if that ticket is still in the container."""
        slot = self.by_fd(ticket & _FD_MASK)
        return slot if slot is not None and slot.ticket == ticket else None

    def slots(self) -> list[Slot]:
        return [s for s in self._by_fd if s is not None]

    def parked_slots(self) -> list[Slot]:
        return [s for s in self._by_fd if s is not None and s.state is State.PARKED]

    # -- transitions ---------------------------------------------------------

    @property
    def parked(self) -> int:
        return self._counts[State.PARKED]

    @property
    def queued(self) -> int:
        return self._counts[State.QUEUED]

    @property
    def sent(self) -> int:
        return self._counts[State.SENT]

    def _move(self, slot: Slot, new: State) -> None:
        old = slot.state
        assert new in TRANSITIONS[old], f"ticket {slot.ticket}: {old.name} -> {new.name}"
        counts = self._counts
        counts[old] -= 1
        counts[new] += 1
        slot.state = new

    def park(
        self,
        fd: int,
        *,
        token: bytes,
        pending: bytes,
        flags: int,
        session: SessionState,
        deadline: float,
    ) -> Slot:
        """Record a new parked fd (already validated and in the watcher) with its deadline."""
        ticket = (next(self._seq) << FD_BITS | fd) & _TICKET_MASK
        slot = Slot(ticket, fd, token, pending, flags, session.pool)
        slot.session = session
        self._counts[State.PARKED] += 1
        if fd >= len(self._by_fd):
            self._by_fd.extend([None] * (fd + 1 - len(self._by_fd) + 64))
        assert self._by_fd[fd] is None, f"fd {fd} parked twice"
        self._by_fd[fd] = slot
        slot.key = math.ceil(deadline * 1000) << 64 | ticket  # never early
        heapq.heappush(self._heap, slot.key)
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
        self._move(slot, State.QUEUED)
        self._drop_deadline(slot)
        slot.reason = reason
        slot.key = now
        if to is not None:
            slot.session = to
        self.woken_total[reason.name] += 1
        self._route(slot)
        return True

    def forget_fd(self, slot: Slot) -> None:
        """The slot's fd was closed by the container: it travels on as a notice."""
        if slot.fd >= 0 and self._by_fd[slot.fd] is slot:
            self._by_fd[slot.fd] = None
        slot.fd = -1

    def _drop_deadline(self, slot: Slot) -> None:
        """The slot's heap entry (if ``expired`` has not popped it) is stale now."""
        if slot.key:
            self._stale += 1
            slot.key = 0
            if self._stale > 1024 and self._stale > len(self._heap) // 2:
                self._compact()

    def remove(self, slot: Slot) -> None:
        """Drop a slot (closed by request, ACKed, or orphaned); caller closed its fd."""
        if slot.state is State.PARKED:
            self._drop_deadline(slot)
        self.forget_fd(slot)
        self._move(slot, State.GONE)

    def _route(self, slot: Slot) -> None:
        """QUEUED slot: its own session if alive with room, else the least loaded."""
        pool = slot.pool
        target = slot.session
        if target is None or not target.alive or target.load >= self.window:
            target = None
            best = self.window
            for s in pool.sessions:
                if s.load < best:
                    target, best = s, s.load
        if target is None:
            pool.waiting.append(slot)
            return
        self._assign(slot, target)

    def _assign(self, slot: Slot, session: SessionState) -> None:
        self._move(slot, State.SENT)
        slot.session = session
        session.inflight[slot.ticket] = slot
        session.outq.append(slot)
        self.dirty.add(session)

    def _drain_waiting(self, pool: Pool) -> None:
        while pool.waiting:
            best = None
            for s in pool.sessions:
                if s.load < self.window and (best is None or s.load < best.load):
                    best = s
            if best is None:
                return
            slot = pool.waiting.popleft()
            if slot.state is State.QUEUED:
                self._assign(slot, best)

    def take_outq(self, session: SessionState) -> list[Slot]:
        """What the session's writer should send now (they stay inflight until ACK)."""
        out, session.outq = session.outq, []
        return out

    def ack(self, session: SessionState, tickets: Iterable[int]) -> list[Slot]:
        """The session has these; returns their slots for the caller to close and ``remove``.

        Unknown tickets (already ACKed, or not this session's) are ignored.
        """
        done = []
        unwritten = {s.ticket for s in session.outq}
        for ticket in tickets:
            if ticket in unwritten:
                continue  # a confused worker ACKing what we have not sent: ignore
            slot = session.inflight.pop(ticket, None)
            if slot is not None:
                done.append(slot)
        self._drain_waiting(session.pool)
        return done

    # -- sessions --------------------------------------------------------------

    def add_session(self, session: SessionState) -> None:
        session.pool.sessions.append(session)
        self._drain_waiting(session.pool)

    def remove_session(self, session: SessionState, now: float | None = None) -> int:
        """A session ended: its unACKed wakes go back to the pool. Returns how many.

        When it was the pool's last session, the orphan clock of every wake
        waiting in the pool starts ``now``: they get a full orphan timeout to
        meet the pool's next session.
        """
        session.alive = False
        pool = session.pool
        pool.sessions.remove(session)
        self.dirty.discard(session)
        lost = list(session.inflight.values())
        session.inflight.clear()
        session.outq.clear()
        for slot in lost:
            self._move(slot, State.QUEUED)
            slot.session = None
            self._route(slot)
        if now is not None and not pool.sessions:
            for slot in pool.waiting:
                slot.key = now
        return len(lost)

    # -- time ------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest idle deadline (seconds), stale entries included (harmless)."""
        return (self._heap[0] >> 64) / 1000 if self._heap else None

    def expired(self, now: float) -> list[Slot]:
        """PARKED slots whose idle deadline has passed (the caller wakes them)."""
        limit = int(now * 1000 + 0.001)  # float error must not leave a due deadline behind
        out = []
        heap = self._heap
        while heap and heap[0] >> 64 <= limit:
            key = heapq.heappop(heap)
            slot = self.find(key & _TICKET_MASK)
            if slot is not None and slot.state is State.PARKED and slot.key == key:
                slot.key = 0  # popped: no stale entry left behind when it wakes
                out.append(slot)
            else:
                self._stale -= 1
        return out

    def _compact(self) -> None:
        """Drop stale heap entries so memory tracks the parked count, not the history."""
        self._heap = [s.key for s in self.parked_slots()]  # type: ignore[misc]
        heapq.heapify(self._heap)
        self._stale = 0

    def orphans(self, now: float) -> list[Slot]:
        """QUEUED slots of pools with no session, waiting past the orphan timeout."""
        out = []
        for pool in self.pools.values():
            if pool.sessions:
                continue
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

    def next_orphan_deadline(self) -> float | None:
        times = [
            float(p.waiting[0].key) + self.orphan_timeout
            for p in self.pools.values()
            if p.waiting and not p.sessions
        ]
        return min(times) if times else None

    @property
    def orphaned(self) -> int:
        return sum(len(p.waiting) for p in self.pools.values() if not p.sessions)
