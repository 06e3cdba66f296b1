"""Reading a Kafka topic from its beginning to its end (the slot history, tests), by partition EOF."""

from __future__ import annotations

import time
from typing import Iterator, Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

__all__ = ["read_to_end"]


def read_to_end(consumer: Consumer, topic: str, partitions: Sequence[int], timeout: float) -> Iterator[Message]:
    """Every message of ``partitions`` of ``topic``, from the beginning to each partition's end.

    The end is librdkafka's partition-EOF event (``consumer`` needs ``enable.partition.eof``), not
    the high watermark, which some Kafka-protocol brokers (tansu) report wrongly. ``TimeoutError``
    when an end is not reached within ``timeout`` seconds, ``KafkaException`` for a consumer error.
    """
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    at_end: set = set()  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while len(at_end) < len(partitions):
        if time.monotonic() > deadline:
            missing = sorted(set(partitions) - at_end)
            raise TimeoutError(f"reading topic {topic!r}: partitions {missing} not read to their end in {timeout:.0f} s")
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        error = msg.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                at_end.add(msg.partition())
                continue
            raise KafkaException(error)
        at_end.discard(msg.partition())
        yield msg
