"""``inspect_many``, the PARK hot path's checks for a whole frame at once, against
``inspect`` (one fd), over real sockets, pipes and dups: it passes only frames
``inspect`` passes entry by entry, and never closes or changes an fd."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from connpark._admit import inspect, inspect_many
from connpark._wire import Refusal

from ._procs import tcp_pairs
from .conftest import open_fd_count

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "TCP_INFO"), reason="inspect_many needs TCP_INFO (Linux)"
)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as st:
        yield st


def _live(stack: ExitStack, n: int) -> list[socket.socket]:
    clients, servers = tcp_pairs(n)
    for s in clients + servers:
        stack.enter_context(s)
    return servers


def _v6_pair(stack: ExitStack) -> socket.socket:
    listener = stack.enter_context(socket.socket(socket.AF_INET6))
    listener.bind(("::1", 0))
    listener.listen(1)
    stack.enter_context(socket.create_connection(listener.getsockname()[:2]))
    return stack.enter_context(listener.accept()[0])


def test_the_families_of_a_frame_of_live_tcp_sockets(stack: ExitStack) -> None:
    v4 = _live(stack, 3)
    v6 = _v6_pair(stack)
    clients, servers = tcp_pairs(1)
    stack.enter_context(servers[0])
    clients[0].close()  # the peer closed: CLOSE_WAIT, parkable (it wakes at once)
    fds = [v4[0].fileno(), v6.fileno(), v4[1].fileno(), servers[0].fileno(), v4[2].fileno()]
    assert inspect_many(fds) == bytes(inspect(fd)[1] for fd in fds)
    assert inspect_many(fds) == bytes(
        [socket.AF_INET, socket.AF_INET6, socket.AF_INET, socket.AF_INET, socket.AF_INET]
    )
    assert inspect_many([]) == b""


def _pipe(stack: ExitStack) -> int:
    r, w = os.pipe()
    stack.callback(os.close, r)
    stack.callback(os.close, w)
    return r


def _listening(stack: ExitStack) -> int:
    s = stack.enter_context(socket.socket())
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s.fileno()


def _udp(stack: ExitStack) -> int:
    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    s.connect(("127.0.0.1", 9))
    return s.fileno()


def _unix(stack: ExitStack) -> int:
    a, b = socket.socketpair()
    stack.enter_context(a)
    stack.enter_context(b)
    return a.fileno()


def _unconnected(stack: ExitStack) -> int:
    return stack.enter_context(socket.socket()).fileno()


ODD: dict[str, Callable[[ExitStack], int]] = {
    "pipe": _pipe,
    "listening": _listening,
    "udp": _udp,
    "unix": _unix,
    "unconnected": _unconnected,
}


@pytest.mark.parametrize("where", [0, 2, 4])
@pytest.mark.parametrize("odd", [*ODD, "dup"])
def test_one_odd_fd_anywhere_and_the_frame_is_not_passed(
    stack: ExitStack, odd: str, where: int
) -> None:
    live = [s.fileno() for s in _live(stack, 4)]
    if odd == "dup":  # the same socket twice (another fd of one open file)
        extra = os.dup(live[1])
        stack.callback(os.close, extra)
    else:
        extra = ODD[odd](stack)
    fds = [*live[:where], extra, *live[where:]]
    codes = [inspect(fd)[0] for fd in fds]
    if odd != "dup":  # (alone, a dup passes: only the frame sees two)
        assert codes[where] is not Refusal.OK
    flags = [fcntl.fcntl(fd, fcntl.F_GETFL) for fd in fds]
    before = open_fd_count()
    assert inspect_many(fds) is None
    # Nothing closed, made or changed: every fd is as it was and works.
    assert open_fd_count() == before
    assert [fcntl.fcntl(fd, fcntl.F_GETFL) for fd in fds] == flags
    assert all(os.fstat(fd) for fd in fds)
    assert inspect_many(live) == bytes([socket.AF_INET]) * 4
