"""The container: a trio daemon holding parked connections for worker sessions.

Tasks: one accept loop, one watcher loop (waits on the single epoll/kqueue
fd and drains events in batches), one timer (idle deadlines and orphans),
and per session one reader and one writer. The reader never blocks on a
send and the watcher never touches a session's socket: wakes are put in the
session's queue and its writer sends them, batched, so one slow worker
cannot stall anybody else.

fd ownership: every fd that arrives is parked (and counted in
``_held``), or closed before the PARKED reply goes out. A parked fd is
unregistered from the watcher before it is closed or handed back.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import resource
import socket
from collections import Counter, deque
from typing import Any

import trio

from ._config import ContainerConfig
from ._errors import ProtocolError, RemoteProtocolError
from ._fdpass import TrioChannel
from ._lot import HANGUP_RETURNS, INET6, TIMEOUT_RETURNS, Lot, SessionState, Slot, State
from ._stats import ContainerStats, LatencySummary
from ._unixsock import listen_unix, peer_uid
from ._watcher import ERR, HUP, make_watcher
from ._wire import (
    MAX_FDS_PER_FRAME,
    SUPPORTED_VERSIONS,
    Ack,
    Close,
    Decoder,
    Error,
    ErrorCode,
    Frame,
    Hello,
    Message,
    Park,
    Parked,
    ParkEntry,
    ParkResult,
    Reason,
    Refusal,
    Stats,
    StatsReply,
    Unpark,
    Wake,
    WakeEntry,
    Welcome,
    close_fds,
    encode,
    encode_all,
    message_fds,
)

LOGGER = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT = 10.0


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


def count_open_fds() -> int:
    for d in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(d)) - 1  # minus the listdir's own fd
        except OSError:
            continue
    return 32


#: Wrapping a borrowed fd as a non-blocking socket object skips the
#: setblocking() a process-wide socket.setdefaulttimeout() would otherwise do
#: to it: O_NONBLOCK lives on the open file, shared with the worker.
_BORROWED = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
_SO_DOMAIN: int | None = getattr(socket, "SO_DOMAIN", None)


def _borrow(fd: int, family: int = socket.AF_INET) -> socket.socket:
    return socket.socket(family, _BORROWED, 0, fileno=fd)


def check_tcp_stream(fd: int) -> tuple[Refusal, int]:
    """(OK, family) for a connected AF_INET/AF_INET6 stream socket; never changes its flags."""
    sock = _borrow(fd)
    try:
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM:
                return Refusal.NOT_A_TCP_STREAM, 0
            if _SO_DOMAIN is not None:
                family = sock.getsockopt(socket.SOL_SOCKET, _SO_DOMAIN)
                if family not in (socket.AF_INET, socket.AF_INET6):
                    return Refusal.NOT_A_TCP_STREAM, 0
        except OSError:  # ENOTSOCK: a file, a pipe...
            return Refusal.NOT_A_TCP_STREAM, 0
        try:
            addr = sock.getpeername()
        except OSError:  # ENOTCONN: listening, or never connected
            return Refusal.NOT_CONNECTED, 0
        # The socket module decodes the address by the kernel's sa_family: a
        # (host, port) pair is IPv4, a 4-tuple IPv6 (and where SO_DOMAIN is
        # missing, this is the family check).
        if isinstance(addr, tuple) and isinstance(addr[0], str):
            if len(addr) == 2:
                return Refusal.OK, socket.AF_INET
            if len(addr) == 4:
                return Refusal.OK, socket.AF_INET6
        return Refusal.NOT_A_TCP_STREAM, 0
    finally:
        sock.detach()


def peek_has_data(fd: int) -> bool:
    """True if bytes wait unread (a half-closed peer with data is READABLE, not HANGUP)."""
    sock = _borrow(fd)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False
    except OSError:
        return False
    finally:
        sock.detach()


def send_goodbye(fd: int, data: bytes) -> None:
    """Best effort, never blocking and never touching O_NONBLOCK (shared with the worker)."""
    if not data:
        return
    sock = _borrow(fd)
    try:
        sock.send(data, socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0))
    except OSError as exc:
        LOGGER.debug("goodbye not written: %s", exc)
    finally:
        sock.detach()


class _Session(SessionState):
    __slots__ = ("chan", "replies", "wakeup", "writer_scope")

    def __init__(self, session_id: int, pool: Any, name: str, chan: TrioChannel) -> None:
        super().__init__(session_id, pool, name)
        self.chan = chan
        self.replies: list[Message] = []
        self.wakeup = trio.Event()
        self.writer_scope = trio.CancelScope()


class Container:
    """One running container. Start it with ``run`` (or ``connpark.serve``)."""

    def __init__(self, config: ContainerConfig) -> None:
        self.config = config
        self.lot = Lot(window=config.window, orphan_timeout=config.orphan_timeout)
        self.watcher = make_watcher()
        self._sessions: dict[int, _Session] = {}
        self._next_session = 1
        self._refused: Counter[str] = Counter()
        self._latencies: deque[float] = deque(maxlen=4096)
        self._parks_total = 0
        self._acks_total = 0
        self._closed_total = 0
        self._protocol_errors = 0
        self._held = 0
        self._fd_limit = raise_nofile_limit()
        self._fd_base = count_open_fds()
        self._started = 0.0
        self._shutting_down = False
        #: Sessions are being cancelled: nothing is re-routed or sent any more.
        self._tearing_down = False
        self._shutdown_requested = trio.Event()
        self._drain_scope = trio.CancelScope()
        self._progress = trio.Event()
        self._timer_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    # -- lifecycle ---------------------------------------------------------------

    def request_shutdown(self) -> None:
        """Stop taking parks, wake everything with SHUTDOWN, wait for ACKs, return from run.

        A second request while draining stops waiting for ACKs at once.
        """
        if self._shutdown_requested.is_set():
            self._drain_scope.cancel()
        self._shutdown_requested.set()

    async def run(
        self, *, task_status: trio.TaskStatus[Container] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listener = listen_unix(self.config.path, mode=self.config.socket_mode)
        listener.setblocking(False)
        self._started = trio.current_time()
        LOGGER.info(
            "container listening on %s (fd budget %d, idle timeout %gs)",
            self.config.path,
            self.fd_budget,
            self.config.idle_timeout,
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._accept_loop, listener)
                nursery.start_soon(self._watch_loop)
                nursery.start_soon(self._timer_loop)
                task_status.started(self)
                await self._shutdown_requested.wait()
                await self._drain()
                self._tearing_down = True
                nursery.cancel_scope.cancel()
        finally:
            self._tearing_down = True
            trio.lowlevel.notify_closing(listener)
            listener.close()
            try:
                os.unlink(self.config.path)
            except OSError:
                pass
            for session in list(self._sessions.values()):
                session.chan.close()
            if self.lot.queued or self.lot.sent:
                LOGGER.warning(
                    "closing %d woken connections no worker took", self.lot.queued + self.lot.sent
                )
            self._close_everything()
            self.watcher.close()
            LOGGER.info("container stopped")

    async def _drain(self) -> None:
        self._shutting_down = True
        now = trio.current_time()
        parked = self.lot.parked_slots()
        LOGGER.info("shutting down: waking %d parked connections", len(parked))
        for slot in parked:
            self._wake(slot, Reason.SHUTDOWN, now)
        self._flush()
        with self._drain_scope as scope:
            scope.deadline = trio.current_time() + self.config.shutdown_grace
            while self._undelivered():
                await self._progress.wait()
        if scope.cancelled_caught:
            LOGGER.warning(
                "shutdown grace over: %d wakes never ACKed, closing them",
                self.lot.queued + self.lot.sent,
            )

    def _undelivered(self) -> bool:
        """Wakes still on their way to a live session (orphans cannot progress: skip them)."""
        if self.lot.sent:
            return True
        return any(p.waiting and p.sessions for p in self.lot.pools.values())

    def _close_everything(self) -> None:
        for slot in self.lot.slots():
            if slot.state is State.PARKED:
                self.watcher.unregister(slot.fd)
            self._close_slot(slot)

    # -- fd accounting -------------------------------------------------------------

    @property
    def fd_budget(self) -> int:
        """How many connection fds we hold at most: the limit less a reserve for sessions."""
        return max(0, self._fd_limit - self._fd_base - self.config.fd_reserve - len(self._sessions))

    def _close_slot(self, slot: Slot) -> None:
        """Close the container's copy (if any) and drop the slot."""
        if slot.fd >= 0:
            os.close(slot.fd)
            self._held -= 1
        self.lot.remove(slot)
        self._poke_progress()

    def _poke_progress(self) -> None:
        """Tell the shutdown drain that wakes were ACKed (nobody waits otherwise)."""
        if self._shutting_down:
            self._progress.set()
            self._progress = trio.Event()

    # -- the watcher and the timer ---------------------------------------------------

    async def _watch_loop(self) -> None:
        fileno = self.watcher.fileno()
        while True:
            await trio.lowlevel.wait_readable(fileno)
            # Drain in rounds of one WAKE message's worth, sending each round
            # before polling again: the first wakes of a burst go out first.
            while True:
                now = trio.current_time()
                events = self.watcher.poll(MAX_FDS_PER_FRAME)
                for fd, bits in events:
                    slot = self.lot.by_fd(fd)
                    if slot is None or slot.state is not State.PARKED:
                        continue
                    if bits & ERR:
                        reason = Reason.HANGUP
                    elif bits & HUP:
                        reason = Reason.READABLE if peek_has_data(fd) else Reason.HANGUP
                    else:
                        reason = Reason.READABLE
                    self._wake(slot, reason, now)
                self._flush()
                if len(events) < MAX_FDS_PER_FRAME:
                    break
                await trio.lowlevel.checkpoint()  # a mass wake must not starve the rest

    def _wake(self, slot: Slot, reason: Reason, now: float, to: _Session | None = None) -> None:
        """Take a PARKED slot out of the watcher and send it on its way."""
        self.watcher.unregister(slot.fd)
        if reason is not Reason.SHUTDOWN and not slot.returns_fd(reason):
            os.close(slot.fd)
            self._held -= 1
            self.lot.forget_fd(slot)
        self.lot.wake(slot, reason, now, to=to)

    async def _timer_loop(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._next_timer()) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            for slot in self.lot.expired(now):
                self._wake(slot, Reason.TIMEOUT, now)
            for slot in self.lot.orphans(now):
                LOGGER.warning(
                    "ticket %#x: no session of pool %r came in %gs; closing the connection",
                    slot.ticket,
                    slot.pool.name,
                    self.config.orphan_timeout,
                )
                self._close_slot(slot)
                self.lot.orphans_closed += 1
            self._flush()

    def _next_timer(self) -> float:
        times = [t for t in (self.lot.next_deadline(), self.lot.next_orphan_deadline()) if t]
        return min(times) if times else math.inf

    def _flush(self) -> None:
        """Send sessions their new output (or wake their writers); re-aim the timer."""
        if self._tearing_down:
            return  # a dying session's wakes must not bounce to one dying next
        dirty = list(self.lot.dirty)
        self.lot.dirty.clear()
        for session in dirty:
            self._write_now(session)  # type: ignore[arg-type]
        if self._timer_scope is not None:
            nxt = self._next_timer()
            if nxt < self._timer_scope.deadline:
                self._timer_scope.deadline = nxt

    # -- sessions ----------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    LOGGER.warning("accept: %s; backing off", exc.strerror)
                    await trio.sleep(0.1)
                    continue
                raise
            assert self._nursery is not None
            self._nursery.start_soon(self._run_session, conn)

    async def _run_session(self, conn: socket.socket) -> None:
        chan = TrioChannel(conn)
        # Each PARK frame is admitted as it arrives (and answered by its own
        # PARKED): the decoder never holds more than one frame's 253 fds, so
        # the fd reserve covers every session's in-flight parks.
        decoder = Decoder(join_split=False)
        session: _Session | None = None
        try:
            session = await self._handshake(chan, decoder)
            if session is None:
                return
            assert self._nursery is not None
            self._nursery.start_soon(self._writer, session)
            await self._reader(session, decoder)
        except ProtocolError as exc:
            self._protocol_errors += 1
            who = f"session {session.id}" if session else "new session"
            LOGGER.warning("%s: protocol error: %s", who, exc)
            if session is not None:
                session.writer_scope.cancel()
            # Wakes queued but not begun go to another worker, not to this one
            # and then again elsewhere. ERROR only if no frame is half sent.
            if chan.discard_unstarted():
                with trio.move_on_after(1.0):
                    try:
                        await chan.send(Error(exc.code, str(exc)))
                    except OSError:
                        pass  # the peer is gone already
        except OSError as exc:
            LOGGER.info("session %s: %s", session.id if session else "?", exc)
        finally:
            decoder.close()
            if session is not None:
                session.writer_scope.cancel()
                del self._sessions[session.id]
                requeued = self.lot.remove_session(session, now=trio.current_time())
                LOGGER.info(
                    "session %d (pool %r) ended; %d unacknowledged wakes re-routed",
                    session.id,
                    session.pool.name,
                    requeued,
                )
                self._flush()
                self._poke_progress()
            chan.close()

    async def _handshake(self, chan: TrioChannel, decoder: Decoder) -> _Session | None:
        uid = peer_uid(chan.sock)
        if uid is not None and uid not in self.config.allow_uids:
            LOGGER.warning(
                "refused a session from uid %d (allowed: %s)", uid, self.config.allow_uids
            )
            with trio.move_on_after(1.0):
                await chan.send(
                    Error(ErrorCode.NOT_ALLOWED, f"uid {uid} is not allowed to use this container")
                )
            return None
        if len(self._sessions) >= self.config.max_sessions:
            with trio.move_on_after(1.0):
                await chan.send(Error(ErrorCode.TOO_MANY_SESSIONS, "too many sessions"))
            return None
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            hello = await chan.receive_message(decoder)
            if hello is None:
                return None
            if not isinstance(hello, Hello):
                close_fds(message_fds(hello))
                raise RemoteProtocolError(f"expected HELLO first, got {type(hello).__name__}")
            if hello.version not in SUPPORTED_VERSIONS:
                await chan.send(
                    Error(
                        ErrorCode.VERSION,
                        f"protocol version {hello.version} not supported"
                        f" (this container speaks {sorted(SUPPORTED_VERSIONS)})",
                    )
                )
                return None
            session = _Session(self._next_session, self.lot.pool(hello.pool), hello.name, chan)
            self._next_session += 1
            await chan.send(
                Welcome(
                    session.id,
                    self.config.max_token,
                    self.config.max_pending,
                    window=self.config.window,
                )
            )
            self._sessions[session.id] = session
            self.lot.add_session(session)
            self._flush()
            LOGGER.info(
                "session %d: pool %r, worker %r, uid %s", session.id, hello.pool, hello.name, uid
            )
            return session
        LOGGER.info("handshake timed out")
        return None

    async def _reader(self, session: _Session, decoder: Decoder) -> None:
        while True:
            msg = await session.chan.receive_message(decoder)
            if msg is None:
                return
            if isinstance(msg, Park):
                self._on_park(session, msg)
            elif isinstance(msg, Ack):
                slots = self.lot.ack(session, msg.tickets)
                self._acks_total += len(slots)
                for slot in slots:
                    self._close_slot(slot)
            elif isinstance(msg, Unpark):
                now = trio.current_time()
                for ticket in msg.tickets:
                    found = self.lot.find(ticket)
                    # Not parked any more (a wake is in flight): a no-op, by design.
                    if found is not None and found.state is State.PARKED:
                        if found.pool is session.pool:
                            self._wake(found, Reason.REQUESTED, now, to=session)
            elif isinstance(msg, Close):
                for entry in msg.entries:
                    target = self.lot.find(entry.ticket)
                    if target is not None and target.state is State.PARKED:
                        if target.pool is session.pool:
                            self.watcher.unregister(target.fd)
                            send_goodbye(target.fd, entry.goodbye)
                            self._close_slot(target)
                            self._closed_total += 1
            elif isinstance(msg, Stats):
                session.replies.append(StatsReply(self.stats().to_json().encode()))
                self.lot.dirty.add(session)
            else:
                close_fds(message_fds(msg))
                raise RemoteProtocolError(f"{type(msg).__name__} is not a worker message")
            self._flush()

    def _on_park(self, session: _Session, msg: Park) -> None:
        now = trio.current_time()
        results = []
        for entry in msg.entries:
            code, family = self._admit(entry)
            if code is not Refusal.OK:
                os.close(entry.fd)
                self._refused[code.label] += 1
                results.append(ParkResult(code))
                continue
            idle = (
                entry.idle_timeout_ms / 1000 if entry.idle_timeout_ms else self.config.idle_timeout
            )
            flags = (
                (HANGUP_RETURNS if entry.hangup_returns else 0)
                | (TIMEOUT_RETURNS if entry.timeout_returns else 0)
                | (INET6 if family == socket.AF_INET6 else 0)
            )
            slot = self.lot.park(
                entry.fd,
                token=entry.token,
                pending=entry.pending,
                flags=flags,
                session=session,
                deadline=now + idle,
            )
            self._held += 1
            self._parks_total += 1
            results.append(ParkResult(Refusal.OK, slot.ticket))
        session.replies.append(Parked(msg.request_id, tuple(results)))
        self.lot.dirty.add(session)

    def _admit(self, entry: ParkEntry) -> tuple[Refusal, int]:
        """(OK, family) or the refusal; on OK the fd is in the watcher."""
        if self._shutting_down:
            return Refusal.SHUTTING_DOWN, 0
        if len(entry.token) > self.config.max_token:
            return Refusal.TOKEN_TOO_LARGE, 0
        if len(entry.pending) > self.config.max_pending:
            return Refusal.PENDING_TOO_LARGE, 0
        if self.lot.parked + self.lot.queued + self.lot.sent >= self.config.max_parked:
            return Refusal.FULL, 0
        if self._held >= self.fd_budget:
            return Refusal.OUT_OF_FDS, 0
        code, family = check_tcp_stream(entry.fd)
        if code is not Refusal.OK:
            return code, 0
        try:
            self.watcher.register(entry.fd)
        except OSError as exc:
            LOGGER.warning("watcher refused fd: %s", exc)
            return Refusal.NOT_A_TCP_STREAM, 0
        return Refusal.OK, family

    def _take_output(self, session: _Session) -> tuple[list[Frame], list[Slot]]:
        """Everything the session should be sent now, encoded; the wakes' slots."""
        replies, session.replies = session.replies, []
        slots = self.lot.take_outq(session)
        frames = encode_all(replies)
        # One WAKE per 253 entries: bounded messages the worker can take (and
        # ACK) one at a time.
        for i in range(0, len(slots), MAX_FDS_PER_FRAME):
            entries = tuple(
                WakeEntry(
                    s.ticket,
                    s.reason,
                    s.token,
                    s.pending,
                    s.fd if s.fd >= 0 else None,
                    bool(s.flags & INET6),
                )
                for s in slots[i : i + MAX_FDS_PER_FRAME]
            )
            frames += encode(Wake(entries))
        return frames, slots

    def _sent(self, slots: list[Slot]) -> None:
        if slots:
            now = trio.current_time()
            self._latencies.extend(now - float(s.key) for s in slots)

    def _write_now(self, session: _Session) -> None:
        """Send the session's output from the calling task if that cannot block.

        The common case (nobody mid-send, room in the socket) costs no task
        switch; otherwise the session's writer task does it.
        """
        chan = session.chan
        if chan.closed:
            return
        if chan.busy:
            session.wakeup.set()
            return
        frames, slots = self._take_output(session)
        try:
            chan.try_send_nowait(frames)
        except OSError as exc:
            self._send_failed(session, exc)
            return
        self._sent(slots)
        if chan.flush_needed:
            session.wakeup.set()

    def _send_failed(self, session: _Session, exc: OSError) -> None:
        LOGGER.info("session %d: send failed: %s", session.id, exc)
        try:  # the reader sees EOF and ends the session
            session.chan.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    async def _writer(self, session: _Session) -> None:
        """Sends what ``_write_now`` could not: when the worker is slow to read."""
        with session.writer_scope:
            try:
                while True:
                    await session.wakeup.wait()
                    session.wakeup = trio.Event()
                    frames, slots = self._take_output(session)
                    await session.chan.send_frames(frames)
                    self._sent(slots)
            except OSError as exc:
                self._send_failed(session, exc)

    # -- statistics ----------------------------------------------------------------------

    def stats(self) -> ContainerStats:
        lot = self.lot
        return ContainerStats(
            parked=lot.parked,
            queued=lot.queued,
            unacked=lot.sent,
            orphaned=lot.orphaned,
            sessions=len(self._sessions),
            woken_total=dict(lot.woken_total),
            refused_total=dict(self._refused),
            parks_total=self._parks_total,
            acks_total=self._acks_total,
            closed_total=self._closed_total,
            orphans_closed_total=lot.orphans_closed,
            protocol_errors_total=self._protocol_errors,
            pools={name: len(p.sessions) for name, p in lot.pools.items()},
            fds_held=self._held,
            fd_budget=self.fd_budget,
            wake_latency=LatencySummary.of(self._latencies),
            uptime_s=round(trio.current_time() - self._started, 3),
            shutting_down=self._shutting_down,
        )


async def serve(
    config: ContainerConfig | None = None,
    *,
    task_status: trio.TaskStatus[Container] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a container until cancelled or until ``request_shutdown()`` has drained it.

    ``task_status.started`` hands back the ``Container`` (for ``stats()`` and
    ``request_shutdown()``) once the socket is listening.
    """
    container = Container(config or ContainerConfig())
    await container.run(task_status=task_status)
