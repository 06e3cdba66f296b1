"""The metrics pieces without services: the HTTP endpoint, the latency histogram, the delivery hook."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, List, Sequence, Tuple

import pytest

from pgrepl.metrics.latency import POSTGRES_EPOCH, LatencyHistogram
from pgrepl.producer.delivery import DeliveryTracker
from tests.http_helpers import http_get

prometheus_client = pytest.importorskip("prometheus_client")


def test_endpoint_serves_metrics_health_and_readiness() -> None:
    from prometheus_client import CollectorRegistry, Counter

    from pgrepl.metrics.server import MetricsServer

    registry = CollectorRegistry()
    Counter("pgrepl_test_things", "things", registry=registry).inc(3)
    state = {"ready": (False, "starting")}
    server = MetricsServer(registry, lambda: state["ready"], "127.0.0.1", 0)
    server.start()
    try:
        assert http_get(server.port, "/healthz") == (200, "ok\n")
        assert http_get(server.port, "/readyz") == (503, "not ready: starting\n")
        state["ready"] = (True, "active: streaming")
        assert http_get(server.port, "/readyz") == (200, "ready: active: streaming\n")
        status, body = http_get(server.port, "/metrics")
        assert status == 200 and "pgrepl_test_things_total 3.0" in body
        assert http_get(server.port, "/nope")[0] == 404
    finally:
        server.close()


def test_a_port_in_use_is_a_config_error() -> None:
    from prometheus_client import CollectorRegistry

    from pgrepl import ConfigError
    from pgrepl.metrics.server import MetricsServer

    first = MetricsServer(CollectorRegistry(), lambda: (True, ""), "127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match="cannot serve metrics on 127.0.0.1"):
            MetricsServer(CollectorRegistry(), lambda: (True, ""), "127.0.0.1", first.port)
    finally:
        first.close()


def test_latency_histogram_counts_each_commit() -> None:
    now = time.time()
    commit = lambda seconds_ago: SimpleNamespace(commit_time=int((now - seconds_ago - POSTGRES_EPOCH) * 1e6))  # noqa: E731
    histogram = LatencyHistogram(buckets=(0.01, 0.1, 1.0))
    histogram.observe_commits([commit(0.005), commit(0.05), commit(0.5), commit(5), commit(-1)], now=now)
    assert list(histogram.buckets()) == [["0.01", 2], ["0.1", 3], ["1.0", 4], ["+Inf", 5]]
    assert histogram.sum == pytest.approx(5.555, abs=0.01)


class _Observer:
    def __init__(self) -> None:
        self.tracker: Any = None
        self.seen: List[Tuple[int, int, int]] = []

    def attach(self, tracker: DeliveryTracker) -> None:
        self.tracker = tracker

    def delivered(self, records: int, nbytes: int, commits: Sequence[Any]) -> None:
        self.seen.append((records, nbytes, len(commits)))


def test_delivery_tracker_reports_acknowledged_batches_to_its_observer() -> None:
    observer = _Observer()
    tracker = DeliveryTracker(100, observer)
    assert observer.tracker is tracker
    batch = SimpleNamespace(values=[b"ab", b"cde", b"f"], commits=[SimpleNamespace(commit_time=0)] * 2)
    pending = tracker.track(2, 200, batch)
    assert pending is not None and tracker.oldest_unacknowledged() >= 0
    pending.on_delivery(None, None)
    assert observer.seen == []
    pending.on_delivery(None, None)
    assert observer.seen == [(3, 6, 2)] and tracker.confirmable() == 200
    cut = tracker.track(2, 300, batch)
    assert cut is not None
    cut.abandon(1)  # cut short: not reported as delivered
    cut.on_delivery(None, None)
    assert observer.seen == [(3, 6, 2)]


def test_slot_watch_warns_on_retained_wal_and_low_safe_wal_size(caplog: pytest.LogCaptureFixture) -> None:
    from pgrepl.metrics.watch import SlotFacts, SlotWatch
    from pgrepl.postgres.slot import SlotInfo

    watch = SlotWatch("dbname=x", "s1", wal_warning_bytes=1000, safe_wal_warning_bytes=500)
    slot = SlotInfo("s1", "pgoutput", "logical", "db", None, 10, restart_lsn=5, wal_status="reserved")
    with caplog.at_level("INFO", logger="pgrepl.metrics"):
        watch._judge(SlotFacts(slot, 100, False, 95, 90, None, 1.0))
        assert watch.warning is None
        watch._judge(SlotFacts(slot, 5000, False, 4995, 4990, None, 2.0))
        assert watch.warning is not None and "retains 4995 bytes of WAL" in watch.warning
        watch._judge(SlotFacts(slot, 5001, False, 4996, 4991, None, 3.0))  # the same warning: not logged again
        low = SlotInfo("s1", "pgoutput", "logical", "db", None, 10, restart_lsn=5, wal_status="unreserved",
                       safe_wal_size=100)
        watch._judge(SlotFacts(low, 100, False, 95, 90, None, 4.0))
        assert watch.warning is not None and "100 bytes of WAL away from being invalidated" in watch.warning
        watch._judge(SlotFacts(slot, 100, False, 95, 90, None, 5.0))
        assert watch.warning is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "back under the warning thresholds" in caplog.records[-1].getMessage()
