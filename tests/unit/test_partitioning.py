"""Explicit partitions (librdkafka-compatible CRC-32), delivery markers and Begin positions."""

from __future__ import annotations

import zlib

import pytest

from pgrepl import ConfigError
from pgrepl._core import Decoder
from pgrepl._core import key_partition
from pgrepl.testing import pgoutput as m

REL = 1


def decoder(partitions: int = 0, key: bool = True) -> Decoder:
    dec = Decoder({"t": {"name": "topic", "partition_key": ["k"] if key else []}, "u": {"name": "other"}})
    if partitions:
        dec.set_partition_count("topic", partitions)
    dec.decode(m.relation(REL, "public", "t", ["k", "v"]))
    dec.decode(m.relation(2, "public", "u", ["k"]))
    return dec


@pytest.mark.parametrize("key", [b"a", b"org-42", bytes(range(256)), "é€😀".encode() * 9])
@pytest.mark.parametrize("count", [1, 2, 3, 12, 100])
def test_key_partition_is_crc32_like_librdkafka(key: bytes, count: int) -> None:
    assert key_partition(key, count) == zlib.crc32(key) % count


def test_partitions_follow_keys_and_markers_are_last_per_partition() -> None:
    dec = decoder(partitions=4)
    keys = [f"k{i % 7}" for i in range(40)]
    batch = dec.decode_batch([m.begin(10)] + [m.insert(REL, [k, "v"]) for k in keys] + [m.commit(10, 20)])
    assert batch.partitions == [zlib.crc32(k.encode()) % 4 for k in keys]
    last = {}
    for index, part in enumerate(batch.partitions):
        last[part] = index
    assert batch.markers == sorted(last.values())
    assert batch.begins == [0]


def test_unknown_partition_count_makes_every_record_a_marker() -> None:
    dec = decoder()
    batch = dec.decode_batch([m.begin(10), m.insert(REL, ["a", "1"]), m.insert(2, ["x"]), m.insert(REL, ["b", "2"])])
    assert batch.partitions == [-1, -1, -1]
    assert batch.markers == [0, 1, 2]


def test_mixed_known_and_unknown_topics_markers_are_sorted() -> None:
    dec = decoder(partitions=1)
    batch = dec.decode_batch([m.begin(10), m.insert(REL, ["a", "1"]), m.insert(2, ["x"]), m.insert(REL, ["b", "2"]), m.insert(2, ["y"])])
    assert batch.partitions == [0, -1, 0, -1]
    assert batch.markers == [1, 2, 3]


def test_keyless_records_go_to_their_tables_partition() -> None:
    """Without a key the partition comes from the table's name: stable across sessions and
    replays (a round-robin counter restarts with every session and would move a replay)."""
    dec = decoder(partitions=3, key=False)
    payloads = [m.begin(10)] + [m.insert(REL, [str(i), "v"]) for i in range(7)]
    batch = dec.decode_batch(payloads)
    expected = key_partition(b"public.t", 3)
    assert batch.partitions == [expected] * 7
    assert batch.markers == [6]
    again = decoder(partitions=3, key=False).decode_batch(payloads)  # a new session: same placement
    assert again.partitions == batch.partitions


def test_empty_key_values_go_to_their_tables_partition() -> None:
    dec = decoder(partitions=5)
    batch = dec.decode_batch([m.begin(10), m.insert(REL, ["", "v"]), m.insert(REL, ["", "w"])])
    assert batch.keys == [b"", b""]
    assert batch.partitions == [key_partition(b"public.t", 5)] * 2


def test_markers_reset_between_batches_and_after_errors() -> None:
    dec = decoder(partitions=2)
    first = dec.decode_batch([m.begin(10), m.insert(REL, ["a", "1"])])
    with pytest.raises(Exception):
        dec.decode_batch([m.insert(REL, ["a", "1"]), b"\xff"])
    second = dec.decode_batch([m.insert(REL, ["b", "1"])])
    assert first.markers == [0] and second.markers == [0]


def test_begins_are_message_positions() -> None:
    dec = decoder(partitions=1)
    batch = dec.decode_batch([m.begin(10), m.insert(REL, ["a", "1"]), m.commit(10, 20), m.begin(30), m.commit(30, 40)])
    assert batch.begins == [0, 3]


def test_set_partition_count_validates() -> None:
    dec = decoder()
    with pytest.raises(ConfigError, match="not in the topic map"):
        dec.set_partition_count("nope", 3)
    with pytest.raises(ConfigError, match="at least one partition"):
        dec.set_partition_count("topic", 0)
    assert sorted(dec.topics) == ["other", "topic"]
