"""Closing parked trio sockets without trio's ``notify_closing`` (the trio hook's closer).

Closing a trio socket costs trio's notify_closing: a waiters record made and
dropped, and an EPOLL_CTL_DEL that fails (ENOENT) for a socket no task ever
waited on, raised and swallowed as an OSError: ~1.5 us, most of what closing
a parked socket cost. When no trio task waits on the fd there is nobody to
notify, so ``close_sockets`` detaches the fd and closes it itself. A socket some
task waited on earlier may still be in trio's epoll set, silenced by
EPOLLONESHOT (or armed for HUP/ERR only, after a cancelled wait); the
container holds the connection, so the kernel keeps that entry until the
container closes it, and it can report at most one event, under this fd
number: a spurious wakeup, which trio's design already allows for stale fds
(see trio/_core/_io_epoll.py). Knowing whether a task waits needs trio's
private epoll bookkeeping: looked up guardedly, and with any other I/O
manager (kqueue, IOCP), outside trio.run, or after a trio change that moves
it, sockets are closed the ordinary way (``trio_fast_close`` says which;
tests/test_engine.py fails if the fast way is off with this trio).
"""

from __future__ import annotations

import os
from collections.abc import Container, Iterable
from typing import Any

import trio


def _trio_private() -> tuple[Any, type[Any] | None]:
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT
        from trio._socket import _SocketType
    except ImportError:  # pragma: no cover - another trio
        return None, None
    return GLOBAL_RUN_CONTEXT, _SocketType


_TRIO_RUN, _TrioSocket = _trio_private()


def _trio_waits() -> Container[int] | None:
    """The fds trio tasks wait on now (epoll), or None: cannot tell."""
    try:
        io_manager = _TRIO_RUN.runner.io_manager
    except AttributeError:  # outside trio.run (or no such thing)
        return None
    registered = getattr(io_manager, "_registered", None)
    if type(io_manager).__name__ != "EpollIOManager" or not isinstance(registered, dict):
        return None
    return registered


def trio_fast_close() -> bool:
    """Closing a trio socket no task waits on skips ``notify_closing`` (here, now)."""
    return _TrioSocket is not None and _trio_waits() is not None


def close_sockets(socks: Iterable[Any]) -> None:
    """Close sockets the engine closes for their owner: parked ones (the container
    has them), wakes it could not hand back."""
    waits: Container[int] | None = None
    looked = False
    for sock in socks:
        if type(sock) is _TrioSocket:
            if not looked:
                waits, looked = _trio_waits(), True
            if waits is not None:
                fd = sock.detach()  # the socket reads as closed (fileno -1) from here
                if fd >= 0:
                    if fd in waits:  # a task waits on it: what trio's close() does
                        trio.lowlevel.notify_closing(fd)
                    try:
                        os.close(fd)
                    except OSError:
                        pass  # the fd is released all the same
                continue
        sock.close()
