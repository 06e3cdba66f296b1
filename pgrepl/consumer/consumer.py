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
import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import psycopg2
from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import KafkaException
from confluent_kafka import Producer as KafkaProducer

from pgrepl import kafka_settings
from pgrepl._runtime import Waker, install_stop_handlers, run_in_thread
from pgrepl.consumer.dispatch import Dispatcher
from pgrepl.consumer.failures import POLICIES, DeadLetterProducer, FailurePolicy
from pgrepl.consumer.loop import ConsumerLoop, KafkaErrors
from pgrepl.consumer.outcome import StopConsuming
from pgrepl.consumer.partitions import Partitions
from pgrepl.consumer.runners import BasicBatchRunner, BasicRunner, BatchTxHandler, IdempotentRunner, Runner, TimeBudget
from pgrepl.consumer.stats import ConsumerStats
from pgrepl.kafka_settings import kafka_error_text
from pgrepl.errors import ConfigError, first_line
from pgrepl.metrics import check_port
from pgrepl.model import ReplicationOp
from pgrepl.postgres.connect import redact_dsn
from pgrepl.sink.postgres import DEFAULT_STATE_TABLE, PostgresSink, parse_table_name

if TYPE_CHECKING:
    from pgrepl.metrics.consumer import ConsumerExporter

log = logging.getLogger(__name__)
kafka_log = logging.getLogger(__name__ + ".librdkafka")  # librdkafka's own log lines

__all__ = ["Consumer", "ConsumerStats", "StopConsuming"]

#: Handler signatures.
Handler = Callable[[ReplicationOp], Any]
BatchHandler = Callable[[List[ReplicationOp]], Any]
RecordsHandler = Callable[[List[Tuple[Any, ReplicationOp]]], Any]
TxHandler = Callable[[Any, ReplicationOp], Any]

#: Makes a Kafka client from its settings (``kafka_factory``, ``dead_letter_factory``).
KafkaFactory = Callable[[Dict[str, Any]], Any]

#: Ops per handler batch / sink transaction unless ``batch_size`` says otherwise. Large enough that
#: a sink transaction's fixed costs (lock, state row, commit) are small next to its rows.
DEFAULT_BATCH_SIZE = 5000

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
    partitions are handled in parallel (threads; one sink connection each). With one worker the
    idempotent forms are pipelined: the sink transactions run on a sink thread (the handler is
    called there), one at a time, while the consumer parses and fetches what comes next. Up to
    ``poll_batch`` records are fetched per poll; once handling them took ``max_batch_time``
    seconds, the rest is put back (seek) and the consumer polls again, so rebalances and
    ``stop()`` wait for at most one handler batch. ``state_table``
    names the idempotent mode's state table (``table`` or ``schema.table``).
    ``commit_offsets=False`` never commits to Kafka (inspection without moving the group).
    A Consumer runs once: after ``stop()`` make a new one.

    ``kafka_factory`` makes the Kafka consumer client from its settings and
    ``dead_letter_factory`` the dead-letter producer (``confluent_kafka.Consumer`` and
    ``confluent_kafka.Producer`` unless the embedding application wraps or replaces them).
    A handler may raise ``StopConsuming`` to stop without its op or batch being stored.

    ``metrics_port`` serves Prometheus metrics, ``/healthz`` and ``/readyz`` on ``metrics_host``
    while a ``start_*`` call runs (``pip install 'pgrepl[metrics]'``; 0: any free port, see
    ``metrics.port``).
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
        batch_size: int = DEFAULT_BATCH_SIZE,
        poll_batch: int = 10000,
        poll_timeout: float = 0.25,
        max_batch_time: float = 1.0,
        workers: int = 1,
        state_table: str = DEFAULT_STATE_TABLE,
        commit_offsets: bool = True,
        stop_at_eof: bool = False,
        status_interval: float = 10.0,
        handle_signals: bool = True,
        kafka_factory: Optional[KafkaFactory] = None,
        dead_letter_factory: Optional[KafkaFactory] = None,
        metrics_port: Optional[int] = None,
        metrics_host: str = "0.0.0.0",
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
        if on_error not in POLICIES:
            raise ConfigError(f"on_error must be one of {POLICIES}, got {on_error!r}")
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
        if metrics_port is not None:
            check_port(metrics_port, metrics_host)
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        #: The running exporter, while a ``start_*`` call runs with ``metrics_port``.
        self.metrics: Optional["ConsumerExporter"] = None
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
        self.poll_timeout = poll_timeout
        self.max_batch_time = max_batch_time
        self.workers = workers
        self.state_table = parse_table_name(state_table)
        self.commit_offsets = commit_offsets
        self.stop_at_eof = stop_at_eof
        self.status_interval = status_interval
        self.handle_signals = handle_signals
        self._user_config: Dict[str, Any] = dict(kafka_config or {})
        self.kafka_config = self._kafka_settings(self._user_config)
        self.kafka_factory: KafkaFactory = kafka_factory or KafkaConsumer
        self.dead_letter_factory: KafkaFactory = dead_letter_factory or KafkaProducer
        self.stats = ConsumerStats()
        self._waker = Waker()
        self._kafka_errors = KafkaErrors(self.stop)
        self.kafka_config["error_cb"] = self._kafka_errors
        self._partitions = Partitions(topics, track_eof=stop_at_eof)
        self._budget = TimeBudget(max_batch_time, self._waker)
        self._running = threading.Lock()

    def _kafka_settings(self, extra: Mapping[str, Any]) -> Dict[str, Any]:
        if "enable.auto.commit" in extra:
            raise ConfigError("kafka_config may not set enable.auto.commit: use commit_offsets=False to never commit")
        arguments: Dict[str, Any] = {"group.id": self.group_id, "bootstrap.servers": self.brokers,
                                     "enable.auto.commit": self.commit_offsets}
        if self.stop_at_eof:
            arguments["enable.partition.eof"] = True
        return kafka_settings.merge(
            extra, defaults=DEFAULT_KAFKA_CONFIG, required=REQUIRED_KAFKA_CONFIG,
            required_because="it stores offsets only after the handler succeeded",
            arguments=arguments, logger=kafka_log)

    def _dead_letter_settings(self) -> Dict[str, Any]:
        """The dead-letter producer's settings: the brokers and ``kafka_config``'s connection settings."""
        config = kafka_settings.connection_settings(self._user_config)
        config.update({"bootstrap.servers": self.brokers, "enable.idempotence": True, "acks": "all",
                       "logger": kafka_log})
        return config

    # -- control -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the consumer to stop after the current handler batch: safe from any thread and from a signal handler.

        Work in flight finishes, the rest of the fetched records is left for the next run,
        stored offsets are committed and the member leaves the group.
        """
        self._waker.set()

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called."""
        return self._waker.is_set

    @property
    def assignment(self) -> List[Tuple[str, int]]:
        """The (topic, partition) pairs currently assigned to this member."""
        return self._partitions.assigned

    def start_basic(self, handle: Handler) -> None:
        """At-least-once: ``handle(op)`` for every op; runs until ``stop()`` or a fatal error (raised)."""
        self._start(BasicRunner(handle, self.batch_size, self._budget))

    def start_basic_batch(self, handle_batch: Union[BatchHandler, RecordsHandler], *,
                          with_records: bool = False) -> None:
        """At-least-once, batches: ``handle_batch(ops)`` gets up to ``batch_size`` ops of one partition.

        ``with_records=True`` hands ``(message, op)`` pairs instead: the Kafka message gives the
        record's topic, partition, offset and raw value (``pgrepl consume`` prints those).
        """
        self._start(BasicBatchRunner(handle_batch, self.batch_size, self._budget, with_records))

    def start_idempotent(self, handle_tx: TxHandler, dsn: str) -> None:
        """Exactly-once into PostgreSQL at ``dsn``: one sink transaction per op, ``handle_tx(cursor, op)`` inside it."""
        self._start_idempotent(lambda cur, ops: handle_tx(cur, ops[0]), 1, dsn)

    def start_idempotent_batch(self, handle_batch_tx: BatchTxHandler, dsn: str) -> None:
        """Exactly-once, batches: ``handle_batch_tx(cursor, ops)`` for up to ``batch_size`` ops in one transaction."""
        self._start_idempotent(handle_batch_tx, self.batch_size, dsn)

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

    # -- running ---------------------------------------------------------------------------

    def _start(self, runner: Runner) -> None:
        with self._running_guard():
            if not self.stopping:
                self._consume(runner)

    def _start_idempotent(self, handler: BatchTxHandler, size: int, dsn: str) -> None:
        with self._running_guard():
            if not isinstance(dsn, str) or not dsn:
                raise ConfigError("dsn must be a PostgreSQL connection string")
            sink = PostgresSink(dsn, self.state_table, self.group_id, self.workers)
            try:
                self._prepare_sink(sink)
                if not self.stopping:
                    self._consume(IdempotentRunner(sink, handler, size, self._budget))
            finally:
                sink.close()

    @contextlib.contextmanager
    def _running_guard(self) -> Iterator[None]:
        """One run at a time, with SIGTERM/Ctrl-C calling ``stop()`` while it lasts."""
        if not self._running.acquire(blocking=False):
            raise RuntimeError("this Consumer is already running")
        restore = install_stop_handlers(self.stop, self.handle_signals)
        try:
            if self.metrics_port is not None:
                from pgrepl.metrics.consumer import ConsumerExporter

                self.metrics = ConsumerExporter(self, host=self.metrics_host, port=self.metrics_port)
                self.metrics.start()
                log.info("serving metrics, /healthz and /readyz on %s:%d", self.metrics_host, self.metrics.port)
            yield
        finally:
            if self.metrics is not None:
                self.metrics.stop()
                self.metrics = None
            restore()
            self._running.release()

    @property
    def user_kafka_config(self) -> Dict[str, Any]:
        """The ``kafka_config`` as given (connection settings for the exporter's broker probe)."""
        return dict(self._user_config)

    def _prepare_sink(self, sink: PostgresSink) -> None:
        """Create/check the state table; transient connection errors are retried until stop()."""
        backoff = self.retry_backoff
        while not self.stopping:
            try:
                sink.prepare()
                return
            except psycopg2.OperationalError as exc:
                log.warning("sink database %s not reachable (%s); retrying in %.1f s",
                            redact_dsn(sink.dsn), first_line(exc), backoff)
                self._waker.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    def _consume(self, runner: Runner) -> None:
        """Make the Kafka client and the loop's parts, and run the loop."""
        try:
            kafka = self.kafka_factory(self.kafka_config)
        except KafkaException as exc:
            raise ConfigError(f"invalid Kafka consumer settings: {kafka_error_text(exc)}") from None
        dead_letter = None
        if self.on_error == "dead_letter":
            assert self.dead_letter_topic is not None
            dead_letter = DeadLetterProducer(self.dead_letter_topic, self.group_id, self._dead_letter_settings(),
                                             self.dead_letter_factory)
        failures = FailurePolicy(kafka, self._partitions, self.stats, on_error=self.on_error,
                                 max_attempts=self.max_attempts, retry_backoff=self.retry_backoff,
                                 max_backoff=self.max_backoff, dead_letter=dead_letter)
        dispatcher = Dispatcher(kafka, self._partitions, failures, self.stats, self._budget,
                                batch_size=self.batch_size, poll_batch=self.poll_batch, workers=self.workers)
        ConsumerLoop(kafka, runner, partitions=self._partitions, dispatcher=dispatcher, failures=failures,
                     stats=self.stats, waker=self._waker, kafka_errors=self._kafka_errors,
                     group_id=self.group_id, topics=self.topics, brokers=self.brokers,
                     commit_offsets=self.commit_offsets, stop_at_eof=self.stop_at_eof,
                     poll_timeout=self.poll_timeout, status_interval=self.status_interval,
                     observe=self.metrics_port is not None).run()


def _bridge(handler: Callable[..., Any], loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    """A sync handler as is; a coroutine function wrapped to run on ``loop`` and be waited for."""
    if not asyncio.iscoroutinefunction(handler):
        return handler

    def call(*args: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(handler(*args), loop).result()

    return call
