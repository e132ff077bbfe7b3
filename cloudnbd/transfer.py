"""Bulk operations on a volume that is not being served: verify, export, import, shrink.

They work straight on the object store with the volume layer, without NBD or a cache:
export is the restore path of last resort, when nothing but the password and the bucket
is left. Chunk transfers run on a thread pool (pool.py) and report progress through one
callback.

A volume of version 3 is read through the head (reader.Image): one point in time even
while a server writes, every named object authenticated, and a head that changed under
the reader (a server collected what an older one named) read again (reader.current).
import and shrink write a new image beside the current one and switch to it with one
conditional head write (offline.py, R1-R4), under the lease the caller holds. Volumes of
versions 1 and 2 (chunk objects chunks/<N>) are verified and exported as they are;
everything else needs `cloudnbd upgrade` first.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from cloudnbd import freshness, layout
from cloudnbd.chunks import chunk_key
from cloudnbd.errors import CloudnbdError, IntegrityError, UsageError
from cloudnbd.layout import Head
from cloudnbd.offline import ImageWriter, carry, collect
from cloudnbd.pool import parallel, results
from cloudnbd.reader import Image, current, garbage, read_head
from cloudnbd.volume import LAYOUT_V3, Volume, own_objects

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)
#: times verify starts over because the head changed while it read (a busy server)
_VERIFY_ATTEMPTS = 5


# -- verify --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Damage:
    """An object that is missing or does not authenticate: what it is ("chunk", "map
    page", "journal object"), its name for a user (e.g. "chunk 5 (chunks/...)"), and
    what is wrong with it."""

    kind: str
    name: str
    problem: str


def describe(key: str) -> tuple[str, str]:
    """(kind, name) of a version-3 object for a user: ("chunk", "chunk 5 (chunks/...)")."""
    parsed = layout.parse_key(key)
    if parsed is None:
        return "object", key
    kind, number, _ = parsed
    if kind == layout.Kind.CHUNK:
        return "chunk", f"chunk {number} ({key})"
    if kind == layout.Kind.MAP:
        return "map page", f"map page {number} ({key})"
    return "journal object", f"journal object {key}"


@dataclass
class VerifyReport:
    """What verify found. damaged: each object missing or damaged; beyond_end: chunks
    stored (or named) past the end of the volume; garbage: objects of version 3 that no
    head names (None: not known, as damage hid part of what the head names)."""

    checked: int = 0
    stored_bytes: int = 0
    damaged: list[Damage] = field(default_factory=list)
    beyond_end: list[int] = field(default_factory=list)
    garbage_objects: int | None = 0
    garbage_bytes: int = 0
    head_generation: int | None = None


def verify(vol: Volume, threads: int = 8, progress: ProgressFn | None = None,
           snapshot: str | None = None) -> VerifyReport:
    """Download and authenticate every object the volume's data (or snapshot's image) is
    made of; list the damaged ones, stray chunks and garbage."""
    if snapshot is not None:
        snap = _snapshot(vol, snapshot)
        return _verify_head(vol, snap.head, threads, progress, snap.size)
    if vol.meta.version < LAYOUT_V3:
        return _verify_chunks(vol, threads, progress)
    for _ in range(_VERIFY_ATTEMPTS):
        head, version = read_head(vol)
        report = _verify_head(vol, head, threads, progress)
        if not report.damaged or read_head(vol)[1] == version:
            return report
        log.info("the head changed while verifying; starting over")
    raise CloudnbdError(f"{vol.store.description}: the volume's head keeps changing while "
                        f"it is verified (a server is busy writing); try again")


def _verify_head(vol: Volume, head: Head, threads: int, progress: ProgressFn | None,
                 size: int | None = None) -> VerifyReport:
    """verify for version 3: the map pages, journal objects and chunk objects the head
    names, each fetched and authenticated; what lies past the end; garbage (not for a
    snapshot's head, read at its size)."""
    report = VerifyReport(head_generation=head.generation)

    def damaged(key: str, problem: str) -> None:
        # verify lists each damaged object on stdout; the log keeps it for the record
        log.info("%s is damaged: %s", key, problem)
        kind, name = describe(key)
        if problem.startswith(key + ": "):
            problem = problem[len(key) + 2:]
        report.damaged.append(Damage(kind, name, problem))

    image = Image(vol, head, threads, on_damage=damaged, size=size)
    listing = list(own_objects(vol.store))
    listed = {info.key: info.size for info in listing}
    report.checked = len(head.pages) + len(head.journal)
    report.stored_bytes = sum(listed.get(key, 0) for key in image.named
                              if key != vol.meta.head)
    report.beyond_end = image.stray()
    chunks = [(i, s) for i, s in image.named_chunks() if i < image.chunk_count]
    sizes = {c: listed.get(layout.chunk_key(*c), 0) for c in chunks}
    total, done = sum(sizes.values()), 0
    objects = vol.objects
    for chunk, found in parallel(threads, lambda c: objects.get_chunk(*c), chunks):
        report.checked += 1
        if isinstance(found, IntegrityError):
            damaged(layout.chunk_key(*chunk), found.message)
        elif isinstance(found, BaseException):
            raise found
        done += sizes[chunk]
        if progress is not None:
            progress(done, total)
    found = garbage(vol, listing, image.named) if image.complete and size is None \
        else None
    if found is not None:
        report.garbage_objects = len(found)
        report.garbage_bytes = sum(info.size for info in found)
    else:
        report.garbage_objects = None
    return report


def _verify_chunks(vol: Volume, threads: int, progress: ProgressFn | None) -> VerifyReport:
    """verify for versions 1 and 2: every stored chunk object."""
    sizes = {index: info.size for index, info in vol.stored_chunks()}
    total = sum(sizes.values())
    report = VerifyReport()
    chunks = vol.chunks
    done = 0
    indexes = sorted(i for i in sizes if i < vol.meta.chunk_count)
    report.beyond_end = sorted(i for i in sizes if i >= vol.meta.chunk_count)
    # a chunk deleted since the listing has nothing to verify
    for index, found in parallel(threads, chunks.get, indexes):
        report.checked += 1
        report.stored_bytes += sizes[index]
        if isinstance(found, IntegrityError):
            log.info("chunk %d is damaged: %s", index, found.message)
            report.damaged.append(Damage("chunk", f"chunk {index} ({chunk_key(index)})",
                                         found.message))
        elif isinstance(found, BaseException):
            raise found
        done += sizes[index]
        if progress is not None:
            progress(done, total)
    return report


# -- export --------------------------------------------------------------------------------

def export(vol: Volume, target: Path, threads: int = 8, progress: ProgressFn | None = None,
           overwrite: bool = False, snapshot: str | None = None) -> tuple[int, int]:
    """Write the whole volume (or snapshot's image) to a raw image (never-stored chunks
    become holes) or a block device (they are written as zeros: a device keeps what it
    held).

    Returns the image's size and the bytes of data written. A damaged chunk stops the
    export with an error naming it: a restore must never silently contain wrong data.
    """
    snap = None if snapshot is None else _snapshot(vol, snapshot)
    if target.exists() and not overwrite and not target.is_block_device():
        raise UsageError(f"{target} exists; pass --force to overwrite it")
    device = target.is_block_device()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | (0 if device else os.O_TRUNC), 0o600)
    try:
        size = vol.meta.size
        if snap is not None:  # immutable while it exists: no head to follow
            image = Image(vol, snap.head, threads, size=snap.size)
            size = image.size
            written = _write_out(vol, image.size, image.stored(), image.chunk, fd, device,
                                 threads, progress)
        elif vol.meta.version >= LAYOUT_V3:
            def from_head(head: Head) -> int:
                image = Image(vol, head, threads)
                return _write_out(vol, image.size, image.stored(), image.chunk, fd,
                                  device, threads, progress)

            written = current(vol, from_head)
        else:
            stored = sorted(i for i, _ in vol.stored_chunks() if i < vol.meta.chunk_count)
            written = _write_out(vol, size, stored, lambda i: vol.chunks.get(i).plain, fd,
                                 device, threads, progress)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size, written


def _snapshot(vol: Volume, name: str) -> layout.Snapshot:
    """Snapshot name of a version-3 volume (UsageError if there is none)."""
    if vol.meta.version < LAYOUT_V3:
        raise UsageError(f"{vol.store.description}: a volume of format version "
                         f"{vol.meta.version} has no snapshots (`cloudnbd upgrade` it)")
    return vol.objects.get_snapshot(name)


def _write_out(vol: Volume, size: int, stored: list[int],
               fetch: Callable[[int], bytes | None], fd: int, device: bool, threads: int,
               progress: ProgressFn | None) -> int:
    """Write the chunks of an image of size bytes (fetch(index): its bytes, None for
    zeros) to fd from scratch."""
    chunk_size = vol.meta.chunk_size
    chunk_count = -(-size // chunk_size)
    if not device:
        os.ftruncate(fd, 0)  # from scratch: a restarted export leaves nothing behind
        os.ftruncate(fd, size)  # sparse: holes where nothing is stored
    indexes = range(chunk_count) if device else stored
    wanted = set(stored)
    total = len(indexes) * chunk_size
    zeros = memoryview(bytes(chunk_size))
    written = done = 0
    for index, plain in results(threads, lambda i: fetch(i) if i in wanted else None,
                                indexes):
        start = index * chunk_size
        length = min(chunk_size, size - start)
        if plain is not None:
            os.pwrite(fd, memoryview(plain)[:length], start)  # type: ignore[arg-type]
            written += length
        elif device:
            os.pwrite(fd, zeros[:length], start)
        done += chunk_size
        if progress is not None:
            progress(done, total)
    return written


# -- import --------------------------------------------------------------------------------

def import_image(vol: Volume, source: Path, epoch: int, threads: int = 8,
                 progress: ProgressFn | None = None) -> int:
    """Make a raw image the volume's contents, as a new image beside the current one
    and one conditional head write (offline.py); returns the chunks stored. The caller
    holds the volume's lease at epoch (the stamps of the new objects).

    Zero chunks are not stored, so sparse images stay cheap. The image must not be
    larger than the volume. What the old head named is deleted once the new one is
    written (R4).
    """
    meta = vol.meta
    size = source.stat().st_size if not source.is_block_device() else _device_size(source)
    if size > meta.size:
        raise UsageError(f"{source} is {size} bytes, larger than the volume "
                         f"({meta.size}); resize the volume first")
    head, version = read_head(vol)
    old = _old_image(vol, head, threads, "importing over it")
    writer = ImageWriter(vol.objects, epoch, old.max_seq + 1)
    fd = os.open(source, os.O_RDONLY)
    try:
        def put(index: int) -> None:
            start = index * meta.chunk_size
            length = max(0, min(meta.chunk_size, size - start))
            plain = bytearray(meta.chunk_size)
            if length and _has_data(fd, start, length):
                os.preadv(fd, [memoryview(plain)[:length]], start)
            writer.put_chunk(index, plain)

        for index, _ in results(threads, put, range(meta.chunk_count)):
            if progress is not None:
                progress(min((index + 1) * meta.chunk_size, meta.size), meta.size)
    finally:
        os.close(fd)
    switch(vol, writer, head, version, threads)
    return len(writer.entries)


def _old_image(vol: Volume, head: Head, threads: int, going_on: str) -> Image:
    """The image a rewrite replaces, for its sequence numbers (R3): damage to it is
    reported, not fatal, as its contents are not used."""
    def damaged(key: str, problem: str) -> None:
        log.warning("%s is damaged (%s); %s", key, problem, going_on)

    return Image(vol, head, threads, on_damage=damaged)


def switch(vol: Volume, writer: ImageWriter, head: Head, version: str, threads: int,
           size: int | None = None) -> Head:
    """Write the new head over head (R2), remember its generation on this machine, then
    record size in volume.json if given, and delete what neither the head nor a snapshot
    needs (R4); the new head."""
    key = vol.meta.head
    new = writer.write_head(key, head.generation + 1, version, threads)
    freshness.check_head(vol.meta.volume_id, new.generation)
    if size is not None:
        vol.update(lambda meta: replace(meta, size=size))
    collect(vol, writer.named(key))
    return new


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


# -- shrink --------------------------------------------------------------------------------

def shrink(vol: Volume, new_size: int, epoch: int, threads: int = 8,
           progress: ProgressFn | None = None) -> None:
    """Shrink a closed version-3 volume to new_size (rounded already), under the lease
    the caller holds at epoch: a new image without the chunks past the new end, the tail
    of the new last chunk zeroed, and the store's journal folded in (the image is read,
    so nothing needs a server); its head first, then volume.json's size. A crash in
    between leaves the old size with zeros past the new end, and running shrink again
    finishes; the other order would let a grow bring the old data back.

    progress(bytes done, bytes total) follows the chunks rewritten.
    """
    meta = vol.meta
    if new_size >= meta.size:
        raise ValueError("shrink() makes a volume smaller")
    keep = -(-new_size // meta.chunk_size)
    tail = new_size % meta.chunk_size
    head, version = read_head(vol)
    image = Image(vol, head, threads)  # it is rewritten: damage stops the shrink
    writer = ImageWriter(vol.objects, epoch, image.max_seq + 1)
    last = {keep - 1} if tail and keep - 1 in image.sources else set()
    rewrite = sorted({*carry(writer, image, keep, last), *last})

    def fold(index: int) -> None:
        plain = image.chunk(index)
        assert plain is not None
        if index in last:
            plain = plain[:tail] + bytes(meta.chunk_size - tail)
        if not writer.put_chunk(index, plain):
            writer.zeroed(index)

    total = len(rewrite) * meta.chunk_size
    for done, _ in enumerate(results(threads, fold, sorted(rewrite)), 1):
        if progress is not None:
            progress(done * meta.chunk_size, total)
    if progress is not None and not rewrite:
        progress(0, 0)
    switch(vol, writer, head, version, threads, size=new_size)
