"""Moving a partition's Kafka offsets: store one for commit, commit the stored ones.

``enable.auto.offset.store`` is off: an offset is stored only once the work before it is done,
librdkafka commits the stored offsets periodically, and the loop commits synchronously when
partitions are revoked and on stop. Each call tolerates the partition having been revoked
meanwhile (the next owner starts at the committed offset).
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

log = logging.getLogger(__name__)

__all__ = ["commit_stored", "store_offset"]


def store_offset(kafka: Any, topic: str, partition: int, next_offset: int) -> None:
    """Store ``next_offset`` (the offset of the first record not done) for the next commit."""
    try:
        kafka.store_offsets(offsets=[TopicPartition(topic, partition, next_offset)])
    except KafkaException as exc:  # the partition was revoked meanwhile
        log.debug("not storing offset %d of %s[%d]: %s", next_offset, topic, partition, exc)


def commit_stored(kafka: Any, why: str) -> None:
    """Commit the stored offsets now and wait for it; a failure is logged, not raised."""
    try:
        kafka.commit(asynchronous=False)
    except KafkaException as exc:
        if exc.args and exc.args[0].code() == KafkaError._NO_OFFSET:
            return
        log.warning("committing offsets (%s) failed: %s", why, exc)
    except RuntimeError:  # consumer closed
        pass
