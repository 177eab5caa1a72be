"""``examples/line_client.py`` with piped stdin: every reply is printed before it exits."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from ._devrun import ROOT

CLIENT = [sys.executable, str(ROOT / "examples" / "line_client.py")]


@pytest.fixture
def slow_server() -> Iterator[tuple[socket.socket, list[bytes]]]:
    """Echoes each line after 0.3 s, and keeps the connection 5 s after the client's EOF.

    Yields its listener and a list: empty it and the server stops answering.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(10)  # a test that never connects does not leave it waiting
    replies: list[bytes] = [b"yes"]
    done = threading.Event()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                time.sleep(0.3)
                if replies:
                    conn.sendall(line)
            done.wait(5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener, replies
    finally:
        done.set()
        listener.close()
        thread.join(timeout=10)


def test_waits_for_the_reply_to_its_last_line(
    slow_server: tuple[socket.socket, list[bytes]],
) -> None:
    listener, _ = slow_server
    host, port = listener.getsockname()
    started = time.monotonic()
    out = subprocess.run(
        [*CLIENT, host, str(port)], input=b"one\ntwo\n", capture_output=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"one\ntwo\n"
    assert time.monotonic() - started < 4  # it left on the last reply, not at the server's close


def test_gives_up_on_missing_replies_after_wait(
    slow_server: tuple[socket.socket, list[bytes]],
) -> None:
    listener, replies = slow_server
    replies.clear()
    host, port = listener.getsockname()
    out = subprocess.run(
        [*CLIENT, host, str(port), "--wait", "0.5"],
        input=b"one\n",
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert out.stdout == b""
    assert out.stderr.decode().splitlines() == ["line_client: 1 lines unanswered"]


def test_no_server_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        out = subprocess.run(
            [*CLIENT, "127.0.0.1", str(port)], input=b"", capture_output=True, timeout=30
        )
    assert out.returncode == 1
    (line,) = out.stderr.decode().splitlines()
    assert line.startswith(f"line_client: cannot connect to 127.0.0.1:{port}:")
