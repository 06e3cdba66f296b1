"""Delivery latency: PostgreSQL commit time to Kafka acknowledgement, one observation per transaction.

The stream thread observes every transaction of every acknowledged batch, so the counting is
a bisect and two additions (no lock: one writer; a scrape may see a count one observation
ahead of its sum, which Prometheus tolerates). prometheus-client renders it.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any, Iterator, List, Sequence

#: Upper bounds in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

#: PostgreSQL timestamps count microseconds from 2000-01-01 00:00 UTC.
POSTGRES_EPOCH = 946_684_800


class LatencyHistogram:
    """Counts commit-to-acknowledgement latencies into ``BUCKETS`` (+Inf last)."""

    def __init__(self, buckets: Sequence[float] = BUCKETS) -> None:
        self.bounds = list(buckets)
        self.counts: List[int] = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe_commits(self, commits: Sequence[Any], now: float = 0.0) -> None:
        """One observation per ``Commit`` (``commit_time``: µs since 2000-01-01) at ``now`` (Unix time)."""
        now_us = ((now or time.time()) - POSTGRES_EPOCH) * 1e6
        bounds, counts = self.bounds, self.counts
        total = 0.0
        for commit in commits:
            seconds = max(now_us - commit.commit_time, 0.0) / 1e6  # server clock ahead: count as 0
            counts[bisect_left(bounds, seconds)] += 1
            total += seconds
        self.sum += total

    def buckets(self) -> Iterator[List[Any]]:
        """Cumulative ``[le, count]`` pairs, as ``HistogramMetricFamily`` takes them."""
        running = 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts):
            running += count
            yield [bound, running]
