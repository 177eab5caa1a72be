"""``open_parking``: the hook for trio workers, a thin adapter over the engine.

This module only does I/O and waiting: one task runs the session (connect,
read, reconnect), one writes what the engine has to send. Concurrent
``park()`` calls from many tasks meet in the engine's batch and go out as one
PARK request, because the writer lets them gather for one scheduling turn.
"""

from __future__ import annotations

import math
import os
import socket as _stdsocket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import trio

from ._errors import ConnparkError, ContainerLost, ContainerTimeout, ParkRefused, lost_from_os_error
from ._fdpass import TrioChannel
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
from ._trio_close import close_sockets
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
    Ready,
    Request,
    SendResult,
    Settled,
    Woke,
    Woken,
    make_park_entry,
    park_many_entries,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

TrioSocket = trio.socket.SocketType
Parkable: TypeAlias = TrioSocket | _stdsocket.socket | trio.SocketStream
#: How long leaving ``open_parking`` waits for the re-park of wakes nobody took.
CLOSE_TIMEOUT = 5.0


def _raw_socket(sock: Any) -> Any:
    if isinstance(sock, trio.SocketStream):
        return sock.socket
    if isinstance(sock, (TrioSocket, _stdsocket.socket)):
        return sock
    raise TypeError(f"park() takes a socket or trio.SocketStream, not {type(sock).__name__}")


class WakeStream:
    """Woken connections: ``async for``, ``receive()`` or ``receive_nowait()``.

    It goes on across reconnects. It ends when the parking is closed, and
    raises ``ContainerLost`` once the hook gave up reconnecting.
    """

    def __init__(self, parking: Parking) -> None:
        self._parking = parking

    def __aiter__(self) -> WakeStream:
        return self

    async def __anext__(self) -> Woken[TrioSocket]:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def receive(self) -> Woken[TrioSocket]:
        parking = self._parking
        try:
            woken = await parking._wake_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            parking._raise_if_gave_up()
            raise trio.EndOfChannel from None
        if parking._spread is not None:
            parking._spread.woke(woken.ticket)
        return woken

    def receive_nowait(self) -> Woken[TrioSocket]:
        """Raises ``trio.WouldBlock`` when none is waiting."""
        parking = self._parking
        try:
            woken = parking._wake_recv.receive_nowait()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            parking._raise_if_gave_up()
            raise trio.EndOfChannel from None
        if parking._spread is not None:
            parking._spread.woke(woken.ticket)
        return woken


class Parking(HandleInfo):
    """A worker's parking handle. Get one from ``open_parking``.

    Against a multi-shard container it keeps one session per shard: this
    handle is shard 0's, ``_shards`` lists every shard's (the others share our
    wake channel), and the public methods route each request (``_shards``).
    """

    def __init__(
        self,
        path: str,
        engine: Engine,
        connect_timeout: float,
        wakes: tuple[
            trio.MemorySendChannel[Woken[TrioSocket]], trio.MemoryReceiveChannel[Woken[TrioSocket]]
        ]
        | None = None,
    ) -> None:
        self._path = path
        self._engine = engine
        self._connect_timeout = connect_timeout
        self._chan: TrioChannel | None = None
        #: The scope the session's reads run in: a failed send moves its deadline
        #: in to bound the drain (``_broken``).
        self._read_scope: trio.CancelScope | None = None
        self._drain_deadline = math.inf
        self._write_needed = trio.Event()
        if wakes is None:
            wakes = trio.open_memory_channel[Woken[TrioSocket]](math.inf)
        self._wake_send: trio.MemorySendChannel[Woken[TrioSocket]] = wakes[0]
        self._wake_recv: trio.MemoryReceiveChannel[Woken[TrioSocket]] = wakes[1]
        #: Every shard's handle, by shard index (ours first); one unless sharded.
        self._shards: list[Parking] = [self]
        self._spread: Spread | None = None

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
        rules: int = 0,
        tags: Sequence[str | bytes] = (),
    ) -> int:
        """Give ``sock`` to the container; returns its ticket and closes your copy.

        On ``ParkRefused`` (or any error) the socket is still yours and usable.
        Cancelled while waiting, the socket is either still yours or, if the
        container took it, closed: check ``sock.fileno() == -1``.
        """
        raw = _raw_socket(sock)
        entry = make_park_entry(
            raw.fileno(),
            token=token,
            pending=pending,
            idle_timeout=idle_timeout,
            on_hangup=on_hangup,
            on_timeout=on_timeout,
            rules=rules,
            tags=tags,
        )
        (result,) = await self._park([raw], [entry])
        if isinstance(result, ParkRefused):
            raise result
        return result

    async def park_many(
        self,
        socks: Sequence[Parkable],
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
        sockets = (TrioSocket, _stdsocket.socket)  # as _raw_socket, sparing its ABC check
        raws = [s if isinstance(s, sockets) else _raw_socket(s) for s in socks]
        entries = park_many_entries(
            [r.fileno() for r in raws],
            tokens,
            pendings,
            idle_timeout=idle_timeout,
            on_hangup=on_hangup,
            on_timeout=on_timeout,
            rules=rules,
            tags=tags,
        )
        return await self._park(raws, entries)

    def wakes(self) -> WakeStream:
        """Woken connections; each ``woken.socket`` is a non-blocking trio socket, yours."""
        return WakeStream(self)

    async def unpark(self, *tickets: int, tag: str | bytes | None = None) -> None:
        """Ask for these parked connections (and those with ``tag``) back now (reason
        REQUESTED); gone ones are ignored."""
        for i, ts in by_shard(len(self._shards), tickets, tag):
            self._shards[i]._engine.unpark(ts, tag)
            self._shards[i]._flush_now()
        await trio.lowlevel.checkpoint()

    async def close(
        self, ticket: int | None = None, *, tag: str | bytes | None = None, goodbye: bytes = b""
    ) -> None:
        """Have the container close a parked connection (or all with ``tag``), writing
        ``goodbye`` first."""
        tickets = () if ticket is None else (ticket,)
        for i, ts in by_shard(len(self._shards), tickets, tag) or [(0, ())]:
            self._shards[i]._engine.close_ticket(ts[0] if ts else None, goodbye, tag)
            self._shards[i]._flush_now()
        await trio.lowlevel.checkpoint()

    async def set_rules(
        self, set_id: int, rules: Sequence[Rule], *, pool_wide: bool = False
    ) -> None:
        """Register auto-response rules; ``park(..., rules=set_id)`` uses them (``Refused``)."""
        for shard in self._shards:
            req = shard._engine.set_rules(set_id, rules, trio.Event(), pool_wide=pool_wide)
            await shard._control(req)

    async def send(
        self, data: bytes, *, tickets: Sequence[int] = (), tag: str | bytes | None = None
    ) -> SendResult:
        """Write ``data`` to parked connections without waking them; those whose socket
        does not take it all are woken (reason UNSENT, the rest in ``woken.unsent``)."""
        results = []
        for i, ts in send_targets(len(self._shards), data, tuple(tickets), tag):
            shard = self._shards[i]
            req = shard._engine.send(data, trio.Event(), tickets=ts, tag=tag)
            results.append(await shard._control(req))
        return merge_send(results)

    async def _control(self, req: ControlRequest) -> Result:
        self._write_needed.set()
        await self._wait(req)
        return req.outcome()

    async def stats(self) -> ContainerStats:
        """The container's statistics snapshot (totals over its shards, and each one's)."""
        parts = []
        for shard in self._shards:
            req = shard._engine.stats(trio.Event())
            shard._write_needed.set()
            await shard._wait(req)
            parts.append(req.outcome())
        return merge_stats(parts)

    # -- waiting ----------------------------------------------------------------------

    async def _park(self, socks: list[Any], entries: Sequence[Any]) -> list[int | ParkRefused]:
        if self._spread is None:
            return await self._park_here(socks, entries)
        plan = ParkPlan(self._spread, socks, entries)
        while step := plan.next(ready(s._engine for s in self._shards), trio.current_time()):
            i, some, theirs = step
            try:
                got = await self._shards[i]._park_here(list(some), theirs)
            except BaseException:
                self._spread.failed(i, trio.current_time())  # cancelled: not there next
                raise
            plan.answered(i, got, trio.current_time())
        return plan.outcome()

    async def _park_here(self, socks: list[Any], entries: Sequence[Any]) -> list[int | ParkRefused]:
        req = self._engine.park(socks, entries, trio.Event())
        self._pump()
        self._write_needed.set()
        await self._wait(req)
        return req.outcome()

    async def _wait(self, req: Request) -> None:
        try:
            await req.waiter.wait()
        except BaseException:
            self._engine.withdraw(req)  # cancelled: the engine keeps one owner
            if self._chan is not None:
                self._chan.hold_fds()  # the caller may close a socket not sent yet
            raise

    def _raise_if_gave_up(self) -> None:
        for shard in self._shards:
            if isinstance(shard._engine.error, ContainerLost):
                raise shard._engine.error

    # -- I/O ----------------------------------------------------------------------------

    def _pump(self) -> None:
        """Act on the engine's events: wake waiters, queue woken connections."""
        while (ev := self._engine.next_event()) is not None:
            if isinstance(ev, Settled):
                ev.request.waiter.set()
            elif isinstance(ev, Woke):
                send = self._wake_send.send_nowait
                for woken in ev.woken(trio.socket.from_stdlib_socket):
                    send(woken)
            elif isinstance(ev, Ready):
                self._write_needed.set()

    def _flush_now(self) -> None:
        """Send what the engine has without yielding, unless the writer is mid-send."""
        chan = self._chan
        if self._engine.send_broken:
            return
        if chan is None or chan.busy:
            self._write_needed.set()
            return
        try:
            chan.try_send_nowait(self._engine.data_to_send())
        except OSError as exc:
            self._broken(chan, exc)
            return
        if chan.flush_needed:
            self._write_needed.set()

    def _broken(self, chan: TrioChannel, exc: OSError) -> None:
        """A send failed: send nothing more, but let the reader take what the
        container wrote before it went (a PARKED there means it took sockets)
        until EOF, for ``DRAIN_TIMEOUT`` s at most."""
        if chan is not self._chan:
            return  # an earlier session's socket: that session is over
        self._engine.send_failed(lost_from_os_error(exc, "lost the container"))
        self._pump()
        self._drain_deadline = min(self._drain_deadline, trio.current_time() + DRAIN_TIMEOUT)
        if self._read_scope is not None:
            self._read_scope.deadline = min(self._read_scope.deadline, self._drain_deadline)

    async def _writer(self) -> None:
        while True:
            await self._write_needed.wait()
            self._write_needed = trio.Event()
            await trio.lowlevel.cancel_shielded_checkpoint()  # let sibling park() calls join
            chan = self._chan
            if chan is None or self._engine.send_broken:
                continue
            try:
                await chan.send_frames(self._engine.data_to_send())
            except OSError as exc:
                self._broken(chan, exc)
            except trio.ClosedResourceError:
                continue  # the session ended (and closed it) while we waited to write

    async def _session(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, handshake, then read until the session is lost."""
        try:
            chan = TrioChannel(connect_unix(self._path), own_fds=False)
        except OSError as exc:  # pragma: no cover - connect_unix translates its own
            raise lost_from_os_error(exc, f"cannot connect to {self._path}") from exc
        try:
            self._engine.start_session(peer_uid(chan.sock))
            self._drain_deadline = math.inf
            handshake = trio.CancelScope(deadline=trio.current_time() + self._connect_timeout)
            self._read_scope = handshake
            self._chan = chan
            self._flush_now()
            with handshake:
                while self._engine.phase is Phase.HANDSHAKE:
                    await self._read_once(chan)
            if handshake.cancelled_caught:
                if not self._engine.send_broken:
                    raise self._engine.handshake_timed_out(self._connect_timeout)
                self._drain_timed_out()
            if not self._engine.welcomed:
                raise self._engine.session_error()
            task_status.started()
            self._read_scope = reading = trio.CancelScope(deadline=self._drain_deadline)
            with reading:
                while self._engine.connected and not reading.cancel_called:
                    await self._read_once(chan)
            if self._engine.connected:
                self._drain_timed_out()
        finally:
            self._read_scope = None
            if self._engine.connected:
                # Torn down with the session up: a cancel scope around the handle
                # reached us before open_parking's finally. Leave as it would, while
                # the channel still tells what never left (else the parks out would
                # be "still yours" whether or not they reached the container).
                self._leave()
            self._chan = None
            await self._last_words(chan)
            chan.close()
            self._pump()

    def _drain_timed_out(self) -> None:
        """No EOF came within ``DRAIN_TIMEOUT`` of a failed send: the session is over."""
        self._engine.connection_failed(ContainerLost("lost the container"))

    async def _last_words(self, chan: TrioChannel) -> None:
        """ACK what we read before the socket goes (bounded, even when cancelled)."""
        frames = self._engine.data_to_send()
        if frames and not chan.closed:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1.0):
                try:
                    await chan.send_frames(frames)
                except OSError:
                    pass

    async def _read_once(self, chan: TrioChannel) -> None:
        try:
            data, fds = await chan.receive()
        except (OSError, trio.ClosedResourceError) as exc:
            if isinstance(exc, OSError):
                self._engine.connection_failed(lost_from_os_error(exc, "lost the container"))
            else:
                self._engine.connection_failed(ContainerLost("lost the container"))
            return
        self._engine.receive_data(data, fds)
        self._pump()
        self._flush_now()
        # Let consumers take this burst before we decode the next one.
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The first session (its errors go to ``open_parking``), then reconnects."""
        await self._session(task_status)
        await self._reconnects()

    async def _run_other(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Another shard's session: a first connect that fails is retried like a lost one."""
        try:
            await self._session(task_status)
        except ConnparkError as exc:
            self._engine.never_connected(exc)
            task_status.started()
        await self._reconnects()

    async def _reconnects(self) -> None:
        engine = self._engine
        while engine.phase is Phase.LOST:
            delay = engine.retry_delay(trio.current_time())
            if delay is None:
                break
            await trio.sleep(delay)
            try:
                await self._session()
            except ContainerTimeout:
                continue
            except ConnparkError as exc:
                engine.reconnect_failed(exc)
        self._pump()
        self._wake_send.close()

    async def _close(self) -> None:
        """Hand back what nobody took (each to its shard), wait for it (bounded).
        A session lost with something only a new one settles: first wait (bounded)
        for the reconnect (``await_session``)."""
        engines = [s._engine for s in self._shards]
        untaken = self._wake_recv.statistics().current_buffer_used > 0
        with trio.move_on_after(CLOSE_TIMEOUT):
            # (A poll: rare, bounded, over every shard's engine.)
            while await_session(engines, untaken):  # noqa: ASYNC110
                await trio.sleep(RECONNECT_POLL)
        reqs = self._begin_close()
        async with trio.open_nursery() as nursery:
            for shard, req in zip(self._shards, reqs, strict=True):
                nursery.start_soon(shard._close_here, req)

    def _begin_close(self) -> list[Request | None]:
        """Every shard's ``begin_close``, handing back what nobody took (a no-op once done)."""
        taken: list[Woken[Any]] = []
        while True:
            try:
                taken.append(self._wake_recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        return begin_close_all([s._engine for s in self._shards], taken, trio.Event)

    def _leave(self) -> None:
        """The handle goes without waiting (an exception in its block, a cancelled
        worker: no ``_close``): the wakes nobody took are handed back all the same,
        as far as each control socket takes them now (else they would be closed),
        then ``finish_close`` while the channels still tell what never left."""
        self._begin_close()
        for shard in self._shards:
            shard._flush_now()
            shard._engine.finish_close(shard._chan)
            shard._pump()

    async def _close_here(self, req: Request | None) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT):
            # Every wake anyone could take is ACKed before the socket goes.
            chan = self._chan
            if chan is not None and not self._engine.send_broken:
                try:
                    await chan.send_frames(self._engine.data_to_send())
                except OSError as exc:
                    self._broken(chan, exc)  # the reader drains, then ends the session
            if req is not None:
                await req.waiter.wait()
        self._engine.finish_close(self._chan)
        self._pump()


def _close_stream(parking: Parking) -> None:
    for shard in parking._shards:
        shard._wake_send.close()
    while True:
        try:
            w = parking._wake_recv.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
        if w.socket is not None:
            w.socket.close()
    parking._wake_recv.close()


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
) -> AsyncIterator[Parking]:
    """Connect to the container at ``path`` as a worker of ``pool``.

    The first connection must succeed: ``ContainerLost`` if nothing is there,
    ``ContainerError`` if the container will not have us (or we do not trust
    its uid), ``ContainerTimeout`` if it does not answer. After that the hook
    reconnects by itself (unless ``reconnect=False``) and gives up, with
    ``ContainerLost``, after ``backoff.give_up_after`` seconds without one.
    """

    engine = Engine(
        pool,
        name or f"trio-{os.getpid()}",
        reconnect=reconnect,
        backoff=backoff,
        container_uid=container_uid,
        path=os.fspath(path),
        closer=close_sockets,
    )
    parking = Parking(os.fspath(path), engine, connect_timeout)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(parking._writer)
            await nursery.start(parking._run)
            for other in other_shards(engine):  # one session per shard
                wakes = (parking._wake_send.clone(), parking._wake_recv)
                shard = Parking(other.path, other, connect_timeout, wakes)
                parking._shards.append(shard)
                nursery.start_soon(shard._writer)
                await nursery.start(shard._run_other)
            if len(parking._shards) > 1:
                parking._spread = Spread(len(parking._shards))
            try:
                yield parking
                await parking._close()
            finally:
                parking._leave()  # (after ``_close``: only the channels' last state)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Our tasks raise only before the session is up: one error, unwrap it.
        if len(group.exceptions) == 1:
            exc = group.exceptions[0]
            raise exc from exc.__cause__
        raise
    finally:
        for shard in parking._shards:
            shard._engine.finish_close(shard._chan)
        _close_stream(parking)


__all__ = ["Parking", "WakeStream", "open_parking"]
