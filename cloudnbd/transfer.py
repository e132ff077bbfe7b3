"""Bulk operations on a volume that is not being served: verify, export, import.

They work straight on the object store with the volume layer, without NBD or a cache:
export is the restore path of last resort, when nothing but the password and the bucket
is left. All three take the volume's lease, so they never race a running server, run
chunk transfers on a thread pool (zstd and the store clients release the GIL), and
report progress through one callback.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cloudnbd import offline
from cloudnbd.errors import IntegrityError, PreconditionFailed, UsageError, VolumeBusy
from cloudnbd.reader import Image
from cloudnbd.volume import Volume

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


def _bounded_map(threads: int, fn: Callable[[int], object], items: Iterator[int]
                 ) -> Iterator[tuple[int, Future[object]]]:
    """Run fn over items on a pool, at most 2*threads in flight, yielding in order."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: list[tuple[int, Future[object]]] = []
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= 2 * threads:
                yield pending.pop(0)
        yield from pending


@dataclass
class VerifyReport:
    checked: int = 0
    stored_bytes: int = 0
    damaged: list[tuple[int, str]] = field(default_factory=list)
    beyond_end: list[int] = field(default_factory=list)


def verify(vol: Volume, threads: int = 8, progress: ProgressFn | None = None) -> VerifyReport:
    """Download and authenticate every stored chunk; list the damaged ones."""
    if vol.meta.head:
        return _verify_v3(vol, threads, progress)
    sizes = {index: info.size for index, info in vol.stored_chunks()}
    stored = sorted(sizes.items())
    total = sum(sizes.values())
    report = VerifyReport()

    chunks = vol.chunks

    def check(index: int) -> str | None:
        try:
            chunks.get(index)  # a chunk deleted since the listing has nothing to verify
        except IntegrityError as exc:
            return exc.message
        return None

    done = 0
    indexes = (i for i, _ in stored if i < vol.meta.chunk_count)
    report.beyond_end = [i for i, _ in stored if i >= vol.meta.chunk_count]
    for index, future in _bounded_map(threads, check, indexes):
        problem = future.result()
        report.checked += 1
        report.stored_bytes += sizes[index]
        if problem is not None:
            log.error("chunk %d is damaged: %s", index, problem)
            report.damaged.append((index, str(problem)))
        done += sizes[index]
        if progress is not None:
            progress(done, total)
    return report


def _verify_v3(vol: Volume, threads: int, progress: ProgressFn | None) -> VerifyReport:
    """Version 3: the head, its map pages and journal objects must read (IntegrityError
    otherwise: nothing of the image can be trusted), then every chunk the head names is
    built from its objects; a chunk whose object is missing or fails is listed."""
    image = Image(vol)
    stored = image.stored()
    report = VerifyReport(stored_bytes=image.wire_bytes)

    def check(index: int) -> str | None:
        try:
            image.chunk(index)
        except IntegrityError as exc:
            return exc.message
        return None

    for index, future in _bounded_map(threads, check, iter(stored)):
        problem = future.result()
        report.checked += 1
        if problem is not None:
            log.error("chunk %d is damaged: %s", index, problem)
            report.damaged.append((index, str(problem)))
        if progress is not None:
            progress(report.checked, len(stored))
    return report


def export(vol: Volume, target: Path, threads: int = 8, progress: ProgressFn | None = None,
           overwrite: bool = False) -> int:
    """Write the whole volume to a raw image; never-stored chunks become holes.

    Returns the bytes of data written. A damaged chunk stops the export with an error
    naming it: a restore must never silently contain wrong data.
    """
    meta = vol.meta
    if target.exists() and not overwrite and not target.is_block_device():
        raise UsageError(f"{target} exists; pass --force to overwrite it")
    flags = os.O_WRONLY | os.O_CREAT | (0 if target.is_block_device() else os.O_TRUNC)
    fd = os.open(target, flags, 0o600)
    written = 0
    try:
        if not target.is_block_device():
            os.ftruncate(fd, meta.size)  # sparse: holes where nothing is stored
        if meta.version >= 3:  # one head, read once: one point in time
            image = Image(vol)
            stored = [i for i in image.stored() if i < meta.chunk_count]
            fetch: Callable[[int], bytes | None] = image.chunk
        else:
            stored = sorted(i for i, _ in vol.stored_chunks() if i < meta.chunk_count)
            fetch = vol.read_chunk

        for index, future in _bounded_map(threads, fetch, iter(stored)):
            plain = future.result()
            if plain is not None:
                start = index * meta.chunk_size
                length = min(meta.chunk_size, meta.size - start)
                os.pwrite(fd, memoryview(plain)[:length], start)
                written += length
            if progress is not None:
                progress(written, len(stored) * meta.chunk_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def import_image(vol: Volume, source: Path, threads: int = 8,
                 progress: ProgressFn | None = None, epoch: int = 0) -> int:
    """Store a raw image as the volume's contents; returns the chunks stored.

    Zero chunks are not stored (and any object for them is deleted), so sparse images
    stay cheap. The image must not be larger than the volume. epoch: of the lease the
    caller holds (version 3 stamps its objects with it).
    """
    meta = vol.meta
    size = source.stat().st_size if not source.is_block_device() else _device_size(source)
    if size > meta.size:
        raise UsageError(f"{source} is {size} bytes, larger than the volume "
                         f"({meta.size}); resize the volume first")
    fd = os.open(source, os.O_RDONLY)
    try:
        def plain(index: int) -> bytearray:
            start = index * meta.chunk_size
            length = max(0, min(meta.chunk_size, size - start))
            data = bytearray(meta.chunk_size)
            if length and _has_data(fd, start, length):
                os.preadv(fd, [memoryview(data)[:length]], start)
            return data

        if meta.head:
            return _import_v3(vol, plain, epoch, threads, progress)
        chunks = vol.chunks
        # each write conditional on the version listed: the lease keeps servers away, and
        # a writer that ignores it makes the import fail rather than be overwritten
        versions = {i: info.version for i, info in chunks.list()}
        stored = 0

        def put(index: int) -> bool:
            return chunks.write(index, plain(index), versions.get(index)).stored

        for index, future in _bounded_map(threads, put, iter(range(meta.chunk_count))):
            stored += bool(future.result())
            if progress is not None:
                progress(min((index + 1) * meta.chunk_size, meta.size), meta.size)
    finally:
        os.close(fd)
    return stored


def _import_v3(vol: Volume, plain: Callable[[int], bytearray], epoch: int, threads: int,
               progress: ProgressFn | None) -> int:
    """Version 3: every non-zero chunk as a new object, the map pages naming them, then
    one new head naming no journal (offline.Commit). The old objects become garbage,
    collected by the next server after the grace period."""
    meta = vol.meta
    commit = offline.Commit(vol, epoch, keep=False)
    stored = 0
    for index, future in _bounded_map(threads, lambda i: commit.put(i, plain(i)),
                                      iter(range(meta.chunk_count))):
        stored += bool(future.result())
        if progress is not None:
            progress(min((index + 1) * meta.chunk_size, meta.size), meta.size)
    try:
        commit.finish()
    except PreconditionFailed:
        raise VolumeBusy("another writer changed the volume during the import (it ignored "
                         "the lease); nothing of the import is named: run it again") from None
    return stored


def _has_data(fd: int, start: int, length: int) -> bool:
    """False if [start, start+length) of the file is a hole (no need to read it)."""
    try:
        return os.lseek(fd, start, os.SEEK_DATA) < start + length
    except OSError as exc:
        return exc.errno != errno.ENXIO  # ENXIO: only holes from start to the end


def _device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
