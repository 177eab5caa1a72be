"""``connpark.aio.open_parking``: the hook for asyncio workers, shaped like the trio one.

Woken sockets are non-blocking stdlib sockets, ready for
``asyncio.open_connection(sock=woken.socket)`` or ``loop.sock_recv``.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from ._errors import ConnparkError, ContainerError, ParkingClosed
from ._fdpass import Outbox, recv_fds
from ._stats import ContainerStats
from ._unixsock import connect_unix
from ._wire import (
    Decoder,
    Frame,
    Message,
    Parked,
    ParkEntry,
    ParkResult,
    Refusal,
    StatsReply,
    Wake,
    close_fds,
)
from ._worker import (
    ParkTracker,
    Policy,
    Woken,
    WorkerProtocol,
    make_park_entry,
    refusal_error,
    wrap_woken_fd,
)

__all__ = ["AsyncioParking", "open_parking"]

_END = object()


class _Channel:
    """Frames and fds over a non-blocking unix socket, driven by the asyncio loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._outbox = Outbox()

    async def _wait(self, writable: bool) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        fd = self.sock.fileno()
        if writable:
            self._loop.add_writer(fd, ready)
        else:
            self._loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            if writable:
                self._loop.remove_writer(fd)
            else:
                self._loop.remove_reader(fd)

    async def send_frames(self, frames: list[Frame]) -> None:
        async with self._lock:
            self._outbox.add(frames)
            while True:
                try:
                    return self._outbox.send_some(self.sock)
                except BlockingIOError:
                    await self._wait(writable=True)

    async def receive_message(self, decoder: Decoder) -> Message | None:
        while True:
            msg = decoder.next_message()
            if msg is not None:
                return msg
            try:
                data, fds = recv_fds(self.sock)
            except BlockingIOError:
                await self._wait(writable=False)
                continue
            if not data:
                close_fds(fds)
                decoder.eof()
                return None
            decoder.receive_data(data, fds)

    def close(self) -> None:
        self.sock.close()
        self._outbox.close()


class AsyncioParking:
    """A worker session for asyncio code. Get one from ``connpark.aio.open_parking``."""

    def __init__(self, chan: _Channel, proto: WorkerProtocol) -> None:
        self._chan = chan
        self._proto = proto
        assert proto.welcome is not None
        self.session_id = proto.welcome.session_id
        self._loop = asyncio.get_running_loop()
        self._parks: ParkTracker[asyncio.Future[ParkResult]] = ParkTracker()
        self._batch: list[tuple[ParkEntry, asyncio.Future[ParkResult]]] = []
        self._stats: list[asyncio.Future[bytes]] = []
        self._wakes: asyncio.Queue[object] = asyncio.Queue()
        self._closed: ConnparkError | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- public API -------------------------------------------------------------

    async def park(
        self,
        sock: socket.socket,
        *,
        token: bytes = b"",
        pending: bytes = b"",
        idle_timeout: float | None = None,
        on_hangup: Policy = "close",
        on_timeout: Policy = "close",
    ) -> int:
        """Give ``sock`` to the container; returns its ticket and closes your copy.

        Detach it from any transport first (``transport.pause_reading()`` and
        take ``transport.get_extra_info("socket")`` only if you own it; simplest
        is a socket you drive with ``loop.sock_recv``). On ``ParkRefused`` the
        socket is still yours.
        """
        if not isinstance(sock, socket.socket):
            raise TypeError(f"park() takes a socket.socket, not {type(sock).__name__}")
        entry = make_park_entry(
            sock.fileno(),
            token=token,
            pending=pending,
            idle_timeout=idle_timeout,
            on_hangup=on_hangup,
            on_timeout=on_timeout,
        )
        self._check_open()
        fut: asyncio.Future[ParkResult] = self._loop.create_future()
        self._batch.append((entry, fut))
        if len(self._batch) == 1:
            self._spawn(self._flush())
        try:
            result = await asyncio.shield(fut)
        except asyncio.CancelledError:
            self._settle_cancelled(sock, entry, fut)
            raise
        if result.refusal is not Refusal.OK:
            raise refusal_error(result)
        sock.close()
        return result.ticket

    async def wakes(self) -> AsyncIterator[Woken[socket.socket]]:
        """Woken connections as they come; ends when the session ends."""
        while True:
            item = await self._wakes.get()
            if item is _END:
                self._wakes.put_nowait(_END)
                return
            assert isinstance(item, Woken)
            yield item

    async def unpark(self, *tickets: int) -> None:
        """Ask for these connections back now (REQUESTED); gone tickets are ignored."""
        await self._send(self._proto.unpark(tickets))

    async def close(self, ticket: int, *, goodbye: bytes = b"") -> None:
        """Have the container write ``goodbye`` and close a parked connection."""
        await self._send(self._proto.close([(ticket, goodbye)]))

    async def stats(self) -> ContainerStats:
        self._check_open()
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._stats.append(fut)
        await self._send(self._proto.stats())
        return ContainerStats.from_json(await fut)

    # -- internals ----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed

    async def _send(self, frames: list[Frame]) -> None:
        self._check_open()
        try:
            await self._chan.send_frames(frames)
        except OSError as exc:
            error = ContainerError(f"lost the container: {exc}")
            self._fail(error)
            raise error from exc

    def _settle_cancelled(
        self, sock: socket.socket, entry: ParkEntry, fut: asyncio.Future[ParkResult]
    ) -> None:
        """A park() was cancelled: keep the one-owner rule all the same.

        Not sent yet: withdraw it, the socket stays the caller's. Already
        sent: when PARKED comes, close the caller's copy if it was parked.
        """
        for i, (queued, queued_fut) in enumerate(self._batch):
            if queued is entry and queued_fut is fut:
                del self._batch[i]
                fut.cancel()
                return

        def settle(f: asyncio.Future[ParkResult]) -> None:
            if not f.cancelled() and f.exception() is None and f.result().refusal is Refusal.OK:
                sock.close()

        fut.add_done_callback(settle)

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the park() calls of this loop turn join the batch
        batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            request_id, frames = self._proto.park(e for e, _ in batch)
        except ConnparkError as exc:  # cannot be encoded: fail these parks only
            for _, f in batch:
                if not f.done():
                    f.set_exception(exc)
            return
        self._parks.add(request_id, [f for _, f in batch])
        try:
            await self._send(frames)
        except ConnparkError:
            pass  # _fail has failed the futures

    async def _read(self) -> None:
        try:
            while True:
                msg = await self._chan.receive_message(self._proto.decoder)
                if msg is None:
                    raise ContainerError("the container closed the session")
                self._proto.check(msg)
                if isinstance(msg, Parked):
                    for fut, result in self._parks.resolve(msg):
                        if not fut.done():
                            fut.set_result(result)
                elif isinstance(msg, Wake):
                    for e in msg.entries:
                        sock = wrap_woken_fd(e)
                        if sock is not None:
                            sock.setblocking(False)
                        self._wakes.put_nowait(Woken(e.ticket, e.reason, e.token, e.pending, sock))
                    await self._chan.send_frames(self._proto.ack(e.ticket for e in msg.entries))
                elif isinstance(msg, StatsReply) and self._stats:
                    fut_stats = self._stats.pop(0)
                    if not fut_stats.done():
                        fut_stats.set_result(msg.body)
        except ConnparkError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(ContainerError(f"lost the container: {exc}"))

    def _fail(self, exc: ConnparkError) -> None:
        if self._closed is None:
            self._closed = exc
        closed = self._closed
        waiting: list[asyncio.Future[ParkResult]] = self._parks.drain()
        waiting += [f for _, f in self._batch]
        self._batch = []
        for fut in waiting:
            if not fut.done():
                fut.set_exception(closed)
        for sfut in self._stats:
            if not sfut.done():
                sfut.set_exception(closed)
        self._stats = []
        self._wakes.put_nowait(_END)

    def _shutdown(self) -> None:
        self._fail(ParkingClosed("the parking session is closed"))
        while not self._wakes.empty():
            item = self._wakes.get_nowait()
            if isinstance(item, Woken) and item.socket is not None:
                item.socket.close()
        self._wakes.put_nowait(_END)
        self._proto.decoder.close()
        self._chan.close()


@asynccontextmanager
async def open_parking(
    path: str | os.PathLike[str], *, pool: str = "default", name: str = ""
) -> AsyncIterator[AsyncioParking]:
    """Connect to the container at ``path`` as an asyncio worker of ``pool``."""
    chan = _Channel(connect_unix(path))
    proto = WorkerProtocol(pool, name or f"asyncio-{os.getpid()}")
    try:
        await chan.send_frames(proto.hello())
        proto.handshake(await asyncio.wait_for(chan.receive_message(proto.decoder), 10))
    except BaseException:
        proto.decoder.close()
        chan.close()
        raise
    parking = AsyncioParking(chan, proto)
    reader = asyncio.get_running_loop().create_task(parking._read())
    try:
        yield parking
    finally:
        reader.cancel()
        try:
            await reader
        except asyncio.CancelledError:
            pass
        for task in list(parking._tasks):
            task.cancel()
        parking._shutdown()
