"""``connpark.aio.open_parking``: the hook for asyncio workers, a thin adapter over the engine.

Woken sockets are non-blocking stdlib sockets, ready for
``asyncio.open_connection(sock=woken.socket)`` or ``loop.sock_recv``. The
behaviour (batching, ACKs, cancellation, reconnect, errors) is the engine's,
the same as the trio and thread hooks.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from ._errors import ConnparkError, ContainerLost, ContainerTimeout, ParkRefused, lost_from_os_error
from ._fdpass import Outbox, recv_fds
from ._stats import ContainerStats
from ._unixsock import connect_unix, peer_uid
from ._wire import Result, Rule
from ._worker import (
    DEFAULT_BACKOFF,
    Backoff,
    ControlRequest,
    Engine,
    HandleInfo,
    Phase,
    Policy,
    Request,
    SendResult,
    Settled,
    Woke,
    Woken,
    make_park_entry,
    park_entries,
    wrap_woken_fd,
)

__all__ = ["AsyncioParking", "open_parking"]

_END = object()
#: How long leaving ``open_parking`` waits for the re-park of wakes nobody took.
CLOSE_TIMEOUT = 5.0


class _Channel:
    """A non-blocking unix socket driven by the loop: readiness waits, ordered sends."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._outbox = Outbox(own_fds=False)

    async def wait(self, writable: bool) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        fd = self.sock.fileno()
        add, remove = (
            (self._loop.add_writer, self._loop.remove_writer)
            if writable
            else (self._loop.add_reader, self._loop.remove_reader)
        )

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        add(fd, ready)
        try:
            await fut
        finally:
            remove(fd)

    async def send_frames(self, frames: list[Any]) -> None:
        self._outbox.add(frames)  # now, in call order: the lock only paces the writing
        async with self._lock:
            while True:
                try:
                    return self._outbox.send_some(self.sock)
                except BlockingIOError:
                    await self.wait(writable=True)

    def send_now(self, frames: list[Any]) -> None:
        """Best effort, without waiting: queue and send what the socket takes now."""
        self._outbox.add(frames)
        if not self._lock.locked():
            try:
                self._outbox.send_some(self.sock)
            except OSError:
                pass

    async def receive(self) -> tuple[bytes, list[int]]:
        while True:
            try:
                return recv_fds(self.sock)
            except BlockingIOError:
                await self.wait(writable=False)

    def close(self) -> None:
        self.sock.close()
        self._outbox.close()


class AsyncioParking(HandleInfo):
    """A worker's parking handle for asyncio. Get one from ``connpark.aio.open_parking``."""

    def __init__(self, path: str, engine: Engine, connect_timeout: float) -> None:
        self._path = path
        self._engine = engine
        self._connect_timeout = connect_timeout
        self._loop = asyncio.get_running_loop()
        self._chan: _Channel | None = None
        self._wakes: asyncio.Queue[object] = asyncio.Queue()
        self._flush_scheduled = False

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
        rules: int = 0,
        tags: Sequence[str | bytes] = (),
    ) -> int:
        """Give ``sock`` to the container; returns its ticket and closes your copy.

        Park a socket you drive yourself (``loop.sock_recv``), not one a
        transport still reads. On ``ParkRefused`` the socket is still yours;
        cancelled, it is either still yours or closed (``sock.fileno() == -1``).
        """
        _check_socket(sock)
        entry = make_park_entry(
            sock.fileno(),
            token=token,
            pending=pending,
            idle_timeout=idle_timeout,
            on_hangup=on_hangup,
            on_timeout=on_timeout,
            rules=rules,
            tags=tags,
        )
        (result,) = await self._park([sock], [entry])
        if isinstance(result, ParkRefused):
            raise result
        return result

    async def park_many(
        self,
        socks: Sequence[socket.socket],
        *,
        tokens: Sequence[bytes] | None = None,
        pendings: Sequence[bytes] | None = None,
        idle_timeout: float | None = None,
        on_hangup: Policy = "close",
        on_timeout: Policy = "close",
        rules: int = 0,
        tags: Sequence[str | bytes] = (),
    ) -> list[int | ParkRefused]:
        """Park many sockets in one request: a ticket or a ``ParkRefused`` per socket."""
        for s in socks:
            _check_socket(s)
        entries = park_entries(
            [s.fileno() for s in socks],
            tokens,
            pendings,
            idle_timeout=idle_timeout,
            on_hangup=on_hangup,
            on_timeout=on_timeout,
            rules=rules,
            tags=tags,
        )
        return await self._park(list(socks), entries)

    async def wakes(self) -> AsyncIterator[Woken[socket.socket]]:
        """Woken connections as they come, across reconnects; ends when closed.

        Raises ``ContainerLost`` once the hook gave up reconnecting.
        """
        while True:
            item = await self._wakes.get()
            if item is _END:
                self._wakes.put_nowait(_END)
                if isinstance(self._engine.error, ContainerLost):
                    raise self._engine.error
                return
            assert isinstance(item, Woken)
            yield item

    async def unpark(self, *tickets: int, tag: str | bytes | None = None) -> None:
        """Ask for these connections (and those with ``tag``) back now (REQUESTED);
        gone tickets are ignored."""
        self._engine.unpark(tickets, tag)
        await self._flush()

    async def close(
        self, ticket: int | None = None, *, tag: str | bytes | None = None, goodbye: bytes = b""
    ) -> None:
        """Have the container write ``goodbye`` and close a parked connection (or all
        with ``tag``)."""
        self._engine.close_ticket(ticket, goodbye, tag)
        await self._flush()

    async def set_rules(
        self, set_id: int, rules: Sequence[Rule], *, pool_wide: bool = False
    ) -> None:
        """Register auto-response rules; ``park(..., rules=set_id)`` uses them (``Refused``)."""
        req = self._engine.set_rules(set_id, rules, self._loop.create_future(), pool_wide=pool_wide)
        await self._control(req)

    async def send(
        self, data: bytes, *, tickets: Sequence[int] = (), tag: str | bytes | None = None
    ) -> SendResult:
        """Write ``data`` to parked connections without waking them; those whose socket
        does not take it all are woken (reason UNSENT, the rest in ``woken.unsent``)."""
        req = self._engine.send(data, self._loop.create_future(), tickets=tickets, tag=tag)
        result = await self._control(req)
        return SendResult(result.written, result.woken, result.missed)

    async def _control(self, req: ControlRequest) -> Result:
        self._schedule_flush()
        await self._wait(req)
        return req.outcome()

    async def stats(self) -> ContainerStats:
        """The container's statistics snapshot."""
        req = self._engine.stats(self._loop.create_future())
        self._schedule_flush()
        await self._wait(req)
        return req.outcome()

    # -- waiting ----------------------------------------------------------------

    async def _park(self, socks: list[Any], entries: list[Any]) -> list[int | ParkRefused]:
        req = self._engine.park(socks, entries, self._loop.create_future())
        self._pump()
        self._schedule_flush()
        await self._wait(req)
        return req.outcome()

    async def _wait(self, req: Request) -> None:
        try:
            await asyncio.shield(req.waiter)
        except asyncio.CancelledError:
            self._engine.withdraw(req)  # the engine keeps one owner
            raise

    # -- I/O ----------------------------------------------------------------------

    def _pump(self) -> None:
        while (ev := self._engine.next_event()) is not None:
            if isinstance(ev, Settled):
                if not ev.request.waiter.done():
                    ev.request.waiter.set_result(None)
            elif isinstance(ev, Woke):
                for e in ev.entries:
                    sock = wrap_woken_fd(e)
                    if sock is not None:
                        sock.setblocking(False)
                    self._wakes.put_nowait(Woken.of(e, sock))

    def _schedule_flush(self) -> None:
        """Flush once this loop turn is over: parks of the same turn share a request."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        task = self._loop.create_task(self._flush())
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _flush(self) -> None:
        chan = self._chan
        frames = self._engine.data_to_send()
        if chan is None or not frames:
            return
        try:
            await chan.send_frames(frames)
        except OSError as exc:
            self._engine.connection_failed(lost_from_os_error(exc, "lost the container"))
            self._pump()
            chan.close()

    async def _session(self, started: asyncio.Future[None] | None) -> None:
        """Connect, handshake, then read until the session is lost."""
        chan = _Channel(connect_unix(self._path))
        try:
            self._engine.start_session(peer_uid(chan.sock))
            self._chan = chan
            await self._flush()
            try:
                await asyncio.wait_for(self._handshake(chan), self._connect_timeout)
            except asyncio.TimeoutError:
                error = self._engine.handshake_timed_out(self._connect_timeout)
                raise error from None
            if not self._engine.welcomed:
                raise self._engine.session_error()
            if started is not None:
                started.set_result(None)
            while self._engine.connected:
                await self._read_once(chan)
        finally:
            self._chan = None
            chan.send_now(self._engine.data_to_send())  # ACK what we read before it goes
            chan.close()
            self._pump()

    async def _handshake(self, chan: _Channel) -> None:
        while self._engine.phase is Phase.HANDSHAKE:
            await self._read_once(chan)

    async def _read_once(self, chan: _Channel) -> None:
        try:
            data, fds = await chan.receive()
        except OSError as exc:
            self._engine.connection_failed(lost_from_os_error(exc, "lost the container"))
            return
        self._engine.receive_data(data, fds)
        self._pump()
        await self._flush()

    async def _run(self, started: asyncio.Future[None]) -> None:
        """The first session (its errors go to ``open_parking``), then reconnects."""
        try:
            await self._session(started)
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
                return
            raise
        engine = self._engine
        try:
            while engine.phase is Phase.LOST:
                delay = engine.retry_delay(self._loop.time())
                if delay is None:
                    break
                await asyncio.sleep(delay)
                try:
                    await self._session(None)
                except ContainerTimeout:
                    continue
                except ConnparkError as exc:
                    engine.reconnect_failed(exc)
        finally:
            self._pump()
            self._wakes.put_nowait(_END)

    async def _close(self) -> None:
        untaken: list[Woken[Any]] = []
        while not self._wakes.empty():
            item = self._wakes.get_nowait()
            if isinstance(item, Woken):
                untaken.append(item)
        req = self._engine.begin_close(untaken, self._loop.create_future())

        async def hand_back() -> None:
            await self._flush()  # every wake anyone could take is ACKed first
            if req is not None:
                await req.waiter

        try:
            await asyncio.wait_for(hand_back(), CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            pass
        self._engine.finish_close()
        self._pump()


_background: set[asyncio.Task[None]] = set()


def _check_socket(sock: Any) -> None:
    if not isinstance(sock, socket.socket):
        raise TypeError(f"park() takes a socket.socket, not {type(sock).__name__}")


@asynccontextmanager
async def open_parking(
    path: str | os.PathLike[str],
    *,
    pool: str = "default",
    name: str = "",
    reconnect: bool = True,
    container_uid: int | None = None,
    connect_timeout: float = 10.0,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> AsyncIterator[AsyncioParking]:
    """Connect to the container at ``path`` as an asyncio worker of ``pool``.

    The same contract as ``connpark.open_parking`` (trio).
    """
    engine = Engine(
        pool,
        name or f"asyncio-{os.getpid()}",
        reconnect=reconnect,
        backoff=backoff,
        container_uid=container_uid,
        path=os.fspath(path),
    )
    parking = AsyncioParking(os.fspath(path), engine, connect_timeout)
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()
    runner = loop.create_task(parking._run(started))
    try:
        await started
        yield parking
        await parking._close()
    finally:
        engine.finish_close()
        runner.cancel()
        try:
            await runner
        except (asyncio.CancelledError, ConnparkError):
            pass
        while not parking._wakes.empty():
            item = parking._wakes.get_nowait()
            if isinstance(item, Woken) and item.socket is not None:
                item.socket.close()
        parking._wakes.put_nowait(_END)
