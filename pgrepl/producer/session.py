"""One replication session: lease, preflight, slot, START_REPLICATION, the stream loop, the final confirmation.

The loop reads every pgoutput message available (decoded in C by ``ReplicationStream`` into a
``Batch``), produces the batch through ``KafkaOutput`` and moves the slot's confirmed flush
position only as far as the ``DeliveryTracker`` has proof of delivery. While streaming it checks
that it still holds the lease, records the confirmed position in the slot history, and treats
a server that stays silent past its own ``wal_sender_timeout`` as gone.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Optional, Tuple, cast

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from pgrepl._core import Batch, Decoder, ReplicationStream
from pgrepl.errors import ConfigError, DeliveryError, PgreplError, SlotLostError, StreamError
from pgrepl.lsn import format_lsn
from pgrepl.postgres import preflight
from pgrepl.postgres.connect import connect, identify_system, publication_option, query_one
from pgrepl.postgres.lease import LeaseLost
from pgrepl.postgres.slot import SlotInfo, check_slot, create_slot, drop_slot, get_slot, slot_lost_message
from pgrepl.producer.delivery import DeliveryTracker
from pgrepl.producer.history import SlotRecord, history_key
from pgrepl.producer.output import KafkaOutput, Retry
from pgrepl.producer.snapshot import new_job_id

if TYPE_CHECKING:
    from pgrepl.producer.producer import Producer

log = logging.getLogger("pgrepl.producer")

LEASE_CHECK_INTERVAL = 2.0
HISTORY_INTERVAL = 2.0


class Session:
    """One replication connection of ``producer``, from the lease to stop or failure."""

    def __init__(self, producer: "Producer", output: KafkaOutput) -> None:
        self.producer = producer
        self.output = output
        self.stats = producer.stats
        self.record: Optional[SlotRecord] = None

    def run(self) -> None:
        """Hold the lease, check, connect, stream until stopped; ``Retry`` for what a reconnect may fix."""
        producer = self.producer
        if not self._hold_lease():
            return
        conn = producer.lease.connection
        rconn = None
        try:
            preflight.check_server(conn)
            publication = preflight.load_publication(conn, producer.publication)
            preflight.check_publication(publication, producer.topic_map)
            try:
                rconn = connect(producer.pg_dsn, replication=True, application_name=producer.lease.application_name)
            except psycopg2.OperationalError as exc:
                raise Retry(f"cannot open the replication connection: {str(exc).strip()}") from None
            system_identifier, database = self._identify(rconn)
            slot = self._slot(conn, system_identifier, database)
            counts = self.output.partition_counts(producer.topic_map)
            self._check_partition_counts(counts)
            decoder = Decoder(producer.topic_map, truncate=producer.truncate,  # type: ignore[arg-type]
                              split_key_changes=producer.split_key_changes)
            for topic, count in counts.items():
                decoder.set_partition_count(topic, count)
            producer.snapshots.encoder(counts)
            start_lsn = slot.confirmed_flush_lsn or 0
            try:
                rcur = cast(psycopg2.extras.ReplicationCursor, rconn.cursor())
                rcur.start_replication_expert(self._start_command(start_lsn), decode=False)  # type: ignore[no-untyped-call]
                stream = ReplicationStream(rconn)
            except psycopg2.OperationalError as exc:
                raise Retry(f"cannot start replication: {str(exc).strip()}") from None
            self.stats.sessions += 1
            self.stats.confirmed_lsn = max(self.stats.confirmed_lsn, start_lsn)
            log.info("streaming slot %s of publication %s from %s into Kafka at %s", producer.slot,
                     producer.publication, format_lsn(start_lsn), self.output.brokers)
            self._stream(conn, stream, decoder, DeliveryTracker(start_lsn, producer.delivery_observer),
                         self._receive_deadline(conn))
        except StreamError as exc:
            raise Retry(f"replication connection lost: {exc}") from None
        except LeaseLost as exc:
            raise Retry(str(exc)) from None
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            producer.lease.release()
            raise Retry(f"PostgreSQL connection lost: {str(exc).strip()}") from None
        finally:
            if rconn is not None:
                try:
                    rconn.close()
                except Exception:  # already broken
                    pass

    # -- lease and slot -----------------------------------------------------------------------

    def _hold_lease(self) -> bool:
        """Make sure this producer holds the lease (waiting as a standby if needed); False on stop."""
        producer = self.producer
        lease = producer.lease
        if lease.held:
            try:
                lease.check()
                return True
            except LeaseLost as exc:
                log.warning("%s", exc)
        producer.set_role("standby" if producer.stats.role == "active" else producer.stats.role)
        try:
            acquired = lease.acquire(producer.waker, on_wait=lambda: producer.set_role("standby"))
        except psycopg2.OperationalError as exc:
            raise Retry(f"cannot reach PostgreSQL for the slot lease: {str(exc).strip()}") from None
        if acquired:
            producer.set_role("active")
            self.record = None  # another producer may have moved the slot: read its history again
        return acquired

    def _identify(self, rconn: Any) -> Tuple[str, str]:
        """The server's system identifier and the database (IDENTIFY_SYSTEM on the replication connection)."""
        return identify_system(rconn)

    def _slot(self, conn: psycopg2.extensions.connection, system_identifier: str, database: str) -> SlotInfo:
        """The slot to stream from: created on first use (with its initial snapshot), never silently
        recreated, freed from stale holders."""
        producer = self.producer
        key = history_key(system_identifier, database, producer.slot)
        record = producer.slot_records.get(key)
        if record is None:
            record = producer.history.load(key)
        info = get_slot(conn, producer.slot)
        lost: Optional[str] = None
        interrupted = record is not None and record.confirmed_lsn == 0  # saved, then stopped before the slot was
        if info is None and record is not None and not interrupted:
            lost = f"missing on database {database}"
        elif info is not None and info.invalidated and record is not None:
            lost = info.invalidated
        if lost is not None and producer.on_slot_loss != "resnapshot":
            assert record is not None
            raise SlotLostError(slot_lost_message(producer.slot, lost, record.confirmed_lsn), producer.slot,
                                record.confirmed_lsn)
        created = info is None or lost is not None
        if lost is not None:
            log.warning("replication slot %s is %s; recreating it with a new snapshot (on_slot_loss='resnapshot')",
                        producer.slot, lost)
            if info is not None:
                drop_slot(conn, producer.slot)
            record = None
        if created and record is None:
            # the record (with its snapshot) is saved before the slot exists: a producer stopped in
            # between finds it (confirmed_lsn 0) and still snapshots, rather than a slot without one
            record = SlotRecord(producer.slot, database, system_identifier, 0, instance=producer.instance)
            if producer.snapshot != "never":
                kind = "resnapshot" if lost is not None else "initial"
                producer.snapshots.add(producer.snapshots.plan(conn, new_job_id(kind), None, None))
                record.snapshots = producer.snapshots.saved()
            producer.history.save(record, wait=30.0)
        if info is None or lost is not None:
            info = create_slot(conn, producer.slot, failover=producer.failover)
        check_slot(info, database, record.confirmed_lsn or None if record is not None else None)
        if record is None:  # a slot pgrepl has no history of (made by hand, or history forgotten)
            record = SlotRecord(producer.slot, database, system_identifier, info.confirmed_flush_lsn or 0,
                                instance=producer.instance)
            producer.history.save(record, wait=30.0)  # remembered before anything is streamed
        elif record.confirmed_lsn == 0:  # saved just before the slot was created (by this or a stopped producer)
            if interrupted:
                log.info("replication slot %s: its creation was interrupted; %s", producer.slot,
                         "resuming its snapshot" if record.snapshots else "created now")
            record.confirmed_lsn = info.confirmed_flush_lsn or 0
            producer.history.save(record, wait=30.0)
        if record.snapshots and not producer.snapshots.jobs:
            producer.snapshots.resume(conn, record.snapshots)
        producer.slot_records[key] = record
        self.record = record
        freed = producer.lease.wait_until_free(conn, producer.waker)
        if freed is None:
            if producer.waker.is_set:
                raise Retry("stopping")
            raise SlotLostError(slot_lost_message(producer.slot, f"missing on database {database}",
                                                  record.confirmed_lsn), producer.slot, record.confirmed_lsn)
        return freed

    def _check_partition_counts(self, counts: dict) -> None:  # type: ignore[type-arg]
        """A topic's partition count may not change under the producer (keys would move) unless accepted."""
        record = self.record
        assert record is not None
        changed = {t: (record.partition_counts[t], n) for t, n in counts.items()
                   if t in record.partition_counts and record.partition_counts[t] != n}
        if changed and not self.producer.allow_repartition:
            what = ", ".join(f"{t}: {old} -> {new}" for t, (old, new) in sorted(changed.items()))
            raise ConfigError(f"partition counts changed ({what}): records of a key would move to another "
                              "partition and could be applied out of order; if that is acceptable (consumers "
                              "caught up, or keyed sinks), start once with allow_repartition=True")
        if changed:
            log.warning("partition counts changed (%s); accepted (allow_repartition)", changed)
        if counts != record.partition_counts:
            record.partition_counts = dict(counts)
            self.producer.history.save(record, wait=30.0)

    def _start_command(self, start_lsn: int) -> str:
        option = publication_option(self.producer.publication).replace("'", "''")
        # messages: pgrepl's own logical decoding messages (snapshot watermarks and requests), 14+
        messages = ", messages 'true'" if self.producer.lease.connection.server_version >= 140000 else ""
        return (f"START_REPLICATION SLOT {self.producer.slot} LOGICAL {format_lsn(start_lsn)} "
                f"(proto_version '1', publication_names '{option}'{messages})")

    def _receive_deadline(self, conn: psycopg2.extensions.connection) -> float:
        """Seconds of silence after which the server counts as gone: its own ``wal_sender_timeout``
        (it ends the connection itself after that much silence from us), 60 s when that is off."""
        (timeout_ms,) = query_one(conn, "SELECT setting::int FROM pg_settings WHERE name = 'wal_sender_timeout'")
        return max(int(timeout_ms) / 1000.0, 10.0) if int(timeout_ms) > 0 else 60.0

    # -- streaming ------------------------------------------------------------------------------

    def _stream(self, conn: Any, stream: ReplicationStream, decoder: Decoder, tracker: DeliveryTracker,
                deadline: float) -> None:
        producer = self.producer
        output = self.output
        stats = self.stats
        sent_flush = -1
        now = time.monotonic()
        last_feedback = 0.0
        next_status = now + producer.status_interval
        next_lease_check = now + LEASE_CHECK_INTERVAL
        last_status_records = stats.records
        last_status_time = now
        last_heard, heard_count, probed = now, -1, False
        waker = producer.waker
        sock = stream.fileno()
        clean = False
        snapshots = producer.snapshots
        snapshots.streaming = True
        snapshots.start_readers()

        def keepalive() -> None:
            self._confirm(stream, tracker.confirmable())

        try:
            while not waker.is_set:
                try:
                    batch = stream.read(decoder, producer.batch_messages, producer.batch_bytes)
                except StreamError:
                    raise
                except PgreplError as exc:
                    stats.records += output.produce_complete_transactions(
                        getattr(exc, "partial_batch", None), tracker, keepalive)
                    raise
                if batch.messages or snapshots.watching:
                    for part, headers in snapshots.process(batch):
                        output.produce(part, tracker, keepalive, headers)
                        stats.records += len(part)
                elif len(batch):
                    output.produce(batch, tracker, keepalive)
                    stats.records += len(batch)
                elif batch.commits:
                    tracker.track(0, batch.commits[-1].end_lsn)
                stats.transactions += len(batch.commits)
                output.poll(0)
                if tracker.failure is not None:
                    raise DeliveryError(tracker.failure)
                idle = None if decoder.in_transaction else stream.last_wal_end
                confirmed = tracker.confirmable(idle)
                now = time.monotonic()
                # report progress at most every feedback_interval while busy, at once when caught
                # up (a quiet stream confirms promptly), and at least every 10 s
                changed = confirmed != sent_flush
                if stream.reply_requested or now - last_feedback >= 10.0 or (changed and (
                        stream.would_block and not tracker.in_flight
                        or now - last_feedback >= producer.feedback_interval)):
                    self._confirm(stream, confirmed)
                    sent_flush = confirmed
                    last_feedback = now
                heard = stream.messages + stream.keepalives
                if heard != heard_count:
                    last_heard, heard_count, probed = now, heard, False
                elif now - last_heard > deadline:
                    raise StreamError(f"nothing from the server for {now - last_heard:.0f} s "
                                      f"(wal_sender_timeout {deadline:.0f} s): the connection is dead")
                elif not probed and now - last_heard > deadline / 4:
                    stream.send_feedback(sent_flush if sent_flush >= 0 else 0, sent_flush if sent_flush >= 0 else 0,
                                         reply=True)  # ask for a keepalive: is anyone there?
                    probed = True
                if snapshots.urgent:  # a request or a finished snapshot: recorded before the slot moves on
                    self._remember(sent_flush, wait=30.0)
                if now >= next_lease_check:
                    producer.lease.check()
                    self._remember(sent_flush)
                    next_lease_check = now + LEASE_CHECK_INTERVAL
                if now >= next_status:
                    rate = (stats.records - last_status_records) / max(now - last_status_time, 1e-9)
                    self._log_status(conn, rate, confirmed)
                    if snapshots.active:
                        log.info("%s", snapshots.status())
                    last_status_records, last_status_time = stats.records, now
                    next_status = now + producer.status_interval
                if stream.ended:
                    raise StreamError("the server ended the replication stream")
                if stream.would_block:
                    self._wait_for_data(stream, sock, batch, tracker)
            clean = True
        finally:
            stats.messages = stream.messages
            stats.bytes_received = stream.bytes_received
            try:
                self._finish(stream, decoder, tracker, clean)
            finally:
                snapshots.pause()

    def _remember(self, confirmed: int, wait: float = 0.0) -> None:
        """Record the confirmed position and snapshot progress in the slot history when they moved
        (``wait`` > 0: until Kafka acknowledged it)."""
        record = self.record
        snapshots = self.producer.snapshots
        if record is not None and (confirmed > record.confirmed_lsn or snapshots.changed or wait):
            record.confirmed_lsn = max(record.confirmed_lsn, confirmed)
            record.snapshots = snapshots.saved()
            self.producer.history.save(record, wait=wait)

    def _wait_for_data(self, stream: ReplicationStream, sock: int, batch: Batch, tracker: DeliveryTracker) -> None:
        """Caught up: sleep until the walsender sends more (or a stop), then let a trickle gather."""
        stats, producer = self.stats, self.producer
        stats.messages = stream.messages
        stats.bytes_received = stream.bytes_received
        readable = producer.waker.wait(0.05 if tracker.in_flight else 0.5, (sock,))
        if readable and len(batch) < producer.batch_messages // 8:
            # a trickle: let a few hundred microseconds of messages gather so that one wake-up
            # (and one batch) carries many, instead of two or three
            time.sleep(producer.gather_seconds)

    def _finish(self, stream: ReplicationStream, decoder: Decoder, tracker: DeliveryTracker, clean: bool) -> None:
        """Flush deliveries (bounded) and confirm what was delivered.

        The keepalive position is used only after a clean stop: after a failure, messages may
        have been read (and the decoder moved on) without being produced.
        """
        producer = self.producer
        deadline = time.monotonic() + producer.stop_timeout
        while (tracker.in_flight and time.monotonic() < deadline and tracker.failure is None
               and producer.fatal is None):
            self.output.poll(0.1)
            tracker.confirmable()
        idle = None if decoder.in_transaction or not clean or tracker.failure is not None else stream.last_wal_end
        confirmed = tracker.confirmable(idle)
        try:
            self._confirm(stream, confirmed)
            log.info("confirmed slot %s up to %s", producer.slot, format_lsn(confirmed))
        except StreamError as exc:
            log.warning("could not send the final status update: %s", exc)
        if clean:
            self._remember(confirmed)

    def _confirm(self, stream: ReplicationStream, lsn: int) -> None:
        """Report ``lsn`` as written and flushed: the slot's confirmed position follows it."""
        stream.send_feedback(lsn, lsn)
        self.stats.confirmed_lsn = lsn
        self.producer.snapshots.confirmed(lsn)

    def _log_status(self, conn: Any, rate: float, confirmed: int) -> None:
        lag = "?"
        try:
            (lag_bytes,) = query_one(conn, "SELECT pg_current_wal_lsn() - %s::pg_lsn", (format_lsn(confirmed),))
            lag = str(int(lag_bytes))
        except (psycopg2.Error, LookupError):
            pass
        log.info("status: %.0f rows/s, %d rows total, confirmed %s, lag %s bytes",
                 rate, self.stats.records, format_lsn(confirmed), lag)

