"""The image a version-3 volume's head names, read straight from the store.

For export, verify, info and the offline commands that rewrite a volume: no server, no
cache. One head is read once, and every object it names is immutable, so the image is
one point in time (the head's FLUSH, and perhaps later writes a server folded early, as
a power cut could leave them: never a torn sector) whatever a server does meanwhile. A
named object that is missing or does not authenticate is an IntegrityError naming it,
never zeros.

A server deletes garbage only a grace period after it was unnamed, and the offline
commands delete what they unnamed at once (docs/design.md, "Offline commands on version
3"): a reader that meets a missing object reads the head again and, if it changed,
starts over (current(), docs/format.md "Garbage").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import TypeVar

from cloudnbd import freshness, layout
from cloudnbd.backends.base import ObjectInfo
from cloudnbd.errors import CloudnbdError, IntegrityError
from cloudnbd.layout import ChunkSource, Entry, Head, ImageBuilder, Record
from cloudnbd.lease import LEASE_KEY
from cloudnbd.pool import parallel
from cloudnbd.volume import METADATA_KEY, Volume, own_objects

log = logging.getLogger(__name__)

T = TypeVar("T")
#: times a reader starts over because the head changed under it (a busy server)
_ATTEMPTS = 5

#: told of a named object that is missing or damaged: its key, and what is wrong
DamageFn = Callable[[str, str], None]


def read_head(vol: Volume) -> tuple[Head, str]:
    """The volume's head and its version; IntegrityError if it is older than the newest
    this machine has seen (a rolled-back head, freshness.check_head), which it remembers."""
    head, version = vol.objects.get_head(vol.meta.head)
    freshness.check_head(vol.meta.volume_id, head.generation)
    return head, version


def current(vol: Volume, work: Callable[[Head], T]) -> T:
    """work(head) for the volume's current head; if it fails on a missing or damaged
    object and the head has changed meanwhile (a server collected what an older head
    named), again with the new head (docs/format.md, "Garbage")."""
    head, version = read_head(vol)
    for _ in range(_ATTEMPTS):
        try:
            return work(head)
        except IntegrityError:
            now, now_version = read_head(vol)
            if now_version == version:
                raise
            log.info("the head changed while reading (generation %d -> %d); starting "
                     "over", head.generation, now.generation)
            head, version = now, now_version
    raise CloudnbdError(f"{vol.store.description}: the volume's head keeps changing "
                        f"while it is read (a server is busy writing); try again")


class Image:
    """The chunks of a volume as one head names them.

    size: a snapshot's image is read at the size it was taken at.
    With on_damage, a map page or journal object that is missing or damaged (an
    IntegrityError; a store out of reach still raises) is reported
    to it and left out instead of raising (verify, info): the image is then incomplete
    (`complete` False), and must not be read or rewritten, only reported on.
    """

    def __init__(self, vol: Volume, head: Head | None = None, threads: int = 8,
                 on_damage: DamageFn | None = None, size: int | None = None) -> None:
        self.volume = vol
        #: the image's size: the volume's, or a snapshot's (its size when taken)
        self.size = vol.meta.size if size is None else size
        self.objects = vol.objects
        #: the version of the head read here (None: the caller gave the head)
        self.head_version: str | None = None
        if head is None:
            head, self.head_version = read_head(vol)
        self.head = head
        self.complete = True
        #: every key the head names (layout.named_keys), its own key included
        self.named: set[str] = {vol.meta.head}
        #: the highest sequence number the head holds: its seq, its journal records',
        #: its map entries'. A writer of a new head numbers past it (E6).
        self.max_seq = max([head.seq, *(ref.last_seq for ref in head.journal)])
        builder = ImageBuilder(vol.meta.chunk_size, self.size)
        self.wire_bytes = 0

        def damaged(key: str, exc: BaseException) -> None:
            if on_damage is None or not isinstance(exc, IntegrityError):
                raise exc  # a store that cannot be reached is no damage
            self.complete = False
            self.named.add(key)
            on_damage(key, exc.message)

        for (page, stamp), found in parallel(
                threads, lambda p: self.objects.get_page(*p), head.pages):
            if isinstance(found, BaseException):
                damaged(layout.map_key(page, stamp), found)
                continue
            entries: list[Entry] = found  # type: ignore[assignment]
            builder.set_page(page, entries)
            self.max_seq = max(self.max_seq, max(e.seq for e in entries))
            self.named |= layout.named_keys(replace(head, pages=((page, stamp),),
                                                    journal=()), {page: entries}, {})
        for ref, found in parallel(
                threads, lambda r: self.objects.get_journal(r.stamp, r), head.journal):
            if isinstance(found, BaseException):
                damaged(layout.journal_key(ref.stamp), found)
                continue
            records: list[Record]
            records, received = found  # type: ignore[misc]
            self.wire_bytes += received
            builder.apply(records)
            self.named |= layout.named_keys(replace(head, pages=(), journal=(ref,)), {},
                                            {ref.stamp: records})
        self.chunk_count = builder.chunk_count
        # a chunk folded into zeros (stamp 0, no writes over it) is plain zeros; its seq
        # is kept for a writer that carries the map over (offline.carry)
        self.sources: dict[int, ChunkSource] = {}
        #: chunks made zero (trimmed, zeroed) and the seq that did it
        self.zeroed: dict[int, int] = {}
        for index, source in builder.chunks():
            if source.stamp or source.overlays:
                self.sources[index] = source
            else:
                self.zeroed[index] = source.seq

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

    def named_chunks(self) -> list[tuple[int, int]]:
        """(index, stamp) of every chunk object the head names, ascending."""
        found = []
        for key in self.named:
            parsed = layout.parse_key(key)
            if parsed is not None and parsed[0] == layout.Kind.CHUNK:
                found.append(parsed[1:])
        return sorted(found)

    def stray(self) -> list[int]:
        """Chunks past the end of the volume that the head names: never read, but a grow
        would bring their old data back (a shrink cut short, or a bug)."""
        return sorted({index for index, _ in self.named_chunks()
                       if index >= self.chunk_count})

    def garbage(self) -> list[ObjectInfo] | None:
        """The volume's objects neither the head nor a snapshot needs (garbage(); needs
        `complete`)."""
        if not self.complete:
            raise ValueError("garbage of an incomplete image would count live objects")
        return garbage(self.volume, own_objects(self.volume.store), self.named)


def garbage(vol: Volume, listing: Iterable[ObjectInfo], named: set[str]
            ) -> list[ObjectInfo] | None:
    """The objects of listing (volume.own_objects) that neither named (every key the
    current head names) nor any snapshot needs (VolumeObjects.kept_by_snapshots): what
    may be collected. None if a snapshot cannot be read (what it needs is unknown)."""
    try:
        kept = vol.objects.kept_by_snapshots()
    except IntegrityError as exc:
        log.warning("%s", exc.message)
        return None
    return unnamed(listing, named | kept)


def unnamed(listing: Iterable[ObjectInfo], named: set[str]) -> list[ObjectInfo]:
    """The objects of listing (the volume's own: volume.own_objects) that are neither
    volume.json, the lease, a snapshot, nor named (named holds every key the current head
    names, its own included, and every key a snapshot needs: VolumeObjects.
    kept_by_snapshots): garbage of compaction, interrupted commands and upgrades, old
    heads, and chunk objects of versions 1 and 2."""
    keep = named | {METADATA_KEY, LEASE_KEY}
    return [info for info in listing
            if info.key not in keep and layout.snapshot_name(info.key) is None]
