"""Changing a version-3 volume without a server: new chunk contents committed under a
new head (import, shrink, upgrade, rekey, and tests that play another writer).

The caller holds the volume's lease (its epoch makes the stamps unique). The commit is
one conditional replacement of the head (W2), written after every object it names:
a crash before it leaves only garbage, and a server that took the volume in between
makes it fail (PreconditionFailed) instead of being overwritten. What the head's
journal held is folded first (every chunk it wrote to is stored whole), so the new head
names no journal object and a later writer's sequence numbers stay above all of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from cloudnbd import layout
from cloudnbd.layout import Entry, Head
from cloudnbd.reader import Image
from cloudnbd.volume import Volume


def commit_chunks(vol: Volume, epoch: int, chunks: Mapping[int, bytes | None],
                  progress: Callable[[int], None] | None = None) -> Head:
    """Store chunks (index -> contents; None or zeros: no object) and every chunk the
    head's journal touched, then write the head naming them; returns the new head."""
    objects = vol.objects
    image = Image(vol)
    head = image.head
    pages = {page: objects.get_page(page, stamp) for page, stamp in head.pages}
    seq = max([head.seq, *(r.last_seq for r in head.journal)]) + 1
    counter = 0

    def fresh() -> int:
        nonlocal counter
        counter += 1
        return layout.stamp(epoch, counter)

    folded = {i: image.chunk(i) for i, s in image.sources.items()
              if s.overlays and i not in chunks}
    for index, plain in {**folded, **chunks}.items():
        stamp = fresh()
        sent = objects.put_chunk(index, stamp, plain or bytes(vol.meta.chunk_size))
        page, within = divmod(index, layout.PAGE_CHUNKS)
        entries = pages.setdefault(page, [layout.ZERO_ENTRY] * layout.PAGE_CHUNKS)
        entries[within] = Entry(stamp if sent.key else 0, seq)
        if progress is not None:
            progress(index)
    named = []
    for page, entries in sorted(pages.items()):
        if any(e.stamp or e.seq for e in entries):
            stamp = fresh()
            objects.put_page(page, stamp, entries)
            named.append((page, stamp))
    new = Head(head.volume_id, head.generation + 1, epoch, seq, tuple(named), (),
               head.written)
    objects.put_head(vol.meta.head, new, image.head_version)
    return new
