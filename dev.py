#!/usr/bin/env python3
"""One entry point for set-up: ``python3 dev.py run``, ``test``, ``bench`` and ``help``.

Why a script and not a Makefile: the only thing a fresh machine is promised
to have is python3 (>= 3.10). The script makes ``.venv`` next to itself,
installs the project into it (again only when pyproject.toml changed), then
runs the job. Extra arguments after the command go to that job.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import venv
from collections.abc import Callable
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"

USAGE = """\
usage: python3 dev.py COMMAND [ARGS...]

commands:
  run [--socket PATH] [--listen HOST:PORT] [SERVE-ARGS...]
        the container (connpark serve) and examples/echo_worker.py, a worker that
        parks its idle clients; both stop on Ctrl-C (or SIGTERM), or when either exits.
        --socket   the container's socket (default: ./connpark.sock in this directory)
        --listen   the echo worker's address (default: $CONNPARK_ECHO_LISTEN, else
                   127.0.0.1:8007; port 0 picks a free port)
        other arguments go to `connpark serve` (e.g. --idle-timeout 30)
  test [PYTEST-ARGS...]
        what CI runs: ruff check, ruff format --check, mypy --strict, then pytest
        with these arguments (e.g. -k container -x)
  bench [--quick]
        the benchmarks; JSON and PNG plots in benchmarks/results/
  help  this text

Each command makes .venv/ here and installs what it needs on first use.
"""


# -- the virtual environment ------------------------------------------------------------


def _ensure_env(*extras: str) -> None:
    """Create ``.venv`` and install the project with (at least) ``extras``.

    One stamp records which extras are installed for this pyproject.toml, so
    ``run`` after ``test`` (or the reverse) does not reinstall: each install
    covers every extra asked for so far.
    """
    if not PY.exists():
        try:
            venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        except (subprocess.CalledProcessError, OSError) as exc:
            raise SystemExit(
                f"dev.py: cannot create {VENV} ({exc}); on Debian/Ubuntu install python3-venv"
            ) from exc
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    stamp = VENV / ".installed"
    installed: set[str] = set()
    try:
        recorded = json.loads(stamp.read_text())
        if recorded["pyproject"] == digest:
            installed = set(recorded["extras"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    wanted = installed | set(extras)
    if stamp.exists() and wanted == installed:
        return
    target = f".[{','.join(sorted(wanted))}]" if wanted else "."
    subprocess.run(
        [str(PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", target],
        cwd=ROOT,
        check=True,
    )
    stamp.write_text(json.dumps({"pyproject": digest, "extras": sorted(wanted)}))


def _run(*argv: str) -> int:
    return subprocess.run(argv, cwd=ROOT).returncode


# -- run: the container and the echo worker ------------------------------------------


class _Failed(Exception):
    """``dev.py run`` cannot go on; the message is the one line the user sees."""


class _Child:
    """A child in our process group; its output is held back until it is ready, then copied.

    Holding it back keeps a failed start to the lines that explain it.
    """

    def __init__(self, name: str, argv: list[str], pgid: int, on_line: Callable[[str], None]):
        self.name = name
        self._on_line = on_line
        self._held: list[bytes] = []
        self._live = False
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=lambda: _join_group(pgid),
        )
        self._pump = threading.Thread(target=self._copy_output, daemon=True)
        self._pump.start()

    def _copy_output(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._on_line(raw.decode(errors="replace"))
            with self._lock:
                if not self._live:
                    self._held.append(raw)
                    continue
            _write(raw)

    def go_live(self) -> None:
        """From now on, copy its output to ours as it comes (held lines first)."""
        with self._lock:
            for raw in self._held:
                _write(raw)
            self._held.clear()
            self._live = True

    def held_output(self) -> str:
        self._pump.join(timeout=2)
        with self._lock:
            return b"".join(self._held).decode(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def finish(self) -> None:
        self._pump.join(timeout=2)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _write(raw: bytes) -> None:
    try:
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass  # our stdout is gone: keep draining the child so it never blocks


def _load_prctl() -> Callable[[int, int], int] | None:
    """Linux's prctl, looked up in the parent: a child between fork and exec must not import."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl: Callable[[int, int], int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _join_group(pgid: int) -> None:
    """In the child, before exec: join our process group; on Linux, die with dev.py."""
    os.setpgid(0, pgid)
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)  # SIGTERM if dev.py dies, even by SIGKILL


def _shown(path: Path) -> str:
    """``path`` as the user can type it from where they ran dev.py."""
    try:
        rel = path.relative_to(Path.cwd())
    except ValueError:
        return str(path)
    return f"./{rel}" if rel.parent == Path(".") else str(rel)


def _answers(path: Path) -> bool:
    """Whether a server accepts connections on the unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _port_busy(host: str, port: int) -> str | None:
    """Why the echo worker could not listen on ``host:port`` (as it binds), or None."""
    probe = socket.socket()
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        probe.listen(1)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "already in use"
        return exc.strerror or str(exc)
    finally:
        probe.close()
    return None


def _parse_run_args(args: list[str]) -> tuple[Path, str, int, list[str]]:
    parser = argparse.ArgumentParser(prog="dev.py run", add_help=False, allow_abbrev=False)
    parser.add_argument("--socket")
    parser.add_argument("--listen")
    opts, serve_args = parser.parse_known_args(args)
    sock = Path(opts.socket).absolute() if opts.socket else ROOT / "connpark.sock"
    listen = opts.listen or os.environ.get("CONNPARK_ECHO_LISTEN") or "127.0.0.1:8007"
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise _Failed(f"dev.py run: --listen wants HOST:PORT, not {listen!r}")
    return sock, host or "127.0.0.1", int(port), serve_args


class _Signals:
    """SIGINT / SIGTERM / SIGHUP set a flag that the waiting loops check."""

    def __init__(self) -> None:
        self.count = 0
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1


def _wait_until(
    ready: Callable[[], bool], children: list[_Child], signals: _Signals, timeout: float
) -> _Child | None:
    """Poll ``ready`` until it holds (None), a child exits (that child), or the deadline."""
    deadline = time.monotonic() + timeout
    while not ready():
        for child in children:
            if not child.alive():
                return child
        if signals.count:
            raise KeyboardInterrupt
        if time.monotonic() > deadline:
            raise _Failed("")
        time.sleep(0.05)
    return None


def _container_answers(path: Path) -> bool:
    """A real request: one STATS round trip through ``connpark stats``."""
    if not path.exists():
        return False
    try:
        out = subprocess.run(
            [str(BIN / "connpark"), "stats", "--json", "--socket", str(path)],
            capture_output=True,
            timeout=10,
        )
    except subprocess.TimeoutExpired:
        return False
    if out.returncode != 0:
        return False
    try:
        return "sessions" in json.loads(out.stdout)
    except ValueError:
        return False


def _start(
    children: list[_Child],
    sock: Path,
    host: str,
    port: int,
    serve_args: list[str],
    signals: _Signals,
) -> str:
    """Start both children (into ``children``); once both are ready, the worker's address."""
    container = _Child(
        "the container",
        [str(BIN / "connpark"), "serve", "--socket", str(sock), "--log-level", "info", *serve_args],
        0,
        lambda line: None,
    )
    children.append(container)
    try:
        dead = _wait_until(lambda: _container_answers(sock), children, signals, timeout=30)
    except _Failed:
        raise _Failed(f"dev.py: the container did not answer on {sock} within 30 s") from None
    if dead is not None:
        raise _Failed(f"dev.py: the container exited (code {dead.proc.returncode})")

    listening: list[str] = []

    def on_worker_line(line: str) -> None:
        if line.startswith("listening on ") and not listening:
            listening.append(line.split()[-1])

    try:
        worker = _Child(
            "the echo worker",
            [
                str(PY),
                str(ROOT / "examples" / "echo_worker.py"),
                "--parking-socket",
                str(sock),
                "--listen",
                f"{host}:{port}",
            ],
            container.proc.pid,
            on_worker_line,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise _Failed(f"dev.py: cannot start the echo worker: {exc}") from exc
    children.append(worker)
    try:
        dead = _wait_until(lambda: bool(listening), children, signals, timeout=30)
    except _Failed:
        raise _Failed("dev.py: the echo worker did not start listening within 30 s") from None
    if dead is not None:
        raise _Failed(f"dev.py: {dead.name} exited (code {dead.proc.returncode})")
    return listening[0]


def _stop(children: list[_Child], signals: _Signals) -> None:
    """The container first (it hands parked connections back), then the worker, then kill.

    Every wait is bounded; a signal during the drain is passed on (it stops the
    container waiting for ACKs).
    """
    if not children:
        return
    pgid = children[0].proc.pid
    seen = signals.count
    for child in children:
        # The container's drain is bounded by its --shutdown-grace (10 s by default).
        patience = 15.0 if child is children[0] else 5.0
        if child.alive():
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + patience
        while child.alive() and time.monotonic() < deadline:
            if signals.count != seen:
                seen = signals.count
                child.proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
    if any(child.alive() for child in children):
        # Somebody of the group is still there, so its id cannot have been reused.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    for child in children:
        child.proc.wait()
        child.finish()


def cmd_run(args: list[str]) -> int:
    """The container and an echo worker that parks idle clients, in one process group."""
    if "-h" in args or "--help" in args:
        return cmd_help([])
    try:
        sock, host, port, serve_args = _parse_run_args(args)
    except _Failed as exc:
        print(exc, file=sys.stderr)
        return 2
    if _answers(sock):
        print(
            f"dev.py: a container already answers on {sock} (another `dev.py run`?); "
            "stop it, or pass --socket PATH",
            file=sys.stderr,
        )
        return 1
    if port and (why := _port_busy(host, port)):
        print(
            f"dev.py: cannot listen on {host}:{port}: {why}; "
            "pass --listen HOST:PORT (or set CONNPARK_ECHO_LISTEN)",
            file=sys.stderr,
        )
        return 1
    _ensure_env("examples")
    signals = _Signals()
    children: list[_Child] = []
    rc = 0
    try:
        print(f"+ connpark serve --socket {_shown(sock)} {' '.join(serve_args)}".rstrip())
        print(f"+ examples/echo_worker.py --parking-socket {_shown(sock)} --listen {host}:{port}")
        sys.stdout.flush()
        try:
            addr = _start(children, sock, host, port, serve_args, signals)
        except _Failed as exc:
            for child in children:
                if not child.alive():
                    sys.stderr.write(child.held_output())
            print(exc, file=sys.stderr)
            rc = 1
            return rc
        for child in children:
            child.go_live()
        ahost, _, aport = addr.rpartition(":")
        connpark = _shown(BIN / "connpark")
        print(
            f"""
  connpark is running: the container on {_shown(sock)}, the echo worker on {addr}.
  In another terminal:
    nc {ahost} {aport}        (or: {_shown(PY)} examples/line_client.py {ahost} {aport})
        type a line: it is echoed; stay quiet 2 s: "parked ticket ..." below;
        type again: "woken ticket ...: READABLE", echoed on the same connection
    {connpark} stats --socket {_shown(sock)} --watch
  Ctrl-C stops both: the container hands parked connections back first.
""",
            flush=True,
        )
        while signals.count == 0:
            dead = next((c for c in children if not c.alive()), None)
            if dead is not None:
                print(
                    f"dev.py: {dead.name} exited (code {dead.proc.returncode}); stopping",
                    file=sys.stderr,
                    flush=True,
                )
                rc = 1
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(children, signals)
        if children and sock.exists() and not _answers(sock):
            sock.unlink(missing_ok=True)  # our container was killed before it could
    return rc


# -- test and bench --------------------------------------------------------------------


def cmd_test(args: list[str]) -> int:
    """Lint, format check, strict types, then the whole pytest suite."""
    _ensure_env("test", "examples")
    steps = [
        [str(BIN / "ruff"), "check", "."],
        [str(BIN / "ruff"), "format", "--check", "."],
        [str(BIN / "mypy")],
        [str(PY), "-m", "pytest", *args],
    ]
    for step in steps:
        rc = _run(*step)
        if rc != 0:
            return rc
    return 0


def cmd_bench(args: list[str]) -> int:
    """Every benchmark (``--quick`` for the 3-minute version), JSON + PNG in benchmarks/results/."""
    _ensure_env("bench")
    return _run(str(PY), str(ROOT / "benchmarks" / "run_all.py"), *args)


def cmd_help(args: list[str]) -> int:
    """This text."""
    print(USAGE, end="")
    return 0


COMMANDS = {"run": cmd_run, "test": cmd_test, "bench": cmd_bench, "help": cmd_help}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("help", "-h", "--help"):
        return cmd_help(argv[1:])
    if argv[0] not in COMMANDS:
        print(
            f"dev.py: unknown command {argv[0]!r}; try: python3 dev.py help",
            file=sys.stderr,
        )
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
