#!/usr/bin/env python3
"""A tiny line client (for machines without nc): sends each stdin line, prints the replies.

python examples/line_client.py 127.0.0.1 8007
"""

from __future__ import annotations

import socket
import sys
import threading


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    sock = socket.create_connection((host, port))

    def pump() -> None:
        while data := sock.recv(65536):
            sys.stdout.buffer.write(data)
            sys.stdout.flush()

    threading.Thread(target=pump, daemon=True).start()
    for line in sys.stdin.buffer:
        sock.sendall(line)
    sock.shutdown(socket.SHUT_WR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
