"""The engine: the block device the NBD server calls, backed by journal, cache and cloud.

Data path (one way; workers answer only through the pool's results):
    NBD request -> Engine -> journal (writes) / clean cache + journal (reads)
                -> WorkerPool -> uploader/fetcher processes -> codec -> object store

What is durable when (docs/design.md has the full argument):
- WRITE returns once its record is in the journal (page cache of the local disk). A crash
  of the cloudnbd processes keeps it; a power loss may lose it.
- WRITE with FUA returns once the record is fsync'd and every write up to it is in the
  cloud (PUT or DELETE acknowledged).
- FLUSH returns once every write acknowledged before it is in the cloud.
- A crash may lose only writes no FLUSH or FUA covered; after one, open() replays the
  journal (journal J2, J3) and uploads again what was dirty.

Engine invariants:
- E1 A chunk has at most one upload in flight; a chunk rewritten during its upload keeps
  the newer extents (seq > the upload's seq) and is uploaded again.
- E2 No fetch of a chunk runs while an upload of it does, and vice versa, so the two
  never race to write its clean file.
- E3 Reads take a consistent snapshot under the engine lock: the extents then, and a
  descriptor of the clean file then; journal segments they read are pinned. The bytes
  of a journal record never change once written.
- E4 Extents are dropped only when the result of an upload that included them arrives,
  after the uploader has renamed the new clean file into place.
- F1 Every upload is conditional on the chunk object's version the engine last saw
  (`stored`), and its result carries the new version; a late request of a dead process
  therefore cannot land after a newer upload (workers.py has F2, docs/design.md the
  argument).
- F3 With lease checks on (a served volume), no FLUSH, FUA or drain reports success
  until a check of the lease that started after the uploads it waited for found the
  lease still ours. A server whose lease was taken over (`open --force` elsewhere, or
  the volume deleted) is displaced: from then on it uploads nothing and fails every
  request with EIO, so it never acknowledges a FLUSH that a later holder will not see.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from cloudnbd.engine.cache import CleanCache
from cloudnbd.engine.extents import ChunkExtents, Extent
from cloudnbd.engine.journal import Journal, Kind
from cloudnbd.engine.versions import ChunkVersions
from cloudnbd.engine.workers import (
    FetchTask,
    LeaseTask,
    Outcome,
    Piece,
    Result,
    UploadTask,
    WorkerKind,
    WorkerPool,
    wait_for_orphans,
)
from cloudnbd.errors import CloudUnreachable, Displaced
from cloudnbd.nbd.device import UNALLOCATED, BlockDevice, DeviceError

log = logging.getLogger(__name__)


#: Seconds workers get to finish at an unclean stop before they are killed.
UNCLEAN_STOP_GRACE = 2.0


@dataclass(frozen=True)
class EngineSettings:
    """Tuning of the data path; defaults suit a desktop on a broadband link."""

    cache_bytes: int = 2 * 2**30
    max_dirty: int = 1 * 2**30
    writeback_delay: float = 0.5
    flush_timeout: float = 0.0  # seconds; 0 waits for the cloud forever
    readahead_chunks: int = 4
    read_only: bool = False
    segment_bytes: int = 64 * 2**20
    retry_backoff: float = 1.0


@dataclass
class _Fetch:
    event: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


@dataclass
class _Upload:
    task: UploadTask
    segments: set[int]


#: called with (kind, seconds) for each chunk uploaded or fetched: the time its worker
#: spent on it (the service wires the metrics' histograms here)
TransferHook = Callable[[WorkerKind, float], None]


@dataclass
class EngineStats:
    """Counters for status and metrics (read without locking; approximate is fine)."""

    uploads: int = 0
    upload_errors: int = 0
    upload_bytes: int = 0
    upload_wire_bytes: int = 0
    deletes: int = 0
    fetches: int = 0
    gets: int = 0  # every chunk GET answered: fetches, absent chunks, uploads' bases
    fetch_errors: int = 0
    fetch_wire_bytes: int = 0
    integrity_errors: int = 0
    retries: int = 0
    fenced: int = 0  # uploads that met an object changed behind our back (F2)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine at one moment: what `cloudnbd status` and the Prometheus metrics both
    render (service.py, metrics.py), so the two cannot disagree."""

    dirty_bytes: int  # written but not yet in the cloud
    dirty_chunks: int
    oldest_dirty_seconds: float  # age of the oldest write not yet in the cloud
    journal_disk_bytes: int
    cache_bytes: int  # clean chunks cached
    cache_limit: int
    cache_hits: int
    cache_misses: int
    stats: EngineStats  # a copy
    displaced: str | None  # who took the volume over (F3)
    worker_pids: dict[str, list[int]]  # by WorkerKind


class Engine(BlockDevice):
    """Write-back block device over the journal, the clean cache and the worker pool."""

    def __init__(self, size: int, chunk_size: int, cache_dir: Path, stored: ChunkVersions,
                 settings: EngineSettings,
                 make_pool: Callable[[Callable[[WorkerKind, Result], None]], WorkerPool],
                 on_transfer: TransferHook | None = None, lease_checks: bool = False
                 ) -> None:
        self._size = size
        self.chunk_size = chunk_size
        self.cache_dir = cache_dir
        self.settings = settings
        self.stored = stored  # what the store holds per chunk, and at which version
        self.journal = Journal(cache_dir / "journal", settings.segment_bytes)
        self.clean = CleanCache(cache_dir, settings.cache_bytes)
        self.pool = make_pool(self._on_result)
        self.stats = EngineStats()
        self.on_transfer = on_transfer
        self._cond = threading.Condition(threading.Lock())
        self.dirty: dict[int, ChunkExtents] = {}
        self._first_seq: dict[int, int] = {}
        self._last_write: dict[int, float] = {}
        self._uploading: dict[int, _Upload] = {}
        self._fetching: dict[int, _Fetch] = {}
        self._retry_at: dict[int, float] = {}
        self._last_error: str | None = None
        self._flush_target = 0
        self._task_ids = 0
        self._stopped = False
        self._last_read_end = -1
        self._readahead_from = -1  # first chunk of the last read-ahead requested
        self._zeros = memoryview(bytes(chunk_size))
        self._scheduler = threading.Thread(target=self._schedule, name="writeback",
                                           daemon=True)
        self.recovered_records = 0
        # F3: uploads answered so far; the count when the last successful lease check
        # started; the count when the one in flight started (None: none in flight)
        self.lease_checks = lease_checks
        self._uploads_answered = 0
        self._lease_confirmed = 0
        self._lease_checking: int | None = None
        self.displaced: str | None = None  # who took the volume over

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Load the cache, replay the journal, start workers and write-back."""
        wait_for_orphans(self.cache_dir)
        self.clean.open(self.stored)  # C6: against the listing taken at open
        with self._cond:
            for record in self.journal.recover():
                self._apply(record.kind, record.offset, record.length, record.seq,
                            record.segment, record.data_pos)
                self.recovered_records += 1
        if self.recovered_records:
            log.warning("replayed %d journal records; %d chunks to upload",
                        self.recovered_records, len(self.dirty))
        self.pool.start()
        self._scheduler.start()

    def drain(self, progress: Callable[[int, int], None] | None = None,
              stall_timeout: float | None = None) -> None:
        """Upload everything (close): returns when nothing is dirty.

        Raises CloudUnreachable when no upload has made progress for stall_timeout
        seconds; the journal keeps the data for the next open.
        """
        with self._cond:
            self._flush_target = max(self._flush_target, self.journal.next_seq - 1)
            self._cond.notify_all()
            last_left, last_progress = self.journal.live_bytes, time.monotonic()
            while self.dirty:
                if self.displaced is not None:
                    raise Displaced(self._displaced_message())
                left = self.journal.live_bytes
                now = time.monotonic()
                if left < last_left:
                    last_left, last_progress = left, now
                if progress is not None:
                    progress(left, len(self.dirty))
                if stall_timeout and now - last_progress > stall_timeout:
                    raise CloudUnreachable(
                        f"no upload succeeded for {stall_timeout:.0f}s "
                        f"({self._last_error or 'no answer from the cloud'})")
                self._cond.wait(timeout=0.5)
        try:
            self._confirm_lease(time.monotonic() + stall_timeout if stall_timeout else None)
        except DeviceError as exc:
            if self.displaced is not None:
                raise Displaced(self._displaced_message()) from None
            raise CloudUnreachable(f"the lease could not be checked: {exc}"
                                   ) from None
        if progress is not None:
            progress(0, 0)

    def interrupt(self) -> None:
        """Make every waiter give up (a FLUSH gets ESHUTDOWN) and write-back stop. Safe
        from any thread, one holding the engine lock included: the wake-up is sent from
        a thread of its own (fault injection cuts the power from inside file calls)."""
        self._stopped = True

        def wake() -> None:
            with self._cond:
                self._cond.notify_all()

        threading.Thread(target=wake, daemon=True).start()

    def halt(self) -> None:
        """Stop as a crash would leave things: no drain, no clean-shutdown marker, the
        workers and the journal as they are (the crash and power-loss harnesses)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._scheduler.ident is not None:
            self._scheduler.join(timeout=10)
        self.journal.close()

    def stop(self, clean: bool) -> None:
        """Stop workers; with clean, the journal is empty and the cache is kept."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._scheduler.join(timeout=10)
        # An unclean stop follows a drain that gave up (or a failed start): the workers
        # may be deep in retries the journal makes pointless, and killing one is safe
        # (fencing, docs/design.md), so they get a moment, not the clean stop's grace.
        self.pool.stop(grace=30.0 if clean else UNCLEAN_STOP_GRACE)
        if clean and not self.dirty:
            self.journal.reset()
        self.journal.close()
        self.clean.mark_clean_shutdown()

    def grow(self, new_size: int) -> None:
        """The volume grew (volume.json already says so): serve the new size. Connections
        made from now on see it; existing ones keep the size they were told."""
        with self._cond:
            if new_size > self._size:
                self.stored.grow(-(-new_size // self.chunk_size))
                self._size = new_size

    @property
    def last_error(self) -> str | None:
        """Why the last upload failed, for a close that waits on the cloud."""
        return self._last_error

    # -- BlockDevice: properties -----------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self.settings.read_only

    # Everything else BlockDevice defaults to (flush, FUA, trim, zero, fast zero, cache,
    # extents) the engine does. Multi-conn is safe: one engine and one journal serve
    # every connection, so a FLUSH on any of them covers writes acknowledged on all.
    can_multi_conn = True

    # -- writes ----------------------------------------------------------------------------
    def _apply(self, kind: Kind, offset: int, length: int, seq: int, segment: int,
               data_pos: int) -> None:
        """Lay one journal record over the extent maps (engine lock held)."""
        added: dict[int, int] = {}
        released: dict[int, int] = {}
        now = time.monotonic()
        cs = self.chunk_size
        pos, end = offset, offset + length
        while pos < end:
            index, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            if kind == Kind.ZERO and not self.stored.has(index) and index not in self.dirty:
                pos += n
                continue  # already zeros everywhere: nothing to record
            extents = self.dirty.get(index)
            if extents is None:
                extents = self.dirty[index] = ChunkExtents()
                self._first_seq[index] = seq
            zero = kind == Kind.ZERO
            extents.add(Extent(within, within + n, seq, segment,
                               0 if zero else data_pos + (pos - offset), zero), released)
            added[segment] = added.get(segment, 0) + n
            self._last_write[index] = now
            pos += n
        self.journal.account(added, released)

    def _needs_zeroing(self, offset: int, length: int) -> bool:
        first, last = offset // self.chunk_size, (offset + length - 1) // self.chunk_size
        return any(self.stored.has(i) or i in self.dirty for i in range(first, last + 1))

    def _wait_for_room(self) -> None:
        """Backpressure: past --max-dirty, writes wait for uploads instead of failing."""
        if self.journal.live_bytes < self.settings.max_dirty:
            return
        with self._cond:
            self._cond.notify_all()
            while self.journal.live_bytes >= self.settings.max_dirty and not self._stopped:
                self._cond.wait(timeout=1.0)

    def _refuse_if_displaced(self) -> None:
        if self.displaced is not None:
            raise DeviceError(errno.EIO, self._displaced_message())

    def _displaced_message(self) -> str:
        return (f"the volume was taken over by {self.displaced}; this server no longer "
                f"writes to the store")

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        self._refuse_if_displaced()
        self._wait_for_room()
        seq, segment = self._append_write(buf, offset)
        if fua:
            self.journal.sync({segment})
            self._wait_durable(seq)

    def pwrite_now(self, buf: memoryview, offset: int) -> bool:
        self._refuse_if_displaced()
        if self.journal.live_bytes >= self.settings.max_dirty:
            return False  # backpressure: pwrite waits for room, on a pool thread
        self._append_write(buf, offset)
        return True

    def _append_write(self, buf: memoryview, offset: int) -> tuple[int, int]:
        """Journal a WRITE and lay it over the extent maps; (seq, segment)."""
        with self._cond:
            seq, segment, pos = self.journal.append(Kind.WRITE, offset, len(buf), buf)
            self._apply(Kind.WRITE, offset, len(buf), seq, segment, pos)
        return seq, segment

    def zero(self, offset: int, length: int, fua: bool, may_trim: bool = True,
             fast: bool = False) -> None:
        # Zeroing is always fast here: it is a journal record, and whole chunks that end
        # up all zeros are deleted from the cloud, not stored.
        self._refuse_if_displaced()
        with self._cond:
            if not self._needs_zeroing(offset, length):
                return
            seq, segment, pos = self.journal.append(Kind.ZERO, offset, length)
            self._apply(Kind.ZERO, offset, length, seq, segment, pos)
        if fua:
            self.journal.sync({segment})
            self._wait_durable(seq)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.zero(offset, length, fua)

    def flush(self) -> None:
        self._wait_durable(self.journal.next_seq - 1)

    def _wait_durable(self, seq: int) -> None:
        """Block until every record up to seq is in the cloud, under a lease that is still
        ours (F3), or the flush deadline passes."""
        timeout = self.settings.flush_timeout
        deadline = time.monotonic() + timeout if timeout else None
        with self._cond:
            if seq > self._flush_target:
                self._flush_target = seq
                self._cond.notify_all()
            while min(self._first_seq.values(), default=seq + 1) <= seq:
                self._wait_locked(deadline)
        self._confirm_lease(deadline)

    def _wait_locked(self, deadline: float | None) -> None:
        """One wait of a FLUSH for the cloud (engine lock held): EIO once displaced or
        past the deadline, ESHUTDOWN once stopped."""
        self._refuse_if_displaced()
        if self._stopped:
            raise DeviceError(errno.ESHUTDOWN, "shutting down")
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeviceError(errno.EIO, f"flush timed out: {self._last_error}")
        self._cond.wait(timeout=remaining)

    def _confirm_lease(self, deadline: float | None) -> None:
        """F3: return once a lease check that started after every upload answered so far
        found the lease ours; DeviceError (EIO) if another server holds it now."""
        if not self.lease_checks:
            return
        with self._cond:
            needed = self._uploads_answered
            while self._lease_confirmed < needed:
                if self._lease_checking is None and self.displaced is None:
                    self._lease_checking = self._uploads_answered
                    self._task_ids += 1
                    self.pool.submit(LeaseTask(self._task_ids))
                self._wait_locked(deadline)

    # -- reads -----------------------------------------------------------------------------
    def pread_into(self, buf: memoryview, offset: int) -> None:
        self._pread(buf, offset, may_wait=True)

    def pread_now(self, buf: memoryview, offset: int) -> bool:
        return self._pread(buf, offset, may_wait=False)

    def _pread(self, buf: memoryview, offset: int, may_wait: bool) -> bool:
        """Fill buf; without may_wait, give up (False) at the first chunk that needs a
        fetch or an upload to finish, leaving buf partly filled."""
        self._refuse_if_displaced()  # the store may hold newer data than our cache
        cs = self.chunk_size
        done = 0
        sequential = offset == self._last_read_end
        while done < len(buf):
            index, within = divmod(offset + done, cs)
            n = min(cs - within, len(buf) - done)
            if not self._read_chunk(index, within, buf[done:done + n], may_wait):
                return False
            done += n
        self._last_read_end = offset + len(buf)
        if sequential and self.settings.readahead_chunks:
            # once per chunk the stream enters, not per request: the engine lock is what
            # concurrent readers queue on, and a request takes it at most once more
            following = (offset + len(buf) - 1) // cs + 1
            if following != self._readahead_from:
                self._readahead_from = following
                self._prefetch(range(following, following + self.settings.readahead_chunks))
        return True

    def _read_chunk(self, index: int, within: int, out: memoryview, may_wait: bool) -> bool:
        end = within + len(out)
        while True:
            waiter = None
            base_fd = -1
            with self._cond:
                extents = self.dirty.get(index)
                pieces = extents.overlapping(within, end) if extents else []
                covered = sum(p.end - p.start for p in pieces) == len(out)
                if not covered:
                    if self.clean.touch(index):
                        base_fd = os.open(self.clean.path(index), os.O_RDONLY)
                        self.clean.hits += 1
                    elif not self.stored.has(index):
                        pass  # never written, or deleted when it became zeros
                    elif not may_wait:
                        return False
                    elif index in self._uploading:
                        self._cond.wait()  # E2: its clean file is about to appear
                        continue
                    else:
                        self.clean.misses += 1
                        waiter = self._request_fetch_locked(index)
                if waiter is None:
                    segments = {p.segment for p in pieces if not p.zero}
                    self.journal.pin(segments)
            if waiter is not None:
                waiter.event.wait()
                if waiter.error is not None:
                    raise DeviceError(errno.EIO, waiter.error)
                continue
            try:
                self._fill(out, within, pieces, covered, base_fd)
            finally:
                if base_fd >= 0:
                    os.close(base_fd)
                self.journal.unpin(segments)
            return True

    def _fill(self, out: memoryview, within: int, pieces: list[Extent], covered: bool,
              base_fd: int) -> None:
        if not covered:
            if base_fd >= 0:
                got = os.preadv(base_fd, [out], within)
                if got < len(out):  # a short clean file reads as zeros past its end
                    out[got:] = self._zeros[: len(out) - got]
            else:
                out[:] = self._zeros[: len(out)]
        for p in pieces:
            target = out[p.start - within:p.end - within]
            if p.zero:
                target[:] = self._zeros[: len(target)]
            else:
                got = os.preadv(self.journal.fd(p.segment), [target], p.pos)
                if got != len(target):
                    raise DeviceError(errno.EIO, "journal segment shorter than recorded")

    def _request_fetch_locked(self, index: int) -> _Fetch:
        """One fetch per chunk however many readers miss on it (coalescing)."""
        waiter = self._fetching.get(index)
        if waiter is None:
            waiter = self._fetching[index] = _Fetch()
            self._task_ids += 1
            self.pool.submit(FetchTask(self._task_ids, index))
        return waiter

    def _prefetch(self, indexes: range) -> None:
        with self._cond:
            for index in indexes:
                if index * self.chunk_size >= self._size:
                    break
                if (self.stored.has(index) and index not in self.clean
                        and index not in self._uploading and index not in self._fetching):
                    self._request_fetch_locked(index)

    def cache(self, offset: int, length: int) -> None:
        first, last = offset // self.chunk_size, (offset + length - 1) // self.chunk_size
        self._prefetch(range(first, last + 1))

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        cs = self.chunk_size
        pos, end = offset, offset + length
        with self._cond:
            while pos < end:
                index, within = divmod(pos, cs)
                n = min(cs - within, end - pos)
                flags = 0 if self.stored.has(index) or index in self.dirty else UNALLOCATED
                if found and found[-1][1] == flags:
                    found[-1] = (found[-1][0] + n, flags)
                else:
                    found.append((n, flags))
                pos += n
        return found

    # -- write-back ------------------------------------------------------------------------
    def _schedule(self) -> None:
        delay = self.settings.writeback_delay
        with self._cond:
            while not self._stopped:
                self._dispatch_locked()
                self._cond.wait(timeout=max(0.05, delay / 2))

    def _dispatch_locked(self) -> None:
        if self.displaced is not None:
            return  # F3: not a byte more
        room = self.pool.capacity(WorkerKind.UPLOAD) * 2 - len(self._uploading)
        if room <= 0:
            return
        now = time.monotonic()
        pressure = self.journal.live_bytes >= self.settings.max_dirty // 2
        delay = self.settings.writeback_delay
        candidates = []
        for index, first in self._first_seq.items():
            if index in self._uploading or index in self._fetching:
                continue  # E1, E2
            if self._retry_at.get(index, 0) > now:
                continue
            if (first <= self._flush_target or pressure
                    or now - self._last_write[index] >= delay):
                candidates.append((first, index))
        candidates.sort()
        for _, index in candidates[:room]:
            self._dispatch_upload_locked(index)

    def _dispatch_upload_locked(self, index: int) -> None:
        extents = self.dirty[index]
        if extents.covers(self.chunk_size):
            base = "zero"
        elif index in self.clean:
            base = "clean"
        elif self.stored.has(index):
            base = "cloud"
        else:
            base = "zero"
        self._task_ids += 1
        task = UploadTask(self._task_ids, index, extents.max_seq, base,
                          tuple(Piece(e.start, e.end, e.segment, e.pos, e.zero)
                                for e in extents.extents),
                          expected=self.stored.version(index))  # F1
        segments = extents.segments()
        self.journal.pin(segments)
        self.clean.pin(index)  # C4: its clean file is about to be replaced
        self._uploading[index] = _Upload(task, segments)
        self.pool.submit(task)

    def _on_result(self, kind: WorkerKind, result: Result) -> None:
        with self._cond:
            if result.outcome in (Outcome.LEASE_HELD, Outcome.LEASE_LOST):
                self._lease_done_locked(result)
            elif kind == WorkerKind.UPLOAD:
                self._upload_done_locked(result)
            else:
                self._fetch_done_locked(result)
            self._cond.notify_all()

    def _lease_done_locked(self, result: Result) -> None:
        started, self._lease_checking = self._lease_checking, None
        if result.outcome == Outcome.LEASE_HELD:
            self._lease_confirmed = max(self._lease_confirmed, started or 0)
        else:
            self._displace_locked(result.error or "another server")

    def _displace_locked(self, holder: str) -> None:
        """F3: another server holds the lease; stop writing to the store for good."""
        if self.displaced is None:
            self.displaced = holder
            log.error("the volume's lease was taken over by %s: this server stops "
                      "uploading, and fails every request from now on; %d bytes of writes "
                      "that no FLUSH covered stay in the local journal", holder,
                      self.journal.live_bytes)

    def _upload_done_locked(self, result: Result) -> None:
        index = result.index
        upload = self._uploading.pop(index)
        self.journal.unpin(upload.segments)
        self.clean.unpin(index)
        self.stats.retries += result.retries
        self.stats.gets += result.base_gets
        self.stats.fetch_wire_bytes += result.base_wire_bytes
        self._uploads_answered += 1
        if result.outcome == Outcome.DISPLACED:
            self._displace_locked(result.error or "another server")
            return
        if result.outcome == Outcome.ERROR:
            self.stats.upload_errors += 1
            self.stats.integrity_errors += result.integrity
            self._last_error = result.error
            self._retry_at[index] = time.monotonic() + self.settings.retry_backoff
            log.warning("upload of chunk %d failed: %s", index, result.error)
            return
        self._retry_at.pop(index, None)
        if self.on_transfer is not None:
            self.on_transfer(WorkerKind.UPLOAD, result.seconds)
        released: dict[int, int] = {}
        extents = self.dirty[index]
        extents.drop_through(upload.task.seq, released)  # E4
        if extents:
            self._first_seq[index] = extents.min_seq
        else:
            del self.dirty[index], self._first_seq[index], self._last_write[index]
        self.journal.account({}, released)
        self.stored.record(index, result.version)  # F1: the next upload expects it
        self.stats.fenced += result.fenced
        if result.outcome == Outcome.STORED:
            self.clean.added(index, result.size, result.version)
            self.stats.uploads += 1
            self.stats.upload_bytes += result.size
            self.stats.upload_wire_bytes += result.wire_bytes
        else:
            self.clean.discard(index)
            self.stats.deletes += 1

    def _fetch_done_locked(self, result: Result) -> None:
        waiter = self._fetching.pop(result.index)
        try:
            self._account_fetch_locked(result, waiter)
        finally:
            waiter.event.set()  # readers wake whatever happened

    def _account_fetch_locked(self, result: Result, waiter: _Fetch) -> None:
        self.stats.retries += result.retries
        if result.outcome == Outcome.CACHED:
            if self.on_transfer is not None:
                self.on_transfer(WorkerKind.FETCH, result.seconds)
            self.clean.added(result.index, result.size, result.version)
            self.stats.fetches += 1
            self.stats.gets += 1
            self.stats.fetch_wire_bytes += result.wire_bytes
        elif result.outcome == Outcome.ABSENT:
            self.stats.gets += 1
            self.stored.record(result.index, None)
        else:
            self.stats.fetch_errors += 1
            self.stats.integrity_errors += result.integrity
            log.error("fetch of chunk %d failed: %s", result.index, result.error)
            waiter.error = result.error

    # -- status ----------------------------------------------------------------------------
    def snapshot(self) -> EngineSnapshot:
        """What the engine is doing now, for status and metrics."""
        dirty_bytes, dirty_chunks, oldest = self.backlog()
        clean = self.clean
        return EngineSnapshot(
            dirty_bytes, dirty_chunks, oldest, self.journal.bytes_on_disk, clean.bytes,
            clean.max_bytes, clean.hits, clean.misses, replace(self.stats), self.displaced,
            {str(kind): self.pool.pids(kind) for kind in WorkerKind})

    def backlog(self) -> tuple[int, int, float]:
        """(dirty bytes, dirty chunks, age in seconds of the oldest dirty chunk)."""
        with self._cond:
            oldest = min(self._last_write.values(), default=None)
            return (self.journal.live_bytes, len(self.dirty),
                    0.0 if oldest is None else time.monotonic() - oldest)
