"""Ask a running container for its statistics (blocking; used by ``connpark stats``)."""

from __future__ import annotations

import os

from ._errors import ContainerError
from ._fdpass import BlockingChannel
from ._stats import ContainerStats
from ._unixsock import connect_unix
from ._wire import StatsReply
from ._worker import WorkerProtocol


def fetch_stats(path: str, *, timeout: float = 10.0) -> ContainerStats:
    """One STATS round trip on a short-lived session in pool ``"_stats"``."""
    chan = BlockingChannel(connect_unix(path))
    proto = WorkerProtocol("_stats", f"stats-{os.getpid()}")
    try:
        chan.send_frames(proto.hello())
        proto.handshake(chan.receive_message(proto.decoder, timeout=timeout))
        chan.send_frames(proto.stats())
        while True:
            msg = chan.receive_message(proto.decoder, timeout=timeout)
            if msg is None:
                raise ContainerError("the container closed the session")
            proto.check(msg)
            if isinstance(msg, StatsReply):
                return ContainerStats.from_json(msg.body)
    finally:
        proto.decoder.close()
        chan.close()
