"""The container: a trio daemon holding parked connections for worker sessions.

Tasks: one accept loop, one watcher loop (waits on the single epoll/kqueue
fd and drains events in batches), one timer (idle deadlines and orphans),
and per session one reader and one writer. The reader never blocks on a
send and the watcher never touches a session's socket: wakes are put in the
session's queue and sent at once if the socket takes them, else by the
session's writer, so one slow worker cannot stall anybody else.

Ownership: every fd that arrives is parked, or closed before the PARKED
reply goes out. A parked fd is unregistered from the watcher before it is
closed or handed back. A woken fd stays ours until the worker ACKs it; the
outbox sends our own copy (no dup), and an ACK counts only once the fd went
out (``State.WRITTEN``).

Bounds (theory of operation)
----------------------------
- fds: ``used = held + fds_in + conns`` (connection fds we hold, fds received
  but not yet parked or closed, session sockets) never exceeds ``capacity``
  (RLIMIT_NOFILE less what was open at start and ``fd_reserve``). A full read
  may bring 253 fds, so it happens only with 253 free; otherwise a session is
  read fd-less (``recv_fdless``: ACK, UNPARK, CLOSE, STATS and the rest of a
  frame whose fds are in already) and its next fd-carrying frame waits for
  room. Parks are refused (``out-of-fds``) so that a full read always fits
  after a frame is admitted. So MSG_CTRUNC cannot hit a worker because of
  what other sessions hold.
- memory: a session's encoded output is capped (``max_output_bytes``,
  ``max_output_messages``); over the cap it is not read and gets no more
  wakes encoded, and past ``output_timeout`` it is ended.
- ending a session (``_end``): ERROR, no more sending, never-written wakes go
  to other workers at once; ACKs are read until the worker closes its end
  (``end_grace``); written wakes go elsewhere only once the worker cannot
  read them (``unread_by_peer`` is zero after its EOF), else they stay its.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import resource
import secrets
import socket
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Sequence
from itertools import repeat
from operator import or_
from typing import Any, TypeVar

import attrs
import trio

from ._admit import (
    inspect,
    inspect_many,
    peek_has_data,
    same_open_file,
    send_goodbye,
)
from ._config import ContainerConfig
from ._encode import parked_frame_flat, wake_frames
from ._errors import ProtocolError, RemoteProtocolError
from ._fdpass import Outbox, recv_fdless, recv_fds, unread_by_peer
from ._lot import (
    HANGUP_RETURNS,
    INET6,
    TIMEOUT_RETURNS,
    UNCONFIRMED,
    Lot,
    Pool,
    SessionState,
    Slot,
    State,
    due_ms,
)
from ._mirror import FLAG_CONFIRMED, Record, encode_records, encode_tickets, encode_woken
from ._mirror import Kind as MirrorKind
from ._ratelog import LogLimit
from ._serving import Serving
from ._stats import ContainerStats, LatencyBuckets, LatencySummary, ProcessInfo
from ._unixsock import listen_unix, peer_gone, peer_uid
from ._watcher import ERR, HUP, make_watcher
from ._wire import LEAN_HANGUP_RETURNS as _LEAN_HANGUP
from ._wire import LEAN_TIMEOUT_RETURNS as _LEAN_TIMEOUT
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
    LeanEntry,
    LeanPark,
    Message,
    Park,
    ParkEntry,
    Reason,
    Refusal,
    Result,
    Rules,
    Send,
    Stats,
    StatsReply,
    Tagged,
    TagOp,
    Unpark,
    Welcome,
    close_fds,
    close_owned,
    encode,
    message_fds,
)

LOGGER = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT = 10.0
#: The pool ``connpark stats`` uses: its sessions are logged at DEBUG.
STATS_POOL = "_stats"
#: Sessions of ``STATS_POOL`` at once, on top of ``max_sessions``: the health
#: checks (supervisor, systemd watchdog) and ``connpark stats`` must get in when
#: workers hold every session, or a full container would be killed as hung.
STATS_SESSIONS_MAX = 16
#: How long a socket may come back as a re-sent park (a worker reconnecting
#: within its hook's backoff, 60 s by default) and still get its old ticket.
TWIN_MEMORY = 300.0
#: How many resumed sessions back ``_descends`` looks (each a lost session).
_LINEAGE_STEPS = 64
#: Most sessions ``_lineage`` remembers (the newest; a peer may open many).
LINEAGE_MAX = 8192
#: Most sockets ``_twins`` remembers past twice those held (the newest): a peer
#: that never reads its PARKED and ends session after session leaves one per park.
TWINS_MAX = 65536
#: A family (< 64) -> four times it: the high bits of ``_FLAGS_OF``'s index.
_TIMES4 = bytes(i * 4 & 0xFF for i in range(256))
#: A plain entry's ``family << 2 | LeanEntry flags`` (hang-up and timeout returns:
#: the two low bits, the only ones a plain entry has) -> its new slot's flags;
#: ``_NO_FLAGS`` for a family other than the two.
_FLAGS_OF = bytes(
    (HANGUP_RETURNS if k & _LEAN_HANGUP else 0)
    | (TIMEOUT_RETURNS if k & _LEAN_TIMEOUT else 0)
    | (INET6 if k >> 2 == socket.AF_INET6 else 0)
    if k >> 2 in (socket.AF_INET, socket.AF_INET6)
    else 0xFF
    for k in range(256)
)
_NO_FLAGS = 0xFF
#: ``Lot.park_many``'s columns: fds, tokens, pending bytes, flags, deadlines (ms).
_Columns = tuple[Sequence[int], Sequence[bytes], Sequence[bytes], Sequence[int], Sequence[int]]


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


class _Confirm:
    """The outbox tag of a PARKED frame: once it is written, its slots are confirmed.

    ``marked``: its slots carry UNCONFIRMED, only when the frame was not written
    at once (``Container._on_park``); most never need the flag set or cleared.
    ``inodes``: then also their sockets' inodes (``_twins``' keys), taken while
    their fds are surely open: a slot may be woken, ACKed and closed before its
    session ends, and a re-sent park of it must still find its ticket.
    ``twins``: (inode, ticket) of the re-sent entries it answers with a twin's
    ticket. Once written, the sender knows: that twin has done its work (the
    connection may come back to this worker and a later park of it, lost and
    sent again, is a new park, not a copy of the first).
    """

    __slots__ = ("inodes", "marked", "slots", "twins")

    def __init__(self, slots: list[Slot], twins: list[tuple[int, int]]) -> None:
        self.slots = slots
        self.marked = False
        self.inodes: list[int] = []
        self.twins = twins


class _Session(SessionState):
    __slots__ = (
        "decoder",
        "discard",
        "drained",
        "end_deadline",
        "ending",
        "fds_in",
        "outbox",
        "over_since",
        "peer_closed",
        "quiet",
        "read_scope",
        "resumes",
        "sock",
        "unconfirmed",
        "version",
        "wakeup",
        "writer_scope",
    )

    def __init__(
        self, session_id: int, pool: Pool, name: str, sock: socket.socket, decoder: Decoder
    ) -> None:
        super().__init__(session_id, pool, name)
        self.sock = sock
        self.decoder = decoder
        self.outbox = Outbox(own_fds=False)
        #: The writer: output waits for the socket to take it.
        self.wakeup = trio.Event()
        #: The reader, paused by the output cap: the output went under it.
        self.drained = trio.Event()
        #: fds received from this session, not yet parked or closed.
        self.fds_in = 0
        #: Why the container is ending this session (None: it is not).
        self.ending: str | None = None
        self.end_deadline = math.inf
        #: The decoder broke: read and drop until the peer closes.
        self.discard = False
        #: A write failed with EPIPE/ECONNRESET: the worker closed its end (it left,
        #: or died). What it wrote before is still read, its parks kept (``_dispatch``).
        self.peer_closed = False
        #: When its output went over the cap (None: it is under).
        self.over_since: float | None = None
        self.read_scope = trio.CancelScope()
        self.writer_scope = trio.CancelScope()
        self.quiet = pool.name == STATS_POOL
        #: PARKED frames of this session not written yet (their slots are unconfirmed).
        self.unconfirmed: set[_Confirm] = set()
        #: The HELLO's protocol version: v3 and later get WAKE extensions.
        self.version = 1
        #: The session this one resumed (HELLO ``resume_session``; 0: none).
        self.resumes = 0


class Container:
    """One running container. Start it with ``run`` (or ``connpark.serve``)."""

    def __init__(
        self,
        config: ContainerConfig,
        *,
        listen_fd: int | None = None,
        mirror: socket.socket | None = None,
        epoch: int = 0,
        restore: Sequence[Record] = (),
        shard: int = 0,
        shards: int = 1,
        keepers: Sequence[ProcessInfo] = (),
    ) -> None:
        self.config = config
        self.lot = Lot(
            window=config.window,
            orphan_timeout=config.orphan_timeout,
            ack_deadline=config.ack_deadline,
            epoch=epoch,
            shard=shard,
        )
        #: Our index among the shards that serve the path, and how many there are.
        self.shard, self.shards = shard, shards
        #: A listening socket inherited from a supervisor (then we do not own the path).
        self._listen_fd = listen_fd
        #: The supervisor's mirror of every parked fd (None: no crash recovery).
        self._mirror = mirror
        self._mirror_out = Outbox(own_fds=False)
        self._mirror_del: list[int] = []
        self._restore = list(restore)
        #: Who serves this socket: the supervisor and our mirror (if any), and us.
        self._processes = (*keepers, ProcessInfo("shard", os.getpid(), shard))
        #: When this shard took its predecessor's connections back (0: it did not).
        self._restored_at = 0.0
        #: Restored connections that may be in a worker's hands: ticket -> record.
        self._quarantine: dict[int, Record] = {}
        #: Sockets a worker may send again, marked ``resent`` (its session ended
        #: before our PARKED reached it, or we restarted): inode -> (ticket, when,
        #: the parker's session id; after a restart 0: any, or minus the session
        #: that claimed its wake: any but its successors). Such a park, from that
        #: session's successor, gets the ticket we gave: one owner.
        self._twins: dict[int, tuple[int, float, int]] = {}
        #: ``_twins``' size at which ``_remember_inode`` next prunes it.
        self._twins_at = 1024
        #: Session id -> (the session it resumed (HELLO ``resume_session``), when).
        self._lineage: dict[int, tuple[int, float]] = {}
        #: ``_lineage``'s size at which ``_note_lineage`` next prunes it.
        self._lineage_at = 1024
        self.watcher = make_watcher()
        #: Every line a peer can cause goes through it: a peer must not fill the disk.
        self._peer_log = LogLimit(LOGGER)
        self.serving = Serving(
            max_rule_sets=config.max_rule_sets,
            max_tags=config.max_tags,
            max_tag_len=config.max_tag_len,
        )
        self._sessions: dict[int, _Session] = {}
        #: From a random start, not 1: a worker back after a restart resumes a
        #: session of the process before (HELLO ``resume_session``), and its
        #: lineage must not run through a session of ours that had that id.
        self._next_session = 1 + secrets.randbelow(1 << 62)
        self._refused: Counter[str] = Counter()
        self._latencies: deque[float] = deque(maxlen=4096)
        self._latency_buckets = LatencyBuckets()
        self._parks_total = 0
        self._acks_total = 0
        self._closed_total = 0
        self._protocol_errors = 0
        #: Connection fds we hold (parked, or woken and not yet ACKed).
        self._held = 0
        #: fds received from sessions and not yet parked or closed (partial frames).
        self._fds_in = 0
        #: Open session sockets (handshaking ones too).
        self._conns = 0
        #: Connections in their handshake (they count against the sessions' limits).
        self._handshaking = 0
        #: Sessions past HELLO, not yet joined, by kind: [workers, statistics].
        self._joining = [0, 0]
        self._fd_limit = raise_nofile_limit()
        self._fd_base = count_open_fds() - len(self._restore)  # those count as held
        #: fds we may have open beyond those open at start, less the reserve.
        self._capacity = self._fd_limit - self._fd_base - config.fd_reserve
        #: A session's output cap (``_over``), read once per message.
        self._max_out_bytes = config.max_output_bytes
        self._max_out_frames = config.max_output_messages
        self._room = trio.Event()
        self._room_waiters = 0
        self._started = 0.0
        self._shutting_down = False
        #: Sessions are being cancelled: nothing is re-routed or sent any more.
        self._tearing_down = False
        self._shutdown_requested = trio.Event()
        self._drain_scope = trio.CancelScope()
        self._progress = trio.Event()
        self._timer_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._listener: socket.socket | None = None
        #: We made the socket file (not systemd): we unlink it when we stop.
        self._owns_path = True

    # -- lifecycle ---------------------------------------------------------------

    def request_shutdown(self) -> None:
        """Stop taking parks, wake everything with SHUTDOWN, wait for ACKs, return from run.

        A second request while draining stops waiting for ACKs at once.
        """
        if self._shutdown_requested.is_set():
            self._drain_scope.cancel()
        self._shutdown_requested.set()

    def listen(self, inherited: socket.socket | None = None) -> None:
        """Create the control socket now (``run`` does it if not done): start-up
        errors (``ConnparkError``) surface here, before any task starts.

        ``inherited``: a listening socket to serve instead (systemd socket
        activation); its file is not ours, so it is never unlinked.
        """
        if self._listener is None:
            if self._listen_fd is not None:
                self._listener = socket.socket(fileno=self._listen_fd)
            elif inherited is not None:
                self._owns_path = False
                self._listener = inherited
            else:
                self._listener = listen_unix(self.config.path, mode=self.config.socket_mode)
            self._listener.setblocking(False)

    async def run(
        self, *, task_status: trio.TaskStatus[Container] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.listen()
        listener = self._listener
        assert listener is not None
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
                self._adopt_restored()
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
            if self._listen_fd is None and self._owns_path:
                try:
                    os.unlink(self.config.path)
                except OSError:
                    pass
            for record in self._quarantine.values():
                os.close(record.fd)
            self._quarantine.clear()
            for session in list(self._sessions.values()):
                self._close_sock(session)
            if self.lot.queued or self.lot.sent:
                LOGGER.warning(
                    "closing %d woken connections no worker took", self.lot.queued + self.lot.sent
                )
            self._close_everything()
            self._flush_mirror()  # what we closed, the mirror must not keep (or give back)
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
        """Wakes still on their way to a live session (orphans cannot progress: skip them).

        A shard restored from the mirror waits for sessionless pools too, for
        ``restore_grace`` after its start: their workers are reconnecting.
        """
        if self.lot.sent:
            return True
        reconnecting = bool(self._restored_at) and (
            trio.current_time() - self._restored_at < self.config.restore_grace
        )
        return any(p.waiting and (p.sessions or reconnecting) for p in self.lot.pools.values())

    def _close_everything(self) -> None:
        for slot in self.lot.slots():
            if slot.state is State.PARKED:
                self.watcher.unregister(slot.fd)
            self._close_slot(slot)

    # -- fd accounting -------------------------------------------------------------

    @property
    def fd_budget(self) -> int:
        """How many connection fds we may hold right now: what a full read leaves free."""
        used_elsewhere = self._fds_in + self._conns + MAX_FDS_PER_FRAME
        return max(0, self._capacity - used_elsewhere)

    def _room_for(self, n: int) -> bool:
        return self._held + self._fds_in + self._conns + n <= self._capacity

    async def _wait_room(self, n: int) -> None:
        """Until ``n`` more fds fit (whoever frees fds calls ``_freed``)."""
        while not self._room_for(n):
            self._room_waiters += 1
            try:
                await self._room.wait()
            finally:
                self._room_waiters -= 1

    def _freed(self) -> None:
        """fds may have gone away: let whoever waits for room look again."""
        if self._room_waiters and self._room_for(1):
            self._room.set()
            self._room = trio.Event()

    def _close_slot(self, slot: Slot) -> None:
        """Close the container's copy (if any) and drop the slot."""
        if slot.fd >= 0:
            os.close(slot.fd)
            self._held -= 1
            if self._mirror is not None:
                self._mirror_del.append(slot.ticket)
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
                    elif slot.extra is not None and slot.extra.rules is not None:
                        why = self.serving.autorespond(self.lot, slot, now)
                        if why is None:  # answered without waking: watch it again
                            self.watcher.rearm(fd)
                            continue
                        reason = why
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
            if self._mirror is not None:
                self._mirror_del.append(slot.ticket)
            self.lot.forget_fd(slot)
        self.lot.wake(slot, reason, now, to=to)

    async def _timer_loop(self) -> None:
        while True:
            with trio.CancelScope(deadline=self.lot.next_due()) as scope:
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
            pack_at = self.lot.next_pack()
            if pack_at is not None and pack_at <= now:
                self.lot.pack(now)  # the long-parked ones: ~40 B each instead of ~200
            self._flush()

    def _flush(self) -> None:
        """Send sessions their new output (or wake their writers); re-aim the timer."""
        if self._tearing_down:
            return  # a dying session's wakes must not bounce to one dying next
        if self._mirror_del:
            self._flush_mirror()
        dirty = self.lot.dirty
        while dirty:
            self._pump(dirty.pop())  # type: ignore[arg-type]
        scope = self._timer_scope
        if scope is not None:
            nxt = self.lot.next_due()
            if nxt < scope.deadline:
                scope.deadline = nxt
        if self._room_waiters:
            self._freed()

    # -- sessions ----------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            await self._wait_room(1)
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
            self._conns += 1
            assert self._nursery is not None
            self._nursery.start_soon(self._run_session, conn)

    async def _run_session(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        # Each PARK frame is admitted as it arrives (and answered by its own
        # PARKED): the decoder never holds more than one frame's fds.
        cfg = self.config
        decoder = Decoder(
            join_split=False, lean_park=True, lean_limits=(cfg.max_token, cfg.max_pending)
        )
        session: _Session | None = None
        try:
            try:
                session = await self._handshake(conn, decoder)
            except ProtocolError as exc:
                self._protocol_errors += 1
                self._peer_log.log(logging.WARNING, "new session: protocol error: %s", exc)
                with trio.move_on_after(1.0):
                    await _send_now(conn, Error(exc.code, str(exc)))
                return
            except OSError as exc:
                self._peer_log.log(logging.INFO, "new session: %s", exc)
                return
            if session is None:
                return
            assert self._nursery is not None
            self._nursery.start_soon(self._writer, session)
            await self._serve_session(session)
        finally:
            decoder.close()
            if session is not None:
                self._forget_session(session)
            else:
                conn.close()
                self._conns -= 1
                self._freed()

    async def _serve_session(self, s: _Session) -> None:
        """Read until the session is over, then settle who owns its un-ACKed wakes."""
        eof = False
        with s.read_scope:
            try:
                await self._reader(s)
                eof = True
            except OSError as exc:  # ECONNRESET: the worker is gone
                self._log(s, logging.INFO, "session %d: %s", s.id, exc)
                eof = True
                # (It closed with our bytes unread: its end may have come inside a frame.)
                s.discard = s.discard or s.decoder.buffered > 0
        if self._tearing_down:
            return
        if s.ending is None:
            s.ending = "the worker closed the session"
            s.end_deadline = trio.current_time() + self.config.end_grace
        self._stop_sending(s)
        await self._settle(s, eof)

    async def _reader(self, s: _Session) -> None:
        """Dispatch messages; read with backpressure (output cap, fd room). Returns at EOF."""
        decoder = s.decoder
        while True:
            capped = False
            try:
                capped = self._dispatch_buffered(s)
            except ProtocolError as exc:
                self._protocol_errors += 1
                self._end(s, exc.code, f"protocol error: {exc}")
                s.discard = s.discard or decoder.broken or isinstance(exc, _FdFlood)
            self._count_fds_in(s)
            self._flush()
            if s.ending is None and self._over(s):
                s.drained = trio.Event()
                await s.drained.wait()
                continue
            if capped:  # the flush took the output under the cap at once: the
                await trio.lowlevel.checkpoint()  # messages still buffered come first
                continue
            await trio.lowlevel.wait_readable(s.sock)
            try:
                if self._room_for(MAX_FDS_PER_FRAME):
                    data, fds = recv_fds(s.sock)
                else:
                    got = recv_fdless(s.sock, decoder.frame_head(), decoder.buffered)
                    if got is None:  # the next frame carries fds: wait for room
                        await self._wait_room(MAX_FDS_PER_FRAME)
                        continue
                    data, fds = got, []
            except BlockingIOError:
                continue
            except RemoteProtocolError as exc:  # MSG_CTRUNC: fds we did not ask for
                self._protocol_errors += 1
                self._end(s, exc.code, f"protocol error: {exc}")
                s.discard = True
                continue
            if not data:
                close_fds(fds)
                if not s.discard:
                    # The end inside a frame: what the worker wrote after it (ACKs
                    # of wakes it took, say) is lost: the stream is broken (``_settle``).
                    s.discard = decoder.buffered > 0
                    try:
                        decoder.eof()
                    except ProtocolError as exc:
                        self._protocol_errors += 1
                        self._log(s, logging.WARNING, "session %d: %s", s.id, exc)
                return
            if s.discard:
                close_fds(fds)
                continue
            if fds:
                s.fds_in += len(fds)
                self._fds_in += len(fds)
            try:
                decoder.receive_data(data, fds)
            except ProtocolError:  # broken already: it closed the fds
                s.discard = True

    def _dispatch_buffered(self, s: _Session) -> bool:
        """Dispatch the complete messages the decoder holds, up to the output cap.
        True if the cap stopped it: messages may still be buffered, which no
        new data from the socket would bring up (the peer may have sent all)."""
        decoder = s.decoder
        while not s.discard:
            if s.ending is None and self._over(s):
                return True
            msg = decoder.next_message()
            if msg is None:
                # What is left is one incomplete frame: its fds at most.
                if decoder.held_fds > MAX_FDS_PER_FRAME:
                    raise _FdFlood(f"{decoder.held_fds} fds arrived for one incomplete frame")
                return False
            self._dispatch(s, msg)
        return False

    def _count_fds_in(self, s: _Session) -> None:
        """Resync the in-flight fd count with what the decoder holds (it may have closed some)."""
        held = 0 if s.discard else s.decoder.held_fds
        if s.discard:
            s.decoder.close()
        self._fds_in += held - s.fds_in
        s.fds_in = held

    def _dispatch(self, s: _Session, msg: Message) -> None:
        if isinstance(msg, Ack):
            slots, fds = self.lot.take_acked(s, msg.tickets, trio.current_time())
            if slots:
                self._close_acked(slots, fds)
            return
        if s.ending is not None:  # only ACKs count now; fds are closed
            if s.peer_closed and isinstance(msg, LeanPark):
                # Unless the worker closed its end first (our PARKED to it failed): a
                # worker that leaves with parks unanswered closes its copies of those
                # (``Engine._close_unanswered``): closing ours would lose them.
                self._on_park(s, msg)
                return
            if isinstance(msg, (LeanPark, Park)):
                self._take_fds(s, len(msg.entries))
                close_fds(message_fds(msg))
            return
        if isinstance(msg, LeanPark):
            self._on_park(s, msg)
        elif isinstance(msg, Unpark):
            # Tickets not parked any more (a wake is in flight) are no-ops, by design.
            slots = self.lot.unpark(s, msg.tickets, trio.current_time())
            if slots:
                self.watcher.unregister_many([x.fd for x in slots])
        elif isinstance(msg, Close):
            for entry in msg.entries:
                target = self.lot.find(entry.ticket)
                if target is not None and target.state is State.PARKED:
                    if target.pool is s.pool:
                        self.watcher.unregister(target.fd)
                        send_goodbye(target.fd, entry.goodbye)
                        self._close_slot(target)
                        self._closed_total += 1
        elif isinstance(msg, Stats):
            self._reply(s, StatsReply(self.stats().to_json().encode()))
        elif isinstance(msg, Rules):
            code = self.serving.register(s.id, s.pool.name, msg)
            self._reply(s, Result(msg.request_id, code))
        elif isinstance(msg, Send):
            self._on_send(s, msg)
        elif isinstance(msg, Tagged):
            self._on_tagged(s, msg)
        else:
            close_fds(message_fds(msg))
            raise RemoteProtocolError(f"{type(msg).__name__} is not a worker message")

    def _on_send(self, s: _Session, msg: Send) -> None:
        """Publish to parked connections of the session's pool; RESULT says what happened."""
        if len(msg.data) > self.config.max_publish:
            self._reply(s, Result(msg.request_id, Refusal.TOO_LARGE))
            return
        lot = self.lot
        missed = 0
        if msg.tag:
            targets = lot.tags.members(s.pool.name, msg.tag)
        else:
            targets = []
            for ticket in dict.fromkeys(msg.tickets):
                found = lot.find(ticket)
                if found is not None and found.state is State.PARKED and found.pool is s.pool:
                    targets.append(found)
                else:
                    missed += 1
        self.serving.counts["publishes_total"] += 1
        now = trio.current_time()
        written = woken = 0
        for slot in targets:
            why = self.serving.publish(slot, msg.data) if msg.data else None
            if why is None:
                written += 1
            else:
                woken += 1
                self._wake(slot, why, now)
        self._reply(s, Result(msg.request_id, Refusal.OK, written, woken, missed))

    def _on_tagged(self, s: _Session, msg: Tagged) -> None:
        """UNPARK or CLOSE every parked connection of the pool that has the tag."""
        now = trio.current_time()
        for slot in self.lot.tags.members(s.pool.name, msg.tag):
            if slot.state is not State.PARKED:
                continue
            if msg.op is TagOp.UNPARK:
                self._wake(slot, Reason.REQUESTED, now, to=s)
            else:
                self.watcher.unregister(slot.fd)
                send_goodbye(slot.fd, msg.goodbye)
                self._close_slot(slot)
                self._closed_total += 1

    def _close_acked(self, slots: list[Slot], fds: list[int]) -> None:
        """Close our copies of ACKed wakes (``Lot.take_acked`` dropped their slots;
        ``fds``: theirs, notices aside: those we closed at their wake)."""
        close_owned(fds)
        if self._mirror is not None:  # (a notice's DEL went at its wake: a no-op again)
            self._mirror_del.extend(x.ticket for x in slots)
        self._acks_total += len(slots)
        self._held -= len(fds)
        self._poke_progress()

    def _take_fds(self, s: _Session, n: int) -> None:
        """n fds left the decoder in a message: the caller parks or closes them now."""
        s.fds_in -= n
        self._fds_in -= n

    # -- admission -----------------------------------------------------------------------

    def _on_park(self, s: _Session, msg: LeanPark) -> None:
        """Admit each entry on its own; answer the frame with its own PARKED.

        The hot path: a frame of plain entries (no rules or tags, not re-sent,
        within the limits: the decoder's ``lean_limits`` sent any other as
        unusual) that fits in the room left is admitted at once
        (``_admit_plain``), then parked at once. Any other frame (an unusual
        entry, one ``_admit_plain`` would refuse, no room for all, shutting
        down) goes entry by entry through ``_admit_entry``, which says why.
        """
        entries = msg.entries
        n = len(entries)
        self._take_fds(s, n)
        now = trio.current_time()
        lot = self.lot
        # Per frame, not per entry: nothing else runs while it is admitted.
        room = min(
            self.fd_budget - self._held,
            self.config.max_parked - (lot.parked + lot.queued + lot.sent),
        )
        mirrored: list[Record] | None = [] if self._mirror is not None else None
        twins: list[tuple[int, int]] = []
        wall = time.time() - now
        plain = self._admit_plain(entries, now) if room >= n and not self._shutting_down else None
        if plain is not None:  # the usual
            admitted, tickets = lot.park_many(s, *plain)
            flat = [Refusal.OK, 0] * n
            flat[1::2] = tickets
            if mirrored is not None:
                self._mirror_records(mirrored, s, admitted, plain, wall)
        else:
            admitted = []
            flat = []
            peers: dict[object, int | list[int]] = {}
            for fd, token, pending, idle_ms, wflags, unusual in entries:
                if unusual is None:
                    unusual = ParkEntry(
                        fd,
                        token,
                        pending,
                        idle_ms,
                        bool(wflags & _LEAN_HANGUP),
                        bool(wflags & _LEAN_TIMEOUT),
                    )
                left = room - len(admitted)
                code, ticket, slot = self._admit_entry(
                    s, unusual, peers, left, now, mirrored, wall, twins
                )
                flat += (code, ticket)
                if slot is not None:
                    admitted.append(slot)
        if mirrored:  # before PARKED: the worker keeps its copy until the mirror has one
            self._mirror_send(encode_records(MirrorKind.ADD, mirrored))
        self._held += len(admitted)
        self._parks_total += len(admitted)
        confirm = _Confirm(admitted, twins)
        if admitted:
            s.unconfirmed.add(confirm)
        if s.ending is None:
            s.outbox.add((parked_frame_flat(msg.request_id, flat),), (confirm,))
            # Written now, as a rule (``_written`` confirms it): then nothing could
            # wake these in between, and they need no UNCONFIRMED. Else they do.
            self._pump(s)
        # (Ending, the worker gone: no PARKED will go; if it sends them again, from
        # its next session, the twins answer with these tickets.)
        if confirm in s.unconfirmed:
            confirm.marked = True
            Lot.unconfirm(admitted)
            confirm.inodes = [_inode(x.fd) for x in admitted]

    def _admit_plain(self, entries: tuple[LeanEntry, ...], now: float) -> _Columns | None:
        """A frame of plain entries, checked (``inspect_many``) and watched at once:
        ``Lot.park_many``'s columns. None, with nothing watched, unless every
        entry passes: then ``_admit_entry`` takes each and says why not."""
        if not entries:
            return None
        fds, tokens, pendings, idles, wflags, unusual = zip(*entries, strict=True)
        if unusual.count(None) != len(fds):
            return None
        families = inspect_many(fds)
        if families is None:
            return None
        # Each entry's flags from its family and return flags, one table for all.
        flags = bytes(map(or_, families.translate(_TIMES4), wflags)).translate(_FLAGS_OF)
        if _NO_FLAGS in flags:
            return None
        default_ms = due_ms(now, self.config.idle_timeout)
        if idles.count(0) == len(idles):
            deadlines = [default_ms] * len(idles)
        else:
            due = {ms: due_ms(now, ms / 1000) if ms else default_ms for ms in set(idles)}
            deadlines = list(map(due.__getitem__, idles))
        register, watch = self.watcher.registrar()
        done: list[None] = []
        try:
            done.extend(map(register, fds, repeat(watch)))  # kept up to a failure
        except OSError:
            self.watcher.unregister_many(fds[: len(done)])
            return None  # ``_admit_entry`` refuses the one the watcher would not take
        return fds, tokens, pendings, flags, deadlines

    @staticmethod
    def _mirror_records(
        mirrored: list[Record], s: _Session, slots: list[Slot], plain: _Columns, wall: float
    ) -> None:
        """The mirror's ADD records of the plain entries ``park_many`` just parked."""
        wall_ms = wall * 1000
        for slot, fd, token, pending, flags, deadline_ms in zip(slots, *plain, strict=True):
            mirrored.append(
                Record(
                    slot.ticket,
                    fd,
                    int(deadline_ms + wall_ms),
                    flags & ~UNCONFIRMED,
                    s.pool.name,
                    token,
                    pending,
                )
            )

    def _refuse(self, fd: int, code: Refusal) -> None:
        """An entry is refused: close its fd (it is ours), count why."""
        close_fds((fd,))
        self._refused[code.label] += 1

    def _unwatchable(self, fd: int, exc: OSError) -> Refusal:
        LOGGER.warning("watcher refused fd %d: %s", fd, exc)
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            return Refusal.FULL
        return Refusal.UNINSPECTABLE

    def _admit_entry(
        self,
        s: _Session,
        entry: ParkEntry,
        peers: dict[object, int | list[int]],
        room: int,
        now: float,
        mirrored: list[Record] | None,
        wall: float,
        twins: list[tuple[int, int]],
    ) -> tuple[Refusal, int, Slot | None]:
        """An entry off the hot path (rules or tags, re-sent, over a limit, no room,
        shutting down): (refusal, ticket, its new slot). A re-sent park of a socket
        we took already is (OK, its ticket, None), and its twin goes in ``twins``."""
        fd = entry.fd
        if entry.resent and self._twins and (twin := self._twin(fd, now, s)) is not None:
            close_fds((fd,))  # we took this connection already, under this ticket
            twins.append(twin)
            return Refusal.OK, twin[1], None
        rules = None
        try:
            if entry.rules or entry.tags:  # v3: checked first, before the fd
                rules = self.serving.check_park(s.id, s.pool.name, entry)
            if isinstance(rules, Refusal):
                code, family = rules, 0
            else:
                code, family = self._admit(entry, peers, room)
        except Exception:  # one entry must never end the session
            LOGGER.exception("session %d: admitting fd %d failed", s.id, fd)
            code, family = Refusal.UNINSPECTABLE, 0
        if code is not Refusal.OK:
            self._refuse(fd, code)
            return code, 0, None
        cfg = self.config
        idle = entry.idle_timeout_ms / 1000 if entry.idle_timeout_ms else cfg.idle_timeout
        flags = (
            (HANGUP_RETURNS if entry.hangup_returns else 0)
            | (TIMEOUT_RETURNS if entry.timeout_returns else 0)
            | (INET6 if family == socket.AF_INET6 else 0)
        )
        slot = self.lot.park(
            fd,
            token=entry.token,
            pending=entry.pending,
            flags=flags,
            session=s,
            deadline_ms=due_ms(now, idle),
        )
        if entry.rules or entry.tags:
            self.serving.attach(self.lot, slot, entry, rules, idle)  # type: ignore[arg-type]
        if mirrored is not None:
            deadline_ms = int((wall + now + idle) * 1000)
            mirrored.append(
                Record(slot.ticket, fd, deadline_ms, flags, s.pool.name, slot.token, slot.pending)
            )
        return Refusal.OK, slot.ticket, slot

    # -- the mirror (crash recovery) -------------------------------------------------------

    def _mirror_send(self, frames: list[Frame]) -> None:
        """Write to the supervisor now (its socket blocks: it is ours, and always reading)."""
        mirror = self._mirror
        if mirror is None:
            return
        out = self._mirror_out
        try:
            out.add(frames)
            while out:
                out.send_some(mirror)
        except OSError as exc:
            LOGGER.error("lost the supervisor's mirror (%s): no crash recovery from now", exc)
            out.close()
            self._mirror = None

    def hand_over(self) -> None:
        """An upgrade: our successor gets everything from the mirror. Tell the mirror
        what we closed, then leave at once: no SHUTDOWN wakes, nothing closed."""
        self._flush_mirror()
        LOGGER.info("handing over to the next shard (%d connections)", self._held)
        logging.shutdown()
        os._exit(0)

    def _flush_mirror(self) -> None:
        if self._mirror_del:
            self._mirror_send(encode_tickets(MirrorKind.DEL, self._mirror_del))
            self._mirror_del = []

    def _adopt_restored(self) -> None:
        """Take back what a crashed predecessor parked: same tickets, same deadlines.

        Connections that had been handed to a session may be in a worker's
        hands: they wait in quarantine until that worker reconnects and names
        them (HELLO resume tickets) or ``restore_grace`` passes.
        """
        if not self._restore:
            return
        now = trio.current_time()
        self._restored_at = now
        offset = now - time.time()
        parked = 0
        for r in self._restore:
            self._held += 1
            if not r.flags & FLAG_CONFIRMED:  # the parker may still hold it: it re-sends
                self._remember_twin(r.fd, r.ticket, now)
            if r.woken:
                self._quarantine[r.ticket] = r
                continue
            self._readmit(r, now, offset)
            parked += 1
        LOGGER.warning(
            "restored %d connections from the mirror (%d parked, %d in quarantine for %gs)",
            len(self._restore),
            parked,
            len(self._quarantine),
            self.config.restore_grace,
        )
        self._restore = []
        assert self._nursery is not None
        self._nursery.start_soon(self._end_quarantine)

    def _readmit(self, r: Record, now: float, offset: float) -> Slot | None:
        try:
            self.watcher.register(r.fd)
        except OSError as exc:
            LOGGER.warning("ticket %#x: cannot watch its fd again (%s); closing it", r.ticket, exc)
            os.close(r.fd)
            self._held -= 1
            self._mirror_del.append(r.ticket)
            return None
        return self.lot.restore(
            r.ticket,
            r.fd,
            token=r.token,
            pending=r.pending,
            flags=r.flags & ~FLAG_CONFIRMED,
            pool=r.pool,
            deadline_ms=due_ms(now, max(0.0, r.deadline_ms / 1000 + offset - now)),
        )

    async def _end_quarantine(self) -> None:
        """Nobody claimed them: their wakes go out again (to any worker of the pool)."""
        await trio.sleep(self.config.restore_grace)
        now = trio.current_time()
        offset = now - time.time()
        if self._quarantine:
            LOGGER.info("quarantine over: waking %d restored connections", len(self._quarantine))
        for r in self._quarantine.values():
            slot = self._readmit(r, now, offset)
            if slot is not None:
                self._wake(slot, Reason(r.woken), now)
        self._quarantine.clear()
        self._flush()

    def _remember_twin(self, fd: int, ticket: int, now: float) -> None:
        """A restored connection its parker may send again (any session may)."""
        self._remember_inode(_inode(fd), ticket, now, 0)

    def _remember_inode(self, inode: int, ticket: int, now: float, parker: int) -> None:
        if not inode:
            return
        self._twins[inode] = (ticket, now, parker)
        if len(self._twins) > self._twins_at:
            live = self.lot.parked + self.lot.queued + self.lot.sent
            self._twins, self._twins_at = _pruned(
                self._twins, now, 2 * live + 1024, 2 * live + TWINS_MAX
            )

    def _twin(self, fd: int, now: float, s: _Session) -> tuple[int, int] | None:
        """A re-sent park of a socket we took already: (its inode, its ticket), else None.

        Whatever became of that connection since (still parked, woken to
        another worker, closed), the sender's copy must go: the answer is OK.
        Only from a successor of the session that parked it (or after a
        restart, from anyone but the successors of a session that claimed
        its wake: ``_claimed``): a worker that got the connection since,
        parked it and lost that park with its session sends a new one, not a
        copy.
        """
        try:
            inode = os.fstat(fd).st_ino
        except OSError:
            return None
        found = self._twins.get(inode)
        if found is None or now - found[1] > TWIN_MEMORY:
            return None
        ticket, _, parker = found
        if parker > 0 and not self._descends(s, parker):
            return None
        if parker < 0 and self._descends(s, -parker):
            return None
        # (Restored and in quarantine: its wake may be in another worker's
        # hands, one a tag or UNPARK woke it to: it stays there to be claimed.)
        return inode, ticket

    def _note_lineage(self, sid: int, resumed: int) -> None:
        now = trio.current_time()
        self._lineage[sid] = (resumed, now)
        if len(self._lineage) > self._lineage_at:
            floor = 2 * len(self._sessions) + 1024
            self._lineage, self._lineage_at = _pruned(self._lineage, now, floor, LINEAGE_MAX)

    def _descends(self, s: _Session, parker: int) -> bool:
        """Whether ``s`` resumed ``parker``'s session, directly or through others."""
        sid = s.resumes
        for _ in range(_LINEAGE_STEPS):
            if not sid or sid == parker:
                return sid == parker
            sid = self._lineage.get(sid, (0, 0.0))[0]
        return False

    def _claimed(self, tickets: Sequence[int], sid: int) -> None:
        """A reconnecting worker (its new session: ``sid``) has these (HELLO
        resume): drop our restored copies."""
        for t in tickets:
            r = self._quarantine.pop(t, None)
            if r is not None:
                # The worker has this connection: a park of it by its lineage is
                # a new one, not a copy of ours. Another worker's may be one: the
                # parker never saw its PARKED, and a tag or UNPARK woke it to this one.
                inode = _inode(r.fd)
                twin = self._twins.get(inode)
                if twin is not None and twin[0] == t:
                    self._twins[inode] = (t, twin[1], -sid)
                os.close(r.fd)
                self._held -= 1
                self._mirror_del.append(t)

    def _admit(
        self, entry: ParkEntry, peers: dict[object, int | list[int]], room: int
    ) -> tuple[Refusal, int]:
        """(OK, family) or the refusal; on OK the fd is in the watcher."""
        if self._shutting_down:
            return Refusal.SHUTTING_DOWN, 0
        if len(entry.token) > self.config.max_token:
            return Refusal.TOKEN_TOO_LARGE, 0
        if len(entry.pending) > self.config.max_pending:
            return Refusal.PENDING_TOO_LARGE, 0
        if room <= 0:
            lot = self.lot
            if lot.parked + lot.queued + lot.sent >= self.config.max_parked:
                return Refusal.FULL, 0
            return Refusal.OUT_OF_FDS, 0
        fd = entry.fd
        code, family, peer = inspect(fd)
        if code is not Refusal.OK:
            return code, 0
        same = peers.get(peer)
        if same is not None:  # rare: two entries with one peer address
            others = same if isinstance(same, list) else [same]
            if any(same_open_file(other, fd) for other in others):
                return Refusal.DUPLICATE, 0
        try:
            self.watcher.register(fd)
        except OSError as exc:
            return self._unwatchable(fd, exc), 0
        if same is None:
            peers[peer] = fd
        elif isinstance(same, list):
            same.append(fd)
        else:
            peers[peer] = [same, fd]
        return Refusal.OK, family

    # -- output --------------------------------------------------------------------------

    def _reply(self, s: _Session, msg: Message) -> None:
        if s.ending is None:
            s.outbox.add(encode(msg))
            self.lot.dirty.add(s)

    def _over(self, s: _Session) -> bool:
        ob = s.outbox
        return ob.queued_bytes >= self._max_out_bytes or ob.queued_frames >= self._max_out_frames

    def _encode_wakes(self, s: _Session) -> None:
        """Encode queued wakes into the outbox, one frame per WAKE, up to the byte cap."""
        ob = s.outbox
        cap = self.config.max_output_bytes
        ext = s.version >= 3
        while s.outq and ob.queued_bytes < cap:
            frames, groups, n = wake_frames(s.outq, cap - ob.queued_bytes, ext)
            slots = self.lot.take_outq(s, count=n)
            if self._mirror is not None:  # before the WAKE can reach anyone
                self._mirror_send(encode_woken([(x.ticket, x.reason) for x in slots]))
            ob.add(frames, groups)

    def _pump(self, s: _Session) -> None:
        """Encode and send what the session's socket takes now; the writer does the rest."""
        if s.sock.fileno() < 0:
            return
        ob = s.outbox
        try:
            while True:
                if s.ending is None:
                    self._encode_wakes(s)
                if not ob:
                    break
                ob.send_some(s.sock)
                if not s.outq or s.ending is not None:
                    break
        except BlockingIOError:
            pass
        except OSError as exc:
            self._written(s)
            # Only a closed end (EPIPE, ECONNRESET): a worker that is alive (the
            # send failed for another reason) may still be told its parks are
            # its own when this session ends, so those are not kept.
            s.peer_closed = exc.errno in (errno.EPIPE, errno.ECONNRESET)
            self._end(s, None, f"send failed: {exc}")
            return
        self._written(s)
        if ob or (s.outq and s.ending is None):
            s.wakeup.set()
        if self._over(s):
            if s.over_since is None:
                s.over_since = trio.current_time()
        else:
            s.over_since = None
            s.drained.set()

    def _written(self, s: _Session) -> None:
        sent = s.outbox.take_sent()
        if sent:
            now = trio.current_time()
            for group in sent:
                if isinstance(group, _Confirm):
                    if group.marked:
                        Lot.confirm(group.slots)
                    for inode, ticket in group.twins:  # (unless remembered anew since)
                        if self._twins.get(inode, (0,))[0] == ticket:
                            del self._twins[inode]
                    s.unconfirmed.discard(group)
                    if self._mirror is not None and group.slots:
                        tickets = [x.ticket for x in group.slots]
                        self._mirror_send(encode_tickets(MirrorKind.CONFIRMED, tickets))
                    continue
                self.lot.written(group)  # type: ignore[arg-type]
                self._observe_latency(group, now)  # type: ignore[arg-type]

    def _observe_latency(self, slots: list[Slot], now: float) -> None:
        """Wake latencies (readiness seen -> written). A frame's slots joined their
        session's queue in order of readiness: when the first and the last were
        woken at one instant (the usual: one UNPARK, one poll), so were all, and
        one bucket update counts them. (Wakes re-routed from two ended sessions,
        with one in between, break the order: that one then counts as theirs.)"""
        first = slots[0].key
        n = len(slots)
        if first == slots[-1].key:
            latency = now - float(first)
            self._latencies.extend([latency] * n)
            buckets = self._latency_buckets  # LatencyBuckets.observe, n at once
            buckets.counts[bisect_left(buckets.bounds, latency)] += n
            buckets.sum_s += latency * n
            return
        latencies = [now - float(x.key) for x in slots]
        self._latencies.extend(latencies)
        self._latency_buckets.observe(latencies)

    async def _writer(self, s: _Session) -> None:
        """Sends what ``_pump`` could not: when the worker is slow to read."""
        with s.writer_scope:
            while True:
                await s.wakeup.wait()
                s.wakeup = trio.Event()
                while s.outbox and s.sock.fileno() >= 0:
                    deadline = math.inf
                    if s.ending is not None:
                        deadline = s.end_deadline
                    elif s.over_since is not None:
                        deadline = s.over_since + self.config.output_timeout
                    with trio.move_on_at(deadline):
                        await trio.lowlevel.wait_writable(s.sock)
                        self._pump(s)
                        continue
                    if s.ending is not None:
                        return  # the grace is over; the reader's scope ends too
                    self._end(
                        s,
                        ErrorCode.LIMIT,
                        f"output over its limit for {self.config.output_timeout:g}s "
                        "(the worker does not read)",
                    )

    # -- ending a session ----------------------------------------------------------------

    def _end(self, s: _Session, code: int | None, why: str) -> None:
        """The container ends the session: ERROR (if ``code``), stop sending new output,
        re-route what was never written, read ACKs for ``end_grace``."""
        if s.ending is not None:
            return
        s.ending = why
        now = trio.current_time()
        s.end_deadline = now + self.config.end_grace
        s.read_scope.deadline = min(s.read_scope.deadline, s.end_deadline)
        moved = self._stop_sending(s)
        self._peer_log.log(
            logging.WARNING,
            "session %d (pool %r): %s; ending it (%d unsent wakes re-routed)",
            s.id,
            s.pool.name,
            why,
            moved,
        )
        if code is not None and s.sock.fileno() >= 0:
            # After the half-sent frame, if any: the stream stays well-formed.
            s.outbox.add(encode(Error(code, why)))
            self._pump(s)
        s.drained.set()
        self._flush()

    def _stop_sending(self, s: _Session) -> int:
        """No new wakes; those never written (queued or encoded, not begun) go elsewhere."""
        # PARKED replies still go out (an entry answered OK is the container's);
        # WAKEs not begun are dropped and their slots handed to other workers.
        _, tags = s.outbox.take_unstarted(
            only_tagged=True, keep_tag=lambda tag: isinstance(tag, _Confirm)
        )
        unwritten = [slot for group in tags for slot in group]  # type: ignore[attr-defined]
        return self.lot.retire(s, trio.current_time(), unwritten)

    async def _settle(self, s: _Session, eof: bool) -> None:
        """Who owns the session's written, un-ACKed wakes now that it is over.

        Once the worker's end is closed and nothing we wrote is unread (the
        kernel closed the fds of what it never read), they go to other
        workers. A worker that may still read them keeps them: we close our
        copies. A broken stream (``discard``: bad input, or cut short inside a
        frame) cannot tell ACKed from not: keep, unless the worker's process
        is gone (it holds nothing now; its end may close a moment before it
        is, hence the wait).
        """
        if s.inflight and eof:
            while True:
                if (not s.discard or peer_gone(s.sock)) and not unread_by_peer(s.sock):
                    moved = self.lot.release(s, trio.current_time())
                    self._log(
                        s,
                        logging.INFO,
                        "session %d (pool %r) ended; %d unacknowledged wakes re-routed",
                        s.id,
                        s.pool.name,
                        moved,
                    )
                    return
                if trio.current_time() >= s.end_deadline:
                    break
                await trio.sleep(0.02)
        left = self.lot.abandon(s)
        for slot in left:
            self._close_slot(slot)
        level = logging.WARNING if left else logging.INFO
        self._log(
            s,
            level,
            "session %d (pool %r) ended (%s); %d unacknowledged wakes left with the worker",
            s.id,
            s.pool.name,
            s.ending,
            len(left),
        )

    def _forget_session(self, s: _Session) -> None:
        s.writer_scope.cancel()
        if s.unconfirmed:  # its worker never saw these PARKED: it will send them again
            now = trio.current_time()
            for confirm in s.unconfirmed:
                # Whatever became of them since (parked, woken, even ACKed by
                # another worker and closed): their fds may be gone, not their inodes.
                for slot, inode in zip(confirm.slots, confirm.inodes, strict=False):
                    self._remember_inode(inode, slot.ticket, now, s.id)
                Lot.confirm(confirm.slots)
            s.unconfirmed.clear()
        self._sessions.pop(s.id, None)
        self.serving.forget_session(s.id)
        if s.alive or s.inflight:  # cancelled (teardown) before settling
            self.lot.remove_session(s, now=trio.current_time())
        self._drop_pools((s.pool.name,))  # its last session, no connection: gone
        self._fds_in -= s.fds_in
        s.fds_in = 0
        self._close_sock(s)
        self._conns -= 1
        self._flush()
        self._poke_progress()

    def _close_sock(self, s: _Session) -> None:
        if s.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(s.sock)
            s.sock.close()
        s.outbox.close()

    def _log(self, s: _Session, level: int, fmt: str, *args: Any) -> None:
        """A session's line: DEBUG for statistics sessions; rate-limited (``LogLimit``)."""
        self._peer_log.log(logging.DEBUG if s.quiet else level, fmt, *args)

    # -- handshake -------------------------------------------------------------------------

    async def _handshake(self, conn: socket.socket, decoder: Decoder) -> _Session | None:
        uid = peer_uid(conn)
        if uid is not None and uid not in self.config.allow_uids:
            self._peer_log.log(
                logging.WARNING,
                "refused a session from uid %d (allowed: %s)",
                uid,
                self.config.allow_uids,
            )
            with trio.move_on_after(1.0):
                await _send_now(
                    conn,
                    Error(ErrorCode.NOT_ALLOWED, f"uid {uid} is not allowed to use this container"),
                )
            return None
        # Connections still in their handshake count: else all that said HELLO
        # after connecting became sessions, past the limit.
        if len(self._sessions) + self._handshaking >= self.config.max_sessions + STATS_SESSIONS_MAX:
            with trio.move_on_after(1.0):
                await _send_now(conn, Error(ErrorCode.TOO_MANY_SESSIONS, "too many sessions"))
            return None
        self._handshaking += 1
        try:
            return await self._greet(conn, decoder, uid)
        finally:
            self._handshaking -= 1

    async def _greet(
        self, conn: socket.socket, decoder: Decoder, uid: int | None
    ) -> _Session | None:
        """HELLO, then WELCOME (or ERROR): the handshake past the session count."""
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            hello = await _receive_hello(conn, decoder)
            if hello is None:
                return None
            if hello.version not in SUPPORTED_VERSIONS:
                await _send_now(
                    conn,
                    Error(
                        ErrorCode.VERSION,
                        f"protocol version {hello.version} not supported"
                        f" (this container speaks {sorted(SUPPORTED_VERSIONS)})",
                    ),
                )
                return None
            stats = hello.pool == STATS_POOL
            cap = STATS_SESSIONS_MAX if stats else self.config.max_sessions
            if self._session_count(stats) >= cap:
                kind = "statistics sessions" if stats else "sessions"
                await _send_now(
                    conn, Error(ErrorCode.TOO_MANY_SESSIONS, f"too many {kind} ({cap} open)")
                )
                return None
            self._joining[stats] += 1  # counted from here: WELCOME's send may wait
            try:
                return await self._welcome(conn, decoder, hello, uid)
            finally:
                self._joining[stats] -= 1
        self._peer_log.log(logging.INFO, "handshake timed out")
        return None

    def _session_count(self, stats: bool) -> int:
        """Sessions of workers (or of statistics), those joining included."""
        joined = sum(1 for x in self._sessions.values() if x.quiet is stats)
        return joined + self._joining[stats]

    async def _welcome(
        self, conn: socket.socket, decoder: Decoder, hello: Hello, uid: int | None
    ) -> _Session | None:
        """WELCOME (or ERROR: too many pools): a session now."""
        if not self._pool_room(hello.pool):
            await _send_now(
                conn,
                Error(
                    ErrorCode.TOO_MANY_SESSIONS,
                    f"too many pools ({self.config.max_pools} in use):"
                    f" no session in a new pool {hello.pool!r}",
                ),
            )
            return None
        if hello.resume_tickets:
            self._claimed(hello.resume_tickets, self._next_session)
            self._flush_mirror()  # before WELCOME: the worker forgets them after it
        sid = self._next_session
        self._next_session += 1
        if hello.resume_session:
            self._note_lineage(sid, hello.resume_session)
        await _send_now(
            conn,
            Welcome(
                sid,
                self.config.max_token,
                self.config.max_pending,
                window=self.config.window,
                shard=self.shard if hello.version >= 4 else 0,
                shards=self.shards if hello.version >= 4 else 0,
            ),
        )
        # The pool now, not before the await: a session ending meanwhile may
        # drop it (``_drop_pools``), and this one must join the lot's own.
        session = _Session(sid, self.lot.pool(hello.pool), hello.name, conn, decoder)
        session.version = hello.version
        session.resumes = hello.resume_session
        self._sessions[session.id] = session
        self.lot.add_session(session, trio.current_time())
        self._flush()
        self._log(
            session,
            logging.INFO,
            "session %d: pool %r, worker %r, uid %s",
            session.id,
            hello.pool,
            hello.name,
            uid,
        )
        return session

    def _pool_room(self, name: str) -> bool:
        """Whether a session of pool ``name`` may come in: a known pool, or fewer
        than ``max_pools`` known once the unused ones are dropped."""
        pools = self.lot.pools
        if name in pools or len(pools) < self.config.max_pools:
            return True
        self._drop_pools(list(pools))
        return len(pools) < self.config.max_pools

    def _drop_pools(self, names: Sequence[str]) -> None:
        """Forget pools with no session and no connection, and their rule sets."""
        in_use = {s.pool.name for s in self._sessions.values()}  # ending ones too
        for name in self.lot.drop_unused(n for n in names if n not in in_use):
            self.serving.forget_pool(name)

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
            processes=self._processes,
            wake_latency_histogram=self._latency_buckets.snapshot(),
            **attrs.asdict(self.serving.stats()),
            tagged=lot.tags.tagged,
            tags=lot.tags.tags,
            packed=lot.packed,
        )


_Entry = TypeVar("_Entry", bound=tuple[Any, ...])


def _pruned(
    table: dict[int, _Entry], now: float, floor: int, cap: int
) -> tuple[dict[int, _Entry], int]:
    """A memory of recent sessions or sockets (``_twins``, ``_lineage``: each
    value's [1] is when) without the entries past ``TWIN_MEMORY``, and, if over
    ``cap`` still (a peer going fast), only the newest ``cap // 2``. With the size
    at which to prune next: twice what is left, from ``floor`` up to ``cap``; each
    pruning is a walk, so a peer cannot make every new entry pay for one."""
    kept = {k: v for k, v in table.items() if now - v[1] < TWIN_MEMORY}
    if len(kept) > cap:
        kept = dict(list(kept.items())[-(cap // 2) :])
    return kept, min(cap, max(floor, 2 * len(kept)))


class _FdFlood(RemoteProtocolError):
    """More fds than the incomplete frame can take: the stream cannot be trusted."""


def _inode(fd: int) -> int:
    """The inode of ``fd``'s open file, 0 if none (sockfs numbers sockets in
    sequence: a closed one's is not soon reused)."""
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return 0


async def _send_now(sock: socket.socket, msg: Message) -> None:
    """Send one small fd-less message (handshake time: no writer task yet).

    A peer already gone is not an error here: the caller ends the session anyway.
    """
    data = b"".join(f.data for f in encode(msg))
    while data:
        try:
            sent = sock.send(data)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        except OSError as exc:
            LOGGER.debug("handshake send: %s", exc)
            return
        data = data[sent:]


async def _receive_hello(sock: socket.socket, decoder: Decoder) -> Hello | None:
    """The first message, read fd-less: a HELLO carries none and gets none in."""
    while True:
        msg = decoder.next_message()
        if msg is not None:
            if not isinstance(msg, Hello):
                close_fds(message_fds(msg))
                raise RemoteProtocolError(f"expected HELLO first, got {type(msg).__name__}")
            return msg
        await trio.lowlevel.wait_readable(sock)
        try:
            data = recv_fdless(sock, decoder.frame_head(), decoder.buffered)
        except BlockingIOError:
            continue
        if data is None:
            raise RemoteProtocolError("expected HELLO first, got fds")
        if not data:
            decoder.eof()
            return None
        decoder.receive_data(data)


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
