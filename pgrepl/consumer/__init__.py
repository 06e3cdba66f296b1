"""The consumer: ReplicationOps back from Kafka, handed to your code in partition order."""

from pgrepl.consumer.consumer import Consumer, ConsumerStats, StopConsuming

__all__ = ["Consumer", "ConsumerStats", "StopConsuming"]
