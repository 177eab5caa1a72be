"""Ask a running container for its statistics (blocking; used by ``connpark stats``)."""

from __future__ import annotations

import os

from ._hook_blocking import BlockingParking
from ._stats import ContainerStats


def fetch_stats(path: str | os.PathLike[str], *, timeout: float = 10.0) -> ContainerStats:
    """One STATS round trip on a short-lived session in pool ``"_stats"``."""
    with BlockingParking(
        path, pool="_stats", name=f"stats-{os.getpid()}", reconnect=False, connect_timeout=timeout
    ) as parking:
        return parking.stats(timeout=timeout)
