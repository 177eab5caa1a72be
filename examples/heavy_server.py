#!/usr/bin/env python3
"""A heavy-state server that parks its idle connections in connpark.

Every live connection owns a session state of ``--state-size`` bytes (1 MiB
by default), really allocated (an anonymous mmap) and touched page by page,
the way a big per-connection object costs a real server. After
``--park-after`` seconds of client silence the server parks the connection
with a token that is enough to rebuild the session, and frees the state.
When the client speaks again connpark wakes the connection, the server
rebuilds the session from the token, and carries on: the client never
notices. Without ``--parking-socket`` it is the same server, never parking.

    python examples/heavy_server.py --parking-socket ./connpark.sock --listen 127.0.0.1:0
    python examples/heavy_server.py --parking-socket ./connpark.sock --protocol http

The first line printed is ``listening on HOST:PORT``; then one status line a
second: ``status live=N parked=M rss_mib=X``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import sys
from typing import Any

import trio

import connpark

PAGE = mmap.PAGESIZE


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere the peak, which is all we get)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


class Session:
    """The heavy part: ``size`` bytes of real, touched memory, plus what we count."""

    def __init__(self, sid: int, served: int, size: int) -> None:
        self.sid = sid
        self.served = served
        self.state = mmap.mmap(-1, max(size, 1))
        for offset in range(0, len(self.state), PAGE):
            self.state[offset] = 1  # touch every page: resident, not just reserved

    def token(self) -> bytes:
        """Enough to rebuild this session after a wake."""
        return json.dumps({"sid": self.sid, "served": self.served}).encode()

    @classmethod
    def from_token(cls, token: bytes, size: int) -> Session:
        data = json.loads(token)
        return cls(int(data["sid"]), int(data["served"]), size)

    def free(self) -> None:
        self.state.close()


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.parking: connpark.Parking | None = None
        self.live = 0
        self.parked = 0
        self.next_sid = 1

    async def status_loop(self) -> None:
        while True:
            print(
                f"status live={self.live} parked={self.parked} rss_mib={rss_bytes() / 2**20:.1f}",
                flush=True,
            )
            await trio.sleep(1)

    async def accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            sock, _ = await listener.accept()
            session = Session(self.next_sid, 0, self.args.state_size)
            self.next_sid += 1
            nursery.start_soon(self.serve, sock, session, b"")

    async def wake_loop(self, nursery: trio.Nursery) -> None:
        assert self.parking is not None
        async for woken in self.parking.wakes():
            self.parked -= 1
            if woken.socket is None:
                continue  # a notice: the client hung up or timed out while parked
            session = Session.from_token(woken.token, self.args.state_size)
            nursery.start_soon(self.serve, woken.socket, session, woken.pending)

    async def serve(self, sock: trio.socket.SocketType, session: Session, buf: bytes) -> None:
        """Serve one connection while it is active; park it once it goes quiet."""
        self.live += 1
        try:
            if self.args.protocol == "http":
                protocol: _Protocol = _Http(sock, session)
            else:
                protocol = _Echo(sock, session)
            while True:
                if not await protocol.consume(buf):
                    sock.close()
                    return
                buf = b""
                with trio.move_on_after(self.args.park_after) as idle:
                    buf = await sock.recv(65536)
                    if not buf:
                        sock.close()
                        return
                if idle.cancelled_caught and self.parking is not None:
                    pending = protocol.unconsumed()
                    try:
                        await self.parking.park(sock, token=session.token(), pending=pending)
                    except connpark.ParkRefused:
                        continue  # keep serving it ourselves
                    self.parked += 1
                    return
        except OSError:
            sock.close()
        finally:
            session.free()
            self.live -= 1


class _Protocol:
    async def consume(self, data: bytes) -> bool:
        """Handle bytes from the client; False when the connection should end."""
        raise NotImplementedError

    def unconsumed(self) -> bytes:
        return b""


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


class _Echo(_Protocol):
    """Every complete line comes back, byte for byte."""

    def __init__(self, sock: trio.socket.SocketType, session: Session) -> None:
        self.sock = sock
        self.session = session
        self.buf = b""

    async def consume(self, data: bytes) -> bool:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.session.served += 1
            await _send_all(self.sock, line + b"\n")
        return True

    def unconsumed(self) -> bytes:
        return self.buf


class _Http(_Protocol):
    """HTTP/1.1 keep-alive with h11; ``GET /`` says how many requests this connection made."""

    def __init__(self, sock: trio.socket.SocketType, session: Session) -> None:
        import h11

        self.h11 = h11
        self.sock = sock
        self.session = session
        self.conn = h11.Connection(h11.SERVER)

    async def consume(self, data: bytes) -> bool:
        h11 = self.h11
        if data:
            self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                return True
            if isinstance(event, h11.Request):
                self.session.served += 1
                await self._respond(event)
            elif isinstance(event, h11.ConnectionClosed):
                return False
            elif isinstance(event, h11.EndOfMessage):
                if self.conn.our_state is h11.MUST_CLOSE:
                    return False
                self.conn.start_next_cycle()

    async def _respond(self, request: Any) -> None:
        h11 = self.h11
        if request.method == b"GET" and request.target == b"/":
            status = 200
            body = (
                f"hello from session {self.session.sid}: "
                f"request {self.session.served} on this connection\n"
            ).encode()
        else:
            status, body = 404, b"not found\n"
        headers = [("content-type", "text/plain"), ("content-length", str(len(body)))]
        out = self.conn.send(h11.Response(status_code=status, headers=headers))
        out = (out or b"") + (self.conn.send(h11.Data(data=body)) or b"")
        out += self.conn.send(h11.EndOfMessage()) or b""
        await _send_all(self.sock, out)

    def unconsumed(self) -> bytes:
        data, _closed = self.conn.trailing_data
        return bytes(data)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--parking-socket", help="connpark control socket (omit: never park)")
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (port 0: any)")
    parser.add_argument("--protocol", choices=["echo", "http"], default="echo")
    parser.add_argument("--park-after", type=float, default=1.0, help="idle seconds (1.0)")
    parser.add_argument("--state-size", type=int, default=1 << 20, help="bytes per session")
    parser.add_argument("--pool", default="heavy")
    args = parser.parse_args(argv)
    if args.protocol == "http":
        try:
            import h11  # noqa: F401
        except ImportError:
            print("--protocol http needs h11: pip install 'connpark[examples]'", file=sys.stderr)
            return 2

    host, _, port = args.listen.rpartition(":")
    listener = trio.socket.socket()
    listener.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    await listener.bind((host or "127.0.0.1", int(port)))
    listener.listen(4096)
    bound_host, bound_port = listener.getsockname()[:2]
    print(f"listening on {bound_host}:{bound_port}", flush=True)

    server = Server(args)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.status_loop)
        if args.parking_socket:
            async with connpark.open_parking(args.parking_socket, pool=args.pool) as parking:
                server.parking = parking
                async with trio.open_nursery() as inner:
                    inner.start_soon(server.accept_loop, listener, inner)
                    inner.start_soon(server.wake_loop, inner)
        else:
            await server.accept_loop(listener, nursery)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(trio.run(main))
    except KeyboardInterrupt:
        sys.exit(0)
