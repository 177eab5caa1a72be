"""Start ``connpark serve`` the way users do, as a real subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from connpark._stats import ContainerStats
from connpark._stats_client import fetch_stats

CONNPARK = [sys.executable, "-m", "connpark"]


class ServeProcess:
    """A running ``connpark serve``; ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(
        self,
        path: Path,
        extra: Sequence[str] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.log = path.with_suffix(".log")
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [*CONNPARK, "serve", "--socket", str(path), "--log-level", "debug", *extra],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
        self._wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"connpark serve exited early:\n{self.log_text()}")
            if self.path.exists():
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(str(self.path))
                except OSError:
                    pass
                else:
                    probe.close()
                    self._settle()
                    return
                finally:
                    probe.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"connpark serve not ready:\n{self.log_text()}")
            time.sleep(0.02)

    def _settle(self, timeout: float = 5.0) -> None:
        """Until the probe's session is gone: tests take fd baselines right after start."""
        deadline = time.monotonic() + timeout
        seen = [self.fd_count()]
        while time.monotonic() < deadline and (len(seen) < 3 or len(set(seen[-3:])) > 1):
            time.sleep(0.02)
            seen.append(self.fd_count())

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stats(self) -> ContainerStats:
        return fetch_stats(str(self.path))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log_file.close()
        return rc


def tcp_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """n connected loopback TCP pairs: (clients, server-side sockets)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(min(n, 4096))
    clients, servers = [], []
    try:
        for _ in range(n):
            c = socket.create_connection(listener.getsockname())
            s, _ = listener.accept()
            clients.append(c)
            servers.append(s)
    finally:
        listener.close()
    return clients, servers


def recv_exactly(sock: socket.socket, n: int, timeout: float = 10) -> bytes:
    """Read exactly ``n`` bytes, or fewer at EOF; ``timeout`` per read."""
    sock.settimeout(timeout)
    buf = b""
    while len(buf) < n and (chunk := sock.recv(n - len(buf))):
        buf += chunk
    return buf


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``cond`` every 20 ms until it holds (True) or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def take_number(old: socket.socket, new: socket.socket) -> socket.socket:
    """Close ``old`` and move ``new`` to its fd number, as the next accept() would
    reuse it: returns the socket object for ``new`` under that number."""
    number = old.fileno()
    old.close()
    os.dup2(new.fileno(), number)
    new.close()
    return socket.socket(fileno=number)
