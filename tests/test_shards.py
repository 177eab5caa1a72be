"""``connpark serve --shards N``: a supervisor, a mirror and a shard per index.

Real processes throughout: ``connpark serve`` as users start it, real hooks,
real loopback clients. The behaviour of every hook against three shards is
covered by the conformance suite (``test_hooks.py`` runs each test against
one container and against ``--shards 3``); here: what only a fleet has.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import connpark
from connpark._config import ContainerConfig
from connpark._fleet import MIRROR_EPOCH_STRIDE, SHARD_OVERHEAD, auto_shards, next_mirror_epoch
from connpark._shards import shard_of
from connpark._stats_client import fetch_stats
from connpark._worker import Phase

from ._procs import CONNPARK, ServeProcess, recv_exactly, tcp_pairs
from .conftest import open_fd_count

pytestmark = pytest.mark.linux

FARM = Path(__file__).resolve().parent.parent / "benchmarks" / "_farm.py"


@pytest.fixture
def fleet(sockdir: Path) -> Iterator[ServeProcess]:
    proc = ServeProcess(sockdir / "c.sock", ["--shards", "3"])
    yield proc
    assert proc.stop() == 0


def _roles(stats: connpark.ContainerStats) -> Counter[str]:
    return Counter(p.role for p in stats.processes)


def _shard_pids(stats: connpark.ContainerStats) -> dict[int, int]:
    return {p.shard: p.pid for p in stats.processes if p.role == "shard" and p.shard is not None}


def test_stats_gives_totals_each_shard_and_every_process(fleet: ServeProcess) -> None:
    clients, servers = tcp_pairs(30)
    with connpark.BlockingParking(fleet.path, pool="s") as parking:
        tickets = parking.park_many(servers[:15]) + [parking.park(s) for s in servers[15:]]
        assert all(isinstance(t, int) for t in tickets)
        out = subprocess.run(
            [*CONNPARK, "stats", "--socket", str(fleet.path), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        data = json.loads(out)
        assert data["parked"] == 30
        assert [f["shard"] for f in data["shards"]] == [0, 1, 2]
        assert sum(f["parked"] for f in data["shards"]) == 30
        assert all(f["parked"] > 0 for f in data["shards"])  # spread, not piled on one
        assert sum(f["fd_budget"] for f in data["shards"]) == data["fd_budget"]
        roles = Counter(p["role"] for p in data["processes"])
        assert roles == {"supervisor": 1, "mirror": 3, "shard": 3}
        sup = [p["pid"] for p in data["processes"] if p["role"] == "supervisor"]
        assert sup == [fleet.pid]
        table = subprocess.run(
            [*CONNPARK, "stats", "--socket", str(fleet.path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "shard 2" in table
        # The tickets name their shard: an UNPARK of one from each shard comes back.
        by_shard = {shard_of(t): t for t in tickets if isinstance(t, int)}
        assert sorted(by_shard) == [0, 1, 2]
        parking.unpark(*by_shard.values())
        got = {parking.next_wake(timeout=10) for _ in range(3)}
        assert {w.ticket for w in got if w is not None} == set(by_shard.values())
        for w in got:
            if w is not None and w.socket is not None:
                w.socket.close()
    for c in clients:
        c.close()


def test_a_killed_shard_loses_nothing_and_delivers_nothing_twice(fleet: ServeProcess) -> None:
    n = 150
    clients, servers = tcp_pairs(n)
    with connpark.BlockingParking(fleet.path, pool="k") as parking:
        tickets = [parking.park(s, token=b"%d" % i) for i, s in enumerate(servers)]
        before = parking.stats()
        victim = _shard_pids(before)[1]
        mirror = next(p.pid for p in before.processes if p.role == "mirror" and p.shard == 1)
        baseline = open_fd_count(mirror)
        os.kill(victim, signal.SIGKILL)
        for i in range(0, n, 3):  # clients speak during the outage, on every shard
            clients[i].sendall(b"during %d" % i)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                now = _shard_pids(parking.stats())
            except connpark.ConnparkError:
                time.sleep(0.1)
                continue
            if now.get(1) not in (None, victim):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("shard 1 was not restarted")
        for i in range(1, n, 3):
            clients[i].sendall(b"after %d" % i)
        want = {i for i in range(n) if i % 3 != 2}
        seen: Counter[int] = Counter()
        while sum(seen.values()) < len(want):
            w = parking.next_wake(timeout=20)
            assert w is not None, f"missing wakes: {sorted(want - set(seen))[:10]}"
            i = int(w.token)
            seen[i] += 1
            assert w.ticket == tickets[i]  # tickets stay valid across the restart
            assert w.socket is not None
            tag = b"during" if i % 3 == 0 else b"after"
            expect = b"%s %d" % (tag, i)
            assert recv_exactly(w.socket, len(expect)) == expect
            w.socket.close()
        assert set(seen) == want
        assert max(seen.values()) == 1
        assert parking.next_wake(timeout=0.5) is None  # nothing twice
        assert parking.stats().parked == n - len(want)
        assert abs(open_fd_count(mirror) - baseline) <= len(want)  # handed on, not leaked
    for c in clients:
        c.close()


def test_upgrade_replaces_every_shard_and_loses_nothing(sockdir: Path) -> None:
    serve = ServeProcess(sockdir / "c.sock", ["--shards", "2"])
    try:
        n = 40
        clients, servers = tcp_pairs(n)
        with connpark.BlockingParking(serve.path, pool="u") as parking:
            tickets = [parking.park(s, token=b"%d" % i) for i, s in enumerate(servers)]
            old = _shard_pids(parking.stats())
            assert sorted(old) == [0, 1]
            out = subprocess.run(
                [*CONNPARK, "upgrade", "--socket", str(serve.path)],
                capture_output=True,
                text=True,
                timeout=90,
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith(f"upgraded: supervisor {serve.pid},")
            new = _shard_pids(parking.stats())
            assert sorted(new) == [0, 1]
            assert not set(new.values()) & set(old.values())
            assert "upgrade: supervisor re-executed; upgrading 2 shard(s)" in serve.log_text()
            for i, c in enumerate(clients):
                c.sendall(b"x%d" % i)
            seen: Counter[int] = Counter()
            for _ in range(n):
                w = parking.next_wake(timeout=20)
                assert w is not None
                i = int(w.token)
                seen[i] += 1
                assert w.ticket == tickets[i]
                assert w.socket is not None
                assert recv_exactly(w.socket, len(b"x%d" % i)) == b"x%d" % i
                w.socket.close()
            assert sorted(seen) == list(range(n))
            assert parking.next_wake(timeout=0.5) is None
        for c in clients:
            c.close()
    finally:
        assert serve.stop() == 0


def test_shards_flag_errors_are_one_line(sockdir: Path) -> None:
    for bad in ("0", "256", "many"):
        out = subprocess.run(
            [*CONNPARK, "serve", "--socket", str(sockdir / "c.sock"), "--shards", bad],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 2
        assert len(out.stderr.strip().splitlines()) <= 2, out.stderr  # usage + the error
        assert "--shards" in out.stderr
    assert not (sockdir / "c.sock").exists()


def test_auto_sizes_from_cores_and_the_fd_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per = hard - SHARD_OVERHEAD
    cores = os.cpu_count() or 1
    assert auto_shards(ContainerConfig(path="x", max_parked=1000)) == cores
    assert auto_shards(ContainerConfig(path="x", max_parked=60_000)) == max(
        cores, math.ceil(60_000 / per)
    )


# ---------------------------------------------------------------- 60,000 parked


class _Acceptor(threading.Thread):
    """The heavy worker: accepts and parks, in batches, until told to stop."""

    def __init__(self, listener: socket.socket, parking: connpark.BlockingParking) -> None:
        super().__init__(daemon=True)
        self.listener = listener
        self.parking = parking
        self.parked = 0
        self.refused: Counter[str] = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            batch: list[socket.socket] = []
            try:
                batch.append(self.listener.accept()[0])
                self.listener.setblocking(False)
                while len(batch) < 253:
                    batch.append(self.listener.accept()[0])
            except (BlockingIOError, TimeoutError):
                pass
            finally:
                self.listener.settimeout(0.2)
            if not batch:
                continue
            for r in self.parking.park_many(batch, timeout=30):
                if isinstance(r, int):
                    self.parked += 1
                else:
                    self.refused[r.reason.label] += 1
            for s in batch:
                s.close()  # refused ones (parked ones are closed already)


def test_sixty_thousand_parked_beyond_one_process_fd_limit(sockdir: Path) -> None:
    """``--shards auto`` holds 60,000, every sampled wake correct (issue 10's acceptance).

    60,000 parked connections are 60,000 fds in the shards and 60,000 more in
    their mirrors: no process may hold more than its fd limit (20,000 here).
    """
    total, farms = 60_000, 4
    per_farm = total // farms
    serve = ServeProcess(
        sockdir / "c.sock", ["--shards", "auto", "--max-parked", str(total), "--log-level", "info"]
    )
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = listener.getsockname()[1]
    procs: list[subprocess.Popen[str]] = []
    try:
        with connpark.BlockingParking(serve.path, pool="big") as parking:
            shards = len(parking.stats().shards)
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            assert shards * (hard - SHARD_OVERHEAD) >= total  # auto made room for them all
            acceptor = _Acceptor(listener, parking)
            acceptor.start()
            start = time.monotonic()
            for f in range(farms):
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(FARM),
                            "127.0.0.1",
                            str(port),
                            f"127.0.0.{f + 2}",
                            str(per_farm),
                            str(f * per_farm),
                        ],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            for p in procs:
                assert p.stdout is not None
                assert p.stdout.readline().strip() == f"connected {per_farm}"
            deadline = time.monotonic() + 120
            while acceptor.parked + sum(acceptor.refused.values()) < total:
                assert time.monotonic() < deadline, f"parked {acceptor.parked}"
                time.sleep(0.1)
            fill = time.monotonic() - start
            assert acceptor.refused == Counter(), acceptor.refused
            stats = parking.stats()
            assert stats.parked == total
            assert len(stats.shards) == shards
            # Every process under its fd limit, mirrors included.
            for proc in stats.processes:
                if proc.role in ("shard", "mirror"):
                    assert open_fd_count(proc.pid) < hard, proc
            counts = [f.parked for f in stats.shards]
            assert min(counts) > 0, counts
            # A 1% sample wakes, each with exactly its client's bytes.
            rng = random.Random(10)
            sample = sorted(rng.sample(range(total), total // 100))
            for f, p in enumerate(procs):
                mine = [i - f * per_farm for i in sample if i // per_farm == f]
                assert p.stdin is not None
                assert p.stdout is not None
                p.stdin.write(f"send s {','.join(map(str, mine))}\n")
                p.stdin.flush()
                assert p.stdout.readline().startswith("sent")
            seen: Counter[int] = Counter()
            while sum(seen.values()) < len(sample):
                w = parking.next_wake(timeout=30)
                assert w is not None, f"{len(sample) - sum(seen.values())} sampled wakes missing"
                assert w.socket is not None
                w.socket.settimeout(10)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = w.socket.recv(100)
                    assert chunk, data
                    data += chunk
                assert data.startswith(b"s"), data
                assert data.count(b"\n") == 1, data
                seen[int(data[1:-1])] += 1
                w.socket.close()
            assert sorted(seen) == sample
            assert max(seen.values()) == 1
            print(f"60,000 parked over {shards} shards in {fill:.1f} s; per shard {counts}")
            acceptor.stop.set()
            acceptor.join(10)
    finally:
        for p in procs:
            if p.stdin is not None:
                try:
                    p.stdin.write("quit\n")
                    p.stdin.close()
                except OSError:
                    pass
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
        listener.close()
        assert serve.stop() == 0


def test_successive_mirrors_of_a_shard_start_at_far_apart_epochs() -> None:
    """One shard's mirrors in turn: 256 of them start at 256 different ticket
    epochs, each far from the last (its shards take the epochs after it)."""
    for first in (0, 54, 255):
        epochs = [first]
        for _ in range(255):
            epochs.append(next_mirror_epoch(epochs[-1]))
        assert sorted(epochs) == list(range(256))
        for a, b in itertools.pairwise(epochs):
            assert (b - a) % 256 == MIRROR_EPOCH_STRIDE
    assert 32 <= MIRROR_EPOCH_STRIDE <= 224


def test_a_new_mirror_issues_new_tickets_and_the_fleet_s_death_stops_everything(
    sockdir: Path,
) -> None:
    """A mirror that dies takes its shard with it (drained); the one started in its
    place must not issue the tickets the dead one did. SIGKILL of the supervisor
    stops every mirror and shard (they drain), so that ``serve`` starts again."""
    serve = ServeProcess(sockdir / "c.sock", ["--shards", "2"])
    clients, servers = tcp_pairs(6)
    try:
        with connpark.BlockingParking(serve.path, pool="m") as parking:
            before = [parking.park(s) for s in servers[:3]]
            stats = parking.stats()
            mirror = next(p.pid for p in stats.processes if p.role == "mirror" and p.shard == 0)
            os.kill(mirror, signal.SIGKILL)
            woken = []  # shard 0's connections come back (SHUTDOWN), nothing is lost
            while len(woken) < sum(1 for t in before if shard_of(t) == 0):
                w = parking.next_wake(timeout=10)
                assert w is not None
                assert w.reason is connpark.Reason.SHUTDOWN
                woken.append(w)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                procs = parking.stats().processes
                if any(p.role == "mirror" and p.shard == 0 and p.pid != mirror for p in procs):
                    break
                time.sleep(0.1)
            after = [parking.park(s) for s in servers[3:]]
            assert not set(before) & set(after)
            for w in woken:
                assert w.socket is not None
                assert w.ticket not in after
                w.socket.close()
            pids = [p.pid for p in parking.stats().processes if p.role != "supervisor"]
            pidfds = [os.pidfd_open(pid) for pid in pids]  # not fooled by a reused pid
        assert serve.stop(signal.SIGKILL) == -signal.SIGKILL
        try:
            deadline = time.monotonic() + 30
            while not all(select.select([fd], [], [], 0)[0] for fd in pidfds):
                assert time.monotonic() < deadline, "mirrors or shards outlived the supervisor"
                time.sleep(0.1)
        finally:
            for fd in pidfds:
                os.close(fd)
        again = ServeProcess(sockdir / "c.sock", ["--shards", "2"])  # nothing in the way
        assert again.stop() == 0
    finally:
        serve.stop()
        for c in clients:
            c.close()


def test_bad_sends_fail_before_any_shard_publishes_and_upgrade_wants_the_control_path(
    fleet: ServeProcess,
) -> None:
    clients, servers = tcp_pairs(6)
    with connpark.BlockingParking(fleet.path, pool="b") as parking:
        tickets = [parking.park(s, tags=["x"]) for s in servers]
        assert len({shard_of(t) for t in tickets}) == 3
        with pytest.raises(TypeError, match="tickets or a tag"):
            parking.send(b"nothing")
        with pytest.raises(TypeError, match="tickets or a tag"):
            parking.send(b"both", tickets=tickets[:1], tag="x")
        assert parking.send(b"all\n", tag="x") == connpark.SendResult(6, 0, 0)
        for c in clients:
            assert recv_exactly(c, 4) == b"all\n"  # and nothing before it
    out = subprocess.run(
        [*CONNPARK, "upgrade", "--socket", f"{fleet.path}.1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "upgrade through the control socket" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    for c in clients:
        c.close()


def test_wakes_left_untaken_on_a_draining_shard_go_to_a_live_one(fleet: ServeProcess) -> None:
    """A mirror dies: its shard sends SHUTDOWN wakes back. A handle closed before
    anyone takes them hands them to another shard, not to the draining one (which
    would refuse them, and the clients would lose their connections)."""
    clients, servers = tcp_pairs(12)
    parking = connpark.BlockingParking(fleet.path, pool="h")
    tickets = [parking.park(s) for s in servers]
    on_2 = sum(1 for t in tickets if shard_of(t) == 2)
    assert on_2 > 0
    mirror = next(p.pid for p in parking.stats().processes if p.role == "mirror" and p.shard == 2)
    os.kill(mirror, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while parking._wakes.qsize() < on_2:  # the SHUTDOWN wakes, untaken
        assert time.monotonic() < deadline
        time.sleep(0.01)
    parking.shutdown()
    time.sleep(0.5)
    for c in clients:  # every client still connected: nothing was closed
        c.setblocking(False)
        with pytest.raises(BlockingIOError):
            c.recv(10)
    deadline = time.monotonic() + 20
    while True:
        try:
            if fetch_stats(fleet.path).parked == 12:
                break
        except connpark.ConnparkError:
            pass
        assert time.monotonic() < deadline, "not every connection is parked again"
        time.sleep(0.1)
    for c in clients:
        c.close()


def test_a_full_shard_sends_parks_to_the_others_and_max_parked_holds(sockdir: Path) -> None:
    """--max-parked 40 over 2 shards: 20 each. Parks refused by a full shard are
    tried on the other before the caller sees a refusal; past 40, ``full``."""
    serve = ServeProcess(sockdir / "c.sock", ["--shards", "2", "--max-parked", "40"])
    clients, servers = tcp_pairs(45)
    try:
        with connpark.BlockingParking(serve.path, pool="f") as a:
            first = a.park_many(servers[:30])  # one request: 20 on one shard, 10 retried
            assert all(isinstance(t, int) for t in first), first
            rest = a.park_many(servers[30:])
            assert sum(isinstance(t, int) for t in rest) == 10
            refused = [t for t in rest if isinstance(t, connpark.ParkRefused)]
            assert [r.reason for r in refused] == [connpark.Refusal.FULL] * 5
            stats = a.stats()
            assert stats.parked == 40
            assert [f.parked for f in stats.shards] == [20, 20]
        for s in servers[40:]:  # refused: still ours, and usable
            assert s.fileno() != -1
    finally:
        assert serve.stop() == 0
        for s in [*clients, *servers]:
            s.close()


def test_a_shard_that_does_not_answer_gets_no_parks_for_a_while(fleet: ServeProcess) -> None:
    clients, servers = tcp_pairs(8)
    with connpark.BlockingParking(fleet.path, pool="z") as parking:
        shards = _shard_pids(parking.stats())
        os.kill(shards[1], signal.SIGSTOP)
        try:
            got: list[object] = []
            for s in servers[:6]:
                try:
                    got.append(parking.park(s, timeout=0.5))
                except connpark.ContainerTimeout:
                    got.append("timeout")
            # At most one park waited on the stopped shard; the next went elsewhere.
            assert got.count("timeout") <= 1, got
            assert all(shard_of(t) != 1 for t in got if isinstance(t, int))
        finally:
            os.kill(shards[1], signal.SIGCONT)
    for s in [*clients, *servers]:
        s.close()


def test_a_handle_opens_while_a_shard_hangs_and_joins_it_later(fleet: ServeProcess) -> None:
    clients, servers = tcp_pairs(6)
    shards = _shard_pids(fetch_stats(fleet.path))
    os.kill(shards[2], signal.SIGSTOP)
    try:
        with connpark.BlockingParking(fleet.path, pool="o", connect_timeout=1) as parking:
            tickets = [parking.park(s) for s in servers[:3]]
            assert all(shard_of(t) != 2 for t in tickets)

            async def trio_open() -> None:
                async with connpark.open_parking(fleet.path, pool="o2", connect_timeout=1) as p:
                    assert shard_of(await p.park(servers[3])) != 2

            trio.run(trio_open)
            os.kill(shards[2], signal.SIGCONT)
            deadline = time.monotonic() + 15
            while parking._shards[2]._engine.phase is not Phase.READY:
                assert time.monotonic() < deadline, "shard 2's session never came up"
                time.sleep(0.05)
            assert parking.stats().sessions >= 3
    finally:
        os.kill(shards[2], signal.SIGCONT)
    for s in [*clients, *servers]:
        s.close()
