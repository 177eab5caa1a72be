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
from ._shards import (
    RECONNECT_POLL,
    ParkPlan,
    Spread,
    await_session,
    begin_close_all,
    by_shard,
    merge_send,
    other_shards,
    ready,
    send_targets,
)
from ._stats import ContainerStats, merge_stats
from ._unixsock import connect_unix, peer_uid
from ._wire import Result, Rule
from ._worker import (
    DEFAULT_BACKOFF,
    DRAIN_TIMEOUT,
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
        #: The reader's readiness wait, and the bound on reading (``stop_reading_after``).
        self._reading: asyncio.Future[None] | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._read_over = False
        #: Readiness waits under way: ``close`` ends them.
        self._waits: set[asyncio.Future[None]] = set()
        self.closed = False

    async def wait(self, writable: bool) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        if not writable:
            self._reading = fut
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
        self._waits.add(fut)
        try:
            await fut
        finally:
            self._waits.discard(fut)
            if not self.closed:  # (else ``close`` did: the number may name another socket now)
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

    @property
    def flush_needed(self) -> bool:
        """Bytes are queued that no send is taking (its caller was cancelled)."""
        return bool(self._outbox) and not self._lock.locked()

    @property
    def sending(self) -> bool:
        """A ``send_frames`` is under way (waiting for room, maybe)."""
        return self._lock.locked()

    def hold_fds(self) -> None:
        """Hold copies of the queued fds: their owners may close them now."""
        self._outbox.hold_fds()

    def stop_sending(self) -> list[int]:
        """The socket closes now: the fds no peer takes in (``Outbox.stop_sending``)."""
        return self._outbox.stop_sending()

    def stop_reading_after(self, seconds: float) -> None:
        """Bound the reads from now (a failed send's drain): ``receive`` raises
        TimeoutError once ``seconds`` have passed without EOF."""
        if self._drain_timer is None:
            self._drain_timer = self._loop.call_later(seconds, self._stop_reading)

    def _stop_reading(self) -> None:
        self._read_over = True
        if self._reading is not None and not self._reading.done():
            self._reading.set_result(None)

    async def receive(self) -> tuple[bytes, list[int]]:
        while True:
            if self._read_over:
                raise TimeoutError("no end of the session after a failed send")
            try:
                return recv_fds(self.sock)
            except BlockingIOError:
                await self.wait(writable=False)

    def close(self) -> None:
        """Close the socket, and first stop the loop watching it: a wait still under
        way (a send to a frozen container) would otherwise leave the loop watching a
        number the next socket may get (whose own watch then fails)."""
        if self.closed:
            return
        self.closed = True
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        fd = self.sock.fileno()
        if fd >= 0:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        for fut in self._waits:
            if not fut.done():
                fut.set_result(None)  # its send or receive then fails on the closed socket
        self.sock.close()
        self._outbox.close()


class AsyncioParking(HandleInfo):
    """A worker's parking handle for asyncio. Get one from ``connpark.aio.open_parking``.

    Against a multi-shard container it keeps one session per shard: this
    handle is shard 0's, ``_shards`` lists every shard's (the others share our
    wake queue), and the public methods route each request (``_shards``).
    """

    def __init__(
        self,
        path: str,
        engine: Engine,
        connect_timeout: float,
        wakes: asyncio.Queue[object] | None = None,
    ) -> None:
        self._path = path
        self._engine = engine
        self._connect_timeout = connect_timeout
        self._loop = asyncio.get_running_loop()
        self._chan: _Channel | None = None
        #: Shard 0's handle ends the shared wake queue; the other shards' do not.
        self._primary = wakes is None
        self._wakes: asyncio.Queue[object] = asyncio.Queue() if wakes is None else wakes
        self._flush_scheduled = False
        #: Every shard's handle, by shard index (ours first); one unless sharded.
        self._shards: list[AsyncioParking] = [self]
        self._spread: Spread | None = None

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
                for shard in self._shards:
                    if isinstance(shard._engine.error, ContainerLost):
                        raise shard._engine.error
                return
            assert isinstance(item, Woken)
            if self._spread is not None:
                self._spread.woke(item.ticket)
            yield item

    async def unpark(self, *tickets: int, tag: str | bytes | None = None) -> None:
        """Ask for these connections (and those with ``tag``) back now (REQUESTED);
        gone tickets are ignored."""
        for i, ts in by_shard(len(self._shards), tickets, tag):
            self._shards[i]._engine.unpark(ts, tag)
            await self._shards[i]._flush()

    async def close(
        self, ticket: int | None = None, *, tag: str | bytes | None = None, goodbye: bytes = b""
    ) -> None:
        """Have the container write ``goodbye`` and close a parked connection (or all
        with ``tag``)."""
        tickets = () if ticket is None else (ticket,)
        for i, ts in by_shard(len(self._shards), tickets, tag) or [(0, ())]:
            self._shards[i]._engine.close_ticket(ts[0] if ts else None, goodbye, tag)
            await self._shards[i]._flush()

    async def set_rules(
        self, set_id: int, rules: Sequence[Rule], *, pool_wide: bool = False
    ) -> None:
        """Register auto-response rules; ``park(..., rules=set_id)`` uses them (``Refused``)."""
        for shard in self._shards:
            req = shard._engine.set_rules(
                set_id, rules, self._loop.create_future(), pool_wide=pool_wide
            )
            await shard._control(req)

    async def send(
        self, data: bytes, *, tickets: Sequence[int] = (), tag: str | bytes | None = None
    ) -> SendResult:
        """Write ``data`` to parked connections without waking them; those whose socket
        does not take it all are woken (reason UNSENT, the rest in ``woken.unsent``)."""
        results = []
        for i, ts in send_targets(len(self._shards), data, tuple(tickets), tag):
            shard = self._shards[i]
            req = shard._engine.send(data, self._loop.create_future(), tickets=ts, tag=tag)
            results.append(await shard._control(req))
        return merge_send(results)

    async def _control(self, req: ControlRequest) -> Result:
        self._schedule_flush()
        await self._wait(req)
        return req.outcome()

    async def stats(self) -> ContainerStats:
        """The container's statistics snapshot (totals over its shards, and each one's)."""
        parts = []
        for shard in self._shards:
            req = shard._engine.stats(self._loop.create_future())
            shard._schedule_flush()
            await shard._wait(req)
            parts.append(req.outcome())
        return merge_stats(parts)

    # -- waiting ----------------------------------------------------------------

    async def _park(self, socks: list[Any], entries: list[Any]) -> list[int | ParkRefused]:
        if self._spread is None:
            return await self._park_here(socks, entries)
        plan = ParkPlan(self._spread, socks, entries)
        while step := plan.next(ready(s._engine for s in self._shards), self._loop.time()):
            i, some, theirs = step
            try:
                got = await self._shards[i]._park_here(list(some), theirs)
            except BaseException:
                self._spread.failed(i, self._loop.time())  # cancelled: not there next
                raise
            plan.answered(i, got, self._loop.time())
        return plan.outcome()

    async def _park_here(self, socks: list[Any], entries: Sequence[Any]) -> list[int | ParkRefused]:
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
            if self._chan is not None:
                self._chan.hold_fds()  # the caller may close a socket not sent yet
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
        """Send what the engine has. While a send waits for room (a slow or frozen
        container) the engine keeps what comes meanwhile, and that send takes it
        next: a park withdrawn there is the caller's again, never sent."""
        chan = self._chan
        if chan is None or chan.sending:
            return
        engine = self._engine
        while (frames := engine.data_to_send()) or (
            chan.flush_needed and engine.connected and not engine.send_broken
        ):
            try:
                await chan.send_frames(frames)
            except asyncio.CancelledError:
                # Our caller's deadline (``unpark``, ``close``): the flushes that came
                # meanwhile left their frames to us, so another sends them, and ours.
                self._schedule_flush()
                raise
            except OSError as exc:
                if chan is not self._chan:
                    return  # an earlier session's socket: that session is over
                # Send nothing more, but read what the container wrote before it went
                # (a PARKED there means it took sockets) until EOF, bounded.
                self._engine.send_failed(lost_from_os_error(exc, "lost the container"))
                self._pump()
                chan.stop_reading_after(DRAIN_TIMEOUT)
                return
            if chan is not self._chan:
                return

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
            if self._engine.connected:
                # Torn down with the session up: cancelled with the task that holds
                # the handle (asyncio.run cancels what is left, all at once), before
                # open_parking's finally. Leave as it would, while the channel still
                # tells what never left (else the parks out would be "still yours"
                # whether or not they reached the container).
                self._leave()
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

    async def _run(self, started: asyncio.Future[None], *, other: bool = False) -> None:
        """The first session (its errors go to ``open_parking``; for another shard,
        a first connect that fails is retried like a lost one), then reconnects."""
        try:
            await self._session(started)
        except ConnparkError as exc:
            if not other or started.done():
                if not started.done():
                    started.set_exception(exc)
                    return
                raise
            self._engine.never_connected(exc)
            started.set_result(None)
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
            if self._primary:
                self._wakes.put_nowait(_END)

    async def _close(self) -> None:
        """Hand back what nobody took (each to its shard), wait for it (bounded).
        A session lost with something only a new one settles: first wait (bounded)
        for the reconnect (``await_session``)."""
        engines = [s._engine for s in self._shards]
        deadline = self._loop.time() + CLOSE_TIMEOUT
        # (A poll: rare, bounded, over every shard's engine.)
        while await_session(engines, not self._wakes.empty()) and self._loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(RECONNECT_POLL)
        reqs = self._begin_close()
        await asyncio.gather(
            *(shard._close_here(req) for shard, req in zip(self._shards, reqs, strict=True))
        )

    def _begin_close(self) -> list[Request | None]:
        """Every shard's ``begin_close``, handing back what nobody took (a no-op once done)."""
        taken: list[Woken[Any]] = []
        while not self._wakes.empty():
            item = self._wakes.get_nowait()
            if isinstance(item, Woken):
                taken.append(item)
        return begin_close_all([s._engine for s in self._shards], taken, self._loop.create_future)

    def _leave(self) -> None:
        """The handle goes without waiting (an exception in its block, a cancelled
        task: no ``_close``): the wakes nobody took are handed back all the same,
        as far as each control socket takes them now (else they would be closed),
        then ``finish_close`` while the channels still tell what never left."""
        self._begin_close()
        for shard in self._shards:
            if shard._chan is not None:
                shard._chan.send_now(shard._engine.data_to_send())
            shard._engine.finish_close(shard._chan)
            shard._pump()

    async def _close_here(self, req: Request | None) -> None:
        async def hand_back() -> None:
            await self._flush()  # every wake anyone could take is ACKed first
            if req is not None:
                await req.waiter

        try:
            await asyncio.wait_for(hand_back(), CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            pass
        self._engine.finish_close(self._chan)
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
    runners: list[asyncio.Task[None]] = []

    async def start(shard: AsyncioParking, other: bool = False) -> None:
        started: asyncio.Future[None] = loop.create_future()
        runners.append(loop.create_task(shard._run(started, other=other)))
        await started

    try:
        await start(parking)
        for other in other_shards(engine):  # one session per shard
            shard = AsyncioParking(other.path, other, connect_timeout, parking._wakes)
            parking._shards.append(shard)
            await start(shard, other=True)
        if len(parking._shards) > 1:
            parking._spread = Spread(len(parking._shards))
        yield parking
        await parking._close()
    finally:
        parking._leave()  # (after ``_close``: only the channels' last state)
        for runner in runners:
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
