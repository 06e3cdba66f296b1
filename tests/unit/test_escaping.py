"""serde_json's string escaping, checked char by char (the wire format's compatibility contract)."""

from __future__ import annotations

import json

import pytest

from pgrepl import DecodeError
from pgrepl._core import Decoder
from pgrepl._core import escape_json_string
from pgrepl.testing import pgoutput as m

SHORT = {0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r", 0x22: '\\"', 0x5C: "\\\\"}


def serde_rule(code: int) -> str:
    """The escape serde_json writes for one ASCII code point, spelled out from its rules."""
    if code in SHORT:
        return SHORT[code]
    if code < 0x20:
        return "\\u%04x" % code
    return chr(code)


@pytest.mark.parametrize("code", range(0x80))
def test_every_ascii_char(code: int) -> None:
    expected = ('"' + serde_rule(code) + '"').encode()
    assert escape_json_string(chr(code)) == expected
    # and the same through a full record
    dec = Decoder({"t": {"name": "topic"}})
    dec.decode(m.begin(10))
    dec.decode(m.relation(1, "public", "t", ["c"]))
    record = dec.decode(m.insert(1, ["a" + chr(code) + "b"]))
    assert record.value.endswith(b'"Insert":["a' + expected[1:-1] + b'b"]}}')


def test_json_module_agrees_on_ascii() -> None:
    text = "".join(chr(c) for c in range(0x80))
    assert escape_json_string(text) == json.dumps(text, ensure_ascii=False).encode()


@pytest.mark.parametrize(
    "text",
    ["é", "ß", "€", "中文", "😀", "\u2028\u2029", "\ufeff", "\U0010ffff", "\x7f", "a\u0080b", "\u07ff\u0800\uffff\U00010000"],
)
def test_multibyte_utf8_is_raw(text: str) -> None:
    assert escape_json_string(text) == b'"' + text.encode("utf-8") + b'"'


@pytest.mark.parametrize(
    "raw",
    [
        b"\x80",  # stray continuation byte
        b"\xbf",
        b"\xc0\x80",  # overlong NUL
        b"\xc1\xbf",  # overlong
        b"\xe0\x80\x80",  # overlong 3-byte
        b"\xe0\x9f\xbf",
        b"\xed\xa0\x80",  # UTF-16 surrogate
        b"\xed\xbf\xbf",
        b"\xf0\x80\x80\x80",  # overlong 4-byte
        b"\xf4\x90\x80\x80",  # above U+10FFFF
        b"\xf5\x80\x80\x80",
        b"\xff",
        b"\xc3",  # truncated sequences
        b"\xe2\x82",
        b"\xf0\x9f\x98",
        b"\xc3\x28",  # bad continuation
        b"ok\xe2\x28\xa1",
    ],
)
def test_invalid_utf8_is_an_error_not_mojibake(raw: bytes) -> None:
    with pytest.raises(ValueError):
        escape_json_string(raw)
    dec = Decoder({"t": {"name": "topic"}})
    dec.decode(m.begin(10))
    dec.decode(m.relation(1, "public", "t", ["c"]))
    payload = m.insert(1, [b"abc" + raw])
    with pytest.raises(DecodeError) as info:
        dec.decode(payload)
    assert "invalid UTF-8 in column 'c' of table public.t" in str(info.value)
    assert info.value.msg_type == "I"
    assert info.value.offset == payload.index(b"abc" + raw)


def test_valid_utf8_agrees_with_python_for_every_code_point_class() -> None:
    # boundaries of each UTF-8 length class, and around the surrogate gap
    for cp in [0x80, 0x7FF, 0x800, 0xD7FF, 0xE000, 0xFFFD, 0xFFFF, 0x10000, 0x10FFFF]:
        char = chr(cp)
        assert escape_json_string(char) == b'"' + char.encode() + b'"'


# Long values go through the 16-bytes-at-a-time scan: every kind of byte that needs care, at every
# position of a block, around block ends and in the shorter tail.
CARE = ["\x00", "\x01", "\x08", "\t", "\n", "\x1f", '"', "\\", "\x7f", "é", "€", "😀"]


@pytest.mark.parametrize("char", CARE)
def test_long_text_with_one_char_needing_care_at_every_position(char: str) -> None:
    for length in (15, 16, 17, 31, 32, 33, 47, 64):
        for at in range(length):
            text = "a" * at + char + "b" * (length - at - 1)
            assert escape_json_string(text) == json.dumps(text, ensure_ascii=False).encode(), (length, at)


def test_long_text_agrees_with_the_json_module() -> None:
    import random

    rng = random.Random(1234)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 {}:,[]" * 4 + "".join(CARE) + "\r\x0b\x0c"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 400)))
        assert escape_json_string(text) == json.dumps(text, ensure_ascii=False).encode()
    document = json.dumps({"items": [{"sku": f"sku-{i}", "note": f'line "{i}"\n'} for i in range(200)]})
    assert escape_json_string(document) == json.dumps(document, ensure_ascii=False).encode()


@pytest.mark.parametrize("raw", [b"\x80", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"\xed\xa0\x80", b"\xff"])
def test_invalid_utf8_anywhere_in_a_long_text_is_an_error(raw: bytes) -> None:
    for at in range(40):
        with pytest.raises(ValueError):
            escape_json_string(b"a" * at + raw + b"z" * 20)
