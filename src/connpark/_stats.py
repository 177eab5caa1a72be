"""A frozen statistics snapshot of the container, and its JSON form."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs


@attrs.frozen
class LatencySummary:
    """Wake latency, readiness seen -> fd written to a worker, over the recent wakes."""

    #: How many wakes the summary covers (the most recent ones, at most 4096).
    count: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0

    @classmethod
    def of(cls, seconds: Iterable[float]) -> LatencySummary:
        xs = sorted(seconds)
        if not xs:
            return cls()

        def pct(p: float) -> float:
            return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1000, 3)

        return cls(len(xs), pct(0.50), pct(0.99), round(xs[-1] * 1000, 3))


@attrs.frozen
class ContainerStats:
    """What ``connpark stats`` prints."""

    #: Connections in the watcher, waiting for their client.
    parked: int
    #: Woken connections waiting for a session (window full, or no session in the pool).
    queued: int
    #: Wakes written (or being written) to a session and not yet ACKed.
    unacked: int
    #: Queued wakes of pools that have no session at all (closed after the orphan timeout).
    orphaned: int
    #: Connected worker sessions.
    sessions: int
    #: Wakes by reason name since start.
    woken_total: Mapping[str, int]
    #: Refused park entries by refusal label since start.
    refused_total: Mapping[str, int]
    parks_total: int
    acks_total: int
    #: Parked connections closed by CLOSE requests.
    closed_total: int
    #: Orphans closed after the orphan timeout.
    orphans_closed_total: int
    protocol_errors_total: int
    #: Sessions per pool.
    pools: Mapping[str, int]
    #: fds held for connections, and the most the container will hold.
    fds_held: int
    fd_budget: int
    wake_latency: LatencySummary
    uptime_s: float
    shutting_down: bool

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ContainerStats:
        data: dict[str, Any] = json.loads(text)
        data["wake_latency"] = LatencySummary(**data["wake_latency"])
        return cls(**data)
