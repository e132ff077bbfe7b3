"""An engine on the file backend with a worker pool the test drives by hand.

The pool is cloudnbd's InProcessPool: the real uploader/fetcher code on threads of the
test process, with tasks held (auto=False) until the test runs them, so a test can hold
an upload "in flight" while it writes, or lose a task as a killed worker would. The
store is a real FileStore.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cloudnbd import offline, volume
from cloudnbd.backends import StoreOptions
from cloudnbd.backends.file import FileStore
from cloudnbd.codec import ScryptParams
from cloudnbd.engine.device import CloudState, Engine, EngineSettings
from cloudnbd.engine.inprocess import InProcessPool
from cloudnbd.engine.workers import Result, WorkerConfig, WorkerKind
from cloudnbd.reader import Image

CHUNK = 64 * 1024


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
        self.pool: InProcessPool | None = None
        self.epoch = 0  # plays the lease: every open takes the next epoch
        self.engine = self.open()

    def _make_pool(self, on_result: Callable[[WorkerKind, Result], None]) -> InProcessPool:
        config = WorkerConfig(backend="file", location=str(self.store.root),
                              options=StoreOptions(), codec=self.volume.chunk_codec,
                              clean_dir=self.cache_dir / "clean",
                              journal_dir=self.cache_dir / "journal")
        self.pool = InProcessPool(config, on_result, auto=self.auto)
        return self.pool

    def open(self, import_journal: bool | None = None) -> Engine:
        """An engine as `open` makes it: this machine's journal is the newest unless told
        (import_journal: the store's journal objects replace it, as on another machine)."""
        self.epoch += 1
        head, version = self.volume.objects.get_head(self.volume.meta.head)
        cloud = CloudState(self.volume.meta.head, head, version, self.epoch,
                           import_journal=self.epoch == 1 if import_journal is None
                           else import_journal)
        engine = Engine(self.volume.meta.size, CHUNK, self.cache_dir, cloud,
                        self.settings, self._make_pool)  # type: ignore[arg-type]
        engine.start()
        return engine

    def crash(self) -> None:
        """Abandon the engine as kill -9 would: no drain, no clean-shutdown marker."""
        self.engine.halt()

    def reopen(self, import_journal: bool = False) -> Engine:
        self.engine = self.open(import_journal)
        return self.engine

    def store_behind(self, chunks: dict[int, bytes]) -> None:
        """Another writer stores chunks (zeros: none) and commits them, as a server of
        another machine would; an engine open now is displaced at its next commit."""
        self.epoch += 1
        offline.commit_chunks(self.volume, self.epoch, chunks)

    def cloud_bytes(self) -> bytes:
        """The volume as the store's head names it (reader.Image)."""
        out = bytearray(self.volume.meta.size)
        for index, plain in Image(self.volume).chunks():
            out[index * CHUNK:(index + 1) * CHUNK] = plain
        return bytes(out)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.engine.pread_into(memoryview(buf), offset)
        return bytes(buf)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self.engine.pwrite(memoryview(data), offset, fua)
