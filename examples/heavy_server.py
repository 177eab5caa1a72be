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

A connection is parked only between messages: an HTTP request whose body is
still arriving stays live (its half-parsed state is not in the token), while
a partial echo line or HTTP request head is carried as ``pending``. Each
protocol parks into its own pool (``heavy-echo``, ``heavy-http``; ``--pool``
overrides), so an echo and an http server can share one container.

The first line printed is ``listening on HOST:PORT``; then one status line a
second: ``status live=N parked=M rss_mib=X``. If the container cannot be
reached (or is lost for good) the server prints one line on stderr and
exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import http
import json
import mmap
import sys
from collections.abc import Awaitable, Callable
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
    def __init__(self, args: argparse.Namespace, parking: connpark.Parking | None) -> None:
        self.args = args
        self.parking = parking
        self.live = 0
        self.parked = 0
        self.next_sid = 1
        #: Why the server must stop (the container is gone for good), if it must.
        self.fatal: connpark.ConnparkError | None = None

    async def run(self, listener: trio.socket.SocketType) -> None:
        """Accept, serve, park and take wakes until a fatal error."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.status_loop)
            nursery.start_soon(self._guarded, self.accept_loop, listener)
            if self.parking is not None:
                nursery.start_soon(self._guarded, self.wake_loop)
        if self.fatal is not None:
            raise self.fatal

    async def _guarded(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run a task; a connpark error (other than a refusal) stops the whole server."""
        try:
            await fn(*args)
        except connpark.ConnparkError as exc:
            if self.fatal is None:
                self.fatal = exc
            self._nursery.cancel_scope.cancel()

    async def status_loop(self) -> None:
        while True:
            print(
                f"status live={self.live} parked={self.parked} rss_mib={rss_bytes() / 2**20:.1f}",
                flush=True,
            )
            await trio.sleep(1)

    async def accept_loop(self, listener: trio.socket.SocketType) -> None:
        while True:
            sock, _ = await listener.accept()
            session = Session(self.next_sid, 0, self.args.state_size)
            self.next_sid += 1
            self._nursery.start_soon(self._guarded, self.serve, sock, session, b"")

    async def wake_loop(self) -> None:
        assert self.parking is not None
        async for woken in self.parking.wakes():
            self.parked -= 1
            if woken.socket is None:
                continue  # a notice: the client hung up or timed out while parked
            session = Session.from_token(woken.token, self.args.state_size)
            sock, pending = woken.socket, woken.pending
            self._nursery.start_soon(self._guarded, self.serve, sock, session, pending)
        # The session ended under us: our parked clients cannot come back.
        raise connpark.ContainerError("the container session ended")

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
                # Park only between messages: mid-message, keep waiting for the rest.
                if idle.cancelled_caught and self.parking is not None and protocol.parkable():
                    try:
                        await self.parking.park(
                            sock, token=session.token(), pending=protocol.unconsumed()
                        )
                    except connpark.ParkRefused:
                        continue  # keep serving it ourselves
                    except connpark.ConnparkError:
                        sock.close()
                        raise
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

    def parkable(self) -> bool:
        """True between messages: the token plus ``unconsumed()`` rebuild everything."""
        return True

    def unconsumed(self) -> bytes:
        """Bytes received but not yet handled: they travel as the park's ``pending``."""
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
        return self.buf  # a partial line is safe to carry


class _Http(_Protocol):
    """HTTP/1.1 keep-alive with h11.

    ``GET /`` says how many requests this connection made; ``POST /`` says
    how many body bytes it received. A request h11 cannot parse gets its
    4xx answer and the connection closes.
    """

    def __init__(self, sock: trio.socket.SocketType, session: Session) -> None:
        import h11

        self.h11 = h11
        self.sock = sock
        self.session = session
        self.conn = h11.Connection(h11.SERVER)
        self.request: Any = None
        self.body_bytes = 0

    async def consume(self, data: bytes) -> bool:
        h11 = self.h11
        if data:
            self.conn.receive_data(data)
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._reject(exc)
                return False
            if event is h11.NEED_DATA:
                return True
            if isinstance(event, h11.Request):
                self.request, self.body_bytes = event, 0
                if self.conn.they_are_waiting_for_100_continue:
                    await _send_all(
                        self.sock, self.conn.send(h11.InformationalResponse(status_code=100))
                    )
            elif isinstance(event, h11.Data):
                self.body_bytes += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.session.served += 1
                await self._respond(*self._route())
                if self.conn.our_state is h11.MUST_CLOSE:
                    return False
                self.conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return False

    def parkable(self) -> bool:
        # Both sides IDLE: no request half-received, no response half-sent. What
        # h11 still buffers is the start of the next request: unconsumed() carries it.
        h11 = self.h11
        return self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE

    def _route(self) -> tuple[int, bytes, list[tuple[str, str]]]:
        method, target = self.request.method, self.request.target
        if target != b"/":
            return 404, b"not found\n", []
        if method == b"GET":
            body = (
                f"hello from session {self.session.sid}: "
                f"request {self.session.served} on this connection\n"
            )
            return 200, body.encode(), []
        if method == b"POST":
            return 200, f"received {self.body_bytes} bytes\n".encode(), []
        return 405, b"method not allowed\n", [("allow", "GET, POST")]

    async def _respond(
        self, status: int, body: bytes, extra: list[tuple[str, str]], close: bool = False
    ) -> None:
        h11 = self.h11
        headers = [("content-type", "text/plain"), ("content-length", str(len(body))), *extra]
        if close:
            headers.append(("connection", "close"))
        reason = http.HTTPStatus(status).phrase.encode()
        out = self.conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
        out = (out or b"") + (self.conn.send(h11.Data(data=body)) or b"")
        out += self.conn.send(h11.EndOfMessage()) or b""
        await _send_all(self.sock, out)

    async def _reject(self, exc: Any) -> None:
        """Answer a request we cannot parse (400, or h11's hint such as 431), then close."""
        if self.conn.our_state in (self.h11.IDLE, self.h11.SEND_RESPONSE):
            await self._respond(exc.error_status_hint, b"bad request\n", [], close=True)

    def unconsumed(self) -> bytes:
        data, _closed = self.conn.trailing_data
        return bytes(data)


async def _listen(address: str) -> trio.socket.SocketType:
    host, _, port = address.rpartition(":")
    listener = trio.socket.socket()
    listener.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    try:
        await listener.bind((host or "127.0.0.1", int(port)))
        listener.listen(4096)
    except OSError:
        listener.close()
        raise
    return listener


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--parking-socket", help="connpark control socket (omit: never park)")
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (port 0: any)")
    parser.add_argument("--protocol", choices=["echo", "http"], default="echo")
    parser.add_argument("--park-after", type=float, default=1.0, help="idle seconds (1.0)")
    parser.add_argument("--state-size", type=int, default=1 << 20, help="bytes per session")
    parser.add_argument("--pool", help="connpark pool (default: heavy-PROTOCOL)")
    args = parser.parse_args(argv)
    if args.protocol == "http":
        try:
            import h11  # noqa: F401
        except ImportError:
            print("--protocol http needs h11: pip install 'connpark[examples]'", file=sys.stderr)
            return 2
    pool = args.pool or f"heavy-{args.protocol}"

    try:
        async with contextlib.AsyncExitStack() as stack:
            parking = None
            if args.parking_socket:
                parking = await stack.enter_async_context(
                    connpark.open_parking(args.parking_socket, pool=pool)
                )
            try:
                listener = await _listen(args.listen)
            except OSError as exc:
                print(f"heavy_server: cannot listen on {args.listen}: {exc}", file=sys.stderr)
                return 1
            stack.callback(listener.close)
            bound_host, bound_port = listener.getsockname()[:2]
            print(f"listening on {bound_host}:{bound_port}", flush=True)
            await Server(args, parking).run(listener)
    except connpark.ConnparkError as exc:
        print(f"heavy_server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(trio.run(main))
    except KeyboardInterrupt:
        sys.exit(0)
