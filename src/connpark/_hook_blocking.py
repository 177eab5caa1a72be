"""``BlockingParking``: the hook for threaded servers, a thin adapter over the engine.

One background thread runs the session (connect, read, reconnect); any
thread may call the API. One lock guards the engine; a second orders the
writes, so frames leave in the order the engine produced them. Woken sockets
are stdlib sockets in blocking mode.
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

_END = object()
#: How long ``shutdown()`` waits for the re-park of wakes nobody took.
CLOSE_TIMEOUT = 5.0


class BlockingParking(HandleInfo):
    """A worker's parking handle for threaded code: ``with BlockingParking(path) as p:``.

    The first connection must succeed (``ContainerLost``, ``ContainerError``,
    ``ContainerTimeout`` otherwise); after that the hook reconnects by itself
    unless ``reconnect=False``, and gives up after ``backoff.give_up_after`` s.
    """

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
        self._path = os.fspath(path)
        self._engine = Engine(
            pool,
            name or f"threads-{os.getpid()}",
            reconnect=reconnect,
            backoff=backoff,
            container_uid=container_uid,
            path=self._path,
        )
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()  # the engine
        self._send_lock = threading.Lock()  # the order of writes
        self._chan: BlockingChannel | None = None
        self._wakes: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._stop = threading.Event()
        chan = self._connect()  # raises: nothing to clean up but the channel
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
            if isinstance(self._engine.error, ContainerLost):
                raise self._engine.error
            return None
        assert isinstance(item, Woken)
        return item

    def __iter__(self) -> Iterator[Woken[socket.socket]]:
        """Woken connections until the handle is closed."""
        while (woken := self.next_wake()) is not None:
            yield woken

    def unpark(self, *tickets: int, tag: str | bytes | None = None) -> None:
        """Ask for these connections (and those with ``tag``) back now (REQUESTED);
        gone tickets are ignored."""
        with self._lock:
            self._engine.unpark(tickets, tag)
        self._flush()

    def close(
        self, ticket: int | None = None, *, tag: str | bytes | None = None, goodbye: bytes = b""
    ) -> None:
        """Have the container write ``goodbye`` and close a parked connection (or all
        with ``tag``)."""
        with self._lock:
            self._engine.close_ticket(ticket, goodbye, tag)
        self._flush()

    def set_rules(
        self,
        set_id: int,
        rules: Sequence[Rule],
        *,
        pool_wide: bool = False,
        timeout: float | None = 10.0,
    ) -> None:
        """Register auto-response rules; ``park(..., rules=set_id)`` uses them (``Refused``)."""
        with self._lock:
            req = self._engine.set_rules(set_id, rules, threading.Event(), pool_wide=pool_wide)
        self._control(req, timeout)

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
        with self._lock:
            req = self._engine.send(data, threading.Event(), tickets=tickets, tag=tag)
        result = self._control(req, timeout)
        return SendResult(result.written, result.woken, result.missed)

    def _control(self, req: ControlRequest, timeout: float | None) -> Result:
        self._flush()
        self._wait(req, timeout)
        return req.outcome()

    def stats(self, timeout: float | None = 10.0) -> ContainerStats:
        """The container's statistics snapshot (``ContainerTimeout`` after ``timeout`` s)."""
        with self._lock:
            req = self._engine.stats(threading.Event())
        self._flush()
        self._wait(req, timeout)
        return req.outcome()

    def shutdown(self) -> None:
        """End the session: wakes nobody took go back to the container first."""
        if self._stop.is_set():
            return
        with self._lock:  # the reader queues wakes under it: none can slip past
            req = self._engine.begin_close(self._take_untaken(), threading.Event())
        self._flush()  # every wake anyone could take is ACKed before the socket goes
        if req is not None:
            req.waiter.wait(CLOSE_TIMEOUT)
        with self._lock:
            self._engine.finish_close()
            self._pump()
        self._stop.set()
        chan = self._chan
        if chan is not None:
            try:
                chan.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=10)
        for woken in self._take_untaken():  # none, unless the reader could not stop
            if woken.socket is not None:
                woken.socket.close()
        self._wakes.put(_END)

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
        with self._lock:
            req = self._engine.park(socks, entries, threading.Event())
            self._pump()
        self._flush()
        self._wait(req, timeout)
        return req.outcome()

    def _wait(self, req: Request, timeout: float | None) -> None:
        if not req.waiter.wait(timeout):
            with self._lock:
                self._engine.withdraw(req)
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
        with self._send_lock:
            with self._lock:
                frames = self._engine.data_to_send()
                chan = self._chan
            if not frames or chan is None:
                return
            try:
                chan.send_frames(frames)
            except OSError as exc:
                self._broken(exc)

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
            self._chan = None
            chan.close()
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

    def _run(self, chan: BlockingChannel) -> None:
        """The reader thread: serve sessions, reconnect, give up."""
        engine = self._engine
        try:
            while True:
                while engine.connected:
                    self._read_once(chan)
                self._flush()  # last words: ACK what we read before the socket goes
                with self._send_lock:
                    self._chan = None
                chan.close()
                if engine.phase is not Phase.LOST or self._stop.is_set():
                    return
                chan = self._reconnect()  # type: ignore[assignment]
                if chan is None:
                    return
        finally:
            with self._lock:
                self._pump()
            self._wakes.put(_END)

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
