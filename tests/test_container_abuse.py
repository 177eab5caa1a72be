"""Misbehaving workers against a real ``connpark serve``: the container survives, leaks
nothing, and never hands a connection to the wrong worker."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import connpark
from connpark._fdpass import BlockingChannel
from connpark._unixsock import connect_unix
from connpark._wire import (
    Ack,
    Decoder,
    Hello,
    Message,
    Park,
    Parked,
    ParkEntry,
    Reason,
    Unpark,
    Wake,
    WakeEntry,
    Welcome,
    encode,
)

from ._procs import ServeProcess, tcp_pairs

pytestmark = pytest.mark.linux


class RawSession:
    """A worker speaking the wire protocol by hand (it can break the rules)."""

    def __init__(self, path: Path, pool: str = "default") -> None:
        self.decoder = Decoder()
        self.chan = BlockingChannel(connect_unix(path))
        self.chan.send(Hello(pool=pool, name="raw"))
        welcome = self.chan.receive_message(self.decoder, timeout=10)
        assert isinstance(welcome, Welcome)

    def send(self, *msgs: Message) -> None:
        self.chan.send(*msgs)

    def receive(self, timeout: float = 10) -> Message | None:
        return self.chan.receive_message(self.decoder, timeout=timeout)

    def close(self) -> None:
        self.decoder.close()
        self.chan.close()


@pytest.fixture
def serve(sockdir: Path) -> Iterator[ServeProcess]:
    proc = ServeProcess(sockdir / "c.sock")
    yield proc
    assert proc.proc.poll() is None, "the container died:\n" + proc.log_text()
    assert proc.stop() == 0


def _wait_fd_count(serve: ServeProcess, want: int) -> int:
    for _ in range(200):
        if serve.fd_count() == want:
            break
        time.sleep(0.02)
    return serve.fd_count()


def test_peers_hanging_up_mid_frame_do_not_crash_the_container(serve: ServeProcess) -> None:
    hello = encode(Hello())[0].data
    for cut in (1, 2, 5, 9):
        # Before the handshake: the half HELLO is a protocol error, and the
        # ERROR the container answers hits a closed socket.
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(serve.path))
        raw.sendall(hello[:cut])
        raw.close()
        # After it: a half PARK, then gone.
        session = RawSession(serve.path)
        session.chan.sock.sendall(encode(Park(1, ()))[0].data[:cut])
        session.close()
    time.sleep(0.3)
    assert serve.proc.poll() is None, serve.log_text()
    assert serve.stats().protocol_errors_total == 8


def test_fds_in_a_message_workers_may_not_send_are_closed(serve: ServeProcess) -> None:
    raw = RawSession(serve.path)
    baseline = serve.fd_count()
    r, w = os.pipe()
    raw.send(Wake(tuple(WakeEntry(i, Reason.READABLE, fd=r) for i in range(50))))
    assert raw.receive() is not None  # ERROR, then the container hangs up
    raw.close()
    os.close(r)
    os.close(w)
    assert _wait_fd_count(serve, baseline - 1) == baseline - 1  # less our session


def test_early_ack_never_hands_another_pools_connection(serve: ServeProcess) -> None:
    # Session 1's socket fills up with big WAKEs, so some are still queued in the
    # container when session 1 ACKs them before receiving them.
    s1 = RawSession(serve.path)
    fill_clients, fillers = tcp_pairs(20)
    target_clients, targets = tcp_pairs(3)
    entries = [ParkEntry(s.fileno(), pending=b"p" * 60_000) for s in fillers]
    entries += [ParkEntry(s.fileno(), token=b"T%d" % i) for i, s in enumerate(targets)]
    s1.send(Park(1, tuple(entries)))
    tickets: list[int] = []
    while len(tickets) < 23:  # one PARKED per PARK frame (this one is split by size)
        parked = s1.receive()
        assert isinstance(parked, Parked)
        assert parked.request_id == 1
        tickets += [r.ticket for r in parked.results]
    assert all(tickets)
    for s in (*fillers, *targets):
        s.close()
    s1.send(Unpark(tuple(tickets)))
    time.sleep(0.3)
    s2 = RawSession(serve.path, pool="other")
    s1.send(Ack(tuple(tickets[20:])))  # too early: those WAKEs have not been read
    time.sleep(0.3)
    (victim_client,), (victim,) = tcp_pairs(1)
    s2.send(Park(1, (ParkEntry(victim.fileno(), token=b"VICTIM"),)))
    reply = s2.receive()
    assert isinstance(reply, Parked)
    assert reply.results[0].ticket
    victim.close()
    # Everything session 1 receives is one of its own connections.
    ours = {c.getsockname() for c in (*fill_clients, *target_clients)}
    got = 0
    while True:
        try:
            msg = s1.receive(timeout=2)
        except TimeoutError:
            break
        if not isinstance(msg, Wake):
            break
        for e in msg.entries:
            assert e.fd is not None
            sock = socket.socket(fileno=e.fd)
            assert sock.getpeername() in ours, "a connection of another pool"
            sock.close()
            got += 1
    assert got == 23
    # The victim is still parked for its own pool, and wakes there.
    victim_client.sendall(b"hello")
    wake = s2.receive()
    assert isinstance(wake, Wake)
    assert wake.entries[0].token == b"VICTIM"
    assert wake.entries[0].fd is not None
    os.close(wake.entries[0].fd)
    s1.close()
    s2.close()
    for c in (*fill_clients, *target_clients, victim_client):
        c.close()


async def test_bad_park_arguments_fail_that_call_not_the_session(serve: ServeProcess) -> None:
    (client,), (server,) = tcp_pairs(1)
    async with connpark.open_parking(serve.path) as parking:
        with pytest.raises(ValueError, match="at most 65535"):
            await parking.park(server, token=b"x" * 70_000)
        closed = socket.socket()
        closed.close()
        with pytest.raises(ValueError, match="closed socket"):
            await parking.park(closed)
        ticket = await parking.park(server)  # the session is fine
        assert ticket
    client.close()


def test_config_refuses_pending_that_cannot_fit_a_wake() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        connpark.ContainerConfig(path="/tmp/x.sock", max_pending=1 << 20)


def test_second_sigterm_stops_waiting_for_acks(sockdir: Path) -> None:
    import signal

    proc = ServeProcess(sockdir / "t.sock", ["--shutdown-grace", "60"])
    stuck = RawSession(proc.path)  # parks, then never reads: SHUTDOWN wakes go unACKed
    clients, servers = tcp_pairs(3)
    stuck.send(Park(1, tuple(ParkEntry(s.fileno()) for s in servers)))
    assert isinstance(stuck.receive(), Parked)
    proc.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.proc.poll() is None  # draining, waiting for ACKs
    start = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.stop(timeout=10) == 0
    assert time.monotonic() - start < 5
    stuck.close()
    for s in (*clients, *servers):
        s.close()
