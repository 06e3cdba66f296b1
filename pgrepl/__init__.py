"""pgrepl: stream PostgreSQL logical replication into Kafka, in WAL order, at least once, no gaps.

The public API: ``Producer`` (a slot's changes into Kafka), ``Consumer`` (ReplicationOps back
from Kafka into your code or, exactly once, into PostgreSQL), the record types
``ReplicationOp`` and ``Op``, ``TopicInfo`` for topic maps, and the errors.
"""

from pgrepl._version import __version__
from pgrepl.consumer import Consumer, ConsumerStats
from pgrepl.errors import (
    ConfigError,
    ConsumerError,
    DecodeError,
    DeliveryError,
    HandlerError,
    MalformedRecordError,
    PgreplError,
    ReplicationError,
    SlotLostError,
)
from pgrepl.model import Op, ReplicationOp, Row
from pgrepl.producer import Producer, ProducerStats
from pgrepl.topics import TopicInfo

__all__ = [
    "__version__",
    "ConfigError",
    "Consumer",
    "ConsumerError",
    "ConsumerStats",
    "DecodeError",
    "DeliveryError",
    "HandlerError",
    "MalformedRecordError",
    "Op",
    "PgreplError",
    "Producer",
    "ProducerStats",
    "ReplicationError",
    "ReplicationOp",
    "Row",
    "SlotLostError",
    "TopicInfo",
]
