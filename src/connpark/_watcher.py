"""One epoll (Linux) or kqueue (BSD/macOS) instance watching every parked fd.

Registrations are one-shot, for "readable or peer hung up", so a parked
socket fires at most once and then sits disarmed until the container
unregisters it. The container waits on ``fileno()`` with
``trio.lowlevel.wait_readable`` and drains events in batches with
``poll()``: no trio task, no per-socket object beyond the kernel's own.

epoll keys on the open file, not the fd number: always ``unregister`` before
closing or handing back a parked fd (epoll(7), "Questions and answers", Q6).

The epoll stays in trio's for good. Nested, each EPOLL_CTL_ADD pays the
kernel's loop check (~0.1 us); but taking it out for a big PARK frame and
back costs a walk over every fd it watches (~0.1 us each: ~1 ms at 9,000
parked, measured here), which made a cycle at batch 253 cost 13.5 instead
of 6.4 us with 8,000 idle connections parked besides.
"""

from __future__ import annotations

import errno
import select
import sys
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

#: Event bits, the same for both backends.
READ = 1  #: data (or a FIN) is waiting
HUP = 2  #: the peer shut its side (EPOLLRDHUP / EPOLLHUP / EV_EOF)
ERR = 4  #: the socket has a pending error (reset)


class Watcher(Protocol):
    def fileno(self) -> int: ...

    def register(self, fd: int) -> None:
        """Arm a one-shot readable/hang-up watch on ``fd``."""

    def unregister(self, fd: int) -> None:
        """Forget ``fd`` (armed or already fired); never raises for a gone fd."""

    def registrar(self) -> tuple[Callable[[int, int], None], int]:
        """(function, argument): ``function(fd, argument)`` is ``register(fd)`` without a
        method call in between, for the hot path (a PARK frame's fds)."""
        ...

    def unregister_many(self, fds: Iterable[int]) -> None:
        """``unregister`` each: the hot path (UNPARK) takes a batch out at once."""

    def rearm(self, fd: int) -> None:
        """Arm a fired one-shot watch again (after an auto-response kept it parked)."""

    def poll(self, max_events: int) -> list[tuple[int, int]]:
        """Ready (fd, READ|HUP|ERR bits) pairs, without blocking."""
        ...

    def close(self) -> None: ...


_GONE = (errno.ENOENT, errno.EBADF)


class EpollWatcher:
    """Linux: EPOLLIN | EPOLLRDHUP | EPOLLONESHOT on one epoll fd."""

    _MASK = (
        select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT if hasattr(select, "epoll") else 0
    )

    def __init__(self) -> None:
        self._ep = select.epoll()

    def fileno(self) -> int:
        return self._ep.fileno()

    def register(self, fd: int) -> None:
        self._ep.register(fd, self._MASK)

    def registrar(self) -> tuple[Callable[[int, int], None], int]:
        return self._ep.register, self._MASK

    def rearm(self, fd: int) -> None:
        self._ep.modify(fd, self._MASK)  # level check at MOD: bytes already there fire again

    def unregister(self, fd: int) -> None:
        try:
            self._ep.unregister(fd)
        except OSError as exc:
            if exc.errno not in _GONE:
                raise

    def unregister_many(self, fds: Iterable[int]) -> None:
        unregister = self._ep.unregister
        rest = iter(fds)
        while True:
            try:
                deque(map(unregister, rest), 0)  # at C speed; an error stops it...
                return
            except OSError as exc:  # ...and the rest carries on after the gone fd
                if exc.errno not in _GONE:
                    raise

    def poll(self, max_events: int) -> list[tuple[int, int]]:
        out = []
        for fd, ev in self._ep.poll(0, max_events):
            bits = 0
            if ev & select.EPOLLIN:
                bits |= READ
            if ev & (select.EPOLLRDHUP | select.EPOLLHUP):
                bits |= HUP
            if ev & select.EPOLLERR:
                bits |= ERR
            out.append((fd, bits))
        return out

    def close(self) -> None:
        self._ep.close()


if not sys.platform.startswith("linux"):  # kqueue: macOS and the BSDs

    class KqueueWatcher:
        """BSD/macOS: EVFILT_READ with EV_ONESHOT on one kqueue; EV_EOF means hang-up."""

        def __init__(self) -> None:
            self._kq = select.kqueue()

        def fileno(self) -> int:
            return int(self._kq.fileno())

        def register(self, fd: int) -> None:
            ev = select.kevent(fd, select.KQ_FILTER_READ, select.KQ_EV_ADD | select.KQ_EV_ONESHOT)
            self._kq.control([ev], 0, 0)

        def registrar(self) -> tuple[Callable[[int, int], None], int]:
            return lambda fd, _: self.register(fd), 0

        def rearm(self, fd: int) -> None:
            self.register(fd)

        def unregister(self, fd: int) -> None:
            ev = select.kevent(fd, select.KQ_FILTER_READ, select.KQ_EV_DELETE)
            try:
                self._kq.control([ev], 0, 0)
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise

        def unregister_many(self, fds: Iterable[int]) -> None:
            for fd in fds:
                self.unregister(fd)

        def poll(self, max_events: int) -> list[tuple[int, int]]:
            out = []
            for kev in self._kq.control(None, max_events, 0):
                bits = 0
                if kev.flags & select.KQ_EV_ERROR:
                    bits |= ERR
                else:
                    if kev.data > 0:
                        bits |= READ
                    if kev.flags & select.KQ_EV_EOF:
                        bits |= HUP | (ERR if kev.fflags else 0)
                out.append((int(kev.ident), bits or READ))
            return out

        def close(self) -> None:
            self._kq.close()


def make_watcher() -> Watcher:
    """The best backend this OS has."""
    if hasattr(select, "epoll"):
        return EpollWatcher()
    if not sys.platform.startswith("linux") and hasattr(select, "kqueue"):
        return KqueueWatcher()
    raise OSError("connpark needs epoll or kqueue")
