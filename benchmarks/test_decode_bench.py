"""Decoder throughput: the Cython decoder against the pure-Python baseline on the same capture.

Both replay ``tests/data/inventory.pgcap.gz`` (recorded from PostgreSQL: the 7-column inventory
row, 20,977 row changes) through ``decode_batch`` in batches of 1,000 messages, as the
producer does. pytest-benchmark's table shows both in one group; the ratio test prints
rows/s and the speed-up measured in the same run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, List

import pytest

from pgrepl._core import Decoder
from pgrepl.bench.baseline.decoder import PyDecoder
from pgrepl.bench.decoder import replay as replay_batches
from pgrepl.testing.capture import read_payloads
from tests.data.record_captures import TOPIC_MAP

CAPTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "inventory.pgcap.gz"
PAYLOADS = read_payloads(CAPTURE)
BATCHES = [PAYLOADS[i:i + 1000] for i in range(0, len(PAYLOADS), 1000)]
ROWS = len(Decoder(TOPIC_MAP).decode_batch(PAYLOADS))


def replay(decoder_class: Any) -> Callable[[], int]:
    return replay_batches(decoder_class, BATCHES)


@pytest.mark.benchmark(group="decode inventory stream")
def test_cython_decoder(benchmark: Any) -> None:
    rows = benchmark(replay(Decoder))
    assert rows == ROWS
    benchmark.extra_info["rows_per_second"] = ROWS / benchmark.stats.stats.median


@pytest.mark.benchmark(group="decode inventory stream")
def test_python_baseline(benchmark: Any) -> None:
    rows = benchmark.pedantic(replay(PyDecoder), rounds=3, iterations=1)
    assert rows == ROWS
    benchmark.extra_info["rows_per_second"] = ROWS / benchmark.stats.stats.median


def best_of(run: Callable[[], int], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def test_speedup_in_the_same_run(capsys: Any) -> None:
    """Interleaved best-of-N timings of both decoders: rows/s and the ratio (reported, not asserted)."""
    fast: List[float] = []
    slow: List[float] = []
    for _ in range(3):
        fast.append(best_of(replay(Decoder), 5))
        slow.append(best_of(replay(PyDecoder), 1))
    fast_rate, slow_rate = ROWS / min(fast), ROWS / min(slow)
    with capsys.disabled():
        print(f"\ncython decoder: {fast_rate:,.0f} rows/s ({1e9 / fast_rate:.0f} ns/row); "
              f"pure-Python baseline: {slow_rate:,.0f} rows/s; speed-up {fast_rate / slow_rate:.1f}x "
              f"({ROWS:,} rows of the inventory capture)")
