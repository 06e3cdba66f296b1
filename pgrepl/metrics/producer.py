"""The producer's exporter: stream totals, delivery latency, the slot's WAL facts, role and readiness.

Ready means: PostgreSQL and Kafka answer, and either this producer is ``active`` (its slot
has a walsender, and Kafka acknowledges what was produced within ``STALL_SECONDS``) or it is
a ``standby`` waiting for the lease. Everything else (starting, stopping, a stopped broker,
an unreachable server) is not ready.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Tuple

from pgrepl.metrics.exporter import DEFAULT_INTERVAL, Exporter
from pgrepl.metrics.latency import LatencyHistogram
from pgrepl.metrics.watch import SlotWatch

if TYPE_CHECKING:
    from pgrepl.producer.delivery import DeliveryTracker
    from pgrepl.producer.producer import Producer

#: An active producer whose oldest produced batch waits this long for Kafka is stalled.
STALL_SECONDS = 30.0
#: An active producer whose slot has no walsender this long is not streaming.
INACTIVE_SECONDS = 15.0
#: The roles a producer may have (``pgrepl_producer_role``).
ROLES = ("starting", "standby", "active", "stopped")
#: ``wal_status`` values of pg_replication_slots (``pgrepl_slot_wal_status``).
WAL_STATUSES = ("reserved", "extended", "unreserved", "lost")


class ProducerExporter(Exporter):
    """Metrics and health of one ``Producer``; also its ``DeliveryObserver`` (acknowledged batches)."""

    def __init__(self, producer: "Producer", *, host: str, port: int, wal_warning_bytes: int,
                 safe_wal_warning_bytes: int, interval: float = DEFAULT_INTERVAL) -> None:
        self.producer = producer
        self.stats = producer.stats
        self.latency = LatencyHistogram()
        self.acked_rows = 0
        self.acked_bytes = 0
        self.acked_batches = 0
        self.tracker: Optional["DeliveryTracker"] = None
        self.slot_watch = SlotWatch(producer.pg_dsn, producer.slot, wal_warning_bytes=wal_warning_bytes,
                                    safe_wal_warning_bytes=safe_wal_warning_bytes,
                                    application_name=f"pgrepl/{producer.instance}/metrics")
        self._inactive_since: Optional[float] = None
        super().__init__(host=host, port=port, brokers=producer.brokers, kafka_config=producer.user_kafka_config,
                         labels={"slot": producer.slot}, interval=interval)

    # -- DeliveryObserver (called in the stream thread) ---------------------------------------

    def attach(self, tracker: "DeliveryTracker") -> None:
        self.tracker = tracker

    def delivered(self, records: int, nbytes: int, commits: Sequence[Any]) -> None:
        self.acked_rows += records
        self.acked_bytes += nbytes
        self.acked_batches += 1
        self.latency.observe_commits(commits)

    # -- exporter thread -------------------------------------------------------------------------

    def tick(self) -> None:
        super().tick()
        facts = self.slot_watch.read()
        inactive = facts.error is None and (facts.slot is None or facts.slot.active_pid is None)
        if not inactive or self.stats.role != "active":
            self._inactive_since = None
        elif self._inactive_since is None:
            self._inactive_since = facts.at

    def stop(self) -> None:
        super().stop()
        self.slot_watch.close()

    def readiness(self) -> Tuple[bool, str]:
        role = self.stats.role
        facts = self.slot_watch.facts
        if self.producer.stopping:
            return False, "stopping"
        if facts.error is not None:
            return False, facts.error
        if facts.at == 0.0 or self.probe.reachable is None:
            return False, "starting: not probed yet"
        if role == "standby":
            return True, "standby: waiting for the slot's lease; PostgreSQL and Kafka answer"
        if role != "active":
            return False, role
        stalled = self.tracker.oldest_unacknowledged() if self.tracker is not None else 0.0
        if stalled > STALL_SECONDS:
            return False, f"Kafka has acknowledged nothing for {stalled:.0f} s"
        if self._inactive_since is not None and time.monotonic() - self._inactive_since > INACTIVE_SECONDS:
            return False, f"slot {self.producer.slot} has had no walsender for over {INACTIVE_SECONDS:.0f} s"
        return True, "active: streaming"

    # -- families ----------------------------------------------------------------------------------

    def families(self) -> Iterator[Any]:
        f, stats = self.families_of, self.stats
        yield f.counter("pgrepl_producer_rows_total", "rows (records) produced to Kafka", stats.records)
        yield f.counter("pgrepl_producer_transactions_total", "transactions decoded", stats.transactions)
        yield f.counter("pgrepl_producer_messages_total", "pgoutput messages received", stats.messages)
        yield f.counter("pgrepl_producer_received_bytes_total", "bytes of pgoutput received", stats.bytes_received)
        yield f.counter("pgrepl_producer_acked_rows_total", "records Kafka acknowledged", self.acked_rows)
        yield f.counter("pgrepl_producer_acked_bytes_total", "bytes of record values Kafka acknowledged",
                        self.acked_bytes)
        yield f.counter("pgrepl_producer_acked_batches_total", "batches Kafka acknowledged in full", self.acked_batches)
        yield f.histogram("pgrepl_producer_delivery_latency_seconds",
                          "PostgreSQL commit time to Kafka acknowledgement, per transaction",
                          self.latency.buckets(), self.latency.sum)
        yield f.gauge("pgrepl_producer_confirmed_lsn", "LSN this producer last confirmed to the slot",
                      stats.confirmed_lsn)
        yield f.counter("pgrepl_producer_sessions_total", "replication sessions started", stats.sessions)
        yield f.counter("pgrepl_producer_reconnects_total", "sessions that failed and were retried", stats.reconnects)
        yield f.labelled("pgrepl_producer_role", "1 for the producer's current role", "role",
                         {role: 1 if role == stats.role else 0 for role in ROLES})
        tracker = self.tracker
        yield f.gauge("pgrepl_producer_in_flight_batches", "batches waiting for Kafka's acknowledgement",
                      tracker.in_flight if tracker is not None else 0)
        yield f.gauge("pgrepl_producer_oldest_unacknowledged_seconds",
                      "age of the oldest batch waiting for Kafka", tracker.oldest_unacknowledged() if tracker else 0)
        yield from self._snapshot_families()
        yield from self._slot_families()

    def _snapshot_families(self) -> Iterator[Any]:
        f = self.families_of
        progress = self.producer.snapshots.progress()
        yield f.gauge("pgrepl_snapshot_running", "snapshots running (or being planned)", progress.running)
        yield f.gauge("pgrepl_snapshot_tables", "tables of the running snapshots", progress.tables)
        yield f.gauge("pgrepl_snapshot_tables_done", "tables of the running snapshots read and confirmed",
                      progress.tables_done)
        yield f.gauge("pgrepl_snapshot_rows_estimated", "rows the running snapshots are expected to read",
                      progress.rows_estimated)
        yield f.gauge("pgrepl_snapshot_rows_confirmed", "rows of the running snapshots confirmed so far",
                      progress.rows_confirmed)
        yield f.counter("pgrepl_snapshot_rows_total", "snapshot rows produced by this producer",
                        self.producer.snapshots.rows)
        yield f.counter("pgrepl_snapshot_stale_rows_total",
                        "snapshot rows dropped because the stream changed them during their chunk's read",
                        self.producer.snapshots.stale_rows)

    def _slot_families(self) -> Iterator[Any]:
        f, watch = self.families_of, self.slot_watch
        facts = watch.facts
        yield f.counter("pgrepl_slot_query_errors_total", "failed slot queries (PostgreSQL unreachable)", watch.errors)
        if facts.at == 0.0:
            return
        yield f.gauge("pgrepl_postgres_reachable", "1 when the last slot query succeeded", 0 if facts.error else 1)
        if facts.error is not None:
            return
        info = facts.slot
        yield f.gauge("pgrepl_slot_exists", "1 when the replication slot exists", 0 if info is None else 1)
        yield f.gauge("pgrepl_slot_wal_warning", "1 while retained WAL or safe_wal_size crosses its threshold",
                      1 if watch.warning else 0)
        yield f.gauge("pgrepl_server_wal_lsn", "the server's WAL position (replayed position on a standby)",
                      facts.position)
        if info is None:
            return
        yield f.gauge("pgrepl_slot_active", "1 when a walsender streams from the slot",
                      0 if info.active_pid is None else 1)
        yield f.gauge("pgrepl_slot_confirmed_lsn", "the slot's confirmed_flush_lsn", info.confirmed_flush_lsn)
        yield f.gauge("pgrepl_slot_retained_wal_bytes", "WAL kept for the slot (server position - restart_lsn)",
                      facts.retained_bytes)
        yield f.gauge("pgrepl_slot_lag_bytes", "how far the slot is behind (server position - confirmed_flush_lsn)",
                      facts.lag_bytes)
        yield f.gauge("pgrepl_slot_safe_wal_size_bytes",
                      "WAL that may still be written before the slot is lost (max_slot_wal_keep_size set)",
                      info.safe_wal_size)
        if info.wal_status is not None:
            yield f.labelled("pgrepl_slot_wal_status", "1 for the slot's wal_status", "wal_status",
                             {status: 1 if status == info.wal_status else 0 for status in WAL_STATUSES})
