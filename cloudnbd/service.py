"""A running volume: unlock, lease, engine, NBD server and control socket, in one place.

`cloudnbd open` builds a Service in a daemon process (or in the foreground under
systemd) and `cloudnbd close` talks to its control socket. The order of start-up and
shutdown is what makes close safe:

    open:  unlock -> local lock -> lease (its epoch recorded next to the journal)
           -> head -> engine (map pages, the store's journal, local journal replay)
           -> NBD listener -> control socket -> registered as running -> ready
    close: stop accepting NBD requests -> drain (commit everything, fold the store's
           journal into chunks) -> stop workers -> empty journal, mark cache clean
           -> release lease -> unregister -> exit

A snapshot is served read-only (`open --snapshot NAME`) by a Service of its own, beside
the volume's server if one runs: no lease (it writes nothing), a cache directory and a
registry entry of its own, and a frozen engine (E7) over the snapshot's head:

    open:  unlock -> local lock (the snapshot's cache) -> the snapshot's head
           -> frozen engine (its map pages and journal objects) -> NBD listener
           -> control socket -> registered -> ready
    close: stop accepting NBD requests -> stop workers -> drop the journal copy -> exit

If the drain cannot finish (cloud unreachable), the journal stays, the lease is kept (so
another machine cannot open a volume whose newest data is here), and the next open on
this machine resumes the upload. A journal left under an epoch that is no longer the
lease's (another server held the volume since) is never replayed: it would undo that
server's writes. It is set aside, and the user told (lease.py, L2).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudnbd import freshness, runtime
from cloudnbd import lease as lease_mod
from cloudnbd.backends import StoreOptions
from cloudnbd.control import ControlServer
from cloudnbd.engine.device import CloudState, Engine, EngineSettings
from cloudnbd.engine.malloc import limit_malloc_retention
from cloudnbd.engine.workers import WorkerConfig, WorkerPool
from cloudnbd.errors import CacheLocked, CloudnbdError, Displaced
from cloudnbd.layout import Snapshot, utc_now
from cloudnbd.metrics import Metrics
from cloudnbd.nbd.device import DeviceError
from cloudnbd.nbd.server import REUSED_BUFFER_BYTES, NbdServer, ServerSettings
from cloudnbd.rates import RateSampler
from cloudnbd.runtime import lock_cache_dir
from cloudnbd.volume import Volume

log = logging.getLogger(__name__)


def private_cache_dir(root: Path, backend: str, location: str,
                      snapshot: str | None = None) -> Path:
    """The volume's cache directory, created (0700) if missing.

    The journal in it is trusted: replayed over the cloud at open. So neither it nor
    the cache root may be in another user's hands: whoever can rename entries of a
    directory can swap in a journal of their own. Refused (one line): a root owned by
    another user (root excepted) or writable by others without the sticky bit, and a
    volume directory that is not ours, is not a plain directory, or that others may
    write to.
    """
    path = runtime.volume_cache_dir(root, backend, location, snapshot)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_cache_entry(root, root=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    _check_cache_entry(path, root=False)
    os.chmod(path, 0o700)
    return path


def _check_cache_entry(path: Path, root: bool) -> None:
    st = path.lstat() if not root else path.stat()
    what = "cache directory" if root else "volume cache directory"
    if not stat.S_ISDIR(st.st_mode):
        raise CloudnbdError(f"{what} {path} is not a directory")
    if st.st_uid != os.geteuid() and not (root and st.st_uid == 0):
        raise CloudnbdError(f"{what} {path} is owned by another user (uid {st.st_uid}); "
                            f"use a --cache directory of your own")
    open_to_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if open_to_others and not (root and st.st_mode & stat.S_ISVTX):
        raise CloudnbdError(f"{what} {path} is writable by others (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}): they could replace the "
                            f"journal; run: chmod go-w {path}")


def control_socket(cache_dir: Path) -> Path:
    return cache_dir / "control.sock"


@dataclass(frozen=True)
class ServeSettings:
    """How to present the volume (the NBD layer's own settings), run the engine and the
    workers."""

    server: ServerSettings = field(default_factory=ServerSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    uploaders: int = 1
    fetchers: int = 1
    threads_per_worker: int = 2
    upload_limit: float = 0.0
    force: bool = False
    metrics: str | None = None  # ADDR:PORT of the Prometheus endpoint


LEASE_EPOCH_FILE = "lease-epoch"


@contextmanager
def purging_cache(cache_dir: Path) -> Iterator[None]:
    """Hold the lock of a volume's cache for the with block, and remove the cache after it
    succeeds. `delete` deletes the volume inside: while a server here serves the volume,
    it is refused (CacheLocked) before anything is deleted, and no open on this machine
    starts meanwhile. The store goes first: were the cache removed first and the store's
    deletion then failed, unuploaded writes of a volume that still exists would be lost."""
    if not cache_dir.is_dir():
        yield
        return
    try:
        fd = lock_cache_dir(cache_dir)
    except CacheLocked as exc:
        raise CacheLocked(f"{exc.message}: close it first; nothing was deleted") from None
    try:
        yield
        shutil.rmtree(cache_dir)
    finally:
        os.close(fd)


class Service:
    """Everything a running volume, or a snapshot of it served read-only, owns."""

    def __init__(self, backend: str, location: str, options: StoreOptions, vol: Volume,
                 cache_root: Path, settings: ServeSettings,
                 snapshot: str | None = None) -> None:
        self.backend = backend
        self.location = location
        self.snapshot_name = snapshot
        self.options = options
        self.volume = vol
        self.settings = settings
        self.cache_root = cache_root
        self.cache_dir = runtime.volume_cache_dir(cache_root, backend, location, snapshot)
        self.engine: Engine | None = None
        self.server: NbdServer | None = None
        self.control: ControlServer | None = None
        self.lease: lease_mod.Lease | None = None
        self.rates: RateSampler | None = None
        self._lock_fd = -1
        self._closing = threading.Lock()
        self.finished = threading.Event()
        self.exit_code = 0
        self.started = time.time()
        #: things the user should hear about at open (a taken-over lease, a journal set
        #: aside); `open` prints them on its terminal
        self.notes: list[str] = []

    # -- start -----------------------------------------------------------------------------
    def _prepare_cache_dir(self) -> None:
        self.cache_dir = private_cache_dir(self.cache_root, self.backend, self.location,
                                           self.snapshot_name)
        self._lock_fd = lock_cache_dir(self.cache_dir)
        if self.snapshot_name is not None:
            self._drop_journal_copy()  # an earlier run's copy of the store's journal
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        id_file = self.cache_dir / "volume_id"
        volume_id = self.volume.meta.volume_id.hex()
        if id_file.exists() and id_file.read_text().strip() != volume_id:
            journal = self.cache_dir / "journal"
            if journal.exists() and any(journal.iterdir()):
                raise CloudnbdError(
                    f"the cache {self.cache_dir} holds unuploaded data of another volume "
                    f"that used to live at this location ({id_file.read_text().strip()}); "
                    f"move it away to discard that data")
            for child in ("clean", "journal", "clean-shutdown", "generation"):
                path = self.cache_dir / child
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        id_file.write_text(volume_id + "\n")
        self._check_generation()

    def _check_generation(self) -> None:
        """Refuse metadata older than what this machine has seen (a rolled-back volume.json
        could bring back a revoked password or an old size). The record is local, so a
        machine that never opened the volume cannot tell; docs/format.md says so."""
        freshness.check(self.cache_dir / "generation", self.volume.meta.generation,
                        "metadata", f"restore the newest volume.json, or move "
                                    f"{self.cache_dir} away to accept the old one")

    def _adopt_journal(self, taken: lease_mod.Lease) -> bool:
        """L2: replay the journal only if it was written under the lease epoch the store
        still showed when we took the lease; then record our own epoch, durably, before
        anything is written under it. Returns whether the local journal is the volume's
        newest (else the store's journal objects are imported: a new cache, or one that
        another server's writes have overtaken)."""
        record = self.cache_dir / LEASE_EPOCH_FILE
        try:
            recorded: int | None = int(record.read_text())
        except (OSError, ValueError):
            recorded = None  # a cache of an older cloudnbd, or a new one
        journal = self.cache_dir / "journal"
        left = runtime.journal_bytes(self.cache_dir)
        before = taken.previous.epoch if taken.previous is not None else 0
        ours = recorded is not None and recorded == before
        if left and not ours:
            aside = self.cache_dir / f"journal.superseded-{time.strftime('%Y%m%dT%H%M%S')}"
            journal.rename(aside)
            self.notes.append(
                f"this machine's journal ({left} bytes, with any writes no FLUSH covered) "
                f"was written while it held the volume, but another server has held it "
                f"since; replaying it would undo that server's writes, so it is not "
                f"uploaded and kept at {aside}")
        tmp = record.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{taken.epoch}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, record)
        dir_fd = os.open(self.cache_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return ours

    def _make_pool(self, on_result: Any) -> WorkerPool:
        config = WorkerConfig(
            backend=self.backend, location=self.location, options=self.options,
            codec=self.volume.chunk_codec,
            clean_dir=self.cache_dir / "clean", journal_dir=self.cache_dir / "journal",
            log_level=logging.getLogger().level)
        return WorkerPool(config, self.settings.uploaders, self.settings.fetchers, on_result,
                          upload_limit=self.settings.upload_limit,
                          threads_per_process=self.settings.threads_per_worker)

    def _take_volume(self) -> tuple[CloudState, int]:
        """The volume's lease, journal and head: what its engine starts from, and the
        size."""
        self.lease = lease_mod.acquire(self.volume.store, "open", force=self.settings.force)
        self.notes.extend(self.lease.notes)
        ours = self._adopt_journal(self.lease)
        # The lease may have changed hands since the unlock: read the size again.
        self.volume.refresh()
        meta = self.volume.meta
        head, head_version = self.volume.objects.get_head(meta.head)
        freshness.check_head(meta.volume_id, head.generation)
        return CloudState(meta.head, head, head_version, self.lease.epoch,
                          import_journal=not ours), meta.size

    def _open_snapshot(self, name: str) -> tuple[CloudState, int]:
        """A snapshot's head (S1-S3) for a frozen engine (E7), and its size. No lease:
        nothing is written."""
        self.volume.refresh()
        snap = self.volume.objects.get_snapshot(name)
        return CloudState(self.volume.meta.head, snap.head, "", snap.head.epoch,
                          import_journal=True, frozen=True), snap.size

    def _drop_journal_copy(self) -> None:
        shutil.rmtree(self.cache_dir / "journal", ignore_errors=True)

    def start(self) -> None:
        limit_malloc_retention(reuse=REUSED_BUFFER_BYTES)
        self._prepare_cache_dir()
        try:
            cloud, size = (self._take_volume() if self.snapshot_name is None
                           else self._open_snapshot(self.snapshot_name))
            s = self.settings
            metrics = Metrics() if s.metrics else None
            self.engine = Engine(size, self.volume.meta.chunk_size, self.cache_dir, cloud,
                                 s.engine, self._make_pool,
                                 on_transfer=metrics.observe_transfer if metrics else None)
            self.engine.start()
            stats = self.engine.stats
            self.rates = RateSampler(lambda: {"sent": stats.sent_wire_bytes,
                                              "uploaded": stats.upload_bytes
                                              + stats.journal_bytes,
                                              "received": stats.fetch_wire_bytes})
            self.rates.start()
            self.volume.store.idle()  # the front's own requests are done until close
            what = ("volume" if self.snapshot_name is None
                    else f"snapshot {self.snapshot_name} of volume")
            self.server = NbdServer(
                self.engine, s.server,
                description=f"cloudnbd {what} {self.volume.store.description}",
                on_request=metrics.observe_request if metrics else None)
            self.server.start()
            if metrics is not None and s.metrics:
                metrics.attach(self.engine.snapshot, self.server.snapshot)
                metrics.serve(s.metrics)
            self.control = ControlServer(control_socket(self.cache_dir), self._handle)
            self.control.start()
            runtime.register(self.backend, self.location, self.cache_dir,
                             control_socket(self.cache_dir), self.snapshot_name)
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        """Undo a failed start without touching data. The lease is released even if a
        step before fails (that failure is logged: the start's own error is the one to
        report)."""
        try:
            if self.rates is not None:
                self.rates.stop()
            if self.server is not None:
                self.server.shutdown()
            if self.engine is not None:
                self.engine.stop(clean=False)
        except Exception as exc:
            log.error("undoing a failed start: %s", exc)
        finally:
            if self.lease is not None:
                self.lease.release()

    # -- control ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What `cloudnbd status` shows: the snapshots the metrics render too, the recent
        rates, and who serves what."""
        assert self.engine and self.server and self.rates
        engine, server = self.engine.snapshot(), self.server.snapshot()
        stats = engine.stats
        rates, span = self.rates.rates()
        return {
            "location": self.volume.store.description,
            "snapshot": self.snapshot_name,
            "pid": os.getpid(),
            "uptime": time.time() - self.started,
            "connections": server.connections,
            "dirty_bytes": engine.dirty_bytes,
            "dirty_chunks": engine.dirty_chunks,
            "oldest_dirty_seconds": engine.oldest_dirty_seconds,
            "store_journal_objects": engine.store_journal_objects,
            "store_journal_bytes": engine.store_journal_bytes,
            "head_generation": engine.head_generation,
            "commits": stats.commits,
            "checkpoints": stats.checkpoints,
            "garbage_listings": stats.garbage_listings,
            "garbage_quiet_rounds": stats.garbage_quiet_rounds,
            "garbage_deleted": stats.garbage_deleted,
            "snapshots": engine.snapshots,
            "snapshot_only_bytes": engine.snapshot_only_bytes,
            "sent_wire_bytes": stats.sent_wire_bytes,
            "uploaded_bytes": stats.upload_bytes + stats.journal_bytes,
            "uploaded_wire_bytes": stats.upload_wire_bytes,
            "fetched_wire_bytes": stats.fetch_wire_bytes,
            "upload_rate": rates["sent"],
            "upload_plain_rate": rates["uploaded"],
            "download_rate": rates["received"],
            "rate_window": span,
            "uploads": stats.uploads,
            "fetches": stats.fetches,
            "upload_errors": stats.upload_errors,
            "fetch_errors": stats.fetch_errors,
            "integrity_errors": stats.integrity_errors,
            "displaced": engine.displaced,
            "cache_bytes": engine.cache_bytes,
            "cache_limit": engine.cache_limit,
            "cache_hits": engine.cache_hits,
            "cache_misses": engine.cache_misses,
            "worker_pids": engine.worker_pids,
        }

    def _handle(self, request: dict[str, Any], send: Any) -> dict[str, Any]:
        command = request.get("cmd")
        if command == "status":
            return self.status()
        if command == "close":
            return self.close(send, timeout=request.get("timeout"))
        if command in ("grow", "snapshot") and self.snapshot_name is not None:
            return {"error": f"this server serves snapshot {self.snapshot_name} "
                             f"read-only", "exit_code": 2}
        if command == "grow":
            return self.grow(int(request["size"]))
        if command == "snapshot":
            return self.snapshot(str(request["name"]))
        return {"error": f"unknown control command {command!r}"}

    def grow(self, new_size: int) -> dict[str, Any]:
        """Grow the volume while it is served: volume.json first (conditionally, M1),
        then the engine, so that new connections see the new size at once."""
        assert self.engine is not None
        if self.engine.displaced is not None:
            return {"error": f"this server was displaced by {self.engine.displaced}"}
        if new_size < self.volume.meta.size:
            return {"error": "a served volume cannot shrink; close it first"}
        try:
            self.volume.refresh()
            old = self.volume.meta.size
            if new_size > old:
                self.volume.grow(new_size)  # its rules, volume.json first (M1)
                self.engine.grow(new_size)
            return {"done": True, "old_size": old, "size": new_size}
        except CloudnbdError as exc:
            return {"error": exc.message, "exit_code": exc.exit_code}
        finally:
            self.volume.store.idle()

    def snapshot(self, name: str) -> dict[str, Any]:
        """Take snapshot name of the served volume: a FLUSH, then the head it committed
        stored as the snapshot (docs/format.md, "Snapshots"; S5)."""
        assert self.engine is not None
        try:
            with self.engine.snapshot_head() as (head, size):
                snap = Snapshot(name, utc_now(), size, head)
                self.volume.objects.put_snapshot(snap)
            return {"done": True, "name": name, "generation": head.generation,
                    "written": head.written, "size": size, "created": snap.created}
        except DeviceError as exc:
            return {"error": f"the FLUSH before the snapshot failed: {exc}",
                    "exit_code": 3}
        except CloudnbdError as exc:
            return {"error": exc.message, "exit_code": exc.exit_code}
        finally:
            self.volume.store.idle()

    # -- stop ------------------------------------------------------------------------------
    def close(self, send: Any = None, timeout: float | None = None) -> dict[str, Any]:
        """Stop serving, upload everything, release the lease. Safe to call once."""
        if not self._closing.acquire(blocking=False):
            return {"error": "already closing"}
        assert self.engine is not None and self.server is not None
        try:
            self.server.shutdown()
            total = max(self.engine.work_left(), 1)

            def progress(left: int, chunks: int) -> None:
                if send is not None:
                    send({"progress": {"left": left, "chunks": chunks, "total": total,
                                       "error": self.engine.last_error}})

            try:
                self.engine.drain(progress, stall_timeout=timeout)
            except Displaced as exc:
                self.engine.stop(clean=False)
                self.exit_code = exc.exit_code
                return {"error": self._set_aside_displaced(exc), "exit_code": exc.exit_code}
            except CloudnbdError as exc:
                self.engine.stop(clean=False)
                self.exit_code = 1
                return {"error": f"{exc.message}; the data is safe in the local journal "
                                 f"at {self.cache_dir} and the next open resumes uploading",
                        "exit_code": exc.exit_code}
            self.engine.stop(clean=True)
            if self.snapshot_name is not None:
                self._drop_journal_copy()
                return {"done": True}
            freshness.check_head(self.volume.meta.volume_id, self.engine.head.generation)
            if self.lease is not None:
                self.lease.release()
            return {"done": True}
        finally:
            if self.rates is not None:
                self.rates.stop()
            if self.control is not None:
                self.control.close()
            runtime.unregister(self.backend, self.location, self.snapshot_name)
            self.finished.set()

    def _set_aside_displaced(self, exc: Displaced) -> str:
        """A displaced server's journal holds writes no FLUSH acknowledged (its commit
        failed, E5) besides flushed ones the store has; replaying it later would undo the
        new holder's writes: keep it aside."""
        left = runtime.journal_bytes(self.cache_dir)
        journal = self.cache_dir / "journal"
        aside = self.cache_dir / f"journal.displaced-{time.strftime('%Y%m%dT%H%M%S')}"
        if left:
            journal.rename(aside)
            kept = (f"; its journal ({left} bytes, with the writes no FLUSH covered) is "
                    f"not uploaded and kept at {aside}")
        else:
            kept = ""
        return f"{exc.message}{kept}"

    def run_until_closed(self) -> int:
        """Block until close; SIGTERM and SIGINT close too."""
        def on_signal(signum: int, frame: Any) -> None:
            threading.Thread(target=self.close, daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.finished.wait()
        return self.exit_code
