"""Wire protocol v1, sans-IO: bytes + fds in, typed messages out, and back.

Theory of operation
-------------------
Every message travels as one or more *frames*::

    0       4    5     6       8
    +-------+----+-----+-------+----------------+
    | len   |type|flags| nfds  | body (len B)   |   header: struct "!IBBH"
    +-------+----+-----+-------+----------------+

``nfds`` file descriptors travel, as SCM_RIGHTS, in the same ``sendmsg`` as
the frame's first byte. The receiver keeps a FIFO of received fds and each
complete frame takes its ``nfds`` from the front; a complete frame whose fds
are not there is a protocol error (they can only have been lost).

A message with more entries than one frame can carry (more than 253 fds, or a
body over the frame limit) is split: every frame but the last has
``FLAG_MORE`` set, all have the same type, and the decoder joins them back
into one message. ``docs/protocol.md`` draws every body.

Nothing here does I/O. ``encode`` turns a message into ``Frame`` objects;
``Decoder`` is fed ``(bytes, fds)`` and hands out messages. The decoder owns
every fd it was given until it returns it inside a message; on any error, or
on ``close()``, it closes every fd it still owns.
"""

from __future__ import annotations

import enum
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cache, partial
from itertools import repeat
from typing import Any, Final, NamedTuple, TypeAlias

import attrs

from ._errors import LocalProtocolError, RemoteProtocolError

PROTOCOL_VERSION: Final = 4
#: Versions a container accepts: older workers keep working during a rolling deploy.
SUPPORTED_VERSIONS: Final = frozenset({1, 2, 3, 4})
#: Bits 48-55 of a ticket name the shard that issued it (see ``_lot``).
TICKET_SHARD_SHIFT: Final = 48
#: The most tickets a HELLO v2 may report from the previous session.
MAX_RESUME_TICKETS: Final = 4096
HEADER: Final = struct.Struct("!IBBH")
_HEAD: Final = HEADER.size
_unpack_header: Final = HEADER.unpack_from
#: SCM_MAX_FD on Linux: the most fds one sendmsg may carry.
MAX_FDS_PER_FRAME: Final = 253
DEFAULT_MAX_BODY: Final = 1 << 20
#: The most entries one (reassembled) message may hold.
DEFAULT_MAX_ENTRIES: Final = 1 << 16
#: The most body bytes one (reassembled) message may hold.
DEFAULT_MAX_MESSAGE: Final = 64 << 20
MAX_TOKEN: Final = 0xFFFF
FLAG_MORE: Final = 0x01

_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_HELLO = struct.Struct("!H")
_HELLO_RESUME = struct.Struct("!QH")
_WELCOME = struct.Struct("!QIIHI")
_WELCOME_SHARDS = struct.Struct("!HH")
_PARK_HEAD = struct.Struct("!IH")
_PARK_ENTRY = struct.Struct("!IBHI")
_PARKED_HEAD = struct.Struct("!II")
_PARKED_ENTRY = struct.Struct("!BQ")
_WAKE_ENTRY = struct.Struct("!QBBHI")
_CLOSE_ENTRY = struct.Struct("!QI")
_ERROR = struct.Struct("!H")
# v3: serving parked connections without waking them (docs/protocol.md).
_PARK_EXT_HEAD = struct.Struct("!HB")
_WAKE_EXT_HEAD = struct.Struct("!IQI")
_RULES_HEAD = struct.Struct("!IHBH")
_RULE = struct.Struct("!BBHH")
_RESULT = struct.Struct("!IBIII")
_TAGGED = struct.Struct("!BB")

_PARK_HANGUP_RETURNS = 0x01
_PARK_TIMEOUT_RETURNS = 0x02
_PARK_EXT = 0x04
#: v2: the worker sends this park again (its session was lost before PARKED came).
_PARK_RESENT = 0x08
_WAKE_HAS_FD = 0x01
_WAKE_INET6 = 0x02
_WAKE_EXT = 0x04


class MessageType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    PARK = 3
    PARKED = 4
    WAKE = 5
    ACK = 6
    UNPARK = 7
    CLOSE = 8
    STATS = 9
    STATS_REPLY = 10
    ERROR = 11
    #: v3: serving parked connections without waking them.
    RULES = 12
    RESULT = 13
    SEND = 14
    TAGGED = 15


class Reason(enum.IntEnum):
    """Why a parked connection came back."""

    READABLE = 1  #: the client sent bytes (they are still unread in the socket)
    HANGUP = 2  #: the peer closed (or reset) with nothing left to read
    TIMEOUT = 3  #: the idle deadline passed
    REQUESTED = 4  #: a worker asked for it with UNPARK
    SHUTDOWN = 5  #: the container is stopping
    #: v3: bytes sent to it (publish, auto-reply) did not fit the socket's send
    #: buffer; the rest is in ``unsent``, for the worker to finish in order
    UNSENT = 6

    def __str__(self) -> str:
        return self.name


_REASONS: Final = {int(r): r for r in Reason}


class Refusal(enum.IntEnum):
    """Per-entry answer to PARK; ``OK`` means a ticket was issued."""

    OK = 0
    FULL = 1
    NOT_A_TCP_STREAM = 2
    NOT_CONNECTED = 3
    TOKEN_TOO_LARGE = 4
    PENDING_TOO_LARGE = 5
    OUT_OF_FDS = 6
    SHUTTING_DOWN = 7
    BAD_TIMEOUT = 8
    #: Per-entry admission (the container inspects each fd on its own):
    NOT_A_SOCKET = 9
    NOT_INET = 10
    LISTENING = 11
    CONNECTING = 12
    SHUT_DOWN = 13
    UNINSPECTABLE = 14
    DUPLICATE = 15
    #: v3: tags, rules and publishes, each bounded by the container.
    TOO_MANY_TAGS = 16
    TAG_TOO_LARGE = 17
    UNKNOWN_RULES = 18
    TOO_MANY_RULES = 19
    BAD_RULE = 20
    TOO_LARGE = 21

    @property
    def label(self) -> str:
        """The name used in errors, stats and docs, e.g. ``"not-a-tcp-stream"``."""
        return self.name.lower().replace("_", "-")


_REFUSALS: Final = {int(r): r for r in Refusal}


class ErrorCode(enum.IntEnum):
    """Code carried by ERROR; the session ends after it."""

    PROTOCOL = 1
    VERSION = 2
    NOT_ALLOWED = 3
    TOO_MANY_SESSIONS = 4
    SHUTTING_DOWN = 5
    INTERNAL = 6
    #: The session broke a container limit (output not read in time, fds held mid-frame).
    LIMIT = 7


class Frame(NamedTuple):
    """One encoded frame: its bytes and the fds that go with its first byte.

    A named tuple, not an attrs class: the container makes one per frame it
    sends, and a tuple costs half as much Python to build.
    """

    data: bytes
    fds: tuple[int, ...] = ()


@attrs.frozen
class Hello:
    """Worker introduces itself: protocol version, pool and a name for logs.

    Version 2 adds what a reconnecting worker knows of its previous session:
    its id and the tickets woken to it whose ACK may not have reached the
    container (the container treats them as ACKed, never re-routes them).
    """

    version: int = PROTOCOL_VERSION
    pool: str = "default"
    name: str = ""
    #: v2: the previous session's id (0: none).
    resume_session: int = 0
    #: v2: tickets received in ``resume_session`` that may be un-ACKed.
    resume_tickets: tuple[int, ...] = ()


@attrs.frozen
class Welcome:
    """Container accepts a session and states the limits in force."""

    session_id: int
    max_token: int
    max_pending: int
    max_fds_per_frame: int = MAX_FDS_PER_FRAME
    #: Unacknowledged wakes the container sends this session before queueing.
    window: int = 1024
    #: v4: this shard's index and how many shards serve the path (0: not stated,
    #: an older container, i.e. one shard). Shard ``i > 0`` listens at
    #: ``shard_path(path, i)``; shard 0 at the path itself.
    shard: int = 0
    shards: int = 0


@attrs.frozen
class ParkEntry:
    """One socket to park, with what should come back with it."""

    fd: int
    token: bytes = b""
    pending: bytes = b""
    #: 0 means the container's default.
    idle_timeout_ms: int = 0
    hangup_returns: bool = False
    timeout_returns: bool = False
    #: v3: the rule set (``Rules.set_id``) that answers this connection's pings; 0: none.
    rules: int = 0
    #: v3: tags for ``Send``/``Tagged`` (UTF-8 bytes, at most 255 each).
    tags: tuple[bytes, ...] = ()
    #: Sent again after a lost session: the container may hold this socket already.
    resent: bool = False


@attrs.frozen
class Park:
    request_id: int
    entries: tuple[ParkEntry, ...]


#: ``LeanEntry`` flags (the wire's): the connection comes back on a hang-up, on a timeout.
LEAN_HANGUP_RETURNS: Final = _PARK_HANGUP_RETURNS
LEAN_TIMEOUT_RETURNS: Final = _PARK_TIMEOUT_RETURNS

#: One entry of a ``LeanPark``: (fd, token, pending, idle_timeout_ms, wire flags,
#: the entry as a ``ParkEntry`` when it is unusual (v3 rules or tags, re-sent, over
#: the decoder's ``lean_limits``), else None). Wire flags: hang-up and timeout
#: returns only (any other makes the entry unusual).
LeanEntry: TypeAlias = tuple[int, bytes, bytes, int, int, ParkEntry | None]


class LeanPark(NamedTuple):
    """One PARK frame as the container's decoder hands it out (``Decoder(lean_park=True)``).

    The same content as ``Park``, with a plain tuple per entry instead of a
    ``ParkEntry`` object: the container admits 253 of these per frame, and
    building objects it reads once was most of the cost of decoding them. A
    named tuple itself, for the same reason (one per frame).
    """

    request_id: int
    entries: tuple[LeanEntry, ...]


@attrs.frozen
class ParkResult:
    refusal: Refusal
    ticket: int = 0


@attrs.frozen
class Parked:
    """Answer to PARK, one result per entry, in order."""

    request_id: int
    results: tuple[ParkResult, ...]


@attrs.frozen
class WakeEntry:
    """One connection coming back; ``fd`` is None for a notice."""

    ticket: int
    reason: Reason
    token: bytes = b""
    pending: bytes = b""
    fd: int | None = None
    #: The socket is AF_INET6 (else AF_INET): lets the worker wrap it without syscalls.
    inet6: bool = False
    #: v3: auto-responses the container sent while it was parked.
    autoresponses: int = 0
    #: v3: when the last one was sent (Unix time, ms; 0: never).
    last_autoresponse_ms: int = 0
    #: v3: bytes the container was asked to send but the socket did not take.
    unsent: bytes = b""


@attrs.frozen
class Wake:
    entries: tuple[WakeEntry, ...]


#: A WAKE entry as ``Decoder(rows=True)`` hands it out: ``WakeEntry``'s fields, in order.
WakeRow: TypeAlias = tuple[int, Reason, bytes, bytes, int | None, bool, int, int, bytes]


@attrs.frozen
class WakeRows:
    """WAKE as a worker's decoder (``rows=True``) gives it: a plain tuple per entry.

    The worker's hot path: no object per entry until the hook makes its own.
    """

    rows: tuple[WakeRow, ...]

    @property
    def entries(self) -> tuple[WakeEntry, ...]:
        return tuple(WakeEntry(*row) for row in self.rows)


@attrs.frozen
class ParkedRows:
    """PARKED as a worker's decoder (``rows=True``) gives it: two columns, in entry order."""

    request_id: int
    #: ``Refusal`` values (checked), 0 (``OK``) when a ticket was issued.
    codes: tuple[int, ...]
    tickets: tuple[int, ...]

    @property
    def results(self) -> tuple[ParkResult, ...]:
        pairs = zip(self.codes, self.tickets, strict=True)
        return tuple(ParkResult(_REFUSALS[c], t) for c, t in pairs)


@attrs.frozen
class Ack:
    """Worker has the fds of these tickets; the container may drop its copies."""

    tickets: tuple[int, ...]


@attrs.frozen
class Unpark:
    """Wake these tickets now (reason REQUESTED)."""

    tickets: tuple[int, ...]


@attrs.frozen
class CloseEntry:
    ticket: int
    goodbye: bytes = b""


@attrs.frozen
class Close:
    """Close these parked connections, writing each goodbye first."""

    entries: tuple[CloseEntry, ...]


@attrs.frozen
class Stats:
    """Ask for a statistics snapshot."""


@attrs.frozen
class StatsReply:
    """Statistics as a UTF-8 JSON document (not on the hot path)."""

    body: bytes


@attrs.frozen
class Error:
    """The container's last word before it closes the session."""

    code: int
    text: str


class RuleKind(enum.IntEnum):
    """What an auto-response rule matches (``_autoresponse`` implements them)."""

    EXACT = 1  #: these exact bytes -> the reply bytes
    WS_PING = 2  #: a masked WebSocket ping (payload <= 125) -> a pong with its payload
    WS_TEXT = 3  #: a masked WebSocket text message equal to ``match`` -> text ``reply``


@attrs.frozen
class Rule:
    kind: RuleKind
    match: bytes = b""
    reply: bytes = b""
    #: An auto-response also pushes the idle deadline back.
    resets_idle: bool = False

    @classmethod
    def exact(cls, match: bytes, reply: bytes, *, resets_idle: bool = False) -> Rule:
        """These exact bytes (``b"\\xc0\\x00"``, an MQTT PINGREQ) -> these (PINGRESP)."""
        return cls(RuleKind.EXACT, bytes(match), bytes(reply), resets_idle)

    @classmethod
    def ws_ping(cls, *, resets_idle: bool = False) -> Rule:
        """A WebSocket client ping -> a pong with the same payload (RFC 6455)."""
        return cls(RuleKind.WS_PING, b"", b"", resets_idle)

    @classmethod
    def ws_text(cls, match: str | bytes, reply: str | bytes, *, resets_idle: bool = False) -> Rule:
        """A WebSocket text message equal to ``match`` -> a text message ``reply``."""
        m = match.encode() if isinstance(match, str) else bytes(match)
        r = reply.encode() if isinstance(reply, str) else bytes(reply)
        return cls(RuleKind.WS_TEXT, m, r, resets_idle)


@attrs.frozen
class Rules:
    """Register rule set ``set_id`` for this session (scope 0) or its whole pool (1)."""

    request_id: int
    set_id: int
    rules: tuple[Rule, ...]
    pool_scope: bool = False


@attrs.frozen
class Result:
    """Answer to RULES or SEND: a refusal code, and what a SEND did."""

    request_id: int
    refusal: Refusal = Refusal.OK
    #: SEND: connections that took the whole message.
    written: int = 0
    #: SEND: connections woken (reason UNSENT, or HANGUP for a dead one).
    woken: int = 0
    #: SEND: tickets that were not parked (woken already, gone, another pool's).
    missed: int = 0


@attrs.frozen
class Send:
    """Write ``data`` to parked connections (the tag's, else ``tickets``) without waking them."""

    request_id: int
    data: bytes
    tickets: tuple[int, ...] = ()
    tag: bytes = b""


class TagOp(enum.IntEnum):
    UNPARK = 1
    CLOSE = 2


@attrs.frozen
class Tagged:
    """UNPARK or CLOSE every parked connection of the pool with this tag."""

    op: TagOp
    tag: bytes
    goodbye: bytes = b""


Message: TypeAlias = (
    Hello
    | Welcome
    | Park
    | LeanPark
    | Parked
    | ParkedRows
    | Wake
    | WakeRows
    | Ack
    | Unpark
    | Close
    | Stats
    | StatsReply
    | Error
    | Rules
    | Result
    | Send
    | Tagged
)


def message_fds(msg: Message) -> list[int]:
    """Every fd a message carries, in wire order."""
    if isinstance(msg, Park):
        return [e.fd for e in msg.entries]
    if isinstance(msg, LeanPark):
        return [e[0] for e in msg.entries]
    if isinstance(msg, Wake):
        return [e.fd for e in msg.entries if e.fd is not None]
    if isinstance(msg, WakeRows):
        return [row[4] for row in msg.rows if row[4] is not None]
    return []


def close_fds(fds: Iterable[int]) -> None:
    """Close fds, ignoring the ones already gone: used on every error path."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


#: A batch of fds to close this long may go in one close_range(2) (``close_owned``).
_RANGE_AT = 8


def close_owned(fds: list[int]) -> None:
    """Close fds we own, each listed once (ACKed wakes): the hot path.

    A frame parked at once and woken at once holds consecutive fd numbers
    (the kernel hands out the lowest free ones): when the batch is exactly
    such a run, one close_range(2) closes it (~0.12 us per fd against ~0.33
    for a close(2) each, measured here). Else one close(2) per fd.
    """
    n = len(fds)
    if n >= _RANGE_AT:
        low = min(fds)
        if max(fds) - low == n - 1 and len(set(fds)) == n:  # every number between: ours
            os.closerange(low, low + n)
            return
    deque(map(os.close, fds), 0)


# ----------------------------------------------------------------- encoding


def _str_bytes(raw: bytes, what: str) -> bytes:
    if len(raw) > 0xFF:
        raise LocalProtocolError(f"{what} is {len(raw)} bytes, the limit is 255")
    return _U8.pack(len(raw)) + raw


def _str_field(value: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 0xFF:
        raise LocalProtocolError(f"{what} is {len(raw)} bytes, the limit is 255")
    return _U8.pack(len(raw)) + raw


def encode_park_entry(e: ParkEntry) -> bytes:
    """One PARK entry's bytes (its fd aside), for ``encode_park``."""
    if len(e.token) > MAX_TOKEN:
        raise LocalProtocolError(f"token of {len(e.token)} bytes is over {MAX_TOKEN}")
    try:
        return _park_entry(e)
    except struct.error as exc:
        raise LocalProtocolError(f"cannot encode a PARK entry: {exc}") from exc


def mark_resent(item: bytes) -> bytes:
    """An encoded PARK entry (``encode_park_entry``) with its RESENT flag set."""
    return item[:4] + _U8.pack(item[4] | _PARK_RESENT) + item[5:]


def _park_entry(e: ParkEntry) -> bytes:
    ext = bool(e.rules or e.tags)
    flags = (
        (_PARK_HANGUP_RETURNS if e.hangup_returns else 0)
        | (_PARK_TIMEOUT_RETURNS if e.timeout_returns else 0)
        | (_PARK_EXT if ext else 0)
        | (_PARK_RESENT if e.resent else 0)
    )
    out = _PARK_ENTRY.pack(e.idle_timeout_ms, flags, len(e.token), len(e.pending)) + (
        e.token + e.pending
    )
    if ext:
        out += _PARK_EXT_HEAD.pack(e.rules, len(e.tags))
        out += b"".join(_U8.pack(len(t)) + t for t in e.tags)
    return out


def wake_ext(autoresponses: int, last_ms: int, unsent: bytes) -> bytes:
    """The v3 tail of a WAKE entry (flag ``EXT``); the container's encoder uses it too."""
    return _WAKE_EXT_HEAD.pack(autoresponses, last_ms, len(unsent)) + unsent


def _wake_entry(e: WakeEntry) -> bytes:
    ext = bool(e.autoresponses or e.last_autoresponse_ms or e.unsent)
    flags = (
        (_WAKE_HAS_FD if e.fd is not None else 0)
        | (_WAKE_INET6 if e.inet6 else 0)
        | (_WAKE_EXT if ext else 0)
    )
    out = _WAKE_ENTRY.pack(e.ticket, e.reason, flags, len(e.token), len(e.pending)) + (
        e.token + e.pending
    )
    if ext:
        out += wake_ext(e.autoresponses, e.last_autoresponse_ms, e.unsent)
    return out


def _close_entry(e: CloseEntry) -> bytes:
    return _CLOSE_ENTRY.pack(e.ticket, len(e.goodbye)) + e.goodbye


def _chunks(
    head: bytes,
    items: Sequence[bytes],
    item_fds: Sequence[int],
    *,
    count: struct.Struct,
    max_body: int,
    max_fds: int,
) -> list[tuple[bytes, int, int]]:
    """Split encoded entries into frame bodies: (body, first item, item count)."""
    out: list[tuple[bytes, int, int]] = []
    fixed = len(head) + count.size
    start = 0
    n = len(items)
    while True:
        size = fixed
        fds = 0
        end = start
        while end < n:
            grow = len(items[end])
            if size + grow > max_body or fds + item_fds[end] > max_fds:
                break
            size += grow
            fds += item_fds[end]
            end += 1
        if end == start and end < n:
            raise LocalProtocolError(
                f"one entry of {len(items[end])} bytes does not fit a frame of {max_body}"
            )
        if end - start > (1 << (8 * count.size)) - 1:
            end = start + (1 << (8 * count.size)) - 1
        out.append((head + count.pack(end - start) + b"".join(items[start:end]), start, end))
        start = end
        if start >= n:
            return out


def _frames(
    mtype: MessageType,
    head: bytes,
    items: Sequence[bytes],
    fds: Sequence[int | None],
    *,
    count: struct.Struct,
    max_body: int,
    max_fds: int,
) -> list[Frame]:
    item_fds = [0 if fd is None else 1 for fd in fds]
    parts = _chunks(head, items, item_fds, count=count, max_body=max_body, max_fds=max_fds)
    frames = []
    for i, (body, start, end) in enumerate(parts):
        flags = FLAG_MORE if i < len(parts) - 1 else 0
        chunk_fds = tuple(fd for fd in fds[start:end] if fd is not None)
        frames.append(Frame(HEADER.pack(len(body), mtype, flags, len(chunk_fds)) + body, chunk_fds))
    return frames


def _single(mtype: MessageType, body: bytes, max_body: int) -> list[Frame]:
    if len(body) > max_body:
        raise LocalProtocolError(f"{mtype.name} body of {len(body)} bytes is over {max_body}")
    return [Frame(HEADER.pack(len(body), mtype, 0, 0) + body)]


def encode_park(
    request_id: int,
    items: Sequence[bytes],
    fds: Sequence[int],
    *,
    max_body: int = DEFAULT_MAX_BODY,
    max_fds: int = MAX_FDS_PER_FRAME,
) -> list[Frame]:
    """The frames of ``Park(request_id, entries)`` from its entries already encoded
    (``encode_park_entry``), one fd each: the worker's hot path.

    When every entry encodes the same (``park_many`` with one policy and no
    tokens), frames are cut by arithmetic instead of entry by entry.
    """
    n = len(items)
    head = _U32.pack(request_id)
    if n and items.count(items[0]) == n:
        item = items[0]
        fixed = len(head) + _U16.size
        per = min(max_fds, (max_body - fixed) // len(item), 0xFFFF)
        if per > 0:
            frames = []
            for start in range(0, n, per):
                k = min(per, n - start)
                body = head + _U16.pack(k) + item * k
                flags = FLAG_MORE if start + k < n else 0
                frames.append(
                    Frame(
                        HEADER.pack(len(body), MessageType.PARK, flags, k) + body,
                        tuple(fds[start : start + k]),
                    )
                )
            return frames
    return _frames(
        MessageType.PARK, head, items, fds, count=_U16, max_body=max_body, max_fds=max_fds
    )


def encode(
    msg: Message, *, max_body: int = DEFAULT_MAX_BODY, max_fds: int = MAX_FDS_PER_FRAME
) -> list[Frame]:
    """Encode one message as one or more frames (split above ``max_fds``/``max_body``)."""
    try:
        return _encode(msg, max_body, max_fds)
    except (struct.error, UnicodeEncodeError) as exc:
        raise LocalProtocolError(f"cannot encode {type(msg).__name__}: {exc}") from exc


def _encode(msg: Message, max_body: int, max_fds: int) -> list[Frame]:
    kw = {"max_body": max_body, "max_fds": max_fds}
    if isinstance(msg, Park):
        for e in msg.entries:
            if len(e.token) > MAX_TOKEN:
                raise LocalProtocolError(f"token of {len(e.token)} bytes is over {MAX_TOKEN}")
        return _frames(
            MessageType.PARK,
            _U32.pack(msg.request_id),
            [_park_entry(e) for e in msg.entries],
            [e.fd for e in msg.entries],
            count=_U16,
            **kw,
        )
    if isinstance(msg, Wake):
        for w in msg.entries:
            if len(w.token) > MAX_TOKEN:
                raise LocalProtocolError(f"token of {len(w.token)} bytes is over {MAX_TOKEN}")
        return _frames(
            MessageType.WAKE,
            b"",
            [_wake_entry(e) for e in msg.entries],
            [e.fd for e in msg.entries],
            count=_U16,
            **kw,
        )
    if isinstance(msg, Parked):
        items = [_PARKED_ENTRY.pack(r.refusal, r.ticket) for r in msg.results]
        return _frames(
            MessageType.PARKED,
            _U32.pack(msg.request_id),
            items,
            [None] * len(items),
            count=_U32,
            **kw,
        )
    if isinstance(msg, (Ack, Unpark)):
        mtype = MessageType.ACK if isinstance(msg, Ack) else MessageType.UNPARK
        n = len(msg.tickets)
        if _U32.size + 8 * n <= max_body:  # one frame (the worker's every batch): one pack
            head = HEADER.pack(_U32.size + 8 * n, mtype, 0, 0)
            return [Frame(head + struct.pack(f"!I{n}Q", n, *msg.tickets))]
        items = [_U64.pack(t) for t in msg.tickets]
        return _frames(mtype, b"", items, [None] * len(items), count=_U32, **kw)
    if isinstance(msg, Close):
        items = [_close_entry(e) for e in msg.entries]
        return _frames(MessageType.CLOSE, b"", items, [None] * len(items), count=_U32, **kw)
    if isinstance(msg, Hello):
        body = (
            _HELLO.pack(msg.version) + _str_field(msg.pool, "pool") + _str_field(msg.name, "name")
        )
        if msg.version >= 2:
            if len(msg.resume_tickets) > MAX_RESUME_TICKETS:
                raise LocalProtocolError(
                    f"{len(msg.resume_tickets)} resume tickets, over {MAX_RESUME_TICKETS}"
                )
            body += _HELLO_RESUME.pack(msg.resume_session, len(msg.resume_tickets))
            body += b"".join(_U64.pack(t) for t in msg.resume_tickets)
        elif msg.resume_session or msg.resume_tickets:
            raise LocalProtocolError("HELLO v1 cannot carry resume fields")
        return _single(MessageType.HELLO, body, max_body)
    if isinstance(msg, Welcome):
        body = _WELCOME.pack(
            msg.session_id, msg.max_token, msg.max_pending, msg.max_fds_per_frame, msg.window
        )
        if msg.shards:  # v4 only: an older worker would call the fields trailing bytes
            body += _WELCOME_SHARDS.pack(msg.shard, msg.shards)
        return _single(MessageType.WELCOME, body, max_body)
    if isinstance(msg, Stats):
        return _single(MessageType.STATS, b"", max_body)
    if isinstance(msg, StatsReply):
        return _single(MessageType.STATS_REPLY, msg.body, max_body)
    if isinstance(msg, Error):
        return _single(MessageType.ERROR, _ERROR.pack(msg.code) + msg.text.encode(), max_body)
    if isinstance(msg, Rules):
        body = _RULES_HEAD.pack(msg.request_id, msg.set_id, int(msg.pool_scope), len(msg.rules))
        body += b"".join(
            _RULE.pack(r.kind, int(r.resets_idle), len(r.match), len(r.reply)) + r.match + r.reply
            for r in msg.rules
        )
        return _single(MessageType.RULES, body, max_body)
    if isinstance(msg, Result):
        body = _RESULT.pack(msg.request_id, msg.refusal, msg.written, msg.woken, msg.missed)
        return _single(MessageType.RESULT, body, max_body)
    if isinstance(msg, Send):
        body = _U32.pack(msg.request_id) + _str_bytes(msg.tag, "tag")
        body += _U32.pack(len(msg.tickets)) + b"".join(_U64.pack(t) for t in msg.tickets)
        body += _U32.pack(len(msg.data)) + msg.data
        return _single(MessageType.SEND, body, max_body)
    if isinstance(msg, Tagged):
        body = _TAGGED.pack(msg.op, len(msg.tag)) + msg.tag
        body += _U32.pack(len(msg.goodbye)) + msg.goodbye
        return _single(MessageType.TAGGED, body, max_body)
    raise LocalProtocolError(f"not a connpark message: {msg!r}")


def encode_all(
    msgs: Iterable[Message], *, max_body: int = DEFAULT_MAX_BODY, max_fds: int = MAX_FDS_PER_FRAME
) -> list[Frame]:
    """Encode several messages, in order, into one list of frames."""
    out: list[Frame] = []
    for m in msgs:
        out.extend(encode(m, max_body=max_body, max_fds=max_fds))
    return out


# ----------------------------------------------------------------- decoding


def _truncated(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"truncated {what} body")


class _Body:
    """A cursor over one untrusted frame body: every read is bounds-checked."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def unpack(self, s: struct.Struct) -> tuple[int, ...]:
        if self.pos + s.size > len(self.data):
            raise _truncated(self.what)
        out = s.unpack_from(self.data, self.pos)
        self.pos += s.size
        return out

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _truncated(self.what)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def text(self, n: int, field: str) -> str:
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"bad {self.what} field {field}: not UTF-8") from None

    def done(self) -> None:
        if self.pos != len(self.data):
            extra = len(self.data) - self.pos
            raise RemoteProtocolError(f"{extra} trailing bytes in {self.what} body")


_REFUSAL_CODES: Final = frozenset(_REFUSALS)
#: WAKE entry flags with nothing after the fixed part: fd or not, inet6 or not.
_PLAIN_WAKE_FLAGS: Final = frozenset({0, _WAKE_HAS_FD, _WAKE_INET6, _WAKE_HAS_FD | _WAKE_INET6})


def _plain_wake_rows(body: _Body, count: int, fds: deque[int], entries: list[object]) -> bool:
    """The usual WAKE, decoded in bulk: no token, pending or v3 tail in any entry.

    False (nothing taken) when it is not one, or is malformed: the entry loop
    decodes it then, and names what is wrong.
    """
    data = body.data
    if not count or len(data) - body.pos != count * _WAKE_ENTRY.size:
        return False
    rows = _WAKE_ENTRY.iter_unpack(memoryview(data)[body.pos :])
    tickets, reasons, flags, tlens, plens = zip(*rows, strict=True)
    if (
        any(tlens)
        or any(plens)
        or not _PLAIN_WAKE_FLAGS.issuperset(flags)
        or not _REASONS.keys() >= set(reasons)
        or flags.count(_WAKE_HAS_FD) + flags.count(_WAKE_HAS_FD | _WAKE_INET6) != len(fds)
    ):
        return False
    take_fd = fds.popleft
    why = _REASONS
    entries.extend(
        [
            (t, why[r], b"", b"", take_fd() if f & _WAKE_HAS_FD else None, f > 1, 0, 0, b"")
            for t, r, f in zip(tickets, reasons, flags, strict=True)
        ]
    )
    body.pos = len(data)
    return True


# Each list type's decoder reads one frame body (``data``, of a ``what`` frame)
# into ``entries`` (moving fds from ``fds`` into them) and returns the frame's
# head (request id, else 0); on error the caller closes what is left in both.


def _decode_park_untrusted(data: bytes, what: str, fds: deque[int], entries: list[Any]) -> int:
    """PARK as ``ParkEntry`` objects (the lean decoder is ``_decode_lean_park_untrusted``)."""
    body = _Body(data, what)
    head, count = body.unpack(_PARK_HEAD)
    if count != len(fds):
        raise RemoteProtocolError(f"PARK has {count} entries but {len(fds)} fds")
    unpack_entry = body.unpack
    take = body.take
    for _ in range(count):
        idle, flags, tlen, plen = unpack_entry(_PARK_ENTRY)
        if flags & ~_PARK_FLAGS:
            raise RemoteProtocolError(f"bad PARK field flags: {flags:#x}")
        token = take(tlen) if tlen else b""
        pending = take(plen) if plen else b""
        # The fd leaves ``fds`` once its entry is read whole (else the caller closes it).
        entries.append(_decode_park_tail(body, fds[0], token, pending, idle, flags))
        fds.popleft()
    body.done()
    return head


def _decode_wake_untrusted(data: bytes, what: str, fds: deque[int], entries: list[Any]) -> int:
    """WAKE as rows (``WakeEntry``'s fields): the kind's builder makes the entries, if wanted."""
    body = _Body(data, what)
    (count,) = body.unpack(_U16)
    if _plain_wake_rows(body, count, fds, entries):
        return 0
    with_fd = 0
    unpack_entry = body.unpack
    take = body.take
    for _ in range(count):
        ticket, reason, flags, tlen, plen = unpack_entry(_WAKE_ENTRY)
        if flags & ~(_WAKE_HAS_FD | _WAKE_INET6 | _WAKE_EXT):
            raise RemoteProtocolError(f"bad WAKE field flags: {flags:#x}")
        why = _REASONS.get(reason)  # a dict, not Reason(): this loop is the hot path
        if why is None:
            raise RemoteProtocolError(f"bad WAKE field reason: {reason}")
        token = take(tlen) if tlen else b""
        pending = take(plen) if plen else b""
        count_ar = last_ms = 0
        unsent = b""
        if flags & _WAKE_EXT:
            count_ar, last_ms, ulen = body.unpack(_WAKE_EXT_HEAD)
            unsent = body.take(ulen)
        fd: int | None = None  # taken last: nothing can fail while we hold it
        if flags & _WAKE_HAS_FD:
            with_fd += 1
            if not fds:
                raise RemoteProtocolError("WAKE has more fd entries than fds")
            fd = fds.popleft()
        inet6 = bool(flags & _WAKE_INET6)
        entries.append((ticket, why, token, pending, fd, inet6, count_ar, last_ms, unsent))
    if fds:
        raise RemoteProtocolError(f"WAKE has {with_fd} fd entries but {with_fd + len(fds)} fds")
    body.done()
    return 0


def _decode_parked_untrusted(data: bytes, what: str, fds: deque[int], entries: list[Any]) -> int:
    """PARKED as (code, ticket) rows: the kind's builder makes the results."""
    body = _Body(data, what)
    head, count = body.unpack(_PARKED_HEAD)
    if len(data) - body.pos == count * _PARKED_ENTRY.size:
        # Every code checked at once (a code byte starts each entry), then the
        # rows in bulk.
        if _REFUSAL_CODES.issuperset(data[body.pos :: _PARKED_ENTRY.size]):
            entries.extend(_PARKED_ENTRY.iter_unpack(memoryview(data)[body.pos :]))
            return head
    unpack_entry = body.unpack
    for _ in range(count):
        code, ticket = unpack_entry(_PARKED_ENTRY)
        refusal = _REFUSALS.get(code)  # a dict, not Refusal(): the hot path
        if refusal is None:
            raise RemoteProtocolError(f"bad PARKED field code: {code}")
        entries.append((refusal, ticket))
    body.done()
    return head


def _decode_tickets_untrusted(data: bytes, what: str, fds: deque[int], entries: list[Any]) -> int:
    """ACK and UNPARK: a count, then exactly that many tickets.

    Read without a ``_Body``: the count is the only field that can be cut
    short, and the one unpack of the tickets reads the body to its end.
    """
    try:
        (count,) = _U32.unpack_from(data)
    except struct.error:
        raise _truncated(what) from None
    left = len(data) - _U32.size
    if count * 8 != left:
        raise RemoteProtocolError(
            f"bad {what} body: {count} tickets need {count * 8} bytes, got {left}"
        )
    entries.extend(struct.unpack_from(f"!{count}Q", data, _U32.size))  # the format is cached
    return 0


def _decode_close_untrusted(data: bytes, what: str, fds: deque[int], entries: list[Any]) -> int:
    body = _Body(data, what)
    (count,) = body.unpack(_U32)
    for _ in range(count):
        ticket, glen = body.unpack(_CLOSE_ENTRY)
        entries.append(CloseEntry(ticket, body.take(glen)))
    body.done()
    return 0


_PARK_FLAGS = _PARK_HANGUP_RETURNS | _PARK_TIMEOUT_RETURNS | _PARK_EXT | _PARK_RESENT
#: Flags a lean entry cannot carry alone: unknown bits, v3 extensions, re-sent.
_UNUSUAL_PARK = ~(_PARK_HANGUP_RETURNS | _PARK_TIMEOUT_RETURNS)
#: Not a wire bit (flags are one byte): the decoder's mark of a token or pending
#: over its ``lean_limits``, which makes the entry unusual.
_OVER_LIMIT = 0x100


def _decode_lean_park_untrusted(
    data: bytes,
    what: str,
    fds: deque[int],
    entries: list[Any],
    max_token: int = 0xFFFF,
    max_pending: int = 0xFFFFFFFF,
) -> int:
    """A PARK body as ``LeanEntry`` tuples (``Decoder(lean_park=True)``); its request id.

    The checks of ``_decode_park_untrusted``, inlined: this is the
    container's hot path. ``fds`` are taken (and ``entries`` filled) only once
    the whole body is valid; on error both are as they were. An entry whose
    token or pending bytes are longer than ``max_token`` or ``max_pending``
    comes out unusual (with its ``ParkEntry``), for the caller to refuse.
    """
    head: int
    try:
        head, count = _PARK_HEAD.unpack_from(data)
    except struct.error:
        raise _truncated(what) from None
    if count != len(fds):
        raise RemoteProtocolError(f"PARK has {count} entries but {len(fds)} fds")
    pos = _PARK_HEAD.size
    step = _PARK_ENTRY.size
    if len(data) == pos + count * step and count:
        # No token or pending bytes (else the body is longer, or cut short: the
        # loop below says so): the usual frame, decoded at once, to its end.
        fields = (_PARK_ENTRIES.get(count) or _park_entries(count)).unpack_from(data, pos)
        flags = fields[1::4]
        if (
            not any(fields[2::4])
            and not any(fields[3::4])
            and 1 not in bytes(flags).translate(_UNUSUAL_FLAGS)
        ):
            entries.extend(zip(fds, repeat(b""), repeat(b""), fields[0::4], flags, repeat(None)))
            fds.clear()
            return head
    body = _Body(data, what)  # for the general path's reads and the trailing bytes
    unpack = _PARK_ENTRY.unpack_from
    unusual = _UNUSUAL_PARK
    out: list[LeanEntry] = []
    append = out.append
    try:
        for fd in fds:
            idle, flags, tlen, plen = unpack(data, pos)  # struct.error past the end
            pos += step
            if tlen:
                token = data[pos : pos + tlen]
                pos += tlen
                if tlen > max_token:
                    flags |= _OVER_LIMIT
            else:
                token = b""
            if plen:
                pending = data[pos : pos + plen]
                pos += plen
                if plen > max_pending:
                    flags |= _OVER_LIMIT
            else:
                pending = b""
            if flags & unusual:  # bad, or for the general path (a ParkEntry)
                pos = _unusual_park(body, pos, fd, idle, flags, token, pending, append)
            else:
                append((fd, token, pending, idle, flags, None))
    except struct.error:
        raise _truncated(what) from None
    if pos > len(data):  # a token or pending cut short
        raise _truncated(what)
    body.pos = pos
    body.done()
    fds.clear()
    entries.extend(out)
    return head


#: A PARK entry's flags byte -> 1 if it takes the general path (``_UNUSUAL_PARK``).
_UNUSUAL_FLAGS = bytes(1 if f & _UNUSUAL_PARK else 0 for f in range(256))
#: PARK entries without token or pending bytes, by count.
_PARK_ENTRIES: dict[int, struct.Struct] = {}


def _park_entries(count: int) -> struct.Struct:
    """The layout of ``count`` such entries, made once (callers look in the cache first)."""
    layout = _PARK_ENTRIES[count] = struct.Struct("!" + _PARK_ENTRY.format[1:] * count)
    return layout


def _unusual_park(
    body: _Body,
    pos: int,
    fd: int,
    idle: int,
    flags: int,
    token: bytes,
    pending: bytes,
    append: Callable[[LeanEntry], None],
) -> int:
    """A lean PARK entry with bad flags (raises), or v3 rules or tags, or re-sent:
    its ``ParkEntry`` goes with it. Returns the position after it."""
    if flags & ~(_PARK_FLAGS | _OVER_LIMIT):
        raise RemoteProtocolError(f"bad PARK field flags: {flags & 0xFF:#x}")
    if pos > len(body.data):
        raise _truncated(body.what)
    body.pos = pos
    entry = _decode_park_tail(body, fd, token, pending, idle, flags)
    append((fd, token, pending, idle, flags & ~_OVER_LIMIT, entry))
    return body.pos


def _decode_park_tail(
    body: _Body, fd: int, token: bytes, pending: bytes, idle: int, flags: int
) -> ParkEntry:
    """A PARK entry as a ``ParkEntry``, its v3 rules and tags (``_PARK_EXT``) read
    from ``body`` at its position (both decoders: one reading of the tail)."""
    rules, tags = 0, tuple[bytes, ...]()
    if flags & _PARK_EXT:
        rules, ntags = body.unpack(_PARK_EXT_HEAD)
        tags = tuple(body.take(body.unpack(_U8)[0]) for _ in range(ntags))
    return ParkEntry(
        fd,
        token,
        pending,
        idle,
        bool(flags & _PARK_HANGUP_RETURNS),
        bool(flags & _PARK_TIMEOUT_RETURNS),
        rules,
        tags,
        bool(flags & _PARK_RESENT),
    )


# Each list type's builder makes its message from a frame's (or a joined
# message's) decoded entries.


def _park(head: int, entries: list[Any]) -> Message:
    return Park(head, tuple(entries))


def _lean_park(head: int, entries: list[Any]) -> Message:
    return LeanPark(head, tuple(entries))


def _parked(head: int, pairs: list[Any]) -> Message:
    return Parked(head, tuple(ParkResult(_REFUSALS[c], t) for c, t in pairs))


def _parked_rows(head: int, pairs: list[Any]) -> Message:
    codes, tickets = zip(*pairs, strict=True) if pairs else ((), ())
    return ParkedRows(head, codes, tickets)


def _wake(head: int, rows: list[Any]) -> Message:
    return Wake(tuple(WakeEntry(*row) for row in rows))


def _wake_rows(head: int, rows: list[Any]) -> Message:
    return WakeRows(tuple(rows))


def _ack(head: int, tickets: list[Any]) -> Message:
    return Ack(tuple(tickets))


def _unpark(head: int, tickets: list[Any]) -> Message:
    return Unpark(tuple(tickets))


def _close(head: int, entries: list[Any]) -> Message:
    return Close(tuple(entries))


_Entries: TypeAlias = Callable[[bytes, str, deque[int], list[Any]], int]
_Build: TypeAlias = Callable[[int, list[Any]], Message]


class _Kind(NamedTuple):
    """A message type as the decoder sees it: one dict lookup per frame finds it all."""

    mtype: MessageType
    name: str
    #: Header flags this type may not carry: every one but ``FLAG_MORE`` for a list type.
    bad_flags: int
    #: Its frames may carry fds (PARK, WAKE).
    fds: bool
    #: A list type's entry decoder and builder; None: one frame, one message
    #: (``_decode_single_untrusted``).
    lists: tuple[_Entries, _Build] | None = None


@cache
def _kinds(*, lean_park: bool, lean_limits: tuple[int, int], rows: bool) -> dict[int, _Kind]:
    """A decoder's table: the wire's type byte -> its ``_Kind`` (shared, never changed)."""
    T = MessageType
    kinds = {int(t): _Kind(t, t.name, 0xFF, False) for t in T}
    lists: dict[MessageType, tuple[_Entries, _Build]] = {
        T.PARK: (_decode_park_untrusted, _park),
        T.PARKED: (_decode_parked_untrusted, _parked_rows if rows else _parked),
        T.WAKE: (_decode_wake_untrusted, _wake_rows if rows else _wake),
        T.ACK: (_decode_tickets_untrusted, _ack),
        T.UNPARK: (_decode_tickets_untrusted, _unpark),
        T.CLOSE: (_decode_close_untrusted, _close),
    }
    if lean_park:
        max_token, max_pending = lean_limits
        lean = partial(_decode_lean_park_untrusted, max_token=max_token, max_pending=max_pending)
        lists[T.PARK] = (lean, _lean_park)
    for t, pair in lists.items():
        kinds[int(t)] = _Kind(t, t.name, 0xFF & ~FLAG_MORE, t in (T.PARK, T.WAKE), pair)
    return kinds


class _Split(NamedTuple):
    """A message being joined from FLAG_MORE frames (or, unjoined, followed)."""

    kind: _Kind
    build: _Build
    head: int
    #: Joined so far (always empty when the decoder does not join).
    entries: list[Any]


def _decode_single_untrusted(mtype: MessageType, body: _Body) -> Message:
    msg: Message
    if mtype is MessageType.HELLO:
        (version,) = body.unpack(_HELLO)
        pool = body.text(body.unpack(_U8)[0], "pool")
        name = body.text(body.unpack(_U8)[0], "name")
        resume_session, resume = 0, tuple[int, ...]()
        if version not in SUPPORTED_VERSIONS:
            body.take(len(body.data) - body.pos)  # a later version's fields: answer VERSION
        elif version >= 2:
            resume_session, count = body.unpack(_HELLO_RESUME)
            if count > MAX_RESUME_TICKETS:
                raise RemoteProtocolError(
                    f"HELLO reports {count} resume tickets, over {MAX_RESUME_TICKETS}"
                )
            resume = tuple(body.unpack(_U64)[0] for _ in range(count))
        msg = Hello(version, pool, name, resume_session, resume)
    elif mtype is MessageType.WELCOME:
        head = body.unpack(_WELCOME)
        v4 = len(body.data) >= _WELCOME.size + _WELCOME_SHARDS.size
        shards = body.unpack(_WELCOME_SHARDS) if v4 else (0, 0)
        msg = Welcome(*head, *shards)
        if msg.shards and msg.shard >= msg.shards:
            raise RemoteProtocolError(f"WELCOME names shard {msg.shard} of {msg.shards}")
    elif mtype is MessageType.STATS:
        msg = Stats()
    elif mtype is MessageType.STATS_REPLY:
        msg = StatsReply(body.take(len(body.data)))
    elif mtype is MessageType.RULES:
        request_id, set_id, scope, count = body.unpack(_RULES_HEAD)
        if scope > 1:
            raise RemoteProtocolError(f"bad RULES field scope: {scope}")
        rules = []
        for _ in range(count):
            kind, flags, mlen, rlen = body.unpack(_RULE)
            if flags & ~1:
                raise RemoteProtocolError(f"bad RULES field flags: {flags:#x}")
            try:
                rkind = RuleKind(kind)
            except ValueError:
                raise RemoteProtocolError(f"bad RULES field kind: {kind}") from None
            rules.append(Rule(rkind, body.take(mlen), body.take(rlen), bool(flags)))
        msg = Rules(request_id, set_id, tuple(rules), bool(scope))
    elif mtype is MessageType.RESULT:
        request_id, code, written, woken, missed = body.unpack(_RESULT)
        try:
            refusal = Refusal(code)
        except ValueError:
            raise RemoteProtocolError(f"bad RESULT field refusal: {code}") from None
        msg = Result(request_id, refusal, written, woken, missed)
    elif mtype is MessageType.SEND:
        (request_id,) = body.unpack(_U32)
        tag = body.take(body.unpack(_U8)[0])
        (count,) = body.unpack(_U32)
        if count * 8 > len(body.data) - body.pos:
            raise RemoteProtocolError("truncated SEND body")
        tickets = tuple(body.unpack(_U64)[0] for _ in range(count))
        data = body.take(body.unpack(_U32)[0])
        msg = Send(request_id, data, tickets, tag)
    elif mtype is MessageType.TAGGED:
        op, tlen = body.unpack(_TAGGED)
        try:
            top = TagOp(op)
        except ValueError:
            raise RemoteProtocolError(f"bad TAGGED field op: {op}") from None
        tag = body.take(tlen)
        goodbye = body.take(body.unpack(_U32)[0])
        msg = Tagged(top, tag, goodbye)
    else:  # ERROR
        (code,) = body.unpack(_ERROR)
        msg = Error(code, body.text(len(body.data) - body.pos, "text"))
    body.done()
    return msg


class Decoder:
    """Incremental decoder: ``receive_data(bytes, fds)`` then ``next_message()``.

    ``next_message`` returns None when it needs more data. Every malformed
    input raises ``RemoteProtocolError``; the decoder then closes every fd it
    still holds and stays broken (later calls raise again).
    """

    def __init__(
        self,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        max_fds_per_frame: int = MAX_FDS_PER_FRAME,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_message: int = DEFAULT_MAX_MESSAGE,
        join_split: bool = True,
        lean_park: bool = False,
        lean_limits: tuple[int, int] = (0xFFFF, 0xFFFFFFFF),
        rows: bool = False,
    ) -> None:
        # The type table (``_kinds``) is chosen once, from three options:
        # ``rows``: the worker's hot path, PARKED and WAKE handed out as
        # ``ParkedRows`` and ``WakeRows`` (plain tuples), not an object per entry;
        # ``lean_park``: PARK comes out as ``LeanPark`` (tuples, not ``ParkEntry``);
        # ``lean_limits``: (max token, max pending) bytes, over which a
        # ``LeanEntry`` is unusual (it carries its ``ParkEntry``): the container's
        # general path refuses it.
        self._kinds = _kinds(lean_park=lean_park, lean_limits=lean_limits, rows=rows)
        #: False: hand out each frame of a split message as its own message
        #: (same type and request id, in order) instead of joining them. The
        #: container uses it so a big PARK never piles up fds in the decoder.
        self.join_split = join_split
        self.max_body = max_body
        self.max_fds_per_frame = max_fds_per_frame
        self.max_entries = max_entries
        self.max_message = max_message
        self._split_bytes = 0
        self._split_entries = 0
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        self._split: _Split | None = None
        self._broken: RemoteProtocolError | None = None

    @property
    def held_fds(self) -> int:
        """How many fds the decoder owns right now (queued or in a partial message)."""
        if self._split is None:
            return len(self._fds)
        split = self._split
        return len(self._fds) + len(message_fds(split.build(split.head, split.entries)))

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def broken(self) -> bool:
        """A protocol error was raised: nothing more can be decoded."""
        return self._broken is not None

    def frame_head(self) -> bytes:
        """The buffered start (up to a header) of the next frame, for fd-less reads."""
        return bytes(self._buf[:_HEAD])

    def receive_data(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Feed bytes and the fds that came with them. The decoder now owns the fds."""
        if fds:
            self._fds.extend(fds)
        if self._broken is not None:
            self.close()
            raise self._broken
        self._buf += data

    def __iter__(self) -> Iterator[Message]:
        while (msg := self.next_message()) is not None:
            yield msg

    def next_message(self) -> Message | None:
        """The next complete message, or None when more data is needed."""
        if self._broken is not None:
            raise self._broken
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._broken = exc
            self.close()
            raise

    def _next(self) -> Message | None:
        while True:
            buf = self._buf
            if len(buf) < _HEAD:
                if not buf and self._fds:
                    raise RemoteProtocolError(f"{len(self._fds)} fds arrived without a frame")
                return None
            length, raw_type, flags, nfds = _unpack_header(buf)
            kind = self._kinds.get(raw_type)  # the type, its name and its rules, at once
            if kind is None:
                raise RemoteProtocolError(f"unknown message type {raw_type}")
            mtype, name, bad_flags, carries_fds, lists = kind
            if length > self.max_body:
                raise RemoteProtocolError(
                    f"{name} frame length {length} is over the limit {self.max_body}"
                )
            if nfds > self.max_fds_per_frame:
                raise RemoteProtocolError(
                    f"{name} frame has {nfds} fds, over the limit {self.max_fds_per_frame}"
                )
            if flags & bad_flags:
                raise RemoteProtocolError(f"bad {name} frame flags {flags:#x}")
            if nfds and not carries_fds:
                raise RemoteProtocolError(f"{name} frame cannot carry fds")
            split = self._split
            if split is not None and split.kind is not kind:
                raise RemoteProtocolError(f"{name} frame inside a split {split.kind.name} message")
            end = _HEAD + length
            if len(buf) < end:
                return None
            fds = self._fds
            if len(fds) < nfds:
                raise RemoteProtocolError(f"{name} frame needs {nfds} fds, only {len(fds)} arrived")
            data = bytes(buf[_HEAD:end])
            del buf[:end]
            if lists is None:
                return _decode_single_untrusted(mtype, _Body(data, name))
            decode, build = lists
            if not nfds:
                frame_fds: deque[int] = deque()
            elif nfds == len(fds):  # the usual: the frame's fds are all there are
                frame_fds, self._fds = fds, deque()
            else:
                frame_fds = deque([fds.popleft() for _ in range(nfds)])
            entries: list[Any] = []
            try:
                head = decode(data, name, frame_fds, entries)
            except RemoteProtocolError:
                close_fds(frame_fds)
                close_fds(message_fds(build(0, entries)))
                raise
            if split is None and not flags:
                # The usual: a whole message in one frame. Within the limits, it
                # is what the general path below would hand out.
                if length <= self.max_message and len(entries) <= self.max_entries:
                    return build(head, entries)
            # The message's limits, over its frames so far.
            count, size = len(entries), length
            if split is not None:
                count += self._split_entries
                size += self._split_bytes
            problem = None
            if size > self.max_message:
                problem = f"{name} message is over the limit of {self.max_message} bytes"
            elif count > self.max_entries:
                problem = f"{name} message has over {self.max_entries} entries"
            elif split is not None and head != split.head:
                problem = f"split {name} changed its request id"
            if problem is not None:
                close_fds(message_fds(build(head, entries)))
                raise RemoteProtocolError(problem)
            if flags:  # FLAG_MORE (the only one left): more frames of this message follow
                if split is None:
                    split = self._split = _Split(kind, build, head, [])
                self._split_entries, self._split_bytes = count, size
                if not self.join_split:
                    return build(head, entries)
                split.entries.extend(entries)  # from here close() sees their fds
                continue
            if split is not None:  # the last frame of a split message
                self._split = None
                if self.join_split:
                    split.entries.extend(entries)
                    entries = split.entries
            return build(head, entries)

    def eof(self) -> None:
        """The peer closed: raise if it stopped mid-frame or left fds behind."""
        if self._broken is not None:
            raise self._broken
        if self._buf or self._fds or self._split is not None:
            if self._buf:
                what = "mid-frame"
            elif self._split is not None:
                what = "mid-message"
            else:
                what = f"with {len(self._fds)} fds that belong to no frame"
            self._broken = RemoteProtocolError(f"connection closed {what}")
            self.close()
            raise self._broken

    def close(self) -> None:
        """Close every fd the decoder still owns; drop buffered data."""
        fds = list(self._fds)
        self._fds.clear()
        split = self._split
        if split is not None:
            fds.extend(message_fds(split.build(split.head, split.entries)))
            self._split = None
        self._buf.clear()
        close_fds(fds)
