"""Shared test helpers: fd counting, short socket dirs, subprocess launch."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from ._procs import ServeProcess

LINUX = sys.platform.startswith("linux")


def open_fd_count(pid: int | str = "self") -> int:
    """Open fds of a process (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for AF_UNIX paths (pytest's tmp_path can be too long)."""
    with tempfile.TemporaryDirectory(prefix="cp-") as d:
        yield Path(d)


def model_settings(env: str, examples: int, steps: int) -> settings:
    """A state machine's hypothesis settings: ``examples`` runs (the environment
    variable ``env`` may say otherwise) of ``steps`` steps, no deadline."""
    return settings(
        max_examples=int(os.environ.get(env, str(examples))),
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@pytest.fixture
def serve(sockdir: Path) -> Iterator[ServeProcess]:
    """A ``connpark serve`` that must outlive the test, stop cleanly (exit 0)
    and log no traceback (test files with other needs define their own)."""
    proc = ServeProcess(sockdir / "c.sock")
    yield proc
    assert proc.proc.poll() is None, "the container died:\n" + proc.log_text()
    assert proc.stop() == 0
    assert "Traceback" not in proc.log_text()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if LINUX:
        return
    skip = pytest.mark.skip(reason="needs Linux")
    for item in items:
        if "linux" in item.keywords:
            item.add_marker(skip)
