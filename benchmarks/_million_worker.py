"""A heavy worker for bench_million.py: accepts, parks in batches, reports wakes.

argv: SOCKET_PATH PORT BACKLOG WATCH_SHARD. Listens on 127.0.0.1:PORT with
SO_REUSEPORT (PORT 0: picks one; the others then share it), keeps one
``connpark.BlockingParking`` handle (one session per shard) and prints, one
line each:

  ready PORT SHARDS                  once connected and listening
  p PARKED REFUSED                   progress, at most every 50 ms per batch
  x MESSAGE                          a park_many that raised
  w T_NS IP PORT SHARD REASON HEX    a woken connection: time.monotonic_ns when
                                     next_wake gave it, its peer, the bytes up
                                     to the first newline (``-``: none)
  n TICKET REASON                    a notice (the container closed it)

Commands on stdin: ``stop`` (stop accepting), ``peers`` (answers ``peers
IP:PORT ...``: the peers of the connections parked in WATCH_SHARD, minus the
woken ones), ``quit`` (or EOF: exit at once; the kernel closes the rest).
"""

from __future__ import annotations

import os
import resource
import socket
import sys
import threading
import time
from collections import Counter

import connpark
from connpark._shards import shard_of

BATCH = 253  # fds in one PARK frame


class Worker:
    def __init__(self, path: str, port: int, backlog: int, watch: int) -> None:
        self.parking = connpark.BlockingParking(path, pool="million", connect_timeout=30)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(backlog)
        self.port = self.listener.getsockname()[1]
        self.watch = watch
        self.watched: set[tuple[str, int]] = set()
        self.parked = 0
        self.refused: Counter[str] = Counter()
        self.stop = threading.Event()
        self._out = threading.Lock()

    def emit(self, line: str) -> None:
        with self._out:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def accept_loop(self) -> None:
        last = 0.0
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            batch: list[socket.socket] = []
            peers: list[tuple[str, int]] = []
            try:
                s, peer = self.listener.accept()
                batch.append(s)
                peers.append(peer)
                self.listener.setblocking(False)
                while len(batch) < BATCH:
                    s, peer = self.listener.accept()
                    batch.append(s)
                    peers.append(peer)
            except (BlockingIOError, TimeoutError):
                pass
            finally:
                self.listener.settimeout(0.2)
            if not batch:
                continue
            try:
                results = self.parking.park_many(batch, timeout=60)
            except connpark.ConnparkError as exc:
                self.emit(f"x {type(exc).__name__}: {exc}".replace("\n", " "))
                results = []
            watched = []
            for r, peer in zip(results, peers, strict=False):
                if isinstance(r, int):
                    self.parked += 1
                    if shard_of(r) == self.watch:
                        watched.append(peer)
                else:
                    self.refused[r.reason.label] += 1
            with self._out:
                self.watched.update(watched)
            for s in batch:
                s.close()  # the refused ones (parked ones are closed already)
            now = time.monotonic()
            if now - last >= 0.05 or len(batch) < BATCH:
                last = now
                self.emit(f"p {self.parked} {sum(self.refused.values())}")
        self.listener.close()
        self.emit(
            f"p {self.parked} {sum(self.refused.values())} "
            + ",".join(f"{k}={v}" for k, v in self.refused.items())
        )

    def wake_loop(self) -> None:
        while True:
            try:
                w = self.parking.next_wake(timeout=0.5)
            except connpark.ConnparkError as exc:
                self.emit(f"x wake loop: {type(exc).__name__}: {exc}".replace("\n", " "))
                return
            if w is None:
                continue
            t = time.monotonic_ns()
            if w.socket is None:
                self.emit(f"n {w.ticket} {w.reason.name}")
                continue
            s = w.socket
            data = b""
            try:
                peer = s.getpeername()
                s.settimeout(5)
                while not data.endswith(b"\n") and len(data) < 256:
                    chunk = s.recv(256)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                peer = ("?", 0)
            finally:
                s.close()
            with self._out:
                self.watched.discard(peer)
            self.emit(
                f"w {t} {peer[0]} {peer[1]} {shard_of(w.ticket)} {w.reason.name} "
                f"{data.hex() or '-'}"
            )


def main() -> None:
    path, port, backlog, watch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    worker = Worker(path, port, backlog, watch)
    threading.Thread(target=worker.accept_loop, daemon=True).start()
    threading.Thread(target=worker.wake_loop, daemon=True).start()
    worker.emit(f"ready {worker.port} {len(worker.parking._shards)}")
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stop":
            worker.stop.set()
        elif cmd == "peers":
            with worker._out:
                peers = " ".join(f"{ip}:{p}" for ip, p in worker.watched)
            worker.emit(f"peers {peers}")
        elif cmd == "quit":
            break
    sys.stdout.flush()
    os._exit(0)  # no drain: the benchmark kills the container next


if __name__ == "__main__":
    main()
