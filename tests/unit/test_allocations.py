"""The hot path makes no Python objects per row beyond the key and value bytes it returns."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from pgrepl._core import Decoder
from pgrepl.testing.capture import read_payloads
from tests.data.record_captures import TOPIC_MAP

CAPTURE = Path(__file__).resolve().parents[1] / "data" / "inventory.pgcap.gz"


def test_net_allocations_per_row_are_the_key_and_the_value() -> None:
    payloads = read_payloads(CAPTURE)
    decoder = Decoder(TOPIC_MAP)
    for topic in ("types_topic", "notes_topic", "inventory_topic"):
        decoder.set_partition_count(topic, 12)
    decoder.decode_batch(payloads[:200])  # relation cache, buffers
    gc.collect()
    gc.disable()
    try:
        before = sys.getallocatedblocks()
        batch = decoder.decode_batch(payloads[200:])
        after = sys.getallocatedblocks()
    finally:
        gc.enable()
    assert all(len(v) < 512 for v in batch.values)  # small enough for pymalloc, so counted
    per_row = (after - before) / len(batch)
    assert 1.9 < per_row < 2.05, f"{per_row:.3f} allocated blocks per row"
