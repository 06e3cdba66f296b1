"""Consumer without a broker: the fast record parser, configuration checks, and the per-partition
failure handling (retry, stop, dead letter, batch isolation) driven through a fake Kafka consumer."""

from __future__ import annotations

import concurrent.futures
import random
import threading
from typing import Any, Dict, List, Optional, Tuple

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from pgrepl import ConfigError, MalformedRecordError, Op, ReplicationOp
from pgrepl import Consumer, HandlerError
from pgrepl.consumer.consumer import DEFAULT_KAFKA_CONFIG, _Fatal
from pgrepl.sink.postgres import parse_table_name as parse_state_table

parse_record = ReplicationOp.from_json

VALID = [
    b'{"table_name":"inventory","col_names":["id","organization_id"],"lsn":23456789,"seq_id":0,"op":{"Insert":["1","8f14e45f"]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":23456790,"seq_id":1,"op":{"Update":[["old"],["new"]]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":23456790,"seq_id":2,"op":{"Delete":[null]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":18446744073709551615,"seq_id":2,"op":{"Delete":["\\u0001\\"\\\\\xc3\xa9"]}}',
    b'{"table_name":"t","col_names":[],"lsn":1,"seq_id":0,"op":{"Insert":[]}}',
    b'{"table_name":"t","col_names":["a","b"],"lsn":1,"seq_id":0,"op":{"Update":[[null,"x"],["y",null]]}}',
    # other key order: accepted by from_json, so by parse_record too
    b'{"op":{"Insert":["1"]},"seq_id":3,"lsn":7,"col_names":["a"],"table_name":"t"}',
]

MALFORMED = [
    b"not json", b"[1]", b"1", b'"x"', b"null", b"{}", b'{"table_name":"t"}',
    b'{"table_name":1,"col_names":[],"lsn":1,"seq_id":0,"op":{"Insert":[]}}',
    b'{"table_name":["t"],"col_names":[],"lsn":1,"seq_id":0,"op":{"Insert":[]}}',
    b'{"table_name":"t","col_names":[1],"lsn":1,"seq_id":0,"op":{"Insert":[null]}}',
    b'{"table_name":"t","col_names":"a","lsn":1,"seq_id":0,"op":{"Insert":["x"]}}',
    b'{"table_name":"t","col_names":[],"lsn":-1,"seq_id":0,"op":{"Insert":[]}}',
    b'{"table_name":"t","col_names":[],"lsn":true,"seq_id":0,"op":{"Insert":[]}}',
    b'{"table_name":"t","col_names":[],"lsn":1,"seq_id":1.5,"op":{"Insert":[]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Upsert":["x"]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":["x"],"Delete":["x"]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":["Insert"]}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":"I"}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":["x","y"]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":[1]}}',
    b'{"table_name":"t","col_names":["a","b"],"lsn":1,"seq_id":0,"op":{"Insert":[null,2]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":"x"}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Update":[["x"]]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Update":[["x"],[2]]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Update":[["x"],"y"]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Delete":[["x"]]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":["x"]},"extra":1}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":["\xff"]}}',
]


def test_parse_record_equals_from_json_on_valid_records() -> None:
    for raw in VALID:
        fast, slow = parse_record(raw), ReplicationOp.from_json(raw)
        assert fast == slow
        assert type(fast) is ReplicationOp and type(fast.op) is Op
        assert type(fast.col_names) is tuple and all(type(r) is tuple for r in (fast.op.old, fast.op.new) if r is not None)
        assert fast.to_json() == slow.to_json()
        assert parse_record(raw) == fast  # column cache hit gives the same


def test_parse_record_sets_every_slot() -> None:
    # parse_record builds objects without __init__: if ops.py grows a field, this must fail
    assert ReplicationOp.__slots__ == ("table_name", "col_names", "lsn", "seq_id", "op")
    assert Op.__slots__ == ("kind", "old", "new")
    op = parse_record(VALID[1])
    assert [getattr(op, s) for s in ReplicationOp.__slots__] and [getattr(op.op, s) for s in Op.__slots__]


@pytest.mark.parametrize("raw", MALFORMED)
def test_parse_record_rejects_like_from_json(raw: bytes) -> None:
    with pytest.raises(MalformedRecordError) as slow:
        ReplicationOp.from_json(raw)
    with pytest.raises(MalformedRecordError) as fast:
        parse_record(raw)
    assert str(fast.value) == str(slow.value)


def test_parse_record_rejects_tombstones() -> None:
    with pytest.raises(MalformedRecordError, match="tombstone"):
        parse_record(None)


values = st.one_of(st.none(), st.text(max_size=8), st.integers(-5, 5), st.booleans(), st.lists(st.none(), max_size=1))


@settings(max_examples=300, deadline=None)
@given(cols=st.lists(st.one_of(st.text(max_size=5), st.integers(0, 9)), max_size=4), lsn=st.one_of(st.integers(-2, 2**64 - 1), st.text(max_size=2)),
       seq=st.integers(-1, 10), kind=st.sampled_from(["Insert", "Update", "Delete", "Truncate"]),
       table=st.sampled_from(["t", "u", 5, ["t"]]),
       rows=st.lists(st.lists(values, max_size=4), min_size=1, max_size=3), shape=st.integers(0, 3))
def test_parse_record_matches_from_json_on_random_documents(cols: Any, lsn: Any, seq: int, kind: str, table: Any,
                                                            rows: Any, shape: int) -> None:
    payload: Any = rows[0] if kind != "Update" else rows[:2]
    if shape == 1:
        payload = rows
    doc: Dict[str, Any] = {"table_name": table, "col_names": cols, "lsn": lsn, "seq_id": seq, "op": {kind: payload}}
    if shape == 2:
        doc["op"]["Delete"] = rows[0]
    if shape == 3:
        doc = dict(reversed(list(doc.items())))
    raw = orjson.dumps(doc)
    try:
        expected: Any = ReplicationOp.from_json(raw)
    except MalformedRecordError as exc:
        expected = str(exc)
    try:
        got: Any = parse_record(raw)
    except MalformedRecordError as exc:
        got = str(exc)
    assert got == expected


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------


def test_state_table_names() -> None:
    assert parse_state_table("pgrepl_state") == ("pgrepl_state",)
    assert parse_state_table("sink.state") == ("sink", "state")
    assert parse_state_table('"My.Schema"."st""ate"') == ("My.Schema", 'st"ate')
    for bad in ("", "a.b.c", '"open', "a.", ".b"):
        with pytest.raises(ConfigError):
            parse_state_table(bad)


def test_kafka_settings() -> None:
    c = Consumer("g", "a, b", "host:9092", {"session.timeout.ms": 6000, "security.protocol": "SSL"})
    assert c.topics == ["a", "b"]
    cfg = c.kafka_config
    assert cfg["group.id"] == "g" and cfg["bootstrap.servers"] == "host:9092"
    assert cfg["enable.auto.offset.store"] is False and cfg["enable.auto.commit"] is True
    assert cfg["session.timeout.ms"] == 6000 and cfg["auto.offset.reset"] == "earliest"
    assert cfg["fetch.queue.backoff.ms"] == DEFAULT_KAFKA_CONFIG["fetch.queue.backoff.ms"]
    assert "enable.partition.eof" not in cfg
    assert Consumer("g", ["a"], "h:1", commit_offsets=False, stop_at_eof=True).kafka_config["enable.partition.eof"] is True
    assert Consumer("g", ["a"], "h:1", commit_offsets=False).kafka_config["enable.auto.commit"] is False


@pytest.mark.parametrize("kwargs, fragment", [
    ({"kafka_config": {"enable.auto.offset.store": True}}, "enable.auto.offset.store"),
    ({"kafka_config": {"enable.auto.commit": False}}, "commit_offsets"),
    ({"kafka_config": {"group.id": "other"}}, "conflicts"),
    ({"on_error": "skip"}, "on_error"),
    ({"on_error": "dead_letter"}, "dead_letter_topic"),
    ({"on_error": "dead_letter", "dead_letter_topic": "t"}, "must not be one of the consumed"),
    ({"batch_size": 0}, "batch_size"),
    ({"workers": 0}, "workers"),
    ({"max_backoff": 0.1, "retry_backoff": 1.0}, "max_backoff"),
    ({"state_table": "a.b.c"}, "state_table"),
])
def test_bad_configuration_is_a_config_error(kwargs: Dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Consumer("g", ["t"], "h:1", **kwargs)


def test_bad_identity_arguments() -> None:
    for args in (("", ["t"], "h:1"), ("g", [], "h:1"), ("g", ["t"], " ")):
        with pytest.raises(ConfigError):
            Consumer(*args)


# ------------------------------------------------------------------------------------------
# Failure handling through a fake Kafka consumer
# ------------------------------------------------------------------------------------------


class FakeMsg:
    def __init__(self, topic: str, partition: int, offset: int, value: Optional[bytes],
                 error: Optional[KafkaError] = None) -> None:
        self._t, self._p, self._o, self._v, self._e = topic, partition, offset, value, error

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> Optional[bytes]:
        return self._v

    def key(self) -> Optional[bytes]:
        return None

    def headers(self) -> Optional[List[Tuple[str, bytes]]]:
        return None

    def error(self) -> Optional[KafkaError]:
        return self._e


class FakeKafka:
    """Records pause/seek/resume/store_offsets; ``log`` shows what the consumer asked for."""

    def __init__(self, topic: str, partitions: Dict[int, List[bytes]]) -> None:
        self.topic = topic
        self.data = partitions
        self.position = {p: 0 for p in partitions}
        self.paused: set = set()
        self.stored: Dict[int, int] = {}
        self.log: List[Tuple[str, int, int]] = []

    def consume(self, n: int) -> List[FakeMsg]:
        out = []
        for p, values in self.data.items():
            if p in self.paused:
                continue
            while self.position[p] < len(values) and len(out) < n:
                o = self.position[p]
                out.append(FakeMsg(self.topic, p, o, values[o]))
                self.position[p] += 1
        return out

    def pause(self, tps: List[TopicPartition]) -> None:
        for tp in tps:
            self.paused.add(tp.partition)
            self.log.append(("pause", tp.partition, -1))

    def resume(self, tps: List[TopicPartition]) -> None:
        for tp in tps:
            self.paused.discard(tp.partition)
            self.log.append(("resume", tp.partition, -1))

    def seek(self, tp: TopicPartition) -> None:
        self.position[tp.partition] = tp.offset
        self.log.append(("seek", tp.partition, tp.offset))

    def store_offsets(self, offsets: List[TopicPartition]) -> None:
        for tp in offsets:
            self.stored[tp.partition] = tp.offset

    def commit(self, asynchronous: bool = True) -> None:
        self.log.append(("commit", -1, -1))


def op_json(lsn: int, seq: int, value: str = "v") -> bytes:
    return ReplicationOp("t", ["a"], lsn, seq, Op.insert([value])).to_json()


def drive(consumer: Consumer, kafka: FakeKafka, runner: Any, rounds: int = 50) -> None:
    """The main loop's steps without time: retries are due at once."""
    for _ in range(rounds):
        for part in consumer._parts.values():
            part.retry_at = 0.0
        consumer._resume_due(kafka)  # type: ignore[arg-type]
        msgs = kafka.consume(7)
        if msgs:
            consumer._process(kafka, runner, consumer._group(msgs))  # type: ignore[arg-type]


def test_retry_policy_retries_in_order_and_never_skips() -> None:
    values = [op_json(10, i) for i in range(10)]
    kafka = FakeKafka("t", {0: values, 1: [op_json(20, i) for i in range(5)]})
    consumer = Consumer("g", ["t"], "h:1", retry_backoff=0.01, max_backoff=0.02)
    failures = {3: 2}  # seq 3 of partition 0 fails twice
    seen: List[Tuple[int, int]] = []

    def handle(op: ReplicationOp) -> None:
        if op.lsn == 10 and failures.get(op.seq_id, 0) > 0:
            failures[op.seq_id] -= 1
            raise RuntimeError("sink unavailable")
        seen.append(op.position)

    drive(consumer, kafka, consumer._basic_runner(handle))
    assert [p for p in seen if p[0] == 10] == [(10, i) for i in range(10)]
    assert [p for p in seen if p[0] == 20] == [(20, i) for i in range(5)]
    assert kafka.stored == {0: 10, 1: 5}
    assert ("seek", 0, 3) in kafka.log and consumer.stats.failures == 2
    assert consumer.stats.handled == 15 and not kafka.paused


def test_malformed_record_under_retry_holds_its_partition() -> None:
    kafka = FakeKafka("t", {0: [op_json(1, 0), b"garbage", op_json(1, 2)]})
    consumer = Consumer("g", ["t"], "h:1", retry_backoff=0.01, max_backoff=0.02)
    seen: List[int] = []
    drive(consumer, kafka, consumer._basic_runner(lambda op: seen.append(op.seq_id)), rounds=5)
    assert seen == [0] and kafka.stored == {0: 1} and consumer.stats.failures >= 4


def test_stop_policy_raises_with_location_after_max_attempts() -> None:
    kafka = FakeKafka("t", {0: [op_json(5, 0), op_json(5, 1), op_json(5, 2)]})
    consumer = Consumer("g", ["t"], "h:1", on_error="stop", max_attempts=3, retry_backoff=0.01, max_backoff=0.02)

    def handle(op: ReplicationOp) -> None:
        if op.seq_id == 1:
            raise ValueError("bad row")

    with pytest.raises(_Fatal) as info:
        drive(consumer, kafka, consumer._basic_runner(handle))
    error = info.value.error
    assert isinstance(error, HandlerError) and isinstance(error.__cause__, ValueError)
    assert (error.topic, error.partition, error.offset, error.lsn, error.seq_id) == ("t", 0, 1, 5, 1)
    assert "t[0]@1" in str(error) and "seq_id 1" in str(error)
    assert kafka.stored == {0: 1} and consumer.stats.failures == 3


def test_stop_policy_stops_at_once_on_malformed_record() -> None:
    kafka = FakeKafka("t", {0: [op_json(5, 0), b'{"x":1}']})
    consumer = Consumer("g", ["t"], "h:1", on_error="stop", max_attempts=5)
    with pytest.raises(_Fatal) as info:
        drive(consumer, kafka, consumer._basic_runner(lambda op: None))
    assert "t[0]@1 is not a ReplicationOp" in str(info.value.error)
    assert consumer.stats.failures == 1


def test_dead_letter_isolates_the_poison_op_of_a_failing_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    values = [op_json(7, i) for i in range(12)]
    values[5] = op_json(7, 5, "poison")
    values[9] = b"not an op"
    kafka = FakeKafka("t", {0: values})
    consumer = Consumer("g", ["t"], "h:1", on_error="dead_letter", dead_letter_topic="dlq", max_attempts=2,
                        batch_size=4, retry_backoff=0.01, max_backoff=0.02)
    dead: List[Tuple[int, bool]] = []
    monkeypatch.setattr(consumer, "_dead_letter", lambda msg, part, failure, reason: dead.append((msg.offset(), failure.malformed)))
    batches: List[List[int]] = []

    def handle_batch(ops: List[ReplicationOp]) -> None:
        if any(op.op.new == ("poison",) for op in ops):
            raise RuntimeError("poison")
        batches.append([op.seq_id for op in ops])

    drive(consumer, kafka, consumer._basic_batch_runner(handle_batch))
    handled = [s for b in batches for s in b]
    assert handled == [i for i in range(12) if i not in (5, 9)]  # in order, each once
    assert dead == [(5, False), (9, True)]
    assert kafka.stored == {0: 12} and consumer.stats.dead_lettered == 2


def test_dead_letter_send_failure_is_retried_not_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = FakeKafka("t", {0: [b"junk", op_json(1, 1)]})
    consumer = Consumer("g", ["t"], "h:1", on_error="dead_letter", dead_letter_topic="dlq", retry_backoff=0.01,
                        max_backoff=0.02)
    calls = []

    def dead_letter(msg: Any, part: Any, failure: Any, reason: str) -> None:
        calls.append(msg.offset())
        if len(calls) < 3:
            raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT))

    monkeypatch.setattr(consumer, "_dead_letter", dead_letter)
    seen: List[int] = []
    drive(consumer, kafka, consumer._basic_runner(lambda op: seen.append(op.seq_id)))
    assert calls == [0, 0, 0] and seen == [1] and kafka.stored == {0: 2}


def test_records_of_paused_or_revoked_partitions_are_dropped() -> None:
    consumer = Consumer("g", ["t"], "h:1")
    kafka = FakeKafka("t", {0: [], 1: []})
    consumer._on_assign(kafka, [TopicPartition("t", 0)])  # type: ignore[arg-type]
    msgs = [FakeMsg("t", 0, 5, b""), FakeMsg("t", 1, 3, b""), FakeMsg("t", 0, 6, b"")]
    groups = consumer._group(msgs)  # type: ignore[arg-type]
    assert list(groups) == [("t", 0)] and [m.offset() for m in groups[("t", 0)]] == [5, 6]
    consumer._parts[("t", 0)].paused = True
    assert consumer._group([FakeMsg("t", 0, 7, b"")]) == {}  # type: ignore[list-item]
    # a revoke + re-assign inside one consume() call: keep the newest run of offsets
    consumer._on_revoke(kafka, [TopicPartition("t", 0)])  # type: ignore[arg-type]
    assert ("commit", -1, -1) in kafka.log and ("resume", 0, -1) in kafka.log and ("t", 0) not in consumer._parts
    consumer._on_assign(kafka, [TopicPartition("t", 0)])  # type: ignore[arg-type]
    groups = consumer._group([FakeMsg("t", 0, o, b"") for o in (8, 9, 4, 5)])  # type: ignore[misc]
    assert [m.offset() for m in groups[("t", 0)]] == [4, 5]


def test_end_of_partition_tracking() -> None:
    consumer = Consumer("g", ["t"], "h:1", stop_at_eof=True)
    kafka = FakeKafka("t", {0: []})
    consumer._on_assign(kafka, [TopicPartition("t", 0), TopicPartition("t", 1)])  # type: ignore[arg-type]
    eof = KafkaError(KafkaError._PARTITION_EOF)
    consumer._group([FakeMsg("t", 0, 3, None, eof), FakeMsg("t", 1, 2, b""), FakeMsg("t", 1, 3, None, eof)])  # type: ignore[list-item]
    assert consumer._eof == {("t", 0), ("t", 1)}
    consumer._group([FakeMsg("t", 1, 3, None, eof), FakeMsg("t", 1, 3, b"")])  # type: ignore[list-item]
    assert consumer._eof == {("t", 0)}


@pytest.mark.parametrize("workers", [1, 3])
def test_random_failures_never_reorder_or_lose_ops(workers: int) -> None:
    rng = random.Random(4)
    data = {p: [op_json(100 + p, i) for i in range(40)] for p in range(3)}
    kafka = FakeKafka("t", data)
    consumer = Consumer("g", ["t"], "h:1", batch_size=5, retry_backoff=0.01, max_backoff=0.02, workers=workers)
    if workers > 1:
        consumer._executor = concurrent.futures.ThreadPoolExecutor(workers)
    seen: Dict[int, List[int]] = {0: [], 1: [], 2: []}
    lock = threading.Lock()

    def handle_batch(ops: List[ReplicationOp]) -> None:
        with lock:
            fail = rng.random() < 0.3
        if fail:
            raise RuntimeError("flaky")
        seen[ops[0].lsn - 100].extend(op.seq_id for op in ops)

    try:
        drive(consumer, kafka, consumer._basic_batch_runner(handle_batch), rounds=400)
    finally:
        if consumer._executor is not None:
            consumer._executor.shutdown()
    assert seen == {p: list(range(40)) for p in range(3)}
    assert kafka.stored == {0: 40, 1: 40, 2: 40}


@pytest.mark.parametrize("form", ["basic", "batch"])
def test_time_budget_puts_the_rest_back_without_losing_order(form: str) -> None:
    kafka = FakeKafka("t", {0: [op_json(3, i) for i in range(9)]})
    consumer = Consumer("g", ["t"], "h:1", batch_size=2, max_batch_time=1e-6)
    seen: List[int] = []
    if form == "basic":
        runner = consumer._basic_runner(lambda op: seen.append(op.seq_id))
    else:
        runner = consumer._basic_batch_runner(lambda ops: seen.extend(op.seq_id for op in ops))
    drive(consumer, kafka, runner)
    assert seen == list(range(9)) and kafka.stored == {0: 9}
    seeks = [entry for entry in kafka.log if entry[0] == "seek"]
    assert seeks and all(offset % 2 == 0 for _, _, offset in seeks)  # put back at handler-batch boundaries
    assert not [entry for entry in kafka.log if entry[0] == "pause"]
