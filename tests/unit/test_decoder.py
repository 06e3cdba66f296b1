"""The decoder's semantics on hand-built pgoutput messages: output bytes, keys, errors."""

from __future__ import annotations

import json
import logging
from typing import List

import orjson
import pytest

from pgrepl import ConfigError, ReplicationError, ReplicationOp, TopicInfo
from pgrepl._core import Begin, Commit, Decoder, Record
from pgrepl.testing import pgoutput as m

REL = 16384
COLS = ["id", "org", "body"]


def new_decoder(**kwargs) -> Decoder:
    dec = Decoder({"inv": {"name": "inv_topic", "partition_key": ["org"]}}, **kwargs)
    dec.decode(m.relation(REL, "public", "inv", COLS))
    return dec


def records(dec: Decoder, payloads: List[bytes]) -> List[Record]:
    return [r for r in (dec.decode(p) for p in payloads) if isinstance(r, Record)]


def test_insert_update_delete_exact_bytes() -> None:
    """Byte for byte the original library's records (split_key_changes=False keeps its Update)."""
    dec = new_decoder(split_key_changes=False)
    out = records(dec, [
        m.begin(0x1_0000_0010),
        m.insert(REL, ["1", "o1", "hello"]),
        m.update(REL, ["1", "o1", "hello"], ["1", "o2", None]),
        m.delete(REL, ["1", "o2", None]),
        m.commit(0x1_0000_0010, 0x1_0000_0040),
    ])
    prefix = b'{"table_name":"inv","col_names":["id","org","body"],"lsn":4294967312,'
    assert [r.value for r in out] == [
        prefix + b'"seq_id":0,"op":{"Insert":["1","o1","hello"]}}',
        prefix + b'"seq_id":1,"op":{"Update":[["1","o1","hello"],["1","o2",null]]}}',
        prefix + b'"seq_id":2,"op":{"Delete":["1","o2",null]}}',
    ]
    assert [r.key for r in out] == [b"o1", b"o2", b"o2"]
    assert [(r.topic, r.lsn, r.seq_id) for r in out] == [("inv_topic", 4294967312, i) for i in range(3)]


def test_an_update_that_changes_the_key_becomes_delete_plus_insert() -> None:
    """By default a row that moves to another key leaves its old partition with a Delete and
    arrives in its new one with an Insert: each key's history stays in one partition."""
    dec = new_decoder()
    dec.set_partition_count("inv_topic", 8)
    batch = dec.decode_batch([
        m.begin(0x1_0000_0010),
        m.update(REL, ["1", "o1", "a"], ["1", "o1", "b"]),  # same key: one Update
        m.update(REL, ["1", "o1", "b"], ["1", "o2", m.UNCHANGED]),  # key change, TOASTed body kept
        m.delete(REL, ["1", "o2", "b"]),
        m.commit(0x1_0000_0010, 0x1_0000_0040),
    ])
    ops = [ReplicationOp.from_json(v) for v in batch.values]
    assert [(o.op.kind, o.seq_id) for o in ops] == [("Update", 0), ("Delete", 1), ("Insert", 2), ("Delete", 3)]
    assert ops[1].op.old == ("1", "o1", "b") and ops[2].op.new == ("1", "o2", "b")
    assert batch.keys == [b"o1", b"o1", b"o2", b"o2"]
    from pgrepl._core import key_partition
    assert batch.partitions == [key_partition(k, 8) for k in batch.keys]
    dec.decode(m.begin(0x1_0000_0050))
    split = dec.decode(m.update(REL, ["2", "o1", "x"], ["2", "o3", "x"]))
    assert isinstance(split, tuple) and [r.key for r in split] == [b"o1", b"o3"]


def test_values_parse_back_and_reserialize_identically() -> None:
    dec = new_decoder()
    out = records(dec, [m.begin(99), m.insert(REL, ["1", "o", 'q"\\\n\x00é']), m.commit(99, 100)])
    op = ReplicationOp.from_json(out[0].value)
    assert op.op.new == ("1", "o", 'q"\\\n\x00é')
    assert op.to_json() == out[0].value
    assert orjson.loads(out[0].value)["op"]["Insert"][2] == 'q"\\\n\x00é'


def test_empty_string_is_not_null() -> None:
    dec = new_decoder()
    out = records(dec, [m.begin(5), m.insert(REL, ["1", "o", ""]), m.insert(REL, ["2", "o", None])])
    assert out[0].value.endswith(b'"Insert":["1","o",""]}}')
    assert out[1].value.endswith(b'"Insert":["2","o",null]}}')


def test_composite_partition_key_is_concatenated_without_separator() -> None:
    dec = Decoder({"inv": TopicInfo("t", ("org", "id"))})
    dec.decode(m.relation(REL, "public", "inv", COLS))
    out = records(dec, [m.begin(5), m.insert(REL, ["12", "ab", "x"]), m.delete(REL, ["12", "ab", "x"])])
    assert [r.key for r in out] == [b"ab12", b"ab12"]


def test_no_partition_key_means_no_key() -> None:
    dec = Decoder({"inv": TopicInfo("t")})
    dec.decode(m.relation(REL, "public", "inv", COLS))
    assert records(dec, [m.begin(5), m.insert(REL, ["1", "a", "b"])])[0].key is None


def test_update_key_from_new_row_delete_key_from_old_row() -> None:
    dec = new_decoder(split_key_changes=False)
    out = records(dec, [m.begin(5), m.update(REL, ["1", "old", "x"], ["1", "new", "x"]), m.delete(REL, ["1", "gone", "x"])])
    assert [r.key for r in out] == [b"new", b"gone"]


def test_unchanged_toast_is_filled_from_old_row() -> None:
    dec = new_decoder(split_key_changes=False)
    big = "x" * 5000
    out = records(dec, [m.begin(5), m.update(REL, ["1", "o", big], ["1", "o2", m.UNCHANGED])])
    assert ReplicationOp.from_json(out[0].value).op == ReplicationOp.from_json(out[0].value).op.update(["1", "o", big], ["1", "o2", big])


def test_unchanged_toast_partition_key_is_filled_too() -> None:
    dec = new_decoder()
    out = records(dec, [m.begin(5), m.update(REL, ["1", "orgA", "b"], ["2", m.UNCHANGED, "b"])])
    assert out[0].key == b"orgA"


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (m.update(REL, None, ["1", "o", "x"]), "UPDATE on table public.inv arrived without the old row"),
        (m.update(REL, ["1", None, None], ["1", "o", "x"], old_tag=b"K"), "UPDATE on table public.inv arrived without the old row"),
        (m.delete(REL, ["1", None, None], old_tag=b"K"), "DELETE on table public.inv arrived without the old row"),
        (m.update(REL, ["1", "o", m.UNCHANGED], ["1", "o", m.UNCHANGED]), "TOASTed column 'body'"),
    ],
)
def test_missing_old_row_names_table_and_fix(payload: bytes, fragment: str) -> None:
    dec = new_decoder()
    dec.decode(m.begin(5))
    with pytest.raises(ConfigError) as info:
        dec.decode(payload)
    assert fragment in str(info.value)
    assert "ALTER TABLE public.inv REPLICA IDENTITY FULL" in str(info.value)


def test_null_partition_key_is_an_error_naming_table_and_column() -> None:
    dec = new_decoder()
    dec.decode(m.begin(5))
    with pytest.raises(ReplicationError, match="partition-key column 'org' of table public.inv is NULL"):
        dec.decode(m.insert(REL, ["1", None, "x"]))


def test_unmapped_table_is_a_config_error() -> None:
    dec = new_decoder()
    dec.decode(m.relation(777, "public", "other", ["a"]))
    dec.decode(m.begin(5))
    with pytest.raises(ConfigError, match="table public.other is published but has no topic-map entry"):
        dec.decode(m.insert(777, ["1"]))


def test_missing_partition_key_column_is_a_config_error() -> None:
    dec = Decoder({"inv": {"name": "t", "partition_key": ["nope"]}})
    dec.decode(m.relation(REL, "public", "inv", COLS))
    dec.decode(m.begin(5))
    with pytest.raises(ConfigError, match="partition-key column 'nope' of table public.inv"):
        dec.decode(m.insert(REL, ["1", "o", "x"]))


def test_schema_qualified_entry_wins_over_bare_name() -> None:
    dec = Decoder({"inv": {"name": "bare"}, "sales.inv": {"name": "qualified"}})
    dec.decode(m.relation(1, "sales", "inv", ["a"]))
    dec.decode(m.relation(2, "public", "inv", ["a"]))
    out = records(dec, [m.begin(5), m.insert(1, ["x"]), m.insert(2, ["y"])])
    assert [r.topic for r in out] == ["qualified", "bare"]
    assert all(r.value.startswith(b'{"table_name":"inv",') for r in out)


def test_relation_message_mid_stream_changes_col_names() -> None:
    dec = new_decoder()
    out = records(dec, [
        m.begin(5),
        m.insert(REL, ["1", "o", "x"]),
        m.relation(REL, "public", "inv", ["id", "org", "body", "extra"]),
        m.insert(REL, ["2", "o", "x", "e"]),
        m.relation(REL, "public", "inv", ["id", "org"]),
        m.insert(REL, ["3", "o"]),
    ])
    assert [ReplicationOp.from_json(r.value).col_names for r in out] == [
        ("id", "org", "body"), ("id", "org", "body", "extra"), ("id", "org")]
    assert [r.seq_id for r in out] == [0, 1, 2]


def test_seq_id_counts_across_tables_and_resets_per_transaction() -> None:
    dec = Decoder({"a": {"name": "ta"}, "b": {"name": "tb"}})
    dec.decode(m.relation(1, "public", "a", ["x"]))
    dec.decode(m.relation(2, "public", "b", ["y"]))
    out = records(dec, [
        m.begin(100), m.insert(1, ["1"]), m.insert(2, ["2"]), m.insert(1, ["3"]), m.commit(100, 110),
        m.begin(200), m.insert(2, ["4"]), m.commit(200, 210),
    ])
    assert [(r.topic, r.lsn, r.seq_id) for r in out] == [
        ("ta", 100, 0), ("tb", 100, 1), ("ta", 100, 2), ("tb", 200, 0)]


def test_begin_and_commit_events() -> None:
    dec = new_decoder()
    begin = dec.decode(m.begin(0xABCDEF, xid=42, commit_time=123))
    assert isinstance(begin, Begin) and (begin.final_lsn, begin.xid, begin.commit_time) == (0xABCDEF, 42, 123)
    assert dec.in_transaction
    commit = dec.decode(m.commit(0xABCDEF, 0xABCE00, commit_time=123))
    assert isinstance(commit, Commit) and (commit.commit_lsn, commit.end_lsn) == (0xABCDEF, 0xABCE00)
    assert not dec.in_transaction


def test_batch_reports_commits_with_record_positions() -> None:
    dec = new_decoder()
    batch = dec.decode_batch([
        m.begin(100), m.insert(REL, ["1", "a", "x"]), m.insert(REL, ["2", "b", "x"]), m.commit(100, 150),
        m.begin(200), m.commit(200, 250),
        m.begin(300), m.insert(REL, ["3", "c", "x"]),
    ])
    assert len(batch) == 3
    assert batch.keys == [b"a", b"b", b"c"]
    assert batch.topics == ["inv_topic"] * 3
    assert [(c.record_end, c.commit_lsn, c.end_lsn) for c in batch.commits] == [(2, 100, 150), (2, 200, 250)]
    # the open transaction continues in the next batch
    batch2 = dec.decode_batch([m.insert(REL, ["4", "d", "x"]), m.commit(300, 350)])
    assert [c.record_end for c in batch2.commits] == [1]
    assert orjson.loads(batch2.values[0])["seq_id"] == 1


def test_batch_accepts_memoryview_and_bytearray() -> None:
    dec = new_decoder()
    batch = dec.decode_batch([memoryview(m.begin(7)), bytearray(m.insert(REL, ["1", "a", "b"]))])
    assert batch.keys == [b"a"]


def test_origin_type_and_message_produce_nothing() -> None:
    dec = new_decoder()
    batch = dec.decode_batch([
        m.begin(7), m.origin("node1", 5), m.type_message(16500, "public", "mood"),
        m.message("pfx", b"\x00\x01binary"), m.insert(REL, ["1", "a", "b"]), m.commit(7, 9)])
    assert len(batch) == 1
    assert dec.decode(m.message("non-transactional", b"x", transactional=False)) is None


def test_truncate_is_an_error_by_default() -> None:
    dec = new_decoder()
    dec.decode(m.begin(0x16_B374D848))
    with pytest.raises(ReplicationError) as info:
        dec.decode(m.truncate([REL]))
    text = str(info.value)
    assert "TRUNCATE of public.inv" in text and "16/B374D848" in text and "truncate='skip'" in text


def test_truncate_skip_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    dec = new_decoder(truncate="skip")
    with caplog.at_level(logging.WARNING, logger="pgrepl"):
        batch = dec.decode_batch([m.begin(0x10), m.truncate([REL]), m.insert(REL, ["1", "a", "b"]), m.commit(0x10, 0x20)])
    assert len(batch) == 1 and orjson.loads(batch.values[0])["seq_id"] == 0
    assert "skipping TRUNCATE of public.inv" in caplog.text and "0/10" in caplog.text


def test_bad_truncate_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="truncate must be 'error' or 'skip'"):
        Decoder({"t": {"name": "x"}}, truncate="ignore")


def test_binary_column_is_rejected_clearly() -> None:
    dec = new_decoder()
    dec.decode(m.begin(5))
    payload = m.insert(REL, ["1", "a", "b"]).replace(b"t\x00\x00\x00\x01b", b"b\x00\x00\x00\x01b")
    with pytest.raises(ReplicationError, match="binary format"):
        dec.decode(payload)


def test_reset_forgets_transaction_and_relations() -> None:
    dec = new_decoder()
    dec.decode(m.begin(5))
    dec.reset()
    assert not dec.in_transaction and dec.relations == {}
    dec.decode(m.begin(6))  # no "Begin while a transaction is still open"


def test_relations_are_exposed() -> None:
    dec = new_decoder()
    rel = dec.relations[REL]
    assert (rel.schema, rel.name, rel.columns, rel.replica_identity) == ("public", "inv", tuple(COLS), "f")
    assert rel.topic_info == TopicInfo("inv_topic", ("org",))


def test_wide_relation_and_large_values() -> None:
    cols = [f"c{i}" for i in range(1600)]
    dec = Decoder({"w": {"name": "wide"}})
    dec.decode(m.relation(9, "public", "w", cols))
    dec.decode(m.begin(1))
    values = [str(i) * 50 for i in range(1600)]
    rec = dec.decode(m.insert(9, values))
    assert ReplicationOp.from_json(rec.value).op.new == tuple(values)
    huge = "é\n" * 1_000_000
    dec.decode(m.relation(9, "public", "w", ["a"]))
    rec = dec.decode(m.insert(9, [huge]))
    assert orjson.loads(rec.value)["op"]["Insert"][0] == huge


@pytest.mark.parametrize("body", ["x" * 5000, 'q"\\\n' * 3000, "é€" * 40 + "tail", "short"])
def test_an_updates_unchanged_values_are_written_as_escaped_the_first_time(body: str) -> None:
    """The new row reuses the old row's escaped text for a value with the same bytes (an unchanged
    TOASTed value, or any unchanged column): the record is byte for byte the same as escaping it twice."""
    expected_body = json.dumps(body, ensure_ascii=False)
    for new_body in (m.UNCHANGED, body, body[:-1] + "!"):
        dec = Decoder({"inv": {"name": "inv_topic", "partition_key": ["org"]}}, split_key_changes=False)
        dec.decode(m.relation(REL, "public", "inv", COLS))
        out = records(dec, [m.begin(5), m.update(REL, ["1", "o", body], ["1", "o2", new_body]),
                            m.insert(REL, ["2", "o", body])])
        new_json = expected_body if new_body is m.UNCHANGED else json.dumps(new_body, ensure_ascii=False)
        assert out[0].value.endswith(f'"Update":[["1","o",{expected_body}],["1","o2",{new_json}]]}}}}'.encode())
        assert out[1].value.endswith(f'"Insert":["2","o",{expected_body}]}}}}'.encode())


def test_a_key_change_split_writes_both_records_in_full() -> None:
    dec = new_decoder()
    body = 'z"' * 4000
    values = dec.decode_batch([m.begin(5), m.update(REL, ["1", "o1", body], ["1", "o2", m.UNCHANGED])]).values
    expected_body = json.dumps(body).encode()
    assert len(values) == 2
    assert values[0].endswith(b'"Delete":["1","o1",' + expected_body + b"]}}")
    assert values[1].endswith(b'"Insert":["1","o2",' + expected_body + b"]}}")
