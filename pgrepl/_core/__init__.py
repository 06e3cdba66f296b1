"""The compiled hot path (``pgrepl._core.core``, built from core.pyx and its .pxi units).

Internal to pgrepl: the producer streams through ``ReplicationStream`` and ``Decoder``, the
consumer parses through ``parse_canonical`` (via ``pgrepl.model``). Tests and the benchmark use
the rest directly.
"""

from pgrepl._core.core import (
    Batch,
    Begin,
    Commit,
    Decoder,
    Record,
    Relation,
    ReplicationStream,
    copy_out,
    copy_row_keys,
    copy_rows,
    copy_row_values,
    encode_copy_rows,
    escape_json_string,
    key_partition,
    parse_canonical,
    restamp_copy_records,
)

__all__ = [
    "Batch",
    "Begin",
    "Commit",
    "Decoder",
    "Record",
    "Relation",
    "ReplicationStream",
    "copy_out",
    "copy_row_keys",
    "copy_rows",
    "copy_row_values",
    "encode_copy_rows",
    "escape_json_string",
    "key_partition",
    "parse_canonical",
    "restamp_copy_records",
]
