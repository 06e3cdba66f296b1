# cython: language_level=3
"""pgrepl's compiled hot path: walsender stream → pgoutput decoder → ReplicationOp JSON, and back.

One extension module, split into units it includes (asyncpg-style), so that the small helpers
inline across them; the C structs and the extension types' fields are declared in core.pxd:

* buffer.pxi     the reusable output buffer
* json.pxi       JSON string escaping exactly as serde_json writes it (strict UTF-8)
* partition.pxi  CRC-32 partitioning, as librdkafka's default partitioner
* reader.pxi     bounds-checked reads over one pgoutput message
* results.pxi    Record, Begin, Commit, Batch, Relation
* pgoutput.pxi   the Decoder: pgoutput protocol v1 in, Kafka records out
* stream.pxi     ReplicationStream: reads the CopyBoth stream from libpq, decodes in place
* records.pxi    the consumer's parser of canonical ReplicationOp JSON
* copy.pxi       snapshot rows (COPY text format) into the same Insert records
* copy_out.pxi   COPY ... TO STDOUT read from libpq in blocks, with the GIL released
* copy_in.pxi    ops into COPY ... FROM STDIN text, for sink handlers

Per row the only Python objects made are the Kafka key and value ``bytes``.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memchr, memcmp, memcpy, memset

import logging

from pgrepl.errors import ConfigError, DecodeError, PgreplError, ReplicationError, StreamError
from pgrepl.lsn import format_lsn
from pgrepl.topics import normalize_topic_map

_log = logging.getLogger("pgrepl.decode")

include "buffer.pxi"
include "json.pxi"
include "partition.pxi"
include "reader.pxi"
include "results.pxi"
include "pgoutput.pxi"
include "stream.pxi"
include "records.pxi"
include "copy.pxi"
include "copy_out.pxi"
include "copy_in.pxi"
