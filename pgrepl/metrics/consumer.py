"""The consumer's exporter: records and ops by outcome, sink outages, lag per partition, readiness.

Ready means: Kafka answers and the poll loop went round within ``POLL_STALL_SECONDS``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterator, Tuple

from pgrepl.metrics.exporter import DEFAULT_INTERVAL, Exporter

if TYPE_CHECKING:
    from pgrepl.consumer.consumer import Consumer

#: A consumer whose loop has not polled Kafka for this long is stuck (in a handler, or blocked).
POLL_STALL_SECONDS = 60.0


class ConsumerExporter(Exporter):
    """Metrics and health of one ``Consumer``."""

    def __init__(self, consumer: "Consumer", *, host: str, port: int, interval: float = DEFAULT_INTERVAL) -> None:
        self.consumer = consumer
        self.stats = consumer.stats
        super().__init__(host=host, port=port, brokers=consumer.brokers, kafka_config=consumer.user_kafka_config,
                         labels={"group": consumer.group_id}, interval=interval)

    def readiness(self) -> Tuple[bool, str]:
        if self.consumer.stopping:
            return False, "stopping"
        if self.probe.reachable is None or not self.stats.polled_at:
            return False, "starting"
        idle = time.monotonic() - self.stats.polled_at
        if idle > POLL_STALL_SECONDS:
            return False, f"the poll loop has not polled Kafka for {idle:.0f} s"
        return True, f"consuming, {len(self.consumer.assignment)} partitions assigned"

    def families(self) -> Iterator[Any]:
        f, stats = self.families_of, self.stats
        yield f.counter("pgrepl_consumer_records_total", "records taken from Kafka", stats.records)
        yield f.counter("pgrepl_consumer_bytes_total", "bytes of record values taken from Kafka", stats.bytes)
        yield f.labelled("pgrepl_consumer_ops_total", "ops by outcome: handled, skipped (replays the sink "
                         "already has), dead_lettered", "outcome",
                         {"handled": stats.handled, "skipped": stats.skipped, "dead_lettered": stats.dead_lettered},
                         kind="counter")
        yield f.counter("pgrepl_consumer_failed_attempts_total", "failed handler attempts and malformed records",
                        stats.failures)
        yield f.counter("pgrepl_consumer_sink_outages_total", "sink transactions that failed because the sink "
                        "was unavailable", stats.sink_outages)
        yield f.counter("pgrepl_consumer_transactions_total", "sink transactions committed", stats.transactions)
        yield f.counter("pgrepl_consumer_batches_total", "consume() batches that held records", stats.batches)
        yield f.counter("pgrepl_consumer_rebalances_total", "partition assignments", stats.rebalances)
        yield f.gauge("pgrepl_consumer_assigned_partitions", "partitions assigned to this member",
                      len(self.consumer.assignment))
        yield f.labelled("pgrepl_consumer_lag", "records between the consumer's position and the end of the "
                         "partition (as of the last fetch)", "topic,partition", dict(stats.lag))
