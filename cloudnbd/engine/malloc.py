"""Keep glibc from hoarding freed chunk buffers.

Every request and every chunk task allocates megabyte-sized buffers and frees them at
once. glibc raises its mmap threshold after the first such free, so later buffers come
from heap arenas (one per thread) and stay with the process after they are freed: memory
grows with the number of threads, not with the data in flight. A fixed threshold keeps
large buffers in mmap (returned on free), and two arenas bound the small-object heaps.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8
_M_MMAP_THRESHOLD = -3


def limit_malloc_retention() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        log.debug("mallopt unavailable")
