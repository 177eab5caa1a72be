"""The worker side of the protocol, sans-IO: shared by the trio, blocking and asyncio hooks.

A hook owns a socket and a way to wait; this module owns everything else:
validating park arguments, request ids, matching PARKED to requests, turning
ERROR into ``ContainerError`` and refusals into ``ParkRefused``.
"""

from __future__ import annotations

import itertools
import math
import socket
from collections.abc import Iterable
from typing import Generic, Literal, TypeVar

import attrs

from ._errors import ContainerError, ParkRefused, RemoteProtocolError
from ._wire import (
    DEFAULT_MAX_BODY,
    MAX_TOKEN,
    PROTOCOL_VERSION,
    Ack,
    Close,
    CloseEntry,
    Decoder,
    Error,
    Frame,
    Hello,
    Message,
    Park,
    Parked,
    ParkEntry,
    ParkResult,
    Reason,
    Stats,
    StatsReply,
    Unpark,
    Wake,
    WakeEntry,
    Welcome,
    close_fds,
    encode,
    message_fds,
)

S = TypeVar("S")
H = TypeVar("H")
Policy = Literal["close", "return"]
_POLICIES = ("close", "return")
_MAX_MS = 0xFFFFFFFF


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


def make_park_entry(
    fd: int,
    *,
    token: bytes = b"",
    pending: bytes = b"",
    idle_timeout: float | None = None,
    on_hangup: Policy = "close",
    on_timeout: Policy = "close",
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
    return ParkEntry(
        fd,
        bytes(token),
        bytes(pending),
        ms,
        hangup_returns=on_hangup == "return",
        timeout_returns=on_timeout == "return",
    )


def wrap_woken_fd(entry: WakeEntry) -> socket.socket | None:
    """A stdlib socket for a woken fd, family from the WAKE flags: no syscall spent."""
    if entry.fd is None:
        return None
    family = socket.AF_INET6 if entry.inet6 else socket.AF_INET
    return socket.socket(family, socket.SOCK_STREAM, 0, fileno=entry.fd)


def refusal_error(result: ParkResult) -> ParkRefused:
    return ParkRefused(result.refusal.label)


class WorkerProtocol:
    """One worker session's protocol state; feed it bytes, ask it for frames."""

    def __init__(self, pool: str = "default", name: str = "") -> None:
        self.pool = pool
        self.name = name
        self.decoder = Decoder()
        self.welcome: Welcome | None = None
        self._ids = itertools.count(1)

    # -- outgoing -------------------------------------------------------------

    def hello(self) -> list[Frame]:
        return encode(Hello(PROTOCOL_VERSION, self.pool, self.name))

    def park(self, entries: Iterable[ParkEntry]) -> tuple[int, list[Frame]]:
        """Frames for one PARK request, and its id (match it in ``parked``)."""
        request_id = next(self._ids) & 0xFFFFFFFF
        return request_id, encode(Park(request_id, tuple(entries)))

    @staticmethod
    def ack(tickets: Iterable[int]) -> list[Frame]:
        return encode(Ack(tuple(tickets)))

    @staticmethod
    def unpark(tickets: Iterable[int]) -> list[Frame]:
        return encode(Unpark(tuple(tickets)))

    @staticmethod
    def close(items: Iterable[tuple[int, bytes]]) -> list[Frame]:
        return encode(Close(tuple(CloseEntry(t, bytes(g)) for t, g in items)))

    @staticmethod
    def stats() -> list[Frame]:
        return encode(Stats())

    # -- incoming -------------------------------------------------------------

    def handshake(self, msg: Message | None) -> Welcome:
        """Check the container's answer to HELLO."""
        if msg is None:
            raise ContainerError("the container closed the connection during the handshake")
        self.check(msg)
        if not isinstance(msg, Welcome):
            raise RemoteProtocolError(f"expected WELCOME, got {type(msg).__name__}")
        self.welcome = msg
        return msg

    @staticmethod
    def check(msg: Message) -> Message:
        """Raise ``ContainerError`` for ERROR; refuse messages a container never sends."""
        if isinstance(msg, Error):
            raise ContainerError(f"container error: {msg.text}", code=msg.code)
        if not isinstance(msg, (Welcome, Parked, Wake, StatsReply)):
            close_fds(message_fds(msg))
            raise RemoteProtocolError(f"{type(msg).__name__} is not a container message")
        return msg


class ParkTracker(Generic[H]):
    """Outstanding PARK requests: request id -> one caller handle per entry, in order.

    The hooks differ only in what a handle is (an Event, a Future...).
    """

    def __init__(self) -> None:
        self._requests: dict[int, list[H]] = {}

    def add(self, request_id: int, handles: list[H]) -> None:
        self._requests[request_id] = handles

    def resolve(self, msg: Parked) -> list[tuple[H, ParkResult]]:
        """Match a PARKED to its request's next entries (a big request may be
        answered in several PARKED messages, one per PARK frame, in order)."""
        handles = self._requests.get(msg.request_id)
        n = len(msg.results)
        if handles is None or n > len(handles):
            raise RemoteProtocolError(f"PARKED for unknown request {msg.request_id}")
        done = list(zip(handles[:n], msg.results, strict=True))
        del handles[:n]
        if not handles:
            del self._requests[msg.request_id]
        return done

    def drain(self) -> list[H]:
        """Every handle still waiting (the session is over: fail them)."""
        out = [h for handles in self._requests.values() for h in handles]
        self._requests.clear()
        return out
