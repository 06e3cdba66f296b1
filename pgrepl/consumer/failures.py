"""What a failed attempt does (``on_error``), and the dead-letter producer.

A failing record holds its partition: the partition is paused and sought back to the record,
and resumed once its backoff (doubling from ``retry_backoff`` up to ``max_backoff``) is over.
After ``max_attempts`` (at once for a record that is not a ReplicationOp) ``"stop"`` ends the
run with a ``HandlerError`` and ``"dead_letter"`` sends the record to the dead-letter topic
and goes on after it; a failing multi-op batch is first retried one op at a time to find the
op that fails. ``"retry"`` retries forever. Nothing is ever skipped silently.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional

from confluent_kafka import KafkaException, TopicPartition

from pgrepl.consumer.offsets import store_offset
from pgrepl.consumer.outcome import Failure, Fatal
from pgrepl.consumer.partitions import PartitionState, Partitions
from pgrepl.consumer.stats import ConsumerStats
from pgrepl.errors import ConsumerError, HandlerError
from pgrepl.lsn import format_lsn

log = logging.getLogger(__name__)

__all__ = ["POLICIES", "DeadLetterProducer", "FailurePolicy"]

#: The values of ``on_error``.
POLICIES = ("retry", "stop", "dead_letter")

#: Seconds between full tracebacks of a partition that keeps failing under ``"retry"``.
_TRACEBACK_EVERY = 60


class DeadLetterProducer:
    """Sends failed records to the dead-letter topic, with headers that say where they came from and why.

    The Kafka producer is made by ``factory(settings)`` at the first record; each send waits
    for its delivery report.
    """

    def __init__(self, topic: str, group_id: str, settings: Dict[str, Any],
                 factory: Callable[[Dict[str, Any]], Any]) -> None:
        self.topic = topic
        self.group_id = group_id
        self.settings = settings
        self.factory = factory
        self._producer: Any = None

    def send(self, msg: Any, part: PartitionState, failure: Failure, reason: str) -> None:
        """Produce the failed record to the dead-letter topic and wait for its delivery (``ConsumerError`` if not)."""
        if self._producer is None:
            self._producer = self.factory(self.settings)
        headers = list(msg.headers() or [])
        headers += [
            ("pgrepl.error", reason.encode("utf-8", "replace")[:4000]),
            ("pgrepl.source.topic", part.topic.encode()),
            ("pgrepl.source.partition", str(part.partition).encode()),
            ("pgrepl.source.offset", str(msg.offset()).encode()),
            ("pgrepl.group", self.group_id.encode()),
            ("pgrepl.kind", b"malformed" if failure.malformed else b"handler"),
        ]
        result: List[Any] = []
        self._producer.produce(self.topic, msg.value(), msg.key(), headers=headers,
                               on_delivery=lambda err, _m: result.append(err))
        deadline = time.monotonic() + 30
        while not result and time.monotonic() < deadline:
            self._producer.poll(0.1)
        if not result:
            raise ConsumerError("no delivery report within 30 s")
        if result[0] is not None:
            raise ConsumerError(str(result[0]))

    def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for records still in flight (the consumer is stopping)."""
        if self._producer is not None:
            self._producer.flush(timeout)


class FailurePolicy:
    """Applies ``on_error`` to failed attempts, and resumes paused partitions when their backoff is over.

    ``dead_letter`` is required with ``on_error="dead_letter"``.
    """

    def __init__(self, kafka: Any, partitions: Partitions, stats: ConsumerStats, *, on_error: str,
                 max_attempts: int, retry_backoff: float, max_backoff: float,
                 dead_letter: Optional[DeadLetterProducer] = None) -> None:
        self.kafka = kafka
        self.partitions = partitions
        self.stats = stats
        self.on_error = on_error
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.max_backoff = max_backoff
        self.dead_letter = dead_letter

    def handle(self, part: PartitionState, failure: Failure) -> None:
        """Count the attempt and retry, isolate, dead-letter, or raise ``Fatal`` (``"stop"``)."""
        msg = failure.msg
        offset = msg.offset()
        self.partitions.rewound(part)  # not at its end while a record waits to be retried
        if failure.sink_outage:
            self._wait_for_sink(part, failure, offset)
            return
        self.stats.failures += 1
        if part.fail_offset == offset:
            part.attempts += 1
        else:
            part.fail_offset = offset
            part.attempts = 1
        op = failure.op
        what = (f"record {part.where(offset)} is not a ReplicationOp" if failure.malformed else
                f"handler failed at {part.where(offset)}" +
                (f" (batch up to offset {failure.batch_end})" if failure.batch_end is not None else "") +
                (f" (op lsn {format_lsn(op.lsn)}, seq_id {op.seq_id})" if op is not None else ""))
        reason = f"{type(failure.error).__name__}: {failure.error}"
        give_up = self.on_error != "retry" and (failure.malformed or part.attempts >= self.max_attempts)
        if give_up and self.on_error == "dead_letter" and failure.batch_end is not None:
            # a batch keeps failing: find the culprit by handling its ops one at a time
            log.warning("%s, attempt %d: %s; retrying its ops one at a time to find the failing one",
                        what, part.attempts, reason)
            part.isolate_until = failure.batch_end
            part.attempts = 0
            part.fail_offset = None
            self._rewind(part, offset, 0.0)
            return
        if give_up and self.on_error == "stop":
            log.error("%s, attempt %d: %s; stopping (on_error='stop')", what, part.attempts, reason,
                      exc_info=failure.error)
            error = HandlerError(f"{what}: {reason}", part.topic, part.partition, offset,
                                 op.lsn if op is not None else None, op.seq_id if op is not None else None)
            error.__cause__ = failure.error
            raise Fatal(error)
        if give_up and self.on_error == "dead_letter":
            self._send_to_dead_letter(part, failure, what, reason)
            return
        delay = self._backoff(part.attempts)
        now = time.monotonic()
        traceback = part.attempts == 1 or now - part.last_error_log > _TRACEBACK_EVERY
        log.error("%s, attempt %d: %s; retrying in %.1f s", what, part.attempts, reason, delay,
                  exc_info=failure.error if traceback else None)
        if traceback:
            part.last_error_log = now
        self._rewind(part, offset, delay)

    def _wait_for_sink(self, part: PartitionState, failure: Failure, offset: int) -> None:
        """The sink is down: hold the partition and retry with backoff, as long as it takes."""
        self.stats.sink_outages += 1
        part.outages += 1
        delay = self._backoff(part.outages)
        log.warning("sink unavailable at %s (%s: %s); retrying in %.1f s, not counted against the record",
                    part.where(offset), type(failure.error).__name__, str(failure.error).strip().splitlines()[0]
                    if str(failure.error).strip() else "", delay)
        self._rewind(part, offset, delay)

    def _send_to_dead_letter(self, part: PartitionState, failure: Failure, what: str, reason: str) -> None:
        """Dead-letter the record and go on after it; if the send fails, retry the record."""
        assert self.dead_letter is not None
        offset = failure.msg.offset()
        try:
            self.dead_letter.send(failure.msg, part, failure, reason)
        except Exception as exc:
            log.error("%s; sending it to dead-letter topic %s failed: %s; retrying", what,
                      self.dead_letter.topic, exc)
            self._rewind(part, offset, self._backoff(part.attempts))
            return
        log.error("%s, attempt %d: %s; sent to dead-letter topic %s", what, part.attempts, reason,
                  self.dead_letter.topic, exc_info=None if failure.malformed else failure.error)
        self.stats.dead_lettered += 1
        store_offset(self.kafka, part.topic, part.partition, offset + 1)
        part.fail_offset = None
        part.attempts = 0
        self._rewind(part, offset + 1, 0.0)

    def _backoff(self, attempts: int) -> float:
        """Seconds to wait before attempt ``attempts + 1``: doubling from ``retry_backoff``, capped."""
        return float(min(self.retry_backoff * (2 ** min(attempts - 1, 30)), self.max_backoff))

    def put_back(self, part: PartitionState, offset: int, pause: bool = False) -> None:
        """Records from ``offset`` on were not handled (time budget): fetch them again at the next poll.

        With ``pause``, paused as for a retry (resumed at the next poll): records of the partition
        fetched before the seek but not handled yet (a consume() during which a rebalance callback
        settled a transaction) are then dropped by ``Partitions.group``, not applied ahead of these.
        """
        if pause:
            self._rewind(part, offset, 0.0)
            return
        try:
            self.kafka.seek(TopicPartition(part.topic, part.partition, offset))
        except KafkaException as exc:  # revoked meanwhile: the next owner starts at the committed offset
            log.debug("cannot seek %s back: %s", part.where(offset), exc)

    def _rewind(self, part: PartitionState, offset: int, delay: float) -> None:
        """Pause the partition and seek it to ``offset``; it resumes after ``delay`` seconds."""
        try:
            self.kafka.pause([TopicPartition(part.topic, part.partition)])
            part.paused = True
            self.kafka.seek(TopicPartition(part.topic, part.partition, offset))
        except KafkaException as exc:  # revoked meanwhile: the next owner starts at the committed offset
            log.info("cannot seek %s back (%s); leaving it to its next owner", part.where(offset), exc)
            self.partitions.drop(part)
            return
        part.retry_at = time.monotonic() + delay

    def resume_due(self, poll_timeout: float) -> float:
        """Resume partitions whose retry time came; returns how long consume() may block (at most ``poll_timeout``)."""
        timeout = poll_timeout
        now = time.monotonic()
        for part in self.partitions:
            if part.paused:
                if part.retry_at <= now:
                    try:
                        self.kafka.resume([TopicPartition(part.topic, part.partition)])
                    except KafkaException as exc:
                        log.debug("resume %s[%d]: %s", part.topic, part.partition, exc)
                    part.paused = False
                else:
                    timeout = min(timeout, part.retry_at - now)
        return max(timeout, 0.0)
