"""Keep glibc from hoarding freed chunk buffers, and let the front reuse its own.

Every request and every chunk task allocates megabyte-sized buffers and frees them at
once. glibc raises its mmap threshold after the first such free, so later buffers come
from heap arenas (one per thread) and stay with the process after they are freed: memory
grows with the number of threads, not with the data in flight. A fixed threshold keeps
large buffers in mmap (returned on free), and two arenas bound the small-object heaps.

The front passes `reuse`: its request buffers up to that size (a READ's reply, a large
WRITE's payload) come from the heap, which keeps up to REUSE_TRIM of free memory at its
top, so the next request reuses them. Mapped, each was faulted in page by page, zeroed
and unmapped again: half the front's CPU time on sequential reads of 256 KiB requests
(docs/performance.md). What the heap keeps is bounded: the NBD server holds at most its
per-connection payload budget, so the heap never held more than that at once.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: free memory the heap keeps at its top when reusing (per arena: two)
REUSE_TRIM = 2 * 2**20


def limit_malloc_retention(reuse: int = 0) -> None:
    """Fix the mmap threshold (256 KiB, or reuse) and use two arenas; with reuse, keep
    REUSE_TRIM of free memory at the heap's top."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, reuse or 256 * 1024)
        if reuse:
            libc.mallopt(_M_TRIM_THRESHOLD, REUSE_TRIM)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        log.debug("mallopt unavailable")
