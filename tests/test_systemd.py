"""sd_notify and socket activation against real sockets standing in for systemd.

A bound AF_UNIX datagram socket is NOTIFY_SOCKET; a listening unix socket put at
fd 3 with LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES is socket activation, as systemd
does it. The real manager is in tests/systemd/.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import connpark
from connpark._systemd import Notifier, listen_fds, notify, watchdog_interval

from ._procs import tcp_pairs
from .conftest import open_fd_count

pytestmark = pytest.mark.linux

# What systemd does between fork and exec: the socket at fd 3, LISTEN_PID = the pid.
LAUNCH = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
    "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])"
)


class FakeManager:
    """The manager's end of NOTIFY_SOCKET: a bound datagram socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def receive(self, timeout: float = 5.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def wait_for(self, key: str, timeout: float = 10.0) -> dict[str, str]:
        """The next message carrying ``key``, skipping the others."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} within {timeout} s")
            msg = self.receive(left)
            if key in msg:
                return msg

    def drain(self) -> list[dict[str, str]]:
        got = []
        while True:
            try:
                got.append(self.receive(0.01))
            except TimeoutError:
                return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(sockdir: Path) -> Iterator[FakeManager]:
    m = FakeManager(str(sockdir / "notify"))
    yield m
    m.close()


def test_notify_without_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    notifier = Notifier.from_environ()
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog_interval() is None


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_reaches_path_and_abstract_sockets(sockdir: Path, kind: str) -> None:
    address = str(sockdir / "n") if kind == "path" else f"@connpark-test-{uuid.uuid4().hex}"
    m = FakeManager(address)
    try:
        before = open_fd_count()
        assert notify("READY=1\nSTATUS=up", address=address)
        assert m.receive() == {"READY": "1", "STATUS": "up"}
        assert open_fd_count() == before
    finally:
        m.close()


def test_notify_passes_fds(manager: FakeManager) -> None:
    r, w = os.pipe()
    try:
        before = open_fd_count()
        notifier = Notifier(manager.address)
        assert notifier.store_fds("control", [r])
        assert open_fd_count() == before  # nothing of ours stays open
        manager.sock.settimeout(5)
        data, fds, _flags, _addr = socket.recv_fds(manager.sock, 4096, 4)
        assert data == b"FDSTORE=1\nFDNAME=control"
        assert len(fds) == 1
        os.write(w, b"ping")
        assert os.read(fds[0], 4) == b"ping"  # the same pipe
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_notifier_messages(manager: FakeManager) -> None:
    n = Notifier(manager.address, watchdog=2.0)
    n.ready("parked 0,\n  queued 0")
    assert manager.receive() == {"READY": "1", "STATUS": "parked 0, queued 0"}
    assert n.last_status == "parked 0, queued 0"
    n.status("busy")
    assert manager.receive() == {"STATUS": "busy"}
    n.reloading()
    msg = manager.receive()
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert msg["RELOADING"] == "1"
    assert 0 <= now - int(msg["MONOTONIC_USEC"]) < 5_000_000
    n.stopping()
    assert manager.receive() == {"STOPPING": "1"}
    n.watchdog()
    assert manager.receive() == {"WATCHDOG": "1"}
    n.main_pid(1234)
    assert manager.receive() == {"MAINPID": "1234"}
    assert n.watchdog_interval() == 2.0


def test_notifier_failure_is_logged_not_raised(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier(str(sockdir / "nobody-here"))
    with caplog.at_level(logging.DEBUG, logger="connpark._systemd"):
        assert n.ready() is False
        assert n.watchdog() is False
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG]
    with pytest.raises(OSError, match="path or @abstract"):
        notify("READY=1", address="relative/path")


def test_watchdog_interval() -> None:
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "1500000"}) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": me}) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


def test_listen_fds_ignores_another_pids_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds() == []
    assert "LISTEN_FDS" not in os.environ  # unset all the same: not for our children


def _start(
    argv: list[str], env: dict[str, str], log: Path, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # the child keeps its own copy
        return subprocess.Popen(
            argv,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
        )


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def test_serve_tells_systemd(sockdir: Path) -> None:
    """READY once it listens, STATUS on change, WATCHDOG only while the loop runs,
    RELOADING + READY on SIGHUP, STOPPING on SIGTERM."""
    m = FakeManager(f"@connpark-test-{uuid.uuid4().hex}")
    path = sockdir / "cp.sock"
    proc = _start(
        [sys.executable, "-m", "connpark", "serve", "--socket", str(path)],
        {"NOTIFY_SOCKET": m.address, "WATCHDOG_USEC": "300000"},
        sockdir / "serve.log",
    )
    clients, servers = tcp_pairs(1)
    try:
        ready = m.wait_for("READY")
        assert ready["STATUS"] == "parked 0, queued 0, un-ACKed 0, sessions 0"
        with connpark.BlockingParking(str(path), pool="web", reconnect=False) as parking:
            parking.park(servers[0], token=b"t")  # the socket answers at READY already
            assert m.wait_for("STATUS")["STATUS"].startswith("parked 1,")

            m.drain()
            time.sleep(1.0)
            pings = [x for x in m.drain() if x == {"WATCHDOG": "1"}]
            assert 3 <= len(pings) <= 10  # every 0.15 s (half of WATCHDOG_USEC)

            proc.send_signal(signal.SIGSTOP)  # a hung loop: the pings stop
            time.sleep(0.1)
            m.drain()
            time.sleep(0.6)
            assert m.drain() == []
            proc.send_signal(signal.SIGCONT)
            m.wait_for("WATCHDOG", timeout=2)

            proc.send_signal(signal.SIGHUP)
            reload = m.wait_for("RELOADING")
            assert int(reload["MONOTONIC_USEC"]) > 0
            assert m.wait_for("READY")["STATUS"].startswith("parked 1,")
            assert proc.poll() is None

            proc.send_signal(signal.SIGTERM)
            stopping = m.wait_for("STOPPING")
            assert stopping["STATUS"] == "draining: waking 1 parked connections"
            woken = parking.next_wake(timeout=10)
            assert woken is not None
            assert woken.reason is connpark.Reason.SHUTDOWN
            assert woken.socket is not None
            woken.socket.close()
        assert proc.wait(timeout=20) == 0
    finally:
        _stop(proc)
        m.close()
        for s in clients + servers:
            s.close()


def test_crash_recovery_tells_systemd_and_reloads_as_an_upgrade(sockdir: Path) -> None:
    """With a supervisor: READY once the shard answers, RELOADING + READY around
    the upgrade SIGHUP starts (a new shard), STOPPING on SIGTERM."""
    m = FakeManager(f"@connpark-test-{uuid.uuid4().hex}")
    path = sockdir / "cp.sock"
    proc = _start(
        [sys.executable, "-m", "connpark", "serve", "--socket", str(path), "--crash-recovery"],
        {"NOTIFY_SOCKET": m.address, "WATCHDOG_USEC": "1000000"},
        sockdir / "serve.log",
    )
    clients, servers = tcp_pairs(1)
    try:
        assert m.wait_for("READY")["STATUS"].startswith("parked 0,")
        with connpark.BlockingParking(str(path), pool="web") as parking:
            parking.park(servers[0], token=b"t")
            while not m.wait_for("STATUS")["STATUS"].startswith("parked 1,"):
                pass  # wait_for raises after its timeout
            m.wait_for("WATCHDOG")
            shard = [p.pid for p in parking.stats().processes if p.role == "shard"]
            proc.send_signal(signal.SIGHUP)
            assert int(m.wait_for("RELOADING")["MONOTONIC_USEC"]) > 0
            assert m.wait_for("READY", timeout=20)["STATUS"].startswith("parked 1,")
            after = parking.stats().processes
            assert [p.pid for p in after if p.role == "shard"] != shard
            assert [p.generation for p in after if p.role == "mirror"] == [2]
            clients[0].sendall(b"still here")
            woken = parking.next_wake(timeout=10)
            assert woken is not None
            assert woken.socket is not None
            assert woken.socket.recv(100) == b"still here"
            woken.socket.close()
            proc.send_signal(signal.SIGTERM)
            m.wait_for("STOPPING")
        assert proc.wait(timeout=20) == 0
    finally:
        _stop(proc)
        m.close()
        for s in clients + servers:
            s.close()


def test_a_hung_shard_is_restarted_before_the_watchdog_fires(sockdir: Path) -> None:
    """SIGSTOP of the shard: the supervisor kills and restarts it (half the watchdog
    interval), the pings go on, the parked connection is kept."""
    m = FakeManager(f"@connpark-test-{uuid.uuid4().hex}")
    path = sockdir / "cp.sock"
    proc = _start(
        [sys.executable, "-m", "connpark", "serve", "--socket", str(path), "--crash-recovery"],
        {"NOTIFY_SOCKET": m.address, "WATCHDOG_USEC": "1000000"},
        sockdir / "serve.log",
    )
    clients, servers = tcp_pairs(1)
    try:
        m.wait_for("READY")
        with connpark.BlockingParking(str(path), pool="web") as parking:
            parking.park(servers[0], token=b"t")
            shard = next(p.pid for p in parking.stats().processes if p.role == "shard")
            os.kill(shard, signal.SIGSTOP)
            deadline = time.monotonic() + 15
            while True:
                assert time.monotonic() < deadline, "the hung shard was not replaced"
                try:
                    procs = parking.stats(timeout=1).processes
                except connpark.ConnparkError:
                    continue
                if next(p.pid for p in procs if p.role == "shard") != shard:
                    break
            m.drain()
            m.wait_for("WATCHDOG", timeout=2)  # pings go on: systemd never saw a hang
            clients[0].sendall(b"kept")
            woken = parking.next_wake(timeout=10)
            assert woken is not None
            assert woken.socket is not None
            assert woken.socket.recv(10) == b"kept"
            woken.socket.close()
        assert "has not answered for 0.5s: killing it" in (sockdir / "serve.log").read_text()
    finally:
        _stop(proc)
        m.close()
        for s in clients + servers:
            s.close()


def test_serve_takes_the_control_socket_from_systemd(sockdir: Path) -> None:
    """LISTEN_FDS: serve uses the socket at fd 3 (no bind), makes it CLOEXEC,
    and leaves the socket file in place when it stops."""
    m = FakeManager(str(sockdir / "notify"))
    path = sockdir / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    unused = sockdir / "unused.sock"
    proc = _start(
        [
            sys.executable,
            "-c",
            LAUNCH,
            str(listener.fileno()),
            sys.executable,
            "-m",
            "connpark",
            "serve",
            "--socket",
            str(unused),
        ],
        {"NOTIFY_SOCKET": m.address, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control"},
        sockdir / "serve.log",
        pass_fds=(listener.fileno(),),
    )
    clients, servers = tcp_pairs(1)
    try:
        m.wait_for("READY")
        # fd 3 is our socket (same inode), and close-on-exec now.
        assert (
            os.readlink(f"/proc/{proc.pid}/fd/3")
            == f"socket:[{os.fstat(listener.fileno()).st_ino}]"
        )
        with open(f"/proc/{proc.pid}/fdinfo/3") as f:
            flags = int(next(x for x in f if x.startswith("flags:")).split()[1], 8)
        assert flags & os.O_CLOEXEC
        assert not unused.exists()
        with connpark.BlockingParking(str(path), pool="web", reconnect=False) as parking:
            parking.park(servers[0], token=b"activated")
            clients[0].sendall(b"hi")
            woken = parking.next_wake(timeout=10)
            assert woken is not None
            assert woken.reason is connpark.Reason.READABLE
            assert woken.token == b"activated"
            assert woken.socket is not None
            assert woken.socket.recv(2) == b"hi"
            woken.socket.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert path.exists()  # systemd's file: not unlinked
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(path))  # still listening: the next instance would take it
        probe.close()
        log = (sockdir / "serve.log").read_text()
        assert f"container listening on {path}" in log
    finally:
        _stop(proc)
        m.close()
        listener.close()
        for s in clients + servers:
            s.close()


def test_serve_refuses_an_activated_socket_it_cannot_use(sockdir: Path) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                LAUNCH,
                str(udp.fileno()),
                sys.executable,
                "-m",
                "connpark",
                "serve",
                "--socket",
                str(sockdir / "cp.sock"),
            ],
            env={**os.environ, "LISTEN_FDS": "1"},
            pass_fds=(udp.fileno(),),
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        udp.close()
    assert out.returncode == 1
    assert out.stderr == (
        "connpark serve: error: the control socket from systemd must be a listening "
        "unix stream socket (ListenStream=/path), got AF_INET SOCK_DGRAM, not listening\n"
    )
    assert not (sockdir / "cp.sock").exists()


def test_a_shard_with_every_session_taken_is_healthy(sockdir: Path) -> None:
    """Workers holding all ``max_sessions``: the health check (a STATS session)
    still gets in, so the supervisor does not kill the shard as hung and the
    watchdog pings go on; ``connpark stats`` answers too."""
    m = FakeManager(f"@connpark-test-{uuid.uuid4().hex}")
    path = sockdir / "cp.sock"
    toml = sockdir / "c.toml"
    toml.write_text("[connpark]\nmax_sessions = 2\n")
    proc = _start(
        [
            *(sys.executable, "-m", "connpark", "serve", "--socket", str(path)),
            *("--crash-recovery", "--config", str(toml)),
        ],
        {"NOTIFY_SOCKET": m.address, "WATCHDOG_USEC": "1000000"},
        sockdir / "serve.log",
    )
    try:
        m.wait_for("READY")
        with (
            connpark.BlockingParking(str(path), pool="web") as one,
            connpark.BlockingParking(str(path), pool="web") as two,
        ):
            shard = next(p.pid for p in one.stats().processes if p.role == "shard")
            with pytest.raises(connpark.ContainerLost, match="too many sessions"):
                with connpark.BlockingParking(str(path), pool="web", reconnect=False) as third:
                    third.stats(timeout=5)
            m.drain()
            for _ in range(3):  # well past the hang limit (0.5 s)
                m.wait_for("WATCHDOG", timeout=2)
                time.sleep(0.5)
            out = subprocess.run(
                [sys.executable, "-m", "connpark", "stats", "--socket", str(path)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 0, out.stderr
            assert next(p.pid for p in two.stats().processes if p.role == "shard") == shard
        assert "has not answered" not in (sockdir / "serve.log").read_text()
    finally:
        _stop(proc)
        m.close()
