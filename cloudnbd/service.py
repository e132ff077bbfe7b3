"""A running volume: unlock, lease, engine, NBD server and control socket, in one place.

`cloudnbd open` builds a Service in a daemon process (or in the foreground under
systemd) and `cloudnbd close` talks to its control socket. The order of start-up and
shutdown is what makes close safe:

    open:  unlock -> local lock -> lease -> chunk listing -> engine (journal replay)
           -> NBD listener -> control socket -> ready
    close: stop accepting NBD requests -> drain (upload everything) -> stop workers
           -> empty journal, mark cache clean -> release lease -> exit

If the drain cannot finish (cloud unreachable), the journal stays, the lease is released
only on request (so another machine cannot open a volume whose newest data is here), and
the next open on this machine resumes the upload.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudnbd import lease as lease_mod
from cloudnbd.backends import StoreOptions
from cloudnbd.control import ControlServer
from cloudnbd.engine.device import Engine, EngineSettings
from cloudnbd.engine.malloc import limit_malloc_retention
from cloudnbd.engine.versions import ChunkVersions
from cloudnbd.engine.workers import WorkerConfig, WorkerPool
from cloudnbd.errors import CloudnbdError, IntegrityError
from cloudnbd.metrics import Metrics
from cloudnbd.rates import RateSampler
from cloudnbd.volume import Volume

log = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """/var/cache/cloudnbd for root; the XDG cache directory for everyone else."""
    if os.geteuid() == 0:
        return Path("/var/cache/cloudnbd")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "cloudnbd"


def normalize_location(backend: str, location: str) -> str:
    """The location as a stable key: absolute for directories, no trailing slash."""
    if backend == "file":
        return str(Path(location).expanduser().absolute())
    return location.strip("/")


def volume_cache_dir(root: Path, backend: str, location: str) -> Path:
    """One subdirectory per volume location, named by a hash of backend and location."""
    key = f"{backend}:{normalize_location(backend, location)}"
    return root / hashlib.sha256(key.encode()).hexdigest()[:16]


def control_socket(cache_dir: Path) -> Path:
    return cache_dir / "control.sock"


@dataclass(frozen=True)
class ServeSettings:
    """How to present the volume and run the workers."""

    host: str = "127.0.0.1"
    port: int = 10809
    socket_path: Path | None = None
    export_name: str = ""
    read_only: bool = False
    tls: str = "off"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    uploaders: int = 1
    fetchers: int = 1
    threads_per_worker: int = 2
    upload_limit: float = 0.0
    force: bool = False
    metrics: str | None = None  # ADDR:PORT of the Prometheus endpoint
    engine: EngineSettings = field(default_factory=EngineSettings)


class CacheLocked(CloudnbdError):
    exit_code = 9


class Service:
    """Everything a running volume owns."""

    def __init__(self, backend: str, location: str, options: StoreOptions, vol: Volume,
                 cache_root: Path, settings: ServeSettings) -> None:
        self.backend = backend
        self.location = location
        self.options = options
        self.volume = vol
        self.settings = settings
        self.cache_dir = volume_cache_dir(cache_root, backend, location)
        self.engine: Engine | None = None
        self.server: Any = None
        self.control: ControlServer | None = None
        self.lease: lease_mod.Lease | None = None
        self.rates: RateSampler | None = None
        self._lock_fd = -1
        self._closing = threading.Lock()
        self.finished = threading.Event()
        self.exit_code = 0
        self.started = time.time()

    # -- start -----------------------------------------------------------------------------
    def _prepare_cache_dir(self) -> None:
        self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.cache_dir, 0o700)
        self._lock_fd = os.open(self.cache_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 64, 0).decode(errors="replace").strip()
            raise CacheLocked(f"the volume is already open on this machine (pid {holder})"
                              ) from None
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
        seen_file = self.cache_dir / "generation"
        current = self.volume.meta.generation
        try:
            seen = int(seen_file.read_text())
        except (OSError, ValueError):
            seen = 0
        if current < seen:
            raise IntegrityError(
                f"the volume's metadata was rolled back: the store has generation {current}, "
                f"this machine has seen {seen}; restore the newest volume.json, or move "
                f"{self.cache_dir} away to accept the old one")
        if current > seen:
            tmp = seen_file.with_suffix(".tmp")
            tmp.write_text(f"{current}\n")
            os.replace(tmp, seen_file)

    def _make_pool(self, on_result: Any) -> WorkerPool:
        meta = self.volume.meta
        config = WorkerConfig(
            backend=self.backend, location=self.location, options=self.options,
            keys=self.volume.keys, chunk_size=meta.chunk_size,
            clean_dir=self.cache_dir / "clean", journal_dir=self.cache_dir / "journal",
            log_level=logging.getLogger().level)
        return WorkerPool(config, self.settings.uploaders, self.settings.fetchers, on_result,
                          upload_limit=self.settings.upload_limit,
                          threads_per_process=self.settings.threads_per_worker)

    def start(self) -> None:
        from cloudnbd.nbd.server import NbdServer  # the protocol layer, above the engine

        limit_malloc_retention()
        self._prepare_cache_dir()
        self.lease = lease_mod.acquire(self.volume.store, force=self.settings.force)
        try:
            meta = self.volume.meta
            s = self.settings
            metrics = Metrics() if s.metrics else None
            self.engine = Engine(meta.size, meta.chunk_size, self.cache_dir,
                                 ChunkVersions.of_volume(self.volume), s.engine,
                                 self._make_pool, metrics)
            self.engine.start()
            stats = self.engine.stats
            self.rates = RateSampler(lambda: {"sent": stats.upload_wire_bytes,
                                              "uploaded": stats.upload_bytes,
                                              "received": stats.fetch_wire_bytes})
            self.rates.start()
            self.volume.store.idle()  # the front's own requests are done until close
            self.server = NbdServer(
                self.engine, export_name=s.export_name, host=s.host, port=s.port,
                unix_path=s.socket_path, read_only=s.read_only, tls=s.tls,
                tls_cert=s.tls_cert, tls_key=s.tls_key, tls_ca=s.tls_ca,
                description=f"cloudnbd volume {self.volume.store.description}",
                on_request=metrics.observe_request if metrics else None)
            self.server.start()
            if metrics is not None and s.metrics:
                metrics.attach(self.engine, self.server)
                metrics.serve(s.metrics)
            self.control = ControlServer(control_socket(self.cache_dir), self._handle)
            self.control.start()
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        """Undo a failed start without touching data."""
        if self.rates is not None:
            self.rates.stop()
        if self.server is not None:
            self.server.shutdown()
        if self.engine is not None:
            self.engine.stop(clean=False)
        if self.lease is not None:
            self.lease.release()

    # -- control ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        assert self.engine is not None
        dirty_bytes, dirty_chunks, oldest = self.engine.backlog()
        stats = self.engine.stats
        assert self.rates is not None
        rates, span = self.rates.rates()
        return {
            "location": self.volume.store.description,
            "pid": os.getpid(),
            "uptime": time.time() - self.started,
            "connections": getattr(self.server, "connection_count", 0),
            "dirty_bytes": dirty_bytes,
            "dirty_chunks": dirty_chunks,
            "oldest_dirty_seconds": oldest,
            "uploaded_bytes": stats.upload_bytes,
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
            "cache_bytes": self.engine.clean.bytes,
            "cache_limit": self.engine.clean.max_bytes,
            "cache_hits": self.engine.clean.hits,
            "cache_misses": self.engine.clean.misses,
            "worker_pids": {kind: self.engine.pool.pids(kind) for kind in ("upload", "fetch")},
        }

    def _handle(self, request: dict[str, Any], send: Any) -> dict[str, Any]:
        command = request.get("cmd")
        if command == "status":
            return self.status()
        if command == "close":
            return self.close(send, timeout=request.get("timeout"))
        return {"error": f"unknown control command {command!r}"}

    # -- stop ------------------------------------------------------------------------------
    def close(self, send: Any = None, timeout: float | None = None) -> dict[str, Any]:
        """Stop serving, upload everything, release the lease. Safe to call once."""
        if not self._closing.acquire(blocking=False):
            return {"error": "already closing"}
        assert self.engine is not None
        try:
            self.server.shutdown()
            total = max(self.engine.backlog()[0], 1)

            def progress(left: int, chunks: int) -> None:
                if send is not None:
                    send({"progress": {"left": left, "chunks": chunks, "total": total,
                                       "error": self.engine.last_error}})

            try:
                self.engine.drain(progress, stall_timeout=timeout)
            except CloudnbdError as exc:
                self.engine.stop(clean=False)
                self.exit_code = 1
                return {"error": f"{exc.message}; the data is safe in the local journal "
                                 f"at {self.cache_dir} and the next open resumes uploading",
                        "exit_code": exc.exit_code}
            self.engine.stop(clean=True)
            if self.lease is not None:
                self.lease.release()
            return {"done": True}
        finally:
            if self.rates is not None:
                self.rates.stop()
            if self.control is not None:
                self.control.close()
            self.finished.set()

    def run_until_closed(self) -> int:
        """Block until close; SIGTERM and SIGINT close too."""
        def on_signal(signum: int, frame: Any) -> None:
            threading.Thread(target=self.close, daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.finished.wait()
        return self.exit_code
