"""The image a version-3 volume's head names, read straight from the store.

For export, verify and tests: no server, no cache. One head is read once, and every
object it names is immutable, so the image is one point in time (the head's FLUSH, and
perhaps later writes a server folded early, as a power cut could leave them: never a
torn sector) whatever a server does meanwhile. A named object that is missing or does
not authenticate is an IntegrityError naming it, never zeros.
"""

from __future__ import annotations

from collections.abc import Iterator

from cloudnbd import layout
from cloudnbd.layout import ChunkSource, Head, ImageBuilder
from cloudnbd.volume import Volume


class Image:
    """The chunks of a volume as one head names them."""

    def __init__(self, vol: Volume, head: Head | None = None) -> None:
        self.volume = vol
        self.objects = vol.objects
        if head is None:
            head, self.head_version = self.objects.get_head(vol.meta.head)
        self.head = head
        builder = ImageBuilder(vol.meta.chunk_size, vol.meta.size)
        self.wire_bytes = 0
        for page, stamp in head.pages:
            builder.set_page(page, self.objects.get_page(page, stamp))
        for ref in head.journal:
            records, received = self.objects.get_journal(ref.stamp)
            self.wire_bytes += received
            builder.apply(records)
        # a chunk folded into zeros (stamp 0, no writes over it) is plain zeros
        self.sources: dict[int, ChunkSource] = {
            index: source for index, source in builder.chunks()
            if source.stamp or source.overlays}

    def stored(self) -> list[int]:
        """The chunks that are not plain zeros, ascending."""
        return sorted(self.sources)

    def chunk(self, index: int) -> bytes | None:
        """Chunk index's contents (None: zeros); IntegrityError if an object it needs is
        missing or not authentic."""
        source = self.sources.get(index)
        if source is None:
            return None
        base, _ = self.objects.get_chunk(index, source.stamp)
        return layout.materialize(source, base, self.volume.meta.chunk_size)

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        for index in self.stored():
            plain = self.chunk(index)
            if plain is not None:
                yield index, plain
