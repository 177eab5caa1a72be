"""Serving parked connections without waking their worker: auto-responses, publish, rules.

The container calls in here; this is the one place that reads or writes a
parked socket's payload. Every call is non-blocking (``MSG_DONTWAIT``: the
socket's O_NONBLOCK lives on the open file, shared with the worker, and is
never touched), and nothing is buffered beyond the kernel's send buffer:
bytes a socket does not take go back to a worker in the WAKE (``unsent``,
reason UNSENT), which finishes them in order.

- **Auto-response**: a readable parked socket with a rule set is peeked
  (``MSG_PEEK``); ``_autoresponse.decide_untrusted`` says whether what is
  buffered is exactly a whole number of matching messages. Only then is the
  reply written and the matched bytes read and dropped. A reply the socket
  takes only in part: the pings are consumed, the rest of the reply travels
  as ``unsent`` (reason UNSENT). A reply it takes not at all: an ordinary
  READABLE wake with nothing consumed.
- **Publish**: ``data`` is written to each target whole, or the target is
  woken (UNSENT) with what was not written. ``data`` is one shared bytes
  object: a thousand stalled clients cost a thousand references, not copies.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from typing import Any

import attrs

from ._admit import borrow
from ._autoresponse import PEEK_SIZE, RuleSet, decide_untrusted
from ._lot import Lot, Slot, due_ms
from ._wire import ParkEntry, Reason, Refusal, Rules, wake_ext

_DONTWAIT = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)


class Extra:
    """What a park with rules or tags (or a publish left unsent) adds to its slot."""

    __slots__ = ("count", "idle_ms", "last_ms", "rules", "tags", "unsent", "unsent_from")

    def __init__(self) -> None:
        self.rules: RuleSet | None = None
        self.tags: tuple[bytes, ...] = ()
        #: The park's idle timeout, for rules that reset the deadline.
        self.idle_ms = 0
        #: Auto-responses sent, and the last one's wall-clock time (ms).
        self.count = 0
        self.last_ms = 0
        #: Bytes not written: ``unsent[unsent_from:]`` (``unsent`` is shared, not copied).
        self.unsent = b""
        self.unsent_from = 0

    def wake_ext(self) -> bytes | None:
        """The WAKE entry's v3 tail, or None when there is nothing to say."""
        if not (self.count or self.unsent):
            return None
        return wake_ext(self.count, self.last_ms, self.unsent[self.unsent_from :])

    def ext_size(self) -> int:
        return 16 + len(self.unsent) - self.unsent_from


@attrs.frozen
class ServingStats:
    """Counters since start (``connpark stats``)."""

    #: Messages (pings) answered by rules, and the reply bytes written.
    autoresponses_total: int = 0
    autoresponse_bytes_total: int = 0
    #: SEND requests, connections that took the whole message, those woken, bytes written.
    publishes_total: int = 0
    published_total: int = 0
    publish_woken_total: int = 0
    publish_bytes_total: int = 0


class Serving:
    """Rule sets (per session, per pool), and the auto-response and publish I/O."""

    def __init__(self, *, max_rule_sets: int, max_tags: int, max_tag_len: int) -> None:
        self.max_rule_sets = max_rule_sets
        self.max_tags = max_tags
        self.max_tag_len = max_tag_len
        self._session_rules: dict[int, dict[int, RuleSet]] = {}
        self._pool_rules: dict[str, dict[int, RuleSet]] = {}
        self.counts: Counter[str] = Counter()

    # -- rules -----------------------------------------------------------------

    def register(self, session_id: int, pool: str, msg: Rules) -> Refusal:
        """RULES: store the set for the session (or its pool); a refusal past the bounds."""
        if msg.set_id == 0:
            return Refusal.BAD_RULE
        checked = RuleSet.checked(msg.rules)
        if isinstance(checked, Refusal):
            return checked
        table = (
            self._pool_rules.setdefault(pool, {})
            if msg.pool_scope
            else self._session_rules.setdefault(session_id, {})
        )
        if msg.set_id not in table and len(table) >= self.max_rule_sets:
            return Refusal.TOO_MANY_RULES
        table[msg.set_id] = checked  # parked records keep the set they were parked with
        return Refusal.OK

    def forget_session(self, session_id: int) -> None:
        self._session_rules.pop(session_id, None)

    def forget_pool(self, pool: str) -> None:
        """The pool is gone (no session, no connection): its sets go with it."""
        self._pool_rules.pop(pool, None)

    @property
    def rule_sets(self) -> int:
        return sum(map(len, self._session_rules.values())) + sum(
            map(len, self._pool_rules.values())
        )

    def check_park(self, session_id: int, pool: str, entry: ParkEntry) -> RuleSet | Refusal | None:
        """The rule set a park names (None: none), or the refusal for its rules or tags."""
        if len(entry.tags) > self.max_tags:
            return Refusal.TOO_MANY_TAGS
        if any(not t or len(t) > self.max_tag_len for t in entry.tags):
            return Refusal.TAG_TOO_LARGE
        if not entry.rules:
            return None
        found = self._session_rules.get(session_id, {}).get(entry.rules)
        if found is None:
            found = self._pool_rules.get(pool, {}).get(entry.rules)
        return found if found is not None else Refusal.UNKNOWN_RULES

    @staticmethod
    def attach(lot: Lot, slot: Slot, entry: ParkEntry, rules: RuleSet | None, idle: float) -> None:
        extra = Extra()
        extra.rules = rules
        extra.idle_ms = int(idle * 1000)
        if entry.tags:
            extra.tags = lot.tag(slot, tuple(dict.fromkeys(entry.tags)))
        slot.extra = extra

    # -- I/O on parked sockets -------------------------------------------------

    def autorespond(self, lot: Lot, slot: Slot, now: float) -> Reason | None:
        """A readable parked socket with rules: None if answered (re-arm it), else why to wake."""
        extra: Extra = slot.extra
        assert extra.rules is not None
        sock = borrow(slot.fd)
        try:
            try:
                buf = sock.recv(PEEK_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except OSError:
                return Reason.READABLE  # an error to read: the worker finds out
            if not buf:
                return Reason.HANGUP
            decision = decide_untrusted(buf, extra.rules)
            if decision is None:
                return Reason.READABLE
            written = _send(sock, decision.reply)
            if written is None or (written == 0 and decision.reply):
                return Reason.READABLE  # nothing written: nothing consumed either
            _consume(sock, decision.consume)
        finally:
            sock.detach()
        extra.count += decision.count
        extra.last_ms = int(time.time() * 1000)
        self.counts["autoresponses_total"] += decision.count
        self.counts["autoresponse_bytes_total"] += written
        if written < len(decision.reply):
            extra.unsent, extra.unsent_from = decision.reply, written
            return Reason.UNSENT
        if decision.resets_idle and extra.idle_ms:
            lot.touch(slot, due_ms(now, extra.idle_ms / 1000))
        return None

    def publish(self, slot: Slot, data: bytes) -> Reason | None:
        """Write ``data`` to a parked socket: None if it took it all, else why to wake."""
        sock = borrow(slot.fd)
        try:
            written = _send(sock, data)
        finally:
            sock.detach()
        if written is None:
            return Reason.HANGUP  # EPIPE, ECONNRESET: the peer is gone
        self.counts["publish_bytes_total"] += written
        if written == len(data):
            self.counts["published_total"] += 1
            return None
        extra = slot.extra
        if extra is None:
            extra = slot.extra = Extra()
        extra.unsent, extra.unsent_from = data, written
        self.counts["publish_woken_total"] += 1
        return Reason.UNSENT

    def stats(self) -> ServingStats:
        return ServingStats(**{k: self.counts[k] for k in attrs.fields_dict(ServingStats)})


def _send(sock: Any, data: bytes) -> int | None:
    """Bytes written without blocking (0: the buffer is full); None: the socket is dead."""
    if not data:
        return 0
    try:
        return int(sock.send(data, _DONTWAIT))
    except BlockingIOError:
        return 0
    except OSError:
        return None


def _consume(sock: Any, n: int) -> None:
    """Read and drop ``n`` bytes we peeked (only we read a parked socket: they are there)."""
    while n > 0:
        try:
            got = sock.recv(min(n, PEEK_SIZE), socket.MSG_DONTWAIT)
        except OSError:
            return
        if not got:
            return
        n -= len(got)
