"""``python3 dev.py``: help, and ``run`` as a tool that cleans up after itself.

Each run gets its own socket path and port 0 (the worker picks a free port and
``dev.py`` shows it); every process a run starts is killed in a ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from ._devrun import PYTHON3, ROOT, DevRun

READY = r"connpark is running: the container on (\S+), the echo worker on ([\d.]+):(\d+)\."


def _dev(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON3, "dev.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_the_commands() -> None:
    for args in ([], ["help"], ["--help"], ["-h"]):
        out = _dev(*args)
        assert out.returncode == 0, args
        assert out.stderr == ""
        assert out.stdout.startswith("usage: python3 dev.py COMMAND")
        for command in ("run [--socket PATH] [--listen HOST:PORT]", "test [PYTEST-ARGS", "bench"):
            assert f"\n  {command}" in out.stdout
    wrong = _dev("frobnicate")
    assert wrong.returncode == 2
    assert wrong.stdout == ""
    assert wrong.stderr.splitlines() == [
        "dev.py: unknown command 'frobnicate'; try: python3 dev.py help"
    ]


def _run(sock: Path) -> DevRun:
    return DevRun(
        [PYTHON3, "dev.py", "run", "--socket", str(sock), "--listen", "127.0.0.1:0"],
        marker=str(sock),
    )


@pytest.mark.linux
def test_run_refuses_a_second_run_then_stops_everything_on_sigterm(sockdir: Path) -> None:
    sock = sockdir / "c.sock"
    stale = socket.socket(socket.AF_UNIX)  # a socket file nobody serves: replaced, not a reason
    stale.bind(str(sock))
    stale.close()
    run = _run(sock)
    client = None
    try:
        ready = run.wait_for(READY, timeout=60)
        assert ready.group(1) == str(sock)
        # The container and the worker, in a process group of their own.
        pids = run.children()
        assert len(pids) == 2, run.log()
        groups = {os.getpgid(pid) for pid in pids}
        assert len(groups) == 1
        assert groups != {os.getpgid(run.proc.pid)}
        # Ready means usable: the worker echoes (it had the container when it said so).
        client = socket.create_connection((ready.group(2), int(ready.group(3))), timeout=10)
        client.sendall(b"hi\n")
        assert client.recv(100) == b"hi\n"
        # `run` installed what the README's examples need.
        stamp = json.loads((ROOT / ".venv" / ".installed").read_text())
        assert "examples" in stamp["extras"]

        second = _dev("run", "--socket", str(sock), "--listen", "127.0.0.1:0")
        assert second.returncode == 1
        assert second.stdout == ""
        (line,) = second.stderr.splitlines()
        assert line.startswith(f"dev.py: a container already answers on {sock}")
        assert run.proc.poll() is None
        assert sorted(run.children()) == sorted(pids)

        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(timeout=30) == 0, run.log()
        assert run.children() == []
        assert not sock.exists()
        assert "container stopped" in run.log()
    finally:
        if client is not None:
            client.close()
        run.cleanup()


def test_run_with_a_busy_port_is_one_line(sockdir: Path) -> None:
    sock = sockdir / "c.sock"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _dev("run", "--socket", str(sock), "--listen", f"127.0.0.1:{port}")
    assert out.returncode == 1
    assert out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"dev.py: cannot listen on 127.0.0.1:{port}: already in use")
    assert not sock.exists()


@pytest.mark.linux
def test_run_stops_the_worker_and_removes_the_socket_when_the_container_dies(
    sockdir: Path,
) -> None:
    sock = sockdir / "c.sock"
    run = _run(sock)
    try:
        run.wait_for(READY, timeout=60)
        (container,) = [pid for pid in run.children() if b"serve" in _cmdline(pid)]
        os.kill(container, signal.SIGKILL)  # no drain: it leaves its socket file
        assert run.proc.wait(timeout=30) == 1, run.log()
        run.wait_for(r"^dev.py: the container exited \(code -9\); stopping$", timeout=5)
        assert run.children() == []
        assert not sock.exists()
    finally:
        run.cleanup()


@pytest.mark.linux
def test_children_stop_when_dev_py_is_killed(sockdir: Path) -> None:
    sock = sockdir / "c.sock"
    run = _run(sock)
    try:
        run.wait_for(READY, timeout=60)
        os.kill(run.proc.pid, signal.SIGKILL)  # no chance to clean up: the kernel tells them
        run.wait_children_gone(timeout=20)
        assert not sock.exists()  # the container drained and removed it
    finally:
        run.cleanup()


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()
