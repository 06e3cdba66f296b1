"""Golden captures recorded from a real PostgreSQL (tests/data/record_captures.py) decode byte-exact."""

from __future__ import annotations

import gzip
import json
import random
import struct
from pathlib import Path
from typing import Any, Dict, List

import pytest

from pgrepl import ReplicationOp
from pgrepl._core import Decoder
from pgrepl.bench.baseline.decoder import PyDecoder
from pgrepl.testing.capture import iter_capture, read_payloads
from tests.data.record_captures import TOPIC_MAP

DATA = Path(__file__).resolve().parents[1] / "data"


def expected(name: str) -> List[Dict[str, Any]]:
    with gzip.open(DATA / f"{name}.expected.jsonl.gz", "rt", encoding="utf-8") as src:
        return [json.loads(line) for line in src]


def serde_bytes(record: Dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def original_semantics_decoder(topic_map: Any) -> Decoder:
    """The compiled decoder writing what the original library writes (one Update on a key change)."""
    return Decoder(topic_map, split_key_changes=False)


@pytest.mark.parametrize("name", ["golden", "inventory"])
@pytest.mark.parametrize("decoder_class", [original_semantics_decoder, PyDecoder])
def test_capture_decodes_to_the_expected_records(name: str, decoder_class: Any) -> None:
    batch = decoder_class(TOPIC_MAP).decode_batch(read_payloads(DATA / f"{name}.pgcap.gz"))
    want = expected(name)
    assert len(batch) == len(want)
    for i, item in enumerate(want):
        assert batch.topics[i] == item["topic"]
        assert batch.keys[i] == item["key"].encode()
        assert batch.values[i] == serde_bytes(item["record"]), f"record {i}"


def test_any_batching_gives_the_same_records() -> None:
    payloads = read_payloads(DATA / "golden.pgcap.gz")
    whole = Decoder(TOPIC_MAP, split_key_changes=False).decode_batch(payloads)
    rng = random.Random(11)
    for _ in range(20):
        dec = Decoder(TOPIC_MAP, split_key_changes=False)
        values: List[bytes] = []
        start = 0
        while start < len(payloads):
            size = rng.randint(1, 7)
            values += dec.decode_batch(payloads[start:start + size]).values
            start += size
        assert values == whole.values


def test_golden_records_round_trip_through_replication_op() -> None:
    for value in Decoder(TOPIC_MAP, split_key_changes=False).decode_batch(read_payloads(DATA / "golden.pgcap.gz")).values:
        assert ReplicationOp.from_json(value).to_json() == value


def _new_tuple_kinds(payload: bytes) -> List[str]:
    """Column kinds of an Update message's new tuple (a small independent walk of the format)."""
    pos = 5
    kinds: List[str] = []
    while True:
        tag = payload[pos:pos + 1]
        ncols = struct.unpack_from(">H", payload, pos + 1)[0]
        pos += 3
        kinds = []
        for _ in range(ncols):
            kind = payload[pos:pos + 1].decode()
            kinds.append(kind)
            pos += 1
            if kind in "tb":
                pos += 4 + struct.unpack_from(">I", payload, pos)[0]
        if tag == b"N":
            return kinds


def test_capture_covers_unchanged_toast_and_schema_changes() -> None:
    messages = [payload for _, payload in iter_capture(DATA / "golden.pgcap.gz")]
    updates = [p for p in messages if p[:1] == b"U"]
    assert any("u" in _new_tuple_kinds(p) for p in updates), "no Update carried an unchanged TOAST value"
    assert sum(1 for p in messages if p[:1] == b"R" and b"notes\x00" in p) >= 3, "no mid-stream schema change"
    records = [json.loads(v) for v in Decoder(TOPIC_MAP, split_key_changes=False).decode_batch(messages).values]
    toast_update = next(r for r in records if r["table_name"] == "types" and "Update" in r["op"]
                        and r["op"]["Update"][1][1] == "7")
    assert toast_update["op"]["Update"][1][-1] == "B" * 3000
