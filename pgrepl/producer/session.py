"""One replication session: preflight, START_REPLICATION, the stream loop, the final confirmation.

The loop reads every pgoutput message available (decoded in C by ``ReplicationStream`` into a
``Batch``), produces the batch through ``KafkaOutput`` and moves the slot's confirmed flush
position only as far as the ``DeliveryTracker`` has proof of delivery.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Tuple, cast

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from pgrepl._core import Batch, Decoder, ReplicationStream
from pgrepl.errors import DeliveryError, PgreplError, StreamError
from pgrepl.lsn import format_lsn
from pgrepl.postgres import preflight
from pgrepl.postgres.connect import connect, publication_option
from pgrepl.postgres.slot import ensure_slot
from pgrepl.producer.delivery import DeliveryTracker
from pgrepl.producer.output import KafkaOutput, Retry

if TYPE_CHECKING:
    from pgrepl.producer.producer import Producer

log = logging.getLogger("pgrepl.producer")


class Session:
    """One replication connection of ``producer``, from preflight to stop or failure."""

    def __init__(self, producer: "Producer", output: KafkaOutput) -> None:
        self.producer = producer
        self.output = output
        self.stats = producer.stats

    def run(self) -> None:
        """Check, connect, stream until stopped; ``Retry`` for what a reconnect may fix."""
        conn, start_lsn = self._preflight()
        rconn = None
        try:
            decoder = Decoder(self.producer.topic_map, truncate=self.producer.truncate)  # type: ignore[arg-type]
            for topic, count in self.output.partition_counts(self.producer.topic_map).items():
                decoder.set_partition_count(topic, count)
            try:
                rconn = connect(self.producer.pg_dsn, replication=True)
                rcur = cast(psycopg2.extras.ReplicationCursor, rconn.cursor())
                rcur.start_replication_expert(self._start_command(start_lsn), decode=False)  # type: ignore[no-untyped-call]
                stream = ReplicationStream(rconn)
            except psycopg2.OperationalError as exc:
                raise Retry(f"cannot start replication: {str(exc).strip()}") from None
            self.stats.sessions += 1
            self.stats.confirmed_lsn = max(self.stats.confirmed_lsn, start_lsn)
            log.info("streaming slot %s of publication %s from %s into Kafka at %s", self.producer.slot,
                     self.producer.publication, format_lsn(start_lsn), self.output.brokers)
            self._stream(conn, stream, decoder, DeliveryTracker(start_lsn))
        except StreamError as exc:
            raise Retry(f"replication connection lost: {exc}") from None
        finally:
            for c in (rconn, conn):
                if c is not None:
                    try:
                        c.close()
                    except Exception:  # already broken
                        pass

    def _start_command(self, start_lsn: int) -> str:
        option = publication_option(self.producer.publication).replace("'", "''")
        return (f"START_REPLICATION SLOT {self.producer.slot} LOGICAL {format_lsn(start_lsn)} "
                f"(proto_version '1', publication_names '{option}')")

    def _preflight(self) -> Tuple[psycopg2.extensions.connection, int]:
        producer = self.producer
        try:
            conn = connect(producer.pg_dsn)
        except psycopg2.OperationalError as exc:
            raise Retry(str(exc).strip()) from None
        try:
            preflight.check_server(conn)
            publication = preflight.load_publication(conn, producer.publication)
            preflight.check_publication(publication, producer.topic_map)
            slot = ensure_slot(conn, producer.slot)
        except psycopg2.OperationalError as exc:
            conn.close()
            raise Retry(f"PostgreSQL connection lost during checks: {str(exc).strip()}") from None
        except BaseException:
            conn.close()
            raise
        return conn, slot.confirmed_flush_lsn or 0

    def _stream(self, conn: Any, stream: ReplicationStream, decoder: Decoder, tracker: DeliveryTracker) -> None:
        producer = self.producer
        output = self.output
        stats = self.stats
        sent_flush = -1
        last_feedback = 0.0
        next_status = time.monotonic() + producer.status_interval
        last_status_records = stats.records
        last_status_time = time.monotonic()
        waker = producer.waker
        sock = stream.fileno()
        clean = False

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
                if len(batch):
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
                if now >= next_status:
                    rate = (stats.records - last_status_records) / max(now - last_status_time, 1e-9)
                    self._log_status(conn, rate, confirmed)
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
            self._finish(stream, decoder, tracker, clean)

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
