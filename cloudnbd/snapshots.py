"""Snapshots of a version-3 volume without a server: take one of the current head, list
them with what each keeps alive, delete one, prune by a retention policy, roll the volume
back to one (docs/format.md, "Snapshots"; docs/design.md, "Snapshots").

A snapshot is a kept, authenticated copy of a head: it shares every object with the
volume, and garbage collection (offline.collect, the engine's) keeps what any snapshot
needs (S4). Taking one of a served volume goes through its server (service.py), which
FLUSHes first; everything here runs on a closed volume under its lease, except delete,
which may run beside a server (deleting only makes garbage; the server collects it).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from cloudnbd import layout
from cloudnbd.layout import Head, Snapshot
from cloudnbd.offline import ImageWriter, carry, collect
from cloudnbd.reader import Image, read_head
from cloudnbd.transfer import switch
from cloudnbd.volume import Volume, own_objects

log = logging.getLogger(__name__)


def create(vol: Volume, name: str) -> Snapshot:
    """Snapshot name of the volume's current head, at its current size. The caller holds
    the lease (no server writes), so the head is the last commit."""
    layout.snapshot_key(name)  # a bad name is refused before anything is read
    head, _ = read_head(vol)
    snap = Snapshot(name, layout.utc_now(), vol.meta.size, head)
    vol.objects.put_snapshot(snap)
    return snap


@dataclass(frozen=True)
class Listed:
    """A snapshot, the bytes of every object its image needs, and of those only it keeps
    alive (neither the current head nor another snapshot needs them): what deleting it
    frees."""

    snapshot: Snapshot
    needed_bytes: int
    alone_bytes: int


def list_all(vol: Volume, threads: int = 8) -> list[Listed]:
    """Every snapshot of the volume, oldest first; IntegrityError if one cannot be read.
    Costs a listing, and reading each snapshot's map pages and journal objects."""
    sizes = {info.key: info.size for info in own_objects(vol.store)}
    head, _ = read_head(vol)
    current = vol.objects.needed_by(head, threads) | {vol.meta.head}
    snaps = [vol.objects.get_snapshot(name) for name in vol.objects.snapshot_names()]
    needs = [vol.objects.needed_by(s.head, threads) | {layout.snapshot_key(s.name)}
             for s in snaps]
    count = Counter(key for keys in needs for key in keys)
    listed = [Listed(snap, sum(sizes.get(k, 0) for k in keys),
                     sum(sizes.get(k, 0) for k in keys if count[k] == 1 and k not in current))
              for snap, keys in zip(snaps, needs, strict=True)]
    return sorted(listed, key=lambda item: (item.snapshot.created, item.snapshot.name))


def delete(vol: Volume, names: Iterable[str], holding_lease: bool) -> tuple[int, int]:
    """Delete the named snapshots (UsageError, before anything is deleted, if one does
    not exist). Holding the lease (no server runs), the objects no longer needed are
    collected at once; else the server's collection deletes them later. Returns the
    (objects, bytes) collected."""
    names = list(names)
    for name in names:
        vol.objects.get_snapshot(name)
    for name in names:
        vol.objects.delete_snapshot(name)
    if not holding_lease:
        return 0, 0
    return collect(vol, Image(vol).named)


def retained(snaps: list[Snapshot], keep_last: int = 0, keep_daily: int = 0,
             keep_weekly: int = 0) -> set[str]:
    """The names a retention policy keeps, as restic's `forget` counts: the keep_last
    newest; the newest of each of the keep_daily most recent days that have a snapshot;
    likewise for ISO weeks. A policy of nothing keeps everything."""
    if not (keep_last or keep_daily or keep_weekly):
        return {s.name for s in snaps}
    newest_first = sorted(snaps, key=lambda s: (s.created, s.name), reverse=True)
    kept = {s.name for s in newest_first[:keep_last]}
    for count, period in ((keep_daily, lambda t: t.date()),
                          (keep_weekly, lambda t: t.isocalendar()[:2])):
        seen: set[object] = set()
        for snap in newest_first:
            when = period(datetime.strptime(snap.created, "%Y-%m-%dT%H:%M:%SZ"))
            if len(seen) >= count:
                break
            if when not in seen:
                seen.add(when)
                kept.add(snap.name)
    return kept


def prune(vol: Volume, keep_last: int, keep_daily: int, keep_weekly: int,
          holding_lease: bool, spare: Callable[[str], bool] = lambda name: False
          ) -> list[str]:
    """Delete the snapshots the retention policy does not keep, except those spare
    says to keep after all (served right now); their names."""
    snaps = [vol.objects.get_snapshot(name) for name in vol.objects.snapshot_names()]
    keep = retained(snaps, keep_last, keep_daily, keep_weekly)
    doomed = sorted(s.name for s in snaps if s.name not in keep and not spare(s.name))
    if doomed:
        delete(vol, doomed, holding_lease)
    return doomed


def rollback(vol: Volume, name: str, epoch: int, keep: str | None, threads: int = 8
             ) -> Head:
    """Make the volume's current state snapshot name's image, under the lease the caller
    holds at epoch: first, unless keep is None, the current head kept as snapshot keep;
    then a new image beside the current one (offline.py R1-R5: the snapshot's entries
    carried over, chunks its journal wrote to folded, every seq above both images'),
    switched to with one conditional head write, then the snapshot's size, then what
    no longer is needed collected. Returns the new head."""
    snap = vol.objects.get_snapshot(name)
    head, version = read_head(vol)
    if keep is not None:
        vol.objects.put_snapshot(Snapshot(keep, layout.utc_now(), vol.meta.size, head))
    now = Image(vol, head, threads,
                on_damage=lambda key, problem: log.warning("%s is damaged (%s); rolling "
                                                           "back over it", key, problem))
    image = Image(vol, snap.head, threads, size=snap.size)
    writer = ImageWriter(vol.objects, epoch, max(now.max_seq, image.max_seq) + 1)
    for index in carry(writer, image, image.chunk_count):
        plain = image.chunk(index)
        if plain is None or not writer.put_chunk(index, plain):
            writer.zeroed(index)
    return switch(vol, writer, head, version, threads,
                  size=None if snap.size == vol.meta.size else snap.size)
