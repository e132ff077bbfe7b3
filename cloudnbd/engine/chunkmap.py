"""Which object holds each chunk: the map of a version-3 volume, in memory.

For every chunk, an Entry(stamp, seq): the chunk's contents up to sequence number `seq`
are the object chunks/<index>-<stamp> (stamp 0: no object, zeros). The head's map pages
are this table cut in pages of layout.PAGE_CHUNKS chunks; the engine keeps the whole
table, updates it as commits name new chunk objects, and writes the pages that changed
at a checkpoint (changed_pages).

It is compact, as it covers the whole volume: one byte per chunk always (whether the chunk
has an entry), and 16 bytes per entry in pages allocated only where some chunk has one.
A 1 TiB volume of 4 MiB chunks costs 256 KiB, plus 4 MiB when every chunk is stored.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from cloudnbd.layout import PAGE_CHUNKS, Entry

_ENTRY = struct.Struct(">QQ")
_SEQ = struct.Struct(">Q")  # an entry's second half
_ZERO = Entry(0, 0)


class ChunkMap:
    """Per chunk index: its Entry (Entry(0, 0) when nothing is stored)."""

    def __init__(self, count: int) -> None:
        self._present = bytearray(count)
        self._pages: dict[int, bytearray] = {}
        self.changed_pages: set[int] = set()
        self.max_seq = 0  # the highest seq of any entry (E6: later writes number above)

    @classmethod
    def from_pages(cls, count: int, pages: Iterable[tuple[int, list[Entry]]]) -> ChunkMap:
        """The map of a volume of count chunks from its head's pages; entries past the end
        (a shrink cut short) are ignored. No page counts as changed."""
        table = cls(count)
        for page, entries in pages:
            base = page * PAGE_CHUNKS
            for offset, entry in enumerate(entries):
                if (entry.stamp or entry.seq) and base + offset < count:
                    table.set(base + offset, entry)
        table.changed_pages.clear()
        return table

    def __len__(self) -> int:
        return len(self._present)

    def grow(self, count: int) -> None:
        """The volume grew to count chunks; the new ones are zeros."""
        if count > len(self._present):
            self._present.extend(bytes(count - len(self._present)))

    def has(self, index: int) -> bool:
        """Whether chunk index has an object (else it reads as zeros)."""
        return bool(self._present[index])

    def get(self, index: int) -> Entry:
        page, within = divmod(index, PAGE_CHUNKS)
        buf = self._pages.get(page)
        if buf is None:
            return _ZERO
        return Entry(*_ENTRY.unpack_from(buf, within * _ENTRY.size))

    def version(self, index: int) -> str | None:
        """The chunk's object as a version token (the clean cache records it, C6)."""
        return f"{self.get(index).stamp:016x}" if self._present[index] else None

    def set(self, index: int, entry: Entry) -> None:
        """Chunk index is now entry (stamp 0: zeros)."""
        page, within = divmod(index, PAGE_CHUNKS)
        self.changed_pages.add(page)
        buf = self._pages.get(page)
        if buf is None:
            buf = self._pages[page] = bytearray(PAGE_CHUNKS * _ENTRY.size)
        # a zeros entry keeps its seq too: writes up to it are folded into the zeros
        _ENTRY.pack_into(buf, within * _ENTRY.size, entry.stamp, entry.seq)
        self.max_seq = max(self.max_seq, entry.seq)
        self._present[index] = 1 if entry.stamp else 0

    def seq(self, index: int) -> int:
        """Up to which sequence number the chunk's object (or zeros) is current (every
        write lays its pieces over the map by it: no Entry is built)."""
        page, within = divmod(index, PAGE_CHUNKS)
        buf = self._pages.get(page)
        return 0 if buf is None else _SEQ.unpack_from(buf, within * _ENTRY.size + 8)[0]

    def count(self) -> int:
        """How many chunks have an object."""
        return len(self._present) - self._present.count(0)

    def page_entries(self, page: int) -> list[Entry]:
        """The entries of map page `page` (PAGE_CHUNKS of them)."""
        base = page * PAGE_CHUNKS
        return [self.get(i) if i < len(self) else _ZERO
                for i in range(base, base + PAGE_CHUNKS)]

    def page_in_use(self, page: int) -> bool:
        """Whether some entry of the page is not Entry(0, 0) (else the head names no
        page). A zeros entry counts: its seq keeps older journal writes from coming back
        (docs/format.md, map pages)."""
        base = page * PAGE_CHUNKS
        if any(self._present[base:base + PAGE_CHUNKS]):
            return True
        buf = self._pages.get(page)
        return buf is not None and any(buf)

    def stamps(self) -> Iterator[tuple[int, int]]:
        """(index, stamp) of every chunk that has an object."""
        for page in sorted(self._pages):
            base = page * PAGE_CHUNKS
            for within in range(PAGE_CHUNKS):
                index = base + within
                if index < len(self) and self._present[index]:
                    yield index, _ENTRY.unpack_from(self._pages[page],
                                                    within * _ENTRY.size)[0]
