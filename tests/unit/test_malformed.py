"""Malformed pgoutput never crashes or reads out of bounds: it raises DecodeError (fuzzed)."""

from __future__ import annotations

import struct
from typing import List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgrepl import ConfigError, DecodeError, PgreplError, ReplicationError
from pgrepl._core import Decoder
from pgrepl.testing import pgoutput as m

REL = 16384
COLS = ["id", "org", "body"]

VALID_STREAM: List[bytes] = [
    m.relation(REL, "public", "inv", COLS),
    m.type_message(16500, "public", "mood"),
    m.begin(0x100, xid=7),
    m.origin("node", 0x50),
    m.insert(REL, ["1", "org-1", "héllo \"world\"\n"]),
    m.update(REL, ["1", "org-1", "x" * 300], ["1", "org-2", m.UNCHANGED]),
    m.delete(REL, ["1", "org-2", None]),
    m.message("prefix", b"\x00payload"),
    m.commit(0x100, 0x180),
]


def fresh_decoder() -> Decoder:
    return Decoder({"inv": {"name": "inv", "partition_key": ["org"]}}, truncate="skip", split_key_changes=False)


def test_valid_stream_decodes() -> None:
    assert len(fresh_decoder().decode_batch(VALID_STREAM)) == 3


@pytest.mark.parametrize("index", range(len(VALID_STREAM)))
def test_every_truncation_of_every_message_is_a_decode_error(index: int) -> None:
    message = VALID_STREAM[index]
    for cut in range(len(message)):
        dec = fresh_decoder()
        dec.decode_batch(VALID_STREAM[:index])
        with pytest.raises(DecodeError) as info:
            dec.decode(message[:cut])
        assert 0 <= info.value.offset <= cut
        assert info.value.msg_type == (chr(message[0]) if cut else None)


@pytest.mark.parametrize("index", range(len(VALID_STREAM)))
def test_trailing_bytes_are_a_decode_error(index: int) -> None:
    dec = fresh_decoder()
    dec.decode_batch(VALID_STREAM[:index])
    with pytest.raises(DecodeError, match="unexpected trailing bytes"):
        dec.decode(VALID_STREAM[index] + b"\x00")


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"", "empty message"),
        (b"Z\x00\x00", "unknown message type (byte 0x5a)"),
        (b"S" + struct.pack(">I", 5), "unknown message type"),  # proto v2 stream start
        (m.insert(999, ["1"]), "unknown relation id 999"),
        (m.insert(REL, ["1", "o"]), "tuple has 2 columns but relation public.inv has 3"),
        (b"I" + struct.pack(">I", REL) + b"X" + m.tuple_data(["1", "o", "b"]), "Insert expects new tuple tag 'N'"),
        (b"I" + struct.pack(">I", REL) + b"N" + struct.pack(">H", 3) + b"q", "unknown tuple column kind 0x71"),
        (b"I" + struct.pack(">I", REL) + b"N" + struct.pack(">H", 3) + b"t" + struct.pack(">I", 0xFFFFFFFF) + b"x",
         "column 'id' claims 4294967295 bytes"),
        (b"D" + struct.pack(">I", REL) + b"N" + m.tuple_data(["1", "o", "b"]), "Delete expects tuple tag 'O' or 'K'"),
        (m.begin(0x200), "Begin while a transaction is still open"),
        (m.commit(0x999, 0x1000), "differs from the Begin's final LSN"),
    ],
)
def test_specific_malformations(payload: bytes, fragment: str) -> None:
    dec = fresh_decoder()
    dec.decode_batch(VALID_STREAM[:3])  # relation, type, begin: a transaction is open
    with pytest.raises(DecodeError) as info:
        dec.decode(payload)
    assert fragment in str(info.value)


def test_row_outside_transaction_and_commit_without_begin() -> None:
    dec = fresh_decoder()
    dec.decode(VALID_STREAM[0])
    with pytest.raises(DecodeError, match="row change outside a transaction"):
        dec.decode(VALID_STREAM[4])
    with pytest.raises(DecodeError, match="Commit without a Begin"):
        dec.decode(m.commit(1, 2))


def test_decode_error_reports_batch_index_and_str() -> None:
    dec = fresh_decoder()
    bad = VALID_STREAM[:5] + [b"I\x00"]
    with pytest.raises(DecodeError) as info:
        dec.decode_batch(bad)
    err = info.value
    assert (err.index, err.msg_type, err.offset) == (5, "I", 1)
    err.lsn = 0x16_B374D848
    assert str(err) == ("malformed pgoutput message type 'I' at byte 1: message truncated: "
                        "relation id needs 4 bytes, 1 left (message LSN 16/B374D848)")


def test_invalid_utf8_in_names_is_a_decode_error() -> None:
    dec = fresh_decoder()
    with pytest.raises(DecodeError, match="invalid UTF-8 in relation name"):
        dec.decode(m.relation(5, "public", "x", ["a"]).replace(b"x\x00", b"\xff\x00"))


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_random_bytes_never_crash(payloads: List[bytes]) -> None:
    dec = fresh_decoder()
    dec.decode_batch(VALID_STREAM[:3])
    for payload in payloads:
        try:
            dec.decode(payload)
        except (DecodeError, ConfigError, ReplicationError):
            pass


@FUZZ
@given(
    st.integers(min_value=0, max_value=len(VALID_STREAM) - 1),
    st.lists(st.tuples(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=255)),
             min_size=1, max_size=6),
)
def test_mutated_valid_messages_never_crash(index: int, flips: List[tuple]) -> None:
    message = bytearray(VALID_STREAM[index])
    for pos, value in flips:
        message[pos % len(message)] = value
    dec = fresh_decoder()
    dec.decode_batch(VALID_STREAM[:index] if VALID_STREAM[index][:1] != b"B" else VALID_STREAM[:2])
    try:
        result = dec.decode(bytes(message))
    except PgreplError:
        return
    # whatever decoded must be well-formed JSON when it is a record
    value = getattr(result, "value", None)
    if value is not None:
        import orjson

        orjson.loads(value)
