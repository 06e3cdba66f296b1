"""ReplicationOp / Op: parsing the wire format back and writing the identical bytes."""

from __future__ import annotations

from typing import Any, Dict, Optional
from unittest import mock

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgrepl import MalformedRecordError, Op, ReplicationOp

SAMPLES = [
    b'{"table_name":"inventory","col_names":["id","organization_id"],"lsn":23456789,"seq_id":0,"op":{"Insert":["1","8f14e45f"]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":23456790,"seq_id":1,"op":{"Update":[["old"],["new"]]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":23456790,"seq_id":2,"op":{"Delete":[null]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":18446744073709551615,"seq_id":2,"op":{"Delete":["\\u0001\\"\\\\\xc3\xa9"]}}',
]


@pytest.mark.parametrize("raw", SAMPLES)
def test_round_trip_is_byte_identical(raw: bytes) -> None:
    assert ReplicationOp.from_json(raw).to_json() == raw


def test_fields_and_helpers() -> None:
    ins, upd, dele = (ReplicationOp.from_json(s) for s in SAMPLES[:3])
    assert ins.op == Op.insert(["1", "8f14e45f"]) and ins.position == (23456789, 0)
    assert ins.row_dict() == {"id": "1", "organization_id": "8f14e45f"} and ins.old_dict() is None
    assert upd.op.kind == "Update" and upd.op.old == ("old",) and upd.op.new == ("new",)
    assert upd.row_dict() == {"a": "new"} and upd.old_dict() == {"a": "old"}
    assert dele.op == Op.delete([None]) and dele.row_dict() == {"a": None}
    assert ReplicationOp("t", ["a"], 1, 2, Op.update(["x"], ["y"])) == ReplicationOp("t", ("a",), 1, 2, Op.update(("x",), ("y",)))


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"not json", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"table_name":"t"}', "has fields"),
        (b'{"table_name":1,"col_names":[],"lsn":1,"seq_id":0,"op":{"Insert":[]}}', "table_name must be a string"),
        (b'{"table_name":"t","col_names":[1],"lsn":1,"seq_id":0,"op":{"Insert":[]}}', "col_names"),
        (b'{"table_name":"t","col_names":[],"lsn":-1,"seq_id":0,"op":{"Insert":[]}}', "lsn must be a non-negative integer"),
        (b'{"table_name":"t","col_names":[],"lsn":true,"seq_id":0,"op":{"Insert":[]}}', "lsn must be"),
        (b'{"table_name":"t","col_names":[],"lsn":1,"seq_id":1.5,"op":{"Insert":[]}}', "seq_id must be"),
        (b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Upsert":["x"]}}', "unknown op 'Upsert'"),
        (b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":["x"],"Delete":["x"]}}', "one key"),
        (b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":["x","y"]}}', "2 values but col_names has 1"),
        (b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":[1]}}', "strings and nulls"),
        (b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Update":[["x"]]}}', "[old_row, new_row]"),
    ],
)
def test_malformed_records_say_what_is_wrong(raw: bytes, fragment: str) -> None:
    with pytest.raises(MalformedRecordError) as info:
        ReplicationOp.from_json(raw)
    assert fragment in str(info.value)


def test_a_tombstone_is_not_an_op() -> None:
    with pytest.raises(MalformedRecordError, match="tombstone"):
        ReplicationOp.from_json(None)
    assert [ReplicationOp.from_json(s).seq_id for s in SAMPLES] == [0, 1, 2, 2]


def test_op_validates_its_rows() -> None:
    with pytest.raises(ValueError):
        Op("Insert", ("x",), ("y",))
    with pytest.raises(ValueError):
        Op("Merge", None, ("y",))


# ------------------------------------------------------------------------------------------
# from_json's two paths: the C parser (canonical layout) and orjson + field checks (the rest)
# ------------------------------------------------------------------------------------------


def general_path(raw: Optional[bytes]) -> ReplicationOp:
    """``ReplicationOp.from_json`` with its C fast path declining every record."""
    with mock.patch("pgrepl.model.parse_canonical", lambda data, make: None):
        return ReplicationOp.from_json(raw)


VALID = SAMPLES + [
    b'{"table_name":"t","col_names":[],"lsn":1,"seq_id":0,"op":{"Insert":[]}}',
    b'{"table_name":"t","col_names":["a","b"],"lsn":1,"seq_id":0,"op":{"Update":[[null,"x"],["y",null]]}}',
    # other key order: left to the general path
    b'{"op":{"Insert":["1"]},"seq_id":3,"lsn":7,"col_names":["a"],"table_name":"t"}',
]

MALFORMED = [
    b"not json", b"[1]", b"1", b'"x"', b"null", b"{}", b'{"table_name":"t"}',
    b'{"table_name":1,"col_names":[],"lsn":1,"seq_id":0,"op":{"Insert":[]}}',
    b'{"table_name":["t"],"col_names":[],"lsn":1,"seq_id":0,"op":{"Insert":[]}}',
    b'{"table_name":"t","col_names":[1],"lsn":1,"seq_id":0,"op":{"Insert":[null]}}',
    b'{"table_name":"t","col_names":"a","lsn":1,"seq_id":0,"op":{"Insert":["x"]}}',
    b'{"table_name":"t","col_names":[],"lsn":-1,"seq_id":0,"op":{"Insert":[]}}',
    b'{"table_name":"t","col_names":[],"lsn":true,"seq_id":0,"op":{"Insert":[]}}',
    b'{"table_name":"t","col_names":[],"lsn":1,"seq_id":1.5,"op":{"Insert":[]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Upsert":["x"]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":["x"],"Delete":["x"]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":["Insert"]}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":"I"}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":["x","y"]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":[1]}}',
    b'{"table_name":"t","col_names":["a","b"],"lsn":1,"seq_id":0,"op":{"Insert":[null,2]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":"x"}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Update":[["x"]]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Update":[["x"],[2]]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Update":[["x"],"y"]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Delete":[["x"]]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":["x"]},"extra":1}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0}',
    b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":["\xff"]}}',
]


def test_fast_path_equals_general_path_on_valid_records() -> None:
    for raw in VALID:
        fast, slow = ReplicationOp.from_json(raw), general_path(raw)
        assert fast == slow
        assert type(fast) is ReplicationOp and type(fast.op) is Op
        assert type(fast.col_names) is tuple and all(type(r) is tuple for r in (fast.op.old, fast.op.new) if r is not None)
        assert fast.to_json() == slow.to_json()
        assert ReplicationOp.from_json(raw) == fast  # column cache hit gives the same


def test_parsed_records_set_every_slot() -> None:
    # parsed records are built without __init__: if model.py grows a field, this must fail
    assert ReplicationOp.__slots__ == ("table_name", "col_names", "lsn", "seq_id", "op")
    assert Op.__slots__ == ("kind", "old", "new")
    op = ReplicationOp.from_json(VALID[1])
    assert [getattr(op, s) for s in ReplicationOp.__slots__] and [getattr(op.op, s) for s in Op.__slots__]


@pytest.mark.parametrize("raw", MALFORMED)
def test_fast_path_rejects_like_general_path(raw: bytes) -> None:
    with pytest.raises(MalformedRecordError) as slow:
        general_path(raw)
    with pytest.raises(MalformedRecordError) as fast:
        ReplicationOp.from_json(raw)
    assert str(fast.value) == str(slow.value)


values = st.one_of(st.none(), st.text(max_size=8), st.integers(-5, 5), st.booleans(), st.lists(st.none(), max_size=1))


@settings(max_examples=300, deadline=None)
@given(cols=st.lists(st.one_of(st.text(max_size=5), st.integers(0, 9)), max_size=4), lsn=st.one_of(st.integers(-2, 2**64 - 1), st.text(max_size=2)),
       seq=st.integers(-1, 10), kind=st.sampled_from(["Insert", "Update", "Delete", "Truncate"]),
       table=st.sampled_from(["t", "u", 5, ["t"]]),
       rows=st.lists(st.lists(values, max_size=4), min_size=1, max_size=3), shape=st.integers(0, 3))
def test_fast_path_matches_general_path_on_random_documents(cols: Any, lsn: Any, seq: int, kind: str, table: Any,
                                                            rows: Any, shape: int) -> None:
    payload: Any = rows[0] if kind != "Update" else rows[:2]
    if shape == 1:
        payload = rows
    doc: Dict[str, Any] = {"table_name": table, "col_names": cols, "lsn": lsn, "seq_id": seq, "op": {kind: payload}}
    if shape == 2:
        doc["op"]["Delete"] = rows[0]
    if shape == 3:
        doc = dict(reversed(list(doc.items())))
    raw = orjson.dumps(doc)
    try:
        expected: Any = general_path(raw)
    except MalformedRecordError as exc:
        expected = str(exc)
    try:
        got: Any = ReplicationOp.from_json(raw)
    except MalformedRecordError as exc:
        got = str(exc)
    assert got == expected
