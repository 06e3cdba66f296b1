"""Snapshot rows (COPY text lines) become the same Insert records the stream gives for the same rows."""

from __future__ import annotations

from typing import List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgrepl import DecodeError, ReplicationOp
from pgrepl._core import Decoder, copy_row_keys, copy_row_values, encode_copy_rows
from pgrepl.testing import pgoutput as m

REL = 16390
COLS = ["id", "org", "body"]
TOPIC_MAP = {"inv": {"name": "inv_topic", "partition_key": ["org"]}}
_COPY_ESCAPES = {"\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def copy_line(values: List[Optional[str]]) -> bytes:
    """A row as PostgreSQL's COPY ... TO STDOUT (text format) writes it."""
    fields = ["\\N" if v is None else "".join(_COPY_ESCAPES.get(ch, ch) for ch in v) for v in values]
    return ("\t".join(fields) + "\n").encode()


def stream_insert(values: List[Optional[str]], partitions: int = 6) -> tuple:
    dec = Decoder(TOPIC_MAP)
    dec.set_partition_count("inv_topic", partitions)
    batch = dec.decode_batch([m.relation(REL, "public", "inv", COLS), m.begin(500), m.insert(REL, values)])
    return batch.values[0], batch.keys[0], batch.partitions[0]


def snapshot_insert(values_list: List[List[Optional[str]]], partitions: int = 6, lsn: int = 500, seq: int = 0):
    dec = Decoder(TOPIC_MAP)
    dec.set_partition_count("inv_topic", partitions)
    dec.define_relation(REL, "public", "inv", COLS)
    return encode_copy_rows(dec, REL, [copy_line(v) for v in values_list], lsn, seq)


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), TEXT), min_size=3, max_size=3).filter(lambda v: v[1] is not None))
def test_a_snapshot_row_is_byte_for_byte_the_streams_insert(values: List[Optional[str]]) -> None:
    batch = snapshot_insert([values])
    assert (batch.values[0], batch.keys[0], batch.partitions[0]) == stream_insert(values)


def test_positions_follow_the_given_lsn_and_sequence() -> None:
    batch = snapshot_insert([["1", "a", "x"], ["2", "b", None], ["3", "a", "tab\there"]], lsn=0x1_0000_0000, seq=7)
    ops = [ReplicationOp.from_json(v) for v in batch.values]
    assert [(o.lsn, o.seq_id) for o in ops] == [(0x1_0000_0000, 7), (0x1_0000_0000, 8), (0x1_0000_0000, 9)]
    assert ops[2].op.new == ("3", "a", "tab\there")
    assert batch.keys == [b"a", b"b", b"a"]
    assert batch.markers == sorted(batch.markers) and batch.markers[-1] == 2


def test_copy_fields_and_keys() -> None:
    line = copy_line(["1", None, "a\\b\nc"])
    assert copy_row_values(line) == ["1", None, "a\\b\nc"]
    assert copy_row_keys([line, copy_line(["2", "", ""])], (0, 1), 3) == [b"1\x00\xff", b"2\x00"]


@pytest.mark.parametrize("line, fragment", [
    (b"1\ta\n", "has 2 fields"),
    (b"1\ta\tb\tc\n", "has 4 fields"),
    (b"1\ta\tb\\", "lone backslash"),
    (b"1\ta\t\xff\xfe\n", "invalid UTF-8"),
])
def test_malformed_copy_rows_are_decode_errors(line: bytes, fragment: str) -> None:
    dec = Decoder(TOPIC_MAP)
    dec.define_relation(REL, "public", "inv", COLS)
    with pytest.raises(DecodeError, match=fragment):
        encode_copy_rows(dec, REL, [line], 1, 0)


def test_a_batch_splits_around_a_chunk_with_its_markers_and_commits() -> None:
    """The stream part before a high watermark keeps only the commits before the watermark's
    transaction; markers are each part's last record per partition."""
    from pgrepl.producer.snapshot.coordinator import _part

    dec = Decoder(TOPIC_MAP)
    dec.set_partition_count("inv_topic", 4)
    batch = dec.decode_batch([
        m.relation(REL, "public", "inv", COLS),
        m.begin(100), m.insert(REL, ["1", "a", "x"]), m.insert(REL, ["2", "b", "y"]), m.commit(100, 110),
        m.begin(200), m.message("pgrepl.watermark", b'{"chunk": "c", "edge": "high"}'), m.commit(200, 210),
        m.begin(300), m.insert(REL, ["3", "a", "z"]), m.commit(300, 310),
    ])
    assert batch.messages == [(2, 200, "pgrepl.watermark", b'{"chunk": "c", "edge": "high"}')]
    before = _part(batch, 0, 2, 0, 1)
    after = _part(batch, 2, 3, 1, 3)
    assert [c.commit_lsn for c in before.commits] == [100] and [c.commit_lsn for c in after.commits] == [200, 300]
    assert before.values == batch.values[:2] and after.values == batch.values[2:]
    assert sorted(before.markers) == before.markers and len(before.markers) == len(set(before.partitions))
    assert after.markers == [0]


def test_a_block_of_lines_encodes_as_the_list_and_keep_drops_lines() -> None:
    """copy_out hands rows over as blocks of newline-terminated lines: encoding a block gives the
    same records as the list of its lines; ``keep`` (one byte per line) leaves lines out."""
    rows = [["1", "a", "x"], ["2", "b", None], ["3", "a", "tab\there\nnewline \\ back"], ["4", "c", ""]]
    lines = [copy_line(v) for v in rows]
    dec = Decoder(TOPIC_MAP)
    dec.set_partition_count("inv_topic", 6)
    dec.define_relation(REL, "public", "inv", COLS)
    listed = encode_copy_rows(dec, REL, lines, 500, 3)
    block = encode_copy_rows(dec, REL, b"".join(lines), 500, 3)
    assert (block.values, block.keys, block.partitions, block.markers) == (
        listed.values, listed.keys, listed.partitions, listed.markers)
    kept = encode_copy_rows(dec, REL, b"".join(lines), 500, 3, keep=bytes([1, 0, 1, 0]))
    expected = encode_copy_rows(dec, REL, [lines[0], lines[2]], 500, 3)
    assert (kept.values, kept.keys, kept.partitions) == (expected.values, expected.keys, expected.partitions)
    assert copy_row_keys(b"".join(lines), (0,), 3) == copy_row_keys(lines, (0,), 3) == [b"1", b"2", b"3", b"4"]
    with pytest.raises(TypeError):
        encode_copy_rows(dec, REL, "not bytes", 500, 0)  # type: ignore[arg-type]


def test_chunk_rows_keep_blocks_spill_and_give_whole_lines_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyless table's rows spill to a temporary file past SPILL_BYTES; read back, every block
    holds whole lines, in order, and the last line is known either way."""
    from pgrepl.producer.snapshot import reader

    lines = [copy_line([str(i), f"org{i % 3}", "x" * (i % 50)]) for i in range(2000)]
    blocks = [b"".join(lines[i:i + 70]) for i in range(0, len(lines), 70)]
    for spill in (False, True):
        monkeypatch.setattr(reader, "SPILL_BYTES", 5_000 if spill else 1 << 30)
        monkeypatch.setattr(reader, "BLOCK_BYTES", 777)
        rows = reader.ChunkRows()
        for block in blocks:
            rows.add(block, block.count(b"\n"))
        assert rows.count == 2000 and rows.last_line() == lines[-1]
        back = list(rows.batches())
        assert all(b.endswith(b"\n") for b in back) and b"".join(back) == b"".join(lines)
        assert (len(back) > len(blocks)) == spill  # read back from the file in BLOCK_BYTES pieces
        rows.close()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), TEXT), min_size=3, max_size=3).filter(lambda v: v[1] is not None),
                min_size=1, max_size=30),
       st.integers(0, 2**64 - 1), st.integers(0, 10**9), st.integers(0, 2**32))
def test_records_encoded_ahead_and_restamped_are_the_records_encoded_now(
        rows: List[List[Optional[str]]], lsn: int, seq: int, mask_seed: int) -> None:
    """Readers encode a chunk ahead at position (0, 0...); the emission only writes the position:
    byte for byte what encoding at the emission gives, keys, partitions and markers included."""
    from pgrepl._core import restamp_copy_records

    block = b"".join(copy_line(v) for v in rows)
    dec = Decoder(TOPIC_MAP)
    dec.set_partition_count("inv_topic", 3)
    dec.define_relation(REL, "public", "inv", COLS)
    keep = bytes((mask_seed >> (i % 32)) & 1 for i in range(len(rows)))
    ahead = encode_copy_rows(dec, REL, block, 0, 0)
    for mask in (None, keep):
        now = encode_copy_rows(dec, REL, block, lsn, seq, mask)
        again = restamp_copy_records(dec, REL, ahead, lsn, seq, mask)
        assert (again.values, again.keys, again.partitions, again.topics, again.markers) == (
            now.values, now.keys, now.partitions, now.topics, now.markers)


def test_restamped_records_of_a_topic_without_a_partition_count_are_each_a_marker() -> None:
    from pgrepl._core import restamp_copy_records

    dec = Decoder(TOPIC_MAP)  # no partition count: the producer's partitioner decides, every record a marker
    dec.define_relation(REL, "public", "inv", COLS)
    block = b"".join(copy_line([str(i), "a", None]) for i in range(4))
    now = encode_copy_rows(dec, REL, block, 9, 1)
    again = restamp_copy_records(dec, REL, encode_copy_rows(dec, REL, block, 0, 0), 9, 1)
    assert again.values == now.values and again.partitions == now.partitions == [-1] * 4
    assert again.markers == now.markers == [0, 1, 2, 3]
    other = encode_copy_rows(dec, REL, block, 0, 0)
    other.values = [b"not a record"] * 4
    with pytest.raises(DecodeError, match="not a record of encode_copy_rows"):
        restamp_copy_records(dec, REL, other, 9, 1)
