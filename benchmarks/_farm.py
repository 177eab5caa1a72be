"""A client farm process: opens N loopback TCP connections, then obeys stdin.

argv: HOST PORT SOURCE_ADDR N [FIRST]. Prints ``connected N`` once all are up.
Client I of this process has the global index FIRST + I (FIRST defaults to 0).
Commands (one per line):
  send PAYLOAD I,J,K   write PAYLOAD + global index + newline on those local clients;
                       answers ``sent I:t_ns J:t_ns ...`` (time.monotonic_ns of each write)
  read I TIMEOUT       read what the server sent back on client I (hex), or ``none``
  quit                 close everything and exit
"""

from __future__ import annotations

import resource
import socket
import sys
import time

_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux


def main() -> None:
    host, port, source, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    first = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    clients = []
    for _ in range(n):
        s = socket.socket()
        # The port is picked at connect() (by 4-tuple), not at bind(): bind's own
        # search for a free port slows to a crawl once thousands are taken.
        s.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((source, 0))
        s.connect((host, port))
        clients.append(s)
    print(f"connected {n}", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "quit":
            break
        if parts[0] == "send":
            payload = parts[1]
            stamps = []
            for i in map(int, parts[2].split(",")) if len(parts) > 2 else []:
                data = f"{payload}{first + i}\n".encode()
                t = time.monotonic_ns()
                clients[i].sendall(data)
                stamps.append(f"{i}:{t}")
            print("sent " + " ".join(stamps), flush=True)
        elif parts[0] == "read":
            i, timeout = int(parts[1]), float(parts[2])
            clients[i].settimeout(timeout)
            try:
                data = clients[i].recv(65536)
                print(data.hex() or "eof", flush=True)
            except TimeoutError:
                print("none", flush=True)
    for s in clients:
        s.close()


if __name__ == "__main__":
    main()
