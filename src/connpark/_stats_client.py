"""Ask a running container for its statistics (blocking; used by ``connpark stats``)."""

from __future__ import annotations

import os

from ._hook_blocking import BlockingParking
from ._stats import ContainerStats


def fetch_stats(
    path: str | os.PathLike[str], *, timeout: float = 10.0, one_shard: bool = False
) -> ContainerStats:
    """One STATS round trip on a short-lived session in pool ``"_stats"``: totals over
    every shard (with each one's figures), or with ``one_shard`` the one at ``path``."""
    name = f"stats-{os.getpid()}"
    if one_shard:
        parking = BlockingParking._one_shard(
            path, pool="_stats", name=name, connect_timeout=timeout
        )
    else:
        parking = BlockingParking(
            path, pool="_stats", name=name, reconnect=False, connect_timeout=timeout
        )
    with parking:
        return parking.stats(timeout=timeout)
