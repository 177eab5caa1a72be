"""A worker written from docs/protocol.md alone: ``_wire`` frames over ``_fdpass``.

It speaks the protocol by hand (no hook, no worker engine), so a test can
break any rule on purpose. Also runnable as a subprocess worker (``main``):
it parks N connections, then prints every wake it takes and ACKs it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from connpark._fdpass import BlockingChannel
from connpark._unixsock import connect_unix
from connpark._wire import (
    HEADER,
    Ack,
    Decoder,
    Error,
    Hello,
    Message,
    MessageType,
    Park,
    Parked,
    ParkEntry,
    Wake,
    Welcome,
)


class RawPeer:
    """One session: HELLO/WELCOME done in ``__init__``; then send and receive messages."""

    def __init__(
        self,
        path: Path | str,
        pool: str = "default",
        name: str = "raw",
        version: int = 0,
        resume_session: int = 0,
        resume_tickets: tuple[int, ...] = (),
    ) -> None:
        self.chan = BlockingChannel(connect_unix(path))
        self.decoder = Decoder()
        resume = {"resume_session": resume_session, "resume_tickets": resume_tickets}
        if version:
            self.send(Hello(version, pool=pool, name=name, **resume))
        else:
            self.send(Hello(pool=pool, name=name, **resume))
        welcome = self.receive()
        assert isinstance(welcome, Welcome), welcome
        self.welcome = welcome
        self._rid = 0

    @property
    def sock(self) -> socket.socket:
        return self.chan.sock

    def send(self, *msgs: Message) -> None:
        self.chan.send(*msgs)

    def receive(self, timeout: float = 10) -> Message | None:
        return self.chan.receive_message(self.decoder, timeout=timeout)

    def park(self, entries: list[ParkEntry]) -> Parked:
        """One PARK; the PARKED replies (one per frame) joined into one."""
        self._rid += 1
        self.send(Park(self._rid, tuple(entries)))
        results: list = []  # type: ignore[type-arg]
        while len(results) < len(entries):
            msg = self.receive()
            assert isinstance(msg, Parked), msg
            assert msg.request_id == self._rid
            results += msg.results
        return Parked(self._rid, tuple(results))

    def wakes(self, n: int, timeout: float = 10) -> list[tuple[int, bytes, int | None]]:
        """Take n wake entries, ACK each WAKE: (ticket, token, fd) each."""
        out: list[tuple[int, bytes, int | None]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            msg = self.receive(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(msg, Error):
                raise AssertionError(f"ERROR from the container: {msg}")
            assert isinstance(msg, Wake), msg
            out += [(e.ticket, e.token, e.fd) for e in msg.entries]
            self.send(Ack(tuple(e.ticket for e in msg.entries)))
        return out

    def woken_bytes(self, n: int, size: int = 100) -> dict[int, bytes]:
        """Take n wakes (``wakes``); read up to ``size`` bytes from each woken fd,
        then close it: ticket -> the bytes. Each wake must carry its fd."""
        got: dict[int, bytes] = {}
        for ticket, _token, fd in self.wakes(n):
            assert fd is not None
            with socket.socket(fileno=fd) as s:
                s.settimeout(5)
                got[ticket] = s.recv(size)
        return got

    def close(self) -> None:
        self.decoder.close()
        self.chan.close()


def partial_park(path: Path | str, fds: list[int]) -> socket.socket:
    """A session that sends a PARK frame's header and part of its body with all its
    fds, then stalls: the container holds those fds inside an incomplete frame."""
    peer = RawPeer(path, name="partial")
    body_len = 6 + 11 * len(fds)
    head = HEADER.pack(body_len, MessageType.PARK, 0, len(fds)) + b"\0\0\0\1"
    socket.send_fds(peer.sock, [head], fds)
    peer.decoder.close()
    return peer.sock


def tcp_state(sock: socket.socket) -> int:
    """Linux TCP state of a socket (tcp_states.h)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def main() -> None:
    """Subprocess worker: argv path, pool, N. Prints the port, "parked", then
    "woke TOKEN BYTES" per wake (reading the client's bytes), ACKing each."""
    path, pool, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(n)
    print(listener.getsockname()[1], flush=True)
    conns = [listener.accept()[0] for _ in range(n)]
    peer = RawPeer(path, pool=pool, name=f"sub-{os.getpid()}")
    parked = peer.park([ParkEntry(c.fileno(), token=b"c%d" % i) for i, c in enumerate(conns)])
    assert all(r.ticket for r in parked.results), parked
    for c in conns:
        c.close()
    print("parked", flush=True)
    while True:
        msg = peer.receive(timeout=120)
        if not isinstance(msg, Wake):
            print(f"end {msg!r}", flush=True)
            return
        for e in msg.entries:
            data = b""
            if e.fd is not None:
                s = socket.socket(fileno=e.fd)
                s.settimeout(5)
                data = s.recv(100)
                s.close()
            print(f"woke {e.token.decode()} {data.decode()}", flush=True)
        peer.send(Ack(tuple(e.ticket for e in msg.entries)))


if __name__ == "__main__":
    main()
