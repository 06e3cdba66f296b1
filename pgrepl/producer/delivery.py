"""Delivery proof: how far the slot may be confirmed, from Kafka delivery reports."""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Deque, Optional, Protocol, Sequence


class DeliveryObserver(Protocol):
    """Told about every batch once Kafka acknowledged all of it (the metrics exporter's hook).

    ``delivered`` runs in the thread that polls the Kafka client (the stream loop): it must be quick.
    """

    def attach(self, tracker: "DeliveryTracker") -> None:
        """A session starts with a new tracker (for the readiness check's view of what is in flight)."""

    def delivered(self, records: int, nbytes: int, commits: Sequence[Any]) -> None:
        """``records`` records of ``nbytes`` bytes are acknowledged; ``commits`` are the batch's ``Commit``s."""


class DeliveryTracker:
    """Decides how far the replication slot may be confirmed, from Kafka delivery reports.

    Each decoded batch registers its delivery markers (the last record of every partition it
    wrote to: under the idempotent producer a partition's records are acknowledged in order,
    so a marker's success proves every earlier record of that partition) and the end LSN of
    its last commit. The slot may move to a batch's commit end once that batch and every
    earlier one have all their markers delivered. When nothing is in flight and no
    transaction is open, it may move to the server's latest keepalive position, so an idle
    publication does not pin WAL.
    """

    def __init__(self, start_lsn: int, observer: Optional[DeliveryObserver] = None) -> None:
        self._confirmed = start_lsn
        self._pending: "Deque[_PendingBatch]" = deque()
        self._abandoned = False
        self.failure: Optional[str] = None
        self.observer = observer
        if observer is not None:
            observer.attach(self)

    @property
    def in_flight(self) -> int:
        """How many batches still wait for delivery reports."""
        return len(self._pending)

    def track(self, markers: int, commit_end: Optional[int], batch: Any = None) -> Optional["_PendingBatch"]:
        """Register a batch; returns the object whose ``on_delivery`` the markers report to.

        ``batch`` (the decoded ``Batch``) is looked at only when an observer wants its sizes.
        """
        if markers == 0 and not self._pending:
            if commit_end is not None and commit_end > self._confirmed:
                self._confirmed = commit_end
            return None
        pending = _PendingBatch(self, markers, commit_end)
        if self.observer is not None and batch is not None and markers:
            pending.sent_at = time.monotonic()
            pending.records = len(batch.values)
            pending.nbytes = sum(map(len, batch.values))
            pending.commits = batch.commits
        self._pending.append(pending)
        return pending

    def oldest_unacknowledged(self) -> float:
        """Seconds since the oldest batch still waiting for Kafka was produced (0 when none, or unknown)."""
        try:
            sent_at = self._pending[0].sent_at
        except IndexError:  # nothing in flight (or emptied meanwhile by the stream thread)
            return 0.0
        return time.monotonic() - sent_at if sent_at else 0.0

    def confirmable(self, idle_position: Optional[int] = None) -> int:
        """The highest LSN that is safe to report as flushed now.

        ``idle_position`` (the last keepalive's WAL end) is taken only when the caller knows
        no transaction is open and nothing is in flight.
        """
        pending = self._pending
        while pending and pending[0].remaining <= 0:
            done = pending.popleft()
            if done.commit_end is not None and done.commit_end > self._confirmed:
                self._confirmed = done.commit_end
        if not pending and not self._abandoned and idle_position is not None and idle_position > self._confirmed:
            self._confirmed = idle_position
        return self._confirmed

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason


class _PendingBatch:
    """One produced batch waiting for its markers' delivery reports."""

    __slots__ = ("tracker", "remaining", "commit_end", "sent_at", "records", "nbytes", "commits")

    def __init__(self, tracker: DeliveryTracker, remaining: int, commit_end: Optional[int]) -> None:
        self.tracker = tracker
        self.remaining = remaining
        self.commit_end = commit_end
        self.sent_at = 0.0  # the rest only with an observer
        self.records = 0
        self.nbytes = 0
        self.commits: Sequence[Any] = ()

    def abandon(self, unproduced_markers: int) -> None:
        """The batch was cut short (stop, failure): wait only for the markers that were produced,
        and never let this batch move the slot (its later records were not produced)."""
        self.remaining -= unproduced_markers
        self.commit_end = None
        self.records = 0  # not all of it went out: not reported as delivered
        self.tracker._abandoned = True

    def on_delivery(self, err: Any, msg: Any) -> None:
        """confluent-kafka delivery callback for a marker record."""
        if err is not None:
            where = f"{msg.topic()}[{msg.partition()}]" if msg is not None else "?"
            self.tracker._fail(f"delivery to {where} failed: {err}")
            return
        self.remaining -= 1
        if self.remaining == 0 and self.records:
            observer = self.tracker.observer
            if observer is not None:
                observer.delivered(self.records, self.nbytes, self.commits)
