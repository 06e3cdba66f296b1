"""Dispatch: run each partition's records of a consume() batch through the runner, then settle.

Partitions run one after another, or on ``workers`` threads when there are several (a
partition's records stay on one thread, in order). Settling an outcome stores the offset of
what is done, seeks back what was put back, and hands a failure to the failure policy. The
poll size adapts: after a batch whose rest was put back (slow handler) the loop fetches about
what fits in the time budget, then grows back to ``poll_batch``.

The idempotent runner is pipelined (one worker): its sink transactions run on a sink thread,
one at a time, while this thread parses the next partition's records and fetches the next
batch, so the consumer's own work and the database's overlap. One partition's records are still
handled in offset order, one transaction at a time: a partition's next records are submitted
only after its previous transaction was settled, and are dropped (fetched again after the
seek) when that one failed or was put back. ``drain()`` settles the transaction in flight: the
loop calls it before a rebalance commits, when a poll brings nothing, before it decides that
every partition is at its end, and when it stops.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any, Dict, List, Optional, Set, Tuple

from pgrepl.consumer.failures import FailurePolicy
from pgrepl.consumer.offsets import store_offset
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
        self._sink_thread: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._inflight: Optional[Tuple[PartitionState, "concurrent.futures.Future[Outcome]"]] = None

    def close(self) -> None:
        """Wait for the worker threads (and the transaction in flight, unsettled) to finish and end them."""
        for executor in (self._executor, self._sink_thread):
            if executor is not None:
                executor.shutdown(wait=True)
        self._executor = self._sink_thread = None
        self._inflight = None

    @property
    def in_flight(self) -> bool:
        """Whether a pipelined transaction is running (or done and not settled yet)."""
        return self._inflight is not None

    def drain(self) -> Optional[Tuple[PartitionState, Outcome]]:
        """Wait for the pipelined transaction in flight, if any, and settle it; returns it.

        Raises ``Fatal`` (the runner's, or the stop policy's from settling).
        """
        if self._inflight is None:
            return None
        part, future = self._inflight
        self._inflight = None
        outcome = future.result()
        # a put-back pauses the partition: drain() may run inside consume() (a rebalance callback),
        # which can return records of the partition fetched before the seek; paused, they are dropped
        self.settle(part, outcome, pause_put_back=True)
        self._adapt(outcome.rest is not None, outcome.handled + outcome.skipped)
        return part, outcome

    def _dispatch_pipelined(self, runner: Any, groups: Dict[PartitionKey, List[Any]]) -> None:
        """One partition after another: parse its records while the previous transaction runs, wait for
        that one and settle it, then start this partition's; the last one stays in flight."""
        parts = self.partitions
        if self._sink_thread is None:
            self._sink_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pgrepl-sink")
        # partitions sought back since these records were fetched: the seek came too late for
        # them, so their records here are dropped (they come again from where the seek points)
        rewound: Set[PartitionKey] = set()
        for key, msgs in groups.items():
            part = parts.get(key)
            if part is None:
                continue  # dropped while settling the previous transaction (its seek failed: revoked)
            plan = runner.prepare(part, msgs)
            settled = self.drain()
            if settled is not None and (settled[1].failure is not None or settled[1].rest is not None):
                rewound.add((settled[0].topic, settled[0].partition))
            if key in rewound or not parts.holds(part) or part.paused:
                continue  # sought back, revoked, or waiting for a retry, meanwhile
            self._inflight = (part, self._sink_thread.submit(runner.execute, part, plan))

    def dispatch(self, runner: Runner, groups: Dict[PartitionKey, List[Any]]) -> None:
        """Run every partition's records and settle each outcome; raises ``Fatal`` after settling the others."""
        parts = self.partitions
        self.budget.start()
        if self._executor is None and getattr(runner, "pipelined", False):
            self._dispatch_pipelined(runner, groups)
            return
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
        self._adapt(put_back, handled)

    def _adapt(self, put_back: bool, handled: int) -> None:
        """After a batch whose rest was put back, fetch about what was handled; else grow back."""
        if put_back:
            self.poll_size = max(self.batch_size, min(handled, self.poll_batch))
        elif self.poll_size < self.poll_batch:
            self.poll_size = min(self.poll_size * 2, self.poll_batch)

    def settle(self, part: PartitionState, out: Outcome, pause_put_back: bool = False) -> None:
        """Count the outcome, store the offset after what is done, then apply its failure or put its rest back
        (with ``pause_put_back``, pausing the partition until the next poll)."""
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
            self.failures.put_back(part, out.rest.offset(), pause=pause_put_back)
