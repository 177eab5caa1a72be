"""The basic mode: the classic fd-passing line demo, over connpark's own wire.

``demo server`` hands its stdout to each client that asks (HELLO in pool
"demo", answered with WELCOME and a WAKE whose fd is the server's stdout);
``demo client`` copies its stdin, line by line, into that fd. What the
client types appears on the server's terminal though no byte of it passes
through the server process.
"""

from __future__ import annotations

import logging
import os
import sys

from ._errors import ConnparkError
from ._fdpass import BlockingChannel
from ._unixsock import connect_unix, default_socket_path, listen_unix
from ._wire import (
    Ack,
    Decoder,
    Error,
    ErrorCode,
    Hello,
    Reason,
    Wake,
    WakeEntry,
    Welcome,
    close_fds,
    message_fds,
)

LOGGER = logging.getLogger(__name__)
DEMO_POOL = "demo"
DEMO_TOKEN = b"stdout"


def default_demo_path() -> str:
    return str(default_socket_path("connpark-demo.sock"))


def serve_demo(path: str, *, out_fd: int = 1, max_clients: int | None = None) -> None:
    """Serve clients one after another until interrupted (or ``max_clients``)."""
    listener = listen_unix(path)
    print(
        f"demo server: listening on {path}; lines typed in a client appear below", file=sys.stderr
    )
    served = 0
    try:
        while max_clients is None or served < max_clients:
            conn, _ = listener.accept()
            served += 1
            chan = BlockingChannel(conn)
            try:
                _hand_over(chan, out_fd)
            except (ConnparkError, OSError, TimeoutError) as exc:
                print(f"demo server: client {served} dropped: {exc}", file=sys.stderr)
            finally:
                chan.close()
    finally:
        listener.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _hand_over(chan: BlockingChannel, out_fd: int) -> None:
    decoder = Decoder()
    try:
        hello = chan.receive_message(decoder, timeout=10.0)
        if hello is not None and not isinstance(hello, Hello):
            close_fds(message_fds(hello))
        if not isinstance(hello, Hello) or hello.pool != DEMO_POOL:
            chan.send(Error(ErrorCode.PROTOCOL, "expected HELLO for pool 'demo'"))
            return
        chan.send(
            Welcome(session_id=1, max_token=len(DEMO_TOKEN), max_pending=0),
            Wake((WakeEntry(0, Reason.REQUESTED, DEMO_TOKEN, b"", out_fd),)),
        )
        # Keep our copy until the client says it has the fd (macOS needs this).
        ack = chan.receive_message(decoder, timeout=10.0)
        if not isinstance(ack, Ack):
            raise ConnparkError("client did not acknowledge the fd")
        print("demo server: handed stdout to a client", file=sys.stderr)
    finally:
        decoder.close()


def run_client(path: str, stdin_fd: int = 0) -> int:
    """Receive the server's stdout and copy our stdin into it; 0 at end of input."""
    chan = BlockingChannel(connect_unix(path))
    decoder = Decoder()
    fd: int | None = None
    try:
        chan.send(Hello(pool=DEMO_POOL, name=f"demo-client-{os.getpid()}"))
        while fd is None:
            msg = chan.receive_message(decoder, timeout=10.0)
            if msg is None:
                raise ConnparkError(f"{path}: server closed the connection")
            if isinstance(msg, Error):
                raise ConnparkError(f"{path}: server error: {msg.text}")
            if isinstance(msg, Wake):
                fds = [e.fd for e in msg.entries if e.fd is not None]
                if not fds:
                    raise ConnparkError("server sent no fd")
                fd = fds[0]
                close_fds(fds[1:])
                chan.send(Ack(tuple(e.ticket for e in msg.entries)))
        with os.fdopen(stdin_fd, "rb", closefd=False) as stdin:
            for line in stdin:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
        return 0
    finally:
        if fd is not None:
            os.close(fd)
        decoder.close()
        chan.close()
