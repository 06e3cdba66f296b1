"""Consumer: reads ReplicationOps back from Kafka and hands them to your code, in partition order.

Two modes, each with a per-op and a batch form:

* **basic** (at least once): ``handle(op)`` / ``handle_batch(ops)``; a record's offset is
  stored for commit only after the handler returned for it.
* **idempotent** (exactly once into a PostgreSQL sink): ``handle_tx(cursor, op)`` /
  ``handle_batch_tx(cursor, ops)`` run inside a sink transaction that also takes a
  transaction-scoped advisory lock for ``(group, topic, partition)``, drops every op whose
  ``(lsn, seq_id)`` is not above the position stored in the state table, and moves that
  position forward; the Kafka offset is stored only after the transaction committed. A
  replay (crash, rebalance, offsets reset) therefore turns into skips.

The loop fetches many records per ``consume()`` call and groups them by partition: a
partition's records are handled strictly in offset order, different partitions may run on
``workers`` threads. A failing record (handler exception or a record that is not a
ReplicationOp) pauses its partition, seeks back to it and is retried with capped backoff;
``on_error`` may instead stop the consumer or, after ``max_attempts``, send the record to a
dead-letter topic. Nothing is ever skipped silently.

Offsets: ``enable.auto.commit=true`` with ``enable.auto.offset.store=false``; pgrepl calls
``store_offsets`` after success, librdkafka commits the stored offsets periodically, and
pgrepl commits synchronously when partitions are revoked and on ``stop()``.

The state table and the lock are described in ``pgrepl.sink.postgres``.

Broker notes (tansu 0.6, the sandbox's Kafka-protocol broker; the code follows Apache Kafka's
documented semantics and only its defaults take these into account):

* tansu holds every JoinGroup for ``session.timeout.ms / 2`` before answering (Kafka only
  delays the first join of an empty group by ``group.initial.rebalance.delay.ms``, 3 s). With
  librdkafka's 45 s default a consumer waits ~23 s for its first assignment, which looks like
  "subscribe() receives nothing". pgrepl's default ``session.timeout.ms`` is 10 s (5 s joins
  on tansu); tests use 6 s, Kafka's minimum.
* tansu completes a rebalance without waiting for known members to rejoin and may elect a
  member that did not rejoin (one that was SIGKILLed) as leader; the others then wait in
  SyncGroup until its session expires and join again. Failover after a crash therefore
  takes about ``session.timeout.ms`` + one join, not just the session timeout.
* tansu's ListOffsets (and so ``get_watermark_offsets``) reports the last batch's base
  offset + 1 as the high watermark; Fetch responses carry the right one. pgrepl never uses
  watermarks (``auto.offset.reset`` is ``earliest``; end of partition comes from Fetch).
* After a static member (``group.instance.id``) closes, tansu keeps the group "Stable" with
  no members instead of expiring the member and going "Empty", so offset resets (a commit
  from outside the group) fail with UNKNOWN_MEMBER_ID for good. Static membership works for
  consuming; just do not rely on resetting such a group's offsets on tansu.
* Not tansu but librdkafka: with its default ``fetch.queue.backoff.ms`` (1 s) the fetcher
  sleeps a whole second whenever the local queue is full, which halves throughput when the
  handler keeps up; pgrepl sets 10 ms.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import (
    Any, Awaitable, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union,
)

import psycopg2
import psycopg2.extensions
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import Producer as KafkaProducer

from pgrepl import kafka_settings
from pgrepl._runtime import Waker, install_stop_handlers, run_in_thread
from pgrepl.errors import ConfigError, ConsumerError, HandlerError, MalformedRecordError, PgreplError, first_line
from pgrepl.lsn import format_lsn, parse_lsn
from pgrepl.model import ReplicationOp
from pgrepl.postgres.connect import redact_dsn
from pgrepl.sink.postgres import DEFAULT_STATE_TABLE, PostgresSink, parse_table_name

log = logging.getLogger(__name__)

__all__ = ["Consumer", "ConsumerStats"]

#: Handler signatures.
Handler = Callable[[ReplicationOp], Any]
BatchHandler = Callable[[List[ReplicationOp]], Any]
TxHandler = Callable[[Any, ReplicationOp], Any]
BatchTxHandler = Callable[[Any, List[ReplicationOp]], Any]

#: librdkafka settings the delivery guarantees rest on: pgrepl stores offsets itself.
REQUIRED_KAFKA_CONFIG: Dict[str, Any] = {
    "enable.auto.offset.store": False,
}

#: Defaults the user may override through ``kafka_config``.
DEFAULT_KAFKA_CONFIG: Dict[str, Any] = {
    "auto.offset.reset": "earliest",  # a new group starts at the beginning: never skip ops
    "auto.commit.interval.ms": 1000,
    "session.timeout.ms": 10000,
    "heartbeat.interval.ms": 1000,
    "fetch.queue.backoff.ms": 10,
    "queued.min.messages": 200000,
    "max.partition.fetch.bytes": 4 * 1024 * 1024,
}

_POLICIES = ("retry", "stop", "dead_letter")

_TOPIC_ERRORS_LOGGED_EVERY = 60.0


@dataclass
class ConsumerStats:
    """Running totals, readable from another thread (status lines, tests, benchmarks)."""

    handled: int = 0          # ops a handler returned for (idempotent: applied and committed)
    skipped: int = 0          # idempotent: replays dropped because the sink already has them
    transactions: int = 0     # idempotent: sink transactions committed
    batches: int = 0          # consume() batches that held records
    failures: int = 0         # failed attempts (handler errors, malformed records, sink errors)
    dead_lettered: int = 0
    rebalances: int = 0
    records: int = 0          # records taken from Kafka (handled, skipped or failed)
    started_at: float = field(default_factory=time.monotonic)



# ------------------------------------------------------------------------------------------
# Per-partition bookkeeping
# ------------------------------------------------------------------------------------------


class _Part:
    """What the consumer remembers about one assigned partition (dropped on assign/revoke)."""

    __slots__ = ("topic", "partition", "position", "fail_offset", "attempts", "retry_at", "paused",
                 "isolate_until", "last_error_log")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.position: Optional[Tuple[int, int]] = None  # idempotent: last known sink position
        self.fail_offset: Optional[int] = None
        self.attempts = 0
        self.retry_at = 0.0
        self.paused = False
        self.isolate_until: Optional[int] = None  # batch forms: handle one op at a time up to here
        self.last_error_log = 0.0

    def where(self, offset: int) -> str:
        return f"{self.topic}[{self.partition}]@{offset}"


class _Failure:
    """A failed attempt: the record it failed at and why."""

    __slots__ = ("msg", "error", "op", "malformed", "batch_end")

    def __init__(self, msg: Any, error: BaseException, op: Optional[ReplicationOp] = None,
                 malformed: bool = False, batch_end: Optional[int] = None) -> None:
        self.msg = msg
        self.error = error
        self.op = op
        self.malformed = malformed
        self.batch_end = batch_end  # last offset of a failed multi-op batch


class _Outcome:
    """What processing one partition's records of a consume() batch did."""

    __slots__ = ("done", "handled", "skipped", "transactions", "failure", "rest")

    def __init__(self) -> None:
        self.done: Any = None  # last record whose work is finished (its offset + 1 gets stored)
        self.handled = 0
        self.skipped = 0
        self.transactions = 0
        self.failure: Optional[_Failure] = None
        self.rest: Any = None  # first record put back unhandled (time budget used up, or stopping)


class _StopRequest(Exception):
    """Internal: raised by a batch handler to stop consuming without handling its batch (the CLI's closed stdout)."""


class _Fatal(Exception):
    """Internal: an error that must stop the consumer (carries the PgreplError to raise)."""

    def __init__(self, error: PgreplError) -> None:
        super().__init__(str(error))
        self.error = error


# ------------------------------------------------------------------------------------------
# The consumer
# ------------------------------------------------------------------------------------------


class Consumer:
    """Consumes ReplicationOps of ``topics`` as member of consumer group ``group_id``.

    ``kafka_config`` adds librdkafka settings (security, timeouts...) over pgrepl's defaults;
    offset storing is pgrepl's and cannot be changed. ``on_error`` decides what a failing
    record does: ``"retry"`` (default; forever, backoff from ``retry_backoff`` doubling up to
    ``max_backoff``), ``"stop"`` (after ``max_attempts`` failed attempts the ``start_*`` call
    raises ``HandlerError``) or ``"dead_letter"`` (after ``max_attempts``, the record goes to
    ``dead_letter_topic`` with error headers and consumption goes on). Records that are not
    ReplicationOps go to the policy at once (retrying cannot fix them); under ``"retry"`` they
    hold their partition and are logged at every backoff.

    ``batch_size`` caps the ops per ``handle_batch`` call / sink transaction; ``workers``
    partitions are handled in parallel (threads; one sink connection each). Up to
    ``poll_batch`` records are fetched per poll; once handling them took ``max_batch_time``
    seconds, the rest is put back (seek) and the consumer polls again, so rebalances and
    ``stop()`` wait for at most one handler batch. ``state_table``
    names the idempotent mode's state table (``table`` or ``schema.table``).
    ``commit_offsets=False`` never commits to Kafka (inspection without moving the group).
    A Consumer runs once: after ``stop()`` make a new one.
    """

    def __init__(
        self,
        group_id: str,
        topics: Union[str, Sequence[str]],
        brokers: str,
        kafka_config: Optional[Mapping[str, Any]] = None,
        *,
        on_error: str = "retry",
        max_attempts: int = 5,
        dead_letter_topic: Optional[str] = None,
        retry_backoff: float = 0.5,
        max_backoff: float = 30.0,
        batch_size: int = 1000,
        poll_batch: int = 10000,
        poll_timeout: float = 0.25,
        max_batch_time: float = 1.0,
        workers: int = 1,
        state_table: str = DEFAULT_STATE_TABLE,
        commit_offsets: bool = True,
        stop_at_eof: bool = False,
        status_interval: float = 10.0,
        handle_signals: bool = True,
    ) -> None:
        if not isinstance(group_id, str) or not group_id:
            raise ConfigError("group_id must be a non-empty consumer group name")
        if isinstance(topics, str):
            topics = [t.strip() for t in topics.split(",") if t.strip()]
        topics = list(topics)
        if not topics or not all(isinstance(t, str) and t for t in topics):
            raise ConfigError("topics must be a non-empty list of topic names")
        if not isinstance(brokers, str) or not brokers.strip():
            raise ConfigError("brokers must be a comma-separated list of host:port")
        if on_error not in _POLICIES:
            raise ConfigError(f"on_error must be one of {_POLICIES}, got {on_error!r}")
        if on_error == "dead_letter" and not dead_letter_topic:
            raise ConfigError("on_error='dead_letter' needs dead_letter_topic")
        if dead_letter_topic is not None and dead_letter_topic in topics:
            raise ConfigError("dead_letter_topic must not be one of the consumed topics")
        for name, value in (("max_attempts", max_attempts), ("batch_size", batch_size),
                            ("poll_batch", poll_batch), ("workers", workers)):
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (retry_backoff > 0 and max_backoff >= retry_backoff and poll_timeout > 0 and max_batch_time > 0):
            raise ConfigError("retry_backoff, poll_timeout and max_batch_time must be > 0 and max_backoff >= retry_backoff")
        self.group_id = group_id
        self.topics = topics
        self.brokers = brokers
        self.on_error = on_error
        self.max_attempts = max_attempts
        self.dead_letter_topic = dead_letter_topic
        self.retry_backoff = retry_backoff
        self.max_backoff = max_backoff
        self.batch_size = batch_size
        self.poll_batch = min(poll_batch, 1_000_000)
        self._poll_size = self.poll_batch
        self.poll_timeout = poll_timeout
        self.max_batch_time = max_batch_time
        self._deadline = 0.0
        self.workers = workers
        self.state_table = parse_table_name(state_table)
        self._single_topic = topics[0] if len(topics) == 1 and not topics[0].startswith("^") else None
        self.commit_offsets = commit_offsets
        self.stop_at_eof = stop_at_eof
        self.status_interval = status_interval
        self.handle_signals = handle_signals
        self._user_config: Dict[str, Any] = dict(kafka_config or {})
        self.kafka_config = self._kafka_settings(self._user_config)
        self.stats = ConsumerStats()
        self._waker = Waker()
        self._fatal: Optional[PgreplError] = None
        self._parts: Dict[Tuple[str, int], _Part] = {}
        self._assigned: Set[Tuple[str, int]] = set()
        self._eof: Set[Tuple[str, int]] = set()
        self._rebalanced = False
        self._dlq: Optional[KafkaProducer] = None
        self._sink: Optional[PostgresSink] = None
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._topic_error_logged: Dict[str, float] = {}
        self._running = threading.Lock()

    def _kafka_settings(self, extra: Mapping[str, Any]) -> Dict[str, Any]:
        if "enable.auto.commit" in extra:
            raise ConfigError("kafka_config may not set enable.auto.commit: use commit_offsets=False to never commit")
        arguments: Dict[str, Any] = {"group.id": self.group_id, "bootstrap.servers": self.brokers,
                                     "enable.auto.commit": self.commit_offsets}
        if self.stop_at_eof:
            arguments["enable.partition.eof"] = True
        settings = kafka_settings.merge(
            extra, defaults=DEFAULT_KAFKA_CONFIG, required=REQUIRED_KAFKA_CONFIG,
            required_because="it stores offsets only after the handler succeeded",
            arguments=arguments, logger=logging.getLogger(__name__ + ".librdkafka"))
        settings["error_cb"] = self._on_kafka_error
        return settings

    # -- control -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the consumer to stop after the current handler batch: safe from any thread and from a signal handler.

        Work in flight finishes, the rest of the fetched records is left for the next run,
        stored offsets are committed and the member leaves the group.
        """
        self._waker.set()

    @property
    def _stopping(self) -> bool:
        return self._waker.is_set

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called."""
        return self._waker.is_set

    @property
    def assignment(self) -> List[Tuple[str, int]]:
        """The (topic, partition) pairs currently assigned to this member."""
        return sorted(self._assigned)

    def start_basic(self, handle: Handler) -> None:
        """At-least-once: ``handle(op)`` for every op; runs until ``stop()`` or a fatal error (raised)."""
        self._start(self._basic_runner(handle), None)

    def start_basic_batch(self, handle_batch: BatchHandler) -> None:
        """At-least-once, batches: ``handle_batch(ops)`` gets up to ``batch_size`` ops of one partition."""
        self._start(self._basic_batch_runner(handle_batch), None)

    def start_idempotent(self, handle_tx: TxHandler, dsn: str) -> None:
        """Exactly-once into PostgreSQL at ``dsn``: one sink transaction per op, ``handle_tx(cursor, op)`` inside it."""
        self._start(self._idempotent_runner(lambda cur, ops: handle_tx(cur, ops[0]), 1), dsn)

    def start_idempotent_batch(self, handle_batch_tx: BatchTxHandler, dsn: str) -> None:
        """Exactly-once, batches: ``handle_batch_tx(cursor, ops)`` for up to ``batch_size`` ops in one transaction."""
        self._start(self._idempotent_runner(handle_batch_tx, self.batch_size), dsn)

    async def run_basic(self, handle: Union[Handler, BatchHandler, Callable[..., Awaitable[Any]]], *,
                        batch: bool = False) -> None:
        """asyncio form of ``start_basic``/``start_basic_batch``; cancelling the task stops the consumer.

        The loop runs in a thread; a coroutine-function handler is awaited on the calling
        event loop (one call at a time per partition, in order).
        """
        loop = asyncio.get_running_loop()
        handler = _bridge(handle, loop)
        target = self.start_basic_batch if batch else self.start_basic
        await self._run_in_thread(lambda: target(handler))

    async def run_idempotent(self, handle_tx: Union[TxHandler, BatchTxHandler, Callable[..., Awaitable[Any]]],
                             dsn: str, *, batch: bool = False) -> None:
        """asyncio form of ``start_idempotent``/``start_idempotent_batch`` (see ``run_basic``)."""
        loop = asyncio.get_running_loop()
        handler = _bridge(handle_tx, loop)
        target = self.start_idempotent_batch if batch else self.start_idempotent
        await self._run_in_thread(lambda: target(handler, dsn))

    async def _run_in_thread(self, target: Callable[[], None]) -> None:
        self.handle_signals = False
        await run_in_thread(target, self.stop)

    # -- runners: process one partition's records, return an _Outcome ---------------------

    def _basic_runner(self, handle: Handler) -> Callable[[_Part, List[Any]], _Outcome]:
        size = self.batch_size

        def run(part: _Part, msgs: List[Any]) -> _Outcome:
            out = _Outcome()
            parse = ReplicationOp.from_json
            done = None
            handled = 0
            for start in range(0, len(msgs), size):
                if start and self._out_of_time():
                    out.rest = msgs[start]
                    break
                for msg in msgs[start:start + size]:
                    try:
                        op = parse(msg.value())
                    except MalformedRecordError as exc:
                        out.failure = _Failure(msg, exc, malformed=True)
                        break
                    try:
                        handle(op)
                    except Exception as exc:
                        out.failure = _Failure(msg, exc, op)
                        break
                    done = msg
                    handled += 1
                if out.failure is not None:
                    break
            out.done, out.handled = done, handled
            return out
        return run

    def _out_of_time(self) -> bool:
        """Whether to put the rest of a consume() batch back: stopping, or its time budget is used up.

        Rebalance callbacks run inside consume(); returning to it regularly means a revocation
        waits for at most one handler batch, not for a whole fetched backlog.
        """
        return self._stopping or time.monotonic() > self._deadline

    def _chunks(self, part: _Part, msgs: List[Any], size: int) -> Iterable[List[Any]]:
        """Split into handler batches; one op at a time while isolating a failed batch."""
        start = 0
        if part.isolate_until is not None:
            limit = part.isolate_until
            while start < len(msgs) and msgs[start].offset() <= limit:
                yield msgs[start:start + 1]
                start += 1
            if start < len(msgs):
                part.isolate_until = None
        for i in range(start, len(msgs), size):
            yield msgs[i:i + size]

    @staticmethod
    def _parse_chunk(chunk: List[Any]) -> Tuple[List[ReplicationOp], Optional[_Failure]]:
        ops: List[ReplicationOp] = []
        parse = ReplicationOp.from_json
        for msg in chunk:
            try:
                ops.append(parse(msg.value()))
            except MalformedRecordError as exc:
                return ops, _Failure(msg, exc, malformed=True)
        return ops, None

    def _start_basic_records(self, handle_records: Callable[[List[Tuple[Any, ReplicationOp]]], Any]) -> None:
        """Internal (the ``pgrepl consume`` command): like ``start_basic_batch`` with the Kafka messages."""
        self._start(self._basic_batch_runner(handle_records, with_messages=True), None)

    def _basic_batch_runner(self, handle_batch: Callable[[Any], Any],
                            with_messages: bool = False) -> Callable[[_Part, List[Any]], _Outcome]:
        def run(part: _Part, msgs: List[Any]) -> _Outcome:
            out = _Outcome()
            first = True
            for chunk in self._chunks(part, msgs, self.batch_size):
                if not first and self._out_of_time():
                    out.rest = chunk[0]
                    return out
                first = False
                ops, bad = self._parse_chunk(chunk)
                if ops:
                    try:
                        handle_batch(list(zip(chunk, ops)) if with_messages else ops)
                    except _StopRequest:
                        self.stop()
                        out.rest = chunk[0]  # not handled: not stored
                        return out
                    except Exception as exc:
                        end = chunk[len(ops) - 1].offset()
                        out.failure = _Failure(chunk[0], exc, ops[0], batch_end=end if len(ops) > 1 else None)
                        return out
                    out.handled += len(ops)
                    out.done = chunk[len(ops) - 1]
                if bad is not None:
                    out.failure = bad
                    return out
            return out
        return run

    def _idempotent_runner(self, handler: BatchTxHandler, size: int) -> Callable[[_Part, List[Any]], _Outcome]:
        def run(part: _Part, msgs: List[Any]) -> _Outcome:
            out = _Outcome()
            sink = self._sink
            assert sink is not None
            first = True
            for chunk in self._chunks(part, msgs, size):
                if not first and self._out_of_time():
                    out.rest = chunk[0]
                    return out
                first = False
                ops, bad = self._parse_chunk(chunk)
                if ops:
                    failure = self._transaction(sink, part, chunk, ops, handler, out)
                    if failure is not None:
                        out.failure = failure
                        return out
                if bad is not None:
                    out.failure = bad
                    return out
            return out
        return run

    def _transaction(self, sink: PostgresSink, part: _Part, chunk: List[Any], ops: List[ReplicationOp],
                     handler: BatchTxHandler, out: _Outcome) -> Optional[_Failure]:
        """Apply ``ops`` (the parsed prefix of ``chunk``) exactly once; None on success."""
        position = part.position
        if position is not None and not any((op.lsn, op.seq_id) > position for op in ops):
            # Every op is at or below a position this partition already committed: positions
            # only ever grow, so the sink has them too. Skip without a transaction.
            out.skipped += len(ops)
            out.done = chunk[len(ops) - 1]
            return None
        conn = None
        try:
            conn = sink.acquire()
            cur = conn.cursor()
            cur.execute(sink.begin_sql, (f"{sink.group_id}\x1f{part.topic}", part.partition,
                                         sink.group_id, part.topic, part.partition))
            row = cur.fetchone()
            stored = (parse_lsn(row[0]), row[1]) if row is not None else (-1, -1)
            last = stored
            apply: List[ReplicationOp] = []
            last_index = -1
            for index, op in enumerate(ops):
                pos = (op.lsn, op.seq_id)
                if pos > last:
                    apply.append(op)
                    last = pos
                    last_index = index
            if apply:
                handler(cur, apply)
                status = conn.info.transaction_status
                if status == psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                    raise _Fatal(HandlerError(
                        f"the handler ended the sink transaction at {part.where(chunk[0].offset())}: it must not "
                        "COMMIT or ROLLBACK (pgrepl commits its work together with the state); stopping, since "
                        "its work may now be committed without the state", part.topic, part.partition,
                        chunk[0].offset(), ops[0].lsn, ops[0].seq_id))
                if status != psycopg2.extensions.TRANSACTION_STATUS_INTRANS:
                    raise ConsumerError("the sink transaction is in an error state after the handler returned "
                                        "(a failed statement was caught and ignored)")
                cur.execute(sink.commit_sql, (sink.group_id, part.topic, part.partition, format_lsn(last[0]),
                                              last[1], chunk[last_index].offset()))
                out.transactions += 1
            else:
                cur.execute("COMMIT")
            cur.close()
        except Exception as exc:
            part.position = None  # unknown whether it committed: reload from the sink next time
            if conn is not None:
                if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) or conn.closed:
                    sink.discard(conn)
                else:
                    try:
                        with conn.cursor() as rb:
                            rb.execute("ROLLBACK")
                        sink.release(conn)
                    except Exception:
                        sink.discard(conn)
            if isinstance(exc, _Fatal):
                raise
            if isinstance(exc, ConfigError):
                raise _Fatal(exc) from None
            end = chunk[len(ops) - 1].offset()
            return _Failure(chunk[0], exc, ops[0], batch_end=end if len(ops) > 1 else None)
        sink.release(conn)
        part.position = last
        out.handled += len(apply)
        out.skipped += len(ops) - len(apply)
        out.done = chunk[len(ops) - 1]
        return None

    # -- main loop -------------------------------------------------------------------------

    def _start(self, runner: Callable[[_Part, List[Any]], _Outcome], dsn: Optional[str]) -> None:
        if not self._running.acquire(blocking=False):
            raise RuntimeError("this Consumer is already running")
        restore = self._install_signal_handlers()
        try:
            if dsn is not None:
                if not isinstance(dsn, str) or not dsn:
                    raise ConfigError("dsn must be a PostgreSQL connection string")
                self._sink = PostgresSink(dsn, self.state_table, self.group_id, self.workers)
                self._prepare_sink()
            if self._stopping:
                return
            self._run(runner)
        finally:
            restore()
            if self._sink is not None:
                self._sink.close()
            self._running.release()

    def _prepare_sink(self) -> None:
        """Create/check the state table; transient connection errors are retried until stop()."""
        assert self._sink is not None
        backoff = self.retry_backoff
        while not self._stopping:
            try:
                self._sink.prepare()
                return
            except psycopg2.OperationalError as exc:
                log.warning("sink database %s not reachable (%s); retrying in %.1f s",
                            redact_dsn(self._sink.dsn), first_line(exc), backoff)
                self._sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    def _install_signal_handlers(self) -> Callable[[], None]:
        return install_stop_handlers(self.stop, self.handle_signals)

    def _sleep(self, seconds: float) -> None:
        """Sleep that ``stop()`` cuts short."""
        self._waker.wait(seconds)

    def _on_kafka_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = ConsumerError(f"fatal Kafka consumer error: {err.str()}")
            self.stop()
        else:
            log.warning("Kafka: %s", err.str())

    def _run(self, runner: Callable[[_Part, List[Any]], _Outcome]) -> None:
        try:
            kafka = KafkaConsumer(self.kafka_config)
        except KafkaException as exc:
            raise ConfigError(f"invalid Kafka consumer settings: {exc.args[0].str() if exc.args else exc}") from None
        if self.workers > 1:
            self._executor = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="pgrepl-consumer")
        try:
            kafka.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
            log.info("consuming %s as group %s from %s", ", ".join(self.topics), self.group_id, self.brokers)
            self._loop(kafka, runner)
        except _Fatal as fatal:
            self._fatal = self._fatal or fatal.error
        except KafkaException as exc:
            self._fatal = self._fatal or ConsumerError(f"Kafka consumer error: {exc.args[0].str() if exc.args else exc}")
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._close(kafka)
        if self._fatal is not None:
            raise self._fatal

    def _close(self, kafka: KafkaConsumer) -> None:
        if self.commit_offsets:
            self._commit_sync(kafka, "stopping")
        try:
            kafka.close()  # leaves the group: partitions move to the other members now
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the Kafka consumer: %s", exc)
        if self._dlq is not None:
            self._dlq.flush(10)
        log.info("consumer of group %s stopped: %d ops handled, %d skipped, %d dead-lettered",
                 self.group_id, self.stats.handled, self.stats.skipped, self.stats.dead_lettered)

    def _commit_sync(self, kafka: KafkaConsumer, why: str) -> None:
        try:
            kafka.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == KafkaError._NO_OFFSET:
                return
            log.warning("committing offsets (%s) failed: %s", why, exc)
        except RuntimeError:  # consumer closed
            pass

    def _loop(self, kafka: KafkaConsumer, runner: Callable[[_Part, List[Any]], _Outcome]) -> None:
        stats = self.stats
        consume = kafka.consume
        next_status = time.monotonic() + self.status_interval
        last_status = (time.monotonic(), stats.handled + stats.skipped)
        while not self._stopping:
            timeout = self._resume_due(kafka)
            msgs = consume(self._poll_size, timeout)
            if self._fatal is not None:
                return
            if msgs:
                groups = self._group(msgs)
                if groups:
                    stats.batches += 1
                    self._process(kafka, runner, groups)
            if self.stop_at_eof and self._assigned and self._eof >= self._assigned and not any(
                    p.fail_offset is not None for p in self._parts.values()):
                log.info("every assigned partition is at its end; stopping")
                self.stop()
            now = time.monotonic()
            if now >= next_status:
                done = stats.handled + stats.skipped
                rate = (done - last_status[1]) / max(now - last_status[0], 1e-9)
                log.info("status: %.0f ops/s, %d handled, %d skipped, %d failed attempts, %d dead-lettered, "
                         "%d partitions assigned", rate, stats.handled, stats.skipped, stats.failures,
                         stats.dead_lettered, len(self._assigned))
                last_status = (now, done)
                next_status = now + self.status_interval

    def _group(self, msgs: List[Any]) -> Dict[Tuple[str, int], List[Any]]:
        """Records by partition, in offset order; errors and stale records dealt with here."""
        groups: Dict[Tuple[str, int], List[Any]] = {}
        topic = self._single_topic
        if topic is not None:
            # one topic subscribed (the usual case): group by partition number, cheaper per record
            by_partition: Dict[int, List[Any]] = {}
            for msg in msgs:
                if msg.error() is not None:
                    self._on_message_error(msg)
                    continue
                partition = msg.partition()
                group = by_partition.get(partition)
                if group is None:
                    by_partition[partition] = [msg]
                else:
                    group.append(msg)
            for partition, group in by_partition.items():
                groups[(topic, partition)] = group
        else:
            for msg in msgs:
                if msg.error() is not None:
                    self._on_message_error(msg)
                    continue
                key = (msg.topic(), msg.partition())
                group = groups.get(key)
                if group is None:
                    groups[key] = [msg]
                else:
                    group.append(msg)
        self.stats.records += len(msgs)
        if self.stop_at_eof:
            eof = self._eof
            for msg in msgs:  # in order: a record after an EOF event means the partition grew
                err = msg.error()
                if err is None:
                    eof.discard((msg.topic(), msg.partition()))
                elif err.code() == KafkaError._PARTITION_EOF:
                    eof.add((msg.topic(), msg.partition()))
        parts = self._parts
        for key in list(groups):
            part = parts.get(key)
            if part is None:
                if self._rebalanced and key not in self._assigned:
                    del groups[key]  # fetched before a revocation: the new owner handles it
                    continue
                parts[key] = part = _Part(key[0], key[1])
            if part.paused:
                del groups[key]  # fetched before the seek: it comes again after the retry
                continue
            if self._rebalanced:
                # a revoke + re-assign inside one consume() call: keep the newest run of offsets
                group = groups[key]
                for i in range(len(group) - 1, 0, -1):
                    if group[i].offset() <= group[i - 1].offset():
                        groups[key] = group[i:]
                        break
        self._rebalanced = False
        return groups

    def _on_message_error(self, msg: Any) -> None:
        err = msg.error()
        code = err.code()
        if code == KafkaError._PARTITION_EOF:
            return  # tracked in _group when stop_at_eof
        if err.fatal():
            raise _Fatal(ConsumerError(f"fatal Kafka consumer error: {err.str()}"))
        topic = msg.topic() or "?"
        now = time.monotonic()
        if now - self._topic_error_logged.get(topic, -1e9) >= _TOPIC_ERRORS_LOGGED_EVERY:
            self._topic_error_logged[topic] = now
            log.warning("Kafka consumer error on topic %s: %s", topic, err.str())

    def _process(self, kafka: KafkaConsumer, runner: Callable[[_Part, List[Any]], _Outcome],
                 groups: Dict[Tuple[str, int], List[Any]]) -> None:
        parts = self._parts
        self._deadline = time.monotonic() + self.max_batch_time
        results: List[Tuple[Tuple[str, int], _Outcome]] = []
        fatal: Optional[BaseException] = None
        if self._executor is not None and len(groups) > 1:
            futures = {key: self._executor.submit(runner, parts[key], msgs) for key, msgs in groups.items()}
            for key, future in futures.items():
                try:
                    results.append((key, future.result()))
                except BaseException as exc:  # _Fatal or a bug: settle the others first
                    fatal = fatal or exc
        else:
            for key, msgs in groups.items():
                try:
                    results.append((key, runner(parts[key], msgs)))
                except BaseException as exc:
                    fatal = exc
                    break
        put_back = False
        handled = 0
        for key, outcome in results:
            try:
                self._settle(kafka, parts[key], outcome)
            except _Fatal as exc:  # the stop policy: store what the other partitions finished first
                fatal = fatal or exc
            put_back = put_back or outcome.rest is not None
            handled += outcome.handled + outcome.skipped
        if fatal is not None:
            raise fatal
        # Slow handlers: fetch about what fits in the time budget, so the rest is not fetched over and over.
        if put_back:
            self._poll_size = max(self.batch_size, min(handled, self.poll_batch))
        elif self._poll_size < self.poll_batch:
            self._poll_size = min(self._poll_size * 2, self.poll_batch)

    def _settle(self, kafka: KafkaConsumer, part: _Part, out: _Outcome) -> None:
        stats = self.stats
        stats.handled += out.handled
        stats.skipped += out.skipped
        stats.transactions += out.transactions
        if out.done is not None:
            self._store(kafka, out.done.topic(), out.done.partition(), out.done.offset() + 1)
            if part.fail_offset is not None and out.done.offset() >= part.fail_offset:
                log.info("%s: handled after %d failed attempt(s)", part.where(part.fail_offset), part.attempts)
                part.fail_offset = None
                part.attempts = 0
        if out.failure is not None:
            self._on_failure(kafka, part, out.failure)
        elif out.rest is not None:
            # put the unhandled rest back: fetched again from here on the next polls
            try:
                kafka.seek(TopicPartition(part.topic, part.partition, out.rest.offset()))
            except KafkaException as exc:  # revoked meanwhile: the next owner starts at the committed offset
                log.debug("cannot seek %s back: %s", part.where(out.rest.offset()), exc)

    def _store(self, kafka: KafkaConsumer, topic: str, partition: int, next_offset: int) -> None:
        try:
            kafka.store_offsets(offsets=[TopicPartition(topic, partition, next_offset)])
        except KafkaException as exc:  # the partition was revoked meanwhile
            log.debug("not storing offset %d of %s[%d]: %s", next_offset, topic, partition, exc)

    # -- failures ---------------------------------------------------------------------------

    def _on_failure(self, kafka: KafkaConsumer, part: _Part, failure: _Failure) -> None:
        msg = failure.msg
        offset = msg.offset()
        self.stats.failures += 1
        self._eof.discard((part.topic, part.partition))
        if part.fail_offset == offset:
            part.attempts += 1
        else:
            part.fail_offset = offset
            part.attempts = 1
        op = failure.op
        what = (f"record {part.where(offset)} is not a ReplicationOp" if failure.malformed else
                f"handler failed at {part.where(offset)}" +
                (f" (batch up to offset {failure.batch_end})" if failure.batch_end is not None else "") +
                (f" (op lsn {format_lsn(op.lsn)}, seq_id {op.seq_id})" if op is not None else ""))
        reason = f"{type(failure.error).__name__}: {failure.error}"
        give_up = self.on_error != "retry" and (failure.malformed or part.attempts >= self.max_attempts)
        if give_up and self.on_error == "dead_letter" and failure.batch_end is not None:
            # a batch keeps failing: find the culprit by handling its ops one at a time
            log.warning("%s, attempt %d: %s; retrying its ops one at a time to find the failing one",
                        what, part.attempts, reason)
            part.isolate_until = failure.batch_end
            part.attempts = 0
            part.fail_offset = None
            self._rewind(kafka, part, offset, 0.0)
            return
        if give_up and self.on_error == "stop":
            log.error("%s, attempt %d: %s; stopping (on_error='stop')", what, part.attempts, reason,
                      exc_info=failure.error)
            error = HandlerError(f"{what}: {reason}", part.topic, part.partition, offset,
                                 op.lsn if op is not None else None, op.seq_id if op is not None else None)
            error.__cause__ = failure.error
            raise _Fatal(error)
        if give_up and self.on_error == "dead_letter":
            try:
                self._dead_letter(msg, part, failure, reason)
            except Exception as exc:
                log.error("%s; sending it to dead-letter topic %s failed: %s; retrying", what,
                          self.dead_letter_topic, exc)
                self._rewind(kafka, part, offset, self._backoff(part.attempts))
                return
            log.error("%s, attempt %d: %s; sent to dead-letter topic %s", what, part.attempts, reason,
                      self.dead_letter_topic, exc_info=None if failure.malformed else failure.error)
            self.stats.dead_lettered += 1
            self._store(kafka, part.topic, part.partition, offset + 1)
            part.fail_offset = None
            part.attempts = 0
            self._rewind(kafka, part, offset + 1, 0.0)
            return
        delay = self._backoff(part.attempts)
        now = time.monotonic()
        first = part.attempts == 1
        log.error("%s, attempt %d: %s; retrying in %.1f s", what, part.attempts, reason, delay,
                  exc_info=failure.error if first or now - part.last_error_log > 60 else None)
        if first or now - part.last_error_log > 60:
            part.last_error_log = now
        self._rewind(kafka, part, offset, delay)

    def _backoff(self, attempts: int) -> float:
        return float(min(self.retry_backoff * (2 ** min(attempts - 1, 30)), self.max_backoff))

    def _rewind(self, kafka: KafkaConsumer, part: _Part, offset: int, delay: float) -> None:
        """Pause the partition and seek it to ``offset``; it resumes after ``delay`` seconds."""
        tp = TopicPartition(part.topic, part.partition, offset)
        try:
            kafka.pause([TopicPartition(part.topic, part.partition)])
            part.paused = True
            kafka.seek(tp)
        except KafkaException as exc:  # revoked meanwhile: the next owner starts at the committed offset
            log.info("cannot seek %s back (%s); leaving it to its next owner", part.where(offset), exc)
            self._parts.pop((part.topic, part.partition), None)
            return
        part.retry_at = time.monotonic() + delay

    def _resume_due(self, kafka: KafkaConsumer) -> float:
        """Resume partitions whose retry time came; returns how long consume() may block."""
        timeout = self.poll_timeout
        now = time.monotonic()
        for part in self._parts.values():
            if part.paused:
                if part.retry_at <= now:
                    try:
                        kafka.resume([TopicPartition(part.topic, part.partition)])
                    except KafkaException as exc:
                        log.debug("resume %s[%d]: %s", part.topic, part.partition, exc)
                    part.paused = False
                else:
                    timeout = min(timeout, part.retry_at - now)
        return max(timeout, 0.0)

    def _dead_letter(self, msg: Any, part: _Part, failure: _Failure, reason: str) -> None:
        """Produce the failed record to the dead-letter topic and wait for its delivery."""
        if self._dlq is None:
            config = kafka_settings.connection_settings(self._user_config)
            config.update({"bootstrap.servers": self.brokers, "enable.idempotence": True, "acks": "all",
                           "logger": logging.getLogger(__name__ + ".librdkafka")})
            self._dlq = KafkaProducer(config)
        headers = list(msg.headers() or [])
        headers += [
            ("pgrepl.error", reason.encode("utf-8", "replace")[:4000]),
            ("pgrepl.source.topic", part.topic.encode()),
            ("pgrepl.source.partition", str(part.partition).encode()),
            ("pgrepl.source.offset", str(msg.offset()).encode()),
            ("pgrepl.group", self.group_id.encode()),
            ("pgrepl.kind", b"malformed" if failure.malformed else b"handler"),
        ]
        result: List[Any] = []
        assert self.dead_letter_topic is not None
        self._dlq.produce(self.dead_letter_topic, msg.value(), msg.key(), headers=headers,
                          on_delivery=lambda err, _m: result.append(err))
        deadline = time.monotonic() + 30
        while not result and time.monotonic() < deadline:
            self._dlq.poll(0.1)
        if not result:
            raise ConsumerError("no delivery report within 30 s")
        if result[0] is not None:
            raise ConsumerError(str(result[0]))

    # -- rebalance ---------------------------------------------------------------------------

    def _on_assign(self, kafka: KafkaConsumer, partitions: List[TopicPartition]) -> None:
        self.stats.rebalances += 1
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._assigned.add(key)
            part = self._parts.pop(key, None)  # idempotent position is reloaded from the sink
            if part is not None and part.paused:
                try:
                    kafka.resume([TopicPartition(tp.topic, tp.partition)])
                except KafkaException:
                    pass
            self._eof.discard(key)
        self._rebalanced = True
        log.info("group %s: assigned %s", self.group_id, _describe(partitions))

    def _on_revoke(self, kafka: KafkaConsumer, partitions: List[TopicPartition]) -> None:
        # Runs inside consume(): no batch is in flight, so work is finished, not interrupted.
        if self.commit_offsets:
            self._commit_sync(kafka, "partitions revoked")
        self._forget(kafka, partitions)
        log.info("group %s: revoked %s", self.group_id, _describe(partitions))

    def _on_lost(self, kafka: KafkaConsumer, partitions: List[TopicPartition]) -> None:
        self._forget(kafka, partitions)
        log.warning("group %s: lost %s (session expired?); uncommitted work will be replayed by the next owner",
                    self.group_id, _describe(partitions))

    def _forget(self, kafka: KafkaConsumer, partitions: List[TopicPartition]) -> None:
        paused = []
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._assigned.discard(key)
            self._eof.discard(key)
            part = self._parts.pop(key, None)
            if part is not None and part.paused:
                paused.append(TopicPartition(tp.topic, tp.partition))
        if paused:
            try:
                kafka.resume(paused)  # do not carry a pause into a later assignment
            except KafkaException:
                pass
        self._rebalanced = True


def _describe(partitions: List[TopicPartition]) -> str:
    if not partitions:
        return "no partitions"
    by_topic: Dict[str, List[int]] = {}
    for tp in partitions:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return "; ".join(f"{t} {sorted(ps)}" for t, ps in sorted(by_topic.items()))


def _bridge(handler: Callable[..., Any], loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    """A sync handler as is; a coroutine function wrapped to run on ``loop`` and be waited for."""
    if not asyncio.iscoroutinefunction(handler):
        return handler

    def call(*args: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(handler(*args), loop).result()

    return call
