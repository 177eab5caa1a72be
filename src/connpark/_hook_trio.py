"""``open_parking``: the hook for trio workers.

Concurrent ``park()`` calls from many tasks are coalesced into one PARK
frame (up to 253 fds each), so a server parking a burst of connections
pays one round trip per batch, not per connection. Every WAKE is ACKed as
soon as its fds have arrived.
"""

from __future__ import annotations

import math
import os
import socket as _stdsocket
import sys
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import trio

from ._errors import ConnparkError, ContainerError, ParkingClosed, ParkRefused
from ._fdpass import TrioChannel
from ._stats import ContainerStats
from ._unixsock import connect_unix
from ._wire import Parked, ParkEntry, ParkResult, Refusal, StatsReply, Wake
from ._worker import (
    ParkTracker,
    Policy,
    Woken,
    WorkerProtocol,
    make_park_entry,
    refusal_error,
    wrap_woken_fd,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

TrioSocket = trio.socket.SocketType
Parkable: TypeAlias = TrioSocket | _stdsocket.socket | trio.SocketStream


def _raw_socket(sock: Any) -> Any:
    if isinstance(sock, trio.SocketStream):
        return sock.socket
    if isinstance(sock, (TrioSocket, _stdsocket.socket)):
        return sock
    raise TypeError(f"park() takes a socket or trio.SocketStream, not {type(sock).__name__}")


class _Waiter:
    """Waits for the results of ``n`` park entries (one ``park()`` or one ``park_many()``)."""

    __slots__ = ("done", "error", "n", "results")

    def __init__(self, n: int = 1) -> None:
        self.n = n
        self.done = trio.Event()
        self.results: list[ParkResult] = []
        self.error: BaseException | None = None

    def add(self, result: ParkResult) -> None:
        self.results.append(result)
        if len(self.results) == self.n:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.done.set()

    async def wait(self) -> list[ParkResult]:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.results


class Parking:
    """A worker session with a container. Get one from ``open_parking``."""

    def __init__(self, chan: TrioChannel, proto: WorkerProtocol) -> None:
        self._chan = chan
        self._proto = proto
        assert proto.welcome is not None
        self.session_id = proto.welcome.session_id
        self.max_token = proto.welcome.max_token
        self.max_pending = proto.welcome.max_pending
        self._batch: list[tuple[ParkEntry, _Waiter]] = []
        self._batch_ready = trio.Event()
        self._parks: ParkTracker[_Waiter] = ParkTracker()
        self._stats_waiters: deque[tuple[trio.Event, list[bytes]]] = deque()
        self._wake_send, self._wake_recv = trio.open_memory_channel[Woken[TrioSocket]](math.inf)
        self._closed: BaseException | None = None

    # -- public API ---------------------------------------------------------------

    async def park(
        self,
        sock: Parkable,
        *,
        token: bytes = b"",
        pending: bytes = b"",
        idle_timeout: float | None = None,
        on_hangup: Policy = "close",
        on_timeout: Policy = "close",
    ) -> int:
        """Give ``sock`` to the container; returns its ticket and closes your copy.

        On ``ParkRefused`` (or any error) the socket is still yours and usable.
        ``idle_timeout`` is in seconds (None: the container's default).
        """
        raw = _raw_socket(sock)
        entry = make_park_entry(
            raw.fileno(),
            token=token,
            pending=pending,
            idle_timeout=idle_timeout,
            on_hangup=on_hangup,
            on_timeout=on_timeout,
        )
        (result,) = await self._submit([entry])
        if result.refusal is not Refusal.OK:
            raise refusal_error(result)
        raw.close()
        return result.ticket

    async def park_many(
        self,
        socks: Sequence[Parkable],
        *,
        tokens: Sequence[bytes] | None = None,
        pendings: Sequence[bytes] | None = None,
        idle_timeout: float | None = None,
        on_hangup: Policy = "close",
        on_timeout: Policy = "close",
    ) -> list[int | ParkRefused]:
        """Park many sockets in one request: a ticket or a ``ParkRefused`` per socket.

        The same as ``park()`` for each, without a task or a round trip per
        socket. ``tokens``/``pendings`` (if given) pair up with ``socks``. Each
        parked socket's copy is closed; each refused one is still yours.
        """
        raws = [_raw_socket(s) for s in socks]
        if tokens is not None and len(tokens) != len(raws):
            raise ValueError("tokens must pair up with socks")
        if pendings is not None and len(pendings) != len(raws):
            raise ValueError("pendings must pair up with socks")
        entries = [
            make_park_entry(
                raw.fileno(),
                token=tokens[i] if tokens is not None else b"",
                pending=pendings[i] if pendings is not None else b"",
                idle_timeout=idle_timeout,
                on_hangup=on_hangup,
                on_timeout=on_timeout,
            )
            for i, raw in enumerate(raws)
        ]
        if not entries:
            return []
        out: list[int | ParkRefused] = []
        for raw, result in zip(raws, await self._submit(entries), strict=True):
            if result.refusal is Refusal.OK:
                raw.close()
                out.append(result.ticket)
            else:
                out.append(refusal_error(result))
        return out

    def wakes(self) -> trio.MemoryReceiveChannel[Woken[TrioSocket]]:
        """Woken connections, as they come (``async for woken in parking.wakes()``).

        Ends when the session ends. Each ``woken.socket`` is a non-blocking trio
        socket that is now yours (None for a notice).
        """
        return self._wake_recv

    async def unpark(self, *tickets: int) -> None:
        """Ask for these parked connections back now (reason REQUESTED).

        A ticket already on its way back (or gone) is ignored: no error.
        """
        await self._send(self._proto.unpark(tickets))

    async def close(self, ticket: int, *, goodbye: bytes = b"") -> None:
        """Have the container close a parked connection, writing ``goodbye`` first."""
        await self._send(self._proto.close([(ticket, goodbye)]))

    async def stats(self) -> ContainerStats:
        """The container's statistics snapshot."""
        event = trio.Event()
        box: list[bytes] = []
        # Shielded: a cancelled request would leave its waiter to steal the next reply.
        with trio.CancelScope(shield=True):
            self._stats_waiters.append((event, box))
            await self._send(self._proto.stats())
            await event.wait()
        if not box:
            raise self._closed_error()
        return ContainerStats.from_json(box[0])

    # -- internals ------------------------------------------------------------------

    def _closed_error(self) -> ConnparkError:
        if isinstance(self._closed, ConnparkError):
            return self._closed
        return ParkingClosed("the parking session is closed")

    async def _send(self, frames: Sequence[Any]) -> None:
        if self._closed is not None:
            raise self._closed_error()
        try:
            await self._chan.send_frames(frames)
        except OSError as exc:
            raise ContainerError(f"lost the container: {exc}") from exc

    async def _submit(self, entries: list[ParkEntry]) -> list[ParkResult]:
        if self._closed is not None:
            raise self._closed_error()
        waiter = _Waiter(len(entries))
        self._batch.extend((e, waiter) for e in entries)
        self._batch_ready.set()
        # Shielded: once submitted, the outcome must be known, or a cancelled
        # park() could leave the connection both parked and still "yours".
        # PARKED comes in a round trip; a dead session fails the waiter.
        with trio.CancelScope(shield=True):
            results = await waiter.wait()
        await trio.lowlevel.checkpoint_if_cancelled()
        return results

    async def _flusher(self) -> None:
        """Send queued parks as one PARK request per turn (split at 253 fds by the codec)."""
        while True:
            await self._batch_ready.wait()
            self._batch_ready = trio.Event()
            await trio.lowlevel.cancel_shielded_checkpoint()  # let sibling park() calls join
            batch, self._batch = self._batch, []
            if not batch:
                continue
            try:
                request_id, frames = self._proto.park(e for e, _ in batch)
            except ConnparkError as exc:  # cannot be encoded: fail these parks only
                for _, w in batch:
                    w.fail(exc)
                continue
            self._parks.add(request_id, [w for _, w in batch])
            try:
                await self._chan.send_frames(frames)
            except OSError as exc:
                self._fail(ContainerError(f"lost the container: {exc}"))
                return

    async def _reader(self) -> None:
        try:
            while True:
                msg = await self._chan.receive_message(self._proto.decoder)
                if msg is None:
                    raise ContainerError("the container closed the session")
                self._proto.check(msg)
                if isinstance(msg, Parked):
                    self._on_parked(msg)
                elif isinstance(msg, Wake):
                    await self._on_wake(msg)
                elif isinstance(msg, StatsReply) and self._stats_waiters:
                    event, box = self._stats_waiters.popleft()
                    box.append(msg.body)
                    event.set()
        except (ConnparkError, OSError) as exc:
            self._fail(exc if isinstance(exc, ConnparkError) else ContainerError(str(exc)))

    def _on_parked(self, msg: Parked) -> None:
        for waiter, result in self._parks.resolve(msg):
            waiter.add(result)

    async def _on_wake(self, msg: Wake) -> None:
        woken = []
        for e in msg.entries:
            raw = wrap_woken_fd(e)
            sock = None if raw is None else trio.socket.from_stdlib_socket(raw)
            woken.append(Woken(e.ticket, e.reason, e.token, e.pending, sock))
        delivered = []
        for w in woken:  # ours now: from here _shutdown closes what nobody takes
            try:
                self._wake_send.send_nowait(w)
                delivered.append(w.ticket)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                # Nobody can take it (wakes() closed, or the session is ending):
                # drop our copy, do not ACK; the container gives it to another worker.
                if w.socket is not None:
                    w.socket.close()
        if delivered:
            await self._chan.send_frames(self._proto.ack(delivered))
        # Let the consumers take these before we decode the next WAKE of a burst.
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _fail(self, exc: BaseException) -> None:
        """The session is over: fail every waiter, end ``wakes()``."""
        if self._closed is None:
            self._closed = exc
        for w in self._parks.drain():
            w.fail(self._closed_error())
        for _, w in self._batch:
            w.fail(self._closed_error())
        self._batch.clear()
        while self._stats_waiters:
            self._stats_waiters.popleft()[0].set()
        self._wake_send.close()

    def _shutdown(self) -> None:
        self._fail(ParkingClosed("the parking session is closed"))
        # Wakes nobody took are ours: close them rather than leak them.
        while True:
            try:
                w = self._wake_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if w.socket is not None:
                w.socket.close()
        self._proto.decoder.close()
        self._chan.close()


@asynccontextmanager
async def open_parking(
    path: str | os.PathLike[str], *, pool: str = "default", name: str = ""
) -> AsyncIterator[Parking]:
    """Connect to the container at ``path`` as a worker of ``pool``.

    Raises ``ContainerError`` (a ``ConnparkError``) if the container is not
    there or will not have us (e.g. our uid is not allowed).
    """
    chan = TrioChannel(connect_unix(path))
    proto = WorkerProtocol(pool, name or f"trio-{os.getpid()}")
    try:
        await chan.send_frames(proto.hello())
        with trio.fail_after(10):
            proto.handshake(await chan.receive_message(proto.decoder))
    except BaseException:
        proto.decoder.close()
        chan.close()
        raise
    parking = Parking(chan, proto)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(parking._reader)
            nursery.start_soon(parking._flusher)
            try:
                yield parking
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Our tasks never raise: a group holds what the body raised. Unwrap it.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        parking._shutdown()
