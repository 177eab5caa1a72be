"""The auto-response matcher, socket-free: what is consumed, what is replied, what wakes."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connpark._autoresponse import (
    MAX_RULES_PER_SET,
    PEEK_SIZE,
    Reply,
    RuleSet,
    decide_untrusted,
    ws_frame,
)
from connpark._wire import Refusal, Rule

PINGREQ, PINGRESP = b"\xc0\x00", b"\xd0\x00"
MQTT = RuleSet((Rule.exact(PINGREQ, PINGRESP, resets_idle=True),))
LINE = RuleSet((Rule.exact(b"PING\r\n", b"PONG\r\n"),))
WS = RuleSet((Rule.ws_ping(), Rule.ws_text("ping", "pong")))


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, key: bytes = b"\x01\x02\x03\x04"
) -> bytes:
    """A masked client frame, as a browser or the websockets library sends it."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n <= 125:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n <= 0xFFFF:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


def test_mqtt_pingreq_is_answered_and_consumed() -> None:
    assert decide_untrusted(PINGREQ, MQTT) == Reply(2, PINGRESP, 1, True)
    # Three pings that arrived together: three answers, in one write.
    assert decide_untrusted(PINGREQ * 3, MQTT) == Reply(6, PINGRESP * 3, 3, True)


@pytest.mark.parametrize(
    "buffered",
    [
        b"\xc0",  # a partial ping
        PINGREQ + b"\x30\x05",  # a ping, then the start of a PUBLISH
        b"\x30\x05" + PINGREQ,  # data, then a ping
        PINGREQ + b"\xc0",  # a ping and half of the next
        b"",
    ],
)
def test_anything_but_whole_pings_wakes(buffered: bytes) -> None:
    assert decide_untrusted(buffered, MQTT) is None


def test_line_protocol() -> None:
    assert decide_untrusted(b"PING\r\nPING\r\n", LINE) == Reply(12, b"PONG\r\n" * 2, 2, False)
    assert decide_untrusted(b"PING\r", LINE) is None
    assert decide_untrusted(b"PING\r\nhello\r\n", LINE) is None


def test_websocket_ping_gets_an_unmasked_pong_with_its_payload() -> None:
    ping = client_frame(0x9, b"hello")
    reply = decide_untrusted(ping, WS)
    assert reply == Reply(len(ping), b"\x8a\x05hello", 1, False)
    # The empty ping, and 125 bytes: the most a control frame may carry.
    assert decide_untrusted(client_frame(0x9, b""), WS) == Reply(6, b"\x8a\x00", 1, False)
    big = os.urandom(125)
    got = decide_untrusted(client_frame(0x9, big), WS)
    assert got is not None
    assert got.reply == b"\x8a\x7d" + big


def test_websocket_text_rule_matches_exactly() -> None:
    msg = client_frame(0x1, b"ping")
    assert decide_untrusted(msg, WS) == Reply(len(msg), b"\x81\x04pong", 1, False)
    assert decide_untrusted(client_frame(0x1, b"ping!"), WS) is None
    assert decide_untrusted(client_frame(0x2, b"ping"), WS) is None  # binary, not text


@pytest.mark.parametrize(
    "buffered",
    [
        client_frame(0x9, b"x" * 126),  # a ping over 125 bytes: not a valid control frame
        client_frame(0x9, b"hello")[:-1],  # partial
        client_frame(0x9, b"hi") + client_frame(0x1, b"chat"),  # a ping, then a message
        client_frame(0x9, b"hi", fin=False),  # fragmented
        client_frame(0x9, b"hi")[:1] + b"\x02hi",  # unmasked: no client sends that
        bytes([0xC9]) + client_frame(0x9, b"hi")[1:],  # RSV1 set (an extension)
        client_frame(0x8, b""),  # a close frame: the worker answers it
    ],
)
def test_websocket_other_frames_wake(buffered: bytes) -> None:
    assert decide_untrusted(buffered, WS) is None


def test_a_full_peek_wakes() -> None:
    # The peek may have left bytes behind: never answer a buffer as long as the window.
    assert decide_untrusted(PINGREQ * (PEEK_SIZE // 2), MQTT) is None
    assert decide_untrusted(PINGREQ * 4, MQTT, window=8) is None
    assert decide_untrusted(PINGREQ * 3, MQTT, window=8) is not None


def test_rule_sets_are_bounded() -> None:
    assert RuleSet.checked([]) is Refusal.TOO_MANY_RULES
    too_many = [Rule.exact(bytes([i + 1]), b"") for i in range(MAX_RULES_PER_SET + 1)]
    assert RuleSet.checked(too_many) is Refusal.TOO_MANY_RULES
    assert RuleSet.checked([Rule.exact(b"", b"x")]) is Refusal.BAD_RULE
    assert RuleSet.checked([Rule.exact(b"x" * 1025, b"")]) is Refusal.BAD_RULE
    assert isinstance(RuleSet.checked([Rule.ws_ping(), Rule.exact(b"a", b"b")]), RuleSet)


def test_ws_frame_lengths() -> None:
    assert ws_frame(0x1, b"a" * 200)[:4] == b"\x81\x7e\x00\xc8"
    assert ws_frame(0x2, b"a" * 70000)[:2] == b"\x82\x7f"


@given(st.lists(st.sampled_from([PINGREQ, b"PING\r\n", b"\x30", b"x"]), max_size=20))
def test_consumes_all_or_nothing(parts: list[bytes]) -> None:
    rules = RuleSet((*MQTT.rules, *LINE.rules))
    buf = b"".join(parts)
    got = decide_untrusted(buf, rules)
    whole = bool(parts) and all(p in (PINGREQ, b"PING\r\n") for p in parts)
    if whole:
        assert got is not None
        assert got.consume == len(buf)
        assert got.count == len(parts)
    else:
        assert got is None


def test_tag_index_singletons_sets_and_removal() -> None:
    from connpark._tags import TagIndex

    index = TagIndex()
    a, b = object(), object()
    assert index.add("p", (b"room", b"user:a"), a) == (b"room", b"user:a")
    shared = index.add("p", (b"room", b"user:b"), b)
    assert index.members("p", b"room") in ([a, b], [b, a])
    assert index.members("p", b"user:b") == [b]
    assert index.members("q", b"room") == []
    assert (index.tags, index.tagged) == (3, 2)
    index.discard("p", shared, b)
    assert index.members("p", b"room") == [a]
    assert index.members("p", b"user:b") == []
    index.discard("p", (b"room", b"user:a"), a)
    assert (index.tags, index.tagged) == (0, 0)
