"""Captured pgoutput streams: a file of (WAL position, payload) pairs, for replay without a server.

Format: gzip of repeated ``>QI`` headers (message WAL start LSN, payload length) each followed
by the payload bytes; the file starts with the magic ``PGREPLCAP1``. Tests, benchmarks and
``pgrepl-bench --decoder-only`` replay these through the decoder.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Iterable, Iterator, List, Tuple, Union

MAGIC = b"PGREPLCAP1"
_HEADER = struct.Struct(">QI")

PathLike = Union[str, Path]


def write_capture(path: PathLike, messages: Iterable[Tuple[int, bytes]]) -> int:
    """Write ``(data_start, payload)`` pairs to ``path``; returns how many were written."""
    count = 0
    with gzip.open(path, "wb", compresslevel=9) as out:
        out.write(MAGIC)
        for data_start, payload in messages:
            out.write(_HEADER.pack(data_start, len(payload)))
            out.write(payload)
            count += 1
    return count


def iter_capture(path: PathLike) -> Iterator[Tuple[int, bytes]]:
    """Yield the ``(data_start, payload)`` pairs of a capture file, in stream order."""
    with gzip.open(path, "rb") as src:
        data = src.read()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path}: not a pgrepl capture file (missing {MAGIC!r} header)")
    pos = len(MAGIC)
    while pos < len(data):
        if len(data) - pos < _HEADER.size:
            raise ValueError(f"{path}: truncated header at byte {pos}")
        data_start, length = _HEADER.unpack_from(data, pos)
        pos += _HEADER.size
        if len(data) - pos < length:
            raise ValueError(f"{path}: truncated payload at byte {pos}")
        yield data_start, data[pos:pos + length]
        pos += length


def read_payloads(path: PathLike) -> List[bytes]:
    """Just the payloads of a capture file, as a list (what ``Decoder.decode_batch`` takes)."""
    return [payload for _, payload in iter_capture(path)]
