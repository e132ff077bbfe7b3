"""Uploader and fetcher processes, and the pool that feeds them.

Compression, encryption and every cloud request run here, never in the front process.
Each worker has its own duplex pipe to the front (never a queue shared between workers),
so a worker killed at any moment can only lose its own in-flight tasks: the pool notices
the death through the process sentinel, starts a replacement and hands the lost tasks to
it again. Tasks are idempotent (an upload PUTs or DELETEs one whole chunk object; a
fetch rewrites one clean file), so doing one twice is harmless.

Only small messages cross the pipes: chunk numbers, sequence numbers and journal
positions. Chunk data moves through files (journal segments, clean cache files).

A worker must never outlive the front that started it: an orphan finishing an old PUT
after a new front has uploaded newer data for the same chunk would roll the chunk back.
So every worker asks the kernel to kill it when the front dies (zygote.bind_to_front), and
holds a shared lock on `workers.lock` in the cache directory for its whole life; a new
front takes that lock exclusively before it replays the journal (wait_for_orphans), which
waits out any worker still alive.

Upload task contract (see device.Engine):
- before its PUT, an uploader fsyncs every journal segment the task reads (journal J1);
- the PUT or DELETE is conditional on the version the task expects (F1); when the object
  changed behind the engine's back, the upload first proves that the volume's lease is
  still ours: then the change was a late request of a dead process of ours, and the
  upload, which is newer, writes over it, conditional on what is there (F2,
  _Worker._fenced); otherwise another server took the volume over and the upload
  reports "displaced" without writing (F3);
- the new clean file is written to a temporary name and renamed into place before the
  result is sent; a chunk that came out all zeros is DELETEd, not stored.

Every result that puts a clean file in place carries the version of the object the
file copies: the one the upload's PUT created, or the one the fetch's GET read (never
a version looked up beside it), which the clean cache records (cache.py, C6).
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
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cloudnbd import lease, logs, zygote
from cloudnbd.backends import StoreOptions, open_store
from cloudnbd.backends.base import ObjectStore
from cloudnbd.chunks import ChunkCodec, ChunkStore
from cloudnbd.engine import localfs
from cloudnbd.engine.cache import clean_path, clean_temp_path
from cloudnbd.engine.journal import segment_path
from cloudnbd.engine.malloc import limit_malloc_retention
from cloudnbd.errors import CloudnbdError, Displaced, IntegrityError

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
    #: the version of the lease object while this volume's server holds it (None: the
    #: caller holds no lease, e.g. tests of the engine alone; nothing is checked then)
    lease_version: str | None = None


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
    task_id: int
    index: int
    seq: int
    base: str  # "zero": start from zeros; "clean": the clean file; "cloud": GET the object
    pieces: tuple[Piece, ...]
    expected: str | None = None  # the object's version the engine last saw (None: none)


@dataclass(frozen=True)
class FetchTask:
    task_id: int
    index: int


@dataclass(frozen=True)
class LeaseTask:
    """Is the volume's lease still ours? Asked before a FLUSH is acknowledged (F3)."""

    task_id: int
    index: int = -1  # not a chunk; keeps the pool's bookkeeping uniform


Task = UploadTask | FetchTask | LeaseTask


class WorkerKind(StrEnum):
    """The two kinds of worker process; a lease check goes to an uploader."""

    UPLOAD = "upload"
    FETCH = "fetch"


def kind_of(task: Task) -> WorkerKind:
    """Which kind of worker runs task."""
    return WorkerKind.FETCH if isinstance(task, FetchTask) else WorkerKind.UPLOAD


class Outcome(StrEnum):
    """How a task ended (Result.outcome)."""

    STORED = "stored"  # upload: the chunk object was written
    DELETED = "deleted"  # upload: the chunk came out all zeros, its object is gone
    CACHED = "cached"  # fetch: the clean file is in place
    ABSENT = "absent"  # fetch: the store holds no object (zeros)
    ERROR = "error"  # error says why; the engine retries uploads
    DISPLACED = "displaced"  # upload met another holder of the lease (F3); error: who
    LEASE_HELD = "lease-held"  # lease check: still ours
    LEASE_LOST = "lease-lost"  # lease check: error says who holds it now


@dataclass(frozen=True)
class Result:
    task_id: int
    index: int
    outcome: Outcome
    size: int = 0  # clean file size, or bytes sent/received
    wire_bytes: int = 0
    error: str | None = None
    integrity: bool = False
    seconds: float = 0.0
    retries: int = 0
    base_gets: int = 0  # GETs an upload made for the rest of a partly written chunk
    base_wire_bytes: int = 0  # and the bytes they received
    # the version of the object the new clean file copies (an upload's PUT, a fetch's
    # GET); after an upload that deleted the object, None
    version: str | None = None
    fenced: bool = False  # the object had changed since the engine last saw it


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
        self.chunks = ChunkStore(self.store, config.codec)

    def _write_clean(self, index: int, data: bytes | bytearray, tag: str) -> None:
        tmp = clean_temp_path(self.config.clean_dir, index, tag)
        localfs.write_file(tmp, data)
        localfs.replace(tmp, clean_path(self.config.clean_dir, index))

    def upload(self, task: UploadTask) -> Result:
        cfg = self.config
        started = time.monotonic()
        retries_before = self.store.retries
        # Segments are opened per task: the front deletes them once no longer needed, and a
        # descriptor kept here would keep their disk space allocated.
        fds = {segment: localfs.open(segment_path(cfg.journal_dir, segment), os.O_RDONLY)
               for segment in {p.segment for p in task.pieces}}
        try:
            for fd in fds.values():  # journal J1: durable locally before it is in the cloud
                localfs.fsync(fd)
            plain, base_wire_bytes = self._assemble(task, fds)
        finally:
            for fd in fds.values():
                localfs.close(fd)
        base_gets = int(task.base == "cloud")

        def conflict(current: str | None) -> None:
            """F2: the object changed behind the engine's back. Only a process that no
            longer holds the volume can have done it if the lease is still ours (F3);
            then what this upload holds is newer (built from the journal)."""
            self._prove_lease()
            log.warning("chunk %d changed in the store behind this volume's back (version "
                        "%s, expected %s): a late write of a process that no longer holds "
                        "the volume; the lease is still ours, so writing over it",
                        task.index, current, task.expected)

        written = self.chunks.write(task.index, plain, task.expected,  # F1
                                    on_conflict=conflict, pacer=self.limiter)
        if written.stored:
            self._write_clean(task.index, plain, f"u{task.task_id}")
        outcome = Outcome.STORED if written.stored else Outcome.DELETED
        return Result(task.task_id, task.index, outcome, size=len(plain) if written.stored else 0,
                      wire_bytes=written.wire_bytes, seconds=time.monotonic() - started,
                      retries=self.store.retries - retries_before,
                      base_gets=base_gets, base_wire_bytes=base_wire_bytes,
                      version=written.version, fenced=written.fenced)

    def _prove_lease(self) -> None:
        """Raise Displaced unless the volume's lease is still ours (F3)."""
        if self.config.lease_version is None:
            return
        holder = lease.check(self.store, self.config.lease_version)
        if holder is not None:
            raise Displaced(holder)

    def check_lease(self, task: LeaseTask) -> Result:
        try:
            self._prove_lease()
        except Displaced as exc:
            return Result(task.task_id, task.index, Outcome.LEASE_LOST, error=exc.message)
        return Result(task.task_id, task.index, Outcome.LEASE_HELD)

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
            found = self.chunks.get(task.index)
            received = found.wire_bytes
            if found.plain is not None:
                plain[:] = found.plain
        for piece in task.pieces:
            target = view[piece.start:piece.end]
            if piece.zero:
                target[:] = bytes(len(target))
            else:
                got = os.preadv(fds[piece.segment], [target], piece.pos)
                if got != len(target):
                    raise IntegrityError(f"journal segment {piece.segment} is short")
        return plain, received

    def fetch(self, task: FetchTask) -> Result:
        started = time.monotonic()
        retries_before = self.store.retries
        found = self.chunks.get(task.index)
        if found.plain is None:
            return Result(task.task_id, task.index, Outcome.ABSENT)
        self._write_clean(task.index, found.plain, f"f{task.task_id}")
        return Result(task.task_id, task.index, Outcome.CACHED, size=len(found.plain),
                      wire_bytes=found.wire_bytes, seconds=time.monotonic() - started,
                      retries=self.store.retries - retries_before, version=found.version)

    def run(self, task: Task) -> Result:
        try:
            if isinstance(task, UploadTask):
                return self.upload(task)
            if isinstance(task, LeaseTask):
                return self.check_lease(task)
            return self.fetch(task)
        except Displaced as exc:
            return Result(task.task_id, task.index, Outcome.DISPLACED, error=exc.message)
        except IntegrityError as exc:
            return Result(task.task_id, task.index, Outcome.ERROR, error=exc.message,
                          integrity=True)
        except CloudnbdError as exc:
            return Result(task.task_id, task.index, Outcome.ERROR, error=exc.message)
        except Exception as exc:  # a bug or a local I/O error: report, keep serving
            log.error("worker task failed: %s", traceback.format_exc())
            return Result(task.task_id, task.index, Outcome.ERROR, error=f"{type(exc).__name__}: "
                          f"{exc}")


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
