"""The examples as users run them: real processes, real clients, a real container."""

from __future__ import annotations

import http.client
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ._procs import ServeProcess

pytestmark = pytest.mark.linux

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class ExampleProcess:
    """Runs an example, parses ``listening on`` and keeps the latest status line."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().decode()
        match = re.fullmatch(r"listening on (\S+):(\d+)\n", first)
        assert match, (first, self.proc.stderr.read() if self.proc.stderr else b"")
        self.addr = (match.group(1), int(match.group(2)))
        self.status: dict[str, float] = {}
        self._thread = threading.Thread(target=self._read_status, daemon=True)
        self._thread.start()

    def _read_status(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode()
            if line.startswith("status "):
                self.status = {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}

    def wait_status(self, timeout: float = 20, **want: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status
            if all(status.get(k) == v for k, v in want.items()):
                return status
            time.sleep(0.05)
        raise AssertionError(f"status never reached {want}; last {self.status}")

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * 4096

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def serve(sockdir: Path) -> Iterator[ServeProcess]:
    proc = ServeProcess(sockdir / "c.sock")
    yield proc
    proc.stop()


def _line_round_trip(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def test_heavy_server_echo_parks_200_clients_and_frees_their_state(
    serve: ServeProcess,
) -> None:
    n, state = 200, 1 << 20
    server = ExampleProcess(
        "heavy_server.py",
        "--parking-socket",
        str(serve.path),
        "--listen",
        "127.0.0.1:0",
        "--park-after",
        "2.0",
        "--state-size",
        str(state),
    )
    clients: list[socket.socket] = []
    try:
        for i in range(n):
            c = socket.create_connection(server.addr, timeout=20)
            clients.append(c)
            assert _line_round_trip(c, b"hello %d\n" % i) == b"hello %d\n" % i
        rss_live = server.rss()
        assert server.status.get("live", n) <= n
        server.wait_status(live=0, parked=n)
        rss_parked = server.rss()
        assert serve.stats().parked == n
        assert rss_live - rss_parked >= n * state // 2, (rss_live, rss_parked)
        for i, c in enumerate(clients):
            assert _line_round_trip(c, b"again %d\n" % i) == b"again %d\n" % i
        assert serve.stats().woken_total.get("READABLE") == n
    finally:
        for c in clients:
            c.close()
        server.stop()


def test_heavy_server_without_parking_keeps_sessions_live(sockdir: Path) -> None:
    server = ExampleProcess("heavy_server.py", "--listen", "127.0.0.1:0", "--park-after", "0.2")
    try:
        c = socket.create_connection(server.addr, timeout=10)
        assert _line_round_trip(c, b"x\n") == b"x\n"
        time.sleep(1.5)
        assert server.wait_status(live=1, parked=0)
        assert _line_round_trip(c, b"y\n") == b"y\n"
        c.close()
    finally:
        server.stop()


def test_heavy_server_http_keepalive_across_parks(serve: ServeProcess) -> None:
    server = ExampleProcess(
        "heavy_server.py",
        "--parking-socket",
        str(serve.path),
        "--listen",
        "127.0.0.1:0",
        "--protocol",
        "http",
        "--park-after",
        "0.3",
    )
    try:
        conn = http.client.HTTPConnection(*server.addr, timeout=10)
        ports = []
        for i in (1, 2, 3):
            conn.request("GET", "/")
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200
            assert f"request {i} on this connection".encode() in body
            assert conn.sock is not None
            ports.append(conn.sock.getsockname()[1])
            time.sleep(0.8)  # longer than park-after: parked between requests
            if i < 3:
                assert server.wait_status(live=0, parked=1)
        assert len(set(ports)) == 1
        assert serve.stats().woken_total.get("READABLE", 0) >= 2
        conn.close()
    finally:
        server.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_heavy_server_http_with_curl(serve: ServeProcess) -> None:
    server = ExampleProcess(
        "heavy_server.py",
        "--parking-socket",
        str(serve.path),
        "--listen",
        "127.0.0.1:0",
        "--protocol",
        "http",
        "--park-after",
        "0.3",
    )
    try:
        url = f"http://{server.addr[0]}:{server.addr[1]}/"
        # --rate spaces the three transfers 1 s apart, on one kept-alive connection.
        out = subprocess.run(
            ["curl", "-sv", "--rate", "1/s", url, url, url],
            capture_output=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        text = out.stdout.decode()
        for i in (1, 2, 3):
            assert f"request {i} on this connection" in text
        assert out.stderr.decode().count("Re-using existing connection") == 2
        assert serve.stats().woken_total.get("READABLE", 0) >= 2
    finally:
        server.stop()


def test_threaded_server_parks_100_clients_and_drops_threads(serve: ServeProcess) -> None:
    n = 100
    server = ExampleProcess(
        "threaded_server.py",
        "--parking-socket",
        str(serve.path),
        "--listen",
        "127.0.0.1:0",
        "--park-after",
        "1.5",
        "--wake-threads",
        "16",
    )
    clients: list[socket.socket] = []
    try:
        for i in range(n):
            c = socket.create_connection(server.addr, timeout=20)
            clients.append(c)
            assert _line_round_trip(c, b"t %d\n" % i) == b"t %d\n" % i
        busy = server.wait_status(live=n)["threads"]
        assert busy >= n
        idle = server.wait_status(live=0, parked=n)["threads"]
        assert idle <= busy - n + 5, (busy, idle)
        assert serve.stats().parked == n
        for i, c in enumerate(clients):
            assert _line_round_trip(c, b"u %d\n" % i) == b"u %d\n" % i
    finally:
        for c in clients:
            c.close()
        server.stop()


# -- hardening (issue 8): what a user runs into -------------------------------------------


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _heavy(serve: ServeProcess, *args: str) -> ExampleProcess:
    return ExampleProcess(
        "heavy_server.py", "--parking-socket", str(serve.path), "--listen", "127.0.0.1:0", *args
    )


def _read_response(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length: (status, body, bytes after it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"EOF before a full response head: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = dict(line.lower().split(b":", 1) for line in lines[1:])
    length = int(fields[b"content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"EOF inside a response body: {buf + rest!r}")
        rest += chunk
    return int(lines[0].split()[1]), rest[:length], rest[length:]


def _get(sock: socket.socket) -> tuple[int, bytes]:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    status, body, extra = _read_response(sock)
    assert extra == b""
    return status, body


def test_heavy_server_http_answers_garbage_with_400_and_keeps_serving(
    serve: ServeProcess,
) -> None:
    server = _heavy(serve, "--protocol", "http", "--park-after", "5")
    try:
        good = socket.create_connection(server.addr, timeout=10)
        assert _get(good) == (200, b"hello from session 1: request 1 on this connection\n")
        bad = socket.create_connection(server.addr, timeout=10)
        bad.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        status, _body, extra = _read_response(bad)
        assert (status, extra) == (400, b"")
        assert bad.recv(1) == b""  # and the server closed that connection
        bad.close()
        assert _get(good) == (200, b"hello from session 1: request 2 on this connection\n")
        later = socket.create_connection(server.addr, timeout=10)
        assert _get(later)[0] == 200
        good.close()
        later.close()
        assert server.proc.poll() is None
    finally:
        server.stop()


def test_heavy_server_http_parks_only_between_messages(serve: ServeProcess) -> None:
    server = _heavy(serve, "--protocol", "http", "--park-after", "0.3")
    try:
        c = socket.create_connection(server.addr, timeout=10)
        # A body split across an idle pause: the connection must stay live, not park.
        c.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n0123456789")
        time.sleep(1.0)
        assert serve.stats().parks_total == 0
        c.sendall(b"abcdefghij")
        assert _read_response(c) == (200, b"received 20 bytes\n", b"")
        assert _get(c) == (200, b"hello from session 1: request 2 on this connection\n")
        # Idle between messages: parked. A half-sent request head parks too, as pending.
        _wait_for("the park", lambda: serve.stats().parked == 1)
        c.sendall(b"GET / HTTP/1.1\r\nHo")
        _wait_for("the wake and re-park", lambda: serve.stats().parks_total == 2, timeout=10)
        assert serve.stats().parked == 1
        c.sendall(b"st: t\r\n\r\n")
        assert _read_response(c) == (
            200,
            b"hello from session 1: request 3 on this connection\n",
            b"",
        )
        c.close()
    finally:
        server.stop()


def test_heavy_servers_of_two_protocols_share_a_container(serve: ServeProcess) -> None:
    n = 300
    opts = ("--park-after", "0.5", "--state-size", "4096")
    echo = _heavy(serve, "--protocol", "echo", *opts)
    web = _heavy(serve, "--protocol", "http", *opts)
    echo_clients: list[socket.socket] = []
    web_clients: list[socket.socket] = []
    try:
        for _ in range(n):
            echo_clients.append(socket.create_connection(echo.addr, timeout=20))
            web_clients.append(socket.create_connection(web.addr, timeout=20))
        for i, (e, w) in enumerate(zip(echo_clients, web_clients, strict=True)):
            assert _line_round_trip(e, b"e %d\n" % i) == b"e %d\n" % i
            assert _get(w)[0] == 200
        _wait_for("all parked", lambda: serve.stats().parked == 2 * n)
        pools = serve.stats().pools
        assert (pools.get("heavy-echo"), pools.get("heavy-http")) == (1, 1), pools
        for i, (e, w) in enumerate(zip(echo_clients, web_clients, strict=True)):
            e.sendall(b"again %d\n" % i)
            w.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        for i, (e, w) in enumerate(zip(echo_clients, web_clients, strict=True)):
            assert e.recv(4096) == b"again %d\n" % i
            status, body, _ = _read_response(w)
            assert (status, body.endswith(b": request 2 on this connection\n")) == (200, True)
    finally:
        for c in echo_clients + web_clients:
            c.close()
        echo.stop()
        web.stop()


def test_threaded_server_serves_1000_wakes_at_once(serve: ServeProcess) -> None:
    n = 1000
    server = ExampleProcess(
        "threaded_server.py",
        "--parking-socket",
        str(serve.path),
        "--listen",
        "127.0.0.1:0",
        "--park-after",
        "0.5",
    )
    clients: list[socket.socket] = []
    try:
        for i in range(n):
            c = socket.create_connection(server.addr, timeout=20)
            c.sendall(b"a %d\n" % i)
            clients.append(c)
        for i, c in enumerate(clients):
            assert c.recv(4096) == b"a %d\n" % i
        for burst in (1, 2):
            _wait_for("all parked", lambda: serve.stats().parked == n)
            start = time.monotonic()
            for i, c in enumerate(clients):
                c.sendall(b"b%d %d\n" % (burst, i))
            for i, c in enumerate(clients):
                assert c.recv(4096) == b"b%d %d\n" % (burst, i)
            elapsed = time.monotonic() - start
            print(f"burst {burst}: {n} wakes answered in {elapsed:.2f} s")
            assert elapsed < 10
            assert serve.stats().woken_total.get("READABLE") == burst * n
    finally:
        for c in clients:
            c.close()
        server.stop()


@pytest.mark.parametrize("script", ["heavy_server.py", "threaded_server.py"])
def test_examples_without_a_container_say_so_in_one_line(sockdir: Path, script: str) -> None:
    missing = sockdir / "missing.sock"
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--parking-socket", str(missing)],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert out.stdout == b""
    name = script.removesuffix(".py")
    assert out.stderr.decode() == f"{name}: cannot connect to {missing}: no such socket file\n"


@pytest.mark.parametrize(
    ("script", "extra"),
    [
        ("heavy_server.py", ["--state-size", "4096", "--park-after", "0.3"]),
        ("threaded_server.py", ["--park-after", "0.3", "--wake-linger", "0.1"]),
    ],
)
def test_example_survives_a_container_restart(sockdir: Path, script: str, extra: list[str]) -> None:
    n = 20
    path = sockdir / "r.sock"
    container = ServeProcess(path)
    server = ExampleProcess(
        script, "--parking-socket", str(path), "--listen", "127.0.0.1:0", *extra
    )
    clients: list[socket.socket] = []
    try:
        for i in range(n):
            c = socket.create_connection(server.addr, timeout=20)
            clients.append(c)
            assert _line_round_trip(c, b"a %d\n" % i) == b"a %d\n" % i
        _wait_for("every client parked", lambda: container.stats().parked == n)
        # A restart: the old container hands every connection back (SHUTDOWN)...
        assert container.stop() == 0
        container = ServeProcess(path)  # ...and a new one comes up on the same path.
        # The server kept listening: a new client is served.
        fresh = socket.create_connection(server.addr, timeout=20)
        clients.append(fresh)
        assert _line_round_trip(fresh, b"fresh\n") == b"fresh\n"
        # Every old client is still served, byte for byte, and parks again in the new one.
        for i, c in enumerate(clients[:n]):
            assert _line_round_trip(c, b"b %d\n" % i) == b"b %d\n" % i
        _wait_for("clients parked in the new container", lambda: container.stats().parked >= n)
        for i, c in enumerate(clients[:n]):
            assert _line_round_trip(c, b"c %d\n" % i) == b"c %d\n" % i
        assert server.proc.poll() is None
    finally:
        for c in clients:
            c.close()
        server.stop()
        container.stop()
