"""A straightforward pure-Python producer: the honest "what you would write yourself" reference.

``pgrepl-bench`` runs it beside pgrepl's producer over the same changes. It is what a careful
engineer writes in an afternoon with the usual libraries, and it keeps the same guarantees so
the comparison is fair:

* psycopg2's ``LogicalReplicationConnection`` and its ``read_message()`` loop;
* :class:`pgrepl.bench.baseline.decoder.PyDecoder` to decode pgoutput (``struct``) and build the record
  (``json.dumps``), the same bytes pgrepl produces;
* the same confluent-kafka settings as pgrepl (idempotent, ``acks=all``, gapless, lz4), one
  ``produce()`` per row with a per-message delivery callback;
* the slot confirmed only up to the last transaction whose records were all delivered (and,
  when idle with nothing in flight, up to the server's WAL end, so an idle slot does not pin WAL).

It is deliberately not tuned further: no batching across the C boundary, no explicit
partitions, no per-partition delivery markers. That is the point of the comparison.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Mapping, Optional

import psycopg2
import psycopg2.extras
from confluent_kafka import KafkaError, Message
from confluent_kafka import Producer as KafkaProducer

from pgrepl.bench.baseline.decoder import PyBegin, PyCommit, PyDecoder, PyRecord
from pgrepl.errors import DeliveryError
from pgrepl.postgres.connect import redact_dsn
from pgrepl.producer.output import producer_settings

log = logging.getLogger(__name__)

#: Called with each successfully delivered message when the delivery report is handled.
DeliveryHook = Callable[[Message], None]


@dataclass
class BaselineStats:
    """Running totals, readable from another thread (the same names as ``ProducerStats``)."""

    records: int = 0
    transactions: int = 0
    messages: int = 0
    confirmed_lsn: int = 0


class _Transaction:
    """Records of one transaction still waiting for their delivery reports."""

    __slots__ = ("remaining", "end_lsn", "failed")

    def __init__(self) -> None:
        self.remaining = 0
        self.end_lsn = 0
        self.failed: Optional[str] = None


class BaselineProducer:
    """Slot → pure-Python decode → Kafka, one message at a time. ``run()`` blocks until ``stop()``."""

    def __init__(self, pg_dsn: str, brokers: str, slot: str, publication: str,
                 topic_map: Mapping[str, Any], kafka_config: Optional[Mapping[str, Any]] = None, *,
                 feedback_interval: float = 1.0, on_delivered: Optional[DeliveryHook] = None) -> None:
        self.pg_dsn = pg_dsn
        self.brokers = brokers
        self.slot = slot
        self.publication = publication
        self.topic_map = dict(topic_map)
        self.feedback_interval = feedback_interval
        self.on_delivered = on_delivered
        self.kafka_config = producer_settings(kafka_config or {}, brokers)  # the same settings as pgrepl's
        self.stats = BaselineStats()
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask ``run()`` to return after flushing; safe from other threads and signal handlers."""
        self._stop.set()

    def run(self) -> None:
        """Stream until ``stop()``; raises on a failed delivery (nothing past it is confirmed)."""
        kafka = KafkaProducer(self.kafka_config)
        for topic in {str(info["name"] if isinstance(info, Mapping) else info.name) for info in self.topic_map.values()}:
            kafka.list_topics(topic, timeout=30)  # fail fast when the broker or a topic is missing
        conn = psycopg2.connect(self.pg_dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection,
                                application_name="pgrepl-baseline")
        try:
            cur = conn.cursor()
            cur.start_replication(slot_name=self.slot, decode=False,
                                  options={"proto_version": "1", "publication_names": self.publication})
            log.info("baseline producer streaming slot %s from %s", self.slot, redact_dsn(self.pg_dsn))
            self._loop(kafka, cur)
        finally:
            kafka.flush(30)
            conn.close()

    def _loop(self, kafka: KafkaProducer, cur: Any) -> None:
        decoder = PyDecoder(self.topic_map)
        pending: Deque[_Transaction] = deque()
        current: Optional[_Transaction] = None
        confirmed = 0
        last_feedback = 0.0
        stats = self.stats
        hook = self.on_delivered

        def delivered_to(tx: _Transaction) -> Callable[[Optional[KafkaError], Message], None]:
            def on_delivery(err: Optional[KafkaError], msg: Message) -> None:
                if err is not None:
                    tx.failed = err.str()
                    return
                tx.remaining -= 1
                if hook is not None:
                    hook(msg)
            return on_delivery

        callback: Optional[Callable[[Optional[KafkaError], Message], None]] = None
        while not self._stop.is_set():
            msg = cur.read_message()
            if msg is not None:
                stats.messages += 1
                result = decoder.decode(msg.payload)
                if isinstance(result, PyRecord):
                    assert current is not None and callback is not None
                    current.remaining += 1
                    while True:
                        try:
                            kafka.produce(result.topic, result.value, result.key, on_delivery=callback)
                            break
                        except BufferError:  # queue full: wait for the broker
                            kafka.poll(0.1)
                    stats.records += 1
                    if stats.records % 1000 == 0:
                        kafka.poll(0)
                elif isinstance(result, PyBegin):
                    current = _Transaction()
                    callback = delivered_to(current)
                elif isinstance(result, PyCommit):
                    assert current is not None
                    current.end_lsn = result.end_lsn
                    pending.append(current)
                    current = None
                    stats.transactions += 1
                continue
            # nothing buffered: serve delivery reports, confirm, then wait for the socket
            kafka.poll(0)
            while pending and pending[0].remaining == 0 and pending[0].failed is None:
                confirmed = max(confirmed, pending.popleft().end_lsn)
            if pending and pending[0].failed is not None:
                raise DeliveryError(f"Kafka delivery failed: {pending[0].failed}")
            if not pending and current is None and cur.wal_end > confirmed:
                confirmed = cur.wal_end  # idle: nothing open or in flight
            now = time.monotonic()
            if confirmed > stats.confirmed_lsn and now - last_feedback >= self.feedback_interval:
                cur.send_feedback(flush_lsn=confirmed, write_lsn=confirmed)
                stats.confirmed_lsn = confirmed
                last_feedback = now
            select.select([cur], [], [], 0.05 if pending else 0.5)
        # final confirmation of what was delivered
        kafka.flush(30)
        while pending and pending[0].remaining == 0 and pending[0].failed is None:
            confirmed = max(confirmed, pending.popleft().end_lsn)
        if confirmed:
            cur.send_feedback(flush_lsn=confirmed, write_lsn=confirmed, force=True)
            stats.confirmed_lsn = confirmed
