"""Metrics and health endpoints against a real PostgreSQL and broker: values move during a workload,
agree with what is on Kafka and in pg_replication_slots, and /readyz follows a stopped broker."""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Tuple

import pytest
from confluent_kafka import Producer as KafkaProducer

from pgrepl import Consumer, ReplicationOp
from pgrepl.producer import Producer
from tests.http_helpers import http_get
from tests.integration.helpers import Workload, current_wal_lsn, make_source, read_topic, running, slot_state, wait_for

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of /metrics by (name, sorted labels)."""
    status, body = http_get(port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> Optional[float]:
    """The sample whose labels include ``labels`` (None if absent)."""
    for (sample, have), v in samples.items():
        if sample == name and set(labels.items()) <= set(have):
            return v
    return None


def wait_ready(port: int, ready: bool, timeout: float = 45.0) -> str:
    """Wait until /readyz says ``ready``; returns its body."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = http_get(port, "/readyz")
        if (status == 200) == ready:
            return body
        assert time.monotonic() < deadline, f"/readyz still {status} {body!r} after {timeout:.0f} s"
        time.sleep(0.5)


def test_producer_metrics_follow_a_workload_and_readyz_a_stopped_broker(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, local_broker, drop_replication_slot) -> None:
    if local_broker is None:
        pytest.skip("pausing the broker needs the local broker")
    p = name_prefix
    make_source(pg_dsn, p)
    topic = f"{p}topic"
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {f"{p}src": {"name": topic, "partition_key": ["grp"]}},
                        metrics_port=0, metrics_host="127.0.0.1", history_topic=f"{p}history",
                        snapshot="never")  # the counts below compare with the workload's changes alone
    try:
        with running(producer):
            wait_for(lambda: producer.metrics is not None, what="the metrics endpoint")
            assert producer.metrics is not None
            port = producer.metrics.port
            assert http_get(port, "/healthz") == (200, "ok\n")
            wait_ready(port, True)
            workload = Workload(pg_dsn, p, max_ops=3000, pause=0.005)
            workload.start()
            wait_for(lambda: (value(scrape(port), "pgrepl_producer_rows_total") or 0) > 0, what="rows to be counted")
            first = value(scrape(port), "pgrepl_producer_acked_rows_total") or 0
            workload.finish()
            end = current_wal_lsn(pg_dsn)
            wait_for(lambda: (slot_state(pg_dsn, f"{p}slot")[0] or 0) >= end, what="the slot to confirm the workload")
            time.sleep(6)  # one more exporter tick: the slot query sees the confirmed position
            samples = scrape(port)
            records = read_topic(kafka_bootstrap, topic)
            assert value(samples, "pgrepl_producer_rows_total", slot=f"{p}slot") == len(records) == workload.ops
            assert value(samples, "pgrepl_producer_acked_rows_total") == len(records) > first
            assert value(samples, "pgrepl_producer_acked_bytes_total") == sum(len(v) for *_, v in records)
            assert value(samples, "pgrepl_producer_delivery_latency_seconds_count") == workload.transactions
            assert 0 < (value(samples, "pgrepl_producer_delivery_latency_seconds_sum") or 0) < 60 * workload.transactions
            assert value(samples, "pgrepl_producer_role", role="active") == 1
            assert value(samples, "pgrepl_producer_sessions_total") == 1
            confirmed, active_pid = slot_state(pg_dsn, f"{p}slot")
            assert active_pid is not None and value(samples, "pgrepl_slot_active") == 1
            assert value(samples, "pgrepl_slot_confirmed_lsn") is not None
            assert end <= (value(samples, "pgrepl_slot_confirmed_lsn") or 0) <= (confirmed or 0)
            assert (value(samples, "pgrepl_producer_confirmed_lsn") or 0) >= end
            assert (value(samples, "pgrepl_slot_retained_wal_bytes") or 0) > 0
            assert value(samples, "pgrepl_slot_wal_status", wal_status="reserved") == 1
            assert value(samples, "pgrepl_kafka_reachable") == 1 and value(samples, "pgrepl_ready") == 1

            local_broker.pause()
            try:
                body = wait_ready(port, False)
                assert "Kafka" in body
                assert value(scrape(port), "pgrepl_kafka_reachable") == 0  # /metrics still answers
            finally:
                local_broker.resume()
            wait_ready(port, True)
    finally:
        drop_replication_slot(f"{p}slot")


def test_consumer_metrics_count_ops_and_lag_and_readyz_a_stopped_broker(
        kafka_bootstrap: str, name_prefix: str, local_broker) -> None:
    if local_broker is None:
        pytest.skip("pausing the broker needs the local broker")
    topic = f"{name_prefix}ops"
    kafka = KafkaProducer({"bootstrap.servers": kafka_bootstrap})
    values: List[bytes] = []
    for i in range(500):
        op = ReplicationOp.from_json(b'{"table_name":"t","col_names":["id"],"lsn":%d,"seq_id":0,"op":{"Insert":["%d"]}}'
                                     % (1000 + i, i))
        values.append(op.to_json())
        kafka.produce(topic, values[-1], str(i % 7).encode())
    assert kafka.flush(30) == 0
    handled: List[ReplicationOp] = []
    consumer = Consumer(f"{name_prefix}group", topic, kafka_bootstrap, {"session.timeout.ms": 6000},
                        metrics_port=0, metrics_host="127.0.0.1", handle_signals=False)
    thread = threading.Thread(target=consumer.start_basic, args=(handled.append,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: consumer.metrics is not None, what="the metrics endpoint")
        assert consumer.metrics is not None
        port = consumer.metrics.port
        wait_for(lambda: len(handled) == 500, timeout=60, what="500 handled ops")
        wait_ready(port, True)
        wait_for(lambda: sum(v for (n, _), v in scrape(port).items() if n == "pgrepl_consumer_lag") == 0
                 and any(n == "pgrepl_consumer_lag" for n, _ in scrape(port)), timeout=20, what="lag 0")
        samples = scrape(port)
        assert value(samples, "pgrepl_consumer_ops_total", outcome="handled", group=f"{name_prefix}group") == 500
        assert value(samples, "pgrepl_consumer_records_total") == 500
        assert value(samples, "pgrepl_consumer_bytes_total") == sum(map(len, values))
        assert value(samples, "pgrepl_consumer_ops_total", outcome="dead_lettered") == 0
        assert value(samples, "pgrepl_consumer_failed_attempts_total") == 0
        assert value(samples, "pgrepl_consumer_assigned_partitions") == len(consumer.assignment) > 0

        for i in range(50):  # more records: the lag moves with them once fetched
            kafka.produce(topic, values[i], b"0")
        kafka.flush(30)
        wait_for(lambda: len(handled) == 550, timeout=30, what="550 handled ops")
        wait_for(lambda: value(scrape(port), "pgrepl_consumer_ops_total", outcome="handled") == 550, timeout=10,
                 what="550 counted")

        local_broker.pause()
        try:
            assert "Kafka" in wait_ready(port, False)
        finally:
            local_broker.resume()
        wait_ready(port, True)
    finally:
        consumer.stop()
        thread.join(60)
    assert not thread.is_alive()
