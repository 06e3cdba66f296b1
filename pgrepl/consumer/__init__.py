"""The consumer: ReplicationOps back from Kafka, handed to your code in partition order.

``Consumer`` (``consumer.py``) is the public face. Inside, a record goes through the modules in
this order:

* ``loop``: ``ConsumerLoop`` polls Kafka, keeps group membership (rebalance callbacks, commits),
  status lines and stop-at-end;
* ``partitions``: ``Partitions`` groups a fetched batch by partition and keeps each one's state;
* ``dispatch``: ``Dispatcher`` runs the groups through a runner (on worker threads when several)
  and settles each outcome (``offsets``: store, commit, seek back);
* ``runners``: basic, basic batch and idempotent runners (``PostgresSink.apply`` in
  ``pgrepl.sink.postgres`` is the exactly-once transaction), with the time budget;
* ``failures``: ``FailurePolicy`` (retry with backoff via pause + seek, stop, dead letter) and
  the ``DeadLetterProducer``.

``outcome`` holds what runners return (and ``StopConsuming``), ``stats`` the running totals.
"""

from pgrepl.consumer.consumer import Consumer, ConsumerStats, StopConsuming

__all__ = ["Consumer", "ConsumerStats", "StopConsuming"]
