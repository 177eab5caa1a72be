"""The README's Quick start, every shell command as written, with what it says they print.

The commands run through ``sh -c`` from a repository root. ``python3 dev.py
run`` runs in a copy of the files it uses (sharing this checkout's ``.venv``),
so its ``./connpark.sock`` is this test's own; its echo worker listens on a
free port (``CONNPARK_ECHO_LISTEN=127.0.0.1:0``, the knob the README names)
and the client commands get that port for 8007. ``python3 dev.py test`` runs
here, with ``PYTEST_ADDOPTS`` narrowing its pytest step to two quick tests (it
runs lint, format and type checks in full). Every wait is bounded and every
process is killed in a ``finally``.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._devrun import ROOT, DevRun

pytestmark = pytest.mark.linux

READY = r"connpark is running: the container on (\S+), the echo worker on ([\d.]+):(\d+)\."
HEADER = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  connpark \./connpark\.sock, up ")


def quick_start() -> tuple[list[str], list[str]]:
    """The shell commands of the Quick start's ``sh`` blocks, and the lines typed into nc.

    A comment ``# or: COMMAND`` names another command; a line whose comment
    starts with ``typed`` is typed into the connection, not a command.
    """
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start") : text.index("\n## ", text.index("## Quick start"))]
    commands: list[str] = []
    typed: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        for line in block.splitlines():
            code, _, comment = line.partition("#")
            code, comment = code.strip(), comment.strip()
            if comment.startswith("typed"):
                typed.append(code)
                continue
            commands.append(code)
            if comment.startswith("or: "):
                commands.append(comment.removeprefix("or: "))
    return commands, typed


class Terminal:
    """One shell command with a pipe for its stdin and its output read line by line."""

    def __init__(self, command: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", f"exec {command}"],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.out: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.put(line.rstrip("\n"))
        self.out.put(None)

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def line(self, timeout: float = 10) -> str | None:
        """The next line it prints (None at the end of its output)."""
        return self.out.get(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A root with what ``dev.py run`` uses, and this checkout's ``.venv`` (made ready)."""
    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    assert spec is not None
    assert spec.loader is not None
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    dev._ensure_env("examples")  # a no-op after dev.py test; else installs from ROOT, not the copy
    with tempfile.TemporaryDirectory(prefix="cp-") as d:
        root = Path(d)
        for name in ("dev.py", "pyproject.toml"):
            shutil.copy2(ROOT / name, root / name)
        shutil.copytree(ROOT / "examples", root / "examples")
        (root / ".venv").symlink_to(ROOT / ".venv")
        yield root


def test_quick_start_commands_as_written(checkout: Path) -> None:
    commands, typed = quick_start()
    assert commands == [
        "python3 dev.py run",
        "python3 dev.py test",
        "nc 127.0.0.1 8007",
        ".venv/bin/python examples/line_client.py 127.0.0.1 8007",
        ".venv/bin/connpark stats --socket ./connpark.sock --watch",
    ], "the README's Quick start changed: drive the new commands here too"
    assert typed == ["hello", "again"]
    run_cmd, test_cmd, nc_cmd, client_cmd, stats_cmd = commands

    env = {**os.environ, "CONNPARK_ECHO_LISTEN": "127.0.0.1:0"}
    run = DevRun(["/bin/sh", "-c", f"exec {run_cmd}"], marker=str(checkout), cwd=checkout, env=env)
    terminals: list[Terminal] = []

    def terminal(command: str) -> Terminal:
        terminals.append(Terminal(command, checkout))
        return terminals[-1]

    try:
        ready = run.wait_for(READY, timeout=60)
        assert ready.group(1) == "./connpark.sock"
        port = ready.group(3)
        assert stats_cmd in run.log()  # dev.py's hint and the README agree

        def here(command: str) -> str:
            return command.replace(" 8007", f" {port}")

        if shutil.which("nc"):
            nc = terminal(here(nc_cmd))
            nc.type("hello")
            assert nc.line() == "hello"
            nc.kill()
            run.wait_for(r"^client gone after 1 lines$", timeout=10)

        client = terminal(here(client_cmd))
        client.type(typed[0])
        assert client.line() == "hello"
        run.wait_for(r"^parked ticket 0x[0-9a-f]+ after 1 lines$", timeout=15)
        client.type(typed[1])
        assert client.line() == "again"
        run.wait_for(r"^woken ticket 0x[0-9a-f]+: READABLE$", timeout=10)
        run.wait_for(r"^parked ticket 0x[0-9a-f]+ after 2 lines$", timeout=15)

        stats = terminal(stats_cmd)
        snapshots: list[list[str]] = []
        while len(snapshots) < 3:  # the third header closes the second snapshot
            line = stats.line(timeout=15)
            assert line is not None, snapshots
            if HEADER.match(line):
                snapshots.append([])
            elif line:
                assert snapshots, line
                snapshots[-1].append(line)
        rows = {row[:16].strip(): row[16:].split() for row in snapshots[0]}
        assert rows["parked"][:2] == ["1", "packed"]  # (packed 0 or 1: a second or two on)
        assert rows["sessions"] == ["2", "echo", "1,", "_stats", "1"]
        assert rows["wakes"][:3] == ["1", "READABLE", "1,"]
        assert rows["fd budget"][:2] == ["1", "of"]
        assert [row[:16] for row in snapshots[1]] == [row[:16] for row in snapshots[0]]
        os.killpg(stats.proc.pid, signal.SIGINT)  # Ctrl-C
        assert stats.proc.wait(timeout=10) == 130

        # Ctrl-C in dev.py's terminal: the parked connection is handed back, all stops.
        os.killpg(run.proc.pid, signal.SIGINT)
        assert run.proc.wait(timeout=30) == 0, run.log()
        run.wait_for(r"^woken ticket 0x[0-9a-f]+: SHUTDOWN$", timeout=5)
        assert run.children() == []
        assert not (checkout / "connpark.sock").exists()
        assert client.line() is None  # the worker went: the client sees the end
        assert client.proc.wait(timeout=10) == 0
    finally:
        for t in terminals:
            t.kill()
        run.cleanup()

    nested = {**os.environ, "PYTEST_ADDOPTS": "-p no:cacheprovider " + " ".join(QUICK_TESTS)}
    out = subprocess.run(
        ["/bin/sh", "-c", f"exec {test_cmd}"],
        cwd=ROOT,
        env=nested,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All checks passed!" in out.stdout  # ruff check
    assert "already formatted" in out.stdout  # ruff format --check
    assert "Success: no issues found" in out.stdout  # mypy --strict
    assert re.search(r"\b2 passed\b", out.stdout), out.stdout


#: What the nested ``python3 dev.py test`` runs of pytest: quick, and not this test.
QUICK_TESTS = [
    "tests/test_stats_cli.py::test_table_layout",
    "tests/test_stats_cli.py::test_table_of_an_idle_container_that_is_stopping",
]
