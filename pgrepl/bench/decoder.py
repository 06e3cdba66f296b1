"""``pgrepl-bench --decoder-only``: the Cython decoder against the pure-Python baseline, no services.

Replays a pgoutput stream through ``Decoder.decode_batch`` and ``PyDecoder.decode_batch`` in
batches of 1,000 messages, as the producer does: a captured stream (``--capture FILE``, the
``pgrepl.testing.capture`` format; the repository has ``tests/data/inventory.pgcap.gz``), or by
default a synthesized stream of the 7-column inventory row (inserts, updates, deletes,
transactions of 1,000 changes) with the same byte layout PostgreSQL sends.
"""

from __future__ import annotations

import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from pgrepl.testing import pgoutput

#: Topic map for the repository captures (``tests/data/record_captures.py``) and the synthetic stream.
CAPTURE_TOPIC_MAP: Dict[str, Dict[str, Any]] = {
    "types": {"name": "types_topic", "partition_key": ["id"]},
    "notes": {"name": "notes_topic", "partition_key": ["owner", "id"]},
    "inventory": {"name": "inventory_topic", "partition_key": ["organization_id"]},
}

_INVENTORY_COLUMNS = ("id", "organization_id", "name", "quantity", "price", "updated_at", "attrs")
_TYPE_OIDS = (20, 2950, 25, 23, 1700, 1184, 3802)


@dataclass
class DecoderStream:
    """Payloads to replay, where they came from, and how many row changes they hold."""

    payloads: List[bytes]
    source: str
    rows: int


def _inventory_row(g: int, bump: int = 0) -> List[Optional[str]]:
    org = str(uuid.UUID(bytes=struct.pack(">QQ", g % 50 + 1, 0x9E3779B97F4A7C15)))
    return [str(g), org, f'widget {g} "deluxe"', str(g % 1000 + bump), f"{(g % 10000) / 100:.2f}",
            f"2026-11-24 {2 + g // 3600 % 20:02d}:{g // 60 % 60:02d}:{g % 60:02d}+00",
            '{"size": %d, "tags": ["a", "b"], "color": "red"}' % (g % 7)]


def synthesize(rows: int = 20_000, tx_size: int = 1_000) -> DecoderStream:
    """A pgoutput v1 stream of ``rows`` inventory changes (60% inserts, 30% updates, 10% deletes)."""
    relid = 16384
    payloads: List[bytes] = [pgoutput.relation(relid, "public", "inventory", _INVENTORY_COLUMNS, "f", ("id",),
                                               _TYPE_OIDS)]
    lsn = 0x1000000
    made = 0
    xid = 1000
    while made < rows:
        count = min(tx_size, rows - made)
        lsn += 64 * count + 4096
        payloads.append(pgoutput.begin(lsn, xid))
        for i in range(count):
            g = made + i + 1
            kind = g % 10
            row = _inventory_row(g)
            if kind < 6:
                payloads.append(pgoutput.insert(relid, row))
            elif kind < 9:
                payloads.append(pgoutput.update(relid, row, _inventory_row(g, 1)))
            else:
                payloads.append(pgoutput.delete(relid, row))
        payloads.append(pgoutput.commit(lsn, lsn + 48))
        made += count
        xid += 1
    return DecoderStream(payloads, f"synthetic inventory stream ({rows:,} row changes)", rows)


def load_stream(capture: Optional[str], synthetic_rows: int = 20_000) -> DecoderStream:
    """The stream to replay: ``capture`` if given, else a synthetic one."""
    from pgrepl._core import Decoder
    from pgrepl.testing.capture import read_payloads

    if not capture:
        return synthesize(synthetic_rows)
    path = Path(capture)
    payloads = read_payloads(path)
    rows = len(Decoder(CAPTURE_TOPIC_MAP, truncate="skip").decode_batch(payloads))
    return DecoderStream(payloads, f"captured stream {path.name} ({rows:,} row changes)", rows)


def replay(decoder_class: Any, batches: List[List[bytes]]) -> Callable[[], int]:
    """A function that decodes ``batches`` with a fresh decoder of ``decoder_class``; returns the row count."""
    def run() -> int:
        decoder = decoder_class(CAPTURE_TOPIC_MAP, truncate="skip")
        if hasattr(decoder, "set_partition_count"):
            for topic in ("types_topic", "notes_topic", "inventory_topic"):
                decoder.set_partition_count(topic, 12)
        rows = 0
        for batch in batches:
            rows += len(decoder.decode_batch(batch))
        return rows
    return run


def _rate(run: Callable[[], int], min_seconds: float) -> float:
    """Rows/s of ``run`` repeated until at least ``min_seconds`` have passed (one figure)."""
    rows = 0
    started = time.perf_counter()
    while True:
        rows += run()
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return rows / elapsed


def measure(stream: DecoderStream, repeat: int, min_seconds: float = 1.0,
            progress: Optional[Callable[[str], None]] = None) -> Dict[str, List[float]]:
    """Interleaved rows/s samples: ``{"cython": [...], "python": [...]}``, ``repeat`` each."""
    from pgrepl._core import Decoder
    from pgrepl.bench.baseline.decoder import PyDecoder

    batches = [stream.payloads[i:i + 1000] for i in range(0, len(stream.payloads), 1000)]
    samples: Dict[str, List[float]] = {"cython": [], "python": []}
    for index in range(repeat):
        for name, cls in (("cython", Decoder), ("python", PyDecoder)):
            if progress is not None:
                progress(f"decoder-only: {name} decoder, run {index + 1}/{repeat}")
            samples[name].append(_rate(replay(cls, batches), min_seconds))
    return samples


def speedups(samples: Dict[str, List[float]]) -> List[float]:
    """Per-run ratio Cython/Python (runs were interleaved, so each pair saw the same machine state)."""
    return [fast / slow for fast, slow in zip(samples["cython"], samples["python"]) if slow > 0]


def summary_rows(samples: Dict[str, List[float]]) -> List[Tuple[str, List[float]]]:
    """Labelled samples for the report table."""
    return [("Cython pgrepl._core", samples["cython"]), ("pure-Python baseline", samples["python"])]
