"""Auto-responses: answer a parked connection's pings without waking its worker. No I/O.

Theory of operation
-------------------
The container looks at a parked socket only when it is readable, and only
with ``MSG_PEEK`` first. ``decide_untrusted(peeked, rules)`` then says what
to do with what is buffered:

- ``Reply(consume, reply)``: the buffer is exactly a whole number of
  messages that rules match (any mix, in order). The container writes
  ``reply`` (every reply, concatenated) without blocking, then reads and
  drops ``consume`` bytes: the client's pings are answered and the worker
  sleeps on.
- ``None``: anything else (a partial message, other bytes after a ping, a
  ping with a payload over 125 bytes, a peek that filled the whole peek
  window): an ordinary READABLE wake with nothing consumed. The worker gets
  every byte.

Rule kinds:

- ``EXACT``: these exact bytes -> these reply bytes (MQTT PINGREQ ``C0 00``
  -> PINGRESP ``D0 00``; ``PING\\r\\n`` -> ``PONG\\r\\n``).
- ``WS_PING``: an RFC 6455 client ping (FIN, no RSV bits, opcode 9, masked,
  payload <= 125 bytes) -> an unmasked pong with the same payload.
- ``WS_TEXT``: a masked, unfragmented text message whose payload is exactly
  ``match`` -> an unmasked text message with payload ``reply`` (what
  Durable Objects' ``setWebSocketAutoResponse`` offers).

Server frames are never masked, so one reply fits every client.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import attrs

from ._wire import Refusal, Rule, RuleKind

#: Bytes peeked per readiness event: a buffer this full (or fuller) always wakes.
PEEK_SIZE = 4096
#: Control frames carry at most this many payload bytes (RFC 6455 section 5.5).
WS_MAX_CONTROL = 125
#: Bounds on one rule set (a refusal past them: ``bad-rule``, ``too-many-rules``).
MAX_RULES_PER_SET = 16
MAX_MATCH = 1024
MAX_REPLY = 1024
_WS_FIN = 0x80
_WS_MASK = 0x80
_OP_TEXT = 0x1
_OP_PING = 0x9
_OP_PONG = 0xA


@attrs.frozen
class RuleSet:
    """A validated, immutable rule set: parked records point at it, so it outlives
    the session that registered it."""

    rules: tuple[Rule, ...]
    #: Any rule pushes the idle deadline back (checked per match in ``Reply``).
    exact: tuple[Rule, ...] = attrs.field(init=False)
    ws_ping: Rule | None = attrs.field(init=False)
    ws_text: tuple[Rule, ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "exact", tuple(r for r in self.rules if r.kind is RuleKind.EXACT))
        pings = [r for r in self.rules if r.kind is RuleKind.WS_PING]
        object.__setattr__(self, "ws_ping", pings[0] if pings else None)
        texts = tuple(r for r in self.rules if r.kind is RuleKind.WS_TEXT)
        object.__setattr__(self, "ws_text", texts)

    @classmethod
    def checked(cls, rules: Sequence[Rule]) -> RuleSet | Refusal:
        """The rule set, or why the container refuses it."""
        if not rules or len(rules) > MAX_RULES_PER_SET:
            return Refusal.TOO_MANY_RULES
        for r in rules:
            if len(r.match) > MAX_MATCH or len(r.reply) > MAX_REPLY:
                return Refusal.BAD_RULE
            if r.kind is RuleKind.EXACT and not r.match:
                return Refusal.BAD_RULE  # would match nothing forever
            if r.kind is RuleKind.WS_PING and (r.match or r.reply):
                return Refusal.BAD_RULE  # the pong echoes the ping: nothing to configure
            if r.kind is RuleKind.WS_TEXT and len(ws_frame(_OP_TEXT, r.reply)) > MAX_REPLY + 4:
                return Refusal.BAD_RULE
        return cls(tuple(rules))


@attrs.frozen
class Reply:
    """Consume ``consume`` bytes, having written ``reply``; ``count`` messages answered."""

    consume: int
    reply: bytes
    count: int
    #: At least one matching rule resets the idle deadline.
    resets_idle: bool


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked (server) frame, FIN set: the same bytes fit every client."""
    n = len(payload)
    if n <= 125:
        head = struct.pack("!BB", _WS_FIN | opcode, n)
    elif n <= 0xFFFF:
        head = struct.pack("!BBH", _WS_FIN | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", _WS_FIN | opcode, 127, n)
    return head + payload


def _unmask(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    k = (key * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(len(data), "big")


def _ws_client_frame_untrusted(buf: bytes, pos: int) -> tuple[int, bytes, int] | None:
    """(opcode, unmasked payload, end) of one whole masked FIN frame at ``pos``, else None."""
    if len(buf) - pos < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    if b0 & 0x70 or not b0 & _WS_FIN or not b1 & _WS_MASK:
        return None  # RSV bits (an extension), a fragment, or an unmasked client frame
    n = b1 & 0x7F
    at = pos + 2
    if n == 126:
        if len(buf) - at < 2:
            return None
        (n,) = struct.unpack_from("!H", buf, at)
        at += 2
    elif n == 127:
        return None  # never a ping, and larger than any match
    end = at + 4 + n
    if end > len(buf):
        return None  # partial: wake
    return b0 & 0x0F, _unmask(buf[at + 4 : end], buf[at : at + 4]), end


def decide_untrusted(buf: bytes, rules: RuleSet, window: int = PEEK_SIZE) -> Reply | None:
    """What to do with ``buf``, the peeked bytes: a ``Reply``, or None (wake).

    ``window`` is how many bytes the peek asked for: a full peek may have
    left more behind, so it wakes.
    """
    if not buf or len(buf) >= window:
        return None
    pos = 0
    replies: list[bytes] = []
    resets = False
    while pos < len(buf):
        rule, reply, end = _match_one_untrusted(buf, pos, rules)
        if rule is None:
            return None
        replies.append(reply)
        resets = resets or rule.resets_idle
        pos = end
    return Reply(pos, b"".join(replies), len(replies), resets)


def _match_one_untrusted(buf: bytes, pos: int, rules: RuleSet) -> tuple[Rule | None, bytes, int]:
    for r in rules.exact:
        if buf.startswith(r.match, pos):
            return r, r.reply, pos + len(r.match)
    if rules.ws_ping is not None or rules.ws_text:
        frame = _ws_client_frame_untrusted(buf, pos)
        if frame is not None:
            opcode, payload, end = frame
            if opcode == _OP_PING and rules.ws_ping is not None and len(payload) <= WS_MAX_CONTROL:
                return rules.ws_ping, ws_frame(_OP_PONG, payload), end
            if opcode == _OP_TEXT:
                for r in rules.ws_text:
                    if payload == r.match:
                        return r, ws_frame(_OP_TEXT, r.reply), end
    return None, b"", pos
