#!/usr/bin/env python3
"""One entry point for set-up: ``python3 dev.py run`` and ``python3 dev.py test``.

Why a script and not a Makefile: the only thing a fresh machine is promised
to have is python3 (>= 3.10). The script makes ``.venv`` next to itself,
installs the project into it (again only when pyproject.toml changed), then
runs the job. Extra arguments after the command go to that job.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def _ensure_env(extras: str) -> None:
    """Create the virtual environment and install the project with ``extras``."""
    if not PY.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
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
    """Start the container with its defaults (extra args go to ``connpark serve``)."""
    _ensure_env("")
    return _run(str(BIN / "connpark"), "serve", "--log-level", "info", *args)


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


COMMANDS = {"run": cmd_run, "test": cmd_test}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        return 2
    return COMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    raise SystemExit(main())
