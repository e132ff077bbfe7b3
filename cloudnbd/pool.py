"""Run one function over many items on a pool of threads, for the bulk operations
(export, verify, import, upgrade, rekey, reading a head's pages): zstd, AES-GCM and the
store clients release the GIL, so threads overlap downloads, uploads and decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def parallel(threads: int, fn: Callable[[T], object], items: Iterable[T]
             ) -> Iterator[tuple[T, object | BaseException]]:
    """fn over items on a pool of threads, at most 2*threads in flight (items are taken
    lazily: a long iterable costs no memory), in order: (item, what fn returned, or the
    Exception it raised, for the caller to judge)."""
    threads = max(1, threads)

    def call(item: T) -> object | BaseException:
        try:
            return fn(item)
        except Exception as exc:  # handed to the caller, who decides
            return exc

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending = []
        for item in items:
            pending.append((item, pool.submit(call, item)))
            if len(pending) >= 2 * threads:
                first, future = pending.pop(0)
                yield first, future.result()
        for item, future in pending:
            yield item, future.result()


def results(threads: int, fn: Callable[[T], object], items: Iterable[T]
            ) -> Iterator[tuple[T, object]]:
    """parallel(), raising the first exception (in order) instead of yielding it."""
    for item, value in parallel(threads, fn, items):
        if isinstance(value, BaseException):
            raise value
        yield item, value
