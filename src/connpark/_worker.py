"""The worker engine: the whole worker side of the protocol, sans-IO.

Theory of operation
-------------------
An ``Engine`` is one worker's relationship with a container, across as many
sessions (connections of the control socket) as reconnects need. It never
does I/O. A hook (trio, threads, asyncio) connects, feeds what it reads to
``receive_data(bytes, fds)`` / ``receive_eof()``, pulls ``next_event()``
until it returns None, and writes ``data_to_send()``; that is all a hook
does, in the manner of h11.

Phases::

    IDLE --start_session--> HANDSHAKE --WELCOME--> READY --EOF/ERROR--> LOST
      ^                                                                  |
      +-------------------- (the hook reconnects) -----------------------+
    any --begin_close--> CLOSING --finish_close--> CLOSED   (also: give_up)

Ownership rules, kept here once for every hook:

- **Park is two-phase.** A park request is QUEUED until ``data_to_send``
  encodes it (concurrent parks are batched into one PARK request, split at
  253 fds by the codec), then SENT. On PARKED "ok" the engine closes the
  caller's copy; on a refusal the socket stays the caller's. A cancelled
  caller ``withdraw``s: a QUEUED park is dropped (the socket is the caller's),
  a SENT one (or one sent in a lost session) is *abandoned*: its answer still
  closes the socket if it was parked. So the socket is always exactly the
  caller's or closed, never both. Until that answer, a new park of the socket
  is held (``_limbo``, ``_release``): it gets the ticket, or goes out after a
  refusal; one connection is never parked twice.
- **Held.** Likewise a park of a socket that a park not yet answered (queued
  or sent, not withdrawn, or held itself) carries: the container's duplicate
  check covers one PARK frame, so sent twice it would be parked twice (two
  tickets, two WAKEs). ``_parking`` holds each such fd for one park (by
  number, no syscall: such a socket is open, so its number names it alone):
  a park queued or sent, for its unanswered entries; a held one, for those of
  its sockets nobody else held (``own``), until it goes out. A park of a
  socket in there waits for that park's answer (``after``), in line; its
  sockets are held all the while: one refused ahead of it joins ``own``, one
  parked ahead leaves (closed: its number may name a new socket). An fd leaves
  ``_parking`` when its park is answered, fails or is withdrawn (then
  ``_limbo`` holds it). A held park waits whole, then gets the tickets of
  the sockets parked ahead of it (the caller's copy closed once) and sends
  the rest. The same socket twice in one park goes out once: the others are
  refused here (``duplicate``), as the container does within one frame (a
  request over 253 fds is split, and then it parked the socket twice).
- **A ticket is not lost.** A park that has one (answered in part, or held
  behind a park that parked one of its sockets) and then fails at close or
  when the engine gives up is answered, the rest refused (``shutting-down``):
  the error would say every socket is still the caller's.
- Until an fd has gone out, its socket stays open (PARKED cannot come
  earlier), so no fd number can be reused under a queued frame.
- **ACK rule.** A WAKE's tickets are ACKed as soon as the message is decoded:
  from then its fds are in this process and the hook owns them (the hook's
  wake queue outlives sessions; ``begin_close`` re-parks what nobody took).
  After ``begin_close``, wakes are no longer ACKed and their fds are closed:
  the container re-routes them once this session's socket is gone.
- **A lost session** (EOF, reset, ERROR): parks not yet answered, abandoned
  ones included, go back to QUEUED and are re-sent on the next session marked
  ``resent`` (the worker still holds those sockets; a container that took one
  anyway, then died or answered too late, matches it to the ticket it gave
  and answers OK, so the copy here is closed); UNPARK, CLOSE and stats
  requests are re-sent too. The next HELLO (v2) reports the previous session
  and the tickets received in it, which may be un-ACKed.
- **A failed send** (``send_failed``: EPIPE, reset) does not end the session
  at once: what the container wrote before it went is still to be read (a
  PARKED saying it took a socket, WAKEs), and dropping it would re-send a park
  the container answered OK: two owners. The engine sends nothing more; the
  hook reads on until EOF or a read error (bounded in time), and that ends
  the session with the send's error.
- **Failure.** ``give_up`` fails every waiter with one error.

On the hot path (a batch of 253 parks and wakes) the only attrs object made
per connection is the user's ``Woken``: the decoder hands out PARKED and WAKE as rows
(plain tuples, ``Decoder(rows=True)``), a run of answers that parked
everything is settled in one step, ``Woke.woken`` makes each ``Woken``
straight from its row, ``park_many_entries`` checks and encodes a shared
policy once (``SharedEntries``), and the hook's ``closer`` closes parked
sockets (the trio hook's skips trio's ``notify_closing`` when no task waits:
``_trio_close``).

Waiters are the hook's objects (an Event, a Future); the engine only reports,
as ``Settled`` events, which requests are done.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, Literal, Protocol, TypeVar, overload

import attrs

from ._errors import (
    ConnparkError,
    ContainerError,
    ContainerLost,
    ContainerTimeout,
    InternalError,
    ParkingClosed,
    ParkRefused,
    ProtocolError,
    Refused,
    RemoteProtocolError,
)
from ._stats import ContainerStats
from ._wire import (
    DEFAULT_MAX_BODY,
    MAX_RESUME_TICKETS,
    MAX_TOKEN,
    PROTOCOL_VERSION,
    Ack,
    Close,
    CloseEntry,
    Decoder,
    Error,
    ErrorCode,
    Frame,
    Hello,
    Message,
    ParkedRows,
    ParkEntry,
    Reason,
    Refusal,
    Result,
    Rule,
    Rules,
    Send,
    Stats,
    StatsReply,
    Tagged,
    TagOp,
    Unpark,
    WakeEntry,
    WakeRow,
    WakeRows,
    Welcome,
    close_fds,
    encode,
    encode_park,
    encode_park_entry,
    mark_resent,
    message_fds,
)

LOGGER = logging.getLogger(__name__)
S = TypeVar("S")
Policy = Literal["close", "return"]
_POLICIES = ("close", "return")
_MAX_MS = 0xFFFFFFFF
#: ERROR codes after which reconnecting cannot help.
_FATAL = frozenset({ErrorCode.VERSION, ErrorCode.NOT_ALLOWED})


@attrs.frozen
class Woken(Generic[S]):
    """A connection handed back by the container, with what you attached at park."""

    ticket: int
    reason: Reason
    token: bytes
    #: Bytes you had read but not consumed when you parked it.
    pending: bytes
    #: The connection (in your world's socket type), or None for a notice: the
    #: container closed it (hang-up or timeout with policy "close").
    socket: S | None
    #: Pings the container answered for you while it was parked (the client was alive).
    autoresponses: int = 0
    #: When the last of them was answered (Unix time, s), or None.
    last_autoresponse: float | None = None
    #: Bytes you asked the container to send (``send``) that the socket did not
    #: take (reason UNSENT): write them first, then carry on.
    unsent: bytes = b""

    @classmethod
    def of(cls, entry: WakeEntry, sock: S | None) -> Woken[S]:
        """From a decoded WAKE entry and the hook's socket for its fd."""
        last = entry.last_autoresponse_ms / 1000 if entry.last_autoresponse_ms else None
        return cls(
            entry.ticket,
            entry.reason,
            entry.token,
            entry.pending,
            sock,
            entry.autoresponses,
            last,
            entry.unsent,
        )


@attrs.frozen
class SendResult:
    """What ``send`` did: connections that took the whole message, woken ones, misses."""

    #: Parked connections whose socket took every byte (they stay parked).
    written: int
    #: Connections woken instead: reason UNSENT (the rest in ``Woken.unsent``),
    #: or HANGUP when the socket was dead.
    woken: int
    #: Tickets that were not parked (already woken, gone, another pool's).
    missed: int


# ------------------------------------------------------------- arguments


def tag_bytes(tag: str | bytes) -> bytes:
    """A tag as the wire carries it (UTF-8, 1..255 bytes; the container may allow fewer)."""
    raw = tag.encode() if isinstance(tag, str) else bytes(tag)
    if not 0 < len(raw) <= 255:
        raise ValueError(f"a tag is 1 to 255 bytes, not {len(raw)}")
    return raw


def make_park_entry(
    fd: int,
    *,
    token: bytes = b"",
    pending: bytes = b"",
    idle_timeout: float | None = None,
    on_hangup: Policy = "close",
    on_timeout: Policy = "close",
    rules: int = 0,
    tags: Sequence[str | bytes] = (),
) -> ParkEntry:
    """Validate ``park()``'s arguments (ValueError/TypeError, before anything is sent)."""
    if fd < 0:
        raise ValueError("cannot park a closed socket")
    if not isinstance(token, (bytes, bytearray, memoryview)):
        raise TypeError(f"token must be bytes, not {type(token).__name__}")
    if not isinstance(pending, (bytes, bytearray, memoryview)):
        raise TypeError(f"pending must be bytes, not {type(pending).__name__}")
    for name, policy in (("on_hangup", on_hangup), ("on_timeout", on_timeout)):
        if policy not in _POLICIES:
            raise ValueError(f"{name} must be 'close' or 'return', not {policy!r}")
    if len(token) > MAX_TOKEN:
        raise ValueError(f"token of {len(token)} bytes: the protocol carries at most {MAX_TOKEN}")
    if len(token) + len(pending) > DEFAULT_MAX_BODY - 64:
        raise ValueError(
            f"token + pending of {len(token) + len(pending)} bytes do not fit one frame"
            f" ({DEFAULT_MAX_BODY - 64})"
        )
    ms = 0
    if idle_timeout is not None:
        if not idle_timeout > 0 or math.isinf(idle_timeout):
            raise ValueError(
                f"idle_timeout must be a positive number of seconds, not {idle_timeout!r}"
            )
        ms = min(_MAX_MS, max(1, math.ceil(idle_timeout * 1000)))
    if isinstance(tags, (str, bytes)):
        raise TypeError("tags must be a sequence of tags, not one tag")
    if not 0 <= rules <= 0xFFFF:
        raise ValueError(f"rules must be a rule set id (0 for none, up to 65535), not {rules}")
    return ParkEntry(
        fd,
        bytes(token),
        bytes(pending),
        ms,
        hangup_returns=on_hangup == "return",
        timeout_returns=on_timeout == "return",
        rules=rules,
        tags=tuple(tag_bytes(t) for t in tags),
    )


def park_entries(
    fds: Sequence[int],
    tokens: Sequence[bytes] | None,
    pendings: Sequence[bytes] | None,
    **policy: Any,
) -> list[ParkEntry]:
    """``park_many``'s arguments, checked as a whole before anything is queued."""
    if tokens is not None and len(tokens) != len(fds):
        raise ValueError("tokens must pair up with socks")
    if pendings is not None and len(pendings) != len(fds):
        raise ValueError("pendings must pair up with socks")
    if tokens is None and pendings is None and fds:
        # One policy for all: checked once, then one cheap entry per socket.
        first = make_park_entry(fds[0], **policy)
        if min(fds) < 0:
            raise ValueError("cannot park a closed socket")
        ms, hup, tmo = first.idle_timeout_ms, first.hangup_returns, first.timeout_returns
        rules, tags = first.rules, first.tags
        return [ParkEntry(fd, b"", b"", ms, hup, tmo, rules, tags) for fd in fds]
    return [
        make_park_entry(
            fd,
            token=tokens[i] if tokens is not None else b"",
            pending=pendings[i] if pendings is not None else b"",
            **policy,
        )
        for i, fd in enumerate(fds)
    ]


def park_many_entries(
    fds: Sequence[int],
    tokens: Sequence[bytes] | None,
    pendings: Sequence[bytes] | None,
    **policy: Any,
) -> Sequence[ParkEntry]:
    """``park_entries``, and with one policy and no tokens or pendings, ``SharedEntries``:
    checked and encoded once, no object made per socket (the hot path)."""
    if tokens is not None or pendings is not None or not fds:
        return park_entries(fds, tokens, pendings, **policy)
    first = make_park_entry(fds[0], **policy)
    if min(fds) < 0:
        raise ValueError("cannot park a closed socket")
    return SharedEntries(list(fds), first)


class SharedEntries(Sequence[ParkEntry]):
    """``park_many``'s entries when they differ only by fd: made only if looked at."""

    __slots__ = ("fds", "item", "template")

    def __init__(self, fds: list[int], template: ParkEntry) -> None:
        self.fds = fds
        self.template = template
        #: Every entry's bytes on the wire (``encode_park_entry``).
        self.item = encode_park_entry(template)

    def __len__(self) -> int:
        return len(self.fds)

    @overload
    def __getitem__(self, index: int) -> ParkEntry: ...

    @overload
    def __getitem__(self, index: slice) -> list[ParkEntry]: ...

    def __getitem__(self, index: int | slice) -> ParkEntry | list[ParkEntry]:
        if isinstance(index, slice):
            return [attrs.evolve(self.template, fd=fd) for fd in self.fds[index]]
        return attrs.evolve(self.template, fd=self.fds[index])


def _file_key(fd: int) -> tuple[int, int]:
    """Which socket ``fd`` names now: (device, inode) where sockets have inodes
    (Linux), which also knows a ``dup`` of it; else (-1, fd): macOS and the BSDs
    give every TCP socket inode 0, and a number that names nothing has none
    (``Engine._in_limbo`` then asks the old socket object too)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return -1, fd
    return (st.st_dev, st.st_ino) if st.st_ino else (-1, fd)


def wrap_woken_fd(entry: WakeEntry) -> socket.socket | None:
    """A stdlib socket for a woken fd, family from the WAKE flags: no syscall spent."""
    if entry.fd is None:
        return None
    family = socket.AF_INET6 if entry.inet6 else socket.AF_INET
    return socket.socket(family, socket.SOCK_STREAM, 0, fileno=entry.fd)


def check_container_uid(peer: int | None, expected: int | None) -> None:
    """Trust the container before sending it a single fd.

    By default it must run as our own uid or as root; ``expected`` names
    another. Where the OS cannot tell (``peer`` None) there is nothing to check.
    """
    if peer is None:
        return
    mine = os.geteuid()
    allowed = {expected} if expected is not None else {mine, 0}
    if peer not in allowed:
        want = expected if expected is not None else f"{mine} (ours) or 0"
        raise ContainerError(
            f"the container runs as uid {peer}, expected uid {want}: not sending it connections"
            " (pass container_uid= to trust it)"
        )


# ------------------------------------------------------------- requests


class ReqState(enum.Enum):
    QUEUED = "queued"  #: not encoded yet: may be withdrawn
    SENT = "sent"  #: on the wire: only the answer settles it
    DONE = "done"


@attrs.define(eq=False)
class ParkRequest:
    """One ``park()`` / ``park_many()`` call: its sockets and, once settled, results."""

    socks: list[Any]
    entries: Sequence[ParkEntry]
    waiter: Any
    #: Per socket: a ticket or the ``ParkRefused`` (index-aligned with ``socks``).
    results: list[int | ParkRefused | None] = attrs.field(factory=list)
    #: What goes on the wire per entry (``encode_park_entry``; marked RESENT
    #: when sent again), and its fd.
    items: list[bytes] = attrs.field(factory=list)
    fds: list[int] = attrs.field(factory=list)
    state: ReqState = ReqState.QUEUED
    #: The caller stopped waiting (cancelled) after it was sent.
    abandoned: bool = False
    error: ConnparkError | None = None
    #: How many leading entries are answered (PARKED may come in pieces).
    answered: int = 0
    #: Wakes nobody took, parked again at close: the engine's own sockets.
    handback: bool = False
    #: Sent in a session that ended unanswered: queued again, but the container
    #: may hold some of its sockets already (withdrawn, it is abandoned, not dropped).
    resent: bool = False
    #: Held: index -> (the park that holds the same socket, its index): this one
    #: waits for that answer (``Engine._release``) instead of parking the socket
    #: twice. A ticket there is this park's result at once (``Engine._take``).
    after: dict[int, tuple[ParkRequest, int]] = attrs.field(factory=dict)
    #: Abandoned: index -> its key in the engine's ``_limbo``, and our own copy of
    #: its fd (``Engine._hold_copies``), until it is answered.
    keys: dict[int, tuple[int, int]] = attrs.field(factory=dict)
    dups: dict[int, int] = attrs.field(factory=dict)
    #: The part of a held park sent once the earlier answers came: its results go
    #: to ``parent`` at ``slots``.
    child: ParkRequest | None = None
    parent: ParkRequest | None = None
    slots: list[int] = attrs.field(factory=list)
    #: Its unanswered fds are in the engine's ``_parking`` (queued or sent, not
    #: withdrawn, not held): a second park of one of them is held behind it.
    indexed: bool = False
    #: Held: the fds of its sockets that no other park holds in ``_parking``, there
    #: while it waits (a park of one of those waits for this one). A socket whose
    #: park ahead refused it joins them; one parked by it leaves (it is closed: its
    #: number may name a new socket).
    own: set[int] = attrs.field(factory=set)

    def __attrs_post_init__(self) -> None:
        self.results = [None] * len(self.entries)
        if self.items:
            return
        if isinstance(self.entries, SharedEntries):
            self.fds = self.entries.fds
            self.items = [self.entries.item] * len(self.fds)
        else:
            self.items = [encode_park_entry(e) for e in self.entries]
            self.fds = [e.fd for e in self.entries]

    def outcome(self) -> list[int | ParkRefused]:
        """The results, or the error that ended the request."""
        if self.error is not None:
            raise self.error
        if self.answered == len(self.results):
            return list(self.results)  # type: ignore[arg-type]  # all answered
        return [r for r in self.results if r is not None]


@attrs.define(eq=False)
class StatsRequest:
    waiter: Any
    state: ReqState = ReqState.QUEUED
    abandoned: bool = False
    result: ContainerStats | None = None
    error: ConnparkError | None = None

    def outcome(self) -> ContainerStats:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@attrs.define(eq=False)
class ControlRequest:
    """A RULES or SEND request, answered by RESULT."""

    waiter: Any
    msg: Rules | Send
    state: ReqState = ReqState.QUEUED
    abandoned: bool = False
    result: Result | None = None
    error: ConnparkError | None = None

    def outcome(self) -> Result:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        if self.result.refusal is not Refusal.OK:
            what = "rules" if isinstance(self.msg, Rules) else "send"
            raise Refused(self.result.refusal, what)
        return self.result


Request = ParkRequest | StatsRequest | ControlRequest


# ------------------------------------------------------------- events


@attrs.frozen
class Ready:
    """The handshake is done: the session is up (also after a reconnect)."""

    welcome: Welcome


@attrs.frozen
class Woke:
    """Connections handed back (already ACKed): wrap each fd and queue it for the user."""

    #: One tuple per connection: ``WakeEntry``'s fields, in order.
    rows: tuple[WakeRow, ...]

    @property
    def entries(self) -> tuple[WakeEntry, ...]:
        return tuple(WakeEntry(*row) for row in self.rows)

    def woken(self, wrap: Callable[[socket.socket], S]) -> list[Woken[S]]:
        """A ``Woken`` per connection, its fd a stdlib socket (the family from the
        WAKE flags: no getsockopt, only CPython's getsockname check) made the
        hook's own by ``wrap``."""
        out: list[Woken[S]] = []
        new, stream = socket.socket, socket.SOCK_STREAM
        inet, inet6 = socket.AF_INET, socket.AF_INET6
        rows = self.rows
        try:
            for ticket, reason, token, pending, fd, v6, count, last_ms, unsent in rows:
                sock = None if fd is None else wrap(new(inet6 if v6 else inet, stream, 0, fd))
                last = last_ms / 1000 if last_ms else None
                out.append(Woken(ticket, reason, token, pending, sock, count, last, unsent))
        except BaseException:
            # Nobody will get these: close them (the failed one's fd went with its socket).
            for w in out:
                if w.socket is not None:
                    w.socket.close()  # type: ignore[attr-defined]
            close_fds(row[4] for row in rows[len(out) + 1 :] if row[4] is not None)
            raise
        return out


@attrs.frozen
class Settled:
    """A request is done (answered, refused or failed): wake its waiter."""

    request: Request


@attrs.frozen
class SessionLost:
    """The session ended. Reconnect after ``Engine.retry_delay()``, or give up."""

    error: ConnparkError


Event = Ready | Woke | Settled | SessionLost


class Phase(enum.Enum):
    IDLE = "idle"
    HANDSHAKE = "handshake"
    READY = "ready"
    LOST = "lost"
    CLOSING = "closing"
    CLOSED = "closed"


class Queue(Protocol):
    """A hook's channel, as ``finish_close`` asks it about its send queue."""

    def stop_sending(self) -> list[int]:
        """Drop the frames not begun (none of them goes out from now: a writer
        thread or task included) and cut a frame with fds half sent short (then
        nothing goes out any more), returning their fds: the container never
        admits them."""
        ...


@attrs.frozen
class Backoff:
    """Reconnect schedule: exponential from ``first`` to ``most``, for ``give_up_after`` s."""

    first: float = 0.05
    most: float = 2.0
    give_up_after: float = 60.0


DEFAULT_BACKOFF = Backoff()
#: How long a hook reads on after a failed send (``Engine.send_failed``) for what
#: the container wrote before it went, if no EOF ends the session first (s).
DRAIN_TIMEOUT = 1.0


# ------------------------------------------------------------- the engine


class HandleInfo:
    """What every hook's handle tells about its current session."""

    _engine: Engine

    @property
    def session_id(self) -> int:
        """The current session's id (it changes when the hook reconnects)."""
        return self._engine.welcome.session_id if self._engine.welcome else 0

    @property
    def max_token(self) -> int:
        return self._engine.welcome.max_token if self._engine.welcome else 0

    @property
    def max_pending(self) -> int:
        return self._engine.welcome.max_pending if self._engine.welcome else 0

    @property
    def sessions(self) -> int:
        """Sessions established so far: more than 1 after a reconnect."""
        return self._engine.sessions


def close_plain(socks: Iterable[Any]) -> None:
    """Close sockets the engine closes for their owner (parked ones: the container
    has them; wakes it could not hand back). The trio hook passes a faster one."""
    for sock in socks:
        sock.close()


class Engine:
    """The worker side of the protocol for one parking handle (see the module docstring)."""

    def __init__(
        self,
        pool: str = "default",
        name: str = "",
        *,
        reconnect: bool = True,
        backoff: Backoff = DEFAULT_BACKOFF,
        container_uid: int | None = None,
        path: str = "",
        closer: Callable[[Iterable[Any]], None] = close_plain,
    ) -> None:
        #: The control socket's path, for messages.
        self.path = path
        #: Closes sockets the engine closes for their owner (the world's fastest way).
        self.closer = closer
        self.pool = pool
        self.name = name
        self.reconnect = reconnect
        self.backoff = backoff
        self.container_uid = container_uid
        self.phase = Phase.IDLE
        self.welcome: Welcome | None = None
        self.decoder = Decoder(rows=True)
        self._ids = itertools.count(1)
        self._events: deque[Event] = deque()
        # Outgoing, in order: control frames; parks are encoded at send time.
        self._out: list[Frame] = []
        self._acks: list[int] = []
        self._batch: list[ParkRequest] = []
        #: (fd, inode) -> (request, index) of the unanswered entries of abandoned
        #: parks: their sockets are the caller's or the container's only once the
        #: answer comes. (The inode: a number the caller closed may name another socket.)
        self._limbo: dict[tuple[int, int], tuple[ParkRequest, int]] = {}
        #: Parks of sockets in ``_limbo`` or ``_parking``: they wait for those
        #: answers (``_release``).
        self._held: list[ParkRequest] = []
        #: The fds of parks queued or sent and not answered yet, withdrawn ones
        #: aside (``ParkRequest.indexed``), and of held parks' sockets nobody else
        #: holds (``ParkRequest.own``), each for one park: a park of one of them is
        #: held behind that park, not sent twice. By number, no syscall: while a
        #: park is unanswered its socket is open, so its number names that socket only.
        self._parking: set[int] = set()
        #: request id -> the park requests it carries, answered in order.
        self._sent: dict[int, _Batch] = {}
        self._stats: deque[StatsRequest] = deque()
        #: UNPARKed tickets whose WAKE has not come (bounded): re-sent on reconnect.
        self._unparks: dict[int, None] = {}
        #: CLOSEs of this session: re-sent on reconnect (the container may not have read them).
        self._closes: deque[CloseEntry] = deque(maxlen=1024)
        #: RULES and SEND requests by request id, until RESULT answers them.
        self._control_reqs: dict[int, ControlRequest] = {}
        #: Rule sets the container accepted: registered again in every new session.
        self._rule_sets: dict[int, Rules] = {}
        #: Tickets woken in this session (bounded): reported by the next HELLO.
        self._received: deque[int] = deque(maxlen=MAX_RESUME_TICKETS)
        self._resume: tuple[int, tuple[int, ...]] = (0, ())
        self._lost_since: float | None = None
        self._delay = 0.0
        #: Set once the engine is closed for good (given up, refused, closed).
        self.error: ConnparkError | None = None
        #: Why the last session ended.
        self.last_error: ConnparkError | None = None
        #: Sessions established so far (1 after the first WELCOME).
        self.sessions = 0
        self._sessions_before = 0
        #: This session's write side broke (``send_failed``): nothing more is sent.
        self._send_error: ConnparkError | None = None

    # -- session lifecycle ---------------------------------------------------------

    def start_session(self, peer_uid: int | None) -> None:
        """A new control connection is up: check who is there, queue HELLO."""
        if self.phase not in (Phase.IDLE, Phase.LOST):
            raise ConnparkError(f"cannot start a session while {self.phase.value}")
        check_container_uid(peer_uid, self.container_uid)
        self._sessions_before = self.sessions
        self.decoder.close()
        self.decoder = Decoder(rows=True)
        self._acks = []
        self._send_error = None
        self._out = [
            *encode(Hello(PROTOCOL_VERSION, self.pool, self.name, *self._resume)),
        ]
        self.phase = Phase.HANDSHAKE

    @property
    def ready(self) -> bool:
        """The session is up and the handle open: parks are taken (and can be sent)."""
        return self.phase is Phase.READY and self._send_error is None

    @property
    def send_broken(self) -> bool:
        """``send_failed`` was called for this session: do not write; read until it ends."""
        return self._send_error is not None

    @property
    def welcomed(self) -> bool:
        """The session started last got its WELCOME (even if it has ended since)."""
        return self.sessions > self._sessions_before

    @property
    def connected(self) -> bool:
        """A session is up (maybe closing): keep reading it."""
        return self.phase in (Phase.READY, Phase.CLOSING)

    @property
    def busy(self) -> bool:
        """Parks or stats requests are waiting for an answer (``begin_close`` waits for them)."""
        return (
            bool(self._sent)
            or any(not s.abandoned for s in self._stats)
            or any(not c.abandoned for c in self._control_reqs.values())
        )

    def receive_data(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Feed what the control socket gave; b"" means EOF."""
        if not data:
            close_fds(fds)
            self.receive_eof()
            return
        if self.phase in (Phase.LOST, Phase.CLOSED, Phase.IDLE):
            close_fds(fds)  # from a session that is already over
            return
        self.decoder.receive_data(data, fds)

    def receive_eof(self) -> None:
        if self.phase in (Phase.HANDSHAKE, Phase.READY, Phase.CLOSING):
            try:
                self.decoder.eof()
                error: ConnparkError = ContainerLost("the container closed the session")
            except RemoteProtocolError as exc:
                error = ContainerLost(f"the container closed the session: {exc}")
            self._lose(self._send_error or error)

    def connection_failed(self, error: ConnparkError) -> None:
        """The session's socket broke (an OSError, translated by the hook), or the
        drain after a failed send ran out of time: after ``send_failed`` the
        send's error is the one reported (it came first, and says why)."""
        if self.phase in (Phase.HANDSHAKE, Phase.READY, Phase.CLOSING):
            self._lose(self._send_error or error)

    def send_failed(self, error: ConnparkError) -> None:
        """Writing to the session failed (EPIPE, ECONNRESET: the container died or
        closed it). Not the end yet: what it wrote before is still readable, and a
        PARKED in there means it took sockets, which a re-sent park would give it
        twice. So nothing more is sent (``data_to_send`` is empty), and the hook
        reads on, bounded in time, until EOF or a read error ends the session
        (``receive_eof``, ``connection_failed``) with ``error``."""
        if self.phase in (Phase.HANDSHAKE, Phase.READY, Phase.CLOSING):
            if self._send_error is None:
                self._send_error = error

    def next_event(self) -> Event | None:
        """The next event, or None when more data is needed."""
        while not self._events:
            if self.phase not in (Phase.HANDSHAKE, Phase.READY, Phase.CLOSING):
                return None
            try:
                msg = self.decoder.next_message()
            except RemoteProtocolError as exc:
                self._lose(ContainerLost(f"the container broke the protocol: {exc}"))
                continue
            if msg is None:
                return None
            self._dispatch(msg)
        return self._events.popleft()

    def data_to_send(self) -> list[Frame]:
        """Frames to write now, in order (the caller's fds are borrowed, not owned)."""
        if self._send_error is not None:
            # The socket takes no more: parks stay queued for the next session,
            # ACKs are dropped (the container's side handles un-ACKed wakes).
            return []
        if self.phase is Phase.HANDSHAKE:
            out, self._out = self._out, []
            return out
        if self.phase not in (Phase.READY, Phase.CLOSING):
            # The session just ended: its last words are the ACKs of what we
            # read. A container that ended it still reads them, and must not
            # give those connections to another worker.
            out = encode(Ack(tuple(self._acks))) if self._acks else []
            self._acks = []
            return out
        out, self._out = self._out, []
        if self._acks:
            out[:0] = encode(Ack(tuple(self._acks)))
            self._acks = []
        if self._batch:
            out.extend(self._encode_batch())
        return out

    # -- reconnect -------------------------------------------------------------------

    def retry_delay(self, now: float) -> float | None:
        """Seconds to wait before the next connect attempt, or None: given up."""
        if self.phase is not Phase.LOST or not self.reconnect:
            return None
        if self._lost_since is None:
            self._lost_since = now
        if now - self._lost_since >= self.backoff.give_up_after:
            self.give_up(
                ContainerLost(
                    f"lost the container at {self.path} and could not reconnect"
                    f" within {self.backoff.give_up_after:g} s"
                )
            )
            return None
        self._delay = min(self.backoff.most, max(self.backoff.first, self._delay * 2))
        return self._delay

    def handshake_timed_out(self, seconds: float) -> ContainerTimeout:
        """The hook's handshake deadline passed: end the session, return the error to raise."""
        error = ContainerTimeout(
            f"the container at {self.path} did not answer HELLO within {seconds:g} s"
        )
        self.connection_failed(error)
        return error

    def session_error(self) -> ConnparkError:
        """Why the handshake did not bring a session up."""
        return self.error or self.last_error or ContainerLost("no session")

    def never_connected(self, error: ConnparkError) -> None:
        """The first connect to another shard failed (it restarts, or hangs): try
        again as after a lost session. (The first shard's failure is the caller's.)"""
        if self.phase is Phase.IDLE:
            self.last_error = error
            if self.reconnect:
                self.phase = Phase.LOST
            else:
                self.give_up(error)

    def reconnect_failed(self, error: ConnparkError) -> None:
        """A reconnect attempt failed: keep trying unless the container refused us for good."""
        if self.phase is not Phase.LOST or isinstance(error, ContainerError):
            self.give_up(error)

    def give_up(self, error: ConnparkError) -> None:
        """No more sessions: fail every waiter with ``error``."""
        if self.phase is Phase.CLOSED:
            return
        self.error = error
        self.phase = Phase.CLOSED
        self.decoder.close()
        self._fail_all(error)

    # -- requests ----------------------------------------------------------------------

    def park(self, socks: list[Any], entries: Sequence[ParkEntry], waiter: Any) -> ParkRequest:
        """Queue a park of ``socks`` (entries built by ``make_park_entry``,
        ``park_entries`` or ``park_many_entries``)."""
        self._check_open()
        req = ParkRequest(socks, entries, waiter)
        if not entries:
            req.state = ReqState.DONE
            self._events.append(Settled(req))
            return req
        self._queue(req)
        return req

    def _queue(self, req: ParkRequest) -> None:
        """Queue ``req`` to go out, unless one of its sockets is in line already: a
        park of this engine not answered yet holds it (``_parking``; sent twice,
        the container would park it twice: its duplicate check covers one PARK
        frame), or an abandoned park's answer for it is due (``_limbo``), or it
        is in ``req`` twice. Then ``_hold``. Set operations over the whole
        request: the hot path."""
        fds, parking = req.fds, self._parking
        clear = not parking or parking.isdisjoint(fds)
        if clear and not (self._limbo and any(map(self._in_limbo, fds))):
            size = len(parking)
            parking.update(fds)
            if len(parking) - size == len(fds):
                req.indexed = True
                self._batch.append(req)
                return
            parking.difference_update(fds)  # (a socket twice in it)
        self._hold(req)

    def _hold(self, req: ParkRequest) -> None:
        """``_queue``'s slow path (two parks of a socket at once: caller misuse).

        A socket twice in ``req``: its first entry is its park, the others are
        refused here (DUPLICATE). The container's check covers one frame, and a
        request over 253 fds is split: sent twice, it parked the socket twice.

        Held: ``req`` waits for the park that holds each socket in line
        (``after``), and holds in ``_parking`` those nobody else holds (``own``),
        all of them until it goes out: a later park of any of them waits for
        this one, whatever the answers it waits for say meanwhile.
        """
        fds = req.fds
        first: dict[int, int] = {}
        for i, fd in enumerate(fds):
            first.setdefault(fd, i)
        if len(first) < len(fds):
            for i, fd in enumerate(fds):
                if first[fd] != i:
                    req.results[i] = ParkRefused(Refusal.DUPLICATE)
            self._queue(_part(req, list(first.values())))
            return
        parking = self._parking
        owners = self._owners(parking.intersection(fds))
        for i, fd in enumerate(fds):
            if (found := owners.get(fd) or self._limbo_of(fd)) is not None:
                req.after[i] = found
        if not req.after:
            raise InternalError("a socket in _parking that no park holds")
        req.own = set(fds).difference(parking)
        parking.update(req.own)
        self._held.append(req)

    def _owners(self, fds: set[int]) -> dict[int, tuple[ParkRequest, int]]:
        """The park (request, index) that holds each of ``fds`` in ``_parking``: an
        unanswered entry of a park queued or sent, or a held park's own socket."""
        found: dict[int, tuple[ParkRequest, int]] = {}
        if not fds:
            return found
        reqs = [*self._batch, *(r for b in self._sent.values() for r in b.unanswered())]
        for req in [*reqs, *self._held]:
            if req.indexed or req.own:
                for i in range(req.answered, len(req.fds)):
                    fd = req.fds[i]
                    if fd in fds and (req.indexed or fd in req.own):
                        found[fd] = (req, i)
        return found

    def _unindex(self, req: ParkRequest) -> None:
        """``req``'s fds leave ``_parking`` (answered, withdrawn, held no more)."""
        if req.indexed:
            req.indexed = False
            self._parking.difference_update(req.fds[req.answered :] if req.answered else req.fds)
        if req.own:
            self._parking.difference_update(req.own)
            req.own = set()

    def withdraw(self, req: Request) -> None:
        """The caller stopped waiting (cancelled, timed out): keep one owner all the same."""
        if req.state is ReqState.DONE:
            return
        if isinstance(req, (StatsRequest, ControlRequest)):
            req.abandoned = True  # its reply, when it comes, is dropped
            if req.state is ReqState.QUEUED:
                req.state = ReqState.DONE
                if isinstance(req, ControlRequest):
                    self._control_reqs.pop(req.msg.request_id, None)
            return
        if req.child is not None:
            req.abandoned = True
            self.withdraw(req.child)
        elif req.state is ReqState.QUEUED and not req.resent:
            (self._held if req.after else self._batch).remove(req)
            self._unindex(req)
            req.state = ReqState.DONE
            req.error = ParkingClosed("park withdrawn")
            if req.parent is not None:
                self._finished(req)  # the part of a held park: that park is done too
            if self._held:
                self._release()  # parks held behind it go out
        else:
            # Sent (or sent in a lost session, and queued again): the container
            # may have taken a socket already, so the answer decides its owner.
            # The limbo holds its sockets from here.
            req.abandoned = True
            self._unindex(req)
            self._hold_copies(req)
            if self._held:
                self._release()  # parks held behind it hold its numbers now

    def _limbo_of(self, fd: int) -> tuple[ParkRequest, int] | None:
        """``_in_limbo``, without a syscall while the limbo is empty."""
        return self._in_limbo(fd) if self._limbo else None

    def _in_limbo(self, fd: int) -> tuple[ParkRequest, int] | None:
        """The abandoned park (and index) of the socket ``fd`` names, if any. Known by
        number only (no inode), it must still be the old socket object's number: a
        caller that closed that object and got the number back for a new socket
        parks the new one at once."""
        key = _file_key(fd)
        found = self._limbo.get(key)
        if found is None or key[0] != -1:
            return found
        old, i = found
        return found if old.socks[i].fileno() == fd else None

    def _hold_copies(self, req: ParkRequest) -> None:
        """An abandoned park's unanswered sockets: until the answer, the caller may
        close one as its own, and its number go to another socket. So the limbo
        knows each by fd and inode, and a re-send (a lost session) carries our own
        copy (``dup``) of the connection it was for, whatever the number names."""
        fds = req.fds = list(req.fds)  # (a park_many's may be its entries')
        for i in range(req.answered, len(fds)):
            key = _file_key(fds[i])
            try:
                fds[i] = req.dups[i] = os.dup(fds[i])
            except OSError:
                pass  # (EMFILE) the number then, as before
            req.keys[i] = key
            self._limbo[key] = (req, i)

    def _let_go(self, req: ParkRequest, start: int, end: int) -> None:
        """An abandoned park's entries ``start:end`` are answered (or failed): out of
        the limbo, our copies closed."""
        for i in range(start, end):
            key = req.keys.pop(i, None)
            if key is not None and self._limbo.get(key, (None, 0))[0] is req:
                del self._limbo[key]
            dup = req.dups.pop(i, None)
            if dup is not None:
                close_fds((dup,))

    def stats(self, waiter: Any) -> StatsRequest:
        self._check_open()
        req = StatsRequest(waiter)
        self._stats.append(req)
        if self.ready:  # else sent with the next WELCOME
            self._out.extend(encode(Stats()))
            req.state = ReqState.SENT
        return req

    def unpark(self, tickets: Iterable[int], tag: str | bytes | None = None) -> None:
        """Wake these now (and every parked connection of the pool with ``tag``).
        Tickets are remembered until their WAKE comes (bounded): a container that
        restarts before it read the UNPARK gets it again (it is idempotent)."""
        self._check_open()
        tickets = tuple(tickets)
        for t in tickets:
            self._unparks[t] = None
        while len(self._unparks) > MAX_RESUME_TICKETS:
            del self._unparks[next(iter(self._unparks))]
        if tickets or tag is None:
            self._control(Unpark(tickets))
        if tag is not None:
            self._control(Tagged(TagOp.UNPARK, tag_bytes(tag)))

    def close_ticket(
        self, ticket: int | None, goodbye: bytes = b"", tag: str | bytes | None = None
    ) -> None:
        """Close a parked connection (repeated after a reconnect, like UNPARK), and/or
        every parked connection of the pool with ``tag``."""
        if not isinstance(goodbye, (bytes, bytearray, memoryview)):
            raise TypeError(f"goodbye must be bytes, not {type(goodbye).__name__}")
        if ticket is None and tag is None:
            raise TypeError("close() needs a ticket or a tag")
        self._check_open()
        if ticket is not None:
            entry = CloseEntry(ticket, bytes(goodbye))
            self._closes.append(entry)
            self._control(Close((entry,)))
        if tag is not None:
            self._control(Tagged(TagOp.CLOSE, tag_bytes(tag), bytes(goodbye)))

    def set_rules(
        self, set_id: int, rules: Sequence[Rule], waiter: Any, *, pool_wide: bool = False
    ) -> ControlRequest:
        """Register auto-response rule set ``set_id`` (1..65535) for this worker (again
        after every reconnect), or for its whole pool: parks name it with ``rules=``."""
        if not 0 < set_id <= 0xFFFF:
            raise ValueError(f"set_id must be 1..65535, not {set_id}")
        if not rules or not all(isinstance(r, Rule) for r in rules):
            raise TypeError("rules must be a non-empty sequence of connpark.Rule")
        msg = Rules(next(self._ids) & 0xFFFFFFFF, set_id, tuple(rules), pool_wide)
        encode(msg)  # LocalProtocolError now, not at send time
        return self._queue_control(msg, waiter)

    def send(
        self,
        data: bytes,
        waiter: Any,
        *,
        tickets: Iterable[int] = (),
        tag: str | bytes | None = None,
    ) -> ControlRequest:
        """Publish ``data`` to parked connections (``tag``'s, else ``tickets``) unwoken."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        tickets = tuple(tickets)
        if (tag is None) == (not tickets):
            raise TypeError("send() needs tickets or a tag (one of them)")
        raw_tag = tag_bytes(tag) if tag is not None else b""
        msg = Send(next(self._ids) & 0xFFFFFFFF, bytes(data), tickets, raw_tag)
        encode(msg)  # LocalProtocolError now (over one frame), not at send time
        return self._queue_control(msg, waiter)

    def _queue_control(self, msg: Rules | Send, waiter: Any) -> ControlRequest:
        self._check_open()
        req = ControlRequest(waiter, msg)
        self._control_reqs[msg.request_id] = req
        if self.ready:  # else sent with the next WELCOME
            self._out.extend(encode(msg))
            req.state = ReqState.SENT
        return req

    # -- closing ---------------------------------------------------------------------

    @property
    def reconnecting(self) -> bool:
        """The session was lost; a new one may come (its handshake may be under way)."""
        return self.phase is Phase.LOST or self.phase is Phase.HANDSHAKE

    @property
    def resending(self) -> bool:
        """Parks of a lost session still to be sent again (reconnecting, or back
        and not yet encoded): only the answer of the next container (maybe
        restored from its mirror, or upgraded: it may hold those sockets) tells
        who owns them, so leaving now would guess."""
        return self.phase not in (Phase.CLOSING, Phase.CLOSED) and any(
            req.resent for req in self._batch
        )

    def begin_close(self, untaken: Sequence[Woken[Any]] = (), waiter: Any = None) -> Request | None:
        """The user is done: stop taking wakes, hand the untaken ones back (re-park).

        Parks not yet sent fail with ``ParkingClosed`` (those sockets are the
        callers'). Returns a request to wait for (bounded) before ``finish_close``:
        the re-park, or, with nothing to hand back but parks sent and not
        answered, a STATS, answered after their PARKED (which decide who owns
        those sockets); None when there is nothing to wait for.
        """
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            return None
        live = self.phase is Phase.READY
        barrier = None
        if live and not any(w.socket for w in untaken):
            if any(batch.unanswered() for batch in self._sent.values()):
                barrier = self.stats(waiter)
        self.phase = Phase.CLOSING if live else Phase.CLOSED
        closed = ParkingClosed("the parking session is closed")
        # Held parks wait on: the answer to the first park of their socket comes
        # before the barrier's, and decides who owns it (``_release``, closing).
        batch, self._batch = self._batch, []
        held, self._held = ([], self._held) if live else (self._held, [])
        for req in [*batch, *held]:
            self._settle_error(req, closed)
        socks = [w.socket for w in untaken if w.socket is not None]
        for w in untaken:
            if w.unsent and w.socket is not None:
                _write_unsent_nowait(w.socket, w.unsent)
        if not live:
            self.closer(socks)  # no session to hand them to: nobody else can own them
            self.decoder.close()  # fds of a half-received frame
            self._fail_all(closed)
            return None
        if not socks:
            return barrier
        entries = [ParkEntry(s.fileno(), w.token, w.pending) for w in untaken if (s := w.socket)]
        req = ParkRequest(socks, entries, waiter, handback=True)
        self._batch.append(req)
        return req

    def finish_close(self, queue: Queue | None = None) -> None:
        """The hook is about to close the socket: fail whatever is still waiting.

        ``queue``: the channel's. The frames it has not begun to send are dropped
        (``stop_sending``): they never go out, so their sockets are the callers',
        and our own copies (an abandoned park's ``dup``s) may close; so is a
        frame half sent (cut short: the container discards it, fds and all),
        and nothing goes out after it. Parks sent
        and not answered (the wait at close ran out, or the hook leaves without
        ``begin_close``: an exception in its block), their sockets that reached
        the container are closed (``_close_unanswered``). Without ``queue`` (no
        channel: the session is torn down, or a test) they are left to the callers.
        """
        if self.phase is not Phase.CLOSED:
            if queue is not None:
                never = queue.stop_sending()
                if self._sent:
                    self._close_unanswered({_file_key(fd) for fd in never})
            self.phase = Phase.CLOSED
            self.decoder.close()
            self._fail_all(ParkingClosed("the parking session is closed"))

    def _close_unanswered(self, queued: set[tuple[int, int]]) -> None:
        """Leaving, the container's answers still due (it is slow: the wait is over).

        It reads on after we close, and keeps what it parks (for a re-send
        from us that will not come, then for any worker of the pool). So the
        caller's copy of each socket whose fds reached it closes, and so does
        a retry's held behind it: never both. Sockets in ``queued`` (fd keys)
        never left, or left in a frame cut short: the caller's.
        """
        error = ParkingClosed(
            "the parking session closed before the container answered; it may hold"
            " the connection, so your copy was closed"
        )
        gone: set[tuple[int, int]] = set()  # (id of a request, index)
        failed: list[ParkRequest] = []
        for batch in self._sent.values():
            for req in batch.unanswered():
                if req.handback:
                    continue  # (the engine's own: closed in any case)
                left = [
                    i
                    for i in range(req.answered, len(req.fds))
                    if (req.keys.get(i) or _file_key(req.fds[i])) not in queued
                ]
                if left:
                    self.closer([req.socks[i] for i in left])
                    gone.update((id(req), i) for i in left)
                    failed.append(req)
        for req in self._held:
            taken = [i for i, (old, j) in req.after.items() if (id(old), j) in gone]
            if taken:
                self.closer(_copies(req, taken))
                failed.insert(0, req)
        for req in failed:  # held ones first: settling a first park releases its retries
            self._settle_error(req, error, yours=False)

    # -- internals -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.phase is Phase.CLOSED:
            raise self.error or ParkingClosed("the parking session is closed")
        if self.phase is Phase.CLOSING:
            raise ParkingClosed("the parking session is closing")

    def _control(self, msg: Message) -> None:
        if self.ready:
            self._out.extend(encode(msg))
        # Otherwise sent with the next WELCOME (``_unparks``, ``_closes``).

    def _encode_batch(self) -> list[Frame]:
        batch, self._batch = self._batch, []
        if len(batch) == 1 and not batch[0].answered:
            items, fds = batch[0].items, batch[0].fds
        else:
            items = [i for req in batch for i in req.items[req.answered :]]
            fds = [fd for req in batch for fd in req.fds[req.answered :]]
        request_id = next(self._ids) & 0xFFFFFFFF
        frames = encode_park(request_id, items, fds)
        # One id for the batch: PARKED answers it in order; map each answer back.
        for req in batch:
            req.state = ReqState.SENT
        self._sent[request_id] = _Batch(batch)
        return frames

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, WakeRows):
            self._on_wake(msg)
        elif isinstance(msg, ParkedRows):
            self._on_parked(msg)
        elif isinstance(msg, StatsReply):
            self._on_stats(msg)
        elif isinstance(msg, Result):
            self._on_result(msg)
        elif isinstance(msg, Welcome):
            if self.phase is not Phase.HANDSHAKE:
                self._lose(ContainerLost("the container sent WELCOME twice"))
                return
            self._on_welcome(msg)
        elif isinstance(msg, Error):
            text = f"the container ended the session: {msg.text}"
            if msg.code in _FATAL:  # reconnecting cannot help
                fatal = ContainerError(text, code=msg.code)
                self._lose(fatal)
                self.give_up(fatal)
            else:
                self._lose(ContainerLost(text))
        else:
            close_fds(message_fds(msg))
            self._lose(ContainerLost(f"the container sent {type(msg).__name__}, a worker message"))

    def _on_welcome(self, msg: Welcome) -> None:
        self.welcome = msg
        self.phase = Phase.READY
        self.sessions += 1
        self._lost_since = None
        self._delay = 0.0
        self._resume = (0, ())
        self._received.clear()
        self._events.append(Ready(msg))
        # Requests the last container may not have read: all idempotent.
        if self._unparks:
            self._out.extend(encode(Unpark(tuple(self._unparks))))
        if self._closes:
            self._out.extend(encode(Close(tuple(self._closes))))
            self._closes.clear()
        for req in self._stats:  # re-sent after a reconnect
            if req.state is ReqState.QUEUED and not req.abandoned:
                self._out.extend(encode(Stats()))
                req.state = ReqState.SENT
        # Rule sets live as long as a session: register them again before any park.
        for rules in self._rule_sets.values():
            self._out.extend(encode(rules))
        for creq in self._control_reqs.values():
            if creq.state is ReqState.QUEUED and not creq.abandoned:
                self._out.extend(encode(creq.msg))
                creq.state = ReqState.SENT

    def _on_result(self, msg: Result) -> None:
        req = self._control_reqs.pop(msg.request_id, None)
        if req is None:
            return  # a rule set registered again after a reconnect: nobody waits
        req.state = ReqState.DONE
        req.result = msg
        if isinstance(req.msg, Rules) and msg.refusal is Refusal.OK:
            self._rule_sets[req.msg.set_id] = req.msg
        if not req.abandoned:
            self._events.append(Settled(req))

    def _on_wake(self, msg: WakeRows) -> None:
        if self.phase is not Phase.READY:
            # Closing: nobody will take them. Not ACKed: the container gives
            # them to another worker once this session's socket is closed.
            close_fds(message_fds(msg))
            return
        tickets = [row[0] for row in msg.rows]
        self._acks.extend(tickets)
        self._received.extend(tickets)
        if self._unparks:
            pop = self._unparks.pop
            for t in tickets:
                pop(t, None)
        self._events.append(Woke(msg.rows))

    def _on_parked(self, msg: ParkedRows) -> None:
        batch = self._sent.get(msg.request_id)
        if batch is None:
            self._lose(ContainerLost(f"PARKED for unknown request {msg.request_id}"))
            return
        if not batch.take(self, msg.codes, msg.tickets):
            self._lose(ContainerLost(f"PARKED answers more than request {msg.request_id} asked"))
            return
        if batch.done:
            del self._sent[msg.request_id]

    def _answer(self, req: ParkRequest, codes: Sequence[int], tickets: Sequence[int]) -> None:
        """The next ``len(codes)`` entries of ``req`` are answered."""
        start = req.answered
        end = start + len(codes)
        if req.indexed:  # settled: a number free for another socket from here
            self._parking.difference_update(
                req.fds if start == 0 and end == len(req.fds) else req.fds[start:end]
            )
            req.indexed = end < len(req.fds)
        if not any(codes):  # all parked (OK is 0): the container has them now, one owner
            req.results[start:end] = tickets
            self.closer(req.socks[start:end])
        else:
            for index, code, ticket in zip(range(start, end), codes, tickets, strict=True):
                sock = req.socks[index]
                if code == Refusal.OK:
                    req.results[index] = ticket
                    self.closer((sock,))
                else:
                    req.results[index] = ParkRefused(Refusal(code))
                    if req.handback:
                        self.closer((sock,))  # a wake we could not hand back: nobody else owns it
        req.answered = end
        if req.abandoned:
            self._let_go(req, start, end)
        if end == len(req.results):
            req.state = ReqState.DONE
            self._finished(req)
        if self._held:
            self._release()

    def _finished(self, req: ParkRequest) -> None:
        """A park is done: wake its caller, or, for the sent part of a held park,
        settle that park with its results."""
        parent = req.parent
        if parent is None:
            if not req.abandoned:
                self._events.append(Settled(req))
            return
        for k, i in enumerate(req.slots):
            parent.results[i] = req.results[k]
        parent.error = req.error
        parent.answered = len(parent.results) if req.error is None else 0
        parent.state = ReqState.DONE
        self._finished(parent)  # (a held part may itself have been held again)

    def _release(self) -> None:
        """Send the held parks whose parks ahead are answered now: a socket the
        container took has its ticket (``_take``); the others go out (``_queue``:
        held again behind an abandoned park of one of them, by inode: a dup)."""
        while self._held and self._release_once():
            pass  # (one settled may free another held behind it)

    def _release_once(self) -> bool:
        progress = False
        held, self._held = self._held, []
        for req in held:
            if req.state is ReqState.DONE:
                continue
            if self._waits(req):
                self._held.append(req)
                continue
            progress = True
            if self.phase in (Phase.CLOSING, Phase.CLOSED):  # nothing more is sent
                self._fail(req, ParkingClosed("the parking session is closed"))
                continue
            self._unindex(req)  # its own sockets: indexed again as they go out
            slots = [i for i, r in enumerate(req.results) if r is None]
            if len(slots) == len(req.results):
                self._queue(req)
            elif slots:
                self._queue(_part(req, slots))
            else:
                req.answered = len(req.results)
                req.state = ReqState.DONE
                self._finished(req)
        return progress

    def _waits(self, req: ParkRequest) -> bool:
        """Whether the held park ``req`` still waits for an answer (``_take``n
        first); and each of its sockets not parked is held in ``_parking``
        (``own``, if nobody else holds it: one whose park ahead was withdrawn,
        or refused it). A socket refused ahead (or withdrawn, failed) is this
        park's to send next, unless another park holds it by now (held sooner,
        or sent meanwhile): then it waits for that one."""
        self._take(req)
        waits = False
        parking = self._parking
        for i, (old, j) in list(req.after.items()):
            fd = req.fds[i]
            if old.state is not ReqState.DONE and old.answered <= j:
                waits = True
            else:
                del req.after[i]
                if fd not in req.own:
                    found = self._owners({fd}).get(fd) if fd in parking else self._limbo_of(fd)
                    if found is not None:
                        req.after[i] = found
                        waits = True
            if fd not in parking:
                req.own.add(fd)
                parking.add(fd)
        return waits

    def _take(self, req: ParkRequest) -> None:
        """A held park's sockets parked ahead of it (the park it waits for has a
        ticket for one, even if that park waits on for others): their tickets are
        its results now, and its copies of them close at once (the container has
        the connections; the same object closed already), their numbers free
        (closed: a number may name a new socket)."""
        taken = {i: t for i, (old, j) in req.after.items() if isinstance(t := old.results[j], int)}
        if not taken:
            return
        close = _copies(req, taken)
        for i, ticket in taken.items():
            req.results[i] = ticket
            del req.after[i]
            if (fd := req.fds[i]) in req.own:  # (behind an abandoned park: held by number)
                req.own.discard(fd)
                self._parking.discard(fd)
        if close:
            self.closer(close)

    def _on_stats(self, msg: StatsReply) -> None:
        """Replies come in the order requests were sent: the oldest SENT one is answered."""
        stats = self._stats
        while stats and stats[0].state is ReqState.DONE:
            stats.popleft()  # withdrawn before it was sent
        if not stats or stats[0].state is not ReqState.SENT:
            return  # nothing asked on this session: dropped
        req = stats.popleft()
        req.state = ReqState.DONE
        if req.abandoned:
            return
        try:
            req.result = ContainerStats.from_json(msg.body)
        except (ValueError, TypeError, KeyError) as exc:
            req.error = ContainerLost(f"bad statistics from the container: {exc}")
        self._events.append(Settled(req))

    def _lose(self, error: ConnparkError) -> None:
        """The session is over; keep what can be re-sent, fail the rest."""
        if self.phase not in (Phase.HANDSHAKE, Phase.READY, Phase.CLOSING):
            return
        closing = self.phase is Phase.CLOSING
        handshake = self.phase is Phase.HANDSHAKE
        session_id = self.welcome.session_id if self.welcome and not handshake else 0
        self.decoder.close()
        self._out = []
        self.last_error = error
        self._events.append(SessionLost(error))
        if closing or not self.reconnect:
            self.phase = Phase.CLOSED
            self.error = error if not closing else ParkingClosed("the parking session is closed")
            self._fail_all(error)
            return
        self.phase = Phase.LOST
        if session_id:
            self._resume = (session_id, tuple(self._received))
        # Unanswered parks: the container did not keep them (it answers every
        # PARK frame it reads before it ends a session); send them again.
        requeue: list[ParkRequest] = []
        for batch in self._sent.values():
            requeue.extend(batch.unanswered())
        self._sent.clear()
        for req in requeue:
            # The container may have taken them and died before PARKED (or not
            # written PARKED yet, or restored them from its mirror): sent again,
            # marked, it matches each socket to the ticket it gave. Abandoned
            # ones too, nobody waiting: an OK closes the socket, a refusal leaves
            # it the caller's, as when the answer comes in time.
            req.state = ReqState.QUEUED
            req.resent = True
            req.items[req.answered :] = [mark_resent(i) for i in req.items[req.answered :]]
        self._batch[:0] = [r for r in requeue if r.state is ReqState.QUEUED]
        for sreq in self._stats:
            if sreq.state is ReqState.SENT:
                # Asked again on the next session, unless nobody waits any more.
                sreq.state = ReqState.DONE if sreq.abandoned else ReqState.QUEUED
        for creq in list(self._control_reqs.values()):
            if creq.state is not ReqState.SENT:
                continue
            if isinstance(creq.msg, Rules):
                creq.state = ReqState.QUEUED  # registering twice is harmless: re-sent
            else:  # written to some sockets or not: sending it twice could duplicate
                del self._control_reqs[creq.msg.request_id]
                self._settle_error(
                    creq,
                    ContainerLost(
                        f"{error}; the container did not answer send(): the message may"
                        " have reached some connections"
                    ),
                )

    def _settle_error(self, req: Request, error: ConnparkError, *, yours: bool = True) -> None:
        if req.state is ReqState.DONE:
            return
        if isinstance(req, ParkRequest):
            self._fail(req, error, yours=yours)
            if self._held:
                self._release()
            return
        req.state = ReqState.DONE
        req.error = error
        if not req.abandoned:
            self._events.append(Settled(req))

    def _fail(self, req: ParkRequest, error: ConnparkError, *, yours: bool = True) -> None:
        """``req`` ends unanswered with ``error``: the sockets it did not park are
        the caller's (unless not ``yours``: then ``error`` says what became of
        them). A park that has a ticket already (answered in part, a held park's
        from the parks it waited for, a part's parent's) is answered instead,
        the others refused (SHUTTING_DOWN): an error would say every socket is
        the caller's, and lose the tickets."""
        req.state = ReqState.DONE
        self._unindex(req)
        if req.handback:
            self.closer(req.socks[req.answered :])  # wakes we were handing back: ours alone
        if req.abandoned:  # never answered: the caller's again
            self._let_go(req, req.answered, len(req.fds))
        self._take(req)  # held: a socket parked ahead of it is not the caller's
        req.after = {}
        parent = req.parent
        yours = yours and not req.handback
        if yours and (_ticketed(req) or (parent is not None and _ticketed(parent))):
            for i in range(req.answered, len(req.results)):
                if req.results[i] is None:
                    req.results[i] = ParkRefused(Refusal.SHUTTING_DOWN, f"park refused: {error}")
            req.answered = len(req.results)
        else:
            req.error = error
        self._finished(req)

    def _fail_all(self, error: ConnparkError) -> None:
        for batch in self._sent.values():
            for req in batch.unanswered():
                self._settle_error(req, error)
        self._sent.clear()
        for req in [*self._held, *self._batch]:
            self._settle_error(req, error)
        self._batch = []
        self._held = []
        while self._stats:
            self._settle_error(self._stats.popleft(), error)
        while self._control_reqs:
            _, creq = self._control_reqs.popitem()
            self._settle_error(creq, error)


class _Batch:
    """The requests one PARK request carries, answered in order, maybe in pieces."""

    __slots__ = ("pos", "reqs")

    def __init__(self, reqs: list[ParkRequest]) -> None:
        self.reqs = reqs
        self.pos = 0  # index into reqs of the first request not fully answered

    @property
    def done(self) -> bool:
        return self.pos >= len(self.reqs)

    def take(self, engine: Engine, codes: Sequence[int], tickets: Sequence[int]) -> bool:
        """Answer the requests in order, a run of entries per request."""
        done, total = 0, len(codes)
        while done < total:
            if self.done:
                return False
            req = self.reqs[self.pos]
            k = min(len(req.results) - req.answered, total - done)
            engine._answer(req, codes[done : done + k], tickets[done : done + k])
            done += k
            if req.answered == len(req.results):
                self.pos += 1
        return True

    def unanswered(self) -> list[ParkRequest]:
        return [r for r in self.reqs[self.pos :] if r.state is not ReqState.DONE]


def _part(req: ParkRequest, slots: list[int]) -> ParkRequest:
    """The entries of ``req`` at ``slots``, as a request of their own whose results
    go to ``req`` (``Engine._finished``)."""
    part = ParkRequest([req.socks[i] for i in slots], [req.entries[i] for i in slots], None)
    part.parent, part.slots, req.child = req, slots, part
    req.state = ReqState.SENT
    return part


def _ticketed(req: ParkRequest) -> bool:
    """Some socket of ``req`` is parked (a result is a ticket)."""
    return any(isinstance(r, int) for r in req.results)


def _copies(req: ParkRequest, taken: Iterable[int]) -> list[Any]:
    """The held park ``req``'s sockets at ``taken`` (the container has those
    connections from the parks they were held behind) that are other objects
    than those parks' (a dup, the fd wrapped again): the ones to close. The same
    object was closed by the first park's answer."""
    return [s for i in taken if (s := req.socks[i]) is not req.after[i][0].socks[req.after[i][1]]]


def _write_unsent_nowait(sock: Any, data: bytes) -> None:
    """Best effort for a wake handed back unread: what its socket takes now is not lost."""
    try:
        raw = socket.socket(fileno=sock.fileno())
    except OSError:
        return
    try:
        sent = raw.send(data, socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0))
    except OSError:
        sent = 0
    finally:
        raw.detach()
    if sent < len(data):
        LOGGER.warning(
            "handing back an UNSENT wake: %d of %d bytes could not be written",
            len(data) - sent,
            len(data),
        )


# ------------------------------------------------------------- closing for the owner


def closed_error(error: BaseException | None) -> ConnparkError:
    """The error a call on a finished engine raises."""
    if isinstance(error, ConnparkError):
        return error
    return ParkingClosed("the parking session is closed")


__all__ = [
    "DRAIN_TIMEOUT",
    "Backoff",
    "ControlRequest",
    "Engine",
    "ParkRequest",
    "ProtocolError",
    "Ready",
    "SendResult",
    "SessionLost",
    "Settled",
    "StatsRequest",
    "Woke",
    "Woken",
    "make_park_entry",
    "park_entries",
    "park_many_entries",
    "wrap_woken_fd",
]
