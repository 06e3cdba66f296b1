"""The consumer: ReplicationOps back from Kafka, handed to your code in partition order."""

from pgrepl.consumer.consumer import Consumer, ConsumerStats

__all__ = ["Consumer", "ConsumerStats"]
