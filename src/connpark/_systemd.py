"""systemd's service protocol, the service's side: sd_notify and socket activation.

Stdlib only (no PyPI package sends fds with sd_notify; see issue 10). What the
manager documents in sd_notify(3) and sd_listen_fds(3):

- ``$NOTIFY_SOCKET`` is an AF_UNIX datagram socket: an absolute path, or an
  abstract name written with a leading ``@``. Each message is one datagram of
  newline-separated ``KEY=VALUE`` lines; fds travel with it as SCM_RIGHTS.
- ``$WATCHDOG_USEC`` (for the process ``$WATCHDOG_PID``, when set) asks for
  ``WATCHDOG=1`` more often than that; half the interval is the usual pace.
- Socket activation hands ``$LISTEN_FDS`` fds from fd 3 on, for the process
  ``$LISTEN_PID``, named by ``$LISTEN_FDNAMES`` (colon-separated).
"""

from __future__ import annotations

import array
import logging
import os
import socket
import time
from collections.abc import MutableMapping, Sequence

from ._errors import ConnparkError

LOGGER = logging.getLogger(__name__)

#: The first fd that socket activation hands over (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


def notify(message: str, *, fds: Sequence[int] = (), address: str | None = None) -> bool:
    """Send one sd_notify datagram; False when there is no ``$NOTIFY_SOCKET``.

    ``fds`` go along as SCM_RIGHTS (FDSTORE=1 needs them); the caller keeps
    its own copies. A manager that is not there is an ``OSError``.
    """
    address = os.environ.get("NOTIFY_SOCKET") if address is None else address
    if not address:
        return False
    if address[0] == "@":
        target = "\0" + address[1:]
    elif address[0] == "/":
        target = address
    else:
        raise OSError(f"NOTIFY_SOCKET must be a path or @abstract, got {address!r}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        data = [message.encode()]
        if fds:
            rights = array.array("i", fds).tobytes()
            sock.sendmsg(data, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, target)
        else:
            sock.sendmsg(data, [], 0, target)
    return True


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds within which systemd wants ``WATCHDOG=1`` from this process, or None."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1e6


class Notifier:
    """What a Type=notify service tells its manager; every call is a no-op without one.

    A failed send is logged (a warning the first time, then at debug level) and
    returns False: telling systemd must never take the service down.
    """

    def __init__(self, address: str | None, watchdog: float | None = None) -> None:
        self.address = address or None
        self._watchdog = watchdog
        self._warned = False
        self._last_status: str | None = None

    @classmethod
    def from_environ(cls, *, unset: bool = True) -> Notifier:
        """Read ``$NOTIFY_SOCKET`` and the watchdog; ``unset`` keeps children from seeing them."""
        notifier = cls(os.environ.get("NOTIFY_SOCKET"), watchdog_interval())
        if unset:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str, fds: Sequence[int] = ()) -> bool:
        """One datagram of ``KEY=VALUE`` fields (see sd_notify(3) for the keys)."""
        if self.address is None:
            return False
        try:
            return notify("\n".join(fields), fds=fds, address=self.address)
        except OSError as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            LOGGER.log(level, "cannot notify systemd at %s: %s", self.address, exc)
            return False

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is over: systemd may start what waits for us."""
        return self.send("READY=1", *self._status(status))

    def status(self, text: str) -> bool:
        return self.send(*self._status(text))

    @property
    def last_status(self) -> str | None:
        """The STATUS= text sent last (None: none yet)."""
        return self._last_status

    def reloading(self, status: str | None = None) -> bool:
        """A reload began; ``ready()`` ends it. MONOTONIC_USEC is what systemd >= 253 wants."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *self._status(status))

    def main_pid(self, pid: int) -> bool:
        """Another process is the service's main process now (an upgrade that forks)."""
        return self.send(f"MAINPID={pid}")

    def store_fds(self, name: str, fds: Sequence[int]) -> bool:
        """Keep ``fds`` in systemd's fd store under ``name`` (a handful; it is quadratic)."""
        return self.send("FDSTORE=1", f"FDNAME={name}", fds=fds)

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def _status(self, text: str | None) -> list[str]:
        if text is None:
            return []
        self._last_status = " ".join(text.split())  # one line
        return ["STATUS=" + self._last_status]

    def watchdog_interval(self) -> float | None:
        """Seconds within which a ``watchdog()`` is due (None: no watchdog asked for)."""
        return self._watchdog if self.enabled else None


def listen_fds(*, unset: bool = True) -> list[tuple[str, socket.socket]]:
    """The sockets systemd handed us, as (name, socket), in order; [] without activation.

    Each fd is made close-on-exec (systemd hands them inheritable), and the
    ``LISTEN_*`` variables are unset so that children do not take them for theirs.
    A socket without a name is called ``unknown``, as sd_listen_fds_with_names(3) does.
    """
    env = os.environ
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if not pid or not count or pid != str(os.getpid()):
        return []
    try:
        n = int(count)
    except ValueError:
        raise ConnparkError(f"LISTEN_FDS is not a number: {count!r}") from None
    labels = names.split(":") if names is not None else ["unknown"] * n
    if len(labels) != n:
        raise ConnparkError(f"LISTEN_FDNAMES names {len(labels)} fds, LISTEN_FDS says {n}")
    found = []
    for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + n), labels, strict=True):
        os.set_inheritable(fd, False)
        try:
            found.append((name, socket.socket(fileno=fd)))
        except OSError as exc:
            raise ConnparkError(f"systemd fd {fd} ({name}) is not a socket: {exc}") from exc
    return found
