"""pgrepl: stream PostgreSQL logical replication into Kafka, in WAL order, at least once, no gaps."""

from pgrepl._decode import Batch, Begin, Commit, Decoder, Record
from pgrepl._version import __version__
from pgrepl.errors import (
    ConfigError,
    DecodeError,
    MalformedRecordError,
    PgreplError,
    ReplicationError,
)
from pgrepl.ops import Op, ReplicationOp
from pgrepl.consumer import Consumer, ConsumerError, ConsumerStats, HandlerError
from pgrepl.topics import TopicInfo

__all__ = [
    "__version__",
    "Batch",
    "Begin",
    "Commit",
    "ConfigError",
    "DecodeError",
    "Decoder",
    "MalformedRecordError",
    "Op",
    "PgreplError",
    "Record",
    "ReplicationError",
    "ReplicationOp",
    "TopicInfo",
    "Consumer",
    "ConsumerError",
    "ConsumerStats",
    "HandlerError",
]
