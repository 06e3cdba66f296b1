"""Snapshots: the topic starts with the table, not with the slot.

* ``plan``         what a table's snapshot reads: columns, chunk key, filters, key ranges
* ``reader``       reader threads: a chunk between a low and a high watermark in the WAL
* ``coordinator``  chunk windows in the stream, stale rows dropped, chunk rows emitted in place
"""

from pgrepl.producer.snapshot.coordinator import REQUEST_PREFIX, SnapshotCoordinator, SnapshotJob, new_job_id

__all__ = ["REQUEST_PREFIX", "SnapshotCoordinator", "SnapshotJob", "new_job_id"]
