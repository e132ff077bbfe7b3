"""Uploader and fetcher processes, and the pool that feeds them.

Compression, encryption and every cloud request run here, never in the front process.
Each worker has its own duplex pipe to the front (never a queue shared between workers),
so a worker killed at any moment can only lose its own in-flight tasks: the pool notices
the death through the process sentinel, starts a replacement and hands the lost tasks to
it again. Tasks are idempotent: every object is created under a fresh name with
create-if-absent (objects.py W1), the head only conditionally (W2), and a fetch rewrites
one clean file, so doing one twice is harmless, and a request that arrives late can
only fail.

Only small messages cross the pipes: chunk numbers, sequence numbers, journal positions
and a journal object's records when open reads one. Chunk data moves through files
(journal segments, clean cache files).

A worker must never outlive the front that started it. Nothing it sends can overwrite
anything any more, but an orphan's objects would be named by nobody, and two fronts'
workers would race to write the same clean files. So every worker asks the kernel to
kill it when the front dies (zygote.bind_to_front), and holds a shared lock on
`workers.lock` in the cache directory for its whole life; a new front takes that lock
exclusively before it replays the journal (wait_for_orphans), which waits out any
worker still alive.

Task contracts (see device.Engine):
- an upload or a journal object reads only journal segments it has fsync'd, and fsyncs
  the segments of its zero pieces too (J1);
- an upload writes the new clean file to a temporary name and renames it into place
  before the result is sent; a chunk that came out all zeros creates no object;
- every result that puts a clean file in place carries the stamp of the object the file
  copies, which the clean cache records (cache.py, C6);
- a head write that loses its condition reports DISPLACED, naming the lease's holder.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from cloudnbd import layout, lease, logs, zygote
from cloudnbd.backends import StoreOptions, open_store
from cloudnbd.backends.base import ObjectStore
from cloudnbd.chunks import ChunkCodec
from cloudnbd.engine import localfs
from cloudnbd.engine.cache import clean_path, clean_temp_path
from cloudnbd.engine.journal import segment_path
from cloudnbd.engine.malloc import limit_malloc_retention
from cloudnbd.errors import CloudnbdError, IntegrityError, PreconditionFailed
from cloudnbd.layout import Entry, Head, JChunk, JournalBuilder
from cloudnbd.objects import SnapshotMarks, VolumeObjects

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; sent through its pipe at start, never via argv/env."""

    backend: str
    location: str
    options: StoreOptions
    codec: ChunkCodec  # keys, chunk size, zstd level
    clean_dir: Path
    journal_dir: Path
    threads: int = 1
    log_level: int = logging.WARNING


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of the chunk come from journal `segment` at `pos`, or are zero."""

    start: int
    end: int
    segment: int
    pos: int
    zero: bool


@dataclass(frozen=True)
class UploadTask:
    """Build chunk `index` as of `seq` (its base, the pieces laid over) and create its
    object under `stamp`."""

    task_id: int
    index: int
    seq: int
    base: str  # "zero": start from zeros; "clean": the clean file; "cloud": GET base_stamp
    pieces: tuple[Piece, ...]
    stamp: int  # the new object's stamp
    base_stamp: int = 0  # the object the base comes from when base is "cloud"


@dataclass(frozen=True)
class FetchTask:
    task_id: int
    index: int
    stamp: int  # the object the map names


@dataclass(frozen=True)
class JournalPiece:
    """A write (or zeros) to put in a journal object: [offset, offset+length) of the
    volume, its data at `pos` of local journal `segment`."""

    seq: int
    offset: int
    length: int
    segment: int
    pos: int
    zero: bool


@dataclass(frozen=True)
class JournalTask:
    """Create journal/<stamp>: the pieces (seq order) then the CHUNK records."""

    task_id: int
    stamp: int
    pieces: tuple[JournalPiece, ...]
    chunks: tuple[JChunk, ...]
    index: int = -1  # not a chunk; keeps the pool's bookkeeping uniform


@dataclass(frozen=True)
class PageTask:
    task_id: int
    page: int
    stamp: int
    entries: tuple[Entry, ...]
    index: int = -1


@dataclass(frozen=True)
class HeadTask:
    """Replace the head, conditionally on the version the engine last wrote (W2)."""

    task_id: int
    key: str
    head: Head
    expected: str | None
    index: int = -1


@dataclass(frozen=True)
class ReadJournalTask:
    """Download and decode journal/<stamp> (open, on a machine whose journal is not
    the volume's newest)."""

    task_id: int
    stamp: int
    index: int = -1


@dataclass(frozen=True)
class ReadPageTask:
    """Download and decode map/<page>-<stamp> (open)."""

    task_id: int
    page: int
    stamp: int
    index: int = -1


@dataclass(frozen=True)
class ListTask:
    """The keys of every version-3 object of the volume but the head that no snapshot
    needs (S4; a snapshot that cannot be read fails the task: nothing is collected).
    Answered with a Listing. With unless, the snapshots are listed first, and if they
    are still what unless says, nothing more is done (G5 in engine/device.py)."""

    task_id: int
    unless: SnapshotMarks | None = None
    index: int = -1


@dataclass(frozen=True)
class Listing:
    """A ListTask's answer: the listed keys no snapshot needs (the engine drops those
    its head names: the rest is garbage), and what the snapshots keep: how many there
    are, and the listed objects they need, with sizes (those the head does not name are
    kept alive only by snapshots: status and metrics)."""

    unkept: tuple[str, ...]
    snapshots: int
    kept_sizes: dict[str, int]
    #: the snapshot listing the kept objects come from
    marks: SnapshotMarks = ()
    #: the snapshots were what the task's unless said: nothing else was listed
    unchanged: bool = False


@dataclass(frozen=True)
class DeleteTask:
    """Delete garbage, unless the head is no longer at expected (G2 in engine/device.py):
    then another writer holds the volume and these may be its objects."""

    task_id: int
    keys: tuple[str, ...]
    head_key: str
    expected: str
    index: int = -1


Task = (UploadTask | FetchTask | JournalTask | PageTask | HeadTask | ReadJournalTask
        | ReadPageTask | ListTask | DeleteTask)


class WorkerKind(StrEnum):
    """The two kinds of worker process: fetchers read chunks for NBD reads, uploaders do
    everything else (every write, and the reads of open and garbage collection)."""

    UPLOAD = "upload"
    FETCH = "fetch"


def kind_of(task: Task) -> WorkerKind:
    """Which kind of worker runs task."""
    return WorkerKind.FETCH if isinstance(task, FetchTask) else WorkerKind.UPLOAD


class Outcome(StrEnum):
    """How a task ended (Result.outcome)."""

    STORED = "stored"  # upload: the chunk object was created (stamp)
    ZEROS = "zeros"  # upload: the chunk came out all zeros: no object
    CACHED = "cached"  # fetch: the clean file is in place
    ABSENT = "absent"  # fetch: the map names no object (zeros)
    DONE = "done"  # journal, page, head, read, list, delete: done
    ERROR = "error"  # error says why; the engine retries
    DISPLACED = "displaced"  # head: another writer replaced it; error says who holds it


@dataclass(frozen=True)
class Result:
    task_id: int
    index: int
    outcome: Outcome
    size: int = 0  # clean file size, or plain bytes of a journal object
    wire_bytes: int = 0
    error: str | None = None
    integrity: bool = False
    seconds: float = 0.0
    retries: int = 0
    base_gets: int = 0  # GETs an upload made for the rest of a partly written chunk
    base_wire_bytes: int = 0  # and the bytes they received
    # the version of the object the new clean file copies (C6): its stamp, hex
    version: str | None = None
    #: what a task returns besides: the head's new version (head), the records of a
    #: journal object (read), keys (list)
    value: Any = None
    #: the requests the store answered for the task, by kind (ObjectStore.counting)
    requests: tuple[tuple[str, int], ...] = ()


class RateLimiter:
    """A token bucket shared by all uploaders: spaces request starts so that the bytes
    sent average out to `rate` per second."""

    def __init__(self, rate: float, ctx: Any = multiprocessing) -> None:
        self.rate = rate
        self._next = ctx.Value("d", 0.0)

    def acquire(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        with self._next.get_lock():
            now = time.monotonic()
            start = max(self._next.value, now)
            self._next.value = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)


# -- inside a worker process ---------------------------------------------------------------

class _Worker:
    def __init__(self, config: WorkerConfig, limiter: RateLimiter | None) -> None:
        self.config = config
        self.limiter = limiter
        self.store: ObjectStore = open_store(config.backend, config.location, config.options)
        self.objects = VolumeObjects(self.store, config.codec)

    def _write_clean(self, index: int, data: bytes | bytearray, tag: str) -> None:
        tmp = clean_temp_path(self.config.clean_dir, index, tag)
        localfs.write_file(tmp, data)
        localfs.replace(tmp, clean_path(self.config.clean_dir, index))

    def _segments(self, segments: set[int]) -> dict[int, int]:
        """Open journal segments, fsync'd (J1: durable locally before the cloud has them).
        Opened per task: the front deletes segments once no longer needed, and a
        descriptor kept here would keep their disk space allocated."""
        fds: dict[int, int] = {}
        try:
            for segment in segments:
                fds[segment] = localfs.open(segment_path(self.config.journal_dir, segment),
                                            os.O_RDONLY)
                localfs.fsync(fds[segment])
        except BaseException:
            _close_all(fds)
            raise
        return fds

    def upload(self, task: UploadTask) -> Result:
        started = time.monotonic()
        fds = self._segments({p.segment for p in task.pieces})  # J1: zero pieces too
        try:
            plain, base_wire_bytes = self._assemble(task, fds)
        finally:
            _close_all(fds)
        sent = self.objects.put_chunk(task.index, task.stamp, plain, pacer=self.limiter)
        stored = sent.key is not None
        if stored:
            self._write_clean(task.index, plain, f"u{task.task_id}")
        return Result(task.task_id, task.index, Outcome.STORED if stored else Outcome.ZEROS,
                      size=len(plain) if stored else 0, wire_bytes=sent.wire_bytes,
                      seconds=time.monotonic() - started,
                      base_gets=int(task.base == "cloud"), base_wire_bytes=base_wire_bytes,
                      version=f"{task.stamp:016x}" if stored else None)

    def _assemble(self, task: UploadTask, fds: dict[int, int]) -> tuple[bytearray, int]:
        """The chunk's new plain contents, its base with the journal pieces laid over, and
        the bytes received to get that base."""
        cfg = self.config
        plain = bytearray(cfg.codec.chunk_size)
        view = memoryview(plain)
        received = 0
        if task.base == "clean":
            with open(clean_path(cfg.clean_dir, task.index), "rb") as f:
                f.readinto(plain)
        elif task.base == "cloud":
            base, received = self.objects.get_chunk(task.index, task.base_stamp)
            if base is not None:
                plain[:] = base
        for piece in task.pieces:
            target = view[piece.start:piece.end]
            if piece.zero:
                target[:] = bytes(len(target))
            else:
                _read_exactly(fds[piece.segment], target, piece.pos, piece.segment)
        return plain, received

    def fetch(self, task: FetchTask) -> Result:
        started = time.monotonic()
        plain, wire_bytes = self.objects.get_chunk(task.index, task.stamp)
        if plain is None:
            return Result(task.task_id, task.index, Outcome.ABSENT)
        self._write_clean(task.index, plain, f"f{task.task_id}")
        return Result(task.task_id, task.index, Outcome.CACHED, size=len(plain),
                      wire_bytes=wire_bytes, seconds=time.monotonic() - started,
                      version=f"{task.stamp:016x}")

    def journal(self, task: JournalTask) -> Result:
        """Create a journal object: the commit's data, from the local journal (J1)."""
        started = time.monotonic()
        builder = JournalBuilder()
        # J1 for every record the object holds, a ZERO too: an open on this machine
        # replays its own journal, not the store's, so a zeroing the store has but the
        # local journal lost would bring the older data back (power-loss campaign)
        fds = self._segments({p.segment for p in task.pieces})
        try:
            for piece in task.pieces:
                if piece.zero:
                    builder.add_zero(piece.seq, piece.offset, piece.length)
                else:
                    data = bytearray(piece.length)
                    _read_exactly(fds[piece.segment], memoryview(data), piece.pos,
                                  piece.segment)
                    builder.add_write(piece.seq, piece.offset, data)
        finally:
            _close_all(fds)
        for record in task.chunks:
            builder.add_chunk(record.seq, record.index, record.stamp)
        sent = self.objects.put_journal(task.stamp, builder)
        return Result(task.task_id, task.index, Outcome.DONE, size=builder.size,
                      wire_bytes=sent.wire_bytes, seconds=time.monotonic() - started)

    def head(self, task: HeadTask) -> Result:
        started = time.monotonic()
        try:
            version = self.objects.put_head(task.key, task.head, task.expected)
        except PreconditionFailed:
            # An earlier attempt of this very head may have landed with its answer lost
            # (the encoding is deterministic): then it is ours. Otherwise another
            # writer replaced the head: we are displaced (E5).
            found = self.store.stat(task.key)
            if found is not None and self.objects.holds_head(task.key, task.head):
                version = found.version
            else:
                return Result(task.task_id, task.index, Outcome.DISPLACED,
                              error=_holder_description(self.store))
        return Result(task.task_id, task.index, Outcome.DONE, value=version,
                      wire_bytes=self.objects.head_size(task.head),
                      seconds=time.monotonic() - started)

    def run(self, task: Task) -> Result:
        """Run task; its result counts the requests the store retried for it, whatever
        the task (chunks, journal objects, pages, the head: all show in the metrics), and
        the requests it made, by kind."""
        retries_before = self.store.retries
        with self.store.counting() as requests:
            result = self._run_reporting(task)
        return replace(result, retries=self.store.retries - retries_before,
                       requests=tuple(sorted(requests.items())))

    def _run_reporting(self, task: Task) -> Result:
        try:
            return self._run(task)
        except IntegrityError as exc:
            return Result(task.task_id, task.index, Outcome.ERROR, error=exc.message,
                          integrity=True)
        except CloudnbdError as exc:
            return Result(task.task_id, task.index, Outcome.ERROR, error=exc.message)
        except Exception as exc:  # a bug or a local I/O error: report, keep serving
            log.error("worker task failed: %s", traceback.format_exc())
            return Result(task.task_id, task.index, Outcome.ERROR,
                          error=f"{type(exc).__name__}: {exc}")

    def _run(self, task: Task) -> Result:
        if isinstance(task, UploadTask):
            return self.upload(task)
        if isinstance(task, FetchTask):
            return self.fetch(task)
        if isinstance(task, JournalTask):
            return self.journal(task)
        if isinstance(task, HeadTask):
            return self.head(task)
        if isinstance(task, PageTask):
            sent = self.objects.put_page(task.page, task.stamp, task.entries)
            return Result(task.task_id, task.index, Outcome.DONE, wire_bytes=sent.wire_bytes)
        if isinstance(task, ReadJournalTask):
            records, wire_bytes = self.objects.get_journal(task.stamp)
            return Result(task.task_id, task.index, Outcome.DONE, wire_bytes=wire_bytes,
                          value=records)
        if isinstance(task, ReadPageTask):
            return Result(task.task_id, task.index, Outcome.DONE,
                          value=self.objects.get_page(task.page, task.stamp))
        if isinstance(task, ListTask):
            return Result(task.task_id, task.index, Outcome.DONE, value=self.listing(task))
        found = self.store.stat(task.head_key)
        if found is None or found.version != task.expected:
            return Result(task.task_id, task.index, Outcome.DISPLACED,
                          error=_holder_description(self.store))
        self.store.delete_many(task.keys)
        return Result(task.task_id, task.index, Outcome.DONE)

    def listing(self, task: ListTask) -> Listing:
        """A ListTask's answer: one LIST of the snapshots when they are as task.unless
        says; else the objects first, then the snapshots (a snapshot deleted in between
        keeps its objects one round more, never the other way round)."""
        if task.unless is not None:
            marks = self.objects.snapshot_marks()
            if marks == task.unless:
                return Listing((), 0, {}, marks, unchanged=True)
        listed = list(self.objects.list_own())
        marks = self.objects.snapshot_marks()
        kept = self.objects.kept_by_snapshots(threads=2, marks=marks)
        return Listing(tuple(info.key for info in listed if info.key not in kept),
                       sum(1 for key in kept if layout.snapshot_name(key) is not None),
                       {info.key: info.size for info in listed if info.key in kept}, marks)


def _holder_description(store: ObjectStore) -> str:
    """Who holds the lease now, for the message of a displaced server."""
    holder = lease.holder(store)
    return holder.describe() if holder is not None else "another writer"


def _close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        localfs.close(fd)


def _read_exactly(fd: int, target: memoryview, pos: int, segment: int) -> None:
    if os.preadv(fd, [target], pos) != len(target):
        raise IntegrityError(f"journal segment {segment} is short")


WORKERS_LOCK = "workers.lock"


def wait_for_orphans(cache_dir: Path) -> None:
    """Block until no worker of an earlier front is alive (see the module docstring)."""
    fd = os.open(cache_dir / WORKERS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _worker_main(conn: multiprocessing.connection.Connection,
                 limiter: RateLimiter | None, front_pid: int) -> None:
    zygote.bind_to_front(front_pid)
    limit_malloc_retention()
    config: WorkerConfig = conn.recv()
    lock_fd = os.open(config.journal_dir.parent / WORKERS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_SH)  # held until this process exits
    logs.configure(config.log_level, "cloudnbd worker")
    worker = _Worker(config, limiter)
    send_lock = threading.Lock()
    tasks: queue.Queue[Any] = queue.Queue()

    def serve() -> None:
        while True:
            task = tasks.get()
            if task is None:
                return
            result = worker.run(task)
            with send_lock:
                conn.send(result)

    threads = [threading.Thread(target=serve, daemon=True) for _ in range(config.threads)]
    for thread in threads:
        thread.start()
    with send_lock:
        conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except EOFError:
            message = None
        if message is None:
            for _ in threads:
                tasks.put(None)
            for thread in threads:
                thread.join()
            return
        tasks.put(message)


# -- in the front process -------------------------------------------------------------------

@dataclass
class _Handle:
    kind: WorkerKind
    process: Any
    conn: multiprocessing.connection.Connection
    in_flight: dict[int, Task] = field(default_factory=dict)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    ready: bool = False


class WorkerPool:
    """Starts, feeds, watches and restarts the uploader and fetcher processes.

    on_result is called from the pool's own thread for every finished task.
    """

    def __init__(self, config: WorkerConfig, uploaders: int, fetchers: int,
                 on_result: Callable[[WorkerKind, Result], None], upload_limit: float = 0,
                 threads_per_process: int = 1) -> None:
        self.config = config
        self.on_result = on_result
        self._ctx = zygote.context(config.backend)
        self.limiter = RateLimiter(upload_limit, self._ctx) if upload_limit > 0 else None
        self.threads = threads_per_process
        self.counts = {WorkerKind.UPLOAD: uploaders, WorkerKind.FETCH: fetchers}
        self._handles: list[_Handle] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._wakeup_r, self._wakeup_w = multiprocessing.Pipe(duplex=False)
        self._thread = threading.Thread(target=self._watch, name="worker-pool", daemon=True)
        self.restarts = 0

    def start(self) -> None:
        for kind, count in self.counts.items():
            for _ in range(count):
                self._handles.append(self._spawn(kind))
        self._thread.start()

    def _spawn(self, kind: WorkerKind) -> _Handle:
        parent, child = multiprocessing.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child, self.limiter, os.getpid()),
                              name=f"cloudnbd-{kind}er", daemon=True)
        process.start()
        child.close()
        parent.send(WorkerConfig(**{**self.config.__dict__, "threads": self.threads}))
        return _Handle(kind, process, parent)

    def pids(self, kind: WorkerKind | str) -> list[int]:
        with self._lock:
            return [h.process.pid for h in self._handles if h.kind == kind]

    def capacity(self, kind: WorkerKind | str) -> int:
        return self.counts[kind] * self.threads

    def submit(self, task: Task) -> None:
        kind = kind_of(task)
        with self._lock:
            handle = min((h for h in self._handles if h.kind == kind),
                         key=lambda h: len(h.in_flight))
            handle.in_flight[task.task_id] = task
        with handle.send_lock:
            try:
                handle.conn.send(task)
            except (BrokenPipeError, OSError):
                pass  # the watcher will see the death and resubmit

    def _watch(self) -> None:
        while True:
            with self._lock:
                handles = list(self._handles)
            waitables: list[Any] = [self._wakeup_r]
            for h in handles:
                waitables += [h.conn, h.process.sentinel]
            ready = multiprocessing.connection.wait(waitables)
            if self._stopping:
                return
            for h in handles:
                if h.conn in ready:
                    try:
                        message = h.conn.recv()
                    except (EOFError, OSError):
                        message = None
                    if message == "ready":
                        h.ready = True
                    elif isinstance(message, Result):
                        with self._lock:
                            h.in_flight.pop(message.task_id, None)
                        try:
                            self.on_result(h.kind, message)
                        except Exception:  # this thread must outlive a bug in one result
                            log.exception("handling %s result %s failed", h.kind, message)
                if h.process.sentinel in ready and not h.process.is_alive():
                    self._replace(h)

    def _replace(self, dead: _Handle) -> None:
        log.warning("%ser process %d died (exit %s); starting another", dead.kind,
                    dead.process.pid, dead.process.exitcode)
        self.restarts += 1
        fresh = self._spawn(dead.kind)
        with self._lock:
            self._handles.remove(dead)
            self._handles.append(fresh)
            lost = list(dead.in_flight.values())
        dead.conn.close()
        for task in lost:
            self.submit(task)

    def stop(self, grace: float = 30.0) -> None:
        """Ask every worker to exit; kill one still busy after grace seconds."""
        self._stopping = True
        self._wakeup_w.send(None)
        self._thread.join(timeout=10)
        for h in self._handles:
            with h.send_lock:
                try:
                    h.conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        for h in self._handles:
            h.process.join(timeout=grace)
            if h.process.is_alive():
                h.process.kill()
                h.process.join()
