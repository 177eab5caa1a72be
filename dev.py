#!/usr/bin/env python3
"""One entry point for set-up: ``python3 dev.py run``, ``test`` and ``bench``.

Why a script and not a Makefile: the only thing a fresh machine is promised
to have is python3 (>= 3.10). The script makes ``.venv`` next to itself,
installs the project into it (again only when pyproject.toml changed), then
runs the job. Extra arguments after the command go to that job.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def _ensure_env(extras: str) -> None:
    """Create the virtual environment and install the project with ``extras``."""
    if not PY.exists():
        try:
            venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        except (subprocess.CalledProcessError, OSError) as exc:
            raise SystemExit(
                f"dev.py: cannot create {VENV} ({exc}); on Debian/Ubuntu install python3-venv"
            ) from exc
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".installed-{extras or 'base'}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    target = f".[{extras}]" if extras else "."
    subprocess.run(
        [str(PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", target],
        cwd=ROOT,
        check=True,
    )
    stamp.write_text(digest)


def _run(*argv: str) -> int:
    return subprocess.run(argv, cwd=ROOT).returncode


def cmd_run(args: list[str]) -> int:
    """Start the container with its defaults, plus an echo worker that parks idle clients.

    Extra args go to ``connpark serve``. Ctrl-C stops both (the container drains).
    """
    _ensure_env("")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and os.path.isdir(runtime) else ROOT
    path = base / "connpark.sock"
    listen = os.environ.get("CONNPARK_ECHO_LISTEN", "127.0.0.1:8007")
    print(f"+ connpark serve --socket {path} {' '.join(args)}", flush=True)
    container = subprocess.Popen(
        [str(BIN / "connpark"), "serve", "--socket", str(path), "--log-level", "info", *args],
        cwd=ROOT,
    )
    worker = None
    try:
        deadline = time.monotonic() + 15
        while not path.exists():
            if container.poll() is not None or time.monotonic() > deadline:
                print("dev.py: the container did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        worker = subprocess.Popen(
            [
                str(PY),
                str(ROOT / "examples" / "echo_worker.py"),
                "--parking-socket",
                str(path),
                "--listen",
                listen,
            ],
            cwd=ROOT,
        )
        print(
            f"""
  connpark is running. To see it park and wake a connection:
    nc {listen.replace(":", " ")}  (or: {PY} examples/line_client.py {listen.replace(":", " ")})
                                 type a line: it echoes; stay quiet 2 s: it is parked;
                                 type again: it is woken and echoes on the same connection
    {BIN / "connpark"} stats --socket {path} --watch
  Ctrl-C stops the echo worker and drains the container.
""",
            flush=True,
        )
        return container.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            worker.wait()
        if container.poll() is None:
            container.send_signal(signal.SIGTERM)
            container.wait()


def cmd_test(args: list[str]) -> int:
    """Lint, format check, strict types, then the whole pytest suite."""
    _ensure_env("test")
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


COMMANDS = {"run": cmd_run, "test": cmd_test, "bench": cmd_bench}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        return 2
    return COMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    raise SystemExit(main())
