"""Topic maps: which Kafka topic, and which partition-key columns, each published table goes to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple, Union

from pgrepl.errors import ConfigError


@dataclass(frozen=True)
class TopicInfo:
    """Where one table's changes go: the topic ``name`` and the columns whose values form the key.

    The Kafka key is the partition-key column values concatenated with no separator (as in
    the original library); an empty ``partition_key`` produces records without a key.
    """

    name: str
    partition_key: Tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"topic name must be a non-empty string, got {self.name!r}")
        if len(self.name) > 249 or not all(c.isalnum() or c in "._-" for c in self.name):
            raise ConfigError(
                f"invalid Kafka topic name {self.name!r}: use at most 249 characters from "
                "[a-zA-Z0-9._-]"
            )
        key = self.partition_key
        if isinstance(key, str) or not all(isinstance(c, str) and c for c in key):
            raise ConfigError(
                f"partition_key of topic {self.name!r} must be a list of column names, got {key!r}"
            )
        if len(set(key)) != len(key):
            raise ConfigError(f"partition_key of topic {self.name!r} repeats a column: {list(key)!r}")
        object.__setattr__(self, "partition_key", tuple(key))


TopicMapInput = Mapping[str, Union[TopicInfo, Mapping[str, Any]]]


def normalize_topic_map(topic_map: TopicMapInput) -> Dict[str, TopicInfo]:
    """Validate a topic map given as ``TopicInfo`` objects or plain dicts and return ``TopicInfo``s.

    Keys are table names: a bare ``table`` (matched in any schema, as in the original library)
    or a schema-qualified ``schema.table`` (which wins over a bare name).
    """
    if not isinstance(topic_map, Mapping) or not topic_map:
        raise ConfigError("the topic map must be a non-empty mapping of table name -> topic info")
    result: Dict[str, TopicInfo] = {}
    for table, info in topic_map.items():
        if not isinstance(table, str) or not table:
            raise ConfigError(f"topic map keys must be table names, got {table!r}")
        if isinstance(info, TopicInfo):
            result[table] = info
            continue
        if not isinstance(info, Mapping):
            raise ConfigError(
                f"topic map entry for table {table!r} must be a TopicInfo or a dict with "
                f"'name' and 'partition_key', got {type(info).__name__}"
            )
        unknown = set(info) - {"name", "partition_key"}
        if unknown:
            raise ConfigError(
                f"topic map entry for table {table!r} has unknown keys {sorted(unknown)}; "
                "allowed: 'name', 'partition_key'"
            )
        if "name" not in info:
            raise ConfigError(f"topic map entry for table {table!r} lacks the topic 'name'")
        key: List[str] = list(info.get("partition_key") or [])
        if isinstance(info.get("partition_key"), str):
            raise ConfigError(
                f"partition_key of table {table!r} must be a list of column names, "
                f"got the string {info['partition_key']!r}"
            )
        result[table] = TopicInfo(name=info["name"], partition_key=tuple(key))
    return result
