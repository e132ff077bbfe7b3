"""An engine on the file backend with a worker pool the test drives by hand.

The pool is cloudnbd's InProcessPool: the real uploader/fetcher code on threads of the
test process, with tasks held (auto=False) until the test runs them, so a test can hold
an upload "in flight" while it writes, or lose a task as a killed worker would. The
store is a real FileStore.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cloudnbd import volume
from cloudnbd.backends import StoreOptions
from cloudnbd.backends.file import FileStore
from cloudnbd.codec import ScryptParams
from cloudnbd.engine.device import Engine, EngineSettings
from cloudnbd.engine.inprocess import InProcessPool
from cloudnbd.engine.versions import ChunkVersions
from cloudnbd.engine.workers import Result, WorkerConfig, WorkerKind

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
        self.engine = self.open()

    def _make_pool(self, on_result: Callable[[WorkerKind, Result], None]) -> InProcessPool:
        config = WorkerConfig(backend="file", location=str(self.store.root),
                              options=StoreOptions(), codec=self.volume.chunk_codec,
                              clean_dir=self.cache_dir / "clean",
                              journal_dir=self.cache_dir / "journal")
        self.pool = InProcessPool(config, on_result, auto=self.auto)
        return self.pool

    def open(self) -> Engine:
        engine = Engine(self.volume.meta.size, CHUNK, self.cache_dir,
                        ChunkVersions.of_volume(self.volume),
                        self.settings, self._make_pool)  # type: ignore[arg-type]
        engine.start()
        return engine

    def crash(self) -> None:
        """Abandon the engine as kill -9 would: no drain, no clean-shutdown marker."""
        self.engine.halt()

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
