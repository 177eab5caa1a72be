"""A frozen statistics snapshot of the container, and its JSON form."""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from ._wire import Reason


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


#: Upper bounds (seconds) of the wake-latency histogram's buckets; +Inf is implied.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


def _floats(xs: Iterable[float]) -> tuple[float, ...]:
    return tuple(float(x) for x in xs)


def _ints(xs: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(x) for x in xs)


@attrs.frozen
class LatencyHistogram:
    """Every wake's latency since start, in buckets (what Prometheus histograms want)."""

    #: Upper bounds in seconds, increasing (+Inf is implied).
    bounds: tuple[float, ...] = attrs.field(default=LATENCY_BUCKETS, converter=_floats)
    #: Wakes per bucket, not cumulative; one more entry than ``bounds`` (the +Inf bucket).
    counts: tuple[int, ...] = attrs.field(
        default=(0,) * (len(LATENCY_BUCKETS) + 1), converter=_ints
    )
    #: Sum of all latencies, seconds.
    sum_s: float = 0.0


class LatencyBuckets:
    """The container's running histogram of wake latencies (cheap per wake: one bisect)."""

    __slots__ = ("bounds", "counts", "sum_s")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: Iterable[float]) -> None:
        where, bounds, counts = bisect.bisect_left, self.bounds, self.counts
        for x in seconds:
            counts[where(bounds, x)] += 1
            self.sum_s += x

    def snapshot(self) -> LatencyHistogram:
        return LatencyHistogram(self.bounds, tuple(self.counts), round(self.sum_s, 9))


@attrs.frozen
class ProcessInfo:
    """One process of the container: the supervisor, or a shard (with its index)."""

    role: str
    pid: int
    shard: int | None = None
    #: The supervisor: how many times it was executed (1, plus one per upgrade).
    generation: int | None = None


@attrs.frozen
class ShardFigures:
    """One shard's share, in the totals of a multi-shard container."""

    shard: int
    parked: int
    queued: int
    unacked: int
    sessions: int
    fds_held: int
    fd_budget: int
    parks_total: int
    acks_total: int


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
    #: The processes that serve this socket (``--crash-recovery``: the supervisor too).
    processes: tuple[ProcessInfo, ...] = ()
    #: Every wake's latency since start, bucketed (``wake_latency`` covers the recent ones).
    wake_latency_histogram: LatencyHistogram = attrs.field(factory=LatencyHistogram)
    #: v3 serving counters (0 from an older container). Pings answered by
    #: auto-response rules, and the reply bytes written.
    autoresponses_total: int = 0
    autoresponse_bytes_total: int = 0
    #: SEND requests; connections that took a whole message; those woken
    #: (UNSENT or dead); bytes written to parked sockets.
    publishes_total: int = 0
    published_total: int = 0
    publish_woken_total: int = 0
    publish_bytes_total: int = 0
    #: Parked connections with tags, and distinct tags among them.
    tagged: int = 0
    tags: int = 0
    #: Of ``parked``: those held packed (~40 B each; a plain park still parked one
    #: to two seconds after its PARKED went out), the rest as objects (~200 B).
    packed: int = 0
    #: Several shards (``serve --shards``): each one's figures; the rest are totals.
    shards: tuple[ShardFigures, ...] = ()

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ContainerStats:
        data: dict[str, Any] = json.loads(text)
        data["wake_latency"] = LatencySummary(**data["wake_latency"])
        data["processes"] = tuple(ProcessInfo(**p) for p in data.get("processes", ()))
        data["shards"] = tuple(ShardFigures(**f) for f in data.get("shards", ()))
        if "wake_latency_histogram" in data:
            data["wake_latency_histogram"] = LatencyHistogram(**data["wake_latency_histogram"])
        return cls(**data)


_SUMMED = (
    "parked queued unacked orphaned sessions parks_total acks_total closed_total"
    " orphans_closed_total protocol_errors_total fds_held fd_budget autoresponses_total"
    " autoresponse_bytes_total publishes_total published_total publish_woken_total"
    " publish_bytes_total tagged tags packed"
).split()


def _sum_maps(maps: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in maps:
        for key, value in m.items():
            out[key] = out.get(key, 0) + value
    return out


def _shard_of(stats: ContainerStats, default: int) -> int:
    return next(
        (p.shard for p in stats.processes if p.role == "shard" and p.shard is not None), default
    )


def merge_stats(parts: Sequence[ContainerStats]) -> ContainerStats:
    """Totals over shards, with each shard's figures in ``shards``.

    Counters, gauges and histograms add up exactly. The recent-latency summary
    cannot: its p50 is the shards' median weighted by their counts, its p99 and
    max the worst shard's (an upper bound). The supervisor and the mirrors
    appear once each in ``processes``.
    """
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    summed = {name: sum(getattr(p, name) for p in parts) for name in _SUMMED}
    lats = [p.wake_latency for p in parts if p.wake_latency.count]
    count = sum(lat.count for lat in lats)
    latency = LatencySummary()
    if count:
        ordered = sorted(lats, key=lambda lat: lat.p50_ms)
        seen, p50 = 0, ordered[-1].p50_ms
        for lat in ordered:
            seen += lat.count
            if seen * 2 >= count:
                p50 = lat.p50_ms
                break
        latency = LatencySummary(
            count, p50, max(lat.p99_ms for lat in lats), max(lat.max_ms for lat in lats)
        )
    hists = [p.wake_latency_histogram for p in parts]
    histogram = LatencyHistogram(
        hists[0].bounds,
        tuple(map(sum, zip(*(h.counts for h in hists), strict=True))),
        round(sum(h.sum_s for h in hists), 9),
    )
    processes: dict[tuple[str, int], ProcessInfo] = {}
    for p in parts:
        for proc in p.processes:
            processes.setdefault((proc.role, proc.pid), proc)
    figures = tuple(
        ShardFigures(
            _shard_of(p, i),
            p.parked,
            p.queued,
            p.unacked,
            p.sessions,
            p.fds_held,
            p.fd_budget,
            p.parks_total,
            p.acks_total,
        )
        for i, p in enumerate(parts)
    )
    return attrs.evolve(
        first,
        **summed,
        woken_total=_sum_maps(p.woken_total for p in parts),
        refused_total=_sum_maps(p.refused_total for p in parts),
        pools=_sum_maps(p.pools for p in parts),
        wake_latency=latency,
        wake_latency_histogram=histogram,
        uptime_s=max(p.uptime_s for p in parts),
        shutting_down=any(p.shutting_down for p in parts),
        processes=tuple(processes.values()),
        shards=figures,
    )


def format_table(stats: ContainerStats, *, source: str = "", at: float | None = None) -> str:
    """``stats`` as ``connpark stats`` prints it: a header, then one row per figure.

    The header carries the wall-clock time ``at`` (default: now), so that each
    snapshot of ``--watch`` says when it was taken. Rows keep their place from one
    snapshot to the next (every wake reason is listed, even at 0), so a watching
    eye finds them again; a row's breakdown follows its total on the same line.
    """
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() if at is None else at))
    where = f"connpark {source}" if source else "connpark"
    header = f"{when}  {where}, up {_duration(stats.uptime_s)}"
    if stats.shutting_down:
        header += ", SHUTTING DOWN"

    reasons = [r.name for r in Reason]
    reasons += sorted(set(stats.woken_total) - set(reasons))
    pools = sorted(stats.pools.items(), key=lambda kv: (kv[0].startswith("_"), kv[0]))
    refusals = sorted(stats.refused_total.items(), key=lambda kv: (-kv[1], kv[0]))
    lat = stats.wake_latency
    if lat.count:
        latency = (
            f"p50 {lat.p50_ms:.3f} ms, p99 {lat.p99_ms:.3f} ms, max {lat.max_ms:.3f} ms"
            f" (last {lat.count:,} wakes)"
        )
    else:
        latency = "no wakes yet"
    share = 100 * stats.fds_held / stats.fd_budget if stats.fd_budget else 100.0
    rows: list[tuple[str, int | None, str]] = [
        ("parked", stats.parked, f"packed {stats.packed:,}"),
        ("queued", stats.queued, ""),
        ("un-ACKed", stats.unacked, ""),
        ("orphaned", stats.orphaned, ""),
        ("sessions", stats.sessions, _breakdown(pools)),
        (
            "wakes",
            sum(stats.woken_total.values()),
            _breakdown((r, stats.woken_total.get(r, 0)) for r in reasons),
        ),
        ("refusals", sum(stats.refused_total.values()), _breakdown(refusals)),
        ("parks", stats.parks_total, ""),
        ("ACKs", stats.acks_total, ""),
        ("closed", stats.closed_total, f"orphans closed {stats.orphans_closed_total:,}"),
        ("protocol errors", stats.protocol_errors_total, ""),
        (
            "auto-responses",
            stats.autoresponses_total,
            f"reply bytes {stats.autoresponse_bytes_total:,}",
        ),
        (
            "publishes",
            stats.publishes_total,
            f"written {stats.published_total:,}, woken {stats.publish_woken_total:,},"
            f" bytes {stats.publish_bytes_total:,}",
        ),
        ("tagged", stats.tagged, f"tags {stats.tags:,}"),
        ("wake latency", None, latency),
        ("fd budget", None, f"{stats.fds_held:,} of {stats.fd_budget:,} used ({share:.1f}%)"),
    ]
    for f in stats.shards:
        rows.append(
            (
                f"shard {f.shard}",
                f.parked,
                f"queued {f.queued:,}, un-ACKed {f.unacked:,}, sessions {f.sessions:,},"
                f" fds {f.fds_held:,} of {f.fd_budget:,}",
            )
        )
    # At least as wide as 1,000,000: the column stays put while --watch counts up.
    width = max(9, *(len(f"{n:,}") for _, n, _ in rows if n is not None))
    lines = [header]
    for label, number, detail in rows:
        cell = f"{number:>{width},}" if number is not None else ""
        line = f"{label:<16}{cell}   {detail}" if number is not None else f"{label:<16}{detail}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def _breakdown(items: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in items)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours < 1:
        return f"{minutes} min {secs:02d} s"
    days, hours = divmod(hours, 24)
    return (f"{days} d " if days else "") + f"{hours} h {minutes:02d} min"
