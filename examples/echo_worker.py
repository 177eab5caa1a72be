#!/usr/bin/env python3
"""A small trio echo server that parks idle connections in connpark.

Run a container first (``python3 dev.py run`` does both), then talk to it::

    python examples/echo_worker.py --parking-socket ./connpark.sock --listen 127.0.0.1:8007
    nc 127.0.0.1 8007        # type a line, wait 2 s (parked), type again (woken)

Each connection is served by one task while it is active. After
``--park-after`` seconds of silence the task parks the connection, with the
number of lines echoed so far as its token, and ends. When the client
speaks again the container wakes the connection and a new task picks it up,
counting on from the token: the client never notices.
"""

from __future__ import annotations

import argparse
import sys

import trio

import connpark


def _parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def serve_connection(
    parking: connpark.Parking,
    sock: trio.socket.SocketType,
    count: int,
    park_after: float,
    buf: bytes = b"",
) -> None:
    """Echo lines until the client is quiet for ``park_after`` seconds, then park."""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            count += 1
            await _send_all(sock, line + b"\n")
        with trio.move_on_after(park_after):
            data = await sock.recv(65536)
            if not data:
                sock.close()
                print(f"client gone after {count} lines", flush=True)
                return
            buf += data
            continue
        try:
            ticket = await parking.park(sock, token=str(count).encode(), pending=buf)
        except connpark.ParkRefused as exc:
            print(f"park refused ({exc.reason.label}); keeping the connection", flush=True)
            continue
        except connpark.ConnparkError:
            sock.close()  # the container is gone for good (or we are stopping): so is this
            return
        print(f"parked ticket {ticket:#x} after {count} lines", flush=True)
        return


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--parking-socket", required=True)
    parser.add_argument("--listen", default="127.0.0.1:8007", help="HOST:PORT (port 0: any)")
    parser.add_argument("--park-after", type=float, default=2.0, help="idle seconds (2)")
    args = parser.parse_args(argv)

    host, port = _parse_hostport(args.listen)
    listener = trio.socket.socket()
    listener.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    try:
        await listener.bind((host, port))
    except OSError as exc:
        listener.close()
        print(f"echo_worker: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    listener.listen(128)

    try:
        async with connpark.open_parking(args.parking_socket, pool="echo") as parking:
            bound = listener.getsockname()
            # Printed once the container has us: whoever waits for this line can use both.
            print(f"listening on {bound[0]}:{bound[1]}", flush=True)
            await _serve(parking, listener, args.park_after)
    except connpark.ConnparkError as exc:  # e.g. no container on that socket
        print(f"echo_worker: {exc}", file=sys.stderr)
        return 1
    finally:
        listener.close()
    return 1


async def _serve(
    parking: connpark.Parking, listener: trio.socket.SocketType, park_after: float
) -> None:
    """Accept and serve clients, and serve woken connections, until the hook gives up.

    The hook reconnects by itself when the container restarts; it gives up (and
    ``wakes()`` raises ``ContainerLost``) only after a minute without one.
    """
    async with trio.open_nursery() as nursery:

        async def accept_loop() -> None:
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(serve_connection, parking, sock, 0, park_after)

        nursery.start_soon(accept_loop)
        try:
            async for woken in parking.wakes():
                print(f"woken ticket {woken.ticket:#x}: {woken.reason}", flush=True)
                if woken.socket is None:
                    continue  # a notice: the container closed it (hang-up / timeout)
                count = int(woken.token or b"0")
                nursery.start_soon(
                    serve_connection,
                    parking,
                    woken.socket,
                    count,
                    park_after,
                    woken.pending,  # bytes we had read before parking come first
                )
        except connpark.ContainerLost as exc:
            print(f"echo_worker: {exc}; stopping", file=sys.stderr, flush=True)
        # Without a container there is nothing to park in.
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    try:
        sys.exit(trio.run(main))
    except KeyboardInterrupt:
        sys.exit(0)
