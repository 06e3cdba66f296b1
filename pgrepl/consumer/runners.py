"""Runners: hand one partition's fetched records, in offset order, to the user's handler.

A runner is called with a partition's state and its records of one ``consume()`` batch and
returns an ``Outcome``: the last record done, counts, the failure it stopped at, or the
first record it put back because the batch's time budget was used up (or the consumer is
stopping). Three kinds:

* ``BasicRunner``: ``handle(op)`` per op (at least once).
* ``BasicBatchRunner``: ``handle_batch(ops)`` per handler batch of up to ``batch_size`` ops.
* ``IdempotentRunner``: ``handler(cursor, ops)`` inside a sink transaction per handler batch
  (``PostgresSink.apply``: exactly once).

While a failed batch is isolated (dead-letter policy), the batch forms take one op at a time
up to its last offset, so the failing op is found and the others are handled once.
"""

from __future__ import annotations

import time
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

from pgrepl._runtime import Waker
from pgrepl.consumer.outcome import Failure, Fatal, Outcome, StopConsuming
from pgrepl.consumer.partitions import PartitionState
from pgrepl.errors import ConfigError, HandlerError, MalformedRecordError
from pgrepl.model import ReplicationOp
from pgrepl.sink.postgres import HandlerEndedTransaction, PostgresSink, is_sink_outage

__all__ = ["BasicBatchRunner", "BasicRunner", "IdempotentRunner", "Plan", "Runner", "TimeBudget"]

#: Handles one partition's records of a consume() batch.
Runner = Callable[[PartitionState, List[Any]], Outcome]

#: ``handler(cursor, ops)`` of the idempotent forms.
BatchTxHandler = Callable[[Any, List[ReplicationOp]], Any]


class TimeBudget:
    """How long handling one consume() batch may take before the rest is put back; stopping ends it at once.

    Rebalance callbacks run inside consume(): returning to it regularly means a revocation
    waits for at most one handler batch, not for a whole fetched backlog.
    """

    def __init__(self, seconds: float, waker: Waker) -> None:
        self.seconds = seconds
        self._waker = waker
        self._deadline = 0.0

    def start(self) -> None:
        """A consume() batch begins: its budget runs from now."""
        self._deadline = time.monotonic() + self.seconds

    def used_up(self) -> bool:
        """Whether to put the rest of the batch back: stopping, or the time is up."""
        return self._waker.is_set or time.monotonic() > self._deadline

    def stop(self) -> None:
        """A handler raised ``StopConsuming``: stop the consumer (every runner ends at its next check)."""
        self._waker.set()


def _chunks(part: PartitionState, msgs: List[Any], size: int) -> Tuple[List[List[Any]], Optional[int]]:
    """Split into handler batches, one op at a time while isolating a failed batch. Also returns
    after how many batches the isolation ends, when it ends here (None: it goes on, or there is
    none); ``part.isolate_until`` is left to the caller (this has no side effect)."""
    chunks: List[List[Any]] = []
    start = 0
    ends: Optional[int] = None
    if part.isolate_until is not None:
        limit = part.isolate_until
        while start < len(msgs) and msgs[start].offset() <= limit:
            chunks.append(msgs[start:start + 1])
            start += 1
        if start < len(msgs):
            ends = len(chunks)
    chunks.extend(msgs[i:i + size] for i in range(start, len(msgs), size))
    return chunks, ends


def _parse_chunk(chunk: List[Any]) -> Tuple[List[ReplicationOp], Optional[Failure]]:
    """The ops of a handler batch up to its first malformed record, and that record's failure."""
    ops: List[ReplicationOp] = []
    parse = ReplicationOp.from_json
    for msg in chunk:
        try:
            ops.append(parse(msg.value()))
        except MalformedRecordError as exc:
            return ops, Failure(msg, exc, malformed=True)
    return ops, None


def _batch_failure(chunk: List[Any], ops: List[ReplicationOp], error: BaseException) -> Failure:
    """A handler batch (the parsed prefix ``ops`` of ``chunk``) failed as a whole."""
    end = chunk[len(ops) - 1].offset()
    return Failure(chunk[0], error, ops[0], batch_end=end if len(ops) > 1 else None)


class BasicRunner:
    """At least once, per op: ``handle(op)``; the time budget is checked every ``batch_size`` ops."""

    def __init__(self, handle: Callable[[ReplicationOp], Any], batch_size: int, budget: TimeBudget) -> None:
        self.handle = handle
        self.batch_size = batch_size
        self.budget = budget

    def __call__(self, part: PartitionState, msgs: List[Any]) -> Outcome:
        out = Outcome()
        handle = self.handle
        size = self.batch_size
        parse = ReplicationOp.from_json
        done = None
        handled = 0
        for start in range(0, len(msgs), size):
            if start and self.budget.used_up():
                out.rest = msgs[start]
                break
            for msg in msgs[start:start + size]:
                try:
                    op = parse(msg.value())
                except MalformedRecordError as exc:
                    out.failure = Failure(msg, exc, malformed=True)
                    break
                try:
                    handle(op)
                except StopConsuming:
                    self.budget.stop()
                    out.rest = msg  # not handled: not stored
                    break
                except Exception as exc:
                    out.failure = Failure(msg, exc, op)
                    break
                done = msg
                handled += 1
            if out.failure is not None or out.rest is not None:
                break
        out.done, out.handled = done, handled
        return out


class Plan(NamedTuple):
    """A partition's records of a consume() batch, split into handler batches and parsed (``_BatchRunner.prepare``)."""

    batches: List[Tuple[List[Any], List[ReplicationOp], Optional[Failure]]]  # (records, their ops, malformed one)
    isolation_ends: Optional[int]  # the isolation of a failed batch is over before this batch


class _BatchRunner:
    """The batch forms' loop: split into handler batches, parse each, hand its ops to ``_handle``.

    In two steps, so that the idempotent consumer can parse one partition's records while the sink
    transaction of another runs (``Dispatcher``): ``prepare`` (split and parse, no side effect)
    and ``execute`` (handle, in order; the time budget is checked between handler batches).
    """

    size: int
    budget: TimeBudget

    def __call__(self, part: PartitionState, msgs: List[Any]) -> Outcome:
        return self.execute(part, self.prepare(part, msgs))

    def prepare(self, part: PartitionState, msgs: List[Any]) -> Plan:
        chunks, ends = _chunks(part, msgs, self.size)
        return Plan([(chunk, *_parse_chunk(chunk)) for chunk in chunks], ends)

    def execute(self, part: PartitionState, plan: Plan) -> Outcome:
        out = Outcome()
        for index, (chunk, ops, bad) in enumerate(plan.batches):
            if index and self.budget.used_up():
                out.rest = chunk[0]
                return out
            if index == plan.isolation_ends:
                part.isolate_until = None  # every isolated op was handled
            if ops:
                self._handle(part, chunk, ops, out)
                if out.failure is not None or out.rest is not None:
                    return out
            if bad is not None:
                out.failure = bad
                return out
        return out

    def _handle(self, part: PartitionState, chunk: List[Any], ops: List[ReplicationOp], out: Outcome) -> None:
        """Handle ``ops`` (the parsed prefix of ``chunk``) and note in ``out`` what became of them."""
        raise NotImplementedError


class BasicBatchRunner(_BatchRunner):
    """At least once, per handler batch: ``handle_batch(ops)``, or ``(message, op)`` pairs ``with_records``."""

    def __init__(self, handle_batch: Callable[[Any], Any], batch_size: int, budget: TimeBudget,
                 with_records: bool = False) -> None:
        self.handle_batch = handle_batch
        self.size = batch_size
        self.budget = budget
        self.with_records = with_records

    def _handle(self, part: PartitionState, chunk: List[Any], ops: List[ReplicationOp], out: Outcome) -> None:
        try:
            self.handle_batch(list(zip(chunk, ops)) if self.with_records else ops)
        except StopConsuming:
            self.budget.stop()
            out.rest = chunk[0]  # not handled: not stored
            return
        except Exception as exc:
            out.failure = _batch_failure(chunk, ops, exc)
            return
        out.handled += len(ops)
        out.done = chunk[len(ops) - 1]


class IdempotentRunner(_BatchRunner):
    """Exactly once into the sink: each handler batch of up to ``size`` ops is one ``PostgresSink.apply``.

    ``pipelined``: the dispatcher may run ``execute`` on its sink thread while it parses (and
    fetches) what comes next.
    """

    pipelined = True

    def __init__(self, sink: PostgresSink, handler: BatchTxHandler, size: int, budget: TimeBudget) -> None:
        self.sink = sink
        self.handler = handler
        self.size = size
        self.budget = budget

    def _handle(self, part: PartitionState, chunk: List[Any], ops: List[ReplicationOp], out: Outcome) -> None:
        count = len(ops)
        try:
            applied = self.sink.apply(part.topic, part.partition, ops, [msg.offset() for msg in chunk[:count]],
                                      self.handler, known=part.position)
        except Exception as exc:
            part.position = None  # unknown whether it committed: reload from the sink next time
            if isinstance(exc, StopConsuming):
                self.budget.stop()
                out.rest = chunk[0]  # rolled back: not stored
            elif isinstance(exc, HandlerEndedTransaction):
                offset = chunk[0].offset()
                raise Fatal(HandlerError(
                    f"the handler ended the sink transaction at {part.where(offset)}: it must not "
                    "COMMIT or ROLLBACK (pgrepl commits its work together with the state); stopping, since "
                    "its work may now be committed without the state", part.topic, part.partition,
                    offset, ops[0].lsn, ops[0].seq_id)) from None
            elif isinstance(exc, ConfigError):
                raise Fatal(exc) from None
            else:
                out.failure = _batch_failure(chunk, ops, exc)
                out.failure.sink_outage = is_sink_outage(exc)
            return
        part.position = applied.position
        out.handled += applied.applied
        out.skipped += applied.skipped
        out.transactions += applied.transactions
        out.done = chunk[count - 1]
