"""fd passing over real socketpairs: order, identity, CTRUNC, missing fds, no leaks."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import threading

import pytest
import trio
import trio.testing

from connpark import RemoteProtocolError
from connpark._fdpass import (
    BlockingChannel,
    Outbox,
    TrioChannel,
    _fds_from_ancillary,
    fd_free_prefix,
    recv_fdless,
    recv_fds,
    unread_by_peer,
)
from connpark._wire import (
    HEADER,
    Decoder,
    Frame,
    MessageType,
    Park,
    ParkEntry,
    Reason,
    Wake,
    WakeEntry,
    close_fds,
    encode,
)

from .conftest import open_fd_count

pytestmark = pytest.mark.linux


def _inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _distinct_files(n: int) -> list[int]:
    """n fds that each refer to a different open file (so order is checkable)."""
    fds = []
    for _ in range(n // 2 + 1):
        r, w = os.pipe()
        fds += [r, w]
    for fd in fds[n:]:
        os.close(fd)
    return fds[:n]


@pytest.mark.parametrize("n", [1, 253, 1000])
def test_blocking_fds_arrive_in_order_and_same_files(n: int) -> None:
    before = open_fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender, receiver = BlockingChannel(a), BlockingChannel(b)
    fds = _distinct_files(n)
    msg = Park(1, tuple(ParkEntry(fd, token=i.to_bytes(4, "big")) for i, fd in enumerate(fds)))
    frames = encode(msg)
    assert len(frames) == -(-n // 253)
    t = threading.Thread(target=sender.send_frames, args=(frames,))
    t.start()
    decoder = Decoder()
    got = receiver.receive_message(decoder, timeout=10)
    t.join()
    assert isinstance(got, Park)
    assert [e.token for e in got.entries] == [e.token for e in msg.entries]
    assert [_inode(e.fd) for e in got.entries] == [_inode(fd) for fd in fds]
    assert not ({e.fd for e in got.entries} & set(fds))  # new fds, not the same numbers
    for e in got.entries:
        assert not os.get_inheritable(e.fd)  # close-on-exec on receipt
        os.close(e.fd)
    for fd in fds:
        os.close(fd)
    sender.close()
    receiver.close()
    assert open_fd_count() == before


async def test_trio_channel_round_trip_1000_fds() -> None:
    before = open_fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # Small buffers force partial sends: fds must still go once, with the first byte.
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender, receiver = TrioChannel(a), TrioChannel(b)
    fds = _distinct_files(1000)
    big = b"x" * 3000
    msg = Wake(tuple(WakeEntry(i, Reason.READABLE, b"t", big, fd) for i, fd in enumerate(fds)))
    got: list[object] = []

    async def receive() -> None:
        got.append(await receiver.receive_message(Decoder(max_body=1 << 22)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await sender.send(msg)
    (wake,) = got
    assert isinstance(wake, Wake)
    assert [e.ticket for e in wake.entries] == list(range(1000))
    assert all(e.pending == big for e in wake.entries)
    assert [_inode(e.fd) for e in wake.entries if e.fd is not None] == [_inode(f) for f in fds]
    for e in wake.entries:
        assert e.fd is not None
        os.close(e.fd)
    for fd in fds:
        os.close(fd)
    sender.close()
    receiver.close()
    assert open_fd_count() == before


def test_small_ancillary_buffer_is_protocol_error_and_closes_fds() -> None:
    before = open_fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = _distinct_files(253)
    outbox = Outbox()
    outbox.add(encode(Park(1, tuple(ParkEntry(fd) for fd in fds))))
    outbox.send_some(a)
    with pytest.raises(RemoteProtocolError, match="MSG_CTRUNC"):
        recv_fds(b, max_fds=4)
    for fd in fds:
        os.close(fd)
    a.close()
    b.close()
    assert open_fd_count() == before


def test_frame_whose_fds_never_come_is_an_error_not_a_hang() -> None:
    before = open_fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    (real,) = encode(Park(9, (ParkEntry(0, b"tok"),)))
    # The same frame bytes, sent without SCM_RIGHTS.
    a.sendall(real.data)
    with pytest.raises(RemoteProtocolError, match="needs 1 fds"):
        BlockingChannel(b).receive_message(Decoder(), timeout=5)
    a.close()
    b.close()
    assert open_fd_count() == before


def test_fds_with_a_bad_frame_are_closed() -> None:
    before = open_fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = _distinct_files(3)
    bogus = HEADER.pack(0, MessageType.ACK, 0, 3)  # ACK cannot carry fds
    outbox = Outbox()
    outbox.add([Frame(bogus, tuple(fds))])
    outbox.send_some(a)
    for fd in fds:
        os.close(fd)
    with pytest.raises(RemoteProtocolError, match="cannot carry fds"):
        BlockingChannel(b).receive_message(Decoder(), timeout=5)
    a.close()
    b.close()
    assert open_fd_count() == before


def test_outbox_coalesces_fdless_frames_and_keeps_fd_boundaries() -> None:
    before = open_fd_count()
    r, w = os.pipe()
    outbox = Outbox()
    frames = [Frame(b"a"), Frame(b"b", (r,)), Frame(b"c"), Frame(b"d"), Frame(b"e", (w,))]
    outbox.add(frames)
    chunks = [(bytes(d), [_inode(fd) for fd in f]) for d, f, _tag, _n in outbox._chunks]
    # (A chunk with fds is that one frame: ``stop_sending`` tells when it is all out.)
    assert chunks == [(b"a", []), (b"b", [_inode(r)]), (b"cd", []), (b"e", [_inode(w)])]
    # The outbox holds its own copies: closing ours cannot change what it sends.
    os.close(r)
    os.close(w)
    assert open_fd_count() == before + 2
    outbox.close()
    assert open_fd_count() == before


def test_outbox_discards_unstarted_chunks_and_their_fds() -> None:
    before = open_fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    fds = _distinct_files(4)
    outbox = Outbox()
    outbox.add([Frame(b"x" * 300_000, (fds[0],)), Frame(b"y", (fds[1],))])
    with pytest.raises(BlockingIOError):
        outbox.send_some(a)  # the first chunk is half sent
    assert outbox.discard_unstarted() is False  # the half-sent one stays
    assert len(outbox._chunks) == 1
    outbox.close()
    fresh = Outbox()
    fresh.add([Frame(b"z", (fds[2],)), Frame(b"w", (fds[3],))])
    assert fresh.discard_unstarted() is True
    assert not fresh
    for fd in fds:
        os.close(fd)
    a.close()
    b.close()
    assert open_fd_count() == before


def test_outbox_stop_sending_drops_the_frames_with_fds_not_begun_and_keeps_the_rest() -> None:
    """At close (``Engine.finish_close``): a frame with fds not begun must never go
    out (its sockets are the callers' again), and the fd-less frames queued ahead
    of the first frame with fds (the ACKs of wakes the worker took:
    ``data_to_send`` puts them first) still go."""
    before = open_fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    fds = _distinct_files(3)
    outbox = Outbox(own_fds=False)
    outbox.add([Frame(b"ack1"), Frame(b"park1", (fds[0],)), Frame(b"stats")])
    outbox.add([Frame(b"ack2"), Frame(b"park2", (fds[1],))])
    outbox.hold_fds()  # (a withdrawn park: the outbox holds copies of its own)
    assert open_fd_count() == before + 2 + 3 + 2  # the pair, the files, held copies
    assert sorted(map(_inode, outbox.stop_sending())) == sorted(map(_inode, fds[:2]))
    # The fd-less frames stay, those behind a frame with fds too (they used to
    # ride with it and go with it: an ACK lost so let the container give a wake
    # the worker took to another worker).
    chunks = [(bytes(d), f) for d, f, _t, _n in outbox._chunks]
    assert chunks == [(b"ack1", ()), (b"statsack2", ())]
    outbox.send_some(a)
    assert b.recv(100) == b"ack1statsack2"
    outbox.close()  # the held copies of the dropped frames' fds
    for fd in fds:
        os.close(fd)
    a.close()
    b.close()
    assert open_fd_count() == before


@pytest.mark.parametrize("held", [False, True])
def test_outbox_stop_sending_cuts_a_half_sent_frame_with_fds_short(held: bool) -> None:
    """A frame with fds begun and not finished when the socket is about to close:
    the peer gets part of it, then the end, and discards it with its fds (the
    container never admits a frame cut short). So ``stop_sending`` counts its
    fds among those no peer takes in (their sockets are the callers'), and
    nothing goes out after it, not even the rest of it: the peer would read
    the next bytes as the rest of that frame. A half-sent frame without fds
    still finishes."""
    before = open_fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    fds = _distinct_files(2)
    outbox = Outbox(own_fds=False)
    outbox.add([Frame(b"x" * 300_000, (fds[0],)), Frame(b"ack1"), Frame(b"p", (fds[1],))])
    with pytest.raises(BlockingIOError):
        outbox.send_some(a)
    if held:  # (a withdrawn park: its caller may close its copy now)
        outbox.hold_fds()
    cut = outbox.stop_sending()
    assert sorted(map(_inode, cut)) == sorted(map(_inode, fds))
    assert not outbox
    outbox.add([Frame(b"ack2")])  # sealed: nothing more goes out
    outbox.send_some(a)
    assert not outbox
    a.shutdown(socket.SHUT_WR)
    received = bytearray()
    while True:
        data, got = recv_fds(b)
        close_fds(got)
        if not data:
            break
        received += data
    assert 0 < len(received) < 300_000
    assert set(received) == {ord("x")}
    outbox.close()
    for fd in fds:
        os.close(fd)
    a.close()
    b.close()
    assert open_fd_count() == before


def test_outbox_keeps_frames_added_after_a_half_sent_frame_with_fds_apart() -> None:
    """An fd-less frame queued while a frame with fds is half sent must not join
    the rest of it: that frame could then go out whole with the newcomer cut,
    and ``stop_sending`` would call a frame the peer admitted cut short."""
    before = open_fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    (fd,) = _distinct_files(1)
    outbox = Outbox(own_fds=False)
    outbox.add([Frame(b"x" * 300_000, (fd,))])
    with pytest.raises(BlockingIOError):
        outbox.send_some(a)
    outbox.add([Frame(b"u" * 300_000)])  # (an UNPARK, say)
    assert len(outbox._chunks) == 2
    got = 0
    while got < 300_000:  # the peer reads exactly the rest of the first frame
        data, fds = recv_fds(b, 300_000 - got)
        close_fds(fds)
        got += len(data)
        with contextlib.suppress(BlockingIOError):
            outbox.send_some(a)
    assert outbox._part is None  # all out: no longer cut short if we close now
    assert outbox.stop_sending() == []
    outbox.close()
    os.close(fd)
    a.close()
    b.close()
    assert open_fd_count() == before


def test_outbox_closes_its_copies_of_a_frame_s_fds_once_it_is_all_out() -> None:
    """(``own_fds``) The copies of a half-sent frame's fds stay open until its
    last byte goes (``stop_sending`` may still need their keys), then close."""
    before = open_fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    (fd,) = _distinct_files(1)
    outbox = Outbox()
    outbox.add([Frame(b"x" * 300_000, (fd,))])
    with pytest.raises(BlockingIOError):
        outbox.send_some(a)
    os.close(fd)
    assert open_fd_count() == before + 2 + 1  # the pair, our copy
    while outbox:
        _data, got = recv_fds(b)
        close_fds(got)
        with contextlib.suppress(BlockingIOError):
            outbox.send_some(a)
    assert open_fd_count() == before + 2
    outbox.close()
    a.close()
    b.close()
    assert open_fd_count() == before


def test_outbox_without_dup_sends_our_fds_and_reports_tags() -> None:
    before = open_fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    fds = _distinct_files(3)
    outbox = Outbox(own_fds=False)
    outbox.add([Frame(b"x" * 300_000, (fds[0],)), Frame(b"y", (fds[1],))], ["big", "small"])
    outbox.add([Frame(b"z", (fds[2],))], ["last"])
    assert open_fd_count() == before + 5  # no dups
    assert (outbox.queued_bytes, outbox.queued_frames) == (300_002, 3)
    with pytest.raises(BlockingIOError):
        outbox.send_some(a)
    assert outbox.take_sent() == ["big"]  # its fd went with its first byte
    ok, dropped = outbox.take_unstarted()
    assert (ok, dropped) == (False, ["small", "last"])
    assert open_fd_count() == before + 5  # the caller's fds: the outbox closes none
    assert outbox.queued_frames == 1
    while outbox:
        _data, got = recv_fds(b)
        close_fds(got)
        try:
            outbox.send_some(a)
        except BlockingIOError:
            pass
    assert (outbox.queued_bytes, outbox.queued_frames, outbox.take_sent()) == (0, 0, [])
    for fd in fds:
        os.close(fd)
    a.close()
    b.close()
    assert open_fd_count() == before


def _hdr(nfds: int, length: int = 0) -> bytes:
    return HEADER.pack(length, MessageType.PARK, 0, nfds) + b"." * length


def test_fd_free_prefix_stops_where_a_frame_takes_fds() -> None:
    assert fd_free_prefix(b"", 0, _hdr(0, 4) + _hdr(0, 2)) == 22
    assert fd_free_prefix(b"", 0, _hdr(0, 4) + _hdr(2, 2)) == 12
    assert fd_free_prefix(b"", 0, _hdr(3, 4)) == 0
    assert fd_free_prefix(b"", 0, _hdr(0, 4) + b"\0\0") == 12  # a header not all there
    # The rest of a frame whose first byte (and fds) came already is fd-free.
    head = _hdr(5, 10)[:8]
    assert fd_free_prefix(head, 12, b"......" + _hdr(1)) == 6
    assert fd_free_prefix(head[:3], 3, head[3:] + b"." * 10 + _hdr(0)) == 23


def test_recv_fdless_leaves_fds_queued_and_takes_the_bytes_before() -> None:
    before = open_fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    a.sendall(_hdr(0, 3))
    socket.send_fds(a, [_hdr(1, 2)], [r])
    assert recv_fdless(b, b"", 0) == _hdr(0, 3)
    assert open_fd_count() == before + 4  # nothing installed by the peek
    assert recv_fdless(b, b"", 0) is None  # the next frame carries an fd: wait for room
    data, got = recv_fds(b)
    assert data == _hdr(1, 2)
    assert len(got) == 1
    close_fds(got)
    # A peer that attaches fds in the middle of a frame: an error, nothing leaks.
    a.sendall(_hdr(0, 4)[:10])
    socket.send_fds(a, [b"zz"], [r])
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        recv_fdless(b, b"", 0)
    a.close()
    assert recv_fdless(b, b"", 0) == b""
    b.close()
    os.close(r)
    os.close(w)
    assert open_fd_count() == before


def test_unread_by_peer_counts_until_the_peer_reads_or_closes() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    assert unread_by_peer(a) == 0
    a.sendall(b"x" * 100)
    assert unread_by_peer(a)
    b.shutdown(socket.SHUT_RDWR)  # shut down, but it could still read
    assert unread_by_peer(a)
    assert b.recv(100) == b"x" * 100
    assert unread_by_peer(a) == 0
    a.close()
    b.close()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.sendall(b"y")
    b.close()  # gone: the kernel dropped what it never read
    assert unread_by_peer(a) == 0
    a.close()


def test_blocking_receive_times_out_and_eof_is_none() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    chan = BlockingChannel(b)
    with pytest.raises(TimeoutError):
        chan.receive_message(Decoder(), timeout=0.05)
    a.close()
    assert chan.receive_message(Decoder(), timeout=1) is None
    chan.close()


def test_outbox_tags_pad_with_none_and_extra_tags_are_ignored() -> None:
    outbox = Outbox(own_fds=False)
    outbox.add([Frame(b"a"), Frame(b"b"), Frame(b"c")], ["t"])  # b and c: untagged
    outbox.add([Frame(b"d")], ["u", "ignored"])
    assert [(bytes(d), tag, n) for d, _f, tag, n in outbox._chunks] == [
        (b"a", "t", 1),
        (b"bc", None, 2),
        (b"d", "u", 1),
    ]
    assert (outbox.queued_bytes, outbox.queued_frames) == (4, 4)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    outbox.send_some(a)
    assert outbox.take_sent() == ["t", "u"]
    assert (outbox.queued_bytes, outbox.queued_frames, bool(outbox)) == (0, 0, False)
    assert b.recv(16) == b"abcd"
    a.close()
    b.close()


def test_outbox_half_sent_tagged_chunk_reports_once_and_stays_apart() -> None:
    before = open_fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    (fd,) = _distinct_files(1)
    outbox = Outbox(own_fds=False)
    outbox.add([Frame(b"x" * 300_000, (fd,))], ["big"])
    with pytest.raises(BlockingIOError):
        outbox.send_some(a)
    assert outbox.take_sent() == ["big"]
    outbox.add([Frame(b"y")])  # fd-less and untagged, yet not merged into the tagged one
    assert len(outbox._chunks) == 2
    assert outbox.take_unstarted() == (False, [])
    assert (len(outbox._chunks), outbox.queued_frames) == (1, 1)
    got = []
    while outbox:
        _data, fds = recv_fds(b)
        got += fds
        try:
            outbox.send_some(a)
        except BlockingIOError:
            pass
    assert len(got) == 1  # the fd went once, with the first byte
    assert outbox.take_sent() == []
    close_fds([*got, fd])
    a.close()
    b.close()
    assert open_fd_count() == before


def test_outbox_counts_only_what_it_queued_when_a_dup_fails() -> None:
    before = open_fd_count()
    (fd,) = _distinct_files(1)
    bad = 1 << 20  # above any fd open here: EBADF
    outbox = Outbox()
    with pytest.raises(OSError, match="Bad file descriptor"):
        outbox.add([Frame(b"a", (fd,)), Frame(b"bb", (fd, bad))])
    assert (outbox.queued_bytes, outbox.queued_frames, len(outbox._chunks)) == (1, 1, 1)
    outbox.close()
    os.close(fd)
    assert open_fd_count() == before


def test_fds_from_ancillary_of_several_messages_and_partial_ints() -> None:
    raw = array.array("i", [5, 6, 7]).tobytes()
    anc = [
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, raw[:8]),
        (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, raw),  # not fds
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, raw[8:] + b"\x01"),  # a partial int
    ]
    assert _fds_from_ancillary(anc) == [5, 6, 7]
    assert _fds_from_ancillary([]) == []


async def test_trio_channel_frames_waiting_for_the_send_lock_are_queued_already() -> None:
    """A sender that waits for the lock (another task mid-send to a full socket)
    held its frames outside the queue: ``stop_sending`` (the engine's
    ``finish_close``) did not see them, so the engine took their sockets for gone
    to the container and closed the caller's copies, and the frames went out
    after it all the same (their fd numbers closed by then, or another socket's),
    or never, if that sender was cancelled. Queued at once, as the asyncio hook's
    channel does, stop_sending drops them."""
    before = open_fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    chan = TrioChannel(a, own_fds=False)
    r, w = os.pipe()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(chan.send_frames, [Frame(b"x" * 500_000, ())])
            await trio.testing.wait_all_tasks_blocked()  # it holds the lock: the socket is full
            nursery.start_soon(chan.send_frames, [Frame(b"y" * 8, (r,))])
            await trio.testing.wait_all_tasks_blocked()
            assert chan.stop_sending() == [r]
            nursery.cancel_scope.cancel()
    finally:
        chan.close()
        b.close()
        close_fds((r, w))
    assert open_fd_count() == before
