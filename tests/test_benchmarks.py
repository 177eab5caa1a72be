"""Every benchmark script runs in its tiny mode, so none of them can rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.linux

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = ("--tiny", "--no-plot")
SCRIPTS = ["throughput", "memory", "latency", "heavy", "scale", "recovery", "serving", "million"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_tiny_mode_runs_and_writes_json(name: str) -> None:
    script = BENCH / f"bench_{name}.py"
    result_file = BENCH / "results" / f"{name}.json"
    before = result_file.stat().st_mtime if result_file.exists() else 0.0
    proc = subprocess.run(
        [sys.executable, str(script), "--tiny", "--no-plot"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCH.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result_file.exists()
    assert result_file.stat().st_mtime > before
    data = json.loads(result_file.read_text())
    assert data["benchmark"] == name
    assert data["machine"]["cpus"] >= 1


def test_throughput_with_idle_connections_parked_besides() -> None:
    """``--idle N``: a helper process parks N idle connections in each container
    first, and holds them while the cycles are measured."""
    result_file = BENCH / "results" / "throughput_idle300.json"
    result_file.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_throughput.py"), *TINY, "--idle", "300"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCH.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "300 idle connections parked besides" in proc.stdout
    data = json.loads(result_file.read_text())
    assert data["idle_parked"] == 300
    assert data["summary"]["8"]["connpark_rate"] > 0
