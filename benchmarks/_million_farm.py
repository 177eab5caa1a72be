"""A client farm for bench_million.py: connects when told to, writes when told to.

argv: HOST PORT SOURCES COUNT FIRST. Client I of this process has the global
index FIRST + I and the source address SOURCES[I % len(SOURCES)] (SOURCES:
comma-separated). Linux picks a connect's port by scanning from an offset,
even ports first: past about half of the 28,232 ports from one source to one
destination every connect scans thousands, so a source should serve at most
~7,000. It keeps only fds and local ports (no socket objects), so 20,000
clients cost a few hundred KB. Commands, one per line on stdin:

  go K                  connect up to K more clients (COUNT in all); answers
                        ``c CONNECTED``, or ``e CONNECTED ERRNO-NAME message``
                        when a connect failed (no more connects after that)
  send PAYLOAD I,J,...  write PAYLOAD + global index + newline on those local
                        clients; answers ``s I:PORT:T_NS ...`` (the write time,
                        time.monotonic_ns: comparable across processes on Linux)
  sendport PAYLOAD A:P,B:Q  the same, for the clients whose local address and port
                        are A:P, B:Q, ...
  quit                  exit (the kernel closes every client)

EOF on stdin (the benchmark died) ends it too.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import sys
import time
from array import array

_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux
CONNECT_TIMEOUT = 20.0


def main() -> None:
    host, port, sources = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    count, first = int(sys.argv[4]), int(sys.argv[5])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fds = array("i")
    ports = array("H")
    by_addr: dict[str, int] = {}
    failed = False
    out = sys.stdout
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        cmd = parts[0]
        if cmd == "quit":
            break
        if cmd == "go":
            want = min(count, len(fds) + int(parts[1]))
            err = ""
            while not failed and len(fds) < want:
                s = socket.socket()
                try:
                    # The port is picked at connect() (by 4-tuple), not at bind():
                    # bind's own search for a free port slows to a crawl.
                    s.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                    s.bind((sources[len(fds) % len(sources)], 0))
                    s.settimeout(CONNECT_TIMEOUT)
                    s.connect((host, port))
                    ports.append(s.getsockname()[1])
                except OSError as exc:
                    s.close()
                    name = errno.errorcode.get(exc.errno or 0, "timeout")
                    err = f"{name} {exc}".replace("\n", " ")
                    failed = True
                    break
                fds.append(s.detach())
            if err:
                out.write(f"e {len(fds)} {err}\n")
            else:
                out.write(f"c {len(fds)}\n")
            out.flush()
        elif cmd in ("send", "sendport"):
            payload = parts[1]
            stamps = []
            if cmd == "sendport" and len(by_addr) != len(ports):
                n = len(sources)
                by_addr = {f"{sources[i % n]}:{p}": i for i, p in enumerate(ports)}
            for item in parts[2].split(",") if len(parts) > 2 else []:
                i = int(item) if cmd == "send" else by_addr.get(item, -1)
                if not 0 <= i < len(fds):
                    continue
                data = f"{payload}{first + i}\n".encode()
                t = time.monotonic_ns()
                try:
                    os.write(fds[i], data)
                except OSError:
                    continue  # closed by the other end: reported as missing
                stamps.append(f"{i}:{ports[i]}:{t}")
            out.write("s " + " ".join(stamps) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
