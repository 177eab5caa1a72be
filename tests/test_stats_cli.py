"""``connpark stats``: the table, ``--watch`` snapshots with timestamps, ``--json`` as before."""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

import connpark
from connpark import ContainerStats, LatencySummary
from connpark._stats import format_table

from ._procs import ServeProcess, tcp_pairs

CONNPARK = [sys.executable, "-m", "connpark"]
HEADER = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  connpark (\S+), up [\d.]+ s$")

SAMPLE = ContainerStats(
    parked=1234,
    queued=2,
    unacked=3,
    orphaned=0,
    sessions=3,
    woken_total={"READABLE": 10, "TIMEOUT": 2},
    refused_total={"full": 1, "not-a-tcp-stream": 4},
    parks_total=1250,
    acks_total=12,
    closed_total=1,
    orphans_closed_total=0,
    protocol_errors_total=0,
    pools={"_stats": 1, "web": 2},
    fds_held=1236,
    fd_budget=19690,
    wake_latency=LatencySummary(count=12, p50_ms=0.25, p99_ms=0.5, max_ms=1.125),
    uptime_s=3723.0,
    shutting_down=False,
    packed=1000,
)


def test_table_layout() -> None:
    at = 1_700_000_000.0
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    assert format_table(SAMPLE, source="./connpark.sock", at=at) == "\n".join(
        [
            f"{when}  connpark ./connpark.sock, up 1 h 02 min",
            "parked              1,234   packed 1,000",
            "queued                  2",
            "un-ACKed                3",
            "orphaned                0",
            "sessions                3   web 2, _stats 1",
            "wakes                  12   READABLE 10, HANGUP 0, TIMEOUT 2, REQUESTED 0, SHUTDOWN 0,"
            " UNSENT 0",
            "refusals                5   not-a-tcp-stream 4, full 1",
            "parks               1,250",
            "ACKs                   12",
            "closed                  1   orphans closed 0",
            "protocol errors         0",
            "auto-responses          0   reply bytes 0",
            "publishes               0   written 0, woken 0, bytes 0",
            "tagged                  0   tags 0",
            "wake latency    p50 0.250 ms, p99 0.500 ms, max 1.125 ms (last 12 wakes)",
            "fd budget       1,236 of 19,690 used (6.3%)",
        ]
    )


def test_table_of_an_idle_container_that_is_stopping() -> None:
    idle = attrs.evolve(
        SAMPLE,
        parked=0,
        woken_total={},
        refused_total={},
        wake_latency=LatencySummary(),
        fds_held=0,
        uptime_s=4.25,
        shutting_down=True,
    )
    lines = format_table(idle, at=0).splitlines()
    assert lines[0].endswith("  connpark, up 4.2 s, SHUTTING DOWN")
    assert "refusals                0" in lines
    assert "wake latency    no wakes yet" in lines
    assert "fd budget       0 of 19,690 used (0.0%)" in lines


@pytest.fixture
def busy_container(sockdir: Path) -> Iterator[ServeProcess]:
    """A container holding one parked connection, after one wake and one refusal."""
    serve = ServeProcess(sockdir / "c.sock")
    clients, servers = tcp_pairs(2)
    a, b = socket.socketpair()
    try:
        with connpark.BlockingParking(serve.path, pool="web") as parking:
            parking.park(servers[0], token=b"woken")
            parking.park(servers[1], token=b"stays")
            with pytest.raises(connpark.ParkRefused):
                parking.park(a)  # a unix socket: refused, not-inet
            clients[0].sendall(b"x")
            woken = parking.next_wake(timeout=10)
            assert woken is not None
            assert woken.socket is not None
            woken.socket.close()
            yield serve
    finally:
        for s in (*clients, *servers, a, b):
            s.close()
        serve.stop()


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return out


@pytest.mark.linux
def test_stats_table_watch_and_json(busy_container: ServeProcess) -> None:
    path = str(busy_container.path)
    once = subprocess.run(
        [*CONNPARK, "stats", "--socket", path], capture_output=True, text=True, timeout=30
    )
    assert once.returncode == 0, once.stderr
    lines = once.stdout.splitlines()
    header = HEADER.match(lines[0])
    assert header, lines[0]
    assert header.group(1) == path
    rows = {line[:15].strip(): line[15:].split() for line in lines[1:]}
    assert rows["parked"] == ["1", "packed", "0"]
    assert rows["un-ACKed"] == ["0"]
    # The asking session counts, in its own pool.
    assert rows["sessions"] == ["2", "web", "1,", "_stats", "1"]
    assert rows["wakes"][:3] == ["1", "READABLE", "1,"]
    assert "SHUTDOWN" in rows["wakes"]
    assert rows["refusals"] == ["1", "not-inet", "1"]
    assert rows["wake latency"][0] == "p50"
    assert rows["fd budget"][:2] == ["1", "of"]
    assert rows["fd budget"][3:] == ["used", "(0.0%)"]

    watch = subprocess.Popen(
        [*CONNPARK, "stats", "--socket", path, "--watch", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out = _lines(watch)
        got: list[str] = []
        deadline = time.monotonic() + 20
        while sum(bool(HEADER.match(line)) for line in got) < 3:
            got.append(out.get(timeout=max(0.1, deadline - time.monotonic())))
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=10) == 130
    finally:
        watch.kill()
        watch.communicate()
    # Snapshots: a header with its time, the rows, and a blank line before the next one.
    size = len(lines)
    first = HEADER.match(got[0])
    assert first
    assert first.group(1) == path
    assert got[size] == ""
    assert HEADER.match(got[size + 1])
    assert [line[:15] for line in got[1:size]] == [line[:15] for line in lines[1:]]
    stamps = [line[:19] for line in got if HEADER.match(line)]
    assert stamps == sorted(stamps)

    as_json = subprocess.run(
        [*CONNPARK, "stats", "--socket", path, "--json"], capture_output=True, timeout=30
    )
    assert as_json.returncode == 0, as_json.stderr
    (line,) = as_json.stdout.splitlines()
    data = json.loads(line)
    assert set(data) == {f.name for f in attrs.fields(ContainerStats)}
    assert ContainerStats.from_json(line).parked == 1
