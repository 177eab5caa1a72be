"""``BlockingParking``: the hook for threaded servers (any thread, thread-safe).

One background thread reads the session: it resolves ``park()`` calls, ACKs
each WAKE as soon as its fds arrive, and queues the woken connections for
``next_wake()``. Woken sockets are stdlib sockets in blocking mode.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Iterator
from types import TracebackType

from ._errors import ConnparkError, ContainerError, ParkingClosed
from ._fdpass import BlockingChannel
from ._stats import ContainerStats
from ._unixsock import connect_unix
from ._wire import Frame, Parked, ParkResult, Refusal, StatsReply, Wake
from ._worker import (
    ParkTracker,
    Policy,
    Woken,
    WorkerProtocol,
    make_park_entry,
    refusal_error,
    wrap_woken_fd,
)

_END = object()


class _Waiter:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: ParkResult | bytes | None = None
        self.error: ConnparkError | None = None

    def wait(self) -> ParkResult | bytes:
        self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class BlockingParking:
    """A worker session for threaded code: ``with BlockingParking(path) as parking: ...``."""

    def __init__(
        self, path: str | os.PathLike[str], *, pool: str = "default", name: str = ""
    ) -> None:
        self._proto = WorkerProtocol(pool, name or f"threads-{os.getpid()}")
        self._chan = BlockingChannel(connect_unix(path))
        try:
            self._chan.send_frames(self._proto.hello())
            welcome = self._proto.handshake(self._chan.receive_message(self._proto.decoder, 10))
        except BaseException:
            self._proto.decoder.close()
            self._chan.close()
            raise
        self.session_id = welcome.session_id
        self.max_token = welcome.max_token
        self.max_pending = welcome.max_pending
        self._lock = threading.Lock()  # guards the trackers and _closed
        self._parks: ParkTracker[_Waiter] = ParkTracker()
        self._stats: list[_Waiter] = []
        self._wakes: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed: ConnparkError | None = None
        self._reader = threading.Thread(target=self._read, name="connpark-reader", daemon=True)
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
    ) -> int:
        """Give ``sock`` to the container; returns its ticket and closes your copy.

        On ``ParkRefused`` (or any error) the socket is still yours and usable.
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
        waiter = _Waiter()
        with self._lock:
            self._check_open()
            request_id, frames = self._proto.park([entry])
            self._parks.add(request_id, [waiter])
        self._send(frames)
        result = waiter.wait()
        assert isinstance(result, ParkResult)
        if result.refusal is not Refusal.OK:
            raise refusal_error(result)
        sock.close()
        return result.ticket

    def next_wake(self, timeout: float | None = None) -> Woken[socket.socket] | None:
        """The next woken connection; None after ``timeout`` seconds or once closed."""
        try:
            item = self._wakes.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END:
            self._wakes.put(_END)  # for every other waiting thread
            return None
        assert isinstance(item, Woken)
        return item

    def __iter__(self) -> Iterator[Woken[socket.socket]]:
        """Woken connections until the session ends."""
        while (woken := self.next_wake()) is not None:
            yield woken

    def unpark(self, *tickets: int) -> None:
        """Ask for these connections back now (REQUESTED); gone tickets are ignored."""
        self._send(self._proto.unpark(tickets))

    def close(self, ticket: int, *, goodbye: bytes = b"") -> None:
        """Have the container write ``goodbye`` and close a parked connection."""
        self._send(self._proto.close([(ticket, goodbye)]))

    def stats(self) -> ContainerStats:
        waiter = _Waiter()
        with self._lock:
            self._check_open()
            self._stats.append(waiter)
        self._send(self._proto.stats())
        body = waiter.wait()
        assert isinstance(body, bytes)
        return ContainerStats.from_json(body)

    def shutdown(self) -> None:
        """End the session; woken connections nobody took are closed."""
        self._fail(ParkingClosed("the parking session is closed"))
        try:
            self._chan.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=10)
        while True:
            try:
                item = self._wakes.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Woken) and item.socket is not None:
                item.socket.close()
        self._wakes.put(_END)
        self._chan.close()

    def __enter__(self) -> BlockingParking:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- internals ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed

    def _send(self, frames: list[Frame]) -> None:
        self._check_open()
        try:
            self._chan.send_frames(frames)
        except OSError as exc:
            error = ContainerError(f"lost the container: {exc}")
            self._fail(error)
            raise error from exc

    def _read(self) -> None:
        try:
            while True:
                msg = self._chan.receive_message(self._proto.decoder)
                if msg is None:
                    raise ContainerError("the container closed the session")
                self._proto.check(msg)
                if isinstance(msg, Parked):
                    with self._lock:
                        done = self._parks.resolve(msg)
                    for waiter, result in done:
                        waiter.result = result
                        waiter.done.set()
                elif isinstance(msg, Wake):
                    self._on_wake(msg)
                elif isinstance(msg, StatsReply):
                    with self._lock:
                        asker = self._stats.pop(0) if self._stats else None
                    if asker is not None:
                        asker.result = msg.body
                        asker.done.set()
        except ConnparkError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(ContainerError(f"lost the container: {exc}"))
        finally:
            self._proto.decoder.close()
            self._wakes.put(_END)

    def _on_wake(self, msg: Wake) -> None:
        for e in msg.entries:
            sock = wrap_woken_fd(e)
            if sock is not None:
                sock.setblocking(True)
            self._wakes.put(Woken(e.ticket, e.reason, e.token, e.pending, sock))
        self._chan.send_frames(self._proto.ack(e.ticket for e in msg.entries))

    def _fail(self, exc: ConnparkError) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = exc
            waiters = self._parks.drain() + self._stats
            self._stats = []
            closed = self._closed
        for waiter in waiters:
            waiter.error = closed
            waiter.done.set()
