#!/usr/bin/env python3
"""The classic thread-per-connection echo server (socketserver), made cheap by parking.

Each new connection gets its own thread, as usual. When its client has been
quiet for ``--park-after`` seconds the thread parks the connection with
``connpark.BlockingParking`` and ends, so idle clients cost no thread at all.
A small pool of ``--wake-threads`` threads serves the woken connections: each
for as long as its client keeps talking (pauses up to ``--wake-linger``
seconds), then parks it again, so a few threads serve many intermittent
clients.

    python examples/threaded_server.py --parking-socket ./connpark.sock --listen 127.0.0.1:0

The first line printed is ``listening on HOST:PORT``; then one status line a
second: ``status threads=N live=L parked=M``.
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import sys
import threading
import time

import connpark


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live = 0
        self.parked = 0

    def add(self, live: int = 0, parked: int = 0) -> None:
        with self.lock:
            self.live += live
            self.parked += parked


def serve_connection(
    sock: socket.socket,
    parking: connpark.BlockingParking | None,
    counters: Counters,
    park_after: float,
    served: int = 0,
    buf: bytes = b"",
) -> None:
    """Echo lines until the client is quiet for ``park_after`` s, then park (or close)."""
    counters.add(live=1)
    try:
        sock.settimeout(park_after)
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                served += 1
                sock.sendall(line + b"\n")
            try:
                data = sock.recv(65536)
            except TimeoutError:
                if parking is None:
                    continue
                sock.settimeout(None)
                try:
                    parking.park(sock, token=b"%d" % served, pending=buf)
                except connpark.ParkRefused:
                    sock.settimeout(park_after)
                    continue
                counters.add(parked=1)
                return
            if not data:
                sock.close()
                return
            buf += data
    except OSError:
        sock.close()
    finally:
        counters.add(live=-1)


def wake_worker(parking: connpark.BlockingParking, counters: Counters, linger: float) -> None:
    for woken in parking:
        counters.add(parked=-1)
        if woken.socket is not None:
            served = int(woken.token or b"0")
            serve_connection(woken.socket, parking, counters, linger, served, woken.pending)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--parking-socket", help="connpark control socket (omit: never park)")
    parser.add_argument("--listen", default="127.0.0.1:8081", help="HOST:PORT (port 0: any)")
    parser.add_argument("--park-after", type=float, default=1.0, help="idle seconds (1.0)")
    parser.add_argument("--wake-threads", type=int, default=8, help="threads serving wakes (8)")
    parser.add_argument(
        "--wake-linger", type=float, default=0.1, help="idle seconds before re-parking a woken one"
    )
    args = parser.parse_args(argv)

    counters = Counters()
    parking = (
        connpark.BlockingParking(args.parking_socket, pool="threaded")
        if args.parking_socket
        else None
    )

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            # socketserver shuts down and closes its request object after handle(),
            # which would send a FIN on a parked connection: take the fd away from it.
            conn = socket.socket(fileno=self.request.detach())
            serve_connection(conn, parking, counters, args.park_after)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 4096

    host, _, port = args.listen.rpartition(":")
    server = Server((host or "127.0.0.1", int(port)), Handler)
    bound_host, bound_port = server.socket.getsockname()[:2]
    print(f"listening on {bound_host}:{bound_port}", flush=True)
    if parking is not None:
        for i in range(args.wake_threads):
            threading.Thread(
                target=wake_worker,
                args=(parking, counters, args.wake_linger),
                name=f"wake-{i}",
                daemon=True,
            ).start()
    threading.Thread(target=server.serve_forever, name="acceptor", daemon=True).start()
    try:
        while True:
            print(
                f"status threads={threading.active_count()} live={counters.live} "
                f"parked={counters.parked}",
                flush=True,
            )
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        server.shutdown()
        if parking is not None:
            parking.shutdown()


if __name__ == "__main__":
    sys.exit(main())
