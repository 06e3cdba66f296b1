"""Topic-map validation and LSN text conversion."""

from __future__ import annotations

import pytest

from pgrepl import ConfigError, TopicInfo
from pgrepl.lsn import format_lsn, parse_lsn
from pgrepl.topics import normalize_topic_map


def test_topic_map_accepts_dicts_and_topic_infos() -> None:
    result = normalize_topic_map({
        "inventory_table": {"name": "inventory_topic", "partition_key": ["organization_id"]},
        "other": TopicInfo(name="other_topic"),
        "nokey": {"name": "nokey_topic"},
    })
    assert result["inventory_table"] == TopicInfo("inventory_topic", ("organization_id",))
    assert result["other"].partition_key == () and result["nokey"].partition_key == ()


@pytest.mark.parametrize(
    "topic_map, fragment",
    [
        ({}, "non-empty mapping"),
        ([], "non-empty mapping"),
        ({"t": "topic"}, "must be a TopicInfo or a dict"),
        ({"t": {"partition_key": ["a"]}}, "lacks the topic 'name'"),
        ({"t": {"name": "x", "partitionkey": ["a"]}}, "unknown keys ['partitionkey']"),
        ({"t": {"name": "x", "partition_key": "a"}}, "must be a list of column names"),
        ({"t": {"name": "bad topic!"}}, "invalid Kafka topic name"),
        ({"t": {"name": ""}}, "non-empty string"),
        ({"t": {"name": "x", "partition_key": ["a", "a"]}}, "repeats a column"),
        ({"": {"name": "x"}}, "keys must be table names"),
    ],
)
def test_topic_map_errors(topic_map: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        normalize_topic_map(topic_map)  # type: ignore[arg-type]
    assert fragment in str(info.value)


@pytest.mark.parametrize("text, value", [("0/0", 0), ("16/B374D848", 0x16_B374D848), ("FFFFFFFF/FFFFFFFF", (1 << 64) - 1)])
def test_lsn_round_trip(text: str, value: int) -> None:
    assert parse_lsn(text) == value
    assert format_lsn(value) == text


@pytest.mark.parametrize("text", ["", "16B374D848", "G/0", "1/2/3", "123456789/0"])
def test_bad_lsn_text(text: str) -> None:
    with pytest.raises(ConfigError, match="not an LSN"):
        parse_lsn(text)
