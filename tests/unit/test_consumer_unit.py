"""Consumer without a broker: configuration checks, and the whole poll loop (retry, stop, dead letter,
batch isolation, workers, time budget, rebalances, StopConsuming) run through ``start_basic*`` on a
stand-in Kafka client given as ``kafka_factory``; grouping and end-of-partition tracking through
``Partitions``."""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from pgrepl import ConfigError, ConsumerError, HandlerError, Op, ReplicationOp
from pgrepl.consumer import Consumer, StopConsuming
from pgrepl.consumer.consumer import DEFAULT_KAFKA_CONFIG
from pgrepl._runtime import Waker
from pgrepl.consumer.outcome import Fatal
from pgrepl.consumer.partitions import Partitions, PartitionState
from pgrepl.consumer.runners import IdempotentRunner, TimeBudget
from pgrepl.sink.postgres import Applied, HandlerEndedTransaction


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------


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
# The poll loop on a stand-in Kafka client
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


EOF_EVENT = KafkaError(KafkaError._PARTITION_EOF)


class FakeKafka:
    """A ``confluent_kafka.Consumer`` stand-in over in-memory partitions of one topic (``factory`` is the
    ``kafka_factory``). It assigns every partition at the first ``consume()``, reports the end of a
    partition when ``enable.partition.eof`` is set, interleaves the partitions' records, blocks for the timeout when it has nothing, and
    records what the consumer asked for in ``log``."""

    def __init__(self, topic: str, partitions: Dict[int, List[Optional[bytes]]]) -> None:
        self.topic = topic
        self.data = partitions
        self.position = {p: 0 for p in partitions}
        self.paused: set = set()
        self.stored: Dict[int, int] = {}
        self.committed: Dict[int, int] = {}
        self.log: List[Tuple[str, int, int]] = []
        self.settings: Dict[str, Any] = {}
        self.callbacks: Dict[str, Callable[..., None]] = {}
        self.assigned: List[int] = []
        self.at_end_reported = {p: False for p in partitions}
        self.polls = 0
        self.before_poll: Optional[Callable[["FakeKafka"], None]] = None  # a test's hook, runs in consume()
        self.after_fetch: Optional[Callable[["FakeKafka"], None]] = None  # runs in consume() after it fetched
        self.closed = False

    def factory(self, settings: Dict[str, Any]) -> "FakeKafka":
        self.settings = settings
        return self

    def subscribe(self, topics: List[str], on_assign: Callable[..., None], on_revoke: Callable[..., None],
                  on_lost: Callable[..., None]) -> None:
        assert topics == [self.topic]
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}

    def rebalance(self, revoke: List[int], assign: List[int]) -> None:
        """Like librdkafka inside consume(): revoke, then assign (from the committed offsets)."""
        if revoke:
            self.callbacks["revoke"](self, [TopicPartition(self.topic, p) for p in revoke])
            self.assigned = [p for p in self.assigned if p not in revoke]
        if assign:
            for p in assign:
                self.position[p] = self.committed.get(p, 0)
                self.at_end_reported[p] = False
            self.assigned += assign
            self.callbacks["assign"](self, [TopicPartition(self.topic, p) for p in assign])

    def consume(self, num_messages: int, timeout: float) -> List[FakeMsg]:
        self.polls += 1
        assert self.polls < 5000, "the consumer does not stop"
        if not self.callbacks:
            raise AssertionError("consume() before subscribe()")
        if self.polls == 1:
            self.rebalance([], list(self.data))
        if self.before_poll is not None:
            self.before_poll(self)
        out: List[FakeMsg] = []
        ready = [p for p in self.assigned if p not in self.paused]
        while len(out) < num_messages:  # the partitions' records interleaved, one at a time
            taken = len(out)
            for p in ready:
                if self.position[p] < len(self.data[p]) and len(out) < num_messages:
                    o = self.position[p]
                    out.append(FakeMsg(self.topic, p, o, self.data[p][o]))
                    self.position[p] += 1
                    self.at_end_reported[p] = False
            if len(out) == taken:
                break
        for p in ready:
            if (self.settings.get("enable.partition.eof") and self.position[p] == len(self.data[p])
                    and not self.at_end_reported[p] and len(out) < num_messages):
                out.append(FakeMsg(self.topic, p, self.position[p], None, EOF_EVENT))
                self.at_end_reported[p] = True
        if self.after_fetch is not None:
            self.after_fetch(self)
        if not out:
            time.sleep(timeout)
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
        self.at_end_reported[tp.partition] = False
        self.log.append(("seek", tp.partition, tp.offset))

    def store_offsets(self, offsets: List[TopicPartition]) -> None:
        for tp in offsets:
            self.stored[tp.partition] = tp.offset

    def commit(self, asynchronous: bool = True) -> None:
        assert asynchronous is False
        self.committed.update(self.stored)
        self.log.append(("commit", -1, -1))

    def close(self) -> None:
        self.closed = True


class FakeProducer:
    """The dead-letter producer's stand-in (``dead_letter_factory``); its first ``fail`` deliveries fail."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.attempts: List[Dict[str, bytes]] = []  # the pgrepl.* headers of every produce()
        self.delivered: List[Dict[str, bytes]] = []
        self.settings: Dict[str, Any] = {}

    def __call__(self, settings: Dict[str, Any]) -> "FakeProducer":
        self.settings = settings
        return self

    def produce(self, topic: str, value: Optional[bytes], key: Optional[bytes], headers: List[Tuple[str, bytes]],
                on_delivery: Callable[[Optional[KafkaError], Any], None]) -> None:
        assert topic == "dlq"
        sent = dict(headers)
        self.attempts.append(sent)
        if self.fail > 0:
            self.fail -= 1
            on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), None)
        else:
            self.delivered.append(sent)
            on_delivery(None, None)

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        return 0


def op_json(lsn: int, seq: int, value: str = "v") -> bytes:
    return ReplicationOp("t", ["a"], lsn, seq, Op.insert([value])).to_json()


def consumer_on(kafka: FakeKafka, **kwargs: Any) -> Consumer:
    """A Consumer of topic "t" on ``kafka`` that stops once every partition is read to its end; fetches 7
    records per poll, retries after 10-20 ms."""
    options: Dict[str, Any] = dict(poll_batch=7, poll_timeout=0.01, retry_backoff=0.01, max_backoff=0.02,
                                   stop_at_eof=True, handle_signals=False, kafka_factory=kafka.factory)
    options.update(kwargs)
    return Consumer("g", ["t"], "h:1", **options)


def test_retry_policy_retries_in_order_and_never_skips() -> None:
    values: List[Optional[bytes]] = [op_json(10, i) for i in range(10)]
    kafka = FakeKafka("t", {0: values, 1: [op_json(20, i) for i in range(5)]})
    consumer = consumer_on(kafka)
    failures = {3: 2}  # seq 3 of partition 0 fails twice
    seen: List[Tuple[int, int]] = []

    def handle(op: ReplicationOp) -> None:
        if op.lsn == 10 and failures.get(op.seq_id, 0) > 0:
            failures[op.seq_id] -= 1
            raise RuntimeError("sink unavailable")
        seen.append(op.position)

    consumer.start_basic(handle)
    assert [p for p in seen if p[0] == 10] == [(10, i) for i in range(10)]
    assert [p for p in seen if p[0] == 20] == [(20, i) for i in range(5)]
    assert kafka.stored == {0: 10, 1: 5} and kafka.committed == {0: 10, 1: 5} and kafka.closed
    assert ("seek", 0, 3) in kafka.log and consumer.stats.failures == 2
    assert consumer.stats.handled == 15 and not kafka.paused


def test_malformed_record_under_retry_holds_its_partition() -> None:
    kafka = FakeKafka("t", {0: [op_json(1, 0), b"garbage", op_json(1, 2)]})
    consumer = consumer_on(kafka)
    kafka.before_poll = lambda _: consumer.stop() if consumer.stats.failures >= 4 else None
    seen: List[int] = []
    consumer.start_basic(lambda op: seen.append(op.seq_id))
    assert seen == [0] and kafka.stored == {0: 1} and consumer.stats.failures >= 4


def test_stop_policy_raises_with_location_after_max_attempts() -> None:
    kafka = FakeKafka("t", {0: [op_json(5, 0), op_json(5, 1), op_json(5, 2)]})
    consumer = consumer_on(kafka, on_error="stop", max_attempts=3)

    def handle(op: ReplicationOp) -> None:
        if op.seq_id == 1:
            raise ValueError("bad row")

    with pytest.raises(HandlerError) as info:
        consumer.start_basic(handle)
    error = info.value
    assert isinstance(error.__cause__, ValueError)
    assert (error.topic, error.partition, error.offset, error.lsn, error.seq_id) == ("t", 0, 1, 5, 1)
    assert "t[0]@1" in str(error) and "seq_id 1" in str(error)
    assert kafka.stored == {0: 1} and kafka.committed == {0: 1} and consumer.stats.failures == 3


def test_stop_policy_stops_at_once_on_malformed_record() -> None:
    kafka = FakeKafka("t", {0: [op_json(5, 0), b'{"x":1}']})
    consumer = consumer_on(kafka, on_error="stop", max_attempts=5)
    with pytest.raises(HandlerError, match=r"t\[0\]@1 is not a ReplicationOp"):
        consumer.start_basic(lambda op: None)
    assert consumer.stats.failures == 1


def test_dead_letter_isolates_the_poison_op_of_a_failing_batch() -> None:
    values: List[Optional[bytes]] = [op_json(7, i) for i in range(12)]
    values[5] = op_json(7, 5, "poison")
    values[9] = b"not an op"
    kafka = FakeKafka("t", {0: values})
    dead_letters = FakeProducer()
    consumer = consumer_on(kafka, on_error="dead_letter", dead_letter_topic="dlq", max_attempts=2, batch_size=4,
                           dead_letter_factory=dead_letters)
    batches: List[List[int]] = []

    def handle_batch(ops: List[ReplicationOp]) -> None:
        if any(op.op.new == ("poison",) for op in ops):
            raise RuntimeError("poison")
        batches.append([op.seq_id for op in ops])

    consumer.start_basic_batch(handle_batch)
    handled = [s for b in batches for s in b]
    assert handled == [i for i in range(12) if i not in (5, 9)]  # in order, each once
    assert [(h["pgrepl.source.offset"], h["pgrepl.kind"]) for h in dead_letters.delivered] == [
        (b"5", b"handler"), (b"9", b"malformed")]
    assert dead_letters.delivered[0]["pgrepl.error"] == b"RuntimeError: poison"
    assert dead_letters.settings["bootstrap.servers"] == "h:1" and dead_letters.settings["acks"] == "all"
    assert kafka.stored == {0: 12} and consumer.stats.dead_lettered == 2


def test_dead_letter_send_failure_is_retried_not_skipped() -> None:
    kafka = FakeKafka("t", {0: [b"junk", op_json(1, 1)]})
    dead_letters = FakeProducer(fail=2)
    consumer = consumer_on(kafka, on_error="dead_letter", dead_letter_topic="dlq", dead_letter_factory=dead_letters)
    seen: List[int] = []
    consumer.start_basic(lambda op: seen.append(op.seq_id))
    assert [h["pgrepl.source.offset"] for h in dead_letters.attempts] == [b"0", b"0", b"0"]
    assert seen == [1] and kafka.stored == {0: 2} and consumer.stats.dead_lettered == 1


@pytest.mark.parametrize("workers", [1, 3])
def test_random_failures_never_reorder_or_lose_ops(workers: int) -> None:
    rng = random.Random(4)
    data: Dict[int, List[Optional[bytes]]] = {p: [op_json(100 + p, i) for i in range(40)] for p in range(3)}
    kafka = FakeKafka("t", data)
    consumer = consumer_on(kafka, batch_size=5, workers=workers)
    seen: Dict[int, List[int]] = {0: [], 1: [], 2: []}
    threads = set()
    lock = threading.Lock()

    def handle_batch(ops: List[ReplicationOp]) -> None:
        with lock:
            fail = rng.random() < 0.3
            threads.add(threading.get_ident())
        if fail:
            raise RuntimeError("flaky")
        seen[ops[0].lsn - 100].extend(op.seq_id for op in ops)

    consumer.start_basic_batch(handle_batch)
    assert seen == {p: list(range(40)) for p in range(3)}
    assert kafka.stored == {0: 40, 1: 40, 2: 40}
    assert (len(threads) > 1) == (workers > 1)


@pytest.mark.parametrize("form", ["basic", "batch"])
def test_time_budget_puts_the_rest_back_without_losing_order(form: str) -> None:
    kafka = FakeKafka("t", {0: [op_json(3, i) for i in range(9)]})
    consumer = consumer_on(kafka, batch_size=2, max_batch_time=1e-6)
    seen: List[int] = []
    if form == "basic":
        consumer.start_basic(lambda op: seen.append(op.seq_id))
    else:
        consumer.start_basic_batch(lambda ops: seen.extend(op.seq_id for op in ops))
    assert seen == list(range(9)) and kafka.stored == {0: 9}
    seeks = [entry for entry in kafka.log if entry[0] == "seek"]
    assert seeks and all(offset % 2 == 0 for _, _, offset in seeks)  # put back at handler-batch boundaries
    assert not [entry for entry in kafka.log if entry[0] == "pause"]


def test_rebalance_while_a_partition_waits_for_its_retry() -> None:
    kafka = FakeKafka("t", {0: [op_json(1, i) for i in range(6)], 1: [op_json(2, i) for i in range(3)]})
    consumer = consumer_on(kafka, retry_backoff=0.05, max_backoff=0.05)
    failed = []
    seen: List[Tuple[int, int]] = []

    def handle(op: ReplicationOp) -> None:
        if op.position == (1, 4) and not failed:
            failed.append(op)
            raise RuntimeError("once")
        seen.append(op.position)

    def rebalance_while_paused(kafka: FakeKafka) -> None:
        if 0 in kafka.paused and ("commit", -1, -1) not in kafka.log:
            kafka.rebalance([0, 1], [0])  # partition 1 moves to another member

    kafka.before_poll = rebalance_while_paused
    consumer.start_basic(handle)
    assert kafka.log.index(("commit", -1, -1)) < kafka.log.index(("resume", 0, -1))  # commit, then lift the pause
    assert kafka.committed[0] == 6 and kafka.committed[1] == 3  # what partition 1 finished was committed
    assert [p for p in seen if p[0] == 1] == [(1, i) for i in range(6)]
    assert consumer.assignment == [("t", 0)] and consumer.stats.rebalances == 2


def test_stop_consuming_from_a_handler_stops_without_storing_its_batch() -> None:
    kafka = FakeKafka("t", {0: [op_json(4, i) for i in range(8)]})
    consumer = consumer_on(kafka, batch_size=3, stop_at_eof=False)
    batches: List[List[Tuple[int, int]]] = []

    def write(records: List[Tuple[Any, ReplicationOp]]) -> None:
        if records[0][0].offset() >= 3:
            raise StopConsuming()
        batches.append([(msg.offset(), op.seq_id) for msg, op in records])

    consumer.start_basic_batch(write, with_records=True)
    assert batches == [[(0, 0), (1, 1), (2, 2)]]
    assert consumer.stopping and kafka.committed == {0: 3} and ("seek", 0, 3) in kafka.log


def test_stop_consuming_from_a_per_op_handler() -> None:
    kafka = FakeKafka("t", {0: [op_json(4, i) for i in range(8)]})
    consumer = consumer_on(kafka, stop_at_eof=False)
    seen: List[int] = []

    def handle(op: ReplicationOp) -> None:
        if op.seq_id == 5:
            raise StopConsuming()
        seen.append(op.seq_id)

    consumer.start_basic(handle)
    assert seen == [0, 1, 2, 3, 4] and kafka.committed == {0: 5} and consumer.stats.failures == 0


def test_fatal_kafka_error_stops_with_consumer_error() -> None:
    kafka = FakeKafka("t", {0: [op_json(1, 0)]})
    consumer = consumer_on(kafka, stop_at_eof=False)
    kafka.before_poll = lambda k: k.settings["error_cb"](KafkaError(KafkaError._FATAL, "fenced", fatal=True))
    with pytest.raises(ConsumerError, match="fatal Kafka consumer error: fenced"):
        consumer.start_basic(lambda op: None)
    assert kafka.closed and kafka.polls == 1


# ------------------------------------------------------------------------------------------
# Grouping by partition
# ------------------------------------------------------------------------------------------


def test_records_of_paused_or_revoked_partitions_are_dropped() -> None:
    parts = Partitions(["t"])
    parts.assign([("t", 0)])
    msgs = [FakeMsg("t", 0, 5, b""), FakeMsg("t", 1, 3, b""), FakeMsg("t", 0, 6, b"")]
    groups = parts.group(msgs)
    assert list(groups) == [("t", 0)] and [m.offset() for m in groups[("t", 0)]] == [5, 6]
    parts[("t", 0)].paused = True
    assert parts.group([FakeMsg("t", 0, 7, b"")]) == {}
    # a revoke + re-assign inside one consume() call: keep the newest run of offsets
    assert [state.partition for state in parts.forget([("t", 0)])] == [0]  # paused: the caller resumes it
    parts.assign([("t", 0)])
    groups = parts.group([FakeMsg("t", 0, o, b"") for o in (8, 9, 4, 5)])
    assert [m.offset() for m in groups[("t", 0)]] == [4, 5]


def test_end_of_partition_tracking() -> None:
    parts = Partitions(["t"], track_eof=True)
    parts.assign([("t", 0), ("t", 1)])
    parts.group([FakeMsg("t", 0, 3, None, EOF_EVENT), FakeMsg("t", 1, 2, b""), FakeMsg("t", 1, 3, None, EOF_EVENT)])
    assert parts.is_at_end("t", 0) and parts.is_at_end("t", 1) and parts.all_at_end()
    parts.group([FakeMsg("t", 1, 3, None, EOF_EVENT), FakeMsg("t", 1, 3, b"")])
    assert parts.is_at_end("t", 0) and not parts.is_at_end("t", 1) and not parts.all_at_end()


def test_fatal_error_event_among_the_records_is_raised() -> None:
    parts = Partitions(["t"])
    with pytest.raises(Fatal, match="fatal Kafka consumer error: gone") as info:
        parts.group([FakeMsg("t", 0, 0, None, KafkaError(KafkaError._FATAL, "gone", fatal=True))])
    assert isinstance(info.value.error, ConsumerError)


# ------------------------------------------------------------------------------------------
# The idempotent runner on a stand-in sink (the real transaction: tests/integration)
# ------------------------------------------------------------------------------------------


class FakeSink:
    """``PostgresSink.apply`` stand-in: applies ops above its position, or raises ``error`` once."""

    def __init__(self) -> None:
        self.position = (-1, -1)
        self.calls: List[Tuple[List[int], Optional[Tuple[int, int]]]] = []  # (offsets, known)
        self.error: Optional[BaseException] = None

    def apply(self, topic: str, partition: int, ops: List[ReplicationOp], offsets: List[int],
              handler: Callable[[Any, List[ReplicationOp]], Any], known: Optional[Tuple[int, int]] = None) -> Applied:
        self.calls.append((list(offsets), known))
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        new = [op for op in ops if op.position > self.position]
        handler(None, new)
        if new:
            self.position = new[-1].position
        return Applied(len(new), len(ops) - len(new), 1 if new else 0, self.position)


def run_idempotent(sink: FakeSink, part: PartitionState, values: List[bytes], waker: Waker) -> Any:
    budget = TimeBudget(60.0, waker)
    budget.start()
    runner = IdempotentRunner(sink, lambda cur, ops: None, 2, budget)  # type: ignore[arg-type]
    return runner(part, [FakeMsg("t", 0, 10 + i, value) for i, value in enumerate(values)])


def test_idempotent_runner_applies_batches_and_remembers_the_position() -> None:
    sink, part, waker = FakeSink(), PartitionState("t", 0), Waker()
    sink.position = (1, 1)  # the sink already has the first two ops: a replay
    out = run_idempotent(sink, part, [op_json(1, i) for i in range(5)], waker)
    assert sink.calls == [([10, 11], None), ([12, 13], (1, 1)), ([14], (1, 3))]
    assert (out.handled, out.skipped, out.transactions, out.done.offset()) == (3, 2, 2, 14)
    assert part.position == (1, 4) and out.failure is None and out.rest is None


def test_idempotent_runner_failures() -> None:
    sink, part, waker = FakeSink(), PartitionState("t", 0), Waker()
    part.position = (1, 0)
    sink.error = RuntimeError("deadlock")
    out = run_idempotent(sink, part, [op_json(1, 1), op_json(1, 2)], waker)
    assert out.failure.batch_end == 11 and out.failure.msg.offset() == 10 and out.done is None
    assert part.position is None  # unknown whether it committed: reloaded from the sink
    sink.error = HandlerEndedTransaction()
    with pytest.raises(Fatal) as info:
        run_idempotent(sink, part, [op_json(1, 1)], waker)
    error = info.value.error
    assert isinstance(error, HandlerError) and (error.offset, error.lsn, error.seq_id) == (10, 1, 1)
    assert "must not COMMIT or ROLLBACK" in str(error)
    sink.error = StopConsuming()
    out = run_idempotent(sink, part, [op_json(1, 1)], waker)
    assert out.rest.offset() == 10 and out.done is None and waker.is_set


def test_sink_outages_are_retried_and_never_counted_against_the_record() -> None:
    """A lost sink connection (or a restarting server) is the sink's failure, not the record's: with
    on_error="dead_letter" and max_attempts=1 nothing is dead-lettered, however long it lasts."""
    import psycopg2
    import psycopg2.errors

    from pgrepl.consumer.failures import DeadLetterProducer, FailurePolicy
    from pgrepl.consumer.partitions import Partitions
    from pgrepl.consumer.stats import ConsumerStats

    sink, part, waker = FakeSink(), PartitionState("t", 0), Waker()
    kafka = FakeKafka("t", {0: []})
    dead_letters = FakeProducer()
    stats = ConsumerStats()
    policy = FailurePolicy(kafka, Partitions(["t"]), stats, on_error="dead_letter", max_attempts=1, retry_backoff=0.01,
                           max_backoff=0.05, dead_letter=DeadLetterProducer("dlq", "g", {}, dead_letters))
    for attempt in range(6):
        sink.error = psycopg2.OperationalError("server closed the connection unexpectedly")
        out = run_idempotent(sink, part, [op_json(1, 1), op_json(1, 2)], waker)
        assert out.failure is not None and out.failure.sink_outage
        policy.handle(part, out.failure)
        assert part.paused and part.attempts == 0
    assert stats.sink_outages == 6 and stats.failures == 0 and dead_letters.attempts == []
    assert part.retry_at > 0  # backoff grows with the outage, capped by max_backoff
    out = run_idempotent(sink, part, [op_json(1, 1), op_json(1, 2)], waker)  # the sink is back
    assert out.failure is None and out.handled == 2
    sink.error = psycopg2.errors.UniqueViolation("duplicate key value violates unique constraint")
    out = run_idempotent(sink, part, [op_json(1, 3)], waker)
    assert out.failure is not None and not out.failure.sink_outage  # the handler's own SQL: the policy decides
    policy.handle(part, out.failure)
    assert stats.failures == 1 and len(dead_letters.delivered) == 1


def test_stop_at_eof_waits_for_a_put_back_rest_fetched_with_the_end_event() -> None:
    """One fetch brings every record and the end-of-partition event; the time budget puts most of
    them back. The partition is not at its end until they are handled (a stop would skip them)."""
    kafka = FakeKafka("t", {0: [op_json(3, i) for i in range(9)]})
    consumer = consumer_on(kafka, batch_size=2, max_batch_time=1e-6, poll_batch=100)
    seen: List[int] = []
    consumer.start_basic_batch(lambda ops: seen.extend(op.seq_id for op in ops))
    assert seen == list(range(9)) and kafka.stored == {0: 9}


class PartitionSink:
    """``PostgresSink.apply`` stand-in with a position per partition; ``fail`` decides which calls fail."""

    def __init__(self, fail: Callable[[], bool] = lambda: False) -> None:
        self.positions: Dict[int, Tuple[int, int]] = {}
        self.applied: Dict[int, List[int]] = {}
        self.fail = fail
        self.threads: set = set()

    def apply(self, topic: str, partition: int, ops: List[ReplicationOp], offsets: List[int],
              handler: Callable[[Any, List[ReplicationOp]], Any], known: Optional[Tuple[int, int]] = None) -> Applied:
        self.threads.add(threading.current_thread().name)
        if self.fail():
            raise RuntimeError("flaky sink")
        last = self.positions.get(partition, (-1, -1))
        new = [op for op in ops if op.position > last]
        handler(None, new)
        self.applied.setdefault(partition, []).extend(op.seq_id for op in new)
        if new:
            self.positions[partition] = new[-1].position
        return Applied(len(new), len(ops) - len(new), 1 if new else 0, self.positions.get(partition, last))


def run_pipelined(kafka: FakeKafka, sink: PartitionSink, **kwargs: Any) -> Consumer:
    consumer = consumer_on(kafka, **kwargs)
    consumer._consume(IdempotentRunner(sink, lambda cur, ops: None, consumer.batch_size,  # type: ignore[arg-type]
                                       consumer._budget))
    return consumer


def test_pipelined_sink_transactions_keep_order_and_apply_each_op_once() -> None:
    """The idempotent runner's transactions run on the sink thread while the loop parses and fetches
    on: with failing transactions (retried) every partition's ops are applied once, in order, and
    every offset is stored."""
    rng = random.Random(11)
    lock = threading.Lock()

    def flaky() -> bool:
        with lock:
            return rng.random() < 0.25

    data: Dict[int, List[Optional[bytes]]] = {p: [op_json(100 + p, i) for i in range(60)] for p in range(3)}
    kafka = FakeKafka("t", data)
    timeouts: List[float] = []
    consume = kafka.consume
    kafka.consume = lambda n, timeout: timeouts.append(timeout) or consume(n, timeout)  # type: ignore[method-assign]
    sink = PartitionSink(flaky)
    consumer = run_pipelined(kafka, sink, batch_size=4)
    # with a transaction in flight the loop does not block in consume(): it settles it instead
    assert 0.0 in timeouts and 0.01 in timeouts
    assert sink.applied == {p: list(range(60)) for p in range(3)}
    assert kafka.stored == {0: 60, 1: 60, 2: 60} and consumer.stats.handled == 180
    assert sink.threads == {"pgrepl-sink_0"}  # one sink thread: one transaction at a time


def test_a_rebalance_settles_the_transaction_in_flight_before_it_commits() -> None:
    kafka = FakeKafka("t", {0: [op_json(1, i) for i in range(6)], 1: [op_json(2, i) for i in range(6)]})
    sink = PartitionSink()
    at_revocation: Dict[int, int] = {}

    def revoke_once(kafka: FakeKafka) -> None:
        if kafka.polls == 3:
            kafka.rebalance([0, 1], [0, 1])  # e.g. a member joined and left
            at_revocation.update(kafka.committed)

    kafka.before_poll = revoke_once
    run_pipelined(kafka, sink, batch_size=2, poll_batch=4)
    # two polls of 4 records (2 per partition) were handled; the last transaction was still in
    # flight when the revocation came: it was settled (its offset stored) before the commit
    assert at_revocation == {0: 4, 1: 4}
    assert sink.applied == {0: list(range(6)), 1: list(range(6))} and kafka.stored == {0: 6, 1: 6}


def test_pipelined_batches_put_back_by_the_time_budget_are_handled_again_in_order() -> None:
    """The time budget puts the rest of a partition's records back while the loop already fetched
    what follows them (for that partition and others): those records are dropped and fetched again,
    never applied ahead of the put-back ones (the sink would then skip those as replays)."""
    data: Dict[int, List[Optional[bytes]]] = {p: [op_json(200 + p, i) for i in range(30)] for p in range(3)}
    kafka = FakeKafka("t", data)
    sink = PartitionSink()
    consumer = run_pipelined(kafka, sink, batch_size=2, poll_batch=9, max_batch_time=1e-6)
    assert sink.applied == {p: list(range(30)) for p in range(3)}
    assert kafka.stored == {0: 30, 1: 30, 2: 30} and consumer.stats.skipped == 0


def test_a_put_back_settled_in_a_revocation_drops_what_that_consume_fetched_after_it() -> None:
    """Cooperative rebalancing: a revocation of another partition inside consume() settles the
    transaction in flight, whose rest is put back; records of that partition fetched by the same
    consume() (after the put-back ones) must not be applied ahead of them (the sink would skip the
    put-back ones as replays: lost ops)."""
    data: Dict[int, List[Optional[bytes]]] = {p: [op_json(300 + p, i) for i in range(60)] for p in range(3)}
    kafka = FakeKafka("t", data)
    sink = PartitionSink()
    settled_in_revocation: List[int] = []
    revoking = threading.Event()
    seek = kafka.seek

    def seek_logged(tp: TopicPartition) -> None:
        if revoking.is_set():
            settled_in_revocation.append(tp.partition)
        seek(tp)

    def cooperative(kafka: FakeKafka) -> None:  # partition 0 taken away after a consume() fetched, then back
        if 0 in kafka.assigned and kafka.polls % 2 and kafka.polls < 12:
            revoking.set()
            kafka.rebalance([0], [])
            revoking.clear()
        elif 0 not in kafka.assigned:
            kafka.rebalance([], [0])

    kafka.seek = seek_logged  # type: ignore[method-assign]
    kafka.after_fetch = cooperative
    run_pipelined(kafka, sink, batch_size=2, poll_batch=30, max_batch_time=1e-6)
    assert settled_in_revocation  # the case: another partition's rest put back inside a revocation
    for p in (1, 2):
        assert sink.applied[p] == list(range(60)), p  # every op, once, in order (ops were lost here)
    assert sorted(set(sink.applied[0])) == list(range(60))
    assert kafka.stored == {0: 60, 1: 60, 2: 60}


def test_a_partition_dropped_while_its_transaction_settles_is_not_looked_up_again() -> None:
    """The transaction in flight fails and its partition's seek fails (revoked meanwhile): the
    partition is dropped; its records in the batch being dispatched are left to the next owner."""
    data: Dict[int, List[Optional[bytes]]] = {p: [op_json(400 + p, i) for i in range(8)] for p in range(2)}
    kafka = FakeKafka("t", data)
    calls = {"n": 0}

    def fail_second() -> bool:
        calls["n"] += 1
        return calls["n"] == 2

    seek = kafka.seek
    seeks = {"n": 0}

    def seek_fails_once(tp: TopicPartition) -> None:
        seeks["n"] += 1
        if seeks["n"] == 1:
            kafka.paused.discard(tp.partition)  # a real revocation hands the partition over; this fake keeps it
            raise KafkaException(KafkaError(KafkaError._STATE, "revoked meanwhile"))
        seek(tp)

    kafka.seek = seek_fails_once  # type: ignore[method-assign]
    sink = PartitionSink(fail_second)
    run_pipelined(kafka, sink, batch_size=2, poll_batch=4)  # raised KeyError once
    assert seeks["n"] >= 1 and sink.applied[0] == list(range(8))
    # this fake keeps partition 1 assigned (a real revocation hands it over): what came later is in order
    assert sink.applied[1] == sorted(sink.applied[1])
