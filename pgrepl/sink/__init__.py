"""Sinks the idempotent consumer applies ops to exactly once (``postgres``: a PostgreSQL database).

``copy_rows(ops, with_kind=False)`` turns a batch of ops into ``COPY ... FROM STDIN`` text (in
C), for handlers that write their batch with COPY::

    def handle(cursor, ops):
        cursor.copy_expert("COPY inventory_log FROM STDIN", io.BytesIO(copy_rows(ops)))
"""

from pgrepl._core import copy_rows

__all__ = ["copy_rows"]
