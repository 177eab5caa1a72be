#!/usr/bin/env python3
"""A heavy WebSocket chat server (trio + wsproto) that parks idle members in connpark.

Run a container first, then::

    python examples/ws_server.py --parking-socket ./connpark.sock --listen 127.0.0.1:8765
    python -m websockets ws://127.0.0.1:8765/lobby      # a client in room "lobby"

A client joins the room named by the URL path. Every text message it sends
is posted to its room: every member gets it, the sender too. Each live
connection holds ``--state-size`` bytes of session state (a heavy server).

After ``--park-after`` seconds of silence a connection is parked with

- the WebSocket ping rule: the container answers the client's pings with
  pongs while the server sleeps (``woken.autoresponses`` says how many);
- its room's tag, ``room:NAME``: a post to the room is framed once and
  published through the container to every parked member with
  ``parking.send(frame, tag=...)``, without waking any of them. A member whose
  socket does not take the whole frame comes back (reason UNSENT) with the
  rest in ``woken.unsent``, which the server writes first.

Any other client traffic (a message, a close) wakes the connection, and the
server rebuilds the session from the token (the room name).

The server publishes a room's post to its live members and to its parked
ones under one per-room lock that parking also takes, so a member gets each
post once. A post that lands while a member is being woken (the container
has let go of it, the server has not picked it up yet) is not seen by that
member: a real chat server keeps a per-room log and replays it from a
sequence number carried in the token.
"""

from __future__ import annotations

import argparse
import resource
import sys
from typing import Any

import trio
import wsproto
import wsproto.events as ev
from wsproto.connection import Connection, ConnectionType
from wsproto.handshake import H11Handshake

import connpark

#: The rule set id for "answer WebSocket pings" (any id 1..65535 would do).
PING_RULES = 1


def _parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def text_frame(text: str) -> bytes:
    """One unmasked server frame: the same bytes fit every client."""
    return Connection(ConnectionType.SERVER).send(ev.TextMessage(data=text))


def _buffered(ws: Connection) -> int:
    """Bytes of an incomplete frame wsproto holds: park only between frames."""
    proto: Any = getattr(ws, "_proto", None)
    buf: Any = getattr(proto, "_buffer", b"")
    return len(buf)


class Member:
    """One live connection and its heavy state."""

    def __init__(self, sock: trio.socket.SocketType, ws: Connection, room: str, size: int) -> None:
        self.sock = sock
        self.ws = ws
        self.room = room
        self.state = bytearray(size)  # the per-connection cost parking saves
        self.send_lock = trio.Lock()

    async def send_raw(self, data: bytes) -> None:
        async with self.send_lock:
            view = memoryview(data)
            while view:
                view = view[await self.sock.send(view) :]


class ChatServer:
    def __init__(self, parking: connpark.Parking | None, park_after: float, state_size: int):
        self.parking = parking
        self.park_after = park_after
        self.state_size = state_size
        self.live: dict[str, set[Member]] = {}
        self.locks: dict[str, trio.Lock] = {}
        self.parked = 0
        self.woken = 0
        self.posts = 0

    def lock(self, room: str) -> trio.Lock:
        return self.locks.setdefault(room, trio.Lock())

    async def post(self, room: str, text: str) -> None:
        """To every live member directly, and to the parked ones through the container."""
        frame = text_frame(text)
        self.posts += 1
        async with self.lock(room):
            for m in list(self.live.get(room, ())):
                try:
                    await m.send_raw(frame)
                except OSError:
                    pass  # its own task sees the error and leaves
            if self.parking is not None:
                try:
                    await self.parking.send(frame, tag=f"room:{room}")
                except connpark.ConnparkError as exc:
                    print(f"publish to {room} failed: {exc}", file=sys.stderr, flush=True)

    async def handshake(self, sock: trio.socket.SocketType) -> tuple[Connection, str] | None:
        hs = H11Handshake(ConnectionType.SERVER)
        with trio.move_on_after(10):
            while True:
                data = await sock.recv(65536)
                if not data:
                    return None
                hs.receive_data(data)
                for event in hs.events():
                    if isinstance(event, ev.Request):
                        room = event.target.strip("/") or "lobby"
                        await sock.send(hs.send(ev.AcceptConnection()))
                        conn = hs.connection
                        assert conn is not None
                        return conn, room
                    if isinstance(event, ev.RejectConnection):
                        return None
        return None

    async def serve_new(self, sock: trio.socket.SocketType) -> None:
        got = await self.handshake(sock)
        if got is None:
            sock.close()
            return
        ws, room = got
        await self.serve(Member(sock, ws, room, self.state_size))

    async def serve(self, m: Member, first: bytes = b"") -> None:
        """Serve one member until it leaves or is parked."""
        self.live.setdefault(m.room, set()).add(m)
        text = ""
        data = first
        # Pings are not activity: a client that only pings is idle, and parked.
        idle_at = trio.current_time() + self.park_after
        try:
            while True:
                if data:
                    m.ws.receive_data(data)
                    for event in m.ws.events():
                        if not isinstance(event, ev.Ping):
                            idle_at = trio.current_time() + self.park_after
                        if isinstance(event, ev.TextMessage):
                            text += event.data
                            if event.message_finished:
                                await self.post(m.room, text)
                                text = ""
                        elif isinstance(event, ev.Ping):
                            await m.send_raw(m.ws.send(event.response()))
                        elif isinstance(event, ev.CloseConnection):
                            await m.send_raw(m.ws.send(event.response()))
                            return
                data = b""
                with trio.move_on_at(idle_at):
                    data = await m.sock.recv(65536)
                    if not data:
                        return
                    continue
                idle_at = trio.current_time() + self.park_after
                if self.parking is not None and not text and not _buffered(m.ws):
                    if await self.park(m):
                        return
        except (OSError, wsproto.utilities.LocalProtocolError):
            return
        finally:
            self.live.get(m.room, set()).discard(m)
            if m.sock.fileno() >= 0:
                m.sock.close()

    async def park(self, m: Member) -> bool:
        assert self.parking is not None
        async with self.lock(m.room):
            try:
                await self.parking.park(
                    m.sock,
                    token=m.room.encode(),
                    rules=PING_RULES,
                    tags=[f"room:{m.room}"],
                    idle_timeout=3600,
                )
            except connpark.ParkRefused as exc:
                print(f"park refused ({exc.reason.label}); keeping it", flush=True)
                return False
            self.live[m.room].discard(m)
        self.parked += 1
        return True

    async def serve_woken(self, w: connpark.Woken[trio.socket.SocketType]) -> None:
        self.parked -= 1
        self.woken += 1
        if w.socket is None:
            return  # a notice: the container closed it; nothing of ours to free
        room = w.token.decode()
        m = Member(w.socket, Connection(ConnectionType.SERVER), room, self.state_size)
        try:
            if w.unsent:  # a publish the socket did not take whole: its rest first
                await m.send_raw(w.unsent)
        except OSError:
            m.sock.close()
            return
        await self.serve(m, w.pending)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--parking-socket", help="the container's socket (omit: no parking)")
    parser.add_argument("--listen", default="127.0.0.1:8765", help="HOST:PORT (port 0: any)")
    parser.add_argument("--park-after", type=float, default=1.0, help="idle seconds (1.0)")
    parser.add_argument("--state-size", type=int, default=64 << 10, help="bytes per connection")
    parser.add_argument("--pool", default="ws-chat")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    host, port = _parse_hostport(args.listen)
    listener = trio.socket.socket()
    listener.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    try:
        await listener.bind((host, port))
    except OSError as exc:
        listener.close()
        print(f"ws_server: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    listener.listen(4096)
    try:
        if args.parking_socket is None:
            await _run(ChatServer(None, args.park_after, args.state_size), listener)
            return 0
        async with connpark.open_parking(args.parking_socket, pool=args.pool) as parking:
            await parking.set_rules(PING_RULES, [connpark.Rule.ws_ping()])
            await _run(ChatServer(parking, args.park_after, args.state_size), listener)
    except connpark.ConnparkError as exc:
        print(f"ws_server: {exc}", file=sys.stderr)
        return 1
    finally:
        listener.close()
    return 1


async def _run(server: ChatServer, listener: trio.socket.SocketType) -> None:
    bound = listener.getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    async with trio.open_nursery() as nursery:

        async def accept_loop() -> None:
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(server.serve_new, sock)

        async def status() -> None:
            while True:
                await trio.sleep(1)
                live = sum(len(s) for s in server.live.values())
                print(
                    f"status live={live} parked={server.parked} woken={server.woken}"
                    f" posts={server.posts}",
                    flush=True,
                )

        nursery.start_soon(accept_loop)
        nursery.start_soon(status)
        if server.parking is None:
            return
        try:
            async for woken in server.parking.wakes():
                nursery.start_soon(server.serve_woken, woken)
        except connpark.ContainerLost as exc:
            print(f"ws_server: {exc}; stopping", file=sys.stderr, flush=True)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    try:
        sys.exit(trio.run(main))
    except KeyboardInterrupt:
        sys.exit(0)
