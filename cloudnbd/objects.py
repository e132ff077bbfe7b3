"""The objects of a version-3 volume in its store, by name: chunk objects, map pages,
journal objects and the head (docs/format.md, "Version 3").

The one place that turns layout.py's pure encoders into requests. Every object but the
head is created once under a fresh stamp, with create-if-absent, and never replaced
(W1): a late or repeated request can only fail, never overwrite anything. The head is
replaced only conditionally on the version its writer last saw (W2): a writer that lost
it learns so from PreconditionFailed. A named object that is missing is damage
(IntegrityError naming it), never zeros.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cloudnbd import codec, layout
from cloudnbd.backends.base import ObjectInfo, ObjectStore
from cloudnbd.chunks import ChunkCodec, Pacer
from cloudnbd.errors import IntegrityError, ObjectNotFound, PreconditionFailed, UsageError
from cloudnbd.layout import Entry, Head, JournalBuilder, JournalRef, Record, Snapshot
from cloudnbd.pool import results

#: What one LIST of the snapshot objects says: (key, size, store version) of each, in key
#: order. Equal answers mean no snapshot was created, deleted or replaced in between.
SnapshotMarks = tuple[tuple[str, int, str], ...]


@dataclass(frozen=True)
class Sent:
    """What a create sent: the object's key (None: nothing was stored) and its bytes."""

    key: str | None
    wire_bytes: int


class VolumeObjects:
    """The version-3 objects of one volume, over the store rooted at the volume."""

    def __init__(self, store: ObjectStore, chunk_codec: ChunkCodec) -> None:
        self.store = store
        self.codec = chunk_codec
        self.keys = chunk_codec.keys

    # -- chunks ------------------------------------------------------------------------------
    def put_chunk(self, index: int, stamp: int, plain: bytes | bytearray | memoryview,
                  pacer: Pacer | None = None) -> Sent:
        """Create chunk index's object under stamp; a chunk of zeros is not stored (its
        map entry or CHUNK record says stamp 0)."""
        if codec.is_zero(plain):
            return Sent(None, 0)
        blob = layout.encode_chunk(self.keys, index, stamp, plain, self.codec.zstd_level)
        if pacer is not None:
            pacer.acquire(len(blob))
        key = layout.chunk_key(index, stamp)
        self.store.put_if(key, blob, None)
        return Sent(key, len(blob))

    def get_chunk(self, index: int, stamp: int) -> tuple[bytes | None, int]:
        """The plain chunk named (None for stamp 0: zeros) and the bytes received."""
        if not stamp:
            return None, 0
        blob = self._get(layout.chunk_key(index, stamp), f"chunk {index}")
        return layout.decode_chunk(self.keys, index, stamp, blob, self.codec.chunk_size), \
            len(blob)

    # -- journal objects ---------------------------------------------------------------------
    def put_journal(self, stamp: int, builder: JournalBuilder) -> Sent:
        blob = builder.seal(self.keys, stamp, self.codec.zstd_level)
        key = layout.journal_key(stamp)
        self.store.put_if(key, blob, None)
        return Sent(key, len(blob))

    def get_journal(self, stamp: int, ref: JournalRef | None = None
                    ) -> tuple[list[Record], int]:
        """The records of journal/<stamp> and the bytes received; with ref (the head's
        entry for it), IntegrityError also if its size or seq span differ from ref's."""
        blob = self._get(layout.journal_key(stamp), "journal object")
        return layout.decode_journal(self.keys, stamp, blob, ref), len(blob)

    # -- map pages ---------------------------------------------------------------------------
    def put_page(self, page: int, stamp: int, entries: Sequence[Entry]) -> Sent:
        blob = layout.encode_map_page(self.keys, page, stamp, entries)
        key = layout.map_key(page, stamp)
        self.store.put_if(key, blob, None)
        return Sent(key, len(blob))

    def get_page(self, page: int, stamp: int) -> list[Entry]:
        blob = self._get(layout.map_key(page, stamp), f"map page {page}")
        return layout.decode_map_page(self.keys, page, stamp, blob)

    # -- the head ----------------------------------------------------------------------------
    def get_head(self, key: str) -> tuple[Head, str]:
        """The head and its version. The version is read first: were the head replaced in
        between, a write conditional on it fails instead of overwriting what we did not
        see."""
        info = self.store.stat(key)
        if info is None:
            raise IntegrityError(f"{self.store.description}: the volume's head ({key}) is "
                                 f"missing")
        blob = self._get(key, "head")
        return layout.decode_head(self.keys, blob), info.version

    def holds_head(self, key: str, head: Head) -> bool:
        """Whether the store's head is exactly head (its encoding is deterministic)."""
        try:
            return self.store.get(key) == layout.encode_head(self.keys, head)
        except ObjectNotFound:
            return False

    def put_head(self, key: str, head: Head, expected: str | None) -> str:
        """Replace the head if it is still at version expected (None: create it); its new
        version. PreconditionFailed: another writer replaced it (we are displaced)."""
        return self.store.put_if(key, layout.encode_head(self.keys, head), expected)

    def head_size(self, head: Head) -> int:
        """The bytes put_head sends for head (its encoding is deterministic)."""
        return len(layout.encode_head(self.keys, head))

    # -- snapshots ---------------------------------------------------------------------------
    def put_snapshot(self, snap: Snapshot) -> int:
        """Create the snapshot's object (never replaced: W1); its bytes. UsageError if a
        snapshot of that name exists."""
        blob = layout.encode_snapshot(self.keys, snap)
        try:
            self.store.put_if(layout.snapshot_key(snap.name), blob, None)
        except PreconditionFailed:
            raise UsageError(f"{self.store.description}: a snapshot named {snap.name} "
                             f"exists already") from None
        return len(blob)

    def get_snapshot(self, name: str) -> Snapshot:
        """The snapshot named name (authenticated, S1-S2); UsageError if there is none."""
        found = self.find_snapshot(name)
        if found is None:
            raise UsageError(f"{self.store.description}: no snapshot named {name}")
        return found

    def find_snapshot(self, name: str) -> Snapshot | None:
        """The snapshot named name, None if there is none; IntegrityError if its object
        does not authenticate as that snapshot of this volume."""
        try:
            blob = self.store.get(layout.snapshot_key(name))
        except ObjectNotFound:
            return None
        return layout.decode_snapshot(self.keys, name, blob)

    def snapshot_names(self, marks: SnapshotMarks | None = None) -> list[str]:
        """The names of the volume's snapshots, in key order (unauthenticated: each is
        checked when it is read): from marks if given, else from a listing."""
        return [name for key, _, _ in (marks if marks is not None else self.snapshot_marks())
                if (name := layout.snapshot_name(key)) is not None]

    def snapshot_marks(self) -> SnapshotMarks:
        """Key, size and store version of every snapshot object, in key order: one LIST
        whose answer changes whenever a snapshot is created, deleted or replaced."""
        return tuple((info.key, info.size, info.version)
                     for info in self.store.list(layout.SNAPSHOT_PREFIX)
                     if layout.snapshot_name(info.key) is not None)

    def delete_snapshot(self, name: str) -> None:
        self.store.delete(layout.snapshot_key(name))

    def needed_by(self, head: Head, threads: int = 8) -> set[str]:
        """Every key the image head names (layout.named_keys: its map pages, its journal
        objects, the chunk objects they name); IntegrityError if one of its pages or
        journal objects is missing or damaged, since what it names is then unknown."""
        pages = dict(results(threads, lambda p: self.get_page(*p), head.pages))
        journals = {ref.stamp: found[0] for ref, found in results(
            threads, lambda r: self.get_journal(r.stamp, r), head.journal)}
        by_page = {page: pages[(page, stamp)] for page, stamp in head.pages}
        return layout.named_keys(head, by_page, journals)  # type: ignore[arg-type]

    def kept_by_snapshots(self, threads: int = 8, marks: SnapshotMarks | None = None
                          ) -> set[str]:
        """Every key some snapshot needs, the snapshots' own keys included (S4): garbage
        collection must delete none of them. IntegrityError if a snapshot, or an object
        it names, cannot be read: nothing may be collected then, as what it needs is
        unknown (a damaged snapshot stops collection until it is deleted). marks, if
        given, is the snapshot listing to use (snapshot_marks), else one is made."""
        kept: set[str] = set()
        for name in self.snapshot_names(marks):
            snap = self.find_snapshot(name)
            if snap is not None:  # else deleted since the listing
                kept.add(layout.snapshot_key(name))
                kept |= self.needed_by(snap.head, threads)
        return kept

    # -- everything --------------------------------------------------------------------------
    def list_own(self) -> Iterator[ObjectInfo]:
        """Every version-3 object of the volume but the head (for garbage collection)."""
        for prefix in ("chunks/", "map/", "journal/"):
            for info in self.store.list(prefix):
                if layout.parse_key(info.key) is not None:
                    yield info

    def _get(self, key: str, what: str) -> bytes:
        try:
            return self.store.get(key)
        except ObjectNotFound:
            raise IntegrityError(f"{self.store.description}: {what}: the object {key} the "
                                 f"head names is missing") from None
