"""Prometheus exposition of the container's statistics, through prometheus_client.

prometheus_client is an optional extra (``pip install 'connpark[metrics]'``);
only this module imports it. ``StatsCollector`` turns ``ContainerStats``
snapshots into metric families at each scrape; ``MetricsServer`` serves
``/metrics`` from prometheus_client's own HTTP server, in its own threads, so
a scrape never runs on the container's trio loop (the snapshot callable is
what reaches into the loop, see ``_service.py``).

Every series carries a ``shard`` label, one value per snapshot; the totals
are ``sum without (shard)`` in PromQL (a total series beside the per-shard
ones would be counted twice by such a sum).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

from ._errors import ConnparkError
from ._stats import ContainerStats
from ._wire import Reason, Refusal

try:
    from prometheus_client import start_http_server
    from prometheus_client.core import (
        CollectorRegistry,
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.process_collector import ProcessCollector
except ImportError as exc:  # pragma: no cover - the CLI checks before importing us
    raise ConnparkError(
        "--metrics needs prometheus_client: pip install 'connpark[metrics]'"
    ) from exc

LOGGER = logging.getLogger(__name__)

#: (shard label, snapshot) pairs; called from the HTTP server's thread at each scrape.
Snapshots = Callable[[], Sequence[tuple[str, ContainerStats]]]

# name, help, ContainerStats attribute: the gauges.
_GAUGES = (
    ("connpark_parked", "Connections in the watcher, waiting for their client.", "parked"),
    (
        "connpark_parked_packed",
        "Parked connections held packed (about 40 B each) rather than as objects.",
        "packed",
    ),
    ("connpark_queued", "Woken connections waiting for a worker session.", "queued"),
    ("connpark_unacked", "Wakes written to a worker and not yet ACKed.", "unacked"),
    ("connpark_orphaned", "Queued wakes of pools that have no worker session.", "orphaned"),
    ("connpark_sessions", "Connected worker sessions.", "sessions"),
    ("connpark_fds_held", "File descriptors held for connections.", "fds_held"),
    ("connpark_fd_budget", "Most connection fds the container will hold.", "fd_budget"),
    ("connpark_uptime_seconds", "Seconds since the container started.", "uptime_s"),
    ("connpark_shutting_down", "1 while draining (SIGTERM), else 0.", "shutting_down"),
    ("connpark_tagged", "Parked connections with at least one tag.", "tagged"),
    ("connpark_tags", "Distinct tags among parked connections.", "tags"),
)
# name without _total, help, ContainerStats attribute: the plain counters.
_COUNTERS = (
    ("connpark_parks", "Connections parked since start.", "parks_total"),
    ("connpark_acks", "Wakes ACKed by workers since start.", "acks_total"),
    ("connpark_closed", "Parked connections closed by CLOSE requests.", "closed_total"),
    ("connpark_orphans_closed", "Orphans closed after the orphan timeout.", "orphans_closed_total"),
    ("connpark_protocol_errors", "Sessions ended for a protocol error.", "protocol_errors_total"),
    ("connpark_autoresponses", "Pings answered by auto-response rules.", "autoresponses_total"),
    (
        "connpark_autoresponse_bytes",
        "Auto-response reply bytes written.",
        "autoresponse_bytes_total",
    ),
    ("connpark_publishes", "SEND requests (publish without waking).", "publishes_total"),
    ("connpark_published", "Parked connections that took a whole SEND.", "published_total"),
    (
        "connpark_publish_woken",
        "Connections woken by a SEND (UNSENT, dead).",
        "publish_woken_total",
    ),
    ("connpark_publish_bytes", "Bytes written to parked sockets by SEND.", "publish_bytes_total"),
)


_REASONS = tuple(r.name for r in Reason)
_CODES = tuple(r.label for r in Refusal if r is not Refusal.OK)


def _names(known: tuple[str, ...], seen: Mapping[str, int]) -> list[str]:
    return [*known, *sorted(set(seen) - set(known))]


class StatsCollector:
    """A prometheus_client collector over ``snapshots()`` (no state of its own)."""

    def __init__(self, snapshots: Snapshots) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        shards = list(self._snapshots())
        for name, doc, attr in _GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["shard"])
            for shard, stats in shards:
                gauge.add_metric([shard], float(getattr(stats, attr)))
            yield gauge
        for name, doc, attr in _COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=["shard"])
            for shard, stats in shards:
                counter.add_metric([shard], getattr(stats, attr))
            yield counter
        wakes = CounterMetricFamily(
            "connpark_wakes", "Connections handed back, by reason.", labels=["shard", "reason"]
        )
        refusals = CounterMetricFamily(
            "connpark_refusals", "Park entries refused, by refusal code.", labels=["shard", "code"]
        )
        pools = GaugeMetricFamily(
            "connpark_pool_sessions",
            "Connected worker sessions per pool.",
            labels=["shard", "pool"],
        )
        latency = HistogramMetricFamily(
            "connpark_wake_latency_seconds",
            "Wake latency, readiness seen to fd written to a worker.",
            labels=["shard"],
        )
        for shard, stats in shards:
            # Every reason and code from the start, at 0: rate() and increase() see the first one.
            for reason in _names(_REASONS, stats.woken_total):
                wakes.add_metric([shard, reason], stats.woken_total.get(reason, 0))
            for code in _names(_CODES, stats.refused_total):
                refusals.add_metric([shard, code], stats.refused_total.get(code, 0))
            for pool, n in sorted(stats.pools.items()):
                pools.add_metric([shard, pool], n)
            hist = stats.wake_latency_histogram
            buckets, running = [], 0
            for bound, n in zip((*hist.bounds, float("inf")), hist.counts, strict=True):
                running += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
            latency.add_metric([shard], buckets, hist.sum_s)
        yield from (wakes, refusals, pools, latency)


class MetricsServer:
    """``/metrics`` on HOST:PORT, served by prometheus_client's threaded HTTP server."""

    def __init__(self, host: str, port: int, snapshots: Snapshots) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(snapshots))
        ProcessCollector(registry=self.registry)  # process_open_fds, RSS, CPU of this process
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except (OSError, ValueError) as exc:  # ValueError: a host getaddrinfo cannot parse
            why = getattr(exc, "strerror", None) or str(exc)
            raise ConnparkError(f"cannot serve metrics on {_show(host, port)}: {why}") from exc
        addr = self._server.server_address
        self.host, self.port = str(addr[0]), int(addr[1])
        LOGGER.info("metrics on http://%s/metrics", _show(self.host, self.port))

    def close(self) -> None:
        """Stop serving (a scrape under way finishes in its own thread)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
