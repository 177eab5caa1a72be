"""contrib/systemd/ under a real systemd manager (booted in private namespaces).

The unit files are the shipped ones; a drop-in per unit changes only what a test
must: the paths, a 1 s watchdog, a quick restart, no core files, and
DefaultDependencies=no (the sandbox has no sysinit/basic targets). One test, in
steps, on one manager: Type=notify reaches active, socket activation starts the
service at the first worker connect, reload keeps it active, SIGKILL is followed
by a restart, and the watchdog kills a service that stops answering.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import connpark
from connpark._stats_client import fetch_stats

from .._procs import tcp_pairs
from .sandbox import Sandbox, why_not

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "systemd"

REPO = Path(__file__).resolve().parents[2]
_why = why_not()
if _why is None and str(REPO).startswith(("/tmp/", "/var/tmp/")):
    # The sandbox covers /tmp with its own tmpfs, and the unit's ProtectHome hides
    # the interpreter's home: a checkout there cannot be run inside.
    _why = f"the checkout ({REPO}) is under /tmp, which the systemd sandbox replaces"
pytestmark = [pytest.mark.linux, pytest.mark.skipif(_why is not None, reason=_why or "")]


def _units(work: Path) -> dict[str, str]:
    sock = work / "connpark.sock"
    return {
        "connpark.service": (CONTRIB / "connpark.service").read_text(),
        "connpark.socket": (CONTRIB / "connpark.socket").read_text(),
        "connpark.socket.d/test.conf": f"""\
[Unit]
DefaultDependencies=no
[Socket]
ListenStream=
ListenStream={sock}
""",
        "connpark.service.d/test.conf": f"""\
[Unit]
DefaultDependencies=no
[Service]
ExecStart=
ExecStart={sys.executable} -m connpark serve --socket {sock} --log-level debug --crash-recovery
Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# 2 s: a supervisor and its shard start in time on a loaded 2-core CI machine.
WatchdogSec=2
RestartSec=100ms
TimeoutStopSec=5
LimitCORE=0
StandardOutput=append:{work}/service.log
StandardError=inherit
# The work directory is in /tmp, which PrivateTmp=yes hides: bind it in for ExecStopPost=.
BindPaths={work}
ExecStopPost=/bin/sh -c 'echo "$$SERVICE_RESULT $$EXIT_CODE $$EXIT_STATUS" >> {work}/results.log'
""",
        "connpark-test.target": """\
[Unit]
Description=connpark systemd test
DefaultDependencies=no
Wants=connpark.socket
""",
    }


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with tempfile.TemporaryDirectory(prefix="cp-sd-") as d:
        box = Sandbox(Path(d), _units(Path(d)))
        try:
            box.boot()
            yield box
        finally:
            box.teardown()
            assert box.gone(), "the sandbox left a process or a cgroup behind"


def _until(what: str, ok: Callable[[], bool], box: Sandbox, timeout: float = 10.0) -> float:
    """Seconds until ``ok()`` held; fails with the manager's logs after ``timeout``."""
    start = time.monotonic()
    while not ok():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not {what} within {timeout} s\n{box.logs()}")
        time.sleep(0.02)
    return time.monotonic() - start


def _results(box: Sandbox) -> list[str]:
    """$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS of each run that ended (ExecStopPost=)."""
    path = box.work / "results.log"
    return path.read_text().splitlines() if path.exists() else []


def test_contrib_units_under_systemd(sandbox: Sandbox) -> None:
    box = sandbox
    svc = "connpark.service"
    path = box.work / "connpark.sock"

    # Socket activation: systemd listens, the service is not running yet.
    assert box.show("connpark.socket", "ActiveState") == "active"
    assert box.show(svc, "ActiveState") == "inactive"
    assert path.is_socket()
    assert path.stat().st_mode & 0o777 == 0o600

    # The first worker connect starts it; Type=notify: active once READY=1 came.
    clients, servers = tcp_pairs(2)
    try:
        with connpark.BlockingParking(str(path), pool="web") as parking:
            parking.park(servers[0], token=b"via-systemd")
            assert box.systemctl("is-active", svc).stdout.strip() == "active"
            _until(
                "STATUS parked 1", lambda: box.show(svc, "StatusText").startswith("parked 1,"), box
            )
            clients[0].sendall(b"x")
            woken = parking.next_wake(timeout=10)
            assert woken is not None
            assert woken.reason is connpark.Reason.READABLE
            assert woken.socket is not None
            woken.socket.close()

            # One stays parked through what follows.
            parking.park(servers[1], token=b"kept")
            pid = box.show(svc, "MainPID")
            log = box.work / "service.log"
            assert f"container listening on {path}" in log.read_text()

            def shard() -> int:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        procs = fetch_stats(str(path)).processes
                        break
                    except connpark.ConnparkError:  # the old shard leaving: ask again
                        assert time.monotonic() < deadline, "no shard answers"
                        time.sleep(0.05)
                return next(p.pid for p in procs if p.role == "shard")

            # Reload (ExecReload= sends SIGHUP): an upgrade. Same main process
            # (re-executed), a new shard, the parked connection still parked.
            old = shard()
            box.systemctl("reload", svc)  # SIGHUP: RELOADING=1, then READY=1 once done
            _until("a new shard", lambda: shard() != old, box)
            _until("active again", lambda: box.show(svc, "ActiveState") == "active", box)
            assert box.show(svc, "MainPID") == pid
            assert "upgrade: supervisor re-executed; upgrading 1 shard(s)" in log.read_text()

            # A killed shard is recovered by the supervisor: the unit never notices.
            old = shard()  # a pid inside the sandbox's PID namespace
            subprocess.run([*box.nsenter, "kill", "-KILL", str(old)], check=True)
            _until("shard recovered", lambda: shard() != old, box)
            assert box.show(svc, "NRestarts") == "0"
            assert fetch_stats(str(path)).parked == 1

            clients[1].sendall(b"still here")
            woken = parking.next_wake(timeout=10)
            assert woken is not None
            assert woken.token == b"kept"
            assert woken.socket is not None
            assert woken.socket.recv(100) == b"still here"
            woken.socket.close()
    finally:
        for s in clients + servers:
            s.close()

    # SIGKILL: Restart=on-failure brings it back, on the socket systemd kept.
    box.systemctl("kill", "--kill-who=main", "--signal=SIGKILL", svc)
    back = _until(
        "restarted after SIGKILL",
        lambda: (
            box.show(svc, "MainPID") not in ("0", pid) and box.show(svc, "ActiveState") == "active"
        ),
        box,
    )
    assert box.show(svc, "NRestarts") == "1"
    assert _results(box) == ["signal killed KILL"]  # systemd's own account of it
    assert fetch_stats(str(path)).parked == 0  # a new instance answers
    pid = box.show(svc, "MainPID")

    # Alive well past WatchdogSec=2: the pings arrive while the shard answers.
    time.sleep(2.5)
    assert box.show(svc, "MainPID") == pid
    assert box.show(svc, "NRestarts") == "1"

    # Hung (SIGSTOP): no more pings, the watchdog kills it, Restart= brings it back.
    box.systemctl("kill", "--kill-who=main", "--signal=SIGSTOP", svc)
    fired = _until(
        "restarted by the watchdog",
        lambda: (
            box.show(svc, "MainPID") not in ("0", pid) and box.show(svc, "ActiveState") == "active"
        ),
        box,
    )
    assert box.show(svc, "NRestarts") == "2"
    assert _results(box)[1:] == ["watchdog killed ABRT"]
    assert fetch_stats(str(path)).parked == 0
    print(f"restart after SIGKILL {back:.2f} s, watchdog kill + restart {fired:.2f} s")

    # A socket-activated service leaves the socket file to systemd.
    box.systemctl("stop", svc)
    assert box.show(svc, "ActiveState") == "inactive"
    assert path.is_socket()
    assert box.show("connpark.socket", "ActiveState") == "active"
