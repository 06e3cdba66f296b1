"""The producer's Kafka side: settings, partition counts, producing decoded batches with their markers.

Every record is produced in stream order; only each batch's *markers* (the last record of
every partition it wrote to) carry a delivery callback, which the ``DeliveryTracker`` counts.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from confluent_kafka import KafkaError, KafkaException

from pgrepl import kafka_settings
from pgrepl.kafka_settings import kafka_error_text
from pgrepl._core import Batch
from pgrepl.errors import ConfigError, DeliveryError
from pgrepl.producer.delivery import DeliveryTracker
from pgrepl.topics import TopicInfo

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

#: Settings ``kafka_config`` may not set at all, and why.
REFUSED_KAFKA_CONFIG: Dict[str, str] = {
    "delivery.report.only.error": "the slot is confirmed from successful delivery reports, so it would never move",
}

#: Defaults the user may override.
DEFAULT_KAFKA_CONFIG: Dict[str, Any] = {
    "compression.type": "lz4",
    "linger.ms": 5,
    "queue.buffering.max.messages": 200_000,
    "queue.buffering.max.kbytes": 32 * 1024,  # bounded memory: backpressure beyond this
    "partitioner": "consistent_random",
}

#: Makes the Kafka client from its settings; ``confluent_kafka.Producer`` unless the embedding
#: application (or a benchmark) wraps or replaces it.
KafkaFactory = Callable[[Dict[str, Any]], Any]


class Retry(Exception):
    """A failure worth retrying after a pause: connection lost, broker unreachable."""


class StopNow(Retry):
    """Leave the stream loop now: stop requested (or a fatal error) while blocked on Kafka."""


def producer_settings(user: Mapping[str, Any], brokers: str) -> Dict[str, Any]:
    """pgrepl's librdkafka producer settings: defaults, the user's ``kafka_config``, what the guarantees need."""
    settings = kafka_settings.merge(
        user, defaults=DEFAULT_KAFKA_CONFIG, required=REQUIRED_KAFKA_CONFIG, refused=REFUSED_KAFKA_CONFIG,
        required_because="its ordering and no-gap guarantees rest on it", arguments={"bootstrap.servers": brokers},
        logger=kafka_log)
    try:
        too_big = int(settings.get("message.max.bytes", 1_000_000)) > int(settings["queue.buffering.max.kbytes"]) * 1024
    except (TypeError, ValueError):
        raise ConfigError("message.max.bytes and queue.buffering.max.kbytes must be integers") from None
    if too_big:
        raise ConfigError("message.max.bytes is larger than the producer queue (queue.buffering.max.kbytes "
                          "* 1024): such a record could never be queued; raise queue.buffering.max.kbytes")
    return settings


class KafkaOutput:
    """One Kafka producer client for the producer's whole life (sessions come and go, it stays).

    ``should_stop`` is polled while waiting on a full queue; ``keepalive`` is called every few
    seconds of such a wait, so the walsender does not time the replication connection out.
    """

    def __init__(self, settings: Dict[str, Any], factory: KafkaFactory, should_stop: Callable[[], bool]) -> None:
        self.brokers = str(settings.get("bootstrap.servers", ""))
        try:
            self.client = factory(settings)
        except KafkaException as exc:  # an unknown property, a bad value, a missing TLS file...
            raise ConfigError(f"invalid Kafka producer settings: {kafka_error_text(exc)}") from None
        self._should_stop = should_stop

    def partition_counts(self, topic_map: Mapping[str, TopicInfo]) -> Dict[str, int]:
        """Partitions of every topic of the topic map (``Retry`` while the broker is unreachable)."""
        counts: Dict[str, int] = {}
        for info in topic_map.values():
            if info.name in counts:
                continue
            try:
                metadata = self.client.list_topics(info.name, timeout=10)
            except KafkaException as exc:
                raise Retry(f"cannot reach Kafka at {self.brokers}: {exc}") from None
            topic = metadata.topics.get(info.name)
            if topic is None or topic.error is not None or not topic.partitions:
                error = topic.error if topic is not None else None
                if error is not None and error.code() in (KafkaError._TRANSPORT, KafkaError._TIMED_OUT,
                                                          KafkaError.LEADER_NOT_AVAILABLE):
                    raise Retry(f"topic {info.name!r} not available yet: {error.str()}")
                raise ConfigError(
                    f"Kafka topic {info.name!r} does not exist at {self.brokers} "
                    f"({error.str() if error is not None else 'no partitions'}); create it or enable "
                    "auto.create.topics.enable on the brokers")
            counts[info.name] = len(topic.partitions)
        return counts

    def produce(self, batch: Batch, tracker: DeliveryTracker, keepalive: Callable[[], None],
                headers: Optional[List[Tuple[str, bytes]]] = None) -> None:
        """Produce a batch in order; markers carry the delivery callback; ``headers`` go on every record."""
        topics, values, keys, partitions = batch.topics, batch.values, batch.keys, batch.partitions
        commit_end = batch.commits[-1].end_lsn if batch.commits else None
        markers = batch.markers
        pending = tracker.track(len(markers), commit_end, batch)
        if pending is None:  # nothing to produce
            return
        callback = pending.on_delivery
        produce = self.client.produce
        if headers is not None:
            produce = functools.partial(produce, headers=headers)
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
                        self._wait_for_queue(tracker, keepalive, len(values[index]))
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

    def produce_complete_transactions(self, batch: Optional[Batch], tracker: DeliveryTracker,
                                      keepalive: Callable[[], None]) -> int:
        """Before stopping on a bad message: produce the transactions that completed before it.

        Returns how many records that was.
        """
        if batch is None or not batch.commits:
            return 0
        cut = batch.commits[-1].record_end
        if cut == 0:
            tracker.track(0, batch.commits[-1].end_lsn)
            return 0
        batch.topics, batch.values = batch.topics[:cut], batch.values[:cut]
        batch.keys, batch.partitions = batch.keys[:cut], batch.partitions[:cut]
        batch.markers = list(range(cut))  # per-partition markers were computed for the whole batch
        self.produce(batch, tracker, keepalive)
        return cut

    def _wait_for_queue(self, tracker: DeliveryTracker, keepalive: Callable[[], None], record_size: int) -> None:
        """Backpressure: the producer queue is full (by count or by bytes; slow or unreachable broker).

        Waits until half of what was queued has been delivered, keeping the walsender alive.
        """
        client = self.client
        queued = len(client)
        if queued == 0:
            raise DeliveryError(
                f"a {record_size}-byte record does not fit in the producer queue even when it is empty; "
                "raise queue.buffering.max.kbytes in kafka_config")
        started = time.monotonic()
        last_keepalive = started
        warned = False
        while True:
            client.poll(0.1)
            if tracker.failure is not None:
                raise DeliveryError(tracker.failure)
            if self._should_stop():
                raise StopNow()
            if len(client) <= queued // 2:
                return
            now = time.monotonic()
            if now - last_keepalive >= 5.0:
                keepalive()
                last_keepalive = now
            if not warned and now - started > 30:
                log.warning("Kafka is not accepting records (%d waiting); holding the replication stream",
                            len(client))
                warned = True

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports."""
        self.client.poll(timeout)

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for queued records; returns how many are still undelivered."""
        return int(self.client.flush(max(timeout, 0)))
