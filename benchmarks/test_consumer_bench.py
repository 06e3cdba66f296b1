"""Consumer throughput: basic (no-op handler), idempotent batch and idempotent per-op into PostgreSQL.

A topic (4 partitions) is filled once with ``PGREPL_BENCH_OPS`` ReplicationOps (default
200,000; the issue's figure is 1,000,000), produced directly with confluent-kafka: the
7-column ``inventory`` row as inserts. Each benchmark consumes it with a fresh consumer
group. Rates are measured from the first op handled to the last, so the group join (a few
seconds on tansu, see ``pgrepl.consumer``) is not counted; the total is reported too.

* basic: ``start_basic`` with a no-op handler (progress is watched from another thread), all ops.
* idempotent batch: ``start_idempotent_batch``, ``batch_size`` 2,000, all ops, writing the rows
  into a sink table with ``COPY`` (the fast way to load rows) and, separately, with
  ``execute_values`` (the common idiom).
* idempotent per-op: ``start_idempotent`` (one sink transaction per op, one INSERT), on the
  first ``PGREPL_BENCH_PEROP_OPS`` ops (default N/20, at least 2,000).

The services are the sandbox's (tansu + a local PostgreSQL with fsync off) unless
``PGREPL_TEST_KAFKA`` / ``PGREPL_TEST_PG_DSN`` name real ones. No timing is asserted; the last
test prints ops/s and the batch/per-op ratio measured in the same run.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List

import psycopg2
import psycopg2.extras
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from pgrepl.consumer import Consumer
from pgrepl.model import Op, ReplicationOp
from pgrepl.sink import copy_rows

N_OPS = int(os.environ.get("PGREPL_BENCH_OPS", "200000"))
N_PEROP = int(os.environ.get("PGREPL_BENCH_PEROP_OPS", str(max(2000, N_OPS // 20))))
PARTITIONS = 4
COLUMNS = ["id", "organization_id", "name", "sku", "quantity", "price", "updated_at"]
KAFKA = {"session.timeout.ms": 6000}

RESULTS: Dict[str, float] = {}


@pytest.fixture(scope="module")
def services() -> Iterator[Dict[str, str]]:
    """Kafka bootstrap and PostgreSQL DSN: the environment's, or throwaway sandbox servers."""
    from pgrepl.testing import LocalBroker, LocalPostgres

    started: List[Any] = []
    try:
        bootstrap = os.environ.get("PGREPL_TEST_KAFKA")
        if not bootstrap:
            broker = LocalBroker().start()
            started.append(broker)
            bootstrap = broker.bootstrap
        dsn = os.environ.get("PGREPL_TEST_PG_DSN")
        if not dsn:
            pg = LocalPostgres().start()
            started.append(pg)
            dsn = pg.dsn
        yield {"bootstrap": bootstrap, "dsn": dsn}
    finally:
        for service in reversed(started):
            service.stop()


def make_op(i: int) -> ReplicationOp:
    row = [str(i), f"8f14e45f-ceea-467f-a0e6-{i % 1000:012d}", f"widget {i}", f"SKU-{i:08d}",
           str(i % 500), f"{(i % 10000) / 100:.2f}", "2024-05-01 12:00:00+00"]
    return ReplicationOp("inventory", COLUMNS, 0x1000000 + i // 8, i % 8, Op.insert(row))


@pytest.fixture(scope="module")
def topic(services: Dict[str, str]) -> Iterator[str]:
    """A topic holding N_OPS ops (deleted afterwards)."""
    name = f"pgrepl_bench_{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": services["bootstrap"]})
    for future in admin.create_topics([NewTopic(name, PARTITIONS, 1)]).values():
        future.result(30)
    producer = Producer({"bootstrap.servers": services["bootstrap"], "linger.ms": 20, "compression.type": "lz4",
                         "queue.buffering.max.messages": 500_000, "enable.idempotence": True})
    started = time.perf_counter()
    for i in range(N_OPS):
        op = make_op(i)
        while True:
            try:
                producer.produce(name, op.to_json(), op.op.new[1].encode())  # type: ignore[index]
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(120) == 0
    print(f"\nfilled {name} with {N_OPS} ops in {time.perf_counter() - started:.1f} s")
    yield name
    try:
        for future in admin.delete_topics([name], operation_timeout=30).values():
            future.result(30)
    except Exception as exc:  # best effort
        logging.getLogger(__name__).warning("could not delete %s: %s", name, exc)


class Meter:
    """Counts handled ops, stops the consumer at ``target``, times first op to last."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.consumer: Any = None

    def add(self, n: int) -> None:
        if self.count == 0:
            self.first = time.perf_counter()
        self.count += n
        if self.count >= self.target:
            self.last = time.perf_counter()
            self.consumer.stop()

    @property
    def rate(self) -> float:
        return self.count / max(self.last - self.first, 1e-9)


class Watcher(threading.Thread):
    """Polls a consumer's stats every 2 ms: times first handled op to ``target`` without touching the handler."""

    def __init__(self, consumer: Consumer, target: int) -> None:
        super().__init__(daemon=True)
        self.consumer, self.target = consumer, target
        self.first = self.last = 0.0
        self.count = self.first_count = 0

    def run(self) -> None:
        stats = self.consumer.stats
        while not self.consumer.stopping:
            handled = stats.handled
            now = time.perf_counter()
            if handled and not self.first:
                self.first, self.first_count = now, handled  # count from the first look that saw progress
            if handled >= self.target:
                self.last, self.count = now, handled
                self.consumer.stop()
                return
            time.sleep(0.002)

    @property
    def rate(self) -> float:
        return (self.count - self.first_count) / max(self.last - self.first, 1e-9)


def consume(services: Dict[str, str], topic: str, target: int, start: Callable[[Consumer, Meter], None],
            **kwargs: Any) -> Meter:
    meter = Meter(target)
    consumer = Consumer(f"bench-{uuid.uuid4().hex[:8]}", [topic], services["bootstrap"], KAFKA,
                        handle_signals=False, status_interval=3600, **kwargs)
    meter.consumer = consumer
    started = time.perf_counter()
    start(consumer, meter)
    print(f"\n{target} ops: {meter.rate:,.0f} ops/s (first op to last; {time.perf_counter() - started:.1f} s "
          f"with the group join); stats {consumer.stats}")
    return meter


def sink_table(dsn: str, name: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {name}")
        cur.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, organization_id uuid NOT NULL, name text, "
                    "sku text, quantity int, price numeric(10,2), updated_at timestamptz)")
    conn.close()


def count_rows(dsn: str, name: str) -> int:
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {name}")
        count = cur.fetchone()[0]
    conn.close()
    return count


def noop(op: ReplicationOp) -> None:
    """The no-op handler."""


@pytest.mark.benchmark(group="consumer")
def test_basic_noop(benchmark: Any, services: Dict[str, str], topic: str) -> None:
    def run() -> Watcher:
        consumer = Consumer(f"bench-{uuid.uuid4().hex[:8]}", [topic], services["bootstrap"], KAFKA,
                            handle_signals=False, status_interval=3600)
        watcher = Watcher(consumer, N_OPS)
        watcher.start()
        started = time.perf_counter()
        consumer.start_basic(noop)
        print(f"\nbasic, {N_OPS} ops: {watcher.rate:,.0f} ops/s (first op to last; {time.perf_counter() - started:.1f} s "
              f"with the group join); stats {consumer.stats}")
        return watcher

    watcher = benchmark.pedantic(run, rounds=1, iterations=1)
    assert watcher.count == N_OPS
    RESULTS["basic"] = watcher.rate
    benchmark.extra_info["ops_per_second"] = round(watcher.rate)


@pytest.mark.benchmark(group="consumer")
def test_idempotent_batch(benchmark: Any, services: Dict[str, str], topic: str) -> None:
    dsn = services["dsn"]
    sink_table(dsn, "bench_sink_batch")

    def start(consumer: Consumer, meter: Meter) -> None:
        def handle(cur: Any, ops: List[ReplicationOp]) -> None:
            cur.copy_expert("COPY bench_sink_batch FROM STDIN", io.BytesIO(copy_rows(ops)), size=1 << 20)
            meter.add(len(ops))

        consumer.start_idempotent_batch(handle, dsn)

    meter = benchmark.pedantic(lambda: consume(services, topic, N_OPS, start, batch_size=2000,
                                               state_table="bench_state"), rounds=1, iterations=1)
    assert meter.count == N_OPS
    assert count_rows(dsn, "bench_sink_batch") == N_OPS
    RESULTS["idempotent_batch"] = meter.rate
    benchmark.extra_info["ops_per_second"] = round(meter.rate)


@pytest.mark.benchmark(group="consumer")
def test_idempotent_batch_execute_values(benchmark: Any, services: Dict[str, str], topic: str) -> None:
    dsn = services["dsn"]
    sink_table(dsn, "bench_sink_values")
    insert = "INSERT INTO bench_sink_values VALUES %s"

    def start(consumer: Consumer, meter: Meter) -> None:
        def handle(cur: Any, ops: List[ReplicationOp]) -> None:
            psycopg2.extras.execute_values(cur, insert, [op.op.new for op in ops], page_size=len(ops))
            meter.add(len(ops))

        consumer.start_idempotent_batch(handle, dsn)

    meter = benchmark.pedantic(lambda: consume(services, topic, N_OPS, start, batch_size=2000,
                                               state_table="bench_state"), rounds=1, iterations=1)
    assert meter.count == N_OPS
    assert count_rows(dsn, "bench_sink_values") == N_OPS
    RESULTS["idempotent_batch_execute_values"] = meter.rate
    benchmark.extra_info["ops_per_second"] = round(meter.rate)


@pytest.mark.benchmark(group="consumer")
def test_idempotent_per_op(benchmark: Any, services: Dict[str, str], topic: str) -> None:
    dsn = services["dsn"]
    sink_table(dsn, "bench_sink_perop")
    target = min(N_PEROP, N_OPS)
    insert = "INSERT INTO bench_sink_perop VALUES (%s, %s, %s, %s, %s, %s, %s)"

    def start(consumer: Consumer, meter: Meter) -> None:
        def handle(cur: Any, op: ReplicationOp) -> None:
            cur.execute(insert, op.op.new)
            meter.add(1)

        consumer.start_idempotent(handle, dsn)

    meter = benchmark.pedantic(lambda: consume(services, topic, target, start, state_table="bench_state"),
                               rounds=1, iterations=1)
    assert meter.count >= target
    RESULTS["idempotent_per_op"] = meter.rate
    benchmark.extra_info["ops_per_second"] = round(meter.rate)


def test_report() -> None:
    """Print the rates and the batch / per-op ratio measured above (no assertion on speed)."""
    if not {"basic", "idempotent_batch", "idempotent_per_op"} <= set(RESULTS):
        pytest.skip("run the whole module to get the report")
    ratio = RESULTS["idempotent_batch"] / RESULTS["idempotent_per_op"]
    values = RESULTS.get("idempotent_batch_execute_values")
    print(f"\nconsumer, {N_OPS} ops: basic no-op {RESULTS['basic']:,.0f} ops/s (target >= 300,000); "
          f"idempotent batch (COPY) {RESULTS['idempotent_batch']:,.0f} ops/s (target >= 50,000); "
          + (f"idempotent batch (execute_values) {values:,.0f} ops/s; " if values else "")
          + f"idempotent per-op {RESULTS['idempotent_per_op']:,.0f} ops/s ({min(N_PEROP, N_OPS)} ops); "
          f"batch / per-op = {ratio:.1f}x (target >= 20x)"
          + (f", execute_values batch / per-op = {values / RESULTS['idempotent_per_op']:.1f}x" if values else ""))
