"""Shared benchmark plumbing: limits, the container process, client farms, results.

Every benchmark measures its contenders in the same run, alternating them,
and reports ratios of medians; absolute numbers are printed but are not the
headline (the machine is shared and noisy). Traffic stays on loopback.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")


def raise_nofile() -> int:
    """RLIMIT_NOFILE soft limit up to the hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def kernel_socket_memory() -> dict[str, int]:
    """TCP sockets in use and kernel socket-buffer pages (/proc/net/sockstat)."""
    out: dict[str, int] = {}
    try:
        text = Path("/proc/net/sockstat").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith("TCP:"):
            parts = line.split()[1:]
            fields = dict(zip(parts[::2], parts[1::2], strict=False))
            out["tcp_inuse"] = int(fields.get("inuse", 0))
            out["tcp_mem_pages"] = int(fields.get("mem", 0))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(("Slab:", "SUnreclaim:")):
                key, value = line.split(":")
                out[key.lower() + "_kib"] = int(value.split()[0])
    except OSError:
        pass
    return out


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def percentile(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        return 0.0
    return float(s[min(len(s) - 1, int(p * len(s)))])


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"benchmark": name, "machine": machine(), "when": time.time(), **data}
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    print(f"wrote {path}")
    return path


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


class Container:
    """``connpark serve`` in a subprocess, its socket in a short temp dir."""

    def __init__(self, *extra: str) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="cpb-")
        self.path = Path(self._dir.name) / "c.sock"
        self.log = Path(self._dir.name) / "serve.log"
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "connpark",
                "serve",
                "--socket",
                str(self.path),
                "--log-level",
                "warning",
                *extra,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("connpark serve exited:\n" + self.log.read_text())
            if self.path.exists():
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(str(self.path))
                    break
                except OSError:
                    pass
                finally:
                    probe.close()
            if time.monotonic() > deadline:
                raise RuntimeError("connpark serve did not start")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return rss(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                # It waits (shutdown_grace) for a worker to take its SHUTDOWN wakes:
                # none will, the run is over. A second SIGTERM ends the wait.
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self._log.close()
        self._dir.cleanup()

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- client farms: TCP clients in other processes ------------------------------------

FARM_SCRIPT = HERE / "_farm.py"
# Client sockets per farm process, each process on its own 127.0.0.x source
# address. Linux's bind(port 0) hands out odd ports first; past half of the
# ephemeral range (~14k here) every bind scans it all (~5 ms each): stay under.
PER_PROCESS = 12_000
PER_SOURCE = PER_PROCESS


class Farm:
    """TCP clients spread over processes and 127.0.0.x source addresses.

    Each client has a global index. Commands go to the farm processes over
    pipes; ``send`` writes to chosen clients and returns their write times
    (``time.monotonic_ns``, comparable across processes on Linux).
    """

    def __init__(
        self,
        addr: tuple[str, int],
        n: int,
        per_process: int = PER_PROCESS,
        source_base: int = 2,
        sources: Sequence[str] | None = None,
        started: list[subprocess.Popen[str]] | None = None,
    ) -> None:
        """Process k binds its clients to ``sources[k]``, else 127.0.0.(source_base + k);
        two farms alive at once should use disjoint addresses (each holds ports).
        ``started`` gets each process as it starts (to kill them if this never returns).
        """
        self.n = n
        self.procs: list[tuple[subprocess.Popen[str], int, int]] = []  # (proc, first, count)
        try:
            for k, first in enumerate(range(0, n, per_process)):
                count = min(per_process, n - first)
                src = sources[k] if sources is not None else f"127.0.0.{source_base + k}"
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        str(FARM_SCRIPT),
                        addr[0],
                        str(addr[1]),
                        src,
                        str(count),
                        str(first),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    bufsize=1,
                )
                self.procs.append((proc, first, count))
                if started is not None:
                    started.append(proc)
            for proc, _, count in self.procs:
                line = self._read(proc)
                if line != f"connected {count}":
                    raise RuntimeError(f"farm failed: {line!r}")
        except BaseException:
            for proc, _, _ in self.procs:
                proc.kill()
                proc.wait()
            raise

    @staticmethod
    def _read(proc: subprocess.Popen[str]) -> str:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("farm process died")
        return line.strip()

    def _cmd(self, proc: subprocess.Popen[str], line: str) -> str:
        assert proc.stdin is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return self._read(proc)

    def send(self, indices: Sequence[int], payload: str = "x") -> dict[int, int]:
        """Write ``payload`` + index on each chosen client at once; {index: t_ns}."""
        by_proc: dict[int, list[int]] = {}
        for i in indices:
            for k, (_, first, count) in enumerate(self.procs):
                if first <= i < first + count:
                    by_proc.setdefault(k, []).append(i - first)
                    break
        out: dict[int, int] = {}
        for k, local in by_proc.items():
            proc, first, _ = self.procs[k]
            assert proc.stdin is not None
            proc.stdin.write(f"send {payload} {','.join(map(str, local))}\n")
            proc.stdin.flush()
        for k in by_proc:
            proc, first, _ = self.procs[k]
            reply = self._read(proc).split()
            assert reply[0] == "sent", reply
            for pair in reply[1:]:
                local_i, t = pair.split(":")
                out[first + int(local_i)] = int(t)
        return out

    def read(self, index: int, timeout: float = 10.0) -> bytes | None:
        """What the server sent back on client ``index`` (b"" at EOF, None on timeout)."""
        for proc, first, count in self.procs:
            if first <= index < first + count:
                reply = self._cmd(proc, f"read {index - first} {timeout}")
                if reply == "none":
                    return None
                return b"" if reply == "eof" else bytes.fromhex(reply)
        raise IndexError(index)

    def close(self) -> None:
        for proc, _, _ in self.procs:
            if proc.poll() is None:
                try:
                    self._cmd(proc, "quit")
                except (RuntimeError, OSError, BrokenPipeError):
                    pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Farm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def expected_payload(payload: str, index: int) -> bytes:
    """What ``Farm.send`` writes on client ``index``."""
    return f"{payload}{index}\n".encode()


def time_call(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def plot_bars(
    name: str, title: str, labels: Sequence[str], series: dict[str, Sequence[float]], ylabel: str
) -> Path | None:
    """A grouped bar chart in results/NAME.png; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install 'connpark[bench]')")
        return None
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        xs = [i + k * width for i in range(len(labels))]
        ax.bar(xs, values, width, label=label)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return path
