"""Producer: streams a logical replication slot into Kafka, in WAL order, at least once, no gaps.

The loop: read every pgoutput message available (decoded in C by ``ReplicationStream`` into a
``Batch``), produce the batch's records with an idempotent confluent-kafka producer, and move
the slot's confirmed flush position only as far as delivery reports prove (``DeliveryTracker``).
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

import psycopg2
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka import Producer as KafkaProducer

from pgrepl import postgres
from pgrepl._lifecycle import install_stop_handlers, run_in_thread
from pgrepl._decode import Batch, Decoder, ReplicationStream, StreamError
from pgrepl.errors import ConfigError, DeliveryError, PgreplError
from pgrepl.lsn import DeliveryTracker, format_lsn
from pgrepl.topics import TopicInfo, TopicMapInput, normalize_topic_map

log = logging.getLogger(__name__)
kafka_log = logging.getLogger("pgrepl.kafka")  # librdkafka's own log lines


class _DropExpectedConfigWarning(logging.Filter):
    """librdkafka warns at every start that enable.gapless.guarantee is experimental: we know."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "enable.gapless.guarantee is experimental" not in record.getMessage()


kafka_log.addFilter(_DropExpectedConfigWarning())

#: librdkafka settings the guarantees rest on; ``kafka_config`` may add to them (SASL, TLS,
#: linger...) but cannot turn these off.
REQUIRED_KAFKA_CONFIG: Dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "enable.gapless.guarantee": True,
    "message.timeout.ms": 0,  # never expire a record: an outage blocks, it does not drop
}

#: Defaults the user may override.
DEFAULT_KAFKA_CONFIG: Dict[str, Any] = {
    "compression.type": "lz4",
    "linger.ms": 5,
    "queue.buffering.max.messages": 200_000,
    "queue.buffering.max.kbytes": 32 * 1024,  # bounded memory: backpressure beyond this
    "partitioner": "consistent_random",
}


@dataclass
class ProducerStats:
    """Running totals, readable from another thread (for status lines, tests and benchmarks)."""

    records: int = 0
    transactions: int = 0
    messages: int = 0
    bytes_received: int = 0
    confirmed_lsn: int = 0
    sessions: int = 0
    started_at: float = field(default_factory=time.monotonic)


class _Retry(Exception):
    """A failure worth retrying after a pause: connection lost, broker unreachable."""


class Producer:
    """Streams the changes of one publication from a logical replication slot into Kafka.

    ``topic_map`` maps table names (bare, or ``schema.table``) to ``TopicInfo`` or dicts with
    ``name`` and ``partition_key``. ``kafka_config`` holds extra librdkafka settings, merged
    over pgrepl's defaults (the idempotence/ordering settings cannot be overridden).
    ``truncate`` is ``"error"`` (default) or ``"skip"``.
    """

    def __init__(
        self,
        pg_dsn: str,
        brokers: str,
        slot: str,
        publication: str,
        topic_map: TopicMapInput,
        kafka_config: Optional[Mapping[str, Any]] = None,
        *,
        truncate: str = "error",
        status_interval: float = 10.0,
        feedback_interval: float = 1.0,
        stop_timeout: float = 30.0,
        max_backoff: float = 30.0,
        batch_messages: int = 4096,
        batch_bytes: int = 8 << 20,
        gather_seconds: float = 0.0005,
        handle_signals: bool = True,
    ) -> None:
        if not isinstance(pg_dsn, str) or not pg_dsn:
            raise ConfigError("pg_dsn must be a PostgreSQL connection string")
        if not isinstance(brokers, str) or not brokers.strip():
            raise ConfigError("brokers must be a comma-separated list of host:port")
        postgres.validate_slot_name(slot)
        if not isinstance(publication, str) or not publication:
            raise ConfigError("publication must be a non-empty name")
        if truncate not in ("error", "skip"):
            raise ConfigError(f"truncate must be 'error' or 'skip', got {truncate!r}")
        self.pg_dsn = pg_dsn
        self.brokers = brokers
        self.slot = slot
        self.publication = publication
        self.topic_map: Dict[str, TopicInfo] = normalize_topic_map(topic_map)
        self.truncate = truncate
        self.status_interval = status_interval
        self.feedback_interval = feedback_interval
        self.stop_timeout = stop_timeout
        self.max_backoff = max_backoff
        self.batch_messages = batch_messages
        self.batch_bytes = batch_bytes
        self.gather_seconds = gather_seconds
        self.handle_signals = handle_signals
        self.kafka_config = self._kafka_settings(kafka_config or {})
        self.stats = ProducerStats()
        self._stopping = False
        self._fatal: Optional[PgreplError] = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._running = threading.Lock()

    def _kafka_settings(self, extra: Mapping[str, Any]) -> Dict[str, Any]:
        for key, value in REQUIRED_KAFKA_CONFIG.items():
            if key in extra and str(extra[key]).lower() != str(value).lower():
                raise ConfigError(
                    f"kafka_config may not set {key}={extra[key]!r}: pgrepl's ordering and no-gap "
                    f"guarantees need {key}={value!r}")
        settings: Dict[str, Any] = dict(DEFAULT_KAFKA_CONFIG)
        settings.update(extra)
        settings.update(REQUIRED_KAFKA_CONFIG)
        try:
            too_big = int(settings.get("message.max.bytes", 1_000_000)) > int(settings["queue.buffering.max.kbytes"]) * 1024
        except (TypeError, ValueError):
            raise ConfigError("message.max.bytes and queue.buffering.max.kbytes must be integers") from None
        if too_big:
            raise ConfigError("message.max.bytes is larger than the producer queue (queue.buffering.max.kbytes "
                              "* 1024): such a record could never be queued; raise queue.buffering.max.kbytes")
        settings["bootstrap.servers"] = self.brokers
        settings["error_cb"] = self._on_kafka_error
        settings.setdefault("logger", kafka_log)
        return settings

    def __del__(self) -> None:
        for fd in (getattr(self, "_wake_r", None), getattr(self, "_wake_w", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    # -- control -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the producer to stop: safe from any thread and from a signal handler."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called."""
        return self._stopping

    def start(self) -> None:
        """Run until ``stop()`` or a fatal error (raised). Transient failures are retried."""
        if not self._running.acquire(blocking=False):
            raise RuntimeError("this Producer is already running")
        restore = self._install_signal_handlers()
        try:
            self._run()
        finally:
            restore()
            self._running.release()

    async def run(self) -> None:
        """asyncio entry point: runs the producer in a thread; cancelling the task stops it cleanly."""
        self.handle_signals = False
        await run_in_thread(self.start, self.stop)

    def _install_signal_handlers(self) -> Callable[[], None]:
        return install_stop_handlers(self.stop, self.handle_signals)

    def _on_kafka_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = DeliveryError(f"fatal Kafka producer error: {err.str()}")
            self.stop()
        else:
            log.warning("Kafka: %s", err.str())

    # -- main loop -----------------------------------------------------------------------

    def _run(self) -> None:
        kafka = KafkaProducer(self.kafka_config)
        backoff = 0.5
        try:
            while not self._stopping:
                try:
                    self._session(kafka)
                    backoff = 0.5
                except _Retry as exc:
                    if self._stopping:
                        break
                    log.warning("%s; retrying in %.1f s", exc, backoff)
                    self._sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
                if self._fatal is not None:
                    raise self._fatal
        finally:
            remaining = kafka.flush(max(self.stop_timeout, 0))
            if remaining:
                log.warning("stopped with %d records undelivered; they will be produced again on restart", remaining)
        if self._fatal is not None:
            raise self._fatal

    def _sleep(self, seconds: float) -> None:
        """Sleep that ``stop()`` interrupts."""
        try:
            select.select([self._wake_r], [], [], seconds)
        except InterruptedError:
            pass

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _partition_counts(self, kafka: KafkaProducer) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for info in self.topic_map.values():
            if info.name in counts:
                continue
            try:
                metadata = kafka.list_topics(info.name, timeout=10)
            except KafkaException as exc:
                raise _Retry(f"cannot reach Kafka at {self.brokers}: {exc}") from None
            topic = metadata.topics.get(info.name)
            if topic is None or topic.error is not None or not topic.partitions:
                error = topic.error if topic is not None else None
                if error is not None and error.code() in (KafkaError._TRANSPORT, KafkaError._TIMED_OUT,
                                                          KafkaError.LEADER_NOT_AVAILABLE):
                    raise _Retry(f"topic {info.name!r} not available yet: {error.str()}")
                raise ConfigError(
                    f"Kafka topic {info.name!r} does not exist at {self.brokers} "
                    f"({error.str() if error is not None else 'no partitions'}); create it or enable "
                    "auto.create.topics.enable on the brokers")
            counts[info.name] = len(topic.partitions)
        return counts

    def _preflight(self) -> "tuple[psycopg2.extensions.connection, int]":
        try:
            conn = postgres.connect(self.pg_dsn)
        except psycopg2.OperationalError as exc:
            raise _Retry(str(exc).strip()) from None
        try:
            postgres.check_server(conn)
            publication = postgres.load_publication(conn, self.publication)
            postgres.check_publication(publication, self.topic_map)
            slot = postgres.ensure_slot(conn, self.slot)
        except psycopg2.OperationalError as exc:
            conn.close()
            raise _Retry(f"PostgreSQL connection lost during checks: {str(exc).strip()}") from None
        except BaseException:
            conn.close()
            raise
        start = slot.confirmed_flush_lsn or 0
        return conn, start

    def _session(self, kafka: KafkaProducer) -> None:
        """One replication connection, from preflight to stop or failure."""
        conn, start_lsn = self._preflight()
        try:
            counts = self._partition_counts(kafka)
        except BaseException:
            conn.close()
            raise
        decoder = Decoder(self.topic_map, truncate=self.truncate)
        for topic, count in counts.items():
            decoder.set_partition_count(topic, count)
        rconn = None
        try:
            try:
                rconn = postgres.connect(self.pg_dsn, replication=True)
                rcur = rconn.cursor()
                command = (
                    f"START_REPLICATION SLOT {self.slot} LOGICAL {format_lsn(start_lsn)} "
                    f"(proto_version '1', publication_names "
                    f"'{postgres.publication_option(self.publication).replace(chr(39), chr(39) * 2)}')")
                rcur.start_replication_expert(command, decode=False)
                stream = ReplicationStream(rconn)
            except psycopg2.OperationalError as exc:
                raise _Retry(f"cannot start replication: {str(exc).strip()}") from None
            self.stats.sessions += 1
            self.stats.confirmed_lsn = max(self.stats.confirmed_lsn, start_lsn)
            log.info("streaming slot %s of publication %s from %s into Kafka at %s",
                     self.slot, self.publication, format_lsn(start_lsn), self.brokers)
            self._stream(kafka, conn, stream, decoder, DeliveryTracker(start_lsn))
        except StreamError as exc:
            raise _Retry(f"replication connection lost: {exc}") from None
        finally:
            for c in (rconn, conn):
                if c is not None:
                    try:
                        c.close()
                    except Exception:  # already broken
                        pass

    def _stream(self, kafka: KafkaProducer, conn: Any, stream: ReplicationStream, decoder: Decoder,
                tracker: DeliveryTracker) -> None:
        stats = self.stats
        sent_flush = -1
        last_feedback = 0.0
        next_status = time.monotonic() + self.status_interval
        last_status_records = stats.records
        last_status_time = time.monotonic()
        poll = kafka.poll
        wake = self._wake_r
        sock = stream.fileno()
        clean = False
        try:
            while not self._stopping:
                try:
                    batch = stream.read(decoder, self.batch_messages, self.batch_bytes)
                except PgreplError as exc:
                    self._produce_complete_transactions(kafka, stream, tracker, getattr(exc, "partial_batch", None))
                    raise
                if len(batch):
                    self._produce(kafka, stream, tracker, batch)
                elif batch.commits:
                    tracker.track(0, batch.commits[-1].end_lsn)
                stats.transactions += len(batch.commits)
                poll(0)
                if tracker.failure is not None:
                    raise DeliveryError(tracker.failure)
                idle = None if decoder.in_transaction else stream.last_wal_end
                confirmed = tracker.confirmable(idle)
                now = time.monotonic()
                # report progress at most every feedback_interval while busy, at once when caught
                # up (a quiet stream confirms promptly), and at least every 10 s
                changed = confirmed != sent_flush
                if stream.reply_requested or now - last_feedback >= 10.0 or (changed and (
                        stream.would_block and not tracker.in_flight or now - last_feedback >= self.feedback_interval)):
                    self._confirm(stream, confirmed)
                    sent_flush = confirmed
                    last_feedback = now
                if now >= next_status:
                    rate = (stats.records - last_status_records) / max(now - last_status_time, 1e-9)
                    self._log_status(conn, rate, confirmed)
                    last_status_records, last_status_time = stats.records, now
                    next_status = now + self.status_interval
                if stream.ended:
                    raise StreamError("the server ended the replication stream")
                if stream.would_block:
                    stats.messages = stream.messages
                    stats.bytes_received = stream.bytes_received
                    timeout = 0.05 if tracker.in_flight else 0.5
                    readable, _, _ = select.select([sock, wake], [], [], timeout)
                    if wake in readable:
                        self._drain_wakeups()
                    elif readable and len(batch) < self.batch_messages // 8:
                        # a trickle: let a few hundred microseconds of messages gather so that
                        # one wake-up (and one batch) carries many, instead of two or three
                        time.sleep(self.gather_seconds)
            clean = True
        finally:
            stats.messages = stream.messages
            stats.bytes_received = stream.bytes_received
            self._finish(kafka, stream, decoder, tracker, clean)

    def _produce(self, kafka: KafkaProducer, stream: ReplicationStream, tracker: DeliveryTracker,
                 batch: Batch) -> None:
        """Produce a batch in order; markers carry the delivery callback."""
        topics, values, keys, partitions = batch.topics, batch.values, batch.keys, batch.partitions
        commit_end = batch.commits[-1].end_lsn if batch.commits else None
        markers = batch.markers
        pending = tracker.track(len(markers), commit_end)
        assert pending is not None
        callback = pending.on_delivery
        produce = kafka.produce
        index = 0
        produced_markers = 0
        try:
            for marker in markers:
                while index <= marker:
                    try:
                        while index < marker:
                            produce(topics[index], values[index], keys[index], partitions[index])
                            index += 1
                        produce(topics[index], values[index], keys[index], partitions[index], on_delivery=callback)
                        index += 1
                    except BufferError:
                        self._wait_for_queue(kafka, stream, tracker, len(values[index]))
                produced_markers += 1
        except KafkaException as exc:
            pending.abandon(len(markers) - produced_markers)
            raise DeliveryError(
                f"Kafka refused a {len(values[index])}-byte record for topic {topics[index]!r}: {exc}; "
                "if it is too large, raise message.max.bytes in kafka_config (and the topic's "
                "max.message.bytes)") from None
        except BaseException:
            # stopping mid-batch: the batch's commit must never be confirmed, but what was
            # produced may still be waited for
            pending.abandon(len(markers) - produced_markers)
            raise
        self.stats.records += len(values)

    def _produce_complete_transactions(self, kafka: KafkaProducer, stream: ReplicationStream,
                                       tracker: DeliveryTracker, batch: Optional[Batch]) -> None:
        """Before stopping on a bad message: produce the transactions that completed before it."""
        if batch is None or not batch.commits:
            return
        cut = batch.commits[-1].record_end
        if cut == 0:
            tracker.track(0, batch.commits[-1].end_lsn)
            return
        for name in ("topics", "values", "keys", "partitions"):
            setattr(batch, name, getattr(batch, name)[:cut])
        batch.markers = list(range(cut))  # per-partition markers were computed for the whole batch
        self._produce(kafka, stream, tracker, batch)

    def _wait_for_queue(self, kafka: KafkaProducer, stream: ReplicationStream, tracker: DeliveryTracker,
                        record_size: int) -> None:
        """Backpressure: the producer queue is full (by count or by bytes; slow or unreachable broker).

        Waits until half of what was queued has been delivered, keeping the walsender alive.
        """
        queued = len(kafka)
        if queued == 0:
            raise DeliveryError(
                f"a {record_size}-byte record does not fit in the producer queue even when it is empty; "
                "raise queue.buffering.max.kbytes in kafka_config")
        started = time.monotonic()
        last_feedback = started
        warned = False
        while True:
            kafka.poll(0.1)
            if tracker.failure is not None:
                raise DeliveryError(tracker.failure)
            if self._fatal is not None or self._stopping:
                raise _StopNow()
            if len(kafka) <= queued // 2:
                return
            now = time.monotonic()
            if now - last_feedback >= 5.0:
                # keep the walsender from timing us out while Kafka is slow
                self._confirm(stream, tracker.confirmable())
                last_feedback = now
            if not warned and now - started > 30:
                log.warning("Kafka is not accepting records (%d waiting); holding the replication stream",
                            len(kafka))
                warned = True

    def _finish(self, kafka: KafkaProducer, stream: ReplicationStream, decoder: Decoder,
                tracker: DeliveryTracker, clean: bool) -> None:
        """Flush deliveries (bounded) and confirm what was delivered.

        The keepalive position is used only after a clean stop: after a failure, messages may
        have been read (and the decoder moved on) without being produced.
        """
        deadline = time.monotonic() + self.stop_timeout
        while tracker.in_flight and time.monotonic() < deadline and tracker.failure is None and self._fatal is None:
            kafka.poll(0.1)
            tracker.confirmable()
        idle = None if decoder.in_transaction or not clean or tracker.failure is not None else stream.last_wal_end
        confirmed = tracker.confirmable(idle)
        try:
            self._confirm(stream, confirmed)
            log.info("confirmed slot %s up to %s", self.slot, format_lsn(confirmed))
        except StreamError as exc:
            log.warning("could not send the final status update: %s", exc)

    def _confirm(self, stream: ReplicationStream, lsn: int) -> None:
        """Report ``lsn`` as written and flushed: the slot's confirmed position follows it."""
        stream.send_feedback(lsn, lsn)
        self.stats.confirmed_lsn = lsn

    def _log_status(self, conn: Any, rate: float, confirmed: int) -> None:
        lag = "?"
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (format_lsn(confirmed),))
                lag = str(int(cur.fetchone()[0]))
        except psycopg2.Error:
            pass
        log.info("status: %.0f rows/s, %d rows total, confirmed %s, lag %s bytes",
                 rate, self.stats.records, format_lsn(confirmed), lag)


class _StopNow(_Retry):
    """Internal: leave the stream loop now (stop requested while blocked on Kafka)."""
