"""Run ``python3 dev.py ...`` the way a user does, and leave no process behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: What the README says to type; the test's own interpreter if there is no python3 on PATH.
PYTHON3 = shutil.which("python3") or sys.executable


def processes_mentioning(marker: str) -> list[int]:
    """Live processes (Linux /proc) whose command line contains ``marker``, zombies excluded."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


class DevRun:
    """``argv`` (``python3 dev.py run ...``) in a session of its own, its output collected.

    ``marker`` is a string (a socket path, a directory) that every process the
    run starts has on its command line: ``cleanup()`` SIGKILLs those, so a failed
    test leaves nothing behind.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        marker: str,
        cwd: Path = ROOT,
        env: dict[str, str] | None = None,
    ) -> None:
        self.marker = marker
        self.lines: list[str] = []
        self.eof = False
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # like a terminal's foreground job: Ctrl-C reaches dev.py only
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, *, timeout: float, count: int = 1) -> re.Match[str]:
        """The ``count``-th line matching ``pattern``, once it has been printed."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in map(regex.search, self.lines) if m]
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    break
                self._cond.wait(timeout=left)
        raise AssertionError(f"no line matching {pattern!r} (x{count}); output:\n{self.log()}")

    def children(self) -> list[int]:
        """The processes this run started (dev.py itself excluded)."""
        return [pid for pid in processes_mentioning(self.marker) if pid != self.proc.pid]

    def wait_children_gone(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.children():
            assert time.monotonic() < deadline, f"still running: {self.children()}"
            time.sleep(0.05)

    def cleanup(self) -> None:
        """SIGKILL dev.py and every process of this run, wherever it went."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in self.children():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
