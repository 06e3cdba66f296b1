"""The producer: a replication slot's changes into Kafka (``Producer``), with its parts.

* ``producer``  the ``Producer`` itself: settings, start/stop, sessions retried with backoff
* ``session``   one replication connection: preflight, the stream loop, confirmation
* ``output``    the Kafka side: settings, partition counts, producing batches with markers
* ``delivery``  the ``DeliveryTracker``: how far delivery reports let the slot be confirmed
"""

from pgrepl.producer.producer import Producer, ProducerStats

__all__ = ["Producer", "ProducerStats"]
