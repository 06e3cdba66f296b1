"""glibc malloc settings for a process that streams large values (``Producer.start`` applies them).

A row with a 20 kB TOASTed value becomes a 40 kB record: libpq's copy of the message, the
record's ``bytes``, librdkafka's copy of it and its produce request, each allocated and freed
again batch after batch. glibc hands memory at the top of a heap back to the kernel as soon as
more than ``M_TRIM_THRESHOLD`` (128 kB by default, raised only after a large mmap()ed block is
freed) lies free there, so the next batch takes the same pages again and the kernel zero-fills
each one on its first touch: page faults were about a tenth of the producer's CPU on such rows.
Keeping up to 32 MiB free at the top of each heap, and serving blocks of up to 4 MiB from the
heaps rather than from fresh mmap()s, lets each batch reuse the pages the last one warmed. The
memory kept is bounded by that threshold, and is memory a batch had in use a moment before.

The settings are process-wide, so an operator's own choice wins: nothing is changed when
``GLIBC_TUNABLES`` sets a ``glibc.malloc`` tunable, when ``MALLOC_TRIM_THRESHOLD_`` or
``MALLOC_MMAP_THRESHOLD_`` is set, or when ``PGREPL_MALLOC_TUNING=off``. Other C libraries (musl,
macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Mapping, Optional

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 32 << 20
MMAP_THRESHOLD = 4 << 20

_applied = False


def _operator_choice(environ: Mapping[str, str]) -> Optional[str]:
    """Why to leave malloc alone, or None."""
    if environ.get("PGREPL_MALLOC_TUNING", "").lower() in ("off", "0", "no", "false"):
        return "PGREPL_MALLOC_TUNING is off"
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc tunables"
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        if name in environ:
            return f"{name} is set"
    return None


def tune_malloc(environ: Mapping[str, str] = os.environ) -> bool:
    """Apply the settings once per process; True when they are in force."""
    global _applied
    if _applied:
        return True
    reason = _operator_choice(environ)
    if reason is not None:
        log.debug("malloc settings left as they are: %s", reason)
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 -- glibc's alone: musl has no such mallopt parameters
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        log.debug("glibc refused the malloc settings")
        return False
    _applied = True
    log.debug("malloc: trim threshold %d, mmap threshold %d", TRIM_THRESHOLD, MMAP_THRESHOLD)
    return True
