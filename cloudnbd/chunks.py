"""A volume's chunks in an object store: get, write and list them by index.

The one place that knows a chunk's key, how a chunk becomes an object (codec: zstd and
AES-GCM, bound to the volume and the index), and the rule that a chunk holding only
zeros is not stored but deleted. It wraps an ObjectStore as S3QL's compression and
encryption layer wraps its raw backends; the volume layer, the bulk operations
(transfer.py) and the uploader and fetcher processes all go through it.

Format versions 1 and 2 only (read by export, verify and upgrade; format 3's chunk
objects are objects.py's). Every write is conditional on the version of the object the
caller last saw: `write` takes that version and returns the new one. A write that meets
another version is refused, unless the caller passes `on_conflict`, which decides
whether writing over it is right and is told the version found.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from cloudnbd import codec
from cloudnbd.backends.base import ObjectInfo, ObjectStore
from cloudnbd.codec import VolumeKeys
from cloudnbd.errors import ObjectNotFound, PreconditionFailed

log = logging.getLogger(__name__)

CHUNK_PREFIX = "chunks/"
_HEX = frozenset("0123456789abcdef")


def chunk_key(index: int) -> str:
    """Object key of chunk index."""
    return f"{CHUNK_PREFIX}{index:016x}"


def chunk_index(key: str) -> int | None:
    """Inverse of chunk_key, or None for keys that are not chunk objects: exactly 16
    lower-case hex digits, as int() alone would also take 'A', '_', '+' or spaces, and
    claim a key that is not the volume's."""
    if not key.startswith(CHUNK_PREFIX):
        return None
    tail = key[len(CHUNK_PREFIX):]
    if len(tail) != 16 or not _HEX.issuperset(tail):
        return None
    return int(tail, 16)


def stored_chunks(store: ObjectStore) -> Iterator[tuple[int, ObjectInfo]]:
    """(index, object size and version) of every chunk stored at store, from a listing;
    other keys under chunks/ are not the volume's and are skipped."""
    for info in store.list(CHUNK_PREFIX):
        index = chunk_index(info.key)
        if index is not None:
            yield index, info


@dataclass(frozen=True)
class ChunkCodec:
    """How a volume's chunks become objects: its keys, chunk size and zstd level. Sent
    to worker processes through their pipe (never argv or the environment)."""

    keys: VolumeKeys = field(repr=False)
    chunk_size: int
    zstd_level: int = codec.DEFAULT_ZSTD_LEVEL

    def encode(self, index: int, plain: bytes | bytearray | memoryview) -> bytearray:
        return codec.encode_chunk(self.keys, index, plain, self.zstd_level)

    def decode(self, index: int, blob: bytes) -> bytes:
        """The plain chunk; IntegrityError if the object is not authentic."""
        return codec.decode_chunk(self.keys, index, blob, self.chunk_size)


class Pacer(Protocol):
    """Something that spaces uploads out (workers.RateLimiter)."""

    def acquire(self, nbytes: int) -> None: ...


@dataclass(frozen=True)
class Fetched:
    """A chunk as the store holds it: its plain bytes (None: no object, all zeros), the
    object's version, and the bytes received."""

    plain: bytes | None
    version: str | None
    wire_bytes: int


@dataclass(frozen=True)
class Written:
    """What a write did: the object's new version (None: the chunk is not stored), the
    bytes sent, and whether it wrote over a version it did not expect (F2)."""

    version: str | None
    wire_bytes: int = 0
    fenced: bool = False

    @property
    def stored(self) -> bool:
        return self.version is not None


class ChunkStore:
    """The chunks of one volume, over the store rooted at the volume."""

    def __init__(self, store: ObjectStore, chunk_codec: ChunkCodec) -> None:
        self.store = store
        self.codec = chunk_codec

    def list(self) -> Iterator[tuple[int, ObjectInfo]]:
        """(index, object size and version) of every stored chunk (stored_chunks)."""
        return stored_chunks(self.store)

    def get(self, index: int) -> Fetched:
        """Chunk index as stored now; IntegrityError if its object is not authentic."""
        try:
            blob, version = self.store.get_with_version(chunk_key(index))
        except ObjectNotFound:
            return Fetched(None, None, 0)
        return Fetched(self.codec.decode(index, blob), version, len(blob))

    def write(self, index: int, plain: bytes | bytearray | memoryview,
              expected: str | None, on_conflict: Callable[[str | None], None] | None = None,
              pacer: Pacer | None = None) -> Written:
        """Store plain as chunk index, or delete its object if plain is all zeros, only if
        the object is still at version expected (None: there is none).

        If it is not, PreconditionFailed, unless on_conflict is given: it is called with
        the version found (it raises to refuse), and the write is made again conditional
        on that version (F2)."""
        if codec.is_zero(plain):
            return self._write(index, None, expected, on_conflict)
        blob = self.codec.encode(index, plain)
        if pacer is not None:
            pacer.acquire(len(blob))
        return self._write(index, blob, expected, on_conflict)

    def replace(self, index: int, plain: bytes | bytearray | memoryview) -> Written:
        """Write chunk index over whatever version it has now: for commands that hold the
        volume's lease (import, shrink) and tests. Still conditional, on the version just
        read, so that a concurrent writer makes it fail instead of being overwritten."""
        found = self.store.stat(chunk_key(index))
        return self.write(index, plain, None if found is None else found.version)

    def _write(self, index: int, blob: bytearray | None, expected: str | None,
               on_conflict: Callable[[str | None], None] | None) -> Written:
        try:
            return self._attempt(index, blob, expected, fenced=False)
        except PreconditionFailed:
            if on_conflict is None:
                raise
            found = self.store.stat(chunk_key(index))
            current = None if found is None else found.version
            on_conflict(current)
            return self._attempt(index, blob, current, fenced=True)

    def _attempt(self, index: int, blob: bytearray | None, expected: str | None,
                 fenced: bool) -> Written:
        if blob is None:
            if expected is not None:  # None: there is no object to delete
                self.store.delete_if(chunk_key(index), expected)
            return Written(None, 0, fenced)
        version = self.store.put_if(chunk_key(index), blob, expected)
        return Written(version, len(blob), fenced)
