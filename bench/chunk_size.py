"""Measure what the chunk size costs: requests and upload bytes per GiB written, and
read amplification, for sequential and small random workloads.

Runs the real engine (journal, extent maps, uploader code, codec) against a file-backend
volume in a temporary directory and counts what reaches the store. Prices are S3
Standard list prices in us-east-1: PUT $0.005 per 1,000, GET $0.0004 per 1,000,
storage $0.023 per GB-month.

    python bench/chunk_size.py            # writes the table to stdout
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudnbd import offline, volume
from cloudnbd.backends import StoreOptions
from cloudnbd.backends.file import FileStore
from cloudnbd.codec import ScryptParams
from cloudnbd.engine.device import CloudState, Engine, EngineSettings
from cloudnbd.engine.inprocess import InProcessPool
from cloudnbd.engine.workers import (
    DeleteTask,
    FetchTask,
    HeadTask,
    JournalTask,
    ListTask,
    Outcome,
    PageTask,
    ReadJournalTask,
    ReadPageTask,
    Result,
    Task,
    UploadTask,
    WorkerConfig,
    WorkerKind,
)

PUT_PRICE, GET_PRICE = 0.005 / 1000, 0.0004 / 1000
GiB = 2**30
VOLUME = 8 * GiB
REGION = 512 * 2**20
FILL_BATCH = 64 * 2**20  # the region is committed this much at a time


class Counts:
    """Requests and bytes of every task the pool ran (InProcessPool's observe hook): a
    chunk upload is a PUT (and a GET when it starts from the stored object), a journal
    object, map page or head a PUT, a fetch or read a GET."""

    def __init__(self) -> None:
        self.puts = self.gets = self.deletes = self.put_bytes = self.plain_bytes = 0

    def __call__(self, task: Task, result: Result) -> None:
        if result.outcome == Outcome.ERROR:
            return
        if isinstance(task, UploadTask):
            self.gets += result.base_gets
            if result.outcome == Outcome.STORED:
                self.puts += 1
                self.put_bytes += result.wire_bytes
                self.plain_bytes += result.size
        elif isinstance(task, JournalTask | PageTask | HeadTask):
            self.puts += 1
            self.put_bytes += result.wire_bytes
            if isinstance(task, JournalTask):
                self.plain_bytes += result.size
        elif isinstance(task, FetchTask | ReadJournalTask | ReadPageTask | ListTask):
            self.gets += 1
        elif isinstance(task, DeleteTask):
            self.deletes += len(task.keys)


def fill(vol: volume.Volume, chunk_size: int, rng: random.Random) -> int:
    """Random data over the region, committed as another writer would (commit_chunks),
    FILL_BATCH at a time, each batch under an epoch of its own; returns the last epoch."""
    chunks = REGION // chunk_size
    per_batch = max(1, FILL_BATCH // chunk_size)
    epoch = 0
    for first in range(0, chunks, per_batch):
        epoch += 1
        offline.commit_chunks(vol, epoch, {
            index: rng.randbytes(chunk_size)
            for index in range(first, min(chunks, first + per_batch))})
    return epoch


def run(chunk_size: int, workload: str, tmp: Path) -> dict[str, float]:
    store = FileStore(tmp / "bucket")
    vol = volume.create(store, VOLUME, chunk_size, "pw", ScryptParams(n=2**10))
    rng = random.Random(1)
    epoch = 0
    if workload.startswith("random"):  # a used disk: the region is full of data
        epoch = fill(vol, chunk_size, rng)
    pool = Counts()

    def make_pool(on_result: Callable[[WorkerKind, Result], None]) -> InProcessPool:
        config = WorkerConfig("file", str(store.root), StoreOptions(), vol.chunk_codec,
                              tmp / "cache" / "clean", tmp / "cache" / "journal")
        return InProcessPool(config, on_result, threads=8, capacity=8, observe=pool)

    head, version = vol.objects.get_head(vol.meta.head)
    cloud = CloudState(vol.meta.head, head, version, epoch + 1, import_journal=True)
    engine = Engine(VOLUME, chunk_size, tmp / "cache", cloud,
                    EngineSettings(writeback_delay=3600), make_pool)  # type: ignore[arg-type]
    engine.start()
    written = 0
    started = time.monotonic()
    if workload.startswith("sequential"):
        for offset in range(0, 256 << 20, 1 << 20):
            engine.pwrite(memoryview(rng.randbytes(1 << 20)), offset, False)
            written += 1 << 20
        engine.flush()
    else:  # 4 KiB random writes over the region, a FLUSH every 64 (a filesystem commit)
        for i in range(2048):
            offset = rng.randrange(0, REGION // 4096) * 4096
            engine.pwrite(memoryview(rng.randbytes(4096)), offset, False)
            written += 4096
            if i % 64 == 63:
                engine.flush()
        engine.flush()
    seconds = time.monotonic() - started
    flushed = (pool.puts, pool.gets, pool.plain_bytes)
    engine.drain()  # close: the checkpoint folds the journal into chunks
    engine.stop(clean=True)
    per_gib = GiB / written
    return {"puts_per_gib": flushed[0] * per_gib, "upload_amp": flushed[2] / written,
            "gets_per_gib": flushed[1] * per_gib,
            "dollars_per_gib": (flushed[0] * PUT_PRICE + flushed[1] * GET_PRICE) * per_gib,
            "close_puts_per_gib": pool.puts * per_gib,
            "close_amp": pool.plain_bytes / written,
            "close_dollars_per_gib": (pool.puts * PUT_PRICE + pool.gets * GET_PRICE)
            * per_gib,
            "seconds": seconds}


def main() -> None:
    sizes = [256 * 1024, 1 << 20, 4 << 20, 16 << 20]
    print("| chunk | workload | PUT/GiB written | GET/GiB | bytes uploaded per byte "
          "written | request $ per GiB written | the same three with close | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for workload in ("sequential 256 MiB", "random 4 KiB in 512 MiB, FLUSH every 64"):
        for size in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                r = run(size, workload, Path(tmp))
            print(f"| {size // 1024} KiB | {workload} | {r['puts_per_gib']:.0f} | "
                  f"{r['gets_per_gib']:.0f} | {r['upload_amp']:.2f} | "
                  f"${r['dollars_per_gib']:.4f} | {r['close_puts_per_gib']:.0f}, "
                  f"{r['close_amp']:.2f}, ${r['close_dollars_per_gib']:.4f} | "
                  f"{r['seconds']:.1f} |", flush=True)
    print("\nRandom 4 KiB reads on a cold cache fetch one whole chunk each: read "
          "amplification equals chunk size / 4 KiB (64x at 256 KiB, 1024x at 4 MiB).")


if __name__ == "__main__":
    main()
