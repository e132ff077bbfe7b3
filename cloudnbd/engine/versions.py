"""What the store holds for each chunk: no object, or an object at a known version.

The engine writes every chunk object conditionally on the version it last saw (fencing,
docs/design.md), so it must know the version of every stored chunk: from the listing at
open, then from each upload's answer. The front keeps this for the whole volume, so it
is compact: one byte per chunk always (0 means no object, else how the token is
packed), and 16 bytes per stored chunk, in pages of PAGE chunks allocated only where
some chunk is stored, for the two token forms seen in practice: an S3 ETag that is a
quoted MD5 hex digest, and a GCS generation number. Any other token (multipart ETags,
other stores, the file backend's) is kept as a string in a dict.

A 1 TiB volume of 4 MiB chunks costs 256 KiB plus 4 MiB when full; a sparse one, the
256 KiB.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from cloudnbd.volume import Volume

PAGE = 4096  # chunks per page of packed tokens
_SLOT = 16

ABSENT = 0
_QUOTED_MD5 = 1  # '"<32 hex>"', an S3 ETag
_NUMBER = 2  # a decimal integer below 2**128, a GCS generation
_OTHER = 3  # any other string, kept in a dict

_MD5_ETAG = re.compile(r'"[0-9a-f]{32}"')


class ChunkVersions:
    """Per chunk index: None (no object in the store) or the object's version token."""

    def __init__(self, count: int) -> None:
        self._kind = bytearray(count)
        self._pages: dict[int, bytearray] = {}
        self._other: dict[int, str] = {}

    @classmethod
    def from_listing(cls, count: int, stored: Iterable[tuple[int, str]]) -> ChunkVersions:
        """The table for a volume of count chunks, from (index, version) of a listing;
        indexes past the end (left by a shrink cut short) are ignored."""
        table = cls(count)
        for index, version in stored:
            if index < count:
                table.record(index, version)
        return table

    @classmethod
    def of_volume(cls, volume: Volume) -> ChunkVersions:
        """The table of a volume, from one listing of its chunk objects."""
        return cls.from_listing(volume.meta.chunk_count,
                                ((index, info.version) for index, info in
                                 volume.stored_chunks()))

    def __len__(self) -> int:
        return len(self._kind)

    def grow(self, count: int) -> None:
        """The volume grew to count chunks; the new ones hold no object."""
        if count > len(self._kind):
            self._kind.extend(bytes(count - len(self._kind)))

    def has(self, index: int) -> bool:
        """Whether the store holds an object for chunk index."""
        return self._kind[index] != ABSENT

    def version(self, index: int) -> str | None:
        """The version token of chunk index's object, or None if there is none."""
        kind = self._kind[index]
        if kind == ABSENT:
            return None
        if kind == _OTHER:
            return self._other[index]
        packed = bytes(self._slot(index))
        if kind == _QUOTED_MD5:
            return f'"{packed.hex()}"'
        return str(int.from_bytes(packed, "big"))

    def record(self, index: int, version: str | None) -> None:
        """Chunk index's object is now at version (None: it was deleted)."""
        self._other.pop(index, None)
        if version is None:
            self._kind[index] = ABSENT
            return
        if _MD5_ETAG.fullmatch(version):
            self._slot(index, create=True)[:] = bytes.fromhex(version[1:-1])
            self._kind[index] = _QUOTED_MD5
        elif (version.isascii() and version.isdigit() and version == str(int(version))
              and int(version) < 2**128):
            self._slot(index, create=True)[:] = int(version).to_bytes(_SLOT, "big")
            self._kind[index] = _NUMBER
        else:
            self._other[index] = version
            self._kind[index] = _OTHER

    def count(self) -> int:
        """How many chunks the store holds."""
        return len(self._kind) - self._kind.count(ABSENT)

    def _slot(self, index: int, create: bool = False) -> memoryview:
        page_number, within = divmod(index, PAGE)
        page = self._pages.get(page_number)
        if page is None:
            if not create:
                raise KeyError(index)
            page = self._pages[page_number] = bytearray(PAGE * _SLOT)
        return memoryview(page)[within * _SLOT:(within + 1) * _SLOT]
