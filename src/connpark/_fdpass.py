"""SCM_RIGHTS fd-passing: the only module that calls sendmsg/recvmsg with ancillary data.

Rules it keeps, whatever the caller does:

- fds go with the first byte of their frame, never twice; a partial send
  carries on with plain bytes;
- received fds are close-on-exec (MSG_CMSG_CLOEXEC, or FD_CLOEXEC set right
  after receipt where the OS lacks the flag);
- MSG_CTRUNC (the kernel dropped fds: small buffer or RLIMIT_NOFILE) is a
  protocol error, and the fds that did arrive are closed;
- sending never takes ownership: the caller keeps its copies of sent fds.

``TrioChannel`` drives a non-blocking stdlib socket with
``trio.lowlevel.wait_readable/wait_writable`` (much faster than trio's socket
methods for small messages); ``BlockingChannel`` is the same for threads.
"""

from __future__ import annotations

import array
import errno
import fcntl
import math
import os
import select
import socket
import struct
import sys
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Final

import trio

from ._errors import RemoteProtocolError
from ._wire import HEADER, MAX_FDS_PER_FRAME, Decoder, Frame, Message, close_fds, encode_all

MSG_CMSG_CLOEXEC: int = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
#: Plain ints: ``flags & socket.MSG_CTRUNC`` runs IntFlag's Python-level __rand__.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_INT_SIZE = array.array("i").itemsize
RECV_SIZE = 1 << 16


def ancillary_space(max_fds: int = MAX_FDS_PER_FRAME) -> int:
    """Control-buffer size that holds ``max_fds`` fds."""
    return socket.CMSG_SPACE(max_fds * _INT_SIZE)


_SPACE = ancillary_space()
_SOL_SOCKET = socket.SOL_SOCKET
_SCM_RIGHTS = socket.SCM_RIGHTS


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of every SCM_RIGHTS message, in order (the kernel sends one)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            try:
                fds.frombytes(data)
            except ValueError:  # a partial int at the end (never seen): the whole ones
                fds.frombytes(data[: len(data) - len(data) % _INT_SIZE])
    return fds.tolist()


def recv_fds(
    sock: socket.socket, bufsize: int = RECV_SIZE, max_fds: int = MAX_FDS_PER_FRAME
) -> tuple[bytes, list[int]]:
    """One recvmsg: (bytes, fds). b"" means EOF. Blocking behaviour is the socket's.

    Raises ``RemoteProtocolError`` on MSG_CTRUNC after closing what arrived.
    """
    space = _SPACE if max_fds == MAX_FDS_PER_FRAME else ancillary_space(max_fds)
    data, ancdata, msg_flags, _ = sock.recvmsg(bufsize, space, MSG_CMSG_CLOEXEC)
    fds = _fds_from_ancillary(ancdata) if ancdata else []
    if not MSG_CMSG_CLOEXEC:  # macOS: close the race window as soon as we can
        for fd in fds:
            os.set_inheritable(fd, False)
    if msg_flags & _MSG_CTRUNC:
        close_fds(fds)
        raise RemoteProtocolError(
            f"ancillary data truncated (MSG_CTRUNC): fds were dropped ({len(fds)} arrived)"
        )
    return data, fds


def fd_free_prefix(head: bytes, buffered: int, data: bytes) -> int:
    """How much of ``data`` a peer keeping the rules cannot have sent fds with.

    ``data`` follows ``buffered`` bytes already received, the start of an
    incomplete frame (``head``: its first bytes, up to a header). Its fds came
    with its first byte, so the rest of it is fd-free; so is every following
    frame whose header says ``nfds == 0``. The prefix ends where a frame that
    takes fds (or whose header is not all there) begins.
    """
    pos = 0
    if buffered:
        hdr = (head + data)[: HEADER.size]
        if len(hdr) < HEADER.size:
            return len(data)
        pos = HEADER.size + HEADER.unpack(hdr)[0]
    total = buffered + len(data)
    while pos < total:
        off = pos - buffered
        hdr = data[off : off + HEADER.size]
        if len(hdr) < HEADER.size:
            return off
        length, _type, _flags, nfds = HEADER.unpack(hdr)
        if nfds:
            return off
        pos += HEADER.size + length
    return len(data)


def recv_fdless(
    sock: socket.socket, head: bytes, buffered: int, bufsize: int = RECV_SIZE
) -> bytes | None:
    """Receive only bytes that carry no fds: for when the container has no room for them.

    A ``MSG_PEEK`` with no control buffer says whether fds wait (MSG_CTRUNC,
    and the kernel keeps them queued); if so, only the fd-free prefix
    (``fd_free_prefix``) is received. Returns None when the very next byte may
    carry fds (wait for room), b"" at EOF. fds where no frame starts are a
    protocol error (the kernel closes them: nothing is installed here).
    """
    data, _anc, flags, _ = sock.recvmsg(bufsize, 0, socket.MSG_PEEK)
    if not data:
        return b""
    n = len(data)
    if flags & _MSG_CTRUNC:
        n = fd_free_prefix(head, buffered, data)
        if not n:
            return None
    got, _anc, flags, _ = sock.recvmsg(n, 0)
    if flags & _MSG_CTRUNC:
        raise RemoteProtocolError("fds sent in the middle of a frame")
    return got


def unread_by_peer(sock: socket.socket) -> int | None:
    """Bytes we wrote that the peer has not read yet (Linux SIOCOUTQ); None if unknown.

    Zero once the peer read everything or its socket is gone (the kernel
    closes the fds of unread frames then); a peer that only shut its end down
    can still read, and this stays above zero.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return None
    return int(struct.unpack("i", raw)[0])


#: A queued chunk: (bytes, fds, tag, how many frames).
_Chunk = tuple[bytearray, Sequence[int], object, int]


class Outbox:
    """Frames waiting to be sent, coalesced: fd-less frames ride with the one before
    (unless it carries fds: a chunk with fds is one frame, so that it is known
    when that frame is all out, ``stop_sending``).

    Each chunk is (bytes, fds, tag, how many frames); a chunk's fds go with
    its first byte only, so appending fd-less bytes to the last chunk is always
    safe, even after part of it went out.

    With ``own_fds`` (the default) the outbox holds its own ``dup`` of every
    fd it queues, closed once the fd has gone out (or the outbox is dropped):
    what the caller does with its copy meanwhile can never make a queued frame
    carry a reused fd number. Without it the caller promises to keep each fd
    open until it has gone out, and saves a dup and a close per fd: the worker
    engine does (a parked socket is closed only once PARKED says so), and so
    does the container (a woken fd is its own until the ACK). The caller may
    tag frames (``add(frames, tags)``); ``take_sent()`` returns the tags of
    tagged frames whose first byte (and fds) the socket took.
    """

    def __init__(self, *, own_fds: bool = True) -> None:
        self._dup = own_fds
        self._chunks: deque[_Chunk] = deque()
        #: The head chunk has started going out (its fds, if any, went with it).
        self._started = False
        self._sent_tags: list[object] = []
        #: Our copies of the fds of frames ``stop_sending`` dropped: closed by ``close``.
        self._dropped: list[Sequence[int]] = []
        #: The fds of the head frame while it is begun and not finished (kept open
        #: till then): a peer discards a frame cut short, fds and all.
        self._part: Sequence[int] | None = None
        #: ``stop_sending`` cut the head short: nothing may go out any more (the
        #: peer would read the next bytes as the rest of that frame).
        self._sealed = False
        #: Bytes and frames queued (a frame counts until its chunk is all sent).
        self.queued_bytes = 0
        self.queued_frames = 0

    def __bool__(self) -> bool:
        return bool(self._chunks)

    def add(self, frames: Iterable[Frame], tags: Iterable[object] | None = None) -> None:
        """Queue frames; ``tags`` (one per frame, None for none) come back from ``take_sent``."""
        if self._sealed:
            return
        chunks = self._chunks
        tag_iter = _NO_TAGS if tags is None else iter(tags)
        for data, fds in frames:
            tag = next(tag_iter, None)
            # Never onto a frame with fds, nor onto the rest of one half sent
            # (``_part``): a chunk with fds is that one frame (``stop_sending``).
            if (
                not fds
                and tag is None
                and chunks
                and chunks[-1][2] is None
                and not chunks[-1][1]
                and (self._part is None or len(chunks) > 1)
            ):
                buf, held, _, n = chunks[-1]
                buf += data
                chunks[-1] = (buf, held, None, n + 1)
            else:
                chunks.append((bytearray(data), _dup_all(fds) if self._dup else fds, tag, 1))
            self.queued_bytes += len(data)
            self.queued_frames += 1

    def send_some(self, sock: socket.socket, flags: int = 0) -> None:
        """Send until empty. Raises BlockingIOError (socket full) or OSError.

        ``flags``: MSG_DONTWAIT sends without blocking on a blocking socket.
        """
        chunks = self._chunks
        while chunks:
            data, fds, tag, frames = chunks[0]
            if fds:
                anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))]
                sent = sock.sendmsg([data], anc, flags)
                if sent < len(data):
                    self._part = fds  # closed (ours) once the frame is all out
                elif self._dup or type(fds) is _Held:
                    close_fds(fds)  # the peer has its own now
            else:
                sent = sock.send(data, flags)
            if tag is not None and not self._started:
                self._sent_tags.append(tag)
            self.queued_bytes -= sent
            if sent < len(data):  # the rest goes on as plain bytes: its fds are gone
                del data[:sent]
                chunks[0] = (data, (), tag, frames)
                self._started = True
            else:
                chunks.popleft()
                self.queued_frames -= frames
                self._started = False
                if self._part is not None:
                    self._close_part()

    def hold_fds(self) -> None:
        """Take a ``dup`` of every fd still queued (not ``own_fds``): for when the
        caller can no longer keep its copies open until they go out (a park it
        stopped waiting for is its own again, to close and reuse the number)."""
        if self._dup:
            return
        if self._part is not None and type(self._part) is not _Held:
            self._part = _Held(_dup_all(self._part))
        chunks = self._chunks
        for i, (data, fds, tag, frames) in enumerate(chunks):
            if fds and type(fds) is not _Held:
                chunks[i] = (data, _Held(_dup_all(fds)), tag, frames)

    def stop_sending(self) -> list[int]:
        """The caller closes the socket now: returns the fds no peer will take in.

        Every chunk with fds not begun is dropped. A head frame with fds begun
        and not finished is cut short: the peer reads part of it, then the end,
        and discards it with its fds. Its fds are returned too, and nothing
        goes out any more (the next bytes would read as the rest of it). Copies we held of these fds
        close with ``close`` (the caller may still read their keys). Otherwise
        chunks without fds (ACKs, say) stay, and so does a half-sent head
        without fds."""
        fds_out: list[int] = []
        dropped = [fds for _d, fds, _t, _f in self._drop_unstarted(lambda chunk: not chunk[1])]
        part, self._part = self._part, None
        if part is not None:
            dropped.append(part)
            self._sealed = True
            for _data, fds, _tag, _frames in self._chunks:  # (fd-less: the rest was dropped)
                dropped.append(fds)
            self._chunks.clear()
            self.queued_bytes = self.queued_frames = 0
            self._started = False
        for fds in dropped:
            fds_out.extend(fds)
            if self._dup or type(fds) is _Held:
                self._dropped.append(fds)
        return fds_out

    def _close_part(self) -> None:
        """The head frame went out whole: our copies of its fds may close."""
        part, self._part = self._part, None
        if part is not None and (self._dup or type(part) is _Held):
            close_fds(part)

    def take_sent(self) -> list[object]:
        """Tags of the frames that went out since the last call, in order."""
        out, self._sent_tags = self._sent_tags, []
        return out

    def discard_unstarted(self) -> bool:
        """Drop every chunk not yet begun (closing their fds); False if one is half sent."""
        return self.take_unstarted()[0]

    def take_unstarted(
        self, *, only_tagged: bool = False, keep_tag: Callable[[object], bool] | None = None
    ) -> tuple[bool, list[object]]:
        """``discard_unstarted``, also returning the dropped frames' tags.

        ``only_tagged`` keeps untagged frames (they never share a chunk with a
        tagged one), and ``keep_tag`` the tagged ones it says yes to: the
        container drops its WAKEs but still sends its PARKED.
        """

        def keep(chunk: _Chunk) -> bool:
            tag = chunk[2]
            return (only_tagged and tag is None) or (keep_tag is not None and keep_tag(tag))

        head_started = self._started and bool(self._chunks)
        tags: list[object] = []
        for _data, fds, tag, _frames in self._drop_unstarted(keep):
            if self._dup or type(fds) is _Held:
                close_fds(fds)
            if tag is not None:
                tags.append(tag)
        return not head_started, tags

    def _drop_unstarted(self, keep: Callable[[_Chunk], bool]) -> list[_Chunk]:
        """Take out of the queue the chunks not begun that ``keep`` does not keep,
        in order, counted out of ``queued_bytes``/``queued_frames`` (a half-sent
        head always stays: its fds went with its first byte). The caller
        disposes of their fds."""
        chunks = self._chunks
        kept = [chunks.popleft()] if self._started and chunks else []
        dropped: list[_Chunk] = []
        while chunks:
            chunk = chunks.popleft()
            if keep(chunk):
                kept.append(chunk)
                continue
            self.queued_bytes -= len(chunk[0])
            self.queued_frames -= chunk[3]
            dropped.append(chunk)
        chunks.extend(kept)
        return dropped

    def close(self) -> None:
        """Forget everything queued; close the fds we held for it (``dup`` only)."""
        while self._chunks:
            fds = self._chunks.popleft()[1]
            if self._dup or type(fds) is _Held:
                close_fds(fds)
        while self._dropped:
            close_fds(self._dropped.pop())
        self._close_part()
        self.queued_bytes = self.queued_frames = 0
        self._started = False  # (a half-sent head went with the rest)


#: ``Outbox.add``'s tags when it is given none: None for every frame.
_NO_TAGS: Final = repeat(None)


class _Held(list[int]):
    """fds an ``Outbox`` without ``own_fds`` holds copies of all the same (``hold_fds``)."""

    __slots__ = ()


def _dup_all(fds: Iterable[int]) -> list[int]:
    """Our own copies of ``fds`` (none left open if one ``dup`` fails)."""
    held: list[int] = []
    try:
        for fd in fds:
            held.append(os.dup(fd))
    except OSError:
        close_fds(held)
        raise
    return held


class TrioChannel:
    """A connected AF_UNIX stream socket carrying frames and fds, for trio code.

    One task may receive while others send; sends are serialised by a lock.
    """

    def __init__(self, sock: socket.socket, *, own_fds: bool = True) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._send_lock = trio.Lock()
        self._outbox = Outbox(own_fds=own_fds)
        self.closed = False

    def try_send_nowait(self, frames: Iterable[Frame]) -> bool:
        """Send now, without yielding, unless another task is mid-send (then False).

        Whatever the socket does not take stays queued: ``flush_needed`` says
        so, and the next ``send_frames`` (even with no frames) sends it first.
        Raises OSError if the peer is gone.
        """
        if self.busy:
            return False
        self._outbox.add(frames)
        try:
            self._outbox.send_some(self.sock)
        except BlockingIOError:
            pass
        return True

    @property
    def flush_needed(self) -> bool:
        """Bytes are queued that the socket did not take yet."""
        return bool(self._outbox)

    @property
    def busy(self) -> bool:
        """Another task is mid-send, or bytes are queued: ``try_send_nowait`` would refuse."""
        return self._send_lock.locked() or bool(self._outbox)

    async def send_frames(self, frames: Iterable[Frame]) -> None:
        # Fast path: nobody else is sending and the socket takes it all. A
        # trio.Lock always yields once, which costs tens of microseconds.
        queued = self.try_send_nowait(frames)
        if queued and not self._outbox:
            return
        if not queued:
            # Queued now, in call order; the lock only paces the writing. Waiting
            # for it outside the queue, they would escape ``stop_sending`` (and be
            # lost if we are cancelled meanwhile): whoever holds the lock sends them.
            self._outbox.add(frames)
        async with self._send_lock:
            while True:
                try:
                    return self._outbox.send_some(self.sock)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)

    async def send(self, *msgs: Message) -> None:
        await self.send_frames(encode_all(msgs))

    async def receive(self, max_fds: int = MAX_FDS_PER_FRAME) -> tuple[bytes, list[int]]:
        """Next (bytes, fds); b"" at EOF."""
        while True:
            try:
                return recv_fds(self.sock, RECV_SIZE, max_fds)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)

    async def receive_message(self, decoder: Decoder) -> Message | None:
        """Next message from the peer, or None at a clean EOF."""
        while True:
            msg = decoder.next_message()
            if msg is not None:
                return msg
            data, fds = await self.receive()
            if not data:
                close_fds(fds)
                decoder.eof()
                return None
            decoder.receive_data(data, fds)

    def discard_unstarted(self) -> bool:
        """Drop queued frames nobody has begun to send; False if one is half sent."""
        return self._outbox.discard_unstarted()

    def hold_fds(self) -> None:
        """Hold copies of the queued fds: their owners may close them now."""
        self._outbox.hold_fds()

    def stop_sending(self) -> list[int]:
        """The socket closes now: the fds no peer takes in (``Outbox.stop_sending``)."""
        return self._outbox.stop_sending()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
            self._outbox.close()


class BlockingChannel:
    """The same as ``TrioChannel`` for threads: blocking reads, thread-safe sends.

    ``try_send`` never blocks: what the socket does not take now stays queued
    (``flush_needed``) for ``flush``, so that a caller with a deadline is not
    held past it by a full socket (a frozen peer). ``send_frames`` blocks
    until all is sent. A lock guards the queue, never held while waiting.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._lock = threading.Lock()
        #: Without ``own_fds``: a caller keeps each fd open until it has gone out,
        #: or calls ``hold_fds`` first (a park it stopped waiting for).
        self._outbox = Outbox(own_fds=False)
        self.closed = False

    def try_send(self, frames: Iterable[Frame]) -> None:
        """Queue ``frames`` and send what the socket takes now. Raises OSError if the
        peer is gone (then nothing more can be sent)."""
        with self._lock:
            self._outbox.add(frames)
            self._send_queued()

    def _send_queued(self) -> None:
        """Under ``_lock``."""
        if self.closed:
            raise OSError(errno.EBADF, "the channel is closed")
        try:
            self._outbox.send_some(self.sock, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass

    @property
    def flush_needed(self) -> bool:
        """Bytes are queued that the socket did not take yet."""
        return bool(self._outbox)

    def flush(self, timeout: float | None) -> bool:
        """Send what is queued, waiting up to ``timeout`` s for room; True once all
        went out. Raises OSError if the peer is gone."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                self._send_queued()
                if not self._outbox:
                    return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            wait_writable_blocking(self.sock, left)

    def send_frames(self, frames: Iterable[Frame]) -> None:
        """Send ``frames`` (after anything queued), blocking until all went out."""
        self.try_send(frames)
        self.flush(None)

    def send(self, *msgs: Message) -> None:
        self.send_frames(encode_all(msgs))

    def hold_fds(self) -> None:
        """Hold copies of the queued fds: their owners may close them now."""
        with self._lock:
            self._outbox.hold_fds()

    def stop_sending(self) -> list[int]:
        """The socket closes now (a writer thread mid-``flush`` included): the fds
        no peer takes in (``Outbox.stop_sending``)."""
        with self._lock:
            return self._outbox.stop_sending()

    def receive_message(self, decoder: Decoder, timeout: float | None = None) -> Message | None:
        """Next message, or None at a clean EOF. Raises TimeoutError after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = decoder.next_message()
            if msg is not None:
                return msg
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())
                if not wait_readable_blocking(self.sock, left):
                    raise TimeoutError("no message from the peer in time")
            data, fds = recv_fds(self.sock)
            if not data:
                close_fds(fds)
                decoder.eof()
                return None
            decoder.receive_data(data, fds)

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                self.sock.close()
                self._outbox.close()


def wait_readable_blocking(sock: socket.socket, timeout: float | None) -> bool:
    """poll(2) for readability (select(2) cannot see fds above 1023)."""
    return _poll_blocking(sock, select.POLLIN, timeout)


def wait_writable_blocking(sock: socket.socket, timeout: float | None) -> bool:
    """poll(2) for room to write (or an error: the next send raises it)."""
    return _poll_blocking(sock, select.POLLOUT, timeout)


def _poll_blocking(sock: socket.socket, events: int, timeout: float | None) -> bool:
    fd = sock.fileno()
    if fd < 0:  # closed meanwhile (by another thread): nothing to wait for
        return True
    poller = select.poll()
    poller.register(fd, events)
    ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
    return bool(poller.poll(ms))
