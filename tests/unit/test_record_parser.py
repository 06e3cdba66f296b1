"""The C record parser (consumer hot path) agrees with ReplicationOp.from_json's general path, or declines."""

from __future__ import annotations

from typing import List, Optional

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgrepl import MalformedRecordError, Op, ReplicationOp
from pgrepl._core import parse_canonical
from pgrepl.model import _parsed_op

def parse_canonical_op(raw: object) -> Optional[ReplicationOp]:
    return parse_canonical(raw, _parsed_op)


def general_path(raw: bytes) -> ReplicationOp:
    """ReplicationOp.from_json without the C fast path: orjson + field checks."""
    import orjson

    return ReplicationOp.from_dict(orjson.loads(raw))


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def ops(draw: st.DrawFn) -> ReplicationOp:
    width = draw(st.integers(min_value=0, max_value=5))
    columns = draw(st.lists(TEXT, min_size=width, max_size=width))
    row = st.lists(st.one_of(st.none(), TEXT), min_size=width, max_size=width)
    kind = draw(st.sampled_from(["Insert", "Update", "Delete"]))
    if kind == "Insert":
        op = Op.insert(draw(row))
    elif kind == "Update":
        op = Op.update(draw(row), draw(row))
    else:
        op = Op.delete(draw(row))
    return ReplicationOp(draw(TEXT), columns, draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)), op)


@SETTINGS
@given(st.lists(ops(), min_size=1, max_size=4))
def test_canonical_records_parse_to_the_same_op(records: List[ReplicationOp]) -> None:
    for record in records:  # several in a row exercise the table/columns prefix cache
        raw = record.to_json()
        parsed = parse_canonical_op(raw)
        assert parsed == record == ReplicationOp.from_json(raw) == general_path(raw)
        assert parsed.to_json() == raw


def general(raw: bytes) -> Optional[ReplicationOp]:
    try:
        return general_path(raw)
    except (MalformedRecordError, ValueError):
        return None


@SETTINGS
@given(ops(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_records_are_declined_or_parsed_like_from_json(record: ReplicationOp, flips: list) -> None:
    raw = bytearray(record.to_json())
    for pos, value in flips:
        raw[pos % len(raw)] = value
    fast = parse_canonical_op(bytes(raw))
    if fast is not None:
        assert fast == general(bytes(raw))


def test_declines_what_it_does_not_own() -> None:
    base = b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":2,"op":{"Delete":[null]}}'
    assert parse_canonical_op(base) == ReplicationOp.from_json(base)
    for raw in [
        base.replace(b'"lsn":1', b'"lsn":18446744073709551616'),  # > u64
        base.replace(b'"lsn":1', b'"lsn":01'),
        base.replace(b"[null]", b"[null,null]"),  # width
        base.replace(b'"t",', b'"t", '),  # whitespace: legal JSON, left to the general path
        base.replace(b"null", b'"\\ud83d\\ude00"'),  # surrogate escapes: general path
        base.replace(b"null", b'"\xff"'),  # invalid UTF-8
        base.replace(b"null", b"1"),
        base + b" ",
        b"",
        None,
    ]:
        assert parse_canonical_op(raw) is None
