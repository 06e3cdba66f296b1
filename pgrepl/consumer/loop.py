"""The poll loop: consume, group by partition, dispatch; group membership, commits and status lines.

One round (``poll``) resumes the partitions whose backoff is over, fetches up to the
dispatcher's poll size, groups the records by partition and dispatches them. Rebalance
callbacks run inside ``consume()``, between rounds: the idempotent consumer's pipelined
transaction may still be running then, so a revocation first waits for it and settles it (a
put-back pauses the partition, so records fetched before its seek are dropped), then commits
finished work instead of interrupting it. On stop the stored offsets are
committed and the member leaves the group.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from pgrepl._runtime import Waker
from pgrepl.consumer.dispatch import Dispatcher
from pgrepl.consumer.failures import FailurePolicy
from pgrepl.consumer.offsets import commit_stored
from pgrepl.consumer.outcome import Fatal
from pgrepl.consumer.partitions import Partitions
from pgrepl.consumer.runners import Runner
from pgrepl.consumer.stats import ConsumerStats
from pgrepl.kafka_settings import kafka_error_text
from pgrepl.errors import ConsumerError, PgreplError

log = logging.getLogger(__name__)

__all__ = ["ConsumerLoop", "KafkaErrors"]

#: Seconds between updates of the consumer lag (with the metrics exporter).
LAG_INTERVAL = 5.0


class KafkaErrors:
    """librdkafka's ``error_cb``: logs transient errors; keeps a fatal one in ``fatal`` and stops the consumer."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self.stop = stop
        self.fatal: Optional[PgreplError] = None

    def __call__(self, err: KafkaError) -> None:
        if err.fatal():
            self.fatal = ConsumerError(f"fatal Kafka consumer error: {err.str()}")
            self.stop()
        else:
            log.warning("Kafka: %s", err.str())


class ConsumerLoop:
    """Runs one consumer group member on ``kafka`` (a ``confluent_kafka.Consumer`` or a stand-in) until stopped.

    ``run()`` subscribes, calls ``poll()`` until the waker is set (``stop()``, a signal, a
    fatal error, or every partition read to its end with ``stop_at_eof``) and closes; it
    raises the fatal error, if any.
    """

    def __init__(self, kafka: Any, runner: Runner, *, partitions: Partitions, dispatcher: Dispatcher,
                 failures: FailurePolicy, stats: ConsumerStats, waker: Waker, kafka_errors: KafkaErrors,
                 group_id: str, topics: Sequence[str], brokers: str, commit_offsets: bool = True,
                 stop_at_eof: bool = False, poll_timeout: float = 0.25,
                 status_interval: float = 10.0, observe: bool = False) -> None:
        self.kafka = kafka
        self.runner = runner
        self.partitions = partitions
        self.dispatcher = dispatcher
        self.failures = failures
        self.stats = stats
        self.waker = waker
        self.kafka_errors = kafka_errors
        self.group_id = group_id
        self.topics = list(topics)
        self.brokers = brokers
        self.commit_offsets = commit_offsets
        self.stop_at_eof = stop_at_eof
        self.poll_timeout = poll_timeout
        self.status_interval = status_interval
        self.observe = observe  # keep the metrics exporter's figures: bytes, last poll, lag
        self._next_lag = 0.0
        self._next_status = 0.0
        self._last_status = (0.0, 0)  # (when, handled + skipped) at the last status line

    def run(self) -> None:
        """Subscribe, poll until stopped, commit and leave the group; raises the error that stopped it, if any."""
        errors = self.kafka_errors
        try:
            self.kafka.subscribe(self.topics, on_assign=self.on_assign, on_revoke=self.on_revoke,
                                 on_lost=self.on_lost)
            log.info("consuming %s as group %s from %s", ", ".join(self.topics), self.group_id, self.brokers)
            now = time.monotonic()
            self._next_status = now + self.status_interval
            self._last_status = (now, self.stats.handled + self.stats.skipped)
            waker = self.waker
            while not waker.is_set and errors.fatal is None:
                self.poll()
        except Fatal as fatal:
            errors.fatal = errors.fatal or fatal.error
        except KafkaException as exc:
            errors.fatal = errors.fatal or ConsumerError(
                f"Kafka consumer error: {kafka_error_text(exc)}")
        finally:
            try:
                self._drain()  # the transaction in flight: its offset is stored before the last commit
            finally:
                try:
                    self.dispatcher.close()
                finally:
                    self._close()
        if errors.fatal is not None:
            raise errors.fatal

    def poll(self) -> None:
        """One round: resume due partitions, consume, group and dispatch; then the end-of-partitions and status checks."""
        timeout = self.failures.resume_due(self.poll_timeout)
        if self.dispatcher.in_flight:
            timeout = 0.0  # a transaction is in flight: take what is there, else settle it without waiting
        msgs = self.kafka.consume(self.dispatcher.poll_size, timeout)
        if self.kafka_errors.fatal is not None:
            return
        groups = self.partitions.group(msgs) if msgs else None
        if msgs:
            self.stats.records += len(msgs)
            if self.observe:
                self.stats.bytes += sum(map(len, msgs))
        if groups:
            self.stats.batches += 1
            self.dispatcher.dispatch(self.runner, groups)
        else:
            self.dispatcher.drain()  # nothing new: settle what is in flight now
        if self.stop_at_eof and self.partitions.all_at_end():
            self.dispatcher.drain()  # its failure would move a partition back from its end
            if self.partitions.all_at_end():
                log.info("every assigned partition is at its end; stopping")
                self.waker.set()
        now = time.monotonic()
        if self.observe:
            self.stats.polled_at = now
            if now >= self._next_lag:
                self._update_lag()
                self._next_lag = now + LAG_INTERVAL
        if now >= self._next_status:
            self._status(now)

    def _update_lag(self) -> None:
        """Records between each assigned partition's position and its end, from librdkafka's cached
        high watermark (the last fetch's: local, no broker round trip; tansu's ListOffsets answer is
        one short). A partition appears once the consumer has a position and a fetch in it."""
        lag: Dict[Tuple[str, int], int] = {}
        try:
            positions = self.kafka.position([TopicPartition(t, p) for t, p in self.partitions.assigned])
            for tp in positions:
                _, high = self.kafka.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0:
                    lag[(tp.topic, tp.partition)] = max(high - tp.offset, 0)
        except (KafkaException, RuntimeError, AttributeError, TypeError) as exc:  # closed, or a stand-in client
            log.debug("consumer lag not available: %s", exc)
            return
        self.stats.lag = lag

    def _status(self, now: float) -> None:
        """Log the status line: rate since the last one and the totals."""
        stats = self.stats
        done = stats.handled + stats.skipped
        rate = (done - self._last_status[1]) / max(now - self._last_status[0], 1e-9)
        log.info("status: %.0f ops/s, %d handled, %d skipped, %d failed attempts, %d dead-lettered, "
                 "%d partitions assigned", rate, stats.handled, stats.skipped, stats.failures,
                 stats.dead_lettered, len(self.partitions.assigned))
        self._last_status = (now, done)
        self._next_status = now + self.status_interval

    def _close(self) -> None:
        """Commit (unless ``commit_offsets=False``), leave the group, flush the dead-letter producer."""
        if self.commit_offsets:
            commit_stored(self.kafka, "stopping")
        try:
            self.kafka.close()  # leaves the group: partitions move to the other members now
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the Kafka consumer: %s", exc)
        if self.failures.dead_letter is not None:
            self.failures.dead_letter.flush(10)
        log.info("consumer of group %s stopped: %d ops handled, %d skipped, %d dead-lettered",
                 self.group_id, self.stats.handled, self.stats.skipped, self.stats.dead_lettered)

    # -- rebalance callbacks (librdkafka calls them inside consume()) ---------------------

    def on_assign(self, kafka: Any, partitions: List[TopicPartition]) -> None:
        """Partitions were assigned: start them afresh (a pause is not carried over)."""
        self.stats.rebalances += 1
        for state in self.partitions.assign((tp.topic, tp.partition) for tp in partitions):
            try:
                kafka.resume([TopicPartition(state.topic, state.partition)])
            except KafkaException:
                pass
        log.info("group %s: assigned %s", self.group_id, _describe(partitions))

    def _drain(self) -> None:
        """Settle the pipelined transaction in flight; a fatal outcome stops the consumer (raised by ``run``)."""
        try:
            self.dispatcher.drain()
        except Fatal as fatal:
            self.kafka_errors.fatal = self.kafka_errors.fatal or fatal.error
            self.waker.set()

    def on_revoke(self, kafka: Any, partitions: List[TopicPartition]) -> None:
        """Partitions are taken away: finish the transaction in flight, commit what is finished, then forget them."""
        self._drain()
        if self.commit_offsets:
            commit_stored(kafka, "partitions revoked")
        self._forget(kafka, partitions)
        log.info("group %s: revoked %s", self.group_id, _describe(partitions))

    def on_lost(self, kafka: Any, partitions: List[TopicPartition]) -> None:
        """Partitions were lost (session expired): nothing can be committed for them any more."""
        self._drain()
        self._forget(kafka, partitions)
        log.warning("group %s: lost %s (session expired?); uncommitted work will be replayed by the next owner",
                    self.group_id, _describe(partitions))

    def _forget(self, kafka: Any, partitions: List[TopicPartition]) -> None:
        """Drop the partitions' state; lift their pauses so that none is carried into a later assignment."""
        paused = self.partitions.forget((tp.topic, tp.partition) for tp in partitions)
        if paused:
            try:
                kafka.resume([TopicPartition(state.topic, state.partition) for state in paused])
            except KafkaException:
                pass


def _describe(partitions: List[TopicPartition]) -> str:
    """``topic [0, 1]; other [3]`` for log lines."""
    if not partitions:
        return "no partitions"
    by_topic: Dict[str, List[int]] = {}
    for tp in partitions:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return "; ".join(f"{t} {sorted(ps)}" for t, ps in sorted(by_topic.items()))
