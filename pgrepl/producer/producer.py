"""Producer: streams a logical replication slot into Kafka, in WAL order, at least once, no gaps.

``Producer`` holds the settings and runs replication sessions (``session.Session``) one after
another: a lost connection or an unreachable broker is retried with capped backoff from the
slot's confirmed position; a ``PgreplError`` that retrying cannot fix stops it. Several
producers may run for one slot: one holds the slot's lease and streams (``active``), the others
wait as ``standby`` and take over when it goes (``pgrepl.postgres.lease``).
"""

from __future__ import annotations

import logging
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence

from confluent_kafka import KafkaError
from confluent_kafka import Producer as KafkaProducer

from pgrepl._runtime import Waker, install_stop_handlers, run_in_thread
from pgrepl.errors import ConfigError, DeliveryError, PgreplError
from pgrepl.metrics import check_port
from pgrepl.postgres.connect import connect, dsn_params, query_one
from pgrepl.postgres.lease import SlotLease
from pgrepl.postgres.slot import validate_slot_name
from pgrepl.producer.delivery import DeliveryObserver
from pgrepl.producer.history import DEFAULT_HISTORY_TOPIC, SlotHistory, SlotRecord
from pgrepl.producer.memory import tune_malloc
from pgrepl.producer.output import KafkaFactory, KafkaOutput, Retry, producer_settings
from pgrepl.producer.session import Session
from pgrepl.producer.snapshot import REQUEST_PREFIX, SnapshotCoordinator, SnapshotJob, new_job_id
from pgrepl.topics import TopicInfo, TopicMapInput, normalize_topic_map

if TYPE_CHECKING:
    from pgrepl.metrics.producer import ProducerExporter

log = logging.getLogger("pgrepl.producer")

#: A session that streamed this long was healthy: the next failure retries quickly again.
HEALTHY_SESSION = 30.0

#: ``snapshot``: what a slot pgrepl creates starts with.
SNAPSHOT_MODES = ("initial", "never", "initial_only")


@dataclass
class ProducerStats:
    """Running totals, readable from another thread (for status lines, tests and benchmarks)."""

    records: int = 0
    transactions: int = 0
    messages: int = 0
    bytes_received: int = 0
    confirmed_lsn: int = 0
    sessions: int = 0
    reconnects: int = 0  # sessions that failed and were retried
    role: str = "starting"  # starting / standby / active / stopped
    started_at: float = field(default_factory=time.monotonic)


class Producer:
    """Streams the changes of one publication from a logical replication slot into Kafka.

    ``topic_map`` maps table names (bare, or ``schema.table``) to ``TopicInfo`` or dicts with
    ``name`` and ``partition_key``. ``kafka_config`` holds extra librdkafka settings, merged
    over pgrepl's defaults (the idempotence/ordering settings cannot be overridden).
    ``truncate`` is ``"error"`` (default) or ``"skip"``. ``kafka_factory`` makes the Kafka
    client from its settings (default ``confluent_kafka.Producer``): a hook for applications
    that wrap the client, and for benchmarks.

    Safety: ``on_slot_loss`` says what a slot that vanished or was invalidated after use
    does (``"fail"``, the default: stop with the last confirmed position); ``history_topic``
    is the compacted Kafka topic where that position is remembered; ``allow_repartition``
    accepts a changed partition count (keys move); ``split_key_changes`` writes an Update that
    changes the partition key as Delete + Insert (False: one Update, as the original library);
    ``failover`` creates the slot as a failover slot (default: on PostgreSQL 17+).

    Snapshots: a slot pgrepl creates starts with a snapshot of every published table
    (``snapshot="initial"``; ``"never"``: changes only; ``"initial_only"``: stop once the
    snapshot is done). ``request_snapshot`` takes one on demand, while streaming goes on; chunks
    of ``snapshot_chunk_size`` rows are read on ``snapshot_connections`` connections.

    Observability (``pip install 'pgrepl[metrics]'``): ``metrics_port`` serves Prometheus
    metrics, ``/healthz`` and ``/readyz`` on ``metrics_host`` while the producer runs (0: any
    free port, see ``metrics.port``); a warning is logged (and ``pgrepl_slot_wal_warning`` set)
    while the slot retains more than ``wal_warning_bytes`` of WAL or its ``safe_wal_size`` is
    under ``safe_wal_warning_bytes``.
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
        batch_bytes: int = 4 << 20,
        gather_seconds: float = 0.0005,
        handle_signals: bool = True,
        kafka_factory: Optional[KafkaFactory] = None,
        on_slot_loss: str = "fail",
        history_topic: str = DEFAULT_HISTORY_TOPIC,
        allow_repartition: bool = False,
        split_key_changes: bool = True,
        failover: Optional[bool] = None,
        snapshot: str = "initial",
        snapshot_connections: int = 2,
        snapshot_chunk_size: int = 10_000,
        metrics_port: Optional[int] = None,
        metrics_host: str = "0.0.0.0",
        wal_warning_bytes: int = 1 << 30,
        safe_wal_warning_bytes: int = 512 << 20,
    ) -> None:
        if not isinstance(pg_dsn, str) or not pg_dsn:
            raise ConfigError("pg_dsn must be a PostgreSQL connection string")
        if not isinstance(brokers, str) or not brokers.strip():
            raise ConfigError("brokers must be a comma-separated list of host:port")
        validate_slot_name(slot)
        if not isinstance(publication, str) or not publication:
            raise ConfigError("publication must be a non-empty name")
        if truncate not in ("error", "skip"):
            raise ConfigError(f"truncate must be 'error' or 'skip', got {truncate!r}")
        if on_slot_loss not in ("fail", "resnapshot"):
            raise ConfigError(f"on_slot_loss must be 'fail' or 'resnapshot', got {on_slot_loss!r}")
        if snapshot not in SNAPSHOT_MODES:
            raise ConfigError(f"snapshot must be one of {SNAPSHOT_MODES}, got {snapshot!r}")
        for name, value in (("snapshot_connections", snapshot_connections), ("snapshot_chunk_size", snapshot_chunk_size)):
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(history_topic, str) or not history_topic:
            raise ConfigError("history_topic must be a Kafka topic name")
        if metrics_port is not None:
            check_port(metrics_port, metrics_host)
        for name, value in (("wal_warning_bytes", wal_warning_bytes), ("safe_wal_warning_bytes", safe_wal_warning_bytes)):
            if type(value) is not int or value < 0:
                raise ConfigError(f"{name} must be a number of bytes, got {value!r}")
        dsn_params(pg_dsn)  # a DSN that does not parse is a configuration error now, not at first connect
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
        self.kafka_config = producer_settings(kafka_config or {}, brokers)
        self.kafka_config["error_cb"] = self._on_kafka_error
        self.kafka_factory: KafkaFactory = kafka_factory or KafkaProducer
        self.on_slot_loss = on_slot_loss
        self.history_topic = history_topic
        self.allow_repartition = allow_repartition
        self.split_key_changes = split_key_changes
        self.failover = failover
        self.snapshot = snapshot
        self._user_kafka_config = dict(kafka_config or {})
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.wal_warning_bytes = wal_warning_bytes
        self.safe_wal_warning_bytes = safe_wal_warning_bytes
        #: The running exporter (while ``start()`` runs with ``metrics_port``), and its delivery hook.
        self.metrics: Optional["ProducerExporter"] = None
        self.delivery_observer: Optional[DeliveryObserver] = None
        self.instance = uuid.uuid4().hex[:16]
        self.lease = SlotLease(pg_dsn, slot, self.instance)
        self.waker = Waker()
        self.snapshots = SnapshotCoordinator(pg_dsn, publication, self.topic_map, self.instance,
                                             self.lease.application_name, snapshot_connections, snapshot_chunk_size,
                                             self.waker)
        self.snapshots.on_job_done = self._snapshot_done
        self.history: SlotHistory  # made with the Kafka client, in start()
        self.slot_records: Dict[bytes, SlotRecord] = {}
        self.stats = ProducerStats()
        self.fatal: Optional[PgreplError] = None
        self._running = threading.Lock()

    # -- control -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the producer to stop: safe from any thread and from a signal handler."""
        self.waker.set()

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called."""
        return self.waker.is_set

    def start(self) -> None:
        """Run until ``stop()`` or a fatal error (raised). Transient failures are retried."""
        if not self._running.acquire(blocking=False):
            raise RuntimeError("this Producer is already running")
        restore = install_stop_handlers(self.stop, self.handle_signals)
        tune_malloc()  # large rows: reuse warm heap pages batch after batch (see pgrepl.producer.memory)
        try:
            self._start_metrics()
            self._run()
        finally:
            self._stop_metrics()
            restore()
            self._running.release()

    @property
    def user_kafka_config(self) -> Dict[str, Any]:
        """The ``kafka_config`` as given (connection settings for the exporter's and the history's clients)."""
        return dict(self._user_kafka_config)

    def _start_metrics(self) -> None:
        if self.metrics_port is None:
            return
        from pgrepl.metrics.producer import ProducerExporter

        self.metrics = ProducerExporter(self, host=self.metrics_host, port=self.metrics_port,
                                        wal_warning_bytes=self.wal_warning_bytes,
                                        safe_wal_warning_bytes=self.safe_wal_warning_bytes)
        self.delivery_observer = self.metrics
        self.metrics.start()
        log.info("serving metrics, /healthz and /readyz on %s:%d", self.metrics_host, self.metrics.port)

    def _stop_metrics(self) -> None:
        exporter, self.metrics, self.delivery_observer = self.metrics, None, None
        if exporter is not None:
            exporter.stop()

    async def run(self) -> None:
        """asyncio entry point: runs the producer in a thread; cancelling the task stops it cleanly."""
        self.handle_signals = False
        await run_in_thread(self.start, self.stop)

    def request_snapshot(self, tables: Optional[Sequence[str]] = None, where: Optional[str] = None) -> str:
        """Ask for a snapshot of ``tables`` (default: every published table), optionally only the rows
        ``where`` holds; returns its id. The request goes through the WAL (a logical decoding message
        the active producer sees in its stream), so it works from any process, and survives restarts.
        ``ConfigError`` for a table that is not published or a filter that is not valid SQL."""
        job_id = new_job_id("request")
        conn = connect(self.pg_dsn, application_name=self.lease.application_name)
        try:
            self.snapshots.plan(conn, job_id, tables, where)  # checks tables, privileges and the filter now
            content = json.dumps({"id": job_id, "tables": list(tables) if tables else None, "where": where})
            query_one(conn, "SELECT pg_logical_emit_message(true, %s, %s)", (REQUEST_PREFIX, content))
        finally:
            conn.close()
        log.info("snapshot %s requested", job_id)
        return job_id

    def _snapshot_done(self, job: SnapshotJob) -> None:
        if self.snapshot == "initial_only" and job.id.startswith("initial"):
            log.info("initial snapshot done (snapshot='initial_only'): stopping")
            self.stop()

    def set_role(self, role: str) -> None:
        """Record (and log, when it changes) whether this producer streams or waits."""
        if role != self.stats.role:
            log.info("producer %s for slot %s: %s -> %s", self.instance, self.slot, self.stats.role, role)
            self.stats.role = role

    def _on_kafka_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.fatal = DeliveryError(f"fatal Kafka producer error: {err.str()}")
            self.stop()
        else:
            log.warning("Kafka: %s", err.str())

    # -- sessions --------------------------------------------------------------------------

    def _run(self) -> None:
        output = KafkaOutput(self.kafka_config, self.kafka_factory,
                             should_stop=lambda: self.waker.is_set or self.fatal is not None)
        self.history = SlotHistory(output.client, self.brokers, self._user_kafka_config, self.history_topic)
        backoff = 0.5
        try:
            while not self.waker.is_set:
                started = time.monotonic()
                try:
                    Session(self, output).run()
                except Retry as exc:
                    if self.waker.is_set:
                        break
                    self.stats.reconnects += 1
                    if time.monotonic() - started > HEALTHY_SESSION:
                        backoff = 0.5  # it was working: a new failure starts the backoff over
                    log.warning("%s; retrying in %.1f s", exc, backoff)
                    self.waker.wait(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
                if self.fatal is not None:
                    raise self.fatal
        finally:
            self.lease.release()
            self.set_role("stopped")
            remaining = output.flush(self.stop_timeout)
            if remaining:
                log.warning("stopped with %d records undelivered; they will be produced again on restart", remaining)
        if self.fatal is not None:
            raise self.fatal
