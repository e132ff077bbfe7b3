"""The clean chunk cache: local copies of cloud chunk objects, bounded, LRU-evicted.

Files `clean/<chunk index, 16 hex>` each hold the plain contents of one chunk exactly as
the cloud has it. They are written only by workers, always to a temporary name first
and renamed into place, and only with contents that just came from (fetch) or just went
to (upload) the cloud.

Invariants:
- C1 A clean file never holds data the cloud does not have: new data lives in the journal
  until uploaded (see journal.py); clean files are never written in place.
- C2 Dirty data never lives here, so evicting a clean file never loses data.
- C3 After an unclean stop the clean files are not trusted: they were never fsync'd, and a
  crash can leave one with lost pages. open() keeps them only if the previous run left the
  `clean-shutdown` marker (written after a full drain and an fsync of every clean file);
  otherwise it deletes them all and refetches on demand.
- C4 A chunk with an upload in flight is pinned: its clean file is not evicted, so the
  eviction can never unlink the new file the uploader renames into place. Reads need no
  pin: they open the file under the engine lock and read the inode they opened.
- C5 A clean file that could not be removed (an I/O error, not "already gone") makes the
  cache damaged: the run never leaves the clean-shutdown marker, so the stale file is
  discarded at the next open instead of being served. The failure is logged, not
  raised: it must not stop the engine from accounting an upload or waking a reader.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from cloudnbd.engine import localfs

log = logging.getLogger(__name__)

CLEAN_MARKER = "clean-shutdown"


def clean_name(index: int) -> str:
    return f"{index:016x}"


class CleanCache:
    """LRU bookkeeping over the clean/ directory."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory / "clean"
        self.marker = directory / CLEAN_MARKER
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._lru: OrderedDict[int, int] = OrderedDict()  # index -> file size
        self._pins: dict[int, int] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.damaged = False  # C5

    def open(self) -> bool:
        """Load the cache; returns True if the previous run stopped cleanly (C3)."""
        first_run = not self.directory.exists()
        localfs.mkdir(self.directory, 0o700)
        trusted = self.marker.exists()
        for path in sorted(self.directory.iterdir(), key=lambda p: p.stat().st_mtime):
            try:
                index = int(path.name, 16)
            except ValueError:
                index = None
            if not trusted or index is None or len(path.name) != 16:
                localfs.unlink(path)
                continue
            size = path.stat().st_size
            self._lru[index] = size
            self.bytes += size
        if trusted:
            localfs.unlink(self.marker)
            localfs.fsync_dir(self.marker.parent)
        if not trusted and not first_run:
            log.info("previous run did not stop cleanly: clean cache discarded")
        return trusted

    def path(self, index: int) -> Path:
        return self.directory / clean_name(index)

    def temp_path(self, index: int, tag: str) -> Path:
        return self.directory / f".{clean_name(index)}.{tag}.tmp"

    def pin(self, index: int) -> None:
        """Keep index from eviction (whether or not it is cached yet)."""
        with self._lock:
            self._pins[index] = self._pins.get(index, 0) + 1

    def touch(self, index: int) -> bool:
        """Mark index recently used; returns whether it is cached."""
        with self._lock:
            if index not in self._lru:
                return False
            self._lru.move_to_end(index)
            return True

    def unpin(self, index: int) -> None:
        with self._lock:
            self._pins[index] -= 1
            if not self._pins[index]:
                del self._pins[index]
        self.evict()

    def __contains__(self, index: int) -> bool:
        with self._lock:
            return index in self._lru

    def added(self, index: int, size: int) -> None:
        """A worker renamed a new clean file for index into place."""
        with self._lock:
            self.bytes += size - self._lru.pop(index, 0)
            self._lru[index] = size
        self.evict()

    def discard(self, index: int) -> None:
        """Forget index and remove its file (the chunk became all zeros)."""
        with self._lock:
            size = self._lru.pop(index, None)
            if size is None:
                return
            self.bytes -= size
        self._remove(index)

    def evict(self) -> None:
        """Remove least recently used unpinned files until under the bound (C2, C4)."""
        victims = []
        with self._lock:
            if self.bytes <= self.max_bytes:
                return
            for index, size in self._lru.items():
                if self.bytes <= self.max_bytes:
                    break
                if index in self._pins:
                    continue
                victims.append(index)
                self.bytes -= size
            for index in victims:
                del self._lru[index]
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
        """Make every clean file durable, then leave the marker (C3)."""
        if self.damaged:
            log.warning("clean cache damaged this run: not marked clean (C5)")
            return
        with self._lock:
            indexes = list(self._lru)
        for index in indexes:
            try:
                fd = localfs.open(self.path(index), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                localfs.fsync(fd)
            finally:
                localfs.close(fd)
        localfs.fsync_dir(self.directory)
        fd = localfs.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            localfs.fsync(fd)
        finally:
            localfs.close(fd)
        localfs.fsync_dir(self.marker.parent)

