"""An engine on the file backend with a worker pool the test drives by hand.

InlinePool runs the real uploader/fetcher code (workers._Worker) in the test process,
one task at a time when the test says so, so a test can hold an upload "in flight" while
it writes, or lose a task as a killed worker would. The store is a real FileStore.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from cloudnbd import volume
from cloudnbd.backends import StoreOptions
from cloudnbd.backends.file import FileStore
from cloudnbd.codec import ScryptParams
from cloudnbd.engine.device import Engine, EngineSettings
from cloudnbd.engine.versions import ChunkVersions
from cloudnbd.engine.workers import FetchTask, Result, UploadTask, WorkerConfig, _Worker

CHUNK = 64 * 1024


class InlinePool:
    """WorkerPool's interface; tasks wait in `pending` until run() or run_all()."""

    def __init__(self, config: WorkerConfig, on_result: Callable[[str, Result], None],
                 auto: bool) -> None:
        self.worker = _Worker(config, None)
        self.on_result = on_result
        self.auto = auto
        self.pending: list[UploadTask | FetchTask] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def capacity(self, kind: str) -> int:
        return 4

    def pids(self, kind: str) -> list[int]:
        return []

    def submit(self, task: UploadTask | FetchTask) -> None:
        if self.auto:
            self._run(task)
            return
        with self.changed:
            self.pending.append(task)
            self.changed.notify_all()

    def _run(self, task: UploadTask | FetchTask) -> None:
        kind = "upload" if isinstance(task, UploadTask) else "fetch"
        # deliver from another thread, as the real pool does
        result = self.worker.run(task)
        threading.Thread(target=self.on_result, args=(kind, result)).start()

    def wait_for(self, kind: type, timeout: float = 10) -> UploadTask | FetchTask:
        with self.changed:
            ok = self.changed.wait_for(lambda: any(isinstance(t, kind) for t in self.pending),
                                       timeout=timeout)
            assert ok, f"no {kind.__name__} was submitted"
            task = next(t for t in self.pending if isinstance(t, kind))
            self.pending.remove(task)
            return task

    def run(self, task: UploadTask | FetchTask) -> None:
        self._run(task)

    def run_all(self) -> None:
        while True:
            with self.lock:
                if not self.pending:
                    return
                task = self.pending.pop(0)
            self._run(task)


class EngineRig:
    """A volume in tmp_path/bucket and an engine over it, reopenable."""

    def __init__(self, tmp_path: Path, chunks: int = 16, auto: bool = True,
                 **settings: object) -> None:
        self.root = tmp_path
        self.store = FileStore(tmp_path / "bucket")
        self.volume = volume.create(self.store, chunks * CHUNK, CHUNK, "pw",
                                    ScryptParams(n=2**10))
        self.cache_dir = tmp_path / "cache"
        self.auto = auto
        self.settings = EngineSettings(**{"writeback_delay": 0.0, **settings})  # type: ignore[arg-type]
        self.pool: InlinePool | None = None
        self.engine = self.open()

    def _make_pool(self, on_result: Callable[[str, Result], None]) -> InlinePool:
        config = WorkerConfig(backend="file", location=str(self.store.root),
                              options=StoreOptions(), codec=self.volume.chunk_codec,
                              clean_dir=self.cache_dir / "clean",
                              journal_dir=self.cache_dir / "journal")
        self.pool = InlinePool(config, on_result, self.auto)
        return self.pool

    def open(self) -> Engine:
        engine = Engine(self.volume.meta.size, CHUNK, self.cache_dir,
                        ChunkVersions.of_volume(self.volume),
                        self.settings, self._make_pool)  # type: ignore[arg-type]
        engine.start()
        return engine

    def crash(self) -> None:
        """Abandon the engine as kill -9 would: no drain, no clean-shutdown marker."""
        self.engine._stopped = True
        with self.engine._cond:
            self.engine._cond.notify_all()
        self.engine._scheduler.join()
        self.engine.journal.close()

    def reopen(self) -> Engine:
        self.engine = self.open()
        return self.engine

    def cloud_bytes(self) -> bytes:
        """The volume as the cloud has it, decoded by the volume layer."""
        out = bytearray(self.volume.meta.size)
        for index in range(self.volume.meta.chunk_count):
            plain = self.volume.read_chunk(index)
            if plain is not None:
                out[index * CHUNK:(index + 1) * CHUNK] = plain
        return bytes(out)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.engine.pread_into(memoryview(buf), offset)
        return bytes(buf)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self.engine.pwrite(memoryview(data), offset, fua)
