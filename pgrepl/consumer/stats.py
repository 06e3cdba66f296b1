"""The consumer's running totals."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Tuple

__all__ = ["ConsumerStats"]


@dataclass
class ConsumerStats:
    """Running totals, readable from another thread (status lines, tests, benchmarks)."""

    handled: int = 0          # ops a handler returned for (idempotent: applied and committed)
    skipped: int = 0          # idempotent: replays dropped because the sink already has them
    transactions: int = 0     # idempotent: sink transactions committed
    batches: int = 0          # consume() batches that held records
    failures: int = 0         # failed attempts (handler errors, malformed records)
    sink_outages: int = 0     # idempotent: sink transactions that failed because the sink was unavailable
    dead_lettered: int = 0
    rebalances: int = 0
    records: int = 0          # records taken from Kafka (handled, skipped or failed)
    # the rest is kept only while the metrics exporter runs (``observe``)
    bytes: int = 0            # bytes of those records' values
    polled_at: float = 0.0    # time.monotonic() of the poll loop's last round
    lag: Dict[Tuple[str, int], int] = field(default_factory=dict)  # (topic, partition) -> records behind
    started_at: float = field(default_factory=time.monotonic)
