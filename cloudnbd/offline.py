"""Changing a version-3 volume without a server: new chunk contents committed under a
new head (import, shrink, upgrade, rekey, and tests that play another writer).

The caller holds the volume's lease (its epoch makes the stamps unique). The commit is
one conditional replacement of the head (W2), written after every object it names:
a crash before it leaves only garbage, and a server that took the volume in between
makes it fail (PreconditionFailed) instead of being overwritten. The new head names no
journal object, and its seq is above every seq of the old image, so a later writer's
sequence numbers stay above all of it.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping

from cloudnbd import layout
from cloudnbd.layout import Entry, Head
from cloudnbd.reader import Image
from cloudnbd.volume import Volume


class Commit:
    """One offline commit in the making: chunks stored under fresh stamps of the caller's
    epoch (put, from any threads, each chunk once), then map pages and the head
    (finish). With keep=False the new image starts from zeros instead of the old map:
    the volume's whole contents are replaced (import)."""

    def __init__(self, vol: Volume, epoch: int, keep: bool = True) -> None:
        self.volume = vol
        self.epoch = epoch
        self.image = Image(vol)
        head = self.image.head
        self.pages: dict[int, list[Entry]] = {
            page: vol.objects.get_page(page, stamp) for page, stamp in head.pages} \
            if keep else {}
        self.seq = max([head.seq, *(r.last_seq for r in head.journal)]) + 1
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def fresh(self) -> int:
        with self._lock:
            return layout.stamp(self.epoch, next(self._counter))

    def put(self, index: int, plain: bytes | bytearray | None) -> bool:
        """Store chunk index (None or zeros: no object; its entry keeps this commit's seq
        only where the old map had one); whether an object was stored."""
        stamp = self.fresh()
        sent = self.volume.objects.put_chunk(
            index, stamp, plain if plain is not None else bytes(self.volume.meta.chunk_size))
        page, within = divmod(index, layout.PAGE_CHUNKS)
        with self._lock:
            entries = self.pages.get(page)
            if entries is None and not sent.key:
                return False  # zeros where the new map has nothing: nothing to record
            if entries is None:
                entries = self.pages[page] = [layout.ZERO_ENTRY] * layout.PAGE_CHUNKS
            entries[within] = Entry(stamp if sent.key else 0, self.seq)
        return sent.key is not None

    def fold_journal(self, replaced: Mapping[int, object]) -> None:
        """Store whole every chunk the old head's journal wrote to that is not replaced,
        so that the new head can name no journal."""
        for index, source in self.image.sources.items():
            if source.overlays and index not in replaced:
                self.put(index, self.image.chunk(index))

    def finish(self) -> Head:
        """Write the pages that name anything, then the head naming them (conditional on
        the head read at the start)."""
        named = []
        for page, entries in sorted(self.pages.items()):
            if any(e.stamp or e.seq for e in entries):
                stamp = self.fresh()
                self.volume.objects.put_page(page, stamp, entries)
                named.append((page, stamp))
        head = self.image.head
        new = Head(head.volume_id, head.generation + 1, self.epoch, self.seq, tuple(named),
                   (), head.written)
        self.volume.objects.put_head(self.volume.meta.head, new, self.image.head_version)
        return new


def commit_chunks(vol: Volume, epoch: int, chunks: Mapping[int, bytes | None],
                  progress: Callable[[int], None] | None = None) -> Head:
    """Store chunks (index -> contents; None or zeros: no object) and every chunk the
    head's journal touched, then write the head naming them; returns the new head."""
    commit = Commit(vol, epoch)
    commit.fold_journal(chunks)
    for index, plain in chunks.items():
        commit.put(index, plain)
        if progress is not None:
            progress(index)
    return commit.finish()
