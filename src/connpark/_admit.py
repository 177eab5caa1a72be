"""Inspecting an fd a worker sent: is it a connected TCP stream we may park?

Every fd in a PARK frame is untrusted: it may be a pipe, an eventfd, a
listening or half-open socket, an ``O_PATH`` fd nothing can be asked of.
``inspect`` answers for one fd and never raises, so one bad entry cannot
affect another entry or the session. It never changes the fd's flags
(O_NONBLOCK lives on the open file, shared with the worker).

On Linux the common case costs three syscalls: ``getsockname`` (CPython's
socket object makes it when wrapping an fd: ENOTSOCK for non-sockets, and
the family), ``TCP_INFO`` (one byte: the TCP state, which also proves the
socket is TCP) and ``SO_COOKIE`` (the socket's unique id: a key that finds
the same socket sent twice in one frame; kernels before 4.12 lack it, then
the peer address is the key). Anything unusual takes a slower path that
names what is wrong. ``inspect_many`` makes the same checks for a whole
frame of fds, a C loop per step: the container's hot path.
"""

from __future__ import annotations

import _socket
import errno
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter, methodcaller

from ._wire import Refusal

LOGGER = logging.getLogger(__name__)

#: A borrowed fd is wrapped as a non-blocking socket object: no setblocking()
#: (a process-wide default timeout would otherwise make one), no syscall.
_BORROWED = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
#: Linux's SO_COOKIE (include/uapi/asm-generic/socket.h), if Python does not name it.
_SO_COOKIE: int | None = getattr(
    socket, "SO_COOKIE", 57 if sys.platform.startswith("linux") else None
)
_SO_ACCEPTCONN: int | None = getattr(socket, "SO_ACCEPTCONN", None)
_INET = (socket.AF_INET, socket.AF_INET6)
# Bound once: ``inspect`` runs for every parked fd.
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_IPPROTO_TCP = socket.IPPROTO_TCP
_SOL_SOCKET = socket.SOL_SOCKET
_new_socket = _socket.socket
_OK = Refusal.OK
_NOT_CONNECTED = Refusal.NOT_CONNECTED

#: Linux TCP states (include/net/tcp_states.h) -> the refusal, OK when parkable.
#: CLOSE_WAIT (the peer half-closed) is parkable: it wakes at once, with its bytes.
_TCP_STATES: dict[int, Refusal] = {
    1: Refusal.OK,  # ESTABLISHED
    2: Refusal.CONNECTING,  # SYN_SENT
    3: Refusal.CONNECTING,  # SYN_RECV
    4: Refusal.SHUT_DOWN,  # FIN_WAIT1
    5: Refusal.SHUT_DOWN,  # FIN_WAIT2
    6: Refusal.SHUT_DOWN,  # TIME_WAIT
    7: Refusal.NOT_CONNECTED,  # CLOSE: never connected, or reset
    8: Refusal.OK,  # CLOSE_WAIT
    9: Refusal.SHUT_DOWN,  # LAST_ACK
    10: Refusal.LISTENING,  # LISTEN
    11: Refusal.SHUT_DOWN,  # CLOSING
}


def borrow(fd: int, family: int = socket.AF_INET) -> _socket.socket:
    """A socket object over ``fd`` that the caller must ``detach()``, never close."""
    return _socket.socket(family, _BORROWED, 0, fd)


#: (refusal, family, key): set only for OK; two fds with one key may be one socket.
Inspection = tuple[Refusal, int, object]

#: ``inspect_many``'s steps, each applied to every wrapped fd of a frame by ``map``.
_tcp_state = methodcaller("getsockopt", _IPPROTO_TCP, _TCP_INFO or 0, 1)
_cookie = methodcaller("getsockopt", _SOL_SOCKET, _SO_COOKIE or 0, 8)
_family = attrgetter("family")
_detach = _new_socket.detach
#: ESTABLISHED and CLOSE_WAIT, the parkable TCP states, as bytes (``translate``'s).
_LIVE = bytes((1, 8))


def inspect_many(fds: Sequence[int]) -> bytes | None:
    """``inspect`` for the fds of a frame at once: their families (as bytes) when
    every one is a live TCP socket and none is there twice; else None (then
    ``inspect`` each: it says which and why).

    The usual frame, checked step by step (wrap, TCP state, cookie, family),
    each step one C loop over the frame: no Python call per fd. Never raises.
    """
    if _TCP_INFO is None or _SO_COOKIE is None:
        return None
    socks: list[_socket.socket] = []
    try:
        # ``extend`` keeps what the wrap made before a failure: all are detached below.
        socks.extend(map(_new_socket, repeat(-1), repeat(_BORROWED), repeat(0), fds))
        states = b"".join(map(_tcp_state, socks))
        if len(states) != len(socks) or states.translate(None, _LIVE):
            return None  # a state other than the two
        if len(set(map(_cookie, socks))) != len(socks):
            return None  # one socket twice
        return bytes(map(_family, socks))
    except Exception:  # a pipe, a reset, no SO_COOKIE...: ``inspect`` tells
        return None
    finally:
        deque(map(_detach, socks), 0)


def inspect(fd: int) -> Inspection:
    """Whether ``fd`` is a connected AF_INET/AF_INET6 TCP stream; never raises."""
    global _SO_COOKIE
    try:
        # ``borrow``, inlined, with family -1: getsockname(2) sets it (no extra
        # syscall); ENOTSOCK for files, pipes, eventfds...
        sock = _new_socket(-1, _BORROWED, 0, fd)
    except OSError as exc:
        code = Refusal.NOT_A_SOCKET if exc.errno == errno.ENOTSOCK else Refusal.UNINSPECTABLE
        return code, 0, None
    try:
        if _TCP_INFO is None:
            return _inspect_portable(sock)
        try:
            state = sock.getsockopt(_IPPROTO_TCP, _TCP_INFO, 1)[0]
        except OSError as exc:
            return _not_tcp(sock, exc), 0, None
        if state != 1 and state != 8:  # not ESTABLISHED nor CLOSE_WAIT
            return _TCP_STATES.get(state, _NOT_CONNECTED), 0, None
        family = _AF_INET6 if sock.family == _AF_INET6 else _AF_INET
        if _SO_COOKIE is not None:
            try:
                return _OK, family, sock.getsockopt(_SOL_SOCKET, _SO_COOKIE, 8)
            except OSError as exc:
                if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
                    return Refusal.UNINSPECTABLE, 0, None
                _SO_COOKIE = None  # an older kernel: the peer address from now on
        try:
            peer = sock.getpeername()
        except OSError:  # reset between the two calls
            return _NOT_CONNECTED, 0, None
        return _OK, family, peer
    except Exception:  # nothing about one fd may end the session
        LOGGER.exception("fd %d could not be inspected", fd)
        return Refusal.UNINSPECTABLE, 0, None
    finally:
        sock.detach()


def _not_tcp(sock: _socket.socket, exc: OSError) -> Refusal:
    """TCP_INFO failed: say why (slow path, refusals only)."""
    if exc.errno == errno.ENOTSOCK:
        return Refusal.NOT_A_SOCKET
    if exc.errno not in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
        return Refusal.UNINSPECTABLE  # EBADF: an O_PATH fd, say
    if sock.family not in _INET:  # from the wrap's getsockname
        return Refusal.NOT_INET
    return Refusal.NOT_A_TCP_STREAM  # UDP, raw, SCTP...


def _inspect_portable(sock: _socket.socket) -> Inspection:
    """Where TCP_INFO is missing (macOS, BSD): type, listening, then the peer."""
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    except OSError as exc:
        code = Refusal.NOT_A_SOCKET if exc.errno == errno.ENOTSOCK else Refusal.UNINSPECTABLE
        return code, 0, None
    try:
        if _SO_ACCEPTCONN is not None and sock.getsockopt(socket.SOL_SOCKET, _SO_ACCEPTCONN):
            return Refusal.LISTENING, 0, None
        peer = sock.getpeername()
    except OSError:
        return Refusal.NOT_CONNECTED, 0, None
    # The address is decoded by the kernel's sa_family: (host, port) is IPv4,
    # a 4-tuple IPv6; a str or bytes is a unix socket.
    if not (isinstance(peer, tuple) and isinstance(peer[0], str)):
        return Refusal.NOT_INET, 0, None
    if kind != socket.SOCK_STREAM:
        return Refusal.NOT_A_TCP_STREAM, 0, None
    return Refusal.OK, socket.AF_INET6 if len(peer) == 4 else socket.AF_INET, peer


def same_open_file(fd1: int, fd2: int) -> bool:
    """Two fds for one socket (one open file): only asked when their peers collide."""
    try:
        a, b = os.fstat(fd1), os.fstat(fd2)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def peek_has_data(fd: int) -> bool:
    """True if bytes wait unread (a half-closed peer with data is READABLE, not HANGUP)."""
    sock = borrow(fd)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False
    finally:
        sock.detach()


def send_goodbye(fd: int, data: bytes) -> None:
    """Best effort, never blocking and never touching O_NONBLOCK (shared with the worker)."""
    if not data:
        return
    sock = borrow(fd)
    try:
        sock.send(data, socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0))
    except OSError as exc:
        LOGGER.debug("goodbye not written: %s", exc)
    finally:
        sock.detach()
