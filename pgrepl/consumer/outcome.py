"""What handling one partition's records produced, and the two ways out of the loop.

Runners return an ``Outcome``; the dispatcher settles it (stores the offset of what is done,
seeks back the rest) and hands its ``Failure`` to the failure policy. ``Fatal`` ends the
run with an error; ``StopConsuming`` is the handler's way to end it without one.
"""

from __future__ import annotations

from typing import Any, Optional

from pgrepl.errors import PgreplError
from pgrepl.model import ReplicationOp

__all__ = ["Failure", "Fatal", "Outcome", "StopConsuming"]


class StopConsuming(Exception):
    """Raise it from a handler to stop the consumer without storing the op or batch being handled.

    The consumer stops as after ``stop()``; what was handled before is committed, the record
    the handler was given (its whole batch in the batch forms; the sink transaction is rolled
    back in the idempotent forms) is delivered again to the group's next run.
    """


class Fatal(Exception):
    """An error that must stop the consumer; carries the ``PgreplError`` the ``start_*`` call raises."""

    def __init__(self, error: PgreplError) -> None:
        super().__init__(str(error))
        self.error = error


class Failure:
    """A failed attempt: the record it failed at and why.

    ``sink_outage`` marks a failure of the sink itself (connection lost, server restarting, a
    serialization failure): not the record's fault, so it is retried for as long as it takes
    and never counts towards ``max_attempts`` or sends a record to the dead-letter topic.
    """

    __slots__ = ("msg", "error", "op", "malformed", "batch_end", "sink_outage")

    def __init__(self, msg: Any, error: BaseException, op: Optional[ReplicationOp] = None,
                 malformed: bool = False, batch_end: Optional[int] = None, sink_outage: bool = False) -> None:
        self.msg = msg
        self.error = error
        self.op = op
        self.malformed = malformed
        self.batch_end = batch_end  # last offset of a failed multi-op batch
        self.sink_outage = sink_outage


class Outcome:
    """What handling one partition's records of a consume() batch did."""

    __slots__ = ("done", "handled", "skipped", "transactions", "failure", "rest")

    def __init__(self) -> None:
        self.done: Any = None  # last record whose work is finished (its offset + 1 gets stored)
        self.handled = 0
        self.skipped = 0
        self.transactions = 0
        self.failure: Optional[Failure] = None
        self.rest: Any = None  # first record put back unhandled (time budget used up, or stopping)
