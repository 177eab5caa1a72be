"""Peer-caused log lines are rate-limited: a flood of bad sessions cannot fill the disk."""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path

import pytest

from connpark._ratelog import LogLimit

from ._procs import ServeProcess, wait_until


def test_a_burst_then_a_count_of_what_was_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limit = LogLimit(logging.getLogger("t"), burst=3, interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="t"):
        for i in range(10):
            limit.log(logging.WARNING, "bad peer %d", i)
        limit.log(logging.WARNING, "another kind %d", 1)  # its own budget
        now[0] = 10.5
        limit.log(logging.WARNING, "bad peer %d", 99)
        limit.log(logging.DEBUG, "not enabled %d", 1)  # filtered: not counted
    assert [r.getMessage() for r in caplog.records] == [
        "bad peer 0",
        "bad peer 1",
        "bad peer 2",
        "another kind 1",
        "7 more lines like the next were left out in 10 s (at most 3 per 10 s)",
        "bad peer 99",
    ]


@pytest.mark.linux
def test_a_flood_of_bad_sessions_logs_a_bounded_number_of_lines(sockdir: Path) -> None:
    """300 sessions that open with garbage: each is a protocol error, but the log
    gets at most 20 lines of it (the default burst), and the container serves on."""
    proc = ServeProcess(sockdir / "c.sock")
    try:
        for _ in range(300):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(proc.path))
                s.sendall(struct.pack("!IBBH", 4, 0xEE, 0, 0) + b"junk")
                s.settimeout(5)
                try:
                    while s.recv(4096):  # the ERROR, then EOF
                        pass
                except OSError:
                    pass
        assert wait_until(lambda: proc.stats().protocol_errors_total >= 300)
        lines = proc.log_text().count("new session: protocol error")
        assert 1 <= lines <= 20, lines
    finally:
        proc.stop()
