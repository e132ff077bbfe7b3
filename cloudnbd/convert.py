"""Rewriting a whole volume in a new form, in place: `upgrade` (versions 1 and 2 to
version 3) and `rekey` (every object under a new master key).

Both write the new image beside the old one (offline.py R1), then switch with one
conditional write of volume.json (M1) naming a new head, then delete the old objects
(R4). Until the switch the old volume is untouched and complete, so an interrupted run
costs only garbage, and after it the new one is. The caller holds the volume's lease
(purpose "upgrade" or "rekey") throughout.

- upgrade writes its objects under the reserved stamp 1 (layout.UPGRADE_STAMP), so that a
  second run after an interruption finds what the first stored and sends only the rest:
  an object already there is adopted only if it holds exactly what would be written
  (an older cloudnbd may have written the chunk since), else a fresh stamp is used.
- rekey deletes the old objects at once, without a server's grace period: it exists for
  a master key that may have leaked with an old volume.json or a password, and every
  old object left is readable with it. A reader on another machine that meets one
  missing reads volume.json and the head again (reader.current); with the old key it
  then opens nothing, which is the point.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from cloudnbd import codec, freshness, layout
from cloudnbd.chunks import ChunkCodec
from cloudnbd.codec import KdfParams, VolumeKeys
from cloudnbd.errors import CloudnbdError, IntegrityError, UsageError
from cloudnbd.layout import Entry
from cloudnbd.objects import VolumeObjects
from cloudnbd.offline import ImageWriter, collect
from cloudnbd.pool import results
from cloudnbd.reader import Image, read_head
from cloudnbd.volume import LAYOUT_V3, Volume, VolumeMeta, new_slot

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class Converted:
    """What a conversion did: chunks written (or adopted from an interrupted run),
    objects and bytes deleted afterwards."""

    chunks: int
    deleted: int
    deleted_bytes: int


def upgrade(vol: Volume, epoch: int, threads: int = 8, progress: ProgressFn | None = None,
            deleting: ProgressFn | None = None) -> Converted:
    """Convert a volume of version 1 or 2 to version 3 in place: every chunk object
    chunks/<N> decoded and sealed again as chunks/<N>-<stamp 1>, map pages, the first
    head (generation 1), then volume.json version 3 naming it (the switch), then the old
    chunk objects deleted. progress follows the old chunks read, deleting the deletion."""
    meta = vol.meta
    if meta.version >= LAYOUT_V3:
        raise ValueError("the volume is version 3 already")
    stored = sorted(((i, info) for i, info in vol.stored_chunks() if i < meta.chunk_count),
                    key=lambda item: item[0])
    total = sum(info.size for _, info in stored)
    writer = ImageWriter(vol.objects, epoch, seq=1, reserved=layout.UPGRADE_STAMP)
    chunks = vol.chunks

    def convert(index: int) -> int:
        fetched = chunks.get(index)
        if fetched.plain is not None:
            writer.put_chunk(index, fetched.plain)
        return fetched.wire_bytes

    done = 0
    try:
        for _, received in results(threads, convert, (i for i, _ in stored)):
            done += received  # type: ignore[operator]
            if progress is not None:
                progress(done, total)
    except IntegrityError as exc:
        raise IntegrityError(f"{exc.message}; the upgrade stopped with the volume "
                             f"unchanged (still version {meta.version}): `cloudnbd "
                             f"verify` lists every damaged chunk") from None
    key = layout.head_key(layout.new_key_id())
    head = writer.write_head(key, 1, None, threads)

    def switch(current: VolumeMeta) -> VolumeMeta:
        if current.version >= LAYOUT_V3 or current.size < meta.size:
            raise CloudnbdError(f"{vol.store.description}: volume.json changed while "
                                f"upgrading (now version {current.version}, size "
                                f"{current.size}); nothing was switched, run the upgrade "
                                f"again")
        return replace(current, head=key)

    vol.update(switch)
    freshness.check_head(meta.volume_id, head.generation)
    deleted, deleted_bytes = collect(vol, writer.named(key), deleting)
    return Converted(len(writer.entries), deleted, deleted_bytes)


def finish_upgrade(vol: Volume, threads: int = 8, deleting: ProgressFn | None = None
                   ) -> Converted:
    """For a volume that is version 3 already: delete what an upgrade interrupted after
    its switch left (chunk objects of the old form), with any other garbage (R4)."""
    image = Image(vol, threads=threads)
    deleted, deleted_bytes = collect(vol, image.named, deleting)
    return Converted(0, deleted, deleted_bytes)


def rekey(vol: Volume, password: str, kdf: KdfParams | None, epoch: int, threads: int = 8,
          progress: ProgressFn | None = None, deleting: ProgressFn | None = None
          ) -> tuple[Converted, list[int]]:
    """Re-encrypt the whole volume under a new master key: every chunk of the image
    sealed again under it (the store's journal folded in), new map pages, a head under a
    new key, then volume.json (M1) naming that head with one key slot for password (the
    number of the slot that unlocked vol), the switch; then every object of the old key
    deleted. Returns what was done and the key slots dropped (their passwords open the
    old master key only, and are not known here to wrap the new one)."""
    meta = vol.meta
    snapshots = vol.objects.snapshot_names()
    if snapshots:
        raise UsageError(f"{vol.store.description}: the volume has {len(snapshots)} "
                         f"snapshot(s) ({', '.join(snapshots)}), sealed under the master "
                         f"key rekey replaces; export what you need of them "
                         f"(`cloudnbd export --snapshot`), then `cloudnbd snapshot delete` "
                         f"them first")
    head, version = read_head(vol)
    image = Image(vol, head, threads)
    new_keys = VolumeKeys(meta.volume_id, os.urandom(codec.MASTER_KEY_BYTES))
    objects = VolumeObjects(vol.store, ChunkCodec(new_keys, meta.chunk_size,
                                                  vol.chunk_codec.zstd_level))
    writer = ImageWriter(objects, epoch, image.max_seq + 1)

    def reseal(index: int) -> None:
        plain = image.chunk(index)
        if plain is None or not writer.put_chunk(index, plain):
            writer.zeroed(index)

    for index, seq in image.zeroed.items():  # R5: as they are
        writer.keep(index, Entry(0, seq))

    stored = image.stored()
    for done, _ in enumerate(results(threads, reseal, stored), 1):
        if progress is not None:
            progress(done * meta.chunk_size, len(stored) * meta.chunk_size)
    key = layout.head_key(layout.new_key_id())
    new_head = writer.write_head(key, head.generation + 1, None, threads)
    number = vol.slot if vol.slot is not None else 0
    slot = new_slot(number, password, new_keys.master_key, meta.volume_id, kdf)
    found = vol.store.stat(meta.head)
    if found is None or found.version != version:
        raise CloudnbdError(f"{vol.store.description}: the volume's head changed while "
                            f"rekeying, although this command holds the lease: another "
                            f"writer ignored it. Nothing was switched; run rekey again")

    dropped: list[int] = []

    def switch(current: VolumeMeta) -> VolumeMeta:
        dropped[:] = sorted(s.slot for s in current.slots if s.slot != number)
        if current.head != meta.head:
            raise CloudnbdError(f"{vol.store.description}: volume.json changed while "
                                f"rekeying (it names head {current.head}); nothing was "
                                f"switched, run rekey again")
        return replace(current, slots=(slot,), head=key)

    vol.update(switch, keys=new_keys)
    freshness.check_head(meta.volume_id, new_head.generation)
    deleted, deleted_bytes = collect(vol, writer.named(key), deleting)
    return Converted(len(writer.entries), deleted, deleted_bytes), dropped
