"""The basic mode, as users run it: two real ``connpark demo`` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.linux

CONNPARK = [sys.executable, "-m", "connpark"]


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "demo server exited early"
        assert time.monotonic() < deadline, "demo server did not listen in time"
        time.sleep(0.02)


def test_lines_typed_in_client_appear_on_server_stdout(sockdir: Path) -> None:
    path = sockdir / "demo.sock"
    server = subprocess.Popen(
        [*CONNPARK, "demo", "server", "--socket", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_socket(path, server)
        assert path.stat().st_mode & 0o777 == 0o600
        lines = b"first line\nsecond, longer line\nthird\n"
        client = subprocess.run(
            [*CONNPARK, "demo", "client", "--socket", str(path)],
            input=lines,
            capture_output=True,
            timeout=30,
        )
        assert client.returncode == 0, client.stderr
        assert server.stdout is not None
        os.set_blocking(server.stdout.fileno(), False)
        got = b""
        deadline = time.monotonic() + 10
        while got != lines and time.monotonic() < deadline:
            got += server.stdout.read() or b""
            time.sleep(0.01)
        assert got == lines
        # The server goes on serving: a second client works too.
        again = subprocess.run(
            [*CONNPARK, "demo", "client", "--socket", str(path)],
            input=b"fourth\n",
            capture_output=True,
            timeout=30,
        )
        assert again.returncode == 0, again.stderr
        deadline = time.monotonic() + 10
        while not got.endswith(b"fourth\n") and time.monotonic() < deadline:
            got += server.stdout.read() or b""
            time.sleep(0.01)
        assert got == lines + b"fourth\n"
    finally:
        server.terminate()
        _out, err = server.communicate(timeout=10)
    assert server.returncode == 0, err
    assert not path.exists()  # the server removes its socket file


def test_client_without_server_fails_with_one_clear_line(sockdir: Path) -> None:
    path = sockdir / "nobody.sock"
    client = subprocess.run(
        [*CONNPARK, "demo", "client", "--socket", str(path)],
        input=b"hello\n",
        capture_output=True,
        timeout=30,
    )
    assert client.returncode != 0
    err = client.stderr.decode().strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err
    assert "no such socket file" in err


def test_stale_socket_file_is_replaced_but_live_one_is_not(sockdir: Path) -> None:
    import socket

    path = sockdir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens: stale
    server = subprocess.Popen(
        [*CONNPARK, "demo", "server", "--socket", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)
        assert server.poll() is None
        second = subprocess.run(
            [*CONNPARK, "demo", "server", "--socket", str(path)],
            capture_output=True,
            timeout=30,
        )
        assert second.returncode != 0
        assert b"another server is listening" in second.stderr
    finally:
        server.terminate()
        server.communicate(timeout=10)
