"""The assigned partitions: what the consumer remembers about each, and fetched records grouped by partition.

``Partitions.group`` is the first step after ``consume()``: it splits a fetched batch into
per-partition runs in offset order and drops what must not be handled now (records of a
partition that is paused for a retry, or that was revoked during the fetch). Assignment,
revocation and end-of-partition events are kept here too; nothing in this module talks to
Kafka.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from confluent_kafka import KafkaError

from pgrepl.consumer.outcome import Fatal
from pgrepl.errors import ConsumerError

log = logging.getLogger(__name__)

__all__ = ["PartitionKey", "PartitionState", "Partitions"]

#: (topic, partition)
PartitionKey = Tuple[str, int]

_TOPIC_ERRORS_LOGGED_EVERY = 60.0


class PartitionState:
    """What the consumer remembers about one assigned partition (dropped on assign/revoke)."""

    __slots__ = ("topic", "partition", "position", "fail_offset", "attempts", "outages", "retry_at", "paused",
                 "isolate_until", "last_error_log")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.position: Optional[Tuple[int, int]] = None  # idempotent: last known sink position
        self.fail_offset: Optional[int] = None  # the record that is failing, while it is retried
        self.attempts = 0
        self.outages = 0  # sink outages in a row (backoff), not attempts of the record
        self.retry_at = 0.0  # when a paused partition resumes (time.monotonic)
        self.paused = False
        self.isolate_until: Optional[int] = None  # batch forms: handle one op at a time up to here
        self.last_error_log = 0.0

    def where(self, offset: int) -> str:
        """``topic[partition]@offset``, the way log lines and errors name a record."""
        return f"{self.topic}[{self.partition}]@{offset}"


class Partitions:
    """The state of every partition that has records in flight, the assignment, and end-of-partition tracking.

    ``track_eof`` (the consumer's ``stop_at_eof``) records which assigned partitions were read
    to their end; a record after the end event means the partition grew.
    """

    def __init__(self, topics: Sequence[str], track_eof: bool = False) -> None:
        # one plain topic subscribed (the usual case): grouping goes by partition number alone
        self._single_topic = topics[0] if len(topics) == 1 and not topics[0].startswith("^") else None
        self._track_eof = track_eof
        self._states: Dict[PartitionKey, PartitionState] = {}
        self._assigned: Set[PartitionKey] = set()
        self._eof: Set[PartitionKey] = set()
        self._rebalanced = False  # an assignment changed since the last group()
        self._topic_error_logged: Dict[str, float] = {}

    # -- reading --------------------------------------------------------------------------

    @property
    def assigned(self) -> List[PartitionKey]:
        """The (topic, partition) pairs assigned to this member, sorted."""
        return sorted(self._assigned)

    def __getitem__(self, key: PartitionKey) -> PartitionState:
        return self._states[key]

    def get(self, key: PartitionKey) -> Optional[PartitionState]:
        """The partition's state, or None when it was dropped (revoked, lost, or its seek failed)."""
        return self._states.get(key)

    def __iter__(self) -> Iterator[PartitionState]:
        return iter(self._states.values())

    def is_at_end(self, topic: str, partition: int) -> bool:
        """Whether the partition was read to its end (and did not grow or fail since)."""
        return (topic, partition) in self._eof

    def all_at_end(self) -> bool:
        """Every assigned partition is read to its end and none holds a failing record."""
        return bool(self._assigned) and self._eof >= self._assigned and not any(
            state.fail_offset is not None for state in self._states.values())

    # -- grouping ---------------------------------------------------------------------------

    def group(self, msgs: List[Any]) -> Dict[PartitionKey, List[Any]]:
        """Records by partition, in offset order; errors and stale records dealt with here."""
        groups: Dict[PartitionKey, List[Any]] = {}
        topic = self._single_topic
        if topic is not None:
            by_partition: Dict[int, List[Any]] = {}
            for msg in msgs:
                if msg.error() is not None:
                    self._record_error(msg)
                    continue
                partition = msg.partition()
                group = by_partition.get(partition)
                if group is None:
                    by_partition[partition] = [msg]
                else:
                    group.append(msg)
            for partition, group in by_partition.items():
                groups[(topic, partition)] = group
        else:
            for msg in msgs:
                if msg.error() is not None:
                    self._record_error(msg)
                    continue
                key = (msg.topic(), msg.partition())
                group = groups.get(key)
                if group is None:
                    groups[key] = [msg]
                else:
                    group.append(msg)
        if self._track_eof:
            eof = self._eof
            for msg in msgs:  # in order: a record after an EOF event means the partition grew
                err = msg.error()
                if err is None:
                    eof.discard((msg.topic(), msg.partition()))
                elif err.code() == KafkaError._PARTITION_EOF:
                    eof.add((msg.topic(), msg.partition()))
        states = self._states
        for key in list(groups):
            state = states.get(key)
            if state is None:
                if self._rebalanced and key not in self._assigned:
                    del groups[key]  # fetched before a revocation: the new owner handles it
                    continue
                states[key] = state = PartitionState(key[0], key[1])
            if state.paused:
                del groups[key]  # fetched before the seek: it comes again after the retry
                continue
            if self._rebalanced:
                # a revoke + re-assign inside one consume() call: keep the newest run of offsets
                group = groups[key]
                for i in range(len(group) - 1, 0, -1):
                    if group[i].offset() <= group[i - 1].offset():
                        groups[key] = group[i:]
                        break
        self._rebalanced = False
        return groups

    def _record_error(self, msg: Any) -> None:
        """An error event among the records: end of partition (tracked above), fatal, or logged."""
        err = msg.error()
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise Fatal(ConsumerError(f"fatal Kafka consumer error: {err.str()}"))
        topic = msg.topic() or "?"
        now = time.monotonic()
        if now - self._topic_error_logged.get(topic, -1e9) >= _TOPIC_ERRORS_LOGGED_EVERY:
            self._topic_error_logged[topic] = now
            log.warning("Kafka consumer error on topic %s: %s", topic, err.str())

    # -- changes ----------------------------------------------------------------------------

    def assign(self, keys: Iterable[PartitionKey]) -> List[PartitionState]:
        """Partitions were assigned: start them afresh; returns the dropped states that were paused."""
        paused = []
        for key in keys:
            self._assigned.add(key)
            state = self._states.pop(key, None)  # the idempotent position is reloaded from the sink
            if state is not None and state.paused:
                paused.append(state)
            self._eof.discard(key)
        self._rebalanced = True
        return paused

    def forget(self, keys: Iterable[PartitionKey]) -> List[PartitionState]:
        """Partitions were revoked or lost; returns the dropped states that were paused."""
        paused = []
        for key in keys:
            self._assigned.discard(key)
            self._eof.discard(key)
            state = self._states.pop(key, None)
            if state is not None and state.paused:
                paused.append(state)
        self._rebalanced = True
        return paused

    def holds(self, state: PartitionState) -> bool:
        """Whether ``state`` is still this partition's state (not revoked, lost or dropped since)."""
        return self._states.get((state.topic, state.partition)) is state

    def drop(self, state: PartitionState) -> None:
        """Forget one partition's state (its seek failed: it was revoked meanwhile)."""
        self._states.pop((state.topic, state.partition), None)

    def rewound(self, state: PartitionState) -> None:
        """The partition was sought back (a record failed, or the rest of a batch was put back):
        it is not at its end until it is read there again."""
        self._eof.discard((state.topic, state.partition))
