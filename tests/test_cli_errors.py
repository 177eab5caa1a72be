"""Start-up and usage errors: one line on stderr, no traceback, exit 1 (2 for usage)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from ._procs import CONNPARK, ServeProcess

pytestmark = pytest.mark.linux


def _run(*args: str, timeout: float = 20) -> tuple[int, str]:
    proc = subprocess.run(
        [*CONNPARK, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stderr


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_socket_already_served(sockdir: Path) -> None:
    proc = ServeProcess(sockdir / "c.sock")
    try:
        rc, err = _run("serve", "--socket", str(proc.path))
        assert rc == 1
        assert "another server is listening on" in _one_line(err)
    finally:
        assert proc.stop() == 0


def test_bad_socket_paths(sockdir: Path) -> None:
    cases = {
        str(sockdir / "missing" / "c.sock"): "does not exist",
        str(sockdir / ("x" * 120) / "c.sock"): "over the AF_UNIX limit",
    }
    regular = sockdir / "file"
    regular.write_text("not a socket")
    cases[str(regular)] = "exists and is not a socket"
    (sockdir / "dir").mkdir()
    cases[str(sockdir / "dir")] = "is a directory"
    if os.geteuid() != 0:  # root writes anywhere
        locked = sockdir / "locked"
        locked.mkdir(mode=0o500)
        cases[str(locked / "c.sock")] = "Permission denied"
    for path, why in cases.items():
        rc, err = _run("serve", "--socket", path, "--log-level", "error")
        assert rc == 1, (path, err)
        line = _one_line(err)
        assert line.startswith("connpark serve: error: "), line
        assert why in line, line
        assert not line.endswith("None"), line


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["serve", "--socket-mode", "999"], "--socket-mode must be octal"),
        (["serve", "--socket-mode", "1777"], "within 0000..0777"),
        (["serve", "--idle-timeout", "-3"], "must be a number > 0"),
        (["serve", "--max-parked", "many"], "not an integer"),
        (["stats", "--watch", "-1"], "must be a number > 0"),
        (["stats", "--watch", "nan"], "must be a number > 0"),
        (["serve", "--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_usage_errors_exit_2(args: list[str], why: str) -> None:
    rc, err = _run(*args)
    assert rc == 2
    assert why in _one_line(err)


@pytest.mark.parametrize(
    ("toml", "why"),
    [
        ('max_parked = "lots"', "max_parked must be an integer, got 'lots'"),
        ("idle_timeout = true", "idle_timeout must be a number of seconds"),
        ("socket_mode = 999", "socket_mode must be within 0000..0777"),
        ('socket_mode = "rw"', "socket_mode must be octal"),
        ("allow_uids = 5", "allow_uids must be a list"),
        ("path = 5", "path must be a string"),
        ("max_output_bytes = 10", "'max_output_bytes' must be >= 65536: 10"),
        ("window = 0", "window must be > 0"),
        ("bogus = 1", "unknown configuration keys: bogus"),
        ("[connpark\n", "cannot read config"),
    ],
)
def test_config_value_errors_are_one_line(sockdir: Path, toml: str, why: str) -> None:
    cfg = sockdir / "c.toml"
    cfg.write_text(f"[connpark]\n{toml}\n")
    rc, err = _run("serve", "--socket", str(sockdir / "c.sock"), "--config", str(cfg))
    assert rc == 1
    assert why in _one_line(err)


def test_stats_on_a_regular_file_and_on_nothing(sockdir: Path) -> None:
    regular = sockdir / "file"
    regular.write_text("")
    rc, err = _run("stats", "--socket", str(regular))
    assert rc == 1
    assert _one_line(err).endswith(": not a socket")
    rc, err = _run("stats", "--socket", str(sockdir / "none.sock"))
    assert rc == 1
    assert _one_line(err).endswith(": no such socket file")


def test_stats_sessions_are_logged_at_debug_only(sockdir: Path) -> None:
    proc = ServeProcess(sockdir / "c.sock", ["--log-level", "info"])
    try:
        for _ in range(3):
            rc, _err = _run("stats", "--socket", str(proc.path), "--json")
            assert rc == 0
        time.sleep(0.2)
    finally:
        assert proc.stop() == 0
    assert "session" not in proc.log_text().replace("--", ""), proc.log_text()
