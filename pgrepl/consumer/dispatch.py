"""Dispatch: run each partition's records of a consume() batch through the runner, then settle.

Partitions run one after another, or on ``workers`` threads when there are several (a
partition's records stay on one thread, in order). Settling an outcome stores the offset of
what is done, seeks back what was put back, and hands a failure to the failure policy. The
poll size adapts: after a batch whose rest was put back (slow handler) the loop fetches about
what fits in the time budget, then grows back to ``poll_batch``.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any, Dict, List, Optional, Tuple

from pgrepl.consumer.failures import FailurePolicy
from pgrepl.consumer.offsets import seek_back, store_offset
from pgrepl.consumer.outcome import Fatal, Outcome
from pgrepl.consumer.partitions import PartitionKey, PartitionState, Partitions
from pgrepl.consumer.runners import Runner, TimeBudget
from pgrepl.consumer.stats import ConsumerStats

log = logging.getLogger(__name__)

__all__ = ["Dispatcher"]


class Dispatcher:
    """Runs grouped records through a runner (on worker threads when ``workers`` > 1) and settles the outcomes.

    ``close()`` ends the worker threads.
    """

    def __init__(self, kafka: Any, partitions: Partitions, failures: FailurePolicy, stats: ConsumerStats,
                 budget: TimeBudget, *, batch_size: int, poll_batch: int, workers: int = 1) -> None:
        self.kafka = kafka
        self.partitions = partitions
        self.failures = failures
        self.stats = stats
        self.budget = budget
        self.batch_size = batch_size
        self.poll_batch = poll_batch
        #: How many records the next consume() asks for (adapts to slow handlers).
        self.poll_size = poll_batch
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = (
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="pgrepl-consumer")
            if workers > 1 else None)

    def close(self) -> None:
        """Wait for the worker threads to finish and end them."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def dispatch(self, runner: Runner, groups: Dict[PartitionKey, List[Any]]) -> None:
        """Run every partition's records and settle each outcome; raises ``Fatal`` after settling the others."""
        parts = self.partitions
        self.budget.start()
        results: List[Tuple[PartitionState, Outcome]] = []
        fatal: Optional[BaseException] = None
        if self._executor is not None and len(groups) > 1:
            futures = [(parts[key], self._executor.submit(runner, parts[key], msgs)) for key, msgs in groups.items()]
            for part, future in futures:
                try:
                    results.append((part, future.result()))
                except BaseException as exc:  # Fatal or a bug: settle the others first
                    fatal = fatal or exc
        else:
            for key, msgs in groups.items():
                part = parts[key]
                try:
                    results.append((part, runner(part, msgs)))
                except BaseException as exc:
                    fatal = exc
                    break
        put_back = False
        handled = 0
        for part, outcome in results:
            try:
                self.settle(part, outcome)
            except Fatal as exc:  # the stop policy: store what the other partitions finished first
                fatal = fatal or exc
            put_back = put_back or outcome.rest is not None
            handled += outcome.handled + outcome.skipped
        if fatal is not None:
            raise fatal
        if put_back:
            self.poll_size = max(self.batch_size, min(handled, self.poll_batch))
        elif self.poll_size < self.poll_batch:
            self.poll_size = min(self.poll_size * 2, self.poll_batch)

    def settle(self, part: PartitionState, out: Outcome) -> None:
        """Count the outcome, store the offset after what is done, then apply its failure or put its rest back."""
        stats = self.stats
        stats.handled += out.handled
        stats.skipped += out.skipped
        stats.transactions += out.transactions
        if out.done is not None:
            store_offset(self.kafka, out.done.topic(), out.done.partition(), out.done.offset() + 1)
            part.outages = 0
            if part.fail_offset is not None and out.done.offset() >= part.fail_offset:
                log.info("%s: handled after %d failed attempt(s)", part.where(part.fail_offset), part.attempts)
                part.fail_offset = None
                part.attempts = 0
        if out.failure is not None:
            self.failures.handle(part, out.failure)
        elif out.rest is not None:
            self.partitions.rewound(part)  # an EOF event fetched with the rest does not count any more
            seek_back(self.kafka, part.topic, part.partition, out.rest.offset())
