"""A real systemd manager for tests: PID 1 of private namespaces, never the host's.

The recipe is shared/notes/systemd-sandbox.md: a cgroup v2 directory below our
own, ``unshare`` into new PID, mount, UTS, IPC and cgroup namespaces, private
mounts (``inside.sh``), our units in /run/systemd/system and every unit that
could touch the host masked. Commands reach it with ``nsenter``. The network
namespace is shared, and the work directory is bound in at its own path, so a
unix socket there is reachable from the test.

Teardown (always, also after a failure): SIGRTMIN+4 (poweroff) to its PID 1,
SIGKILL if that takes over 5 s (the kernel then kills everything in the PID
namespace), then the cgroup directories are removed, deepest first. If the
test process itself dies, PR_SET_PDEATHSIG kills ``unshare``, whose
``--kill-child`` kills PID 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEMD = "/lib/systemd/systemd"
_TOOLS = ("unshare", "nsenter", "mount", "systemctl")


def why_not() -> str | None:
    """Why a systemd sandbox cannot be booted here (None: it can)."""
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root"
    if not os.access(SYSTEMD, os.X_OK):
        return f"no {SYSTEMD}"
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}"
    if cgroup2_mount() is None:
        return "no cgroup2 mount"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup", "true"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if probe.returncode != 0:
        return f"cannot unshare namespaces: {probe.stderr.strip()}"
    return None


def cgroup2_mount() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return Path(left.split()[4])
    return None


def own_cgroup2() -> Path:
    """Our cgroup v2 directory (the ``0::`` line of /proc/self/cgroup)."""
    mount = cgroup2_mount()
    assert mount is not None
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return mount / line[3:].strip().lstrip("/")
    raise RuntimeError("no cgroup v2 entry in /proc/self/cgroup")


def _pdeathsig() -> None:
    """In the child before exec: SIGKILL when the test process goes, however it goes."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Sandbox:
    """One systemd manager in private namespaces; ``units`` are written before boot."""

    def __init__(self, work: Path, units: dict[str, str]) -> None:
        self.work = work
        (work / "units").mkdir()
        for name, text in units.items():
            path = work / "units" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        (work / "console.log").touch()
        self.cgroup = own_cgroup2() / f"connpark-test-{uuid.uuid4().hex[:12]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    # -- lifecycle -------------------------------------------------------------------

    def boot(self, timeout: float = 15.0) -> None:
        self.cgroup.mkdir()
        with open(self.work / "boot.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "sh",
                    "-c",
                    'echo $$ > "$1/cgroup.procs" && shift && exec "$@"',
                    "sh",
                    str(self.cgroup),
                    "unshare",
                    "--pid",
                    "--fork",
                    "--kill-child=SIGKILL",
                    "--mount",
                    "--uts",
                    "--ipc",
                    "--cgroup",
                    "--propagation",
                    "private",
                    "--mount-proc",
                    "sh",
                    str(HERE / "inside.sh"),
                ],
                env={
                    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                    "CP_WORK": str(self.work),
                    # libmount must not write the host's /run/mount/utab.
                    "LIBMOUNT_UTAB": str(self.work / "utab"),
                },
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_pdeathsig,
            )
        deadline = time.monotonic() + timeout
        while not self.pid1:
            self._check_alive()
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            with contextlib.suppress(OSError):
                first = children.read_text().split()
                if first:
                    self.pid1 = int(first[0])
            if time.monotonic() > deadline:
                raise RuntimeError("unshare did not fork PID 1 in time\n" + self.logs())
            time.sleep(0.01)
        while True:
            self._check_alive()
            state = self.systemctl("is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"systemd is {state!r} after {timeout} s\n" + self.logs())
            time.sleep(0.05)

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the sandbox exited ({self.proc.returncode})\n" + self.logs())

    def teardown(self) -> None:
        """Power off (SIGKILL after 5 s), then remove our cgroups. Safe to call twice."""
        if self.proc is not None:
            if self.proc.poll() is None and self.pid1:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1, signal.SIGRTMIN + 4)  # systemd: poweroff
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1, signal.SIGKILL)  # the whole PID namespace goes
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.cgroup.exists():
            _remove_tree(self.cgroup)

    def gone(self) -> bool:
        """Nothing of ours is left: no PID 1, no cgroup."""
        alive = False
        if self.pid1:
            try:
                os.kill(self.pid1, 0)
                alive = True
            except ProcessLookupError:
                pass
        return not alive and not self.cgroup.exists()

    # -- talking to it -----------------------------------------------------------------

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [*self.nsenter, "systemctl", "--no-pager", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"systemctl {' '.join(args)}: {out.stderr}{out.stdout}")
        return out

    @property
    def nsenter(self) -> list[str]:
        """A command prefix that runs inside the sandbox's namespaces."""
        return ["nsenter", "-t", str(self.pid1), "-m", "-p", "-u", "-i", "-C", "--"]

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def logs(self) -> str:
        parts = []
        for name in ("boot.log", "console.log", "service.log"):
            path = self.work / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)


def _remove_tree(top: Path, timeout: float = 5.0) -> None:
    """rmdir a cgroup tree, deepest first (a cgroup empties once its processes are reaped)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda x: -len(x[0])):
                os.rmdir(dirpath)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
