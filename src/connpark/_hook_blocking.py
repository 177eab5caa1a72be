"""``BlockingParking``: the hook for threaded servers, a thin adapter over the engine.

One background thread runs the session (connect, read, reconnect); any
thread may call the API. One lock guards the engine; a second orders the
writes, so frames leave in the order the engine produced them. A caller sends
what the socket takes at once; a second thread sends the rest (a slow or
frozen container), so no call blocks on a full socket past its ``timeout``.
Woken sockets are stdlib sockets in blocking mode.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

from ._errors import ConnparkError, ContainerLost, ContainerTimeout, ParkRefused, lost_from_os_error
from ._fdpass import BlockingChannel, recv_fds, wait_readable_blocking
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

_END = object()
#: How long ``shutdown()`` waits for the re-park of wakes nobody took.
CLOSE_TIMEOUT = 5.0


class BlockingParking(HandleInfo):
    """A worker's parking handle for threaded code: ``with BlockingParking(path) as p:``.

    The first connection must succeed (``ContainerLost``, ``ContainerError``,
    ``ContainerTimeout`` otherwise); after that the hook reconnects by itself
    unless ``reconnect=False``, and gives up after ``backoff.give_up_after`` s.

    Against a multi-shard container it keeps one session per shard: this
    handle is shard 0's, ``_shards`` lists every shard's (the others share our
    wake queue), and the public methods route each request (``_shards``).
    """

    _spread: Spread | None

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        pool: str = "default",
        name: str = "",
        reconnect: bool = True,
        container_uid: int | None = None,
        connect_timeout: float = 10.0,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        engine = Engine(
            pool,
            name or f"threads-{os.getpid()}",
            reconnect=reconnect,
            backoff=backoff,
            container_uid=container_uid,
            path=os.fspath(path),
        )
        self._setup(os.fspath(path), engine, connect_timeout, queue.SimpleQueue())
        self._start()
        try:
            for other in other_shards(engine):  # one session per shard
                shard = BlockingParking.__new__(BlockingParking)
                shard._setup(other.path, other, connect_timeout, self._wakes, primary=False)
                shard._start(other=True)
                self._shards.append(shard)
        except BaseException:
            self.shutdown()
            raise
        if len(self._shards) > 1:
            self._spread = Spread(len(self._shards))

    @classmethod
    def _one_shard(
        cls, path: str | os.PathLike[str], *, pool: str, name: str, connect_timeout: float
    ) -> BlockingParking:
        """A handle on the shard at ``path`` only (a health check of that shard)."""
        self = cls.__new__(cls)
        engine = Engine(pool, name, reconnect=False, path=os.fspath(path))
        self._setup(os.fspath(path), engine, connect_timeout, queue.SimpleQueue())
        self._start()
        return self

    def _setup(
        self,
        path: str,
        engine: Engine,
        connect_timeout: float,
        wakes: queue.SimpleQueue[object],
        *,
        primary: bool = True,
    ) -> None:
        self._path = path
        self._engine = engine
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()  # the engine
        self._send_lock = threading.Lock()  # the order of writes
        #: Bytes are queued that the socket did not take: the writer thread sends them.
        self._write_needed = threading.Event()
        self._chan: BlockingChannel | None = None
        #: After a failed send: ends the reads of the session if no EOF does (under
        #: ``_send_lock``, as ``_chan``).
        self._drain_timer: threading.Timer | None = None
        self._wakes = wakes
        #: Shard 0's handle ends the shared wake queue; the other shards' do not.
        self._primary = primary
        self._stop = threading.Event()
        #: Every shard's handle, by shard index (ours first); one unless sharded.
        self._shards: list[BlockingParking] = [self]
        self._spread = None

    def _start(self, *, other: bool = False) -> None:
        """Connect, then read in a thread. For another shard, a first connect that
        fails is retried like a lost session (the first shard's failure raises)."""
        chan: BlockingChannel | None = None
        try:
            chan = self._connect()  # raises: nothing to clean up but the channel
        except ConnparkError as exc:
            if not other:
                raise
            with self._lock:
                self._engine.never_connected(exc)
        self._writer = threading.Thread(
            target=self._write_rest, name="connpark-writer", daemon=True
        )
        self._writer.start()
        self._reader = threading.Thread(
            target=self._run, args=(chan,), name="connpark-session", daemon=True
        )
        self._reader.start()

    # -- public API -------------------------------------------------------------

    def park(
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
        timeout: float | None = None,
    ) -> int:
        """Give ``sock`` to the container; returns its ticket and closes your copy.

        On ``ParkRefused`` (or any error) the socket is still yours. After
        ``timeout`` s: ``ContainerTimeout``, and the socket is either still
        yours or, if the container took it, closed (``sock.fileno() == -1``).
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
        (result,) = self._park([sock], [entry], timeout)
        if isinstance(result, ParkRefused):
            raise result
        return result

    def park_many(
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
        timeout: float | None = None,
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
        return self._park(list(socks), entries, timeout)

    def next_wake(self, timeout: float | None = None) -> Woken[socket.socket] | None:
        """The next woken connection; None after ``timeout`` s or once closed.

        Raises ``ContainerLost`` once the hook gave up reconnecting.
        """
        try:
            item = self._wakes.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END:
            self._wakes.put(_END)  # for every other waiting thread
            for shard in self._shards:
                if isinstance(shard._engine.error, ContainerLost):
                    raise shard._engine.error
            return None
        assert isinstance(item, Woken)
        if self._spread is not None:
            self._spread.woke(item.ticket)
        return item

    def __iter__(self) -> Iterator[Woken[socket.socket]]:
        """Woken connections until the handle is closed."""
        while (woken := self.next_wake()) is not None:
            yield woken

    def unpark(self, *tickets: int, tag: str | bytes | None = None) -> None:
        """Ask for these connections (and those with ``tag``) back now (REQUESTED);
        gone tickets are ignored."""
        for i, ts in by_shard(len(self._shards), tickets, tag):
            shard = self._shards[i]
            with shard._lock:
                shard._engine.unpark(ts, tag)
            shard._flush()

    def close(
        self, ticket: int | None = None, *, tag: str | bytes | None = None, goodbye: bytes = b""
    ) -> None:
        """Have the container write ``goodbye`` and close a parked connection (or all
        with ``tag``)."""
        tickets = () if ticket is None else (ticket,)
        for i, ts in by_shard(len(self._shards), tickets, tag) or [(0, ())]:
            shard = self._shards[i]
            with shard._lock:
                shard._engine.close_ticket(ts[0] if ts else None, goodbye, tag)
            shard._flush()

    def set_rules(
        self,
        set_id: int,
        rules: Sequence[Rule],
        *,
        pool_wide: bool = False,
        timeout: float | None = 10.0,
    ) -> None:
        """Register auto-response rules; ``park(..., rules=set_id)`` uses them (``Refused``)."""
        for shard in self._shards:
            with shard._lock:
                req = shard._engine.set_rules(set_id, rules, threading.Event(), pool_wide=pool_wide)
            shard._control(req, timeout)

    def send(
        self,
        data: bytes,
        *,
        tickets: Sequence[int] = (),
        tag: str | bytes | None = None,
        timeout: float | None = 10.0,
    ) -> SendResult:
        """Write ``data`` to parked connections without waking them; those whose socket
        does not take it all are woken (reason UNSENT, the rest in ``woken.unsent``)."""
        results = []
        for i, ts in send_targets(len(self._shards), data, tuple(tickets), tag):
            shard = self._shards[i]
            with shard._lock:
                req = shard._engine.send(data, threading.Event(), tickets=ts, tag=tag)
            results.append(shard._control(req, timeout))
        return merge_send(results)

    def _control(self, req: ControlRequest, timeout: float | None) -> Result:
        self._flush()
        self._wait(req, timeout)
        return req.outcome()

    def stats(self, timeout: float | None = 10.0) -> ContainerStats:
        """The container's statistics snapshot (``ContainerTimeout`` after ``timeout`` s):
        totals over its shards, and each one's."""
        parts = []
        for shard in self._shards:
            with shard._lock:
                req = shard._engine.stats(threading.Event())
            shard._flush()
            shard._wait(req, timeout)
            parts.append(req.outcome())
        return merge_stats(parts)

    def shutdown(self) -> None:
        """End the sessions: wakes nobody took go back to their shard first. A
        session lost with something only a new one settles: first wait (bounded)
        for the reconnect (``await_session``)."""
        if self._stop.is_set():
            return
        engines = [shard._engine for shard in self._shards]
        deadline = time.monotonic() + CLOSE_TIMEOUT
        locks = [shard._lock for shard in self._shards]
        while True:
            for lock in locks:  # the readers queue wakes under them: none can slip past
                lock.acquire()
            if time.monotonic() >= deadline or not await_session(engines, not self._wakes.empty()):
                break  # (locks held: the answer holds until begin_close_all)
            for lock in locks:
                lock.release()
            time.sleep(RECONNECT_POLL)
        try:
            reqs = begin_close_all(
                [s._engine for s in self._shards], self._take_untaken(), threading.Event
            )
        finally:
            for lock in locks:
                lock.release()
        for shard in self._shards:
            shard._flush()  # every wake anyone could take is ACKed before the socket goes
        deadline = time.monotonic() + CLOSE_TIMEOUT
        for shard in self._shards:
            shard._flush_until(deadline)
        for req in reqs:
            if req is not None:
                req.waiter.wait(max(0.0, deadline - time.monotonic()))
        for shard in self._shards:
            shard._end()
        for woken in self._take_untaken():  # none, unless a reader could not stop
            if woken.socket is not None:
                woken.socket.close()
        self._wakes.put(_END)

    def _end(self) -> None:
        # Under the send lock (as ``_drain_over``): ``_drop_chan`` cannot close the
        # channel meanwhile, nor a ``_flush`` queue frames behind ``finish_close``.
        with self._send_lock:
            chan = self._chan
            with self._lock:
                self._engine.finish_close(chan)
                self._pump()
            self._stop.set()
            self._write_needed.set()
            if chan is not None:
                try:
                    chan.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in (self._reader, self._writer):
            if threading.current_thread() is not thread:
                thread.join(timeout=10)

    def _flush_until(self, deadline: float) -> None:
        """Wait (up to ``deadline``) until what is queued went out: ``_end`` shuts the
        socket, and an ACK left in the queue would let the container give a wake
        someone took to a second worker."""
        chan = self._chan
        if chan is not None:
            self._send_all(chan, deadline)

    def _take_untaken(self) -> list[Woken[Any]]:
        untaken: list[Woken[Any]] = []
        while True:
            try:
                item = self._wakes.get_nowait()
            except queue.Empty:
                return untaken
            if isinstance(item, Woken):
                untaken.append(item)

    def __enter__(self) -> BlockingParking:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- waiting ----------------------------------------------------------------

    def _park(
        self, socks: list[Any], entries: list[Any], timeout: float | None
    ) -> list[int | ParkRefused]:
        if self._spread is None:
            return self._park_here(socks, entries, timeout)
        plan = ParkPlan(self._spread, socks, entries)
        while step := plan.next(ready(s._engine for s in self._shards), time.monotonic()):
            i, some, theirs = step
            try:
                got = self._shards[i]._park_here(list(some), theirs, timeout)
            except BaseException:
                self._spread.failed(i, time.monotonic())  # no answer in time: not there next
                raise
            plan.answered(i, got, time.monotonic())
        return plan.outcome()

    def _park_here(
        self, socks: list[Any], entries: Sequence[Any], timeout: float | None
    ) -> list[int | ParkRefused]:
        with self._lock:
            req = self._engine.park(socks, entries, threading.Event())
            self._pump()
        self._flush()
        self._wait(req, timeout)
        return req.outcome()

    def _wait(self, req: Request, timeout: float | None) -> None:
        if not req.waiter.wait(timeout):
            # Under the send lock: a ``_flush`` between taking the frames from the
            # engine and queueing them would have them miss ``hold_fds``.
            with self._send_lock:
                with self._lock:
                    self._engine.withdraw(req)  # the engine keeps one owner
                    chan = self._chan
                if chan is not None:
                    chan.hold_fds()  # the caller may close a socket not sent yet
            if not req.waiter.is_set():
                raise ContainerTimeout(f"no answer from the container within {timeout:g} s")

    # -- I/O ----------------------------------------------------------------------

    def _pump(self) -> None:
        """Under ``_lock``: act on the engine's events."""
        while (ev := self._engine.next_event()) is not None:
            if isinstance(ev, Settled):
                ev.request.waiter.set()
            elif isinstance(ev, Woke):
                for e in ev.entries:
                    sock = wrap_woken_fd(e)
                    if sock is not None:
                        sock.setblocking(True)
                    self._wakes.put(Woken.of(e, sock))

    def _flush(self) -> None:
        """Send what the engine has, as far as the socket takes it now; the writer
        thread sends the rest. Behind frames still queued the engine keeps it (as
        the trio hook's writer does): a park withdrawn there is the caller's again,
        never sent, and the queue stays one batch long against a frozen container."""
        with self._send_lock:
            chan = self._chan
            if chan is None:
                return
            if chan.flush_needed:
                self._write_needed.set()
                return
            with self._lock:
                frames = self._engine.data_to_send()
            if not frames:
                return
            try:
                chan.try_send(frames)
            except OSError as exc:
                self._send_broke(chan, exc)
                return
            if chan.flush_needed:
                self._write_needed.set()

    def _write_rest(self) -> None:
        """The writer thread: sends what the socket did not take at once, waiting
        for room as long as it takes (the callers' deadlines are their own), then
        what the engine gathered meanwhile."""
        while True:
            self._write_needed.wait()
            self._write_needed.clear()
            if self._stop.is_set():
                return
            chan = self._chan
            if chan is None:
                continue
            try:
                if not chan.flush(0.25):
                    self._write_needed.set()  # (looks at ``_stop`` again first)
                    continue
            except OSError as exc:
                with self._send_lock:
                    if chan is self._chan:  # else that session is over already
                        self._send_broke(chan, exc)
                continue
            self._flush()

    def _send_all(self, chan: BlockingChannel, deadline: float | None) -> None:
        """Send what is queued and what the engine has, waiting for room until
        ``deadline`` (None: as long as it takes; a shut socket ends the wait)."""
        while True:
            self._flush()
            if not chan.flush_needed:
                return
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                if not chan.flush(left):
                    return
            except OSError:
                return  # the container is gone (or the session ended): it reads nothing more

    def _send_broke(self, chan: BlockingChannel, exc: OSError) -> None:
        """Under ``_send_lock``: a send failed. Send nothing more, but let the reader
        take what the container wrote before it went (a PARKED there means it took
        sockets) until EOF; after ``DRAIN_TIMEOUT`` s a timer ends the reads."""
        with self._lock:
            self._engine.send_failed(lost_from_os_error(exc, "lost the container"))
            self._pump()
        if self._drain_timer is None:
            timer = threading.Timer(DRAIN_TIMEOUT, self._drain_over, args=(chan,))
            timer.daemon = True
            self._drain_timer = timer
            timer.start()

    def _drain_over(self, chan: BlockingChannel) -> None:
        """No EOF came in time after a failed send: the reader's recv sees EOF now."""
        with self._send_lock:
            if self._chan is chan:  # not closed yet: its fd is still its own
                try:
                    chan.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    def _drop_chan(self, chan: BlockingChannel) -> None:
        """The session is over: forget its channel (and drain timer), close it."""
        with self._send_lock:
            self._chan = None
            timer, self._drain_timer = self._drain_timer, None
        if timer is not None:
            timer.cancel()
        chan.close()

    def _broken(self, exc: OSError) -> None:
        with self._lock:
            self._engine.connection_failed(lost_from_os_error(exc, "lost the container"))
            self._pump()

    def _connect(self) -> BlockingChannel:
        """Connect and handshake; raises the reason it could not."""
        chan = BlockingChannel(connect_unix(self._path))
        try:
            with self._lock:
                self._engine.start_session(peer_uid(chan.sock))
            self._chan = chan
            self._flush()
            deadline = time.monotonic() + self._connect_timeout
            while self._engine.phase is Phase.HANDSHAKE:
                left = deadline - time.monotonic()
                if left <= 0 or not wait_readable_blocking(chan.sock, left):
                    with self._lock:
                        raise self._engine.handshake_timed_out(self._connect_timeout)
                self._read_once(chan)
            if not self._engine.welcomed:
                raise self._engine.session_error()
        except BaseException:
            self._drop_chan(chan)
            raise
        return chan

    def _read_once(self, chan: BlockingChannel) -> None:
        try:
            data, fds = recv_fds(chan.sock)
        except OSError as exc:
            self._broken(exc)
            return
        with self._lock:
            self._engine.receive_data(data, fds)
            self._pump()
        self._flush()

    def _run(self, chan: BlockingChannel | None) -> None:
        """The reader thread: serve sessions, reconnect, give up."""
        engine = self._engine
        try:
            if chan is None:  # another shard's first connect failed: as after a loss
                chan = self._reconnect()
                if chan is None:
                    return
            while True:
                while engine.connected:
                    self._read_once(chan)
                self._last_words(chan)
                self._drop_chan(chan)
                if engine.phase is not Phase.LOST or self._stop.is_set():
                    return
                chan = self._reconnect()
                if chan is None:
                    return
        finally:
            with self._lock:
                self._pump()
            if self._primary:
                self._wakes.put(_END)

    def _last_words(self, chan: BlockingChannel) -> None:
        """Before the socket goes: ACK what we read, however long the container
        takes to read it (a wake we read but never ACKed could go to a second
        worker); ``_end``'s shutdown of the socket ends the wait."""
        self._send_all(chan, None)

    def _reconnect(self) -> BlockingChannel | None:
        engine = self._engine
        while True:
            with self._lock:
                delay = engine.retry_delay(time.monotonic())
                if delay is None:
                    self._pump()
                    return None
            if self._stop.wait(delay):
                return None
            try:
                return self._connect()
            except ContainerTimeout:
                continue
            except ConnparkError as exc:
                with self._lock:
                    engine.reconnect_failed(exc)
                    self._pump()


def _check_socket(sock: Any) -> None:
    if not isinstance(sock, socket.socket):
        raise TypeError(f"park() takes a socket.socket, not {type(sock).__name__}")
