"""``connpark serve --crash-recovery``: a killed shard loses no connection.

The supervisor mirrors every parked fd; SIGKILL of the shard under load must
leave every connection parked or delivered exactly once, bytes intact.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import connpark

from ._procs import CONNPARK, ServeProcess, tcp_pairs
from .conftest import open_fd_count

pytestmark = pytest.mark.linux


def _pid(serve: ServeProcess, role: str, not_: int = 0, timeout: float = 15) -> int:
    """The pid of the ``role`` process (shard, mirror), as ``stats`` lists them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            procs = serve.stats().processes
        except connpark.ConnparkError:  # between shards: ask again
            procs = ()
        pids = [p.pid for p in procs if p.role == role and p.pid != not_]
        if pids:
            return pids[0]
        time.sleep(0.05)
    raise AssertionError(f"no {role} process")


def _until(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.05)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(10)
    buf = b""
    while len(buf) < n and (chunk := sock.recv(n - len(buf))):
        buf += chunk
    return buf


class Cycler(threading.Thread):
    """A worker that keeps parking and waking its own connections (the live load)."""

    def __init__(self, path: Path, n: int = 50) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.clients, self.servers = tcp_pairs(n)
        self.cycles = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with connpark.BlockingParking(self.path, pool="cycle") as parking:
                socks = self.servers
                while not self.stop.is_set():
                    out = parking.park_many(socks, timeout=30)
                    tickets = [t for t in out if isinstance(t, int)]
                    assert len(tickets) == len(socks), out
                    parking.unpark(*tickets)
                    socks = []
                    while len(socks) < len(tickets):
                        w = parking.next_wake(timeout=30)
                        assert w is not None, "no wake"
                        if w.reason is connpark.Reason.REQUESTED:
                            assert w.socket is not None
                            socks.append(w.socket)
                    self.cycles += len(socks)
                self.servers = socks
        except BaseException as exc:
            self.error = exc


@pytest.mark.parametrize("disruption", ["sigkill", "upgrade"])
def test_shard_killed_or_upgraded_under_load_loses_nothing(sockdir: Path, disruption: str) -> None:
    n, early = 2000, 500
    path = sockdir / "c.sock"
    serve = ServeProcess(path, ["--crash-recovery", "--restore-grace", "1"])
    cycler = Cycler(path)
    try:
        shard = _pid(serve, "shard")
        serve.stats()  # the shard is up and serving
        shard_base = open_fd_count(shard)
        mirror = _pid(serve, "mirror")
        sup_base = open_fd_count(mirror)
        clients, servers = tcp_pairs(n)
        with connpark.BlockingParking(path, pool="main") as parking:
            serve_fds = open_fd_count(shard)  # + our session
            out = parking.park_many(servers, tokens=[b"%d" % i for i in range(n)])
            assert all(isinstance(t, int) for t in out)
            assert open_fd_count(shard) == serve_fds + n
            _until(lambda: open_fd_count(mirror) == sup_base + n, "the mirror holds every fd")
            cycler.start()
            started = time.monotonic()
            time.sleep(0.5)
            upgrade = None
            if disruption == "sigkill":
                os.kill(shard, signal.SIGKILL)
            else:  # as an operator does: the command, while the load goes on
                upgrade = subprocess.Popen(
                    [*CONNPARK, "upgrade", "--socket", str(path)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            for i in range(early):  # clients speak while the shard is replaced
                clients[i].sendall(b"during %d\n" % i)
            if upgrade is not None:
                out, err = upgrade.communicate(timeout=60)
                assert upgrade.returncode == 0, err
                assert out.startswith(
                    f"upgraded: supervisor {serve.pid}, mirrors at generation 2, shard {shard} ->"
                )
            new_shard = _pid(serve, "shard", not_=shard)
            processes = serve.stats().processes
            assert [(p.role, p.pid) for p in processes if p.role != "mirror"] == [
                ("supervisor", serve.pid),
                ("shard", new_shard),
            ]
            for i in range(early, n):
                clients[i].sendall(b"after %d\n" % i)
            seen: Counter[bytes] = Counter()
            deadline = time.monotonic() + 60
            while sum(seen.values()) < n and time.monotonic() < deadline:
                w = parking.next_wake(timeout=20)
                assert w is not None, f"only {sum(seen.values())} of {n} woke"
                seen[w.token] += 1
                assert w.reason is connpark.Reason.READABLE
                assert w.socket is not None
                i = int(w.token)
                want = (b"during %d\n" if i < early else b"after %d\n") % i
                assert _recv_exactly(w.socket, len(want)) == want
                w.socket.sendall(b"ok\n")
                w.socket.close()
            assert set(seen) == {b"%d" % i for i in range(n)}, "lost"
            assert max(seen.values()) == 1, "delivered twice"
            for c in clients:
                assert _recv_exactly(c, 3) == b"ok\n"
            cycler.stop.set()
            cycler.join(30)
            if cycler.error is not None:
                Path("/tmp/cr_serve.log").write_text(serve.log_text())
            assert cycler.error is None, cycler.error
            # The live load went on through the outage (its parks were re-sent).
            rate = cycler.cycles / (time.monotonic() - started)
            assert rate >= 200, f"{rate:.0f} park+wake cycles/s"
        for c in clients:
            c.close()
        # The cycler's connections are the test's again; nothing else is held.
        _until(lambda: open_fd_count(new_shard) <= shard_base, "the shard let go")
        # (<=: an upgraded mirror no longer holds its channel to the zygote)
        _until(lambda: open_fd_count(mirror) <= sup_base, "the mirror let go")
    finally:
        cycler.stop.set()
        for s in (*cycler.clients, *cycler.servers):
            s.close()
        assert serve.stop() == 0
