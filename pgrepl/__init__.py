"""pgrepl: stream PostgreSQL logical replication into Kafka, in WAL order, at least once, no gaps."""

from pgrepl._version import __version__
from pgrepl.errors import ConfigError, DecodeError, PgreplError, ReplicationError
from pgrepl.topics import TopicInfo

__all__ = [
    "__version__",
    "ConfigError",
    "DecodeError",
    "PgreplError",
    "ReplicationError",
    "TopicInfo",
]
