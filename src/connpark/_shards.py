"""A worker's view of a multi-shard container, sans-IO: where each request goes.

A container started with ``--shards N`` answers WELCOME on its path as shard 0
of N (protocol v4); shard ``i`` listens at ``shard_path(path, i)``. A hook keeps
one engine and session per shard; this module decides, for every hook alike:

- which shard takes the next park (``Spread``: the one holding fewest of this
  handle's connections among those connected and not recently full);
- which shard a ticket belongs to (the ticket says: ``shard_of``);
- how per-shard answers combine (``merge_send``; statistics: ``merge_stats``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from ._errors import ParkRefused
from ._unixsock import shard_path
from ._wire import TICKET_SHARD_SHIFT, Reason, Refusal, Result
from ._worker import Engine, Phase, Request, SendResult, Woken

W = TypeVar("W", bound=Woken[Any])

#: A shard that refused a park for lack of room, or did not answer one, gets no
#: parks for this long (s).
FULL_PAUSE = 1.0
#: Refusals about the shard, not the socket: the park is tried on another shard.
_NO_ROOM = frozenset({Refusal.FULL, Refusal.OUT_OF_FDS, Refusal.SHUTTING_DOWN})


def other_shards(first: Engine) -> list[Engine]:
    """After the first handshake: a new engine for each further shard, or none.

    Only a handle on shard 0 (the control path itself) opens the others: one
    pointed at ``PATH.i`` talks to that shard alone.
    """
    welcome = first.welcome
    if welcome is None or welcome.shards < 2 or welcome.shard != 0:
        return []
    return [
        Engine(
            first.pool,
            first.name,
            reconnect=first.reconnect,
            backoff=first.backoff,
            container_uid=first.container_uid,
            path=shard_path(first.path, i),
            closer=first.closer,
        )
        for i in range(1, welcome.shards)
    ]


def shard_of(ticket: int) -> int:
    return (ticket >> TICKET_SHARD_SHIFT) & 0xFF


class Spread:
    """Spreads one handle's parks over the shards by the room it has seen in each."""

    def __init__(self, shards: int) -> None:
        #: Parks each shard accepted from us, minus our wakes from it.
        self.held = [0] * shards
        self._paused_until = [0.0] * shards

    def pick(self, up: Sequence[bool], now: float, tried: Iterable[int] = ()) -> int | None:
        """The shard for the next park: fewest held among connected, un-paused ones
        (any shard not ``tried`` yet, if none is); None once every shard was tried."""
        skip = set(tried)
        best, best_key = None, None
        for i, is_up in enumerate(up):
            if i in skip:
                continue
            key = (not is_up, self._paused_until[i] > now, self.held[i])
            if best_key is None or key < best_key:
                best, best_key = i, key
        return best

    def failed(self, shard: int, now: float) -> None:
        """A park there raised (no answer in time, cancelled): try others first."""
        self._paused_until[shard] = now + FULL_PAUSE

    def parked(self, shard: int, results: Iterable[int | ParkRefused], now: float) -> None:
        for r in results:
            if isinstance(r, ParkRefused):
                if r.reason in _NO_ROOM:
                    self._paused_until[shard] = now + FULL_PAUSE
            else:
                self.held[shard] += 1

    def woke(self, ticket: int) -> None:
        shard = shard_of(ticket)
        if shard < len(self.held) and self.held[shard]:
            self.held[shard] -= 1


class ParkPlan:
    """One park request over the shards: the sockets a shard refuses for lack of
    room (or because it is shutting down) are tried on the next one, so that a
    full shard is not the caller's problem while another has room.

    ``while step := plan.next(up, now)``: park ``step[1]`` (sockets) with
    ``step[2]`` (their entries) on shard ``step[0]``, then ``plan.answered(...)``.
    """

    def __init__(self, spread: Spread, socks: Sequence[Any], entries: Sequence[Any]) -> None:
        self.spread = spread
        self._socks = socks
        self._entries = entries
        self.results: list[int | ParkRefused | None] = [None] * len(socks)
        self._todo = list(range(len(socks)))
        self._tried: list[int] = []

    def next(
        self, up: Sequence[bool], now: float
    ) -> tuple[int, Sequence[Any], Sequence[Any]] | None:
        if not self._todo:
            return None
        shard = self.spread.pick(up, now, self._tried)
        if shard is None:
            return None
        self._tried.append(shard)
        if len(self._todo) == len(self._socks):  # the first try: the request as it is
            return shard, self._socks, self._entries
        return (
            shard,
            [self._socks[k] for k in self._todo],
            [self._entries[k] for k in self._todo],
        )

    def answered(self, shard: int, got: Sequence[int | ParkRefused], now: float) -> None:
        self.spread.parked(shard, got, now)
        retry = []
        for k, r in zip(self._todo, got, strict=True):
            self.results[k] = r
            if isinstance(r, ParkRefused) and r.reason in _NO_ROOM:
                retry.append(k)
        self._todo = retry

    def outcome(self) -> list[int | ParkRefused]:
        return [r for r in self.results if r is not None]


def ready(engines: Iterable[Engine]) -> list[bool]:
    """Which shards' sessions are up (parks and hand-backs go to those first)."""
    return [e.phase is Phase.READY for e in engines]


def by_shard(
    shards: int, tickets: Iterable[int], tag: object = None
) -> list[tuple[int, tuple[int, ...]]]:
    """(shard, its tickets) for each shard a request must reach: every shard for a tag."""
    if shards == 1:  # the common case, on the hot path (UNPARK)
        ts = tuple(tickets)
        return [(0, ts)] if ts or tag is not None else []
    groups: dict[int, list[int]] = {i: [] for i in range(shards)} if tag is not None else {}
    for t in tickets:
        groups.setdefault(min(shard_of(t), shards - 1), []).append(t)
    return [(i, tuple(ts)) for i, ts in sorted(groups.items())]


def send_targets(
    shards: int, data: object, tickets: Sequence[int], tag: object
) -> list[tuple[int, tuple[int, ...]]]:
    """``by_shard`` for SEND, after the engine's own argument checks: a bad call
    must fail before any shard has published."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    if (tag is None) == (not tickets):
        raise TypeError("send() needs tickets or a tag (one of them)")
    return by_shard(shards, tickets, tag)


def hand_back_to(untaken: Sequence[W], ready: Sequence[bool]) -> list[list[W]]:
    """Wakes nobody took, grouped by the shard each goes back to: its own, unless
    that one is shutting down (the wake is a SHUTDOWN one) or not connected;
    then one that is, so that a closing handle loses none of them."""
    groups: list[list[W]] = [[] for _ in ready]
    alive = [i for i, up in enumerate(ready) if up]
    for k, w in enumerate(untaken):
        home = min(shard_of(w.ticket), len(ready) - 1)
        if ready[home] and w.reason is not Reason.SHUTDOWN:
            groups[home].append(w)
            continue
        others = [i for i in alive if i != home]
        groups[others[k % len(others)] if others else home].append(w)
    return groups


#: How often a closing hook looks whether a lost session is back (``await_session``).
RECONNECT_POLL = 0.02


def await_session(engines: Sequence[Engine], untaken: bool) -> bool:
    """Whether a closing hook should wait (bounded) for a lost session to come back
    before ``begin_close_all``: a shard re-sends parks (``Engine.resending``), or
    wakes nobody took while a shard reconnects (a wake of that shard's must go
    back to it: a container restored from its mirror holds a copy of it in
    quarantine; with no shard up, it would be closed: lost)."""
    if any(e.resending for e in engines):
        return True
    return untaken and any(e.reconnecting for e in engines)


def begin_close_all(
    engines: Sequence[Engine], untaken: Sequence[Woken[Any]], new_waiter: Callable[[], Any]
) -> list[Request | None]:
    """Every shard's ``begin_close``, the wakes nobody took handed back
    (``hand_back_to``). The caller runs it in the step that took those wakes
    from its queue: a reader that ran in between would ACK and queue wakes for
    nobody (closed at the end)."""
    groups = hand_back_to(untaken, ready(engines))
    return [e.begin_close(theirs, new_waiter()) for e, theirs in zip(engines, groups, strict=True)]


def merge_send(results: Iterable[SendResult | Result]) -> SendResult:
    """One shard's answer or several (a RESULT each), as the caller's ``SendResult``."""
    rs = list(results)
    return SendResult(
        sum(r.written for r in rs), sum(r.woken for r in rs), sum(r.missed for r in rs)
    )
