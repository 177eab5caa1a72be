"""State a peer can grow, bounded: pools (names a peer picks), handshakes.

Each test runs a real ``connpark serve`` and speaks the protocol by hand
(``RawPeer`` or raw frames), every loop bounded in count and time.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from connpark._autoresponse import MAX_MATCH, MAX_REPLY, MAX_RULES_PER_SET
from connpark._container import STATS_POOL, STATS_SESSIONS_MAX
from connpark._fdpass import BlockingChannel
from connpark._unixsock import connect_unix
from connpark._wire import (
    Decoder,
    Error,
    ErrorCode,
    Hello,
    Refusal,
    Result,
    Rule,
    RuleKind,
    Rules,
    Welcome,
)

from ._procs import ServeProcess
from ._raw import RawPeer

pytestmark = pytest.mark.linux


def _serve(sockdir: Path, **config: int) -> ServeProcess:
    toml = sockdir / "c.toml"
    toml.write_text("[connpark]\n" + "".join(f"{k} = {v}\n" for k, v in config.items()))
    return ServeProcess(sockdir / "c.sock", ["--config", str(toml)])


def _stop_clean(proc: ServeProcess) -> None:
    assert proc.proc.poll() is None, "the container died:\n" + proc.log_text()
    assert proc.stop() == 0
    assert "Traceback" not in proc.log_text()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096


def _hello(path: Path, pool: str) -> tuple[BlockingChannel, object]:
    """A session attempt: the container's first answer (WELCOME or ERROR)."""
    chan = BlockingChannel(connect_unix(path))
    chan.send(Hello(3, pool=pool, name="bounds"))
    return chan, chan.receive_message(Decoder(), timeout=10)


def test_pool_names_a_peer_picks_do_not_break_stats(sockdir: Path) -> None:
    """A peer opening short sessions, each in a new pool (255-byte names), used
    to leave every pool behind for good: the pool table, the STATS reply's
    ``pools`` (over 1 MiB after ~4,000: STATS failed, and with it ``connpark
    stats``, the metrics and the supervisor's health check) and ``/metrics``
    labels. Pools nobody uses any more are dropped, at most ``max_pools``."""
    proc = ServeProcess(sockdir / "c.sock")
    try:
        deadline = time.monotonic() + 12
        n = 4200
        for i in range(n):
            assert time.monotonic() < deadline, f"only {i} sessions in 12 s"
            peer = RawPeer(proc.path, pool=f"{i:06d}".ljust(255, "p"))
            peer.close()
        stats = proc.stats()  # raised ContainerLost ("cannot encode StatsReply") before
        assert len(stats.pools) <= 1024, len(stats.pools)
        assert stats.protocol_errors_total == 0
    finally:
        _stop_clean(proc)


def test_pool_rule_sets_go_with_their_pool(sockdir: Path) -> None:
    """Pool-wide rule sets (16 x 16 rules x 2 KiB each: 512 KiB a pool) used to
    live as long as the container, in as many pools as a peer could name: 64
    pools cost the container 32 MiB for good. They go with their pool now."""
    proc = ServeProcess(sockdir / "c.sock")
    try:
        big = Rule(RuleKind.EXACT, b"m" * MAX_MATCH, b"r" * MAX_REPLY)
        rules = (big,) * MAX_RULES_PER_SET
        warm = RawPeer(proc.path, pool="warm")  # the allocator's first arenas
        warm.send(Rules(1, 1, rules, True))
        assert isinstance(warm.receive(), Result)
        warm.close()
        before = _rss(proc.pid)
        deadline = time.monotonic() + 12
        for p in range(64):
            assert time.monotonic() < deadline
            peer = RawPeer(proc.path, pool=f"rules-{p}", version=3)
            for set_id in range(1, 17):
                peer.send(Rules(set_id, set_id, rules, True))
            for _ in range(16):
                msg = peer.receive()
                assert isinstance(msg, Result), msg
                assert msg.refusal is Refusal.OK, msg
            peer.close()
        time.sleep(0.2)  # the last session's end
        growth = _rss(proc.pid) - before
        assert growth < 8 << 20, f"RSS grew by {growth / 2**20:.1f} MiB"
    finally:
        _stop_clean(proc)


def test_max_pools_refuses_a_new_pool_clearly(sockdir: Path) -> None:
    """At ``max_pools`` pools in use, a session in a new pool gets ERROR
    TOO_MANY_SESSIONS saying why; sessions of known pools still come in, and
    a pool no longer used makes room."""
    proc = _serve(sockdir, max_pools=4)
    try:
        held = [RawPeer(proc.path, pool=f"p{i}") for i in range(4)]
        chan, answer = _hello(proc.path, "new")
        assert isinstance(answer, Error), answer
        assert answer.code == ErrorCode.TOO_MANY_SESSIONS, answer
        assert "pools" in answer.text
        chan.close()
        other = RawPeer(proc.path, pool="p0")  # a known pool: in
        other.close()
        held.pop().close()  # p3 is no longer used
        deadline = time.monotonic() + 5
        while True:
            chan, answer = _hello(proc.path, "new")
            chan.close()
            if isinstance(answer, Welcome) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert isinstance(answer, Welcome), answer
        for peer in held:
            peer.close()
    finally:
        _stop_clean(proc)


def test_max_sessions_holds_for_concurrent_handshakes(sockdir: Path) -> None:
    """``max_sessions`` was checked when a connection came in, before its HELLO:
    connections that all said HELLO after connecting all became sessions (24
    of 8), and connections that never said HELLO were not bounded by it at
    all (only by fds: each took a session socket out of the fd budget)."""
    proc = _serve(sockdir, max_sessions=8)
    socks: list[socket.socket] = []
    try:
        socks = [connect_unix(proc.path) for _ in range(24)]
        time.sleep(0.3)  # every one accepted (and checked) before any HELLO
        chans = [BlockingChannel(s) for s in socks]
        for chan in chans:
            try:
                chan.send(Hello(3, pool="many", name="hs"))
            except OSError:
                pass  # refused and closed already
        welcomes = refused = 0
        for chan in chans:
            try:
                msg = chan.receive_message(Decoder(), timeout=10)
            except Exception:  # the refusal's ERROR, or the container's close
                refused += 1
                continue
            if isinstance(msg, Welcome):
                welcomes += 1
            else:
                assert isinstance(msg, Error), msg
                assert msg.code == ErrorCode.TOO_MANY_SESSIONS, msg
                refused += 1
        assert welcomes <= 8, f"{welcomes} sessions with max_sessions 8"
        assert welcomes + refused == 24
    finally:
        for s in socks:
            s.close()
        _stop_clean(proc)


async def test_the_twins_stay_bounded(sockdir: Path) -> None:
    """Each park whose PARKED a session never read (it ended first) leaves its
    socket's inode in ``_twins`` for 300 s; a peer that parks without reading,
    ends the session, lets the connections go and starts again could grow it
    by a fd budget's worth per round: it was pruned by age only. It keeps at
    most ``TWINS_MAX`` (beyond twice what is held), the newest."""
    import trio

    import connpark
    from connpark._container import TWINS_MAX

    config = connpark.ContainerConfig(path=str(sockdir / "c.sock"))
    async with trio.open_nursery() as nursery:
        container: connpark.Container = await nursery.start(connpark.serve, config)
        now = trio.current_time()
        for inode in range(1, 3 * TWINS_MAX):
            container._remember_inode(inode, inode, now, 1)
            assert len(container._twins) <= TWINS_MAX + 1
        newest = 3 * TWINS_MAX - 1
        assert container._twins[newest][0] == newest
        nursery.cancel_scope.cancel()


def test_statistics_sessions_have_their_own_bounded_places(sockdir: Path) -> None:
    """Sessions of pool ``_stats`` (health checks, ``connpark stats``) have places
    of their own beyond ``max_sessions``, bounded (``STATS_SESSIONS_MAX``): one
    more is refused, saying why, and they take no worker's place."""
    proc = _serve(sockdir, max_sessions=2)
    held: list[BlockingChannel] = []
    try:
        workers = [RawPeer(proc.path, pool="w")]
        for _ in range(STATS_SESSIONS_MAX):
            chan, answer = _hello(proc.path, STATS_POOL)
            held.append(chan)
            assert isinstance(answer, Welcome), answer
        chan, answer = _hello(proc.path, STATS_POOL)
        chan.close()
        assert isinstance(answer, Error), answer
        assert answer.code == ErrorCode.TOO_MANY_SESSIONS, answer
        assert "statistics" in answer.text
        workers.append(RawPeer(proc.path, pool="w"))  # the statistics did not take its place
        chan, answer = _hello(proc.path, "w")  # now workers hold every place
        chan.close()
        assert isinstance(answer, Error), answer
        for peer in workers:
            peer.close()
    finally:
        for chan in held:
            chan.close()
        _stop_clean(proc)
