"""The container in-process on trio's autojump clock: deadlines without real waiting."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

import connpark
from connpark import Reason
from connpark._container import LINEAGE_MAX

from ._procs import tcp_pairs

pytestmark = pytest.mark.linux


async def test_default_idle_timeout_orphans_and_late_worker(
    autojump_clock: trio.testing.MockClock, sockdir: Path
) -> None:
    config = connpark.ContainerConfig(
        path=str(sockdir / "c.sock"), idle_timeout=300, orphan_timeout=60
    )
    clients, servers = tcp_pairs(3)
    async with trio.open_nursery() as nursery:
        container: connpark.Container = await nursery.start(connpark.serve, config)

        # 1. The container's default idle timeout, to the second.
        async with connpark.open_parking(config.path) as parking:
            start = trio.current_time()
            ticket = await parking.park(servers[0], token=b"idle")
            woken = await parking.wakes().receive()
            assert (woken.ticket, woken.reason, woken.socket) == (ticket, Reason.TIMEOUT, None)
            assert 300 <= trio.current_time() - start < 301

        # 2. A wake for a pool with no worker waits, and is closed after the orphan timeout.
        async with connpark.open_parking(config.path, pool="gone") as parking:
            await parking.park(servers[1])
        clients[1].sendall(b"anyone?")
        await trio.sleep(1)
        assert container.stats().orphaned == 1
        await trio.sleep(58)
        assert container.stats().orphans_closed_total == 0
        await trio.sleep(2)
        stats = container.stats()
        assert (stats.orphaned, stats.orphans_closed_total, stats.fds_held) == (0, 1, 0)
        clients[1].setblocking(False)
        with trio.fail_after(1):
            await trio.lowlevel.wait_readable(clients[1])
        with pytest.raises(ConnectionResetError):  # closed with its bytes unread: RST
            clients[1].recv(10)

        # 3. A worker that comes back within the orphan timeout gets the wake, bytes intact.
        async with connpark.open_parking(config.path, pool="late") as parking:
            await parking.park(servers[2], token=b"t", pending=b"p")
        clients[2].sendall(b"hello")
        await trio.sleep(30)
        async with connpark.open_parking(config.path, pool="late") as parking:
            woken = await parking.wakes().receive()
            assert (woken.reason, woken.token, woken.pending) == (Reason.READABLE, b"t", b"p")
            assert woken.socket is not None
            assert await woken.socket.recv(10) == b"hello"
            woken.socket.close()

        container.request_shutdown()
    for s in (*clients, *servers):
        s.close()


def test_hot_path_encoders_match_the_codec() -> None:
    """The container packs WAKE and PARKED itself; the bytes are the codec's."""
    from connpark._encode import parked_frame, wake_frame
    from connpark._lot import INET6, Lot, SessionState
    from connpark._wire import Parked, ParkResult, Refusal, Wake, WakeEntry, encode

    lot = Lot()
    owner = SessionState(1, lot.pool("p"))
    lot.add_session(owner)
    a = lot.park(7, token=b"tok", pending=b"pend", flags=INET6, session=owner, deadline_ms=9000)
    b = lot.park(8, token=b"", pending=b"x" * 300, flags=0, session=owner, deadline_ms=9000)
    lot.wake(a, Reason.READABLE, 1.0)
    lot.forget_fd(b)
    lot.wake(b, Reason.HANGUP, 1.0)
    entries = (
        WakeEntry(a.ticket, Reason.READABLE, b"tok", b"pend", 7, inet6=True),
        WakeEntry(b.ticket, Reason.HANGUP, b"", b"x" * 300, None),
    )
    assert [wake_frame([a, b])] == encode(Wake(entries))
    results = [(Refusal.OK, 5), (Refusal.DUPLICATE, 0)]
    want = Parked(3, (ParkResult(Refusal.OK, 5), ParkResult(Refusal.DUPLICATE)))
    assert [parked_frame(3, results)] == encode(want)


def test_wake_frames_split_by_entries_bytes_and_budget() -> None:
    """253 entries or ~1 MiB per frame; the byte budget stops early, after one entry at least."""
    from connpark._encode import _WAKE_BODY, wake_frames
    from connpark._lot import Lot, SessionState
    from connpark._wire import Decoder, Wake

    lot = Lot(window=10_000)
    owner = SessionState(1, lot.pool("p"))
    lot.add_session(owner)
    big = b"x" * 300_000
    slots = [
        lot.park(
            fd,
            token=b"t%d" % fd,
            pending=big if fd % 100 == 0 else b"",
            flags=0,
            session=owner,
            deadline_ms=9000,
        )
        for fd in range(3, 703)
    ]
    lot.unpark(owner, [x.ticket for x in slots], 1.0)
    outq = list(owner.outq)

    frames, groups, n = wake_frames(outq, 1 << 40)
    assert n == len(outq)
    assert [len(g) for g in groups] == [len(f.fds) for f in frames]
    assert all(len(g) <= 253 for g in groups)
    assert all(len(f.data) - 8 <= _WAKE_BODY for f in frames)
    assert [x for g in groups for x in g] == outq
    dec = Decoder(join_split=False)
    entries = []
    for f in frames:
        dec.receive_data(f.data, f.fds)
        msg = dec.next_message()
        assert isinstance(msg, Wake)
        entries.extend(msg.entries)
    assert [(e.ticket, e.token, e.pending, e.fd) for e in entries] == [
        (x.ticket, x.token, x.pending, x.fd) for x in outq
    ]

    # A budget: what fits (entry bytes: 16 + token + pending), at least one entry.
    frames, groups, n = wake_frames(outq, 100)
    assert n == 100 // 18  # 16 + "tN": 18 bytes each (fd 3..9)
    frames, groups, n = wake_frames(outq[97:], 10)  # fd 100 carries 300 kB: alone
    assert n == 1
    assert len(frames[0].data) > 300_000


def test_plain_wake_frames_match_the_general_encoding() -> None:
    """The column-by-column WAKE of plain entries is byte for byte the entry-by-entry
    one: reasons, INET6, budgets, 253-entry frames, and a notice (no fd) among them."""
    from connpark._encode import _WAKE_ENTRY, _WAKE_HEAD, wake_frames
    from connpark._lot import INET6, Lot, SessionState
    from connpark._wire import Decoder, MessageType, Wake

    lot = Lot(window=10_000)
    owner = SessionState(1, lot.pool("p"))
    lot.add_session(owner)
    fds = range(3, 603)
    slots, _ = lot.park_many(
        owner, fds, [b""] * 600, [b""] * 600, [INET6 if fd % 3 else 0 for fd in fds], [9000] * 600
    )
    reasons = [Reason.READABLE, Reason.HANGUP, Reason.TIMEOUT]
    for i, x in enumerate(slots):
        lot.wake(x, reasons[i % 3], 1.0)
    outq = list(owner.outq)

    def general(group: list) -> bytes:  # type: ignore[type-arg]
        body = b"".join(
            _WAKE_ENTRY.pack(x.ticket, x.reason, 3 if x.flags & INET6 else 1, 0, 0) for x in group
        )
        return _WAKE_HEAD.pack(len(body) + 2, MessageType.WAKE, 0, len(group), len(group)) + body

    frames, groups, n = wake_frames(outq, 1 << 40)
    assert (n, [len(g) for g in groups]) == (600, [253, 253, 94])
    for frame, group in zip(frames, groups, strict=True):
        assert frame.data == general(group)
        assert frame.fds == tuple(x.fd for x in group)
    frames, groups, n = wake_frames(outq, 16 * 40 + 5)  # the byte budget: 40 entries
    assert (n, frames[0].data) == (40, general(outq[:40]))
    dec = Decoder(join_split=False)
    dec.receive_data(frames[0].data, frames[0].fds)
    msg = dec.next_message()
    assert isinstance(msg, Wake)
    assert [(e.ticket, e.reason, e.fd) for e in msg.entries] == [
        (x.ticket, x.reason, x.fd) for x in outq[:40]
    ]
    # A notice (the container closed its fd) takes the general path, and is encoded alike.
    lot.forget_fd(outq[5])
    frames, groups, n = wake_frames(outq[:10], 1 << 40)
    assert n == 10
    assert frames[0].fds == tuple(x.fd for x in outq[:10] if x.fd >= 0)


async def test_the_session_lineage_stays_bounded(sockdir: Path) -> None:
    """A peer opening session after session, each resuming the last (HELLO
    ``resume_session``), grows the lineage the re-sent parks are matched by:
    it keeps at most ``LINEAGE_MAX`` sessions, the newest, and walks it only
    once it has doubled."""
    config = connpark.ContainerConfig(path=str(sockdir / "c.sock"))
    async with trio.open_nursery() as nursery:
        container: connpark.Container = await nursery.start(connpark.serve, config)
        walks = 0
        for sid in range(1, 3 * LINEAGE_MAX):
            before = container._lineage
            container._note_lineage(sid, sid - 1)
            walks += container._lineage is not before  # each pruning walk makes a new dict
            assert len(container._lineage) <= LINEAGE_MAX
        # Not a walk of thousands of young entries per session: one per doubling.
        assert walks <= 3 * 3
        newest = 3 * LINEAGE_MAX - 1
        assert container._lineage[newest][0] == newest - 1
        nursery.cancel_scope.cancel()
