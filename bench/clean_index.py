"""What recording the version of every clean file costs (engine/cache.py, C6), next to
diskcache, the persistent index first meant to hold that record.

- per result: what the engine does for each upload or fetch result, under its lock:
  CleanCache.added(index, size, version), the in-memory record; against one
  diskcache.Cache.set of the same record, the least a persistent index writes per result
  (in the front under the engine lock, or in the worker after its rename);
- close: CleanCache.mark_clean_shutdown for N clean files (their fsyncs, then the
  marker that lists their versions), next to the fsyncs alone (what close did before);
- open: CleanCache.open for N clean files against the versions of a listing;
- memory: what `import diskcache` and opening one Cache add to a process (RSS).

    python bench/clean_index.py [--files 2048] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cloudnbd.engine.cache import CleanCache, clean_name  # noqa: E402
from cloudnbd.engine.chunkmap import ChunkMap  # noqa: E402
from cloudnbd.layout import Entry  # noqa: E402

MEMORY_PROBE = """
import tempfile
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
before = rss()
import diskcache
with tempfile.TemporaryDirectory() as d:
    diskcache.Cache(d).set(0, '"0"')
    print(rss() - before)
"""


def etag(index: int, generation: int = 0) -> str:
    """The version a clean file records: its object's stamp, as the map gives it."""
    return f"{stamp_of(index, generation):016x}"


def stamp_of(index: int, generation: int = 0) -> int:
    return index * 7919 + generation + 1


def per_call(fn: Callable[[int], None], calls: int) -> float:
    """Microseconds per fn(i), over calls calls."""
    started = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - started) / calls * 1e6


def per_result(tmp: Path, calls: int) -> dict[str, float]:
    cache = CleanCache(tmp / "added", max_bytes=2**62)
    cache.open(ChunkMap(0))
    results = {"CleanCache.added (in memory)":
               per_call(lambda i: cache.added(i % 4096, 4 * 2**20, etag(i)), calls)}
    try:
        import diskcache
    except ImportError:
        print("diskcache is not installed: its row is left out", file=sys.stderr)
        return results
    with diskcache.Cache(str(tmp / "diskcache")) as index:
        results["diskcache.Cache.set"] = per_call(
            lambda i: index.set(i % 4096, etag(i)), min(calls, 1000))  # ms each
    return results


def fsync_all(directory: Path) -> None:
    """What a clean close did before the marker held versions: fsync every file."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)


def close_and_open(tmp: Path, files: int) -> tuple[float, float, float]:
    """Seconds for the fsyncs alone, for mark_clean_shutdown and for the next open,
    with `files` clean files of 4 KiB (the marker's cost, not the chunks' size, is what
    is measured)."""
    directory = tmp / f"cache-{os.urandom(4).hex()}"
    cache = CleanCache(directory, max_bytes=2**62)
    cache.open(ChunkMap(0))
    stored = ChunkMap(files)
    block = os.urandom(4096)
    for index in range(files):
        (directory / "clean" / clean_name(index)).write_bytes(block)
        cache.added(index, len(block), etag(index))
        stored.set(index, Entry(stamp_of(index), 1))
    fsync_all(directory / "clean")  # the files' own write-back is not the marker's cost
    started = time.perf_counter()
    fsync_all(directory / "clean")
    fsyncs = time.perf_counter() - started
    started = time.perf_counter()
    cache.mark_clean_shutdown()
    closed = time.perf_counter() - started
    reopened = CleanCache(directory, max_bytes=2**62)
    started = time.perf_counter()
    reopened.open(stored)
    opened = time.perf_counter() - started
    assert reopened.bytes == files * len(block)
    return fsyncs, closed, opened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as name:
        tmp = Path(name)
        rows: dict[str, list[float]] = {}
        for run in range(args.runs):
            for label, micros in per_result(tmp / f"r{run}", 20000).items():
                rows.setdefault(label, []).append(micros)
        print("| per upload or fetch result | µs, median of runs |\n| --- | ---: |")
        for label, values in rows.items():
            print(f"| {label} | {statistics.median(values):.2f} |")
        timings = [close_and_open(tmp, args.files) for _ in range(args.runs)]
        print(f"\n| {args.files} clean files | ms, median of runs |\n| --- | ---: |")
        for column, label in enumerate(("close before: fsync them",
                                        "close: fsync them, write the marker",
                                        "open: read the marker, compare with the listing")):
            print(f"| {label} | {statistics.median(t[column] for t in timings) * 1e3:.1f} |")
        probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True,
                               text=True)
        if probe.returncode == 0:
            print(f"\nimport diskcache and open a Cache: "
                  f"+{int(probe.stdout) / 2**20:.1f} MiB RSS")


if __name__ == "__main__":
    main()
