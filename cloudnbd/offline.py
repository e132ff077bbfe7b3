"""Changing a version-3 volume without a server: a new image written beside the current
one, the switch to it, and the removal of what it replaced. What the commands that
rewrite a volume share (import, resize --shrink, upgrade, rekey; docs/design.md,
"Offline commands on version 3"), and tests that play another writer (commit_chunks).

Rules (each offline command holds the volume's lease throughout):
- R1 Nothing the current head names is written or deleted before the switch: every
  object is created once, with create-if-absent, under a fresh stamp of the writer's
  lease epoch (or, for upgrade, the reserved stamp 1, adopted on a rerun only if it
  holds exactly what would be written). An interrupted command leaves only garbage.
- R2 The switch is one conditional write: the head, on the version read before the
  image was computed (import, shrink), or volume.json (M1) naming a new head (upgrade,
  rekey). Losing the condition means another writer ignored the lease: the command fails
  and its objects are garbage.
- R3 Every entry of the new image, and its head, carries one sequence number above all
  the old head holds (reader.Image.max_seq), and the new head names no journal object:
  a server's later writes number above everything it holds (engine E6).
- R4 collect() runs only after the switch and deletes exactly the volume's objects the
  new head does not name (reader.unnamed: never another key under the root).
- R5 What a rewrite does not change it carries over as it is (carry): the entries of
  chunks held by objects, and of chunks made zero with their seq (a write older than
  the zeroing must never come back); a chunk the store's journal wrote to is folded
  into a new object, as the new head names no journal.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping

from cloudnbd import codec, layout, lease
from cloudnbd.errors import CloudnbdError, IntegrityError, ObjectNotFound, PreconditionFailed
from cloudnbd.layout import PAGE_CHUNKS, ZERO_ENTRY, Entry, Head
from cloudnbd.objects import VolumeObjects
from cloudnbd.pool import results
from cloudnbd.reader import Image, garbage
from cloudnbd.volume import DELETE_BATCH, LAYOUT_V3, Volume, own_objects

log = logging.getLogger(__name__)


class ImageWriter:
    """Chunk objects, map pages and the head of a new image (R1-R3). put_chunk and keep
    may be called from many threads."""

    def __init__(self, objects: VolumeObjects, epoch: int, seq: int,
                 reserved: int | None = None) -> None:
        self.objects = objects
        self.epoch = epoch
        self.seq = seq
        self.reserved = reserved  # upgrade: try this stamp first (R1)
        self._counter = 0
        self._lock = threading.Lock()
        self.entries: dict[int, Entry] = {}
        self.pages: dict[int, int] = {}  # page -> stamp, once written
        self.wire_bytes = 0

    def _fresh_stamp(self) -> int:
        with self._lock:
            self._counter += 1
            return layout.stamp(self.epoch, self._counter)

    def put_chunk(self, index: int, plain: bytes | bytearray | memoryview) -> bool:
        """Chunk index of the new image holds plain; whether it was stored (a chunk of
        zeros is not: it has no entry, unless zeroed() gives it one)."""
        if codec.is_zero(plain):
            with self._lock:
                self.entries.pop(index, None)
            return False
        if self.reserved is not None:
            keys, size = self.objects.keys, self.objects.codec.chunk_size
            stamp = self._create_or_adopt(
                lambda s: layout.chunk_key(index, s),
                lambda s: layout.encode_chunk(keys, index, s, plain,
                                              self.objects.codec.zstd_level),
                lambda s, blob: layout.decode_chunk(keys, index, s, blob, size) == plain)
        else:
            stamp = self._fresh_stamp()
            sent = self.objects.put_chunk(index, stamp, plain)
            with self._lock:
                self.wire_bytes += sent.wire_bytes
        self.keep(index, Entry(stamp, self.seq))
        return True

    def zeroed(self, index: int) -> None:
        """Chunk index is zeros as of the new image, and its map entry says so with the
        image's seq (R5: for a writer that continues the volume's history)."""
        self.keep(index, Entry(0, self.seq))

    def keep(self, index: int, entry: Entry) -> None:
        """Chunk index of the new image is entry (an object the old image names already,
        its seq at most the writer's)."""
        if entry.seq > self.seq:
            raise ValueError(f"entry seq {entry.seq} above the new head's {self.seq}")
        with self._lock:
            if entry == ZERO_ENTRY:
                self.entries.pop(index, None)
            else:
                self.entries[index] = entry

    def _create_or_adopt(self, key_of: Callable[[int], str],
                         encode: Callable[[int], bytes | bytearray],
                         holds: Callable[[int, bytes], bool]) -> int:
        """The stamp of the object that encode() makes: the reserved stamp, created now
        or found holding the same contents (an interrupted run made it; holds() judges);
        else a fresh stamp (R1)."""
        assert self.reserved is not None
        key = key_of(self.reserved)
        stamp = self.reserved
        if self.objects.store.stat(key) is not None:  # a HEAD, not a PUT of it all again
            try:
                if holds(stamp, self.objects.store.get(key)):
                    return stamp
                log.info("%s, left by an interrupted run, holds other data; writing "
                         "another", key)
            except IntegrityError as exc:
                log.warning("%s, left by an interrupted run, is damaged (%s); writing "
                            "another", key, exc.message)
            except ObjectNotFound:
                pass
            stamp = self._fresh_stamp()
        blob = encode(stamp)
        self.objects.store.put_if(key_of(stamp), blob, None)
        with self._lock:
            self.wire_bytes += len(blob)
        return stamp

    def page_entries(self) -> dict[int, list[Entry]]:
        """The entries of every page of the new image that holds any."""
        pages: dict[int, list[Entry]] = {}
        for index, entry in self.entries.items():
            page = index // PAGE_CHUNKS
            if page not in pages:
                pages[page] = [ZERO_ENTRY] * PAGE_CHUNKS
            pages[page][index % PAGE_CHUNKS] = entry
        return pages

    def write_pages(self, threads: int) -> tuple[tuple[int, int], ...]:
        """Store the map pages; returns the head's (page, stamp) pairs. (Every page is
        new: a page is 16 GiB of 4 MiB chunks, and rewriting it costs little.)"""
        pages = self.page_entries()

        def put(page: int) -> int:
            entries = pages[page]
            if self.reserved is not None:
                keys = self.objects.keys
                return self._create_or_adopt(
                    lambda s: layout.map_key(page, s),
                    lambda s: layout.encode_map_page(keys, page, s, entries),
                    lambda s, blob: layout.decode_map_page(keys, page, s, blob) == entries)
            stamp = self._fresh_stamp()
            sent = self.objects.put_page(page, stamp, entries)
            with self._lock:
                self.wire_bytes += sent.wire_bytes
            return stamp

        for page, stamp in results(threads, put, sorted(pages)):
            self.pages[page] = stamp  # type: ignore[assignment]
        return tuple(sorted(self.pages.items()))

    def write_head(self, key: str, generation: int, expected: str | None,
                   threads: int) -> Head:
        """Store the pages, then the head under key, if the head there is still at
        version expected (None: create it). CloudnbdError if it is not (R2)."""
        pages = self.write_pages(threads)
        head = Head(self.objects.keys.volume_id, generation, self.epoch, self.seq, pages,
                    (), layout.utc_now())
        try:
            self.objects.put_head(key, head, expected)
        except PreconditionFailed:
            raise CloudnbdError(
                f"{self.objects.store.description}: the volume's head ({key}) changed "
                f"while this command ran, although it holds the lease: another writer "
                f"ignored it. Nothing was changed; the objects written are garbage that "
                f"the next rewrite or server deletes") from None
        return head

    def named(self, head_key: str) -> set[str]:
        """Every key the new head names, its own included (after write_head)."""
        names = {head_key}
        names.update(layout.map_key(page, stamp) for page, stamp in self.pages.items())
        names.update(layout.chunk_key(index, entry.stamp)
                     for index, entry in self.entries.items() if entry.stamp)
        return names


def collect(vol: Volume, named: set[str],
            progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Delete the volume's objects that neither the current head (named) nor any snapshot
    needs (R4, S4): after a switch, what the old head named, and any other garbage.
    Returns (objects, bytes) deleted. If a snapshot cannot be read, nothing is deleted
    (a warning says why): what it needs is unknown."""
    doomed = garbage(vol, own_objects(vol.store), named)
    if doomed is None:
        log.warning("no garbage deleted, as a snapshot cannot be read; `cloudnbd "
                    "snapshot delete` the damaged snapshot to let garbage be collected")
        return 0, 0
    total = sum(info.size for info in doomed)
    done = 0
    if progress is not None:
        progress(0, total)
    for start in range(0, len(doomed), DELETE_BATCH):
        batch = doomed[start:start + DELETE_BATCH]
        vol.store.delete_many([info.key for info in batch])
        done += sum(info.size for info in batch)
        if progress is not None:
            progress(done, total)
    if doomed:
        log.info("deleted %d objects (%d bytes) no head names", len(doomed), total)
    return len(doomed), total


def carry(writer: ImageWriter, image: Image, end: int, changed: Collection[int] = ()
          ) -> list[int]:
    """Carry image's chunks below chunk end into writer as they are, but those in
    changed (R5); returns the chunks the store's journal wrote to, ascending, for the
    caller to fold (put_chunk of image.chunk())."""
    fold = []
    for index, source in image.sources.items():
        if index >= end or index in changed:
            continue
        if source.overlays:
            fold.append(index)
        else:
            writer.keep(index, Entry(source.stamp, source.seq))
    for index, seq in image.zeroed.items():
        if index < end and index not in changed:
            writer.keep(index, Entry(0, seq))
    return sorted(fold)


def commit_chunks(vol: Volume, epoch: int, chunks: Mapping[int, bytes | None],
                  progress: Callable[[int], None] | None = None) -> Head:
    """Store chunks (index -> contents; None or zeros: zeroed) under a new head that
    carries the rest of the current image over (R5), with stamps of epoch (the caller
    holds the lease at it, or plays a writer that does); returns the new head. What
    the old head named is left as garbage: for tests and tools that play another writer;
    the commands collect it (import, shrink)."""
    image = Image(vol)
    writer = ImageWriter(vol.objects, epoch, image.max_seq + 1)
    fold = carry(writer, image, image.chunk_count, chunks.keys())
    for index in fold:
        writer.put_chunk(index, image.chunk(index))  # type: ignore[arg-type]
    for index, plain in chunks.items():
        if plain is None or not writer.put_chunk(index, plain):
            writer.zeroed(index)
        if progress is not None:
            progress(index)
    return writer.write_head(vol.meta.head, image.head.generation + 1, image.head_version,
                             threads=8)


def read_chunk(vol: Volume, index: int) -> bytes | None:
    """The plain contents of chunk index, or None if it is not stored (all zeros).
    Version 3: as the head names it now (reader.Image; one head read per call). For
    tools and tests that look at one chunk."""
    if vol.meta.version >= LAYOUT_V3:
        return Image(vol).chunk(index)
    return vol.chunks.get(index).plain


def write_chunk(vol: Volume, index: int, plain: bytes, epoch: int | None = None) -> None:
    """Store chunk index. Versions 1 and 2: over its current object
    (chunks.ChunkStore.replace). Version 3: committed under a new head by commit_chunks,
    with stamps of epoch: the caller plays a writer that holds the lease at it. Default:
    the lease is taken (purpose "import") for the write, so that every call has an epoch
    of its own and its stamps are unique; if it is held, one above the holder's (the
    caller plays the holder's successor, once)."""
    if vol.meta.version < LAYOUT_V3:
        vol.chunks.replace(index, plain)
        return
    if epoch is not None:
        commit_chunks(vol, epoch, {index: plain})
        return
    found = lease.holder(vol.store)
    if found is not None:
        commit_chunks(vol, found.epoch + 1, {index: plain})
        return
    held = lease.acquire(vol.store, "import")
    try:
        commit_chunks(vol, held.epoch, {index: plain})
    finally:
        held.release()
