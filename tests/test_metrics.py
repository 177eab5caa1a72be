"""``connpark serve --metrics``: Prometheus exposition through prometheus_client.

The exposition is parsed back with ``prometheus_client.parser`` and, where
``promtool`` is on PATH (Debian's ``prometheus`` package), checked by it.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import attrs
import pytest

import connpark
from connpark._stats import LATENCY_BUCKETS, LatencyBuckets

from ._procs import CONNPARK, ServeProcess, tcp_pairs
from .test_stats_cli import SAMPLE

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from connpark._metrics import StatsCollector  # noqa: E402

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> tuple[Samples, dict[str, str]]:
    """(sample name, sorted labels) -> value, and family name -> type."""
    values: Samples = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values, types


def check_with_promtool(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_collector_names_types_and_values() -> None:
    buckets = LatencyBuckets()
    buckets.observe([0.0002, 0.0003, 0.004, 9.0])
    stats = attrs.evolve(SAMPLE, wake_latency_histogram=buckets.snapshot())
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(lambda: [("0", stats), ("1", SAMPLE)]))
    text = prometheus_client.generate_latest(registry).decode()
    values, types = samples(text)
    assert types["connpark_parked"] == "gauge"
    assert types["connpark_wakes"] == "counter"
    assert types["connpark_wake_latency_seconds"] == "histogram"
    assert values[("connpark_parked", (("shard", "0"),))] == 1234
    assert values[("connpark_fd_budget", (("shard", "1"),))] == 19690
    assert values[("connpark_parks_total", (("shard", "0"),))] == 1250
    assert values[("connpark_wakes_total", (("reason", "READABLE"), ("shard", "0")))] == 10
    assert values[("connpark_wakes_total", (("reason", "HANGUP"), ("shard", "0")))] == 0
    assert values[("connpark_refusals_total", (("code", "not-a-tcp-stream"), ("shard", "0")))] == 4
    assert values[("connpark_refusals_total", (("code", "out-of-fds"), ("shard", "0")))] == 0
    assert values[("connpark_pool_sessions", (("pool", "web"), ("shard", "0")))] == 2

    def bucket(le: str, shard: str = "0") -> float:
        return values[("connpark_wake_latency_seconds_bucket", (("le", le), ("shard", shard)))]

    assert bucket("0.0001") == 0
    assert bucket("0.00025") == 1
    assert bucket("0.0005") == 2
    assert bucket("0.005") == 3
    assert bucket("2.5") == 3
    assert bucket("+Inf") == 4
    assert bucket("+Inf", "1") == 0
    assert values[("connpark_wake_latency_seconds_count", (("shard", "0"),))] == 4
    assert values[("connpark_wake_latency_seconds_sum", (("shard", "0"),))] == pytest.approx(9.0045)
    assert len([k for k in values if k[0] == "connpark_wake_latency_seconds_bucket"]) == 2 * (
        len(LATENCY_BUCKETS) + 1
    )
    check_with_promtool(text)


def _metrics_url(serve: ServeProcess) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = re.search(r"metrics on (http://\S+/metrics)", serve.log_text())
        if found:
            return found.group(1)
        time.sleep(0.02)
    raise AssertionError(serve.log_text())


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


@pytest.mark.linux
@pytest.mark.parametrize("flags", [[], ["--crash-recovery"]], ids=["plain", "crash-recovery"])
def test_scrape_after_parks_and_wakes(sockdir: Path, flags: list[str]) -> None:
    serve = ServeProcess(sockdir / "cp.sock", ["--metrics", "127.0.0.1:0", *flags])
    clients, servers = tcp_pairs(3)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        url = _metrics_url(serve)
        with connpark.BlockingParking(str(serve.path), pool="web", reconnect=False) as parking:
            tickets = [parking.park(s, token=b"t%d" % i) for i, s in enumerate(servers)]
            with pytest.raises(connpark.ParkRefused):
                parking.park(udp)
            clients[0].sendall(b"x")
            parking.unpark(tickets[1])
            woken = [parking.next_wake(timeout=10) for _ in range(2)]
            reasons = sorted(w.reason.name for w in woken if w is not None)
            assert reasons == ["READABLE", "REQUESTED"]
            for w in woken:
                assert w is not None
                assert w.socket is not None
                w.socket.close()
            deadline = time.monotonic() + 10
            while serve.stats().acks_total < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            text = _scrape(url)
            values, types = samples(text)
            shard = (("shard", "0"),)
            assert values[("connpark_parked", shard)] == 1
            assert values[("connpark_parks_total", shard)] == 3
            assert values[("connpark_acks_total", shard)] == 2
            assert values[("connpark_unacked", shard)] == 0
            assert values[("connpark_fds_held", shard)] == 1
            assert values[("connpark_fd_budget", shard)] > 1000
            # the worker's session, and the _stats session that asked for acks_total
            assert values[("connpark_sessions", shard)] >= 1
            assert values[("connpark_pool_sessions", (("pool", "web"), *shard))] == 1
            wakes = {
                dict(k[1])["reason"]: v for k, v in values.items() if k[0] == "connpark_wakes_total"
            }
            assert wakes == {
                "READABLE": 1,
                "HANGUP": 0,
                "TIMEOUT": 0,
                "REQUESTED": 1,
                "SHUTDOWN": 0,
                "UNSENT": 0,
            }
            refused = (("code", "not-a-tcp-stream"), *shard)
            assert values[("connpark_refusals_total", refused)] == 1
            assert values[("connpark_wake_latency_seconds_count", shard)] == 2
            inf = (("le", "+Inf"), *shard)
            assert values[("connpark_wake_latency_seconds_bucket", inf)] == 2
            assert 0 < values[("connpark_wake_latency_seconds_sum", shard)] < 2
            assert values[("process_open_fds", ())] > 0  # the process collector
            assert types["connpark_wake_latency_seconds"] == "histogram"
            check_with_promtool(text)
    finally:
        assert serve.stop() == 0
        for s in [udp, *clients, *servers]:
            s.close()


@pytest.mark.linux
def test_scrape_labels_every_shard(sockdir: Path) -> None:
    serve = ServeProcess(sockdir / "cp.sock", ["--metrics", "127.0.0.1:0", "--shards", "2"])
    clients, servers = tcp_pairs(4)
    try:
        url = _metrics_url(serve)
        with connpark.BlockingParking(str(serve.path), pool="web", reconnect=False) as parking:
            for s in servers:
                parking.park(s)
            values, _ = samples(_scrape(url))
            parked = {
                dict(k[1])["shard"]: v for k, v in values.items() if k[0] == "connpark_parked"
            }
            assert parked == {"0": 2, "1": 2}  # spread over both, each labelled
            budgets = [v for k, v in values.items() if k[0] == "connpark_fd_budget"]
            assert len(budgets) == 2
            check_with_promtool(_scrape(url))
    finally:
        assert serve.stop() == 0
        for s in [*clients, *servers]:
            s.close()


def test_metrics_without_prometheus_client_is_one_line(sockdir: Path) -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from connpark._cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))"
    )
    path = sockdir / "cp.sock"
    out = subprocess.run(
        [sys.executable, "-c", code, "serve", "--socket", str(path), "--metrics", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert out.stderr == (
        "connpark serve: error: --metrics needs prometheus_client: "
        "pip install 'connpark[metrics]'\n"
    )
    assert not path.exists()


def test_metrics_port_taken_is_one_line(sockdir: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    path = sockdir / "cp.sock"
    try:
        out = subprocess.run(
            [*CONNPARK, "serve", "--socket", str(path), "--metrics", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        taken.close()
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"connpark serve: error: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    ]
    assert not path.exists()


@pytest.mark.parametrize("bad", ["9100", "host:", "host:99999", "::1:9100"])
def test_metrics_flag_wants_host_port(bad: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "connpark", "serve", "--metrics", bad],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1
    assert "--metrics" in out.stderr
