"""The engine: the block device the NBD server calls, backed by journal, cache and cloud.

Data path (one way; workers answer only through the pool's results):
    NBD request -> Engine -> local journal (writes) / clean cache + journal (reads)
                -> WorkerPool -> uploader/fetcher processes -> objects -> object store

The volume is stored in format version 3 (docs/format.md): immutable objects named by
one head. What is durable when (docs/design.md has the full argument):
- WRITE returns once its record is in the local journal (page cache). A crash of the
  cloudnbd processes keeps it; a power loss may lose it.
- FLUSH returns once a commit covers every write acknowledged before it: a journal
  object holding those writes (or chunk objects that fold them) is stored, and the head
  naming it replaced, conditionally, by this server (W2). FUA: the same for its write.
- A crash may lose only writes no FLUSH or FUA covered; after one, open() replays the
  local journal (J2, J3), or, on another machine, the journal objects the head names.

Engine invariants:
- E1 A chunk has at most one upload in flight; a chunk rewritten during its upload keeps
  the newer extents (seq > the upload's seq) and is uploaded again.
- E2 No fetch of a chunk runs while an upload of it does, and vice versa, so the two
  never race to write its clean file.
- E3 Reads take a consistent snapshot under the engine lock: the extents then, and a
  descriptor of the clean file then; journal segments they read are pinned. The bytes
  of a journal record never change once written.
- E4 Extents are dropped only when a commit names a chunk object that holds them
  (a CHUNK record with a seq at or above theirs), so until then the local journal keeps
  everything the store's head does not hold yet, and the clean file the upload made
  already has them.
- E5 One commit is in flight at a time, and commits are applied in order: a head is
  written only after the objects it names are stored, conditionally on the version of
  the head this engine wrote before (W2). A head write that fails its condition means
  another server has taken the volume over: this one is displaced, uploads nothing more
  and fails every request with EIO, so it never acknowledges a FLUSH that a later holder
  will not see.
- E6 The sequence numbers of this engine's writes are above every number the store's
  head or its journal objects hold, so the store's order is the order of writing.
- E7 A frozen engine (a snapshot's head, `open --snapshot`) writes nothing to the store:
  it refuses every write, commits nothing, writes no head and collects no garbage (its
  collector would take every object of the volume's newer heads for garbage), and
  holds no lease. Its local journal only copies the journal objects its head names.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from cloudnbd import layout
from cloudnbd.engine.cache import CleanCache, Opened
from cloudnbd.engine.chunkmap import ChunkMap
from cloudnbd.engine.extents import ChunkExtents, Extent
from cloudnbd.engine.journal import Journal, Kind
from cloudnbd.engine.workers import (
    DeleteTask,
    FetchTask,
    HeadTask,
    JournalPiece,
    JournalTask,
    Listing,
    ListTask,
    Outcome,
    PageTask,
    Piece,
    ReadJournalTask,
    ReadPageTask,
    Result,
    Task,
    UploadTask,
    WorkerKind,
    WorkerPool,
    wait_for_orphans,
)
from cloudnbd.errors import CloudUnreachable, Displaced, IntegrityError
from cloudnbd.layout import Entry, Head, JChunk, JournalRef, JWrite, JZero, Record
from cloudnbd.nbd.device import UNALLOCATED, BlockDevice, DeviceError
from cloudnbd.objects import SnapshotMarks

log = logging.getLogger(__name__)


_NONE: frozenset[int] = frozenset()  # no journal segments (a read of clean data)

#: Seconds workers get to finish at an unclean stop before they are killed.
UNCLEAN_STOP_GRACE = 2.0
#: The first garbage listing comes this soon after start (or gc_grace, if shorter), and
#: one comes this soon after a snapshot is taken, so that the snapshot count and the
#: bytes only snapshots keep alive (status, metrics) are known early. Deleting still
#: needs two listings a grace apart (G1), so an early listing deletes nothing sooner.
EARLY_LISTING = 30.0
#: Listed keys whose names garbage collection looks up per hold of the engine lock
#: (G4): a few ms, the longest an NBD request waits for it, whatever the volume's size.
GC_BATCH = 2048


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
    #: a chunk with this share of it written since it was stored is uploaded whole
    #: rather than left to the journal (and is folded at once)
    fold_fraction: float = 0.5
    #: the store's journal is folded into chunks (a checkpoint) past this many bytes,
    #: or when its oldest object is this old
    checkpoint_bytes: int = 128 * 2**20
    checkpoint_age: float = 3600.0
    #: a FLUSH puts at most this much data in journal objects; beyond, the chunks with
    #: the most are uploaded whole instead
    flush_journal_bytes: int = 64 * 2**20
    #: and at most this much in one journal object: a worker holds an object whole
    #: (plain, then sealed) as it holds a chunk, so this keeps the memory a transfer
    #: needs to a chunk's (docs/design.md, "Memory")
    journal_object_bytes: int = 4 * 2**20
    #: uploaded chunks wait at most this long to be named by a commit (or until a FLUSH,
    #: a checkpoint, commit_uploads of them, or half of max_dirty in the local journal).
    #: Naming costs two PUTs (a journal object, the head) whatever it names: the fewer
    #: commits a stream of uploads makes, the closer its PUTs per GiB to one per chunk.
    #: Until named, an upload's journal space stays in use; a crash loses nothing.
    commit_delay: float = 10.0
    commit_uploads: int = 1024
    #: objects no head names are deleted only after this long (a reader of an older
    #: head may still need them), and garbage is looked for this often
    gc_grace: float = 900.0


@dataclass(frozen=True)
class CloudState:
    """What open() read from the store (the head), and who we are in it."""

    head_key: str
    head: Head
    head_version: str
    epoch: int  # our lease epoch: the high half of every stamp we make
    #: import the store's journal into the local one (it is not ours, or not the newest)
    import_journal: bool
    #: E7: head is a snapshot's, served read-only beside the volume's own server
    frozen: bool = False


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
class _JournalPart:
    """One journal object of a commit: its records' span, and the chunks their writes
    touched (chunk -> last seq), for the checkpoint that folds it."""

    stamp: int
    first_seq: int
    last_seq: int
    touched: dict[int, int]
    chunks: tuple[JChunk, ...] = ()
    stored: JournalRef | None = None  # once its object is stored


@dataclass
class _Commit:
    """A commit in flight: its journal objects (or pages), then the head (E5)."""

    target: int  # head.seq once done (the writes it makes durable)
    chunks: tuple[JChunk, ...]  # the uploads it names
    segments: set[int]
    parts: list[_JournalPart] = field(default_factory=list)  # in seq order
    pages: dict[int, int] = field(default_factory=dict)  # page -> stamp, a checkpoint's
    retire: tuple[JournalRef, ...] = ()  # the journal objects a checkpoint folds
    #: its object writes in flight (task id -> the part, or None for a map page); a
    #: result of a task not in here is from a commit given up, and changes nothing
    waiting: dict[int, _JournalPart | None] = field(default_factory=dict)
    head: Head | None = None
    retry_head: bool = False  # the head write failed: write the same head again

    @property
    def journal(self) -> tuple[JournalRef, ...]:
        """Its journal objects, in seq order, once all are stored."""
        return tuple(p.stored for p in self.parts if p.stored is not None)


@dataclass
class EngineStats:
    """Counters for status and metrics (read without locking; approximate is fine)."""

    uploads: int = 0
    upload_errors: int = 0
    upload_bytes: int = 0
    upload_wire_bytes: int = 0
    deletes: int = 0  # chunks that became zeros (no object)
    fetches: int = 0
    gets: int = 0  # every chunk GET answered: fetches, and uploads' bases
    fetch_errors: int = 0
    fetch_wire_bytes: int = 0
    integrity_errors: int = 0
    retries: int = 0
    commits: int = 0  # commits done (each wrote a head)
    head_puts: int = 0  # head writes answered (a retried head counts again)
    page_puts: int = 0
    metadata_wire_bytes: int = 0  # of heads and map pages
    commit_errors: int = 0
    journal_objects: int = 0
    journal_bytes: int = 0  # plain bytes of data written to journal objects
    journal_wire_bytes: int = 0
    checkpoints: int = 0
    garbage_deleted: int = 0  # objects
    garbage_listings: int = 0
    #: rounds answered by one LIST of the snapshots, nothing having changed (G5)
    garbage_quiet_rounds: int = 0
    #: the requests of garbage collection's rounds (listing, reading the snapshots,
    #: checking the head, deleting), by kind, as the store counted them
    garbage_requests: dict[str, int] = field(default_factory=dict)

    @property
    def sent_wire_bytes(self) -> int:
        """Every object byte sent: chunks, journal objects, map pages, heads."""
        return self.upload_wire_bytes + self.journal_wire_bytes + self.metadata_wire_bytes


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine at one moment: what `cloudnbd status` and the Prometheus metrics both
    render (service.py, metrics.py), so the two cannot disagree."""

    dirty_bytes: int  # written but not yet durable in the cloud (no head names it)
    dirty_chunks: int
    oldest_dirty_seconds: float  # age of the oldest write not yet durable
    store_journal_objects: int  # durable in the store's journal, not yet folded
    store_journal_bytes: int  # into chunk objects (the next checkpoint does)
    head_generation: int
    journal_disk_bytes: int
    cache_bytes: int  # clean chunks cached
    cache_limit: int
    cache_hits: int
    cache_misses: int
    stats: EngineStats  # a copy
    displaced: str | None  # who took the volume over (E5, G3)
    worker_pids: dict[str, list[int]]  # by WorkerKind
    #: as of the last garbage listing (None before the first, EARLY_LISTING after
    #: start; then every gc_grace, and right after a snapshot is taken here): the
    #: volume's snapshots, and the bytes of the objects only they keep alive
    snapshots: int | None = None
    snapshot_only_bytes: int | None = None


class Engine(BlockDevice):
    """Write-back block device over the journal, the clean cache and the worker pool."""

    def __init__(self, size: int, chunk_size: int, cache_dir: Path, cloud: CloudState,
                 settings: EngineSettings,
                 make_pool: Callable[[Callable[[WorkerKind, Result], None]], WorkerPool],
                 on_transfer: TransferHook | None = None) -> None:
        self._size = size
        self.chunk_size = chunk_size
        self.cache_dir = cache_dir
        self.settings = settings
        self.cloud = cloud
        #: committed: what the head names for every chunk (read at start)
        self.map = ChunkMap(-(-size // chunk_size))
        self.head = cloud.head
        self.journal = Journal(cache_dir / "journal", settings.segment_bytes)
        self.clean = CleanCache(cache_dir, settings.cache_bytes)
        self._clean_opened = False  # a start that failed before leaves it untouched
        self.pool = make_pool(self._on_result)
        self.stats = EngineStats()
        self.on_transfer = on_transfer
        #: the engine lock; hot paths take it bare (a Condition's own enter and exit are
        #: Python calls), waiters through _cond
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.dirty: dict[int, ChunkExtents] = {}
        self._last_write: dict[int, float] = {}
        self._uploading: dict[int, _Upload] = {}
        self._fetching: dict[int, _Fetch] = {}
        self._retry_at: dict[int, float] = {}
        #: uploads done and not yet named by a commit: index -> (stamp, seq, when)
        self._pending: dict[int, tuple[int, int, float]] = {}
        self._commit: _Commit | None = None
        self._commit_retry_at = 0.0
        self._flush_target = 0
        #: a checkpoint in progress: the journal objects it folds, and for every chunk
        #: their writes touch, the seq its object must hold before they can go
        self._checkpoint_refs: tuple[JournalRef, ...] | None = None
        self._fold_needed: dict[int, int] = {}
        # what this engine knows of each journal object the head names, by stamp
        self._journal_born: dict[int, float] = {}  # when committed (or read, at open)
        self._journal_chunks: dict[int, set[str]] = {}  # keys its CHUNK records name
        #: every key some of them name, with how many do (garbage looks keys up here)
        self._journal_named: dict[str, int] = {}
        self._journal_touched: dict[int, dict[int, int]] = {}  # chunk -> its last write
        self._counter = 0
        self._last_error: str | None = None
        self._task_ids = 0
        self._stopped = False
        self._last_read_end = -1
        self._readahead_from = -1  # first chunk of the last read-ahead requested
        self._zeros = memoryview(bytes(chunk_size))
        self._scheduler = threading.Thread(target=self._schedule, name="writeback",
                                           daemon=True)
        self._waiting_reads: dict[int, list[Result]] = {}  # open: journal objects read
        self._store_tasks: dict[int, str] = {}  # task id -> "journal", "page", "head", ...
        self._garbage_seen: tuple[float, set[str]] | None = None
        #: +1 whenever a snapshot is being taken (S5): a listing begun in an older
        #: round counts for nothing
        self._gc_round = 0
        self._gc_listing_round = 0
        self._gc_at = time.monotonic() + min(settings.gc_grace, EARLY_LISTING)
        self._gc_busy = False
        self._gc_thread: threading.Thread | None = None  # sorts a listing's keys (G4)
        self._gc_head_version = ""  # the head version the delete in flight expects (G3)
        self._gc_doomed = 0  # and how many objects it deletes
        self._gc_listing_head = ""  # the head version when the listing in flight began
        #: (head version, snapshot marks) of the last listing that found nothing
        #: unnamed, while they are still what the next one should find (G5)
        self._gc_quiet: tuple[str, SnapshotMarks] | None = None
        self._snapshot_usage: tuple[int, int] | None = None  # (count, bytes), a listing's
        self.recovered_records = 0
        self.displaced: str | None = None  # who took the volume over

    @property
    def committed_seq(self) -> int:
        return self.head.seq

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Load the cache, read the store's journal, replay the local one, start workers
        and write-back."""
        wait_for_orphans(self.cache_dir)
        self.pool.start()
        pages = self._read_all([ReadPageTask(self._next_task_id(), page, stamp)
                                for page, stamp in self.head.pages], "map page")
        self.map = ChunkMap.from_pages(len(self.map), zip(
            (page for page, _ in self.head.pages), pages, strict=True))
        journals = self._read_all([ReadJournalTask(self._next_task_id(), ref.stamp)
                                   for ref in self.head.journal], "journal object")
        with self._cond:
            cloud_max = max(self.head.seq, self._apply_store_journal(
                list(zip(self.head.journal, journals, strict=True))))
        self.clean.open(self.map)  # C6: against the map the head names
        self._clean_opened = True
        with self._cond:
            if not self.cloud.import_journal:
                for record in self.journal.recover():
                    self._apply(record.kind, record.offset, record.length, record.seq,
                                record.segment, record.data_pos)
                    self.recovered_records += 1
            self.journal.skip_to(max(cloud_max, self.map.max_seq) + 1)  # E6
            self._set_journal_floor_locked()
        if self.cloud.frozen:
            return  # E7: no write-back, commits or garbage collection, ever
        if self.recovered_records:
            log.warning("replayed %d journal records; %d chunks to upload",
                        self.recovered_records, len(self.dirty))
        self._scheduler.start()

    def _read_all(self, tasks: list[Task], what: str) -> list[object]:
        """Run read tasks on the workers, in parallel; their values, in order. The map
        pages and journal objects the head names are read at start: the pages are the
        map, the journal's CHUNK records are part of it, and on a machine whose own
        journal is not the newest, the journal's writes are the newest data."""
        with self._cond:
            for task in tasks:
                self._waiting_reads[task.task_id] = []
                self._submit(task)
            while any(not self._waiting_reads[t.task_id] for t in tasks):
                self._cond.wait(timeout=1.0)
            results = [self._waiting_reads.pop(t.task_id)[0] for t in tasks]
        for result in results:
            if result.outcome != Outcome.DONE:
                raise IntegrityError(f"reading the volume's {what}s failed: {result.error}")
        return [result.value for result in results]

    def _apply_store_journal(self, journals: list[tuple[JournalRef, list[Record]]]) -> int:
        """Lay the store's journal over the map (engine lock held): its CHUNK records
        always, its writes into the local journal when importing. Returns the highest
        sequence number it holds."""
        highest = 0
        now = time.monotonic()
        for ref, records in journals:
            self._journal_born[ref.stamp] = now
            named: set[str] = set()
            touched = self._journal_touched[ref.stamp] = {}
            for record in records:
                highest = max(highest, record.seq)
                if isinstance(record, JChunk):
                    if record.stamp:
                        named.add(layout.chunk_key(record.index, record.stamp))
                    if record.seq > self.map.seq(record.index):
                        self._fold_locked(record.index, record.stamp, record.seq)
                    continue
                length = len(record.data) if isinstance(record, JWrite) else record.length
                _touch(touched, record.seq, record.offset, length, self.chunk_size)
                if self.cloud.import_journal:
                    self._import_locked(record)
            self._journal_names_locked(ref.stamp, named)
        return highest

    def _import_locked(self, record: JWrite | JZero) -> None:
        """A write of the store's journal into the local one, with its own number, so
        that it counts as committed (E6), and over the extents if still current."""
        if isinstance(record, JWrite):
            length = len(record.data)
            seq, segment, pos = self.journal.append(Kind.WRITE, record.offset, length,
                                                    record.data, seq=record.seq)
            self._apply(Kind.WRITE, record.offset, length, seq, segment, pos)
        else:
            seq, segment, pos = self.journal.append(Kind.ZERO, record.offset,
                                                    record.length, seq=record.seq)
            self._apply(Kind.ZERO, record.offset, record.length, seq, segment, pos)
        self.recovered_records += 1

    def drain(self, progress: Callable[[int, int], None] | None = None,
              stall_timeout: float | None = None) -> None:
        """Close: commit everything and fold the store's journal into chunks, so that
        nothing but the head and what it names remains. Raises CloudUnreachable when no
        progress was made for stall_timeout seconds (the journal keeps the data), and
        Displaced if another server took the volume over. A frozen engine has nothing
        to commit (E7)."""
        if self.cloud.frozen:
            return
        with self._cond:
            self._flush_target = max(self._flush_target, self.journal.next_seq - 1)
            last_left, last_progress = self._backlog_locked(), time.monotonic()
            while self.dirty or self._pending or self.head.journal or self._commit:
                if self.displaced is not None:
                    raise Displaced(self._displaced_message())
                if self._stopped:
                    raise DeviceError(errno.ESHUTDOWN, "stopped while closing")
                left = self._backlog_locked()
                now = time.monotonic()
                if left < last_left:
                    last_left, last_progress = left, now
                if progress is not None:
                    progress(left, len(self.dirty))
                if stall_timeout and now - last_progress > stall_timeout:
                    raise CloudUnreachable(
                        f"no upload succeeded for {stall_timeout:.0f}s "
                        f"({self._last_error or 'no answer from the cloud'})")
                if self._checkpoint_refs is None and self.head.seq >= self._flush_target:
                    self._begin_checkpoint_locked(fold_all=True)
                self._cond.notify_all()
                self._cond.wait(timeout=0.5)
        if progress is not None:
            progress(0, 0)

    def _backlog_locked(self) -> int:
        """Bytes still to go: live journal bytes, or a little while only commits remain."""
        return self.journal.live_bytes + len(self._pending) + len(self.head.journal)

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
        self._join_threads()
        self.journal.close()
        self.clean.close()

    def _join_threads(self) -> None:
        """Wait for write-back and a garbage listing's sorting to see _stopped."""
        if self._scheduler.ident is not None:
            self._scheduler.join(timeout=10)
        gc_thread = self._gc_thread
        if gc_thread is not None:
            gc_thread.join(timeout=10)

    def stop(self, clean: bool) -> None:
        """Stop workers; with clean, the journal is empty and the cache is kept."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._join_threads()
        # An unclean stop follows a drain that gave up (or a failed start): the workers
        # may be deep in retries the journal makes pointless, and killing one is safe
        # (every request is a create-if-absent or a conditional head write), so they
        # get a moment, not the clean stop's grace.
        self.pool.stop(grace=30.0 if clean else UNCLEAN_STOP_GRACE)
        if clean and not self.dirty and not self._pending:
            self.journal.reset()
        self.journal.close()
        self.clean.close()
        if self._clean_opened:
            self.clean.mark_clean_shutdown()

    @contextmanager
    def snapshot_head(self) -> Iterator[tuple[Head, int]]:
        """The head as of a FLUSH made now, and the volume's size, for a snapshot of it
        that the caller stores within the block. Garbage collection counts no listing
        begun before the block ended (S5): the listings that read the snapshots before
        its object existed could otherwise doom what it names once a checkpoint
        unnames it."""
        self.flush()
        with self._cond:
            self._refuse_if_displaced()
            self._forget_garbage_locked()
            head, size = self.head, self._size
        try:
            yield head, size
        finally:
            with self._cond:
                self._forget_garbage_locked()
                self._gc_at = min(self._gc_at, time.monotonic() + 1.0)  # the new count

    def grow(self, new_size: int) -> None:
        """The volume grew (volume.json already says so): serve the new size. Connections
        made from now on see it; existing ones keep the size they were told."""
        with self._cond:
            if new_size > self._size:
                self.map.grow(-(-new_size // self.chunk_size))
                self._size = new_size

    @property
    def last_error(self) -> str | None:
        """Why the last upload or commit failed, for a close that waits on the cloud."""
        return self._last_error

    # -- BlockDevice: properties -----------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self.settings.read_only or self.cloud.frozen

    # Everything else BlockDevice defaults to (flush, FUA, trim, zero, fast zero, cache,
    # extents) the engine does. Multi-conn is safe: one engine and one journal serve
    # every connection, so a FLUSH on any of them covers writes acknowledged on all.
    can_multi_conn = True

    # -- what the store holds --------------------------------------------------------------
    def _stamp_of(self, index: int) -> int:
        """The object that holds chunk index now (0: zeros): an upload not yet named by a
        commit, or else what the head names."""
        pending = self._pending.get(index)
        return pending[0] if pending is not None else self.map.get(index).stamp

    def _next_stamp(self) -> int:
        self._counter += 1
        return layout.stamp(self.cloud.epoch, self._counter)

    # -- writes ----------------------------------------------------------------------------
    def _apply(self, kind: Kind, offset: int, length: int, seq: int, segment: int,
               data_pos: int) -> None:
        """Lay one journal record over the extent maps (engine lock held)."""
        added: dict[int, int] = {}
        released: dict[int, int] = {}
        self._lay_locked(kind == Kind.ZERO, offset, length, seq, segment, data_pos, added,
                         released, time.monotonic())
        self.journal.account(added, released)

    def _lay_locked(self, zero: bool, offset: int, length: int, seq: int, segment: int,
                    data_pos: int, added: dict[int, int], released: dict[int, int],
                    now: float) -> None:
        """Lay a record over the extent maps; add the bytes it makes live to added and
        those it replaces to released (for Journal.account). Pieces a chunk object
        already holds (its map seq is at or past the record's) are skipped."""
        cs = self.chunk_size
        dirty = self.dirty
        pos, end = offset, offset + length
        laid = 0
        # a new write numbers above every map entry (E6): only a replayed or imported
        # record may be folded already
        replayed = seq <= self.map.max_seq
        while pos < end:
            index, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            extents = dirty.get(index)
            if (replayed and seq <= self.map.seq(index)) or (
                    zero and extents is None and not self._stamp_of(index)):
                pos += n
                continue  # folded already, or zeros everywhere: nothing to record
            if extents is None:
                extents = dirty[index] = ChunkExtents()
            extents.add(Extent(within, within + n, seq, segment,
                               0 if zero else data_pos + (pos - offset), zero), released)
            laid += n
            self._last_write[index] = now
            pos += n
        if laid:
            added[segment] = added.get(segment, 0) + laid

    def _needs_zeroing(self, offset: int, length: int) -> bool:
        first, last = offset // self.chunk_size, (offset + length - 1) // self.chunk_size
        return any(self._stamp_of(i) or i in self.dirty for i in range(first, last + 1))

    def _wait_for_room(self) -> None:
        """Backpressure: past --max-dirty, writes wait for uploads instead of failing."""
        if self.journal.live_bytes < self.settings.max_dirty:
            return
        with self._cond:
            self._cond.notify_all()
            while self.journal.live_bytes >= self.settings.max_dirty and not self._stopped:
                self._refuse_if_displaced()
                self._cond.wait(timeout=1.0)

    def _refuse_writes_if_frozen(self) -> None:
        """E7, below the NBD layer's read-only export: a frozen engine never journals."""
        if self.cloud.frozen:
            raise DeviceError(errno.EROFS, "a snapshot is served read-only")

    def _refuse_if_displaced(self) -> None:
        if self.displaced is not None:
            raise DeviceError(errno.EIO, self._displaced_message())

    def _displaced_message(self) -> str:
        return (f"the volume was taken over by {self.displaced}; this server no longer "
                f"writes to the store")

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        self._refuse_writes_if_frozen()
        self._refuse_if_displaced()
        self._wait_for_room()
        seq, segment, _ = self._append_writes(((buf, offset),))[0]
        if fua:
            self.journal.sync({segment})
            self._wait_durable(seq)

    def pwrite_now(self, buf: memoryview, offset: int) -> bool:
        return self.pwrite_many_now(((buf, offset),)) == 1

    def pwrite_many_now(self, writes: Sequence[tuple[memoryview, int]]) -> int:
        if (self.journal.live_bytes >= self.settings.max_dirty or self.displaced
                or self.cloud.frozen):
            return 0  # backpressure (or the error): pwrite, on a pool thread
        return len(self._append_writes(writes, partial=True))

    def _append_writes(self, writes: Sequence[tuple[memoryview, int]], partial: bool = False
                       ) -> list[tuple[int, int, int]]:
        """Journal WRITEs of (data, offset) and lay them over the extent maps, under one
        engine lock, in one pwritev per journal segment; their (seq, segment, data
        position). With partial, an error after some were written returns those (the
        caller's pwrite redoes the others and reports it)."""
        placed: list[tuple[int, int, int]] = []
        added: dict[int, int] = {}
        released: dict[int, int] = {}
        with self._lock:
            now = time.monotonic()
            try:
                while len(placed) < len(writes):
                    rest = writes[len(placed):]
                    done = self.journal.append_writes(rest)
                    for (buf, offset), (seq, segment, pos) in zip(rest, done, strict=False):
                        self._lay_locked(False, offset, len(buf), seq, segment, pos, added,
                                         released, now)
                    placed += done
            except OSError:
                if not partial or not placed:
                    raise
            finally:
                self.journal.account(added, released)
        return placed

    def zero(self, offset: int, length: int, fua: bool, may_trim: bool = True,
             fast: bool = False) -> None:
        # Zeroing is always fast here: it is a journal record, and whole chunks that end
        # up all zeros get no object at all.
        self._refuse_writes_if_frozen()
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
        if self.cloud.frozen:
            return  # E7: nothing was written, everything read is in the store
        self._wait_durable(self.journal.next_seq - 1)

    def _wait_durable(self, seq: int) -> None:
        """Block until a commit covers every record up to seq (E5), or the flush deadline
        passes."""
        timeout = self.settings.flush_timeout
        deadline = time.monotonic() + timeout if timeout else None
        with self._cond:
            if seq > self._flush_target:
                self._flush_target = seq
                self._cond.notify_all()
            while self.head.seq < seq:
                self._wait_locked(deadline)

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

    # -- reads -----------------------------------------------------------------------------
    def pread_into(self, buf: memoryview, offset: int) -> None:
        self._pread(buf, offset, may_wait=True)

    def pread_now(self, buf: memoryview, offset: int) -> bool:
        return self._pread(buf, offset, may_wait=False)

    def _pread(self, buf: memoryview, offset: int, may_wait: bool) -> bool:
        """Fill buf; without may_wait, give up (False) at the first chunk that needs a
        fetch or an upload to finish, leaving buf partly filled."""
        if self.displaced is not None:  # the store may hold newer data than our cache
            self._refuse_if_displaced()
        cs = self.chunk_size
        length = len(buf)
        sequential = offset == self._last_read_end
        index, within = divmod(offset, cs)
        if within + length <= cs:  # within one chunk: the usual request
            if not self._read_chunk(index, within, buf, may_wait):
                return False
        else:
            done = 0
            while done < length:
                index, within = divmod(offset + done, cs)
                n = min(cs - within, length - done)
                if not self._read_chunk(index, within, buf[done:done + n], may_wait):
                    return False
                done += n
        self._last_read_end = offset + length
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
            base: Opened | None = None
            waiter: _Fetch | None = None
            segments: set[int] | frozenset[int]
            with self._lock:
                extents = self.dirty.get(index)
                pieces = extents.overlapping(within, end) if extents is not None else []
                covered = bool(pieces) and sum(p.end - p.start for p in pieces) == len(out)
                if not covered:
                    base = self.clean.lend(index)  # C7
                    if base is None and self._stamp_of(index):  # else: zeros
                        if not may_wait:
                            return False
                        if index in self._uploading:
                            self._cond.wait()  # E2: its clean file is about to appear
                            continue
                        self.clean.misses += 1
                        waiter = self._request_fetch_locked(index)
                segments = {p.segment for p in pieces if not p.zero} if pieces else _NONE
                if segments and waiter is None:
                    self.journal.pin(segments)
            if waiter is not None:
                waiter.event.wait()
                if waiter.error is not None:
                    raise DeviceError(errno.EIO, waiter.error)
                continue
            try:
                self._fill(out, within, pieces, covered, base)
            finally:
                if base is not None:
                    self.clean.give_back(base)
                if segments:
                    self.journal.unpin(segments)
            return True

    def _fill(self, out: memoryview, within: int, pieces: list[Extent], covered: bool,
              base: Opened | None) -> None:
        if not covered:
            if base is not None:
                got = os.preadv(base.fd, [out], within)
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
            self._submit(FetchTask(self._next_task_id(), index, self._stamp_of(index)))
        return waiter

    def _prefetch(self, indexes: range) -> None:
        with self._cond:
            for index in indexes:
                if index * self.chunk_size >= self._size:
                    break
                if (self._stamp_of(index) and index not in self.clean
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
                stored = self._stamp_of(index) or index in self.dirty
                flags = 0 if stored else UNALLOCATED
                if found and found[-1][1] == flags:
                    found[-1] = (found[-1][0] + n, flags)
                else:
                    found.append((n, flags))
                pos += n
        return found

    # -- write-back: uploads ---------------------------------------------------------------
    def _next_task_id(self) -> int:
        self._task_ids += 1
        return self._task_ids

    def _submit(self, task: Task, purpose: str | None = None) -> None:
        """Hand task to the pool; purpose routes the result of a task that is not about
        one chunk (journal, page, head, list, delete)."""
        if purpose is not None:
            self._store_tasks[task.task_id] = purpose
        self.pool.submit(task)

    def _schedule(self) -> None:
        with self._cond:
            while not self._stopped:
                if self.displaced is None:
                    self._dispatch_locked()
                    self._maybe_commit_locked()
                    self._maybe_collect_garbage_locked()
                self._cond.wait(timeout=max(0.05, self.settings.writeback_delay / 2))

    def _wants_upload(self, index: int, extents: ChunkExtents, now: float,
                      pressure: bool) -> bool:
        """Whether chunk index should be uploaded whole now (engine lock held)."""
        if not extents or extents.max_seq <= self._pending.get(index, (0, 0, 0))[1]:
            return False  # everything is in an upload already
        if self._fold_needed.get(index, 0) > self.map.seq(index):
            return True  # a checkpoint folds it
        if pressure:
            return True
        settled = now - self._last_write.get(index, 0) >= self.settings.writeback_delay
        return settled and self._mostly_written(extents)

    def _dispatch_locked(self) -> None:
        room = self.pool.capacity(WorkerKind.UPLOAD) * 2 - len(self._uploading)
        if room <= 0:
            return
        now = time.monotonic()
        pressure = self.journal.live_bytes >= self.settings.max_dirty // 2
        candidates = []
        for index, extents in self.dirty.items():
            if index in self._uploading or index in self._fetching:
                continue  # E1, E2
            if self._retry_at.get(index, 0) > now:
                continue
            if self._wants_upload(index, extents, now, pressure):
                candidates.append((extents.min_seq, index))
        candidates.sort()
        for _, index in candidates[:room]:
            self._dispatch_upload_locked(index)

    def _dispatch_upload_locked(self, index: int) -> None:
        extents = self.dirty[index]
        base_stamp = 0
        if extents.covers(self.chunk_size):
            base = "zero"
        elif index in self.clean:
            base = "clean"
        elif self._stamp_of(index):
            base, base_stamp = "cloud", self._stamp_of(index)
        else:
            base = "zero"
        task = UploadTask(self._next_task_id(), index, extents.max_seq, base,
                          tuple(Piece(e.start, e.end, e.segment, e.pos, e.zero)
                                for e in extents.extents),
                          stamp=self._next_stamp(), base_stamp=base_stamp)
        segments = extents.segments()
        self.journal.pin(segments)
        self.clean.pin(index)  # C4: its clean file is about to be replaced
        self._uploading[index] = _Upload(task, segments)
        self._submit(task)

    def _on_result(self, kind: WorkerKind, result: Result) -> None:
        with self._cond:
            self.stats.retries += result.retries  # every task's: commit steps' too
            purpose = self._store_tasks.pop(result.task_id, None)
            if result.task_id in self._waiting_reads:
                self._waiting_reads[result.task_id].append(result)
            elif purpose == "list":
                self._count_garbage_requests_locked(result)
                self._listing_done_locked(result)
            elif purpose == "delete":
                self._count_garbage_requests_locked(result)
                self._gc_busy = False
                if result.outcome == Outcome.DONE:
                    self.stats.garbage_deleted += self._gc_doomed
                # G3: the head moved, and not by a commit of ours: none is in flight
                # (a head write of ours may have landed with its answer not yet
                # handled, or lost) and none ended since the delete was asked for
                if (result.outcome == Outcome.DISPLACED and self._commit is None
                        and self._gc_head_version == self.cloud.head_version):
                    self._displace_locked(result.error or "another writer")
            elif purpose is not None:
                self._count_store_task_locked(purpose, result)
                self._commit_step_done_locked(purpose, result)
            elif kind == WorkerKind.UPLOAD:
                self._upload_done_locked(result)
            else:
                self._fetch_done_locked(result)
            self._cond.notify_all()

    def _count_garbage_requests_locked(self, result: Result) -> None:
        """A garbage round's requests, for the metrics (a failed task's too)."""
        counts = dict(self.stats.garbage_requests)  # a new dict: snapshots hold the old
        for kind, count in result.requests:
            counts[kind] = counts.get(kind, 0) + count
        self.stats.garbage_requests = counts

    def _count_store_task_locked(self, purpose: str, result: Result) -> None:
        """Heads and map pages written, for status and metrics (journal objects are
        counted with their commit), and the time of each journal object's upload."""
        if result.outcome != Outcome.DONE:
            return
        if purpose == "journal" and self.on_transfer is not None:
            self.on_transfer(WorkerKind.UPLOAD, result.seconds)
        if purpose not in ("head", "page"):
            return
        if purpose == "head":
            self.stats.head_puts += 1
        else:
            self.stats.page_puts += 1
        self.stats.metadata_wire_bytes += result.wire_bytes

    def _upload_done_locked(self, result: Result) -> None:
        index = result.index
        upload = self._uploading.pop(index)
        self.journal.unpin(upload.segments)
        self.clean.unpin(index)
        self.stats.gets += result.base_gets
        self.stats.fetch_wire_bytes += result.base_wire_bytes
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
        stamp = upload.task.stamp if result.outcome == Outcome.STORED else 0
        self._pending[index] = (stamp, upload.task.seq, time.monotonic())  # E4: until named
        if stamp:
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
        if result.outcome == Outcome.CACHED:
            if self.on_transfer is not None:
                self.on_transfer(WorkerKind.FETCH, result.seconds)
            self.clean.added(result.index, result.size, result.version)
            self.stats.fetches += 1
            self.stats.gets += 1
            self.stats.fetch_wire_bytes += result.wire_bytes
        elif result.outcome != Outcome.ABSENT:
            self.stats.fetch_errors += 1
            self.stats.integrity_errors += result.integrity
            log.error("fetch of chunk %d failed: %s", result.index, result.error)
            waiter.error = result.error

    # -- commits ---------------------------------------------------------------------------
    def _maybe_commit_locked(self) -> None:
        """Start the next commit (E5) if one is due: a FLUSH waits, uploads wait to be
        named, or a checkpoint is ready."""
        if time.monotonic() < self._commit_retry_at:
            return
        if self._commit is not None:
            if self._commit.retry_head:
                self._submit_head_locked(self._commit)
            return
        if self._checkpoint_ready_locked():
            self._start_checkpoint_commit_locked()
            return
        flush = self._flush_target > self.head.seq
        oldest = min((when for _, _, when in self._pending.values()), default=None)
        uploads_due = oldest is not None and (
            time.monotonic() - oldest >= self.settings.commit_delay
            or len(self._pending) >= self.settings.commit_uploads
            or self._checkpoint_refs is not None
            or self.journal.live_bytes >= self.settings.max_dirty // 2)
        if flush:
            self._start_flush_commit_locked()
        elif uploads_due:
            self._start_commit_locked(self.head.seq, ())

    def _start_flush_commit_locked(self) -> None:
        """Commit every write acknowledged so far (C1 below). Chunks the FLUSH needs that
        are written whole (or mostly) are uploaded whole and named by CHUNK records, so
        sequential data is sent once; the other writes go into one journal object, up to
        its size bound, past which the chunks holding the most are uploaded whole too.

        C1 A commit up to seq T holds, for every byte, the newest write at or below T
        or one newer: the live extents, never only those at or below T. A piece a newer
        write replaced is gone from the extents; were the commit to hold only pieces up
        to T, the FLUSH would claim the replaced write durable while the store kept an
        older one (the power-loss campaign found exactly that)."""
        target = self.journal.next_seq - 1
        pieces: list[JournalPiece] = []
        by_chunk: list[tuple[int, int]] = []
        waiting = False
        for index, extents in self.dirty.items():
            folded = self._pending.get(index, (0, 0, 0))[1]
            mine = [e for e in extents.extents if e.seq > max(self.head.seq, folded)]
            if not mine:
                continue
            needed = any(e.seq <= self._flush_target for e in mine)
            if needed and self._mostly_written(extents):
                waiting = True
                if index not in self._uploading and index not in self._fetching:
                    self._dispatch_upload_locked(index)
                continue
            base = index * self.chunk_size
            nbytes = sum(e.end - e.start for e in mine if not e.zero)
            by_chunk.append((nbytes, index))
            pieces.extend(JournalPiece(e.seq, base + e.start, e.end - e.start, e.segment,
                                       e.pos, e.zero) for e in mine)
        total = sum(n for n, _ in by_chunk)
        if total > self.settings.flush_journal_bytes:
            for nbytes, index in sorted(by_chunk, reverse=True):
                if total <= self.settings.flush_journal_bytes:
                    break
                total -= nbytes
                waiting = True
                if index not in self._uploading and index not in self._fetching:
                    self._dispatch_upload_locked(index)
        if waiting:
            return  # the uploads' results start the commit again, with what is left
        pieces.sort(key=lambda p: p.seq)
        self._start_commit_locked(target, tuple(pieces))

    def _mostly_written(self, extents: ChunkExtents) -> bool:
        """A chunk written whole, or past fold_fraction: uploading it whole beats sending
        the writes to a journal object and the chunk again at a checkpoint."""
        written = extents.written  # == chunk_size: covered whole (extents never overlap)
        return written == self.chunk_size or written >= self.settings.fold_fraction * \
            self.chunk_size

    def _start_commit_locked(self, target: int, pieces: tuple[JournalPiece, ...]) -> None:
        chunks = tuple(JChunk(seq, index, stamp)
                       for index, (stamp, seq, _) in sorted(self._pending.items()))
        if not pieces and not chunks:
            if target > self.head.seq:  # nothing was written since: a new head is moot
                self.head = replace(self.head, seq=target)
            return
        segments = {p.segment for p in pieces}  # zeros too: the worker fsyncs them (J1)
        self.journal.pin(segments)
        commit = self._commit = _Commit(target, chunks, segments)
        groups = _cut(pieces, self.settings.journal_object_bytes)
        for number, group in enumerate(groups):
            named = chunks if number == len(groups) - 1 else ()  # with the last one
            seqs = [p.seq for p in group] + [c.seq for c in named]
            part = _JournalPart(self._next_stamp(), min(seqs), max(seqs), {}, named)
            for piece in group:
                _touch(part.touched, piece.seq, piece.offset, piece.length,
                       self.chunk_size)
            commit.parts.append(part)
            task = JournalTask(self._next_task_id(), part.stamp, group, named)
            commit.waiting[task.task_id] = part
            self._submit(task, "journal")
        self.stats.journal_bytes += sum(p.length for p in pieces if not p.zero)

    def _commit_step_done_locked(self, purpose: str, result: Result) -> None:
        """A journal object, map page or head of the commit in flight is written (E5)."""
        commit = self._commit
        if commit is None or (purpose != "head" and result.task_id not in commit.waiting):
            return  # an object write of a commit given up after another one failed
        if result.outcome == Outcome.DISPLACED:
            self._displace_locked(result.error or "another server")
            return
        if result.outcome != Outcome.DONE:
            self.stats.commit_errors += 1
            self._last_error = result.error
            log.warning("commit failed (will retry): %s", result.error)
            if purpose == "head":
                # The head may have been written with its answer lost: write the very
                # same head again, which the worker recognises (and never a new one,
                # whose condition would fail against ours and look like a takeover).
                self._commit_retry_at = time.monotonic() + self.settings.retry_backoff
                commit.retry_head = True
                return
            self.journal.unpin(commit.segments)
            self._commit = None  # the next attempt builds it again, under new stamps
            self._commit_retry_at = time.monotonic() + self.settings.retry_backoff
            return
        if purpose == "head":
            self._commit_done_locked(commit, str(result.value))
            return
        part = commit.waiting.pop(result.task_id)
        if part is not None:
            part.stored = JournalRef(part.stamp, part.first_seq, part.last_seq,
                                     result.wire_bytes)
            self.stats.journal_objects += 1
            self.stats.journal_wire_bytes += result.wire_bytes
        if not commit.waiting:
            self._write_head_locked(commit)

    def _write_head_locked(self, commit: _Commit) -> None:
        journal = tuple(r for r in self.head.journal if r not in commit.retire)
        if not commit.pages:
            journal += commit.journal  # in seq order, as a reader applies them
        pages = dict(self.head.pages)
        pages.update(commit.pages)
        for page in [p for p in pages if not self.map.page_in_use(p)] if commit.pages else []:
            del pages[page]
        commit.head = Head(self.head.volume_id, self.head.generation + 1, self.cloud.epoch,
                           max(self.head.seq, commit.target), tuple(sorted(pages.items())),
                           journal, layout.utc_now())
        self._submit_head_locked(commit)

    def _submit_head_locked(self, commit: _Commit) -> None:
        assert commit.head is not None
        commit.retry_head = False
        self._submit(HeadTask(self._next_task_id(), self.cloud.head_key, commit.head,
                              self.cloud.head_version), "head")

    def _commit_done_locked(self, commit: _Commit, version: str) -> None:
        assert commit.head is not None
        self.head = commit.head
        self.cloud = replace(self.cloud, head=commit.head, head_version=version)
        self._commit = None
        self.journal.unpin(commit.segments)
        self.stats.commits += 1
        for part in commit.parts if not commit.pages else ():
            self._journal_born[part.stamp] = time.monotonic()
            self._journal_names_locked(part.stamp, {
                layout.chunk_key(c.index, c.stamp) for c in part.chunks if c.stamp})
            self._journal_touched[part.stamp] = part.touched
        for ref in commit.retire:
            self._journal_born.pop(ref.stamp, None)
            self._journal_unnames_locked(ref.stamp)
            self._journal_touched.pop(ref.stamp, None)
        if commit.pages or commit.retire:
            self.stats.checkpoints += 1
            self.map.changed_pages.difference_update(commit.pages)
            self._checkpoint_refs = None
            self._fold_needed = {}
        for record in commit.chunks:
            if self._pending.get(record.index, (None,))[0] == record.stamp:
                del self._pending[record.index]
            if record.seq > self.map.seq(record.index):
                self._fold_locked(record.index, record.stamp, record.seq)
        self._set_journal_floor_locked()

    def _set_journal_floor_locked(self) -> None:
        """J4: below the first journal object the head names, every write is folded."""
        journal = self.head.journal
        self.journal.set_floor(min(r.first_seq for r in journal) if journal
                               else self.head.seq + 1)

    def _fold_locked(self, index: int, stamp: int, seq: int) -> None:
        """Chunk index is now object stamp as of seq (a commit named it): drop the extents
        it holds (E4)."""
        self.map.set(index, Entry(stamp, seq))
        extents = self.dirty.get(index)
        if extents is None:
            return
        released: dict[int, int] = {}
        extents.drop_through(seq, released)
        if not extents:
            del self.dirty[index]
            self._last_write.pop(index, None)
        self.journal.account({}, released)

    def _displace_locked(self, holder: str) -> None:
        """E5: another server replaced the head; stop writing to the store for good."""
        if self.displaced is None:
            self.displaced = holder
            log.error("the volume was taken over by %s (its head changed under this "
                      "server): this server stops writing, and fails every request from "
                      "now on; %d bytes of writes that no FLUSH covered stay in the local "
                      "journal", holder, self.journal.live_bytes)

    # -- checkpoints -----------------------------------------------------------------------
    def _begin_checkpoint_locked(self, fold_all: bool = False) -> None:
        """Fold the store's journal into chunks: every chunk the journal objects named now
        wrote to is uploaded whole (with whatever is newer), then the map pages that
        changed and a head without those journal objects are written. Closing
        (fold_all), every dirty chunk is folded, so that nothing but the head and what
        it names is left."""
        if self._checkpoint_refs is not None and not fold_all:
            return
        self._checkpoint_refs = self.head.journal
        needed: dict[int, int] = {}
        for ref in self._checkpoint_refs:
            for index, seq in self._journal_touched.get(ref.stamp, {}).items():
                needed[index] = max(needed.get(index, 0), seq)
        if fold_all:
            for index, extents in self.dirty.items():
                needed[index] = max(needed.get(index, 0), extents.max_seq)
        self._fold_needed = needed

    def _checkpoint_due_locked(self) -> bool:
        journal = self.head.journal
        if not journal:
            return False
        stored = sum(r.size for r in journal)
        oldest = min((self._journal_born.get(r.stamp, 0) for r in journal), default=0)
        return (stored >= self.settings.checkpoint_bytes or len(journal) >= 512
                or time.monotonic() - oldest >= self.settings.checkpoint_age)

    def _checkpoint_ready_locked(self) -> bool:
        if self._checkpoint_refs is None:
            if not self._checkpoint_due_locked():
                return False
            self._begin_checkpoint_locked()
        if self._pending or self._flush_target > self.head.seq:
            return False  # name the uploads (and the flushed writes) first
        return all(self.map.seq(i) >= seq for i, seq in self._fold_needed.items())

    def _start_checkpoint_commit_locked(self) -> None:
        retire = tuple(r for r in self._checkpoint_refs or () if r in self.head.journal)
        pages = sorted(self.map.changed_pages)
        commit = self._commit = _Commit(self.head.seq, (), set(), retire=retire)
        commit.pages = {page: self._next_stamp() for page in pages
                        if self.map.page_in_use(page)}
        # pages no chunk uses any more are dropped from the head without a write
        commit.pages.update({page: 0 for page in pages if not self.map.page_in_use(page)})
        for page, stamp in commit.pages.items():
            if stamp:
                task = PageTask(self._next_task_id(), page, stamp,
                                tuple(self.map.page_entries(page)))
                commit.waiting[task.task_id] = None
                self._submit(task, "page")
        if not commit.waiting:
            self._write_head_locked(commit)

    # -- garbage ---------------------------------------------------------------------------
    def _maybe_collect_garbage_locked(self) -> None:
        """Every gc_grace, list the volume's objects; delete those no head has named since
        the previous listing, at least gc_grace ago (docs/format.md, "Garbage")."""
        if self._gc_busy or self._commit is not None or time.monotonic() < self._gc_at:
            return
        self._gc_busy = True
        self._gc_at = time.monotonic() + self.settings.gc_grace
        self._gc_listing_round = self._gc_round
        self._gc_listing_head = self.cloud.head_version
        quiet = self._gc_quiet
        unless = quiet[1] if quiet is not None and quiet[0] == self._gc_listing_head else None
        self._submit(ListTask(self._next_task_id(), unless), "list")

    def _forget_garbage_locked(self) -> None:
        """Start garbage collection over: deleting needs two listings from now (S5)."""
        self._gc_round += 1
        self._garbage_seen = None
        self._gc_quiet = None

    def _journal_names_locked(self, stamp: int, keys: set[str]) -> None:
        """Journal object stamp, now named by the head, names chunk objects keys."""
        self._journal_chunks[stamp] = keys
        for key in keys:
            self._journal_named[key] = self._journal_named.get(key, 0) + 1

    def _journal_unnames_locked(self, stamp: int) -> None:
        """Journal object stamp is no longer named by the head (a checkpoint folded it)."""
        for key in self._journal_chunks.pop(stamp, ()):
            left = self._journal_named[key] - 1
            if left:
                self._journal_named[key] = left
            else:
                del self._journal_named[key]

    def _namer_locked(self) -> Callable[[str, layout.Kind, int, int], bool]:
        """Whether the engine names an object (key, kind, number, stamp) now, as long as
        the lock stays held: the head (its map, here with every chunk its journal's CHUNK
        records fold, its pages, its journal objects and their CHUNK records), an upload
        in flight or done and not yet committed, or the commit in flight (its journal
        objects and pages, G4). A few look-ups per key, whatever the volume's size."""
        table, count = self.map, len(self.map)
        pending, uploading, by_journal = self._pending, self._uploading, self._journal_named
        pages = dict(self.head.pages)
        journals = {ref.stamp for ref in self.head.journal}
        new_pages: dict[int, int] = {}
        if self._commit is not None:
            journals.update(part.stamp for part in self._commit.parts)
            new_pages = self._commit.pages

        def names(key: str, kind: layout.Kind, number: int, stamp: int) -> bool:
            if kind == layout.Kind.CHUNK:
                if number < count and table.get(number).stamp == stamp:
                    return True
                done = pending.get(number)
                if done is not None and done[0] == stamp:
                    return True
                upload = uploading.get(number)
                return (upload is not None and upload.task.stamp == stamp) \
                    or key in by_journal
            if kind == layout.Kind.MAP:
                return pages.get(number) == stamp or new_pages.get(number) == stamp
            return stamp in journals

        return names

    def _unnamed(self, keys: Iterable[str], max_epoch: int | None = None
                 ) -> list[str] | None:
        """Those of keys (sealed objects' keys; others are skipped) that the engine names
        no object of, of stamps of lease epoch max_epoch or earlier if given; None if
        the engine stopped meanwhile. Keys are parsed with the engine lock free and
        looked up GC_BATCH at a time, each batch under one hold of the lock (G4)."""
        found: list[str] = []
        batch: list[tuple[str, layout.Kind, int, int]] = []

        def sift() -> bool:
            with self._cond:
                if self._stopped:
                    return False
                names = self._namer_locked()
                found.extend(item[0] for item in batch if not names(*item))
            batch.clear()
            return True

        for key in keys:
            parsed = layout.parse_key(key)
            if parsed is None or (max_epoch is not None
                                  and layout.epoch_of(parsed[2]) > max_epoch):
                continue
            batch.append((key, *parsed))
            if len(batch) >= GC_BATCH and not sift():
                return None
        if batch and not sift():
            return None
        return found

    def _listing_done_locked(self, result: Result) -> None:
        """A listing came back (on the pool's thread, which also carries the commits'
        results): its keys are sorted on a thread of their own, never under one long
        hold of the engine lock (G4)."""
        if result.outcome != Outcome.DONE:
            log.warning("garbage collection skipped: %s", result.error)
            self._gc_busy = False
            return
        if result.value.unchanged:  # G5: nothing can have become garbage
            self.stats.garbage_quiet_rounds += 1
            self._gc_busy = False
            self._cond.notify_all()
            return
        if self._stopped:
            self._gc_busy = False
            return
        thread = threading.Thread(target=self._sort_listing, args=(result.value,),
                                  name="garbage", daemon=True)
        thread.start()
        self._gc_thread = thread  # published started: stop and halt join it unlocked

    def _sort_listing(self, listing: Listing) -> None:
        try:
            self._garbage_listed(listing)
        except Exception:  # a bug: collection must not stop for good
            log.exception("garbage collection failed")
            with self._cond:
                self._gc_busy = False
                self._cond.notify_all()

    def _garbage_listed(self, listing: Listing) -> None:
        """Garbage is what two listings at least a grace apart found unnamed (G1), of
        stamps no later than our lease's epoch (G2); deleted only while the head is
        still ours (G3). The engine lock is held for a batch of keys at a time (G4).

        G1 A reader of an older head (an export elsewhere) keeps its objects a grace.
        G2 A server learns it was displaced only when a head write fails, and an idle one
           writes none: its collector would take every object of the new holder, whose
           head it has never read, for garbage (the new holder's stamps carry a later
           epoch). tests/test_actors.py shows the map pages of a checkpoint lost so.
        G3 And the delete itself checks first that the head is still at the version we
           wrote or read last: a writer of an earlier epoch that committed after all
           (a new holder loses to a commit between its read of the head and its first
           write) is protected, and this server learns it was displaced.
        G4 An object unnamed at one instant is unnamed at every later one (_namer_locked
           says what names are). What the head names at start is named from the start;
           every name the engine gives later is a stamp it makes then (_next_stamp:
           epoch and counter, unique), named from the same hold of the lock on:
           an upload's chunk in _uploading, then _pending, then by the commit that takes
           it from _pending only once its head is written and the map names it; a
           commit's journal objects and pages in the commit in flight, then in the head.
           A stamp that leaves the names (a chunk replaced in the map, a failed upload,
           a commit given up, whose next attempt makes new stamps, a journal object a
           checkpoint folds, a page rewritten) never comes back: the map and the head
           only ever take a commit's fresh stamps. Snapshots taken here name the
           head's objects, i.e. named ones, and drop the round (S5, below); a rollback
           or a snapshot's objects named by another writer's head are that writer's
           (offline, under the lease: G3 stops our delete, and kept_by_snapshots keeps
           what any snapshot needs out of the listing). So looking keys up a batch at a
           time, at slightly different instants, decides as one look at the end would,
           except that an object unnamed meanwhile is kept a round more: never sooner.
           An object found unnamed by a listing has been unnamed ever since, so the
           next listing, 0.9 grace or more after this one's keys were looked up, finds
           it unnamed for at least that long (G1). Counting the commit in flight's
           objects as named keeps G4 true for them; and no listing starts while a
           commit is in flight, so every object a listing sees was either stored
           before it began with no commit in flight, or belongs to a commit started
           since (named, or given up), or is another writer's.

        G5 A listing that finds nothing unnamed (nothing to delete, nothing awaiting its
           second listing) leaves the head version it began at and the snapshots it
           read; while a round begins at that head version and one LIST of the
           snapshots answers the same, that LIST is the round. Nothing can have become
           garbage meanwhile: a stamp leaves the names only by a commit of ours (the
           head moves), a snapshot's deletion (the LIST differs), or a stamp dropped
           before any head took it, whose chunk stays dirty until a commit names its
           new stamp (the head moves). Others leave objects of earlier epochs, there
           and listed since our open, or of later ones (G2). Skipping only delays.

        S5 (snapshot_head) drops a round that a snapshot began during: its listing may
        have read the snapshots before the new one existed. The snapshot figures are
        each kept object's size if the head did not name it when looked up: by G4,
        between the figures of one look at the start and one at the end."""
        kept = self._unnamed(listing.kept_sizes)
        if kept is None:
            return
        usage = sum(listing.kept_sizes[key] for key in kept)
        unnamed = self._unnamed(listing.unkept, max_epoch=self.cloud.epoch)
        if unnamed is None:
            return
        garbage = set(unnamed)
        with self._cond:
            self._snapshot_usage = (listing.snapshots, usage)
            current = self._gc_listing_round == self._gc_round
            seen = self._garbage_seen
            if not current or self._stopped:
                self._gc_busy = False
                self._cond.notify_all()
                return
        now = time.monotonic()
        doomed: list[str] = []
        if seen is not None and now - seen[0] >= self.settings.gc_grace * 0.9:
            doomed = sorted(garbage & seen[1])
        garbage.difference_update(doomed)
        with self._cond:
            if self._stopped:
                return
            if self._gc_listing_round != self._gc_round:  # a snapshot began meanwhile
                self._gc_busy = False
                self._cond.notify_all()
                return
            self.stats.garbage_listings += 1
            self._garbage_seen = (now, garbage)
            self._gc_quiet = None if garbage or doomed else \
                (self._gc_listing_head, listing.marks)
            if doomed:
                self._gc_doomed = len(doomed)
                self._gc_head_version = self.cloud.head_version
                self._submit(DeleteTask(self._next_task_id(), tuple(doomed),
                                        self.cloud.head_key, self._gc_head_version),
                             "delete")
            else:
                self._gc_busy = False
            self._cond.notify_all()

    # -- status ----------------------------------------------------------------------------
    def snapshot(self) -> EngineSnapshot:
        """What the engine is doing now, for status and metrics."""
        dirty_bytes, dirty_chunks, oldest = self.backlog()
        with self._cond:
            head, usage = self.head, self._snapshot_usage
        clean = self.clean
        return EngineSnapshot(
            dirty_bytes, dirty_chunks, oldest, len(head.journal),
            sum(r.size for r in head.journal), head.generation, self.journal.bytes_on_disk,
            clean.bytes, clean.max_bytes, clean.hits, clean.misses, replace(self.stats),
            self.displaced, {str(kind): self.pool.pids(kind) for kind in WorkerKind},
            *(usage or (None, None)))

    def wait_for_stats(self, done: Callable[[EngineStats], bool], timeout: float) -> bool:
        """Block until done(stats) holds (checked as each worker result is handled), or
        timeout seconds pass; whether it holds. For tools and tests that wait for the
        engine's background work (a checkpoint, a garbage listing)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done(self.stats):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def backlog(self) -> tuple[int, int, float]:
        """(bytes, chunks, age in seconds of the oldest) of the writes no head names yet:
        what a crash of this machine now would leave only in the local journal. Writes
        a FLUSH made durable in the store's journal are not backlog, though they stay in
        the local journal until a checkpoint folds them (store_journal in snapshot)."""
        with self._cond:
            committed = self.head.seq
            nbytes, chunks, oldest = 0, 0, None
            for index, extents in self.dirty.items():
                mine = [e.end - e.start for e in extents.extents if e.seq > committed]
                if mine:
                    nbytes += sum(mine)
                    chunks += 1
                    when = self._last_write.get(index)
                    if when is not None and (oldest is None or when < oldest):
                        oldest = when
            return nbytes, chunks, 0.0 if oldest is None else time.monotonic() - oldest

    def work_left(self) -> int:
        """What drain() still has to do, in the unit of its progress reports."""
        with self._cond:
            return self._backlog_locked()

def _cut(pieces: tuple[JournalPiece, ...], limit: int) -> list[tuple[JournalPiece, ...]]:
    """Pieces (in seq order) in runs of at most limit bytes of data each (a piece
    larger than limit alone), for one journal object each; at least one run, so that
    a commit of uploads only has an object for its CHUNK records."""
    runs: list[tuple[JournalPiece, ...]] = []
    run: list[JournalPiece] = []
    held = 0
    for piece in pieces:
        size = 0 if piece.zero else piece.length
        if run and held + size > limit:
            runs.append(tuple(run))
            run, held = [], 0
        run.append(piece)
        held += size
    runs.append(tuple(run))
    return runs


def _touch(touched: dict[int, int], seq: int, offset: int, length: int,
           chunk_size: int) -> None:
    """Note that a write of seq touched the chunks [offset, offset+length) lies in."""
    for index in range(offset // chunk_size, (offset + length - 1) // chunk_size + 1):
        touched[index] = max(touched.get(index, 0), seq)
