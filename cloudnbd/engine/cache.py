"""The clean chunk cache: local copies of cloud chunk objects, bounded, LRU-evicted.

Files `clean/<chunk index, 16 hex>` each hold the plain contents of one chunk exactly as
the cloud has it. They are written only by workers, always to a temporary name first
and renamed into place, and only with contents that just came from (fetch) or just went
to (upload) the cloud. The front records, for each, the version of the object it copies
(the one the upload wrote or the fetch read), and a clean stop writes those versions
into the `clean-shutdown` marker:

    cloudnbd clean cache 1
    <chunk index, 16 hex> <version>      one line per clean file

Invariants:
- C1 A clean file never holds data the cloud does not have: new data lives in the journal
  until uploaded (see journal.py); clean files are never written in place.
- C2 Dirty data never lives here, so evicting a clean file never loses data.
- C3 After an unclean stop the clean files are not trusted: they were never fsync'd, and a
  crash can leave one with lost pages. open() keeps them only if the previous run left the
  `clean-shutdown` marker (written at every stop that is not a crash, after an fsync of
  every clean file);
  otherwise it deletes them all and refetches on demand.
- C4 A chunk with an upload in flight is pinned: its clean file is not evicted, so the
  eviction can never unlink the new file the uploader renames into place. Reads need no
  pin: they are lent a descriptor under the engine lock and read the inode it refers to
  (C7).
- C5 A clean file that could not be removed (an I/O error, not "already gone") makes the
  cache damaged: the run never leaves the clean-shutdown marker, so the stale file is
  discarded at the next open instead of being served. The failure is logged, not
  raised: it must not stop the engine from accounting an upload or waking a reader.
- C6 A clean file is kept only while the store holds the very object it copies: another
  machine may have rewritten or deleted the chunk since this one stopped. open() drops
  every file whose chunk, by the map the head names at open, is another object (its
  stamp is the version) than the marker records, or has no object, or has no record (a
  file a worker renamed into place without the front learning of it). The marker is
  written only after every clean file it names is fsync'd, and a file is recorded only
  after it is in place, so a record can never pair a stale file with a newer version.
- C7 Reads are lent descriptors the cache keeps open (at most OPEN_FILES, the longest
  open closed first), so a warm read opens nothing. A descriptor always refers
  to the file the cache records for its chunk: it is forgotten the moment that file is
  replaced (added), removed (discard, evict) or the cache is closed, and the next read
  opens the file anew. A forgotten descriptor that a read still holds is closed only
  when the last such read gives it back, so its number is never reused under a read.
  Every call that replaces or removes a file, and every lend, is made under the engine
  lock, so a read sees the file as of its snapshot (E3).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cloudnbd.engine import localfs

if TYPE_CHECKING:
    from cloudnbd.engine.chunkmap import ChunkMap

log = logging.getLogger(__name__)

CLEAN_MARKER = "clean-shutdown"
MARKER_HEADER = "cloudnbd clean cache 1"
#: clean files kept open for reads (C7): with 4 MiB chunks, 1 GiB of random reads
OPEN_FILES = 256


def clean_name(index: int) -> str:
    return f"{index:016x}"


def clean_path(directory: Path, index: int) -> Path:
    """The clean file of chunk index in the clean/ directory."""
    return directory / clean_name(index)


def clean_temp_path(directory: Path, index: int, tag: str) -> Path:
    """Where a worker writes chunk index's new clean file before renaming it into place
    (C1); tag tells concurrent writers apart, and open() removes leftovers."""
    return directory / f".{clean_name(index)}.{tag}.tmp"


@dataclass(slots=True)
class Opened:
    """A descriptor of a clean file, lent to reads (C7)."""

    fd: int
    users: int = 0  # reads holding it
    retired: bool = False  # forgotten by the cache: closed once no read holds it


class CleanCache:
    """LRU bookkeeping over the clean/ directory, and the descriptors reads borrow."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory / "clean"
        self.marker = directory / CLEAN_MARKER
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # index -> (file size, version of the object it copies), least recently used first
        self._lru: OrderedDict[int, tuple[int, str | None]] = OrderedDict()
        self._pins: dict[int, int] = {}
        self._opened: dict[int, Opened] = {}  # in the order they were opened
        self._prefix = f"{self.directory}/"  # a str: pathlib costs more than the read
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.damaged = False  # C5

    def open(self, stored: ChunkMap) -> bool:
        """Load the cache, keeping only files that still copy what the store holds
        (stored: the map the head names at open, C6); returns True if the previous run
        stopped cleanly (C3)."""
        first_run = not self.directory.exists()
        localfs.mkdir(self.directory, 0o700)
        recorded = self._read_marker()
        trusted = recorded is not None
        replaced = 0
        for path in sorted(self.directory.iterdir(), key=lambda p: p.stat().st_mtime):
            index = _index(path.name)
            version = None if index is None or recorded is None else recorded.get(index)
            if (index is None or version is None or index >= len(stored)
                    or stored.version(index) != version):
                if trusted and index is not None:
                    replaced += 1
                localfs.unlink(path)
                continue
            size = path.stat().st_size
            self._lru[index] = (size, version)
            self.bytes += size
        if trusted:
            localfs.unlink(self.marker)
            localfs.fsync_dir(self.marker.parent)
        if not trusted and not first_run:
            log.info("previous run did not stop cleanly: clean cache discarded")
        elif replaced:
            log.info("clean cache: dropped %d chunk files the store no longer holds "
                     "(written elsewhere since this machine's last run)", replaced)
        return trusted

    def _read_marker(self) -> dict[int, str] | None:
        """The versions a clean stop recorded, or None without a marker (C3). A marker
        of an older release records none, and every file is refetched once (C6)."""
        try:
            lines = self.marker.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return None
        recorded: dict[int, str] = {}
        if lines[:1] != [MARKER_HEADER]:
            return recorded
        for line in lines[1:]:
            name, _, version = line.partition(" ")
            index = _index(name)
            if index is not None and version:
                recorded[index] = version
        return recorded

    def path(self, index: int) -> Path:
        return clean_path(self.directory, index)

    def lend(self, index: int) -> Opened | None:
        """A descriptor of index's clean file for a read, which gives it back (give_back)
        when done; None if index is not cached. Counts a hit and marks index recently
        used. Called under the engine lock (C7)."""
        with self._lock:
            if index not in self._lru:
                return None
            self._lru.move_to_end(index)
            self.hits += 1
            opened = self._opened.get(index)
            if opened is None:
                opened = Opened(os.open(f"{self._prefix}{index:016x}", os.O_RDONLY))
                self._opened[index] = opened
                while len(self._opened) > OPEN_FILES:  # the longest open goes first
                    self._retire_locked(next(iter(self._opened)))
            opened.users += 1
            return opened

    def give_back(self, opened: Opened) -> None:
        """A read is done with a descriptor lend() gave it (C7)."""
        with self._lock:
            opened.users -= 1
            if opened.retired and not opened.users:
                os.close(opened.fd)

    def _retire_locked(self, index: int) -> None:
        """Forget index's descriptor: its file is being replaced or removed (C7)."""
        opened = self._opened.pop(index, None)
        if opened is not None:
            opened.retired = True
            if not opened.users:
                os.close(opened.fd)

    def close(self) -> None:
        """Forget every descriptor (the engine stops)."""
        with self._lock:
            for index in list(self._opened):
                self._retire_locked(index)

    def pin(self, index: int) -> None:
        """Keep index from eviction (whether or not it is cached yet)."""
        with self._lock:
            self._pins[index] = self._pins.get(index, 0) + 1

    def unpin(self, index: int) -> None:
        with self._lock:
            self._pins[index] -= 1
            if not self._pins[index]:
                del self._pins[index]
        self.evict()

    def __contains__(self, index: int) -> bool:
        with self._lock:
            return index in self._lru

    def added(self, index: int, size: int, version: str | None) -> None:
        """A worker renamed a new clean file for index into place; it copies the object
        at version (C6; None or "": unknown, so the file is not kept past this run)."""
        with self._lock:
            self._retire_locked(index)  # C7: the file is a new one
            old = self._lru.pop(index, None)
            self.bytes += size - (0 if old is None else old[0])
            self._lru[index] = (size, version)
        self.evict()

    def discard(self, index: int) -> None:
        """Forget index and remove its file (the chunk became all zeros)."""
        with self._lock:
            self._retire_locked(index)
            entry = self._lru.pop(index, None)
            if entry is None:
                return
            self.bytes -= entry[0]
        self._remove(index)

    def evict(self) -> None:
        """Remove least recently used unpinned files until under the bound (C2, C4)."""
        victims = []
        with self._lock:
            if self.bytes <= self.max_bytes:
                return
            for index, (size, _) in self._lru.items():
                if self.bytes <= self.max_bytes:
                    break
                if index in self._pins:
                    continue
                victims.append(index)
                self.bytes -= size
            for index in victims:
                del self._lru[index]
                self._retire_locked(index)
        for index in victims:
            self._remove(index)

    def _remove(self, index: int) -> None:
        """Unlink a clean file the bookkeeping already forgot (C5 if that fails)."""
        try:
            localfs.unlink(self.path(index))
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.damaged = True
            log.error("clean cache: cannot remove chunk file %s (%s); the cache will be "
                      "discarded at the next open", clean_name(index), exc)

    def mark_clean_shutdown(self) -> None:
        """Make every clean file durable, then leave the marker with their versions
        (C3, C6). Called once no worker is left to rename a file into place."""
        if self.damaged:
            log.warning("clean cache damaged this run: not marked clean (C5)")
            return
        with self._lock:
            entries = [(index, version) for index, (_, version) in self._lru.items()
                       if version]
        kept = []
        for index, version in entries:
            try:
                fd = localfs.open(self.path(index), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                localfs.fsync(fd)
            finally:
                localfs.close(fd)
            kept.append(f"{clean_name(index)} {version}\n")
        localfs.fsync_dir(self.directory)
        # Written whole under another name and renamed: a marker is complete or absent.
        tmp = self.marker.with_name(f".{CLEAN_MARKER}.tmp")
        localfs.write_file(tmp, "".join([f"{MARKER_HEADER}\n", *kept]).encode(),
                           sync=True)
        localfs.replace(tmp, self.marker)
        localfs.fsync_dir(self.marker.parent)


def _index(name: str) -> int | None:
    """The chunk index a clean file name (16 hex digits) stands for, else None."""
    try:
        index = int(name, 16)
    except ValueError:
        return None
    return index if name == clean_name(index) else None
