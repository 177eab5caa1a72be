#!/usr/bin/env python3
"""A tiny line client (for machines without nc): sends each stdin line, prints the replies.

python examples/line_client.py 127.0.0.1 8007

At end of input it closes its sending side and waits (up to ``--wait`` seconds,
default 10) for a reply line to every line it sent, so ``printf 'a\\nb\\n' |
line_client.py HOST PORT`` prints both replies. It exits as soon as the server
closes the connection.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument(
        "--wait", type=float, default=10.0, help="seconds to wait for replies at end of input"
    )
    args = parser.parse_args(argv)
    try:
        sock = socket.create_connection((args.host, args.port))
    except OSError as exc:
        print(f"line_client: cannot connect to {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    stdin = sys.stdin.fileno()
    sel = selectors.DefaultSelector()
    sel.register(stdin, selectors.EVENT_READ)
    sel.register(sock, selectors.EVENT_READ)
    sent = received = 0
    deadline: float | None = None  # set at end of input
    try:
        while deadline is None or received < sent:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                print(f"line_client: {sent - received} lines unanswered", file=sys.stderr)
                return 1
            for key, _ in sel.select(timeout):
                if key.fileobj is sock:
                    data = sock.recv(65536)
                    if not data:
                        return 0  # the server closed the connection
                    sys.stdout.buffer.write(data)
                    sys.stdout.flush()
                    received += data.count(b"\n")
                else:
                    data = os.read(stdin, 65536)
                    if data:
                        sock.sendall(data)
                        sent += data.count(b"\n")
                    else:
                        sel.unregister(stdin)
                        sock.shutdown(socket.SHUT_WR)
                        deadline = time.monotonic() + args.wait
    except OSError as exc:
        print(f"line_client: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        sel.close()
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
