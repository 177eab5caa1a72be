#!/usr/bin/env python3
"""The classic thread-per-connection echo server (socketserver), made cheap by parking.

Each new connection gets its own thread, as usual. When its client has been
quiet for ``--park-after`` seconds the thread parks the connection with
``connpark.BlockingParking`` and ends, so idle clients cost no thread at all.

Woken connections are served by a small pool of ``--wake-threads`` threads:
a thread echoes what the client sent and moves on. A woken connection that
goes quiet waits in one selector thread, not in a pool thread: if its client
speaks within ``--wake-linger`` seconds it goes back to the pool, otherwise
it is parked again. So a few threads serve many intermittent clients, and a
burst of wakes is not slowed down by the linger.

    python examples/threaded_server.py --parking-socket ./connpark.sock --listen 127.0.0.1:0

The first line printed is ``listening on HOST:PORT``; then one status line a
second: ``status threads=N live=L parked=M``. If the container cannot be
reached (or is lost for good) the server prints one line on stderr and
exits 1.
"""

from __future__ import annotations

import argparse
import collections
import queue
import selectors
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


class Fatal:
    """The first error that must stop the server; the main thread waits on it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: str | None = None

    def set(self, error: object) -> None:
        if self.error is None:
            self.error = str(error)
        self.event.set()


def serve_connection(
    sock: socket.socket,
    parking: connpark.BlockingParking | None,
    counters: Counters,
    fatal: Fatal,
    park_after: float,
) -> None:
    """Echo lines until the client is quiet for ``park_after`` s, then park (or close)."""
    counters.add(live=1)
    served, buf = 0, b""
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
                except connpark.ConnparkError as exc:
                    sock.close()
                    fatal.set(exc)
                    return
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


class _Woken:
    """A woken connection between the wake pool and the linger selector."""

    __slots__ = ("buf", "deadline", "served", "sock")

    def __init__(self, sock: socket.socket, served: int, buf: bytes) -> None:
        self.sock = sock
        self.served = served
        self.buf = buf
        self.deadline: float | None = None  # set while it lingers in the selector


class WakePool:
    """Serves woken connections with a few threads; quiet ones linger in a selector.

    Threads: one takes wakes from the parking session, ``threads`` serve and
    re-park connections from a work queue, and one watches the lingering
    connections (a selector with a deadline each; readable: back to the work
    queue; past the deadline: parked again). Only the linger thread touches
    the selector; the others hand it connections through ``_inbox`` and a
    byte on a socketpair.
    """

    def __init__(
        self,
        parking: connpark.BlockingParking,
        counters: Counters,
        fatal: Fatal,
        linger: float,
        threads: int,
    ) -> None:
        self.parking = parking
        self.counters = counters
        self.fatal = fatal
        self.linger = linger
        self._work: queue.SimpleQueue[tuple[bool, _Woken]] = queue.SimpleQueue()
        self._inbox: queue.SimpleQueue[_Woken] = queue.SimpleQueue()
        self._bell_r, self._bell_w = socket.socketpair()
        self._bell_w.setblocking(False)
        self._threads = [
            threading.Thread(target=self._receive, name="wake-receiver", daemon=True),
            threading.Thread(target=self._linger_loop, name="wake-linger", daemon=True),
        ] + [
            threading.Thread(target=self._work_loop, name=f"wake-{i}", daemon=True)
            for i in range(threads)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _receive(self) -> None:
        try:
            for woken in self.parking:
                self.counters.add(parked=-1)
                if woken.socket is not None:  # else a notice: hung up or timed out
                    self.counters.add(live=1)
                    conn = _Woken(woken.socket, int(woken.token or b"0"), woken.pending)
                    self._work.put((False, conn))
        except connpark.ConnparkError as exc:
            self.fatal.set(exc)
        else:
            self.fatal.set("the container session ended")

    def _work_loop(self) -> None:
        while True:
            park, conn = self._work.get()
            if park:
                self._park(conn)
            else:
                self._serve(conn)

    def _serve(self, conn: _Woken) -> None:
        """Echo the complete lines waiting, read what else is there, then linger.

        A few reads at most, so a client that never pauses cannot hold a thread:
        it goes round the selector, behind the others.
        """
        try:
            self._echo_lines(conn)
            for _ in range(16):
                try:
                    data = conn.sock.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if not data:
                    self._close(conn)
                    return
                conn.buf += data
                self._echo_lines(conn)
        except OSError:
            self._close(conn)
            return
        self._to_linger(conn)

    def _echo_lines(self, conn: _Woken) -> None:
        while b"\n" in conn.buf:
            line, conn.buf = conn.buf.split(b"\n", 1)
            conn.served += 1
            conn.sock.sendall(line + b"\n")

    def _park(self, conn: _Woken) -> None:
        try:
            self.parking.park(conn.sock, token=b"%d" % conn.served, pending=conn.buf)
        except connpark.ParkRefused:
            self._to_linger(conn)  # keep it; try again after another linger
            return
        except connpark.ConnparkError as exc:
            self._close(conn)
            self.fatal.set(exc)
            return
        self.counters.add(live=-1, parked=1)

    def _close(self, conn: _Woken) -> None:
        conn.sock.close()
        self.counters.add(live=-1)

    def _to_linger(self, conn: _Woken) -> None:
        self._inbox.put(conn)
        try:
            self._bell_w.send(b"x")
        except BlockingIOError:
            pass  # the bell is already ringing

    def _linger_loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._bell_r, selectors.EVENT_READ)
        # Every connection lingers for the same time, so arrival order is deadline
        # order. An entry whose connection left (readable) or lingers again under a
        # newer deadline is stale: skipped when it reaches the front.
        by_deadline: collections.deque[tuple[float, _Woken]] = collections.deque()
        while True:
            timeout = None
            while by_deadline:
                deadline, conn = by_deadline[0]
                if conn.deadline != deadline:
                    by_deadline.popleft()
                    continue
                timeout = deadline - time.monotonic()
                if timeout > 0:
                    break
                by_deadline.popleft()
                conn.deadline = None
                selector.unregister(conn.sock)
                self._work.put((True, conn))
                timeout = None
            for key, _ in selector.select(timeout):
                if key.fileobj is self._bell_r:
                    self._bell_r.recv(4096)
                    while True:
                        try:
                            conn = self._inbox.get_nowait()
                        except queue.Empty:
                            break
                        conn.deadline = time.monotonic() + self.linger
                        selector.register(conn.sock, selectors.EVENT_READ, conn)
                        by_deadline.append((conn.deadline, conn))
                else:
                    conn = key.data
                    conn.deadline = None
                    selector.unregister(conn.sock)
                    self._work.put((False, conn))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--parking-socket", help="connpark control socket (omit: never park)")
    parser.add_argument("--listen", default="127.0.0.1:8081", help="HOST:PORT (port 0: any)")
    parser.add_argument("--park-after", type=float, default=1.0, help="idle seconds (1.0)")
    parser.add_argument("--wake-threads", type=int, default=8, help="threads serving wakes (8)")
    parser.add_argument(
        "--wake-linger", type=float, default=0.1, help="idle seconds before re-parking a woken one"
    )
    parser.add_argument("--pool", default="threaded", help="connpark pool (threaded)")
    args = parser.parse_args(argv)

    counters = Counters()
    fatal = Fatal()
    try:
        parking = (
            connpark.BlockingParking(args.parking_socket, pool=args.pool)
            if args.parking_socket
            else None
        )
    except connpark.ConnparkError as exc:
        print(f"threaded_server: {exc}", file=sys.stderr)
        return 1

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            # socketserver shuts down and closes its request object after handle(),
            # which would send a FIN on a parked connection: take the fd away from it.
            conn = socket.socket(fileno=self.request.detach())
            serve_connection(conn, parking, counters, fatal, args.park_after)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 4096

    host, _, port = args.listen.rpartition(":")
    try:
        server = Server((host or "127.0.0.1", int(port)), Handler)
    except OSError as exc:
        print(f"threaded_server: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        if parking is not None:
            parking.shutdown()
        return 1
    bound_host, bound_port = server.socket.getsockname()[:2]
    print(f"listening on {bound_host}:{bound_port}", flush=True)
    if parking is not None:
        WakePool(parking, counters, fatal, args.wake_linger, args.wake_threads).start()
    threading.Thread(target=server.serve_forever, name="acceptor", daemon=True).start()
    try:
        while True:
            print(
                f"status threads={threading.active_count()} live={counters.live} "
                f"parked={counters.parked}",
                flush=True,
            )
            if fatal.event.wait(1):
                print(f"threaded_server: {fatal.error}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.shutdown()
        if parking is not None:
            parking.shutdown()


if __name__ == "__main__":
    sys.exit(main())
