"""What pgrepl remembers about a slot outside the slot: its last confirmed position and partition counts.

A slot can vanish: dropped by hand, invalidated, or absent on a standby promoted after a
failover. Recreated silently, it would start at the current WAL position and everything
between the last confirmed position and now would never reach Kafka. So every producer
records, per slot, the position it confirmed and the partition counts of its topics, as one
JSON record per slot on a compacted Kafka topic (``history_topic``, default
``pgrepl.slot-history``). It lives in Kafka, next to the data it describes, because that is
what survives both the producer and the PostgreSQL server (a restore from backup or a failover
keeps the system identifier but not necessarily the slot). The record is keyed by the server's
system identifier, the database and the slot name.

A slot that is missing after pgrepl has used it is then an error that names the last
confirmed position, never an automatic new slot; a topic whose partition count changed is
refused unless re-partitioning is accepted explicitly.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from confluent_kafka import KafkaException
from confluent_kafka import Consumer as KafkaConsumer

from pgrepl import kafka_settings
from pgrepl.topic_reader import read_to_end
from pgrepl.producer.output import Retry

log = logging.getLogger(__name__)

DEFAULT_HISTORY_TOPIC = "pgrepl.slot-history"


@dataclass
class SlotRecord:
    """The remembered state of one slot."""

    slot: str
    database: str
    system_identifier: str
    confirmed_lsn: int
    partition_counts: Dict[str, int] = field(default_factory=dict)
    instance: str = ""
    updated_at: float = 0.0
    snapshots: List[Dict[str, Any]] = field(default_factory=list)  # unfinished snapshots' progress
    snapshots_done: List[str] = field(default_factory=list)        # ids of the latest finished ones

    @property
    def key(self) -> bytes:
        return history_key(self.system_identifier, self.database, self.slot)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, value: bytes) -> "SlotRecord":
        data = json.loads(value)
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


def history_key(system_identifier: str, database: str, slot: str) -> bytes:
    """The record key: one record per (cluster, database, slot)."""
    return f"{system_identifier}/{database}/{slot}".encode()


class SlotHistory:
    """Reads and writes slot records on the history topic.

    Writes go through the producer's own Kafka client (``client``, idempotent, so a record is
    never lost silently); reads use a short-lived consumer built from ``kafka_config``'s
    connection settings and read every partition to its end (tansu's high watermarks cannot be
    trusted, and a compacted topic is small).
    """

    def __init__(self, client: Any, brokers: str, kafka_config: Mapping[str, Any], topic: str) -> None:
        self.client = client
        self.brokers = brokers
        self.topic = topic
        self._consumer_settings: Dict[str, Any] = {
            **kafka_settings.connection_settings(kafka_config),
            "bootstrap.servers": brokers,
            "group.id": f"pgrepl-history-{uuid.uuid4().hex[:8]}",  # assign() only: never joins or commits
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "logger": logging.getLogger("pgrepl.kafka"),
        }

    def load(self, key: bytes, timeout: float = 30.0) -> Optional[SlotRecord]:
        """The latest record for ``key`` (None if there is none, or it was forgotten: a tombstone)."""
        return self.load_all(timeout).get(key)

    def load_all(self, timeout: float = 30.0) -> Dict[bytes, SlotRecord]:
        """The latest record of every slot on the topic (forgotten ones left out), by key."""
        latest: Dict[bytes, Optional[bytes]] = {}
        consumer = KafkaConsumer(self._consumer_settings)
        try:
            try:
                metadata = consumer.list_topics(self.topic, timeout=10)
            except KafkaException as exc:
                raise Retry(f"cannot reach Kafka at {self.brokers} (reading the slot history topic "
                            f"{self.topic!r}): {exc}") from None
            topic = metadata.topics.get(self.topic)
            if topic is None or topic.error is not None or not topic.partitions:
                return {}  # never written: no slot was used through this Kafka cluster yet
            try:
                for msg in read_to_end(consumer, self.topic, sorted(topic.partitions), timeout):
                    key = msg.key()
                    if key is not None:
                        latest[key] = msg.value()
            except TimeoutError:
                raise Retry(f"reading the slot history topic {self.topic!r} took over {timeout:.0f} s") from None
            except KafkaException as exc:
                raise Retry(f"reading the slot history topic {self.topic!r}: {exc}") from None
        finally:
            consumer.close()
        return {key: SlotRecord.from_json(value) for key, value in latest.items() if value}

    def save(self, record: SlotRecord, wait: float = 0.0) -> None:
        """Produce ``record`` (updated now); with ``wait`` > 0, block until Kafka acknowledged it."""
        record.updated_at = time.time()
        outcome: List[Any] = []
        self.client.produce(self.topic, record.to_json(), record.key,
                            on_delivery=lambda err, _msg: outcome.append(err))
        if wait > 0:
            deadline = time.monotonic() + wait
            while not outcome and time.monotonic() < deadline:
                self.client.poll(0.1)
            if not outcome or outcome[0] is not None:
                raise Retry(f"could not record slot {record.slot}'s position on {self.topic!r}: "
                            f"{outcome[0] if outcome else 'no acknowledgement within %.0f s' % wait}")

    def forget(self, key: bytes, wait: float = 30.0) -> None:
        """Delete the record of a slot (a tombstone): its next use starts fresh."""
        outcome: List[Any] = []
        self.client.produce(self.topic, None, key, on_delivery=lambda err, _msg: outcome.append(err))
        deadline = time.monotonic() + wait
        while not outcome and time.monotonic() < deadline:
            self.client.poll(0.1)
        if not outcome or outcome[0] is not None:
            raise Retry(f"could not write the tombstone on {self.topic!r}: {outcome[0] if outcome else 'timeout'}")
