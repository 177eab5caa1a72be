"""A worker that parks N connections, then never reads again (a process to SIGKILL).

argv: control socket path, pool, N. Prints the TCP port it listens on, then
"parked" once the container has taken all N.
"""

from __future__ import annotations

import socket
import sys
import time

from connpark._fdpass import BlockingChannel
from connpark._unixsock import connect_unix
from connpark._wire import Decoder, Hello, Park, Parked, Welcome
from connpark._worker import make_park_entry


def main() -> None:
    path, pool, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(n)
    print(listener.getsockname()[1], flush=True)
    conns = [listener.accept()[0] for _ in range(n)]
    # A raw protocol peer: the hooks would ACK, and this one must not.
    chan = BlockingChannel(connect_unix(path))
    decoder = Decoder()
    chan.send(Hello(pool=pool, name="stuck"))
    assert isinstance(chan.receive_message(decoder, timeout=10), Welcome)
    entries = [make_park_entry(c.fileno(), token=b"conn-%d" % i) for i, c in enumerate(conns)]
    chan.send(Park(1, tuple(entries)))
    msg = chan.receive_message(decoder, timeout=10)
    if not isinstance(msg, Parked) or not all(r.ticket for r in msg.results):
        raise SystemExit(f"park failed: {msg!r}")
    for c in conns:
        c.close()
    print("parked", flush=True)
    time.sleep(120)  # never read, never ACK: wakes pile up in flight


if __name__ == "__main__":
    main()
