"""What a garbage-collection round costs (issue 14): the requests one round of a running
server makes, by kind, its wall time, and whether NBD reads wait for it.

A volume of random data is served by cloudnbd on SeaweedFS through the counting relay
(testbed FaultProxy). It gets --snapshots snapshots, each after the same
--rewrite-chunks whole chunks were rewritten twice: the objects the first rewrite made
are garbage at once, the ones it replaced are kept only by the snapshots. The first half
of the snapshots are taken with the store's journal folded (--checkpoint-age 1: each
names one map page per 16 GiB), the second half with it unfolded (each also names the
journal objects of every commit since). After the last snapshot the chunks are
rewritten twice once more, so that there is garbage no snapshot keeps. Until then the
server collects nothing (--gc-grace 3600).

Then the server is reopened with a short --gc-grace, so that a round comes every grace
(the first lists, the second deletes what the first found, the third finds nothing, and
the later ones are quiet: one LIST of the snapshots), while fio reads 4 KiB at random
places of the volume at a fixed rate (all from the local cache: no read reaches the
store). The relay's timeline splits the
store's requests into rounds (bursts), and a read counts as during a round if it
overlapped one. The counts are set beside the formula of docs/performance.md, computed
from what the store holds (listed objects, snapshots, the map pages and journal objects
they name, garbage).

Last, in this process: how long the real Engine holds its lock at a time handling one
listing's result, a batch of keys per hold (and how long the whole handling and
unpickling the listing in the front take), for volumes of several sizes, its map filled
in place and the listing made up (every stored chunk, plus 1000 garbage keys). No NBD
request can be served while the lock is held; between holds they are.

    python bench/gc_cost.py [--size-mib 1024] [--snapshots 10] [--rewrite-chunks 8]
        [--grace 2] [--read-seconds 60] [--read-iops 1000]
        [--lock-chunks 256,16384,262144] [--no-docs]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    KDF,
    ROOT,
    S3_ACCESS_KEY,
    S3_BUCKET,
    S3_SECRET_KEY,
    FaultProxy,
    Served,
    cloudnbd,
    command_line,
    machine,
    make_password_file,
    replace_section,
    run,
    start,
    start_seaweedfs,
)
from snapshot_cost import folded, until
from workloads import random_file

from cloudnbd import layout, volume
from cloudnbd.backends import StoreOptions, open_store
from cloudnbd.backends.file import FileStore
from cloudnbd.codec import ScryptParams
from cloudnbd.engine.chunkmap import ChunkMap
from cloudnbd.engine.device import CloudState, Engine, EngineSettings
from cloudnbd.engine.inprocess import InProcessPool
from cloudnbd.engine.workers import Listing, Outcome, Result, WorkerConfig
from cloudnbd.reader import Image, read_head
from testbed.stores import request_kind

MiB = 2**20
CHUNK = 4 * MiB  # the default chunk size
SECTION = "bench/gc_cost.py: garbage collection"  # its place in docs/performance.md
GAP = 0.5  # seconds without a request or answer that end a round (rounds are a grace apart)
SLACK = 0.05  # seconds after a round's last answer still counted as the round (the
#               listing's result reaches the engine and is handled)
SLOW = 1.0  # ms: a read slower than this is counted by where in a round it began
PASSWORD = "correct horse battery"  # testbed.served.make_password_file's


@dataclass
class Holdings:
    """What the store holds, as a round's formula counts it."""

    listed: Counter[str]  # objects under chunks/, map/, journal/
    snapshots: int
    pages: int  # map pages the snapshots name, summed over the snapshots
    journals: int  # journal objects the snapshots name, summed
    garbage: int  # listed objects neither the head names nor a snapshot needs
    distinct: int  # different map pages and journal objects among pages + journals

    def quiet_round(self) -> Counter[str]:
        """The requests of a quiet round (G5 in engine/device.py): the head and the
        snapshots are as the last listing, which found nothing unnamed, left them."""
        return Counter({"LIST": max(1, math.ceil(self.snapshots / 1000))})

    def listing_round(self) -> Counter[str]:
        """The requests of a round that lists everything and deletes nothing, on S3."""
        lists = sum(max(1, math.ceil(self.listed[kind] / 1000))
                    for kind in ("chunks", "map", "journal"))
        return Counter({"LIST": lists + max(1, math.ceil(self.snapshots / 1000)),
                        "GET": self.snapshots + self.pages + self.journals})

    def deleting_round(self) -> Counter[str]:
        """And of the round that deletes the garbage: the head's HEAD, and one
        DeleteObjects (a POST) per 1000 objects."""
        return self.listing_round() + Counter({"HEAD": 1,
                                               "POST": math.ceil(self.garbage / 1000)})


@dataclass
class Round:
    """One burst of requests: a garbage-collection round."""

    start: float  # time.time() of its first request
    end: float  # of the last answer
    requests: Counter[str] = field(default_factory=Counter)  # by kind and family

    @property
    def kinds(self) -> Counter[str]:
        counted: Counter[str] = Counter()
        for label, n in self.requests.items():
            counted[label.split(" ")[0]] += n
        return counted

    @property
    def deletes(self) -> bool:
        return "POST" in self.kinds

    @property
    def quiet(self) -> bool:
        return set(self.requests) == {"LIST snapshots/"}


@dataclass
class Reads:
    """Latencies (ms) of the reads that overlapped a round, and of the others."""

    during: list[float]
    between: list[float]
    iops: float
    #: the reads during rounds slower than SLOW ms, by the tenth of the round they began
    #: in: even if the round slows them by competing for the CPUs, piled up at the end
    #: if they wait for the engine to handle the listing
    slow_by_tenth: list[int] = field(default_factory=lambda: [0] * 10)


@dataclass
class Session:
    """What the server did while fio read."""

    rounds: list[Round]
    reads: Reads
    deleted: int  # objects the server deleted
    uploader_cpu: float  # CPU seconds its uploader processes used (nothing but rounds)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-mib", type=int, default=1024, help="volume size")
    parser.add_argument("--snapshots", type=int, default=10, help="snapshots kept")
    parser.add_argument("--rewrite-chunks", type=int, default=8,
                        help="whole chunks rewritten (twice) before each snapshot")
    parser.add_argument("--grace", type=float, default=2.0,
                        help="--gc-grace while measuring: a round every this many seconds")
    parser.add_argument("--read-seconds", type=float, default=60.0,
                        help="how long fio reads while the rounds run")
    parser.add_argument("--read-iops", type=int, default=1000,
                        help="fio's fixed rate of 4 KiB random reads (queue depth 1)")
    parser.add_argument("--lock-chunks", default="256,16384,262144",
                        help="stored chunks of the volumes the lock hold is timed for")


# -- the volume --------------------------------------------------------------------------

def prepare(work: Path, proxy: FaultProxy, location: str, env: dict[str, str],
            args: argparse.Namespace) -> Path:
    """Create and fill the volume, take the snapshots, leave garbage; the cache dir."""
    size = args.size_mib * MiB
    password = make_password_file(work)
    store_args = ["--endpoint-url", proxy.url]
    cache = work / "cache"
    cloudnbd("init", "s3", location, str(size), *store_args, "--password-file",
             str(password), *KDF, env=env)
    folded_half = args.snapshots // 2
    served = start(work, "s3", location, password, "--checkpoint-age", "1", "--gc-grace",
                   "3600", store_args=store_args, env=env, cache=cache)
    try:
        random_file(work / "fill.img", size)
        run("nbdcopy", "--flush", str(work / "fill.img"), served.uri)
        (work / "fill.img").unlink()
        until(served, folded, "the fill folded into chunks")
        for day in range(1, folded_half + 1):
            rewrite_twice(served, size, args.rewrite_chunks, day, fold=True)
            snapshot(served, location, password, store_args, env, day)
    finally:
        served.close()
    served = start(work, "s3", location, password, "--checkpoint-age", "3600",
                   "--gc-grace", "3600", store_args=store_args, env=env, cache=cache)
    try:
        for day in range(folded_half + 1, args.snapshots + 1):
            rewrite_twice(served, size, args.rewrite_chunks, day, fold=False)
            fio_write(served.uri, 4096, size, 64 * 1024, seed=1000 + day)  # journal data
            snapshot(served, location, password, store_args, env, day)
        rewrite_twice(served, size, args.rewrite_chunks, args.snapshots + 1, fold=False)
    finally:
        served.close()  # folds the store's journal: what only it named is garbage now
    return cache


def rewrite_twice(served: Served, size: int, chunks: int, seed: int, fold: bool) -> None:
    """Rewrite the same `chunks` whole chunks twice (fio's random map and seed pick the
    same ones), each time with a FLUSH (and, with fold, a checkpoint) after."""
    for _ in range(2):
        fio_write(served.uri, CHUNK, size, chunks * CHUNK, seed)
        until(served, folded if fold else flushed, "the rewrite committed")


def fio_write(uri: str, block: int, size: int, amount: int, seed: int) -> None:
    run("fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
        f"--bs={block}", f"--size={size}", f"--io_size={amount}", "--iodepth=4",
        "--refill_buffers", f"--randseed={seed}", "--end_fsync=1", "--output-format=terse")


def snapshot(served: Served, location: str, password: Path, store_args: list[str],
             env: dict[str, str], day: int) -> None:
    cloudnbd("snapshot", "create", "s3", location, f"day{day:02d}", *store_args,
             "--password-file", str(password), "--cache", str(served.cache), env=env)
    print(f"  snapshot {day}", file=sys.stderr)


def flushed(status: dict[str, object]) -> bool:
    return not status["dirty_bytes"]


def holdings(endpoint: str, location: str) -> Holdings:
    """What the store holds, read directly (not through the relay)."""
    store = open_store("s3", location, StoreOptions(endpoint_url=endpoint))
    vol = volume.unlock(store, PASSWORD)
    listed = list(vol.objects.list_own())
    snaps = [vol.objects.get_snapshot(name) for name in vol.objects.snapshot_names()]
    kept = vol.objects.kept_by_snapshots()
    head, _ = read_head(vol)
    named = Image(vol, head).named
    return Holdings(Counter(info.key.split("/", 1)[0] for info in listed), len(snaps),
                    sum(len(s.head.pages) for s in snaps),
                    sum(len(s.head.journal) for s in snaps),
                    sum(1 for info in listed if info.key not in kept | named),
                    len({*(p for s in snaps for p in s.head.pages),
                         *(r.stamp for s in snaps for r in s.head.journal)}))


# -- the rounds --------------------------------------------------------------------------

def measure_rounds(work: Path, proxy: FaultProxy, location: str, env: dict[str, str],
                   cache: Path, args: argparse.Namespace) -> Session:
    """Serve with a short grace while fio reads."""
    for path in (cache / "clean").rglob("*"):  # the reads are to find them in memory
        if path.is_file():
            path.read_bytes()
    served = start(work, "s3", location, work / "password", "--gc-grace", str(args.grace),
                   "--checkpoint-age", "3600", store_args=["--endpoint-url", proxy.url],
                   env=env, cache=cache)
    timeline: list[tuple[float, str]] = []
    try:
        uploaders = served.status()["worker_pids"]["upload"]  # type: ignore[index]
        cpu_before = sum(cpu_seconds(pid) for pid in uploaders)
        proxy.timeline = timeline
        log = work / "reads"
        out = run("fio", "--name=r", "--ioengine=nbd", f"--uri={served.uri}",
                  "--rw=randread", "--bs=4k", "--iodepth=1", f"--rate_iops={args.read_iops}",
                  f"--size={args.size_mib * MiB}", f"--runtime={args.read_seconds}",
                  "--time_based", f"--write_lat_log={log}", "--log_avg_msec=0",
                  "--log_unix_epoch=1", "--output-format=json")
        proxy.timeline = None
        status = served.status()
        cpu = sum(cpu_seconds(pid) for pid in uploaders) - cpu_before
    finally:
        proxy.timeline = None
        served.close()
    rounds = split_rounds(timeline, location.split("/", 1)[1])
    iops = json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"]
    return Session(rounds, classify(Path(f"{log}_lat.1.log"), rounds, iops),
                   int(status["garbage_deleted"]), cpu)  # type: ignore[call-overload]


def cpu_seconds(pid: int) -> float:
    """User and system CPU time process pid has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def split_rounds(timeline: list[tuple[float, str]], prefix: str) -> list[Round]:
    """Bursts of requests GAP apart, each request labelled by kind and family."""
    rounds: list[Round] = []
    last = -math.inf
    for when, line in sorted(timeline):
        if line and when - last > GAP:
            rounds.append(Round(when, when))
        last = when
        if rounds:
            rounds[-1].end = when
            if line:
                rounds[-1].requests[label(line, prefix)] += 1
    return rounds


def label(line: str, prefix: str) -> str:
    """'GET map/', 'LIST chunks/', 'HEAD head', 'POST ?delete' ... from a request line."""
    kind = request_kind(line.encode())
    target = line.split(" ")[1]
    path, _, query = target.partition("?")
    if kind == "LIST":
        within = urllib.parse.parse_qs(query).get("prefix", [""])[0]
    elif kind == "POST":
        return f"POST ?{query}"
    else:
        within = urllib.parse.unquote(path).split("/", 2)[-1]
    within = within.removeprefix(prefix + "/")
    family = within.split("/", 1)[0] + "/" if "/" in within else within.split("-", 1)[0]
    return f"{kind} {family}"


def classify(log: Path, rounds: list[Round], iops: float) -> Reads:
    """Each read of fio's latency log (completion time in ms since the epoch, latency
    in ns) is during a round if [start, end] overlaps one; a slow one (over SLOW ms) is
    also counted by the tenth of the round it began in."""
    windows = sorted((r.start, r.end + SLACK) for r in rounds)
    reads = Reads([], [], iops)
    for line in log.read_text().splitlines():
        fields = line.split(",")
        end, latency = int(fields[0]) / 1000, int(fields[1]) / 1e9
        begin = end - latency
        window = next(((s, e) for s, e in windows if s <= end and begin <= e), None)
        if window is None:
            reads.between.append(latency * 1000)
            continue
        reads.during.append(latency * 1000)
        if latency * 1000 > SLOW:
            start, stop = window
            tenth = int(10 * (max(begin, start) - start) / max(stop - start, 1e-3))
            reads.slow_by_tenth[min(tenth, 9)] += 1
    return reads


# -- the engine lock ---------------------------------------------------------------------

class TimedLock:
    """A lock that records how long each hold by the thread `watched` lasted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since = 0.0
        self.watched: int | None = None
        self.holds: list[float] = []

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        if got:
            self._since = time.perf_counter()
        return got

    def release(self) -> None:
        if threading.get_ident() == self.watched:
            self.holds.append(time.perf_counter() - self._since)
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_hold(tmp: Path, chunks: int, garbage: int = 1000
              ) -> tuple[float, int, float, float]:
    """How the real Engine handles one listing's result of a volume of `chunks` stored
    chunks: the longest hold of its lock (seconds), how many holds, the whole handling
    (seconds, on the garbage thread: the lock is free between holds), and seconds
    unpickling the result takes (the front's pool thread, holding the GIL); the Engine
    on a file store, its map filled in place (nothing is uploaded) and the listing
    made up (every chunk plus garbage keys; no snapshot)."""
    root = tmp / f"lock-{chunks}"
    root.mkdir()
    store = FileStore(root / "store")
    vol = volume.create(store, chunks * CHUNK, CHUNK, "pw", ScryptParams(n=2**10))
    head, version = vol.objects.get_head(vol.meta.head)
    cache = root / "cache"
    config = WorkerConfig(backend="file", location=str(store.root), options=StoreOptions(),
                          codec=vol.chunk_codec, clean_dir=cache / "clean",
                          journal_dir=cache / "journal")
    engine = Engine(chunks * CHUNK, CHUNK, cache,
                    CloudState(vol.meta.head, head, version, 1, import_journal=True),
                    EngineSettings(gc_grace=1e9),
                    lambda on_result: InProcessPool(config, on_result, auto=False))
    timed = TimedLock()
    engine._cond = threading.Condition(timed)  # type: ignore[arg-type]
    engine.start()
    try:
        table = ChunkMap(chunks)
        for index in range(chunks):
            table.set(index, layout.Entry(layout.stamp(1, index + 1), index + 1))
        keys = [layout.chunk_key(i, layout.stamp(1, i + 1)) for i in range(chunks)]
        keys += [layout.chunk_key(i % chunks, layout.stamp(1, chunks + 1 + i))
                 for i in range(garbage)]
        listing = Listing(tuple(keys), 0, {})
        result = Result(0, -1, Outcome.DONE, value=listing)
        wire = pickle.dumps(result)
        started = time.perf_counter()
        pickle.loads(wire)
        unpickled = time.perf_counter() - started
        with engine._cond:
            engine.map = table
        timed.watched = threading.get_ident()
        started = time.perf_counter()
        engine._garbage_listed(listing)  # what the garbage thread runs
        whole = time.perf_counter() - started
        timed.watched = None
    finally:
        engine.stop(clean=False)
    return max(timed.holds), len(timed.holds), whole, unpickled


# -- the report --------------------------------------------------------------------------

def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def counts(counter: Counter[str]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counter.items())) or "none"


def report(args: argparse.Namespace, facts: Holdings, session: Session,
           locks: list[tuple[int, float, int, float, float]]) -> str:
    rounds, reads = session.rounds, session.reads
    quiet = [r for r in rounds if r.quiet]
    listing = [r for r in rounds if not r.deletes and not r.quiet]
    deleting = [r for r in rounds if r.deletes]
    typical = Counter(tuple(sorted(r.requests.items())) for r in listing).most_common(1)
    lines = [
        f"Volume: {args.size_mib} MiB of random data in 4 MiB chunks; {facts.snapshots} "
        f"snapshots, each after the same {args.rewrite_chunks} chunks were rewritten "
        f"twice (the first {facts.snapshots // 2} with the store's journal folded, the "
        f"others not); served with --gc-grace {args.grace:g} while fio read 4 KiB at "
        f"random places, queue depth 1, {args.read_iops} per second, for "
        f"{args.read_seconds:g} s ({reads.iops:.0f} per second done; from the local "
        f"cache: no read reached the store).",
        "",
        "| | |",
        "|---|---|",
        f"| objects listed (chunks/ map/ journal/) | {facts.listed['chunks']} / "
        f"{facts.listed['map']} / {facts.listed['journal']} |",
        f"| snapshots; map pages / journal objects they name, summed over the snapshots "
        f"(different ones) | {facts.snapshots}; {facts.pages} / {facts.journals} "
        f"({facts.distinct}) |",
        f"| garbage before the rounds (neither head nor snapshot needs it) | "
        f"{facts.garbage} objects; the server deleted {session.deleted} |",
        f"| rounds seen | {len(rounds)} ({len(deleting)} deleting, {len(quiet)} quiet) |",
        f"| formula, a quiet round | {counts(facts.quiet_round())} |",
        "| measured, the quiet rounds | "
        + ("; ".join(sorted({counts(r.requests) for r in quiet})) or "none") + " |",
        f"| formula, a round that lists and deletes nothing | "
        f"{counts(facts.listing_round())} |",
        f"| measured, such a round (most common of {len(listing)}) | "
        + (counts(Counter(dict(typical[0][0]))) if typical else "none") + " |",
        f"| formula, the round that deletes | {counts(facts.deleting_round())} |",
        "| measured, the round that deletes | "
        + ("; ".join(counts(r.requests) for r in deleting) or "none") + " |",
        "| wall time of a quiet round (median / max) | "
        + (f"{statistics.median(r.end - r.start for r in quiet) * 1000:.0f} ms / "
           f"{max(r.end - r.start for r in quiet) * 1000:.0f} ms" if quiet else "-")
        + " |",
        "| wall time of a round that lists and deletes nothing (median / max) | "
        + (f"{statistics.median(r.end - r.start for r in listing) * 1000:.0f} ms / "
           f"{max(r.end - r.start for r in listing) * 1000:.0f} ms" if listing else "-")
        + " |",
        "| wall time of the round that deletes | "
        + (", ".join(f"{(r.end - r.start) * 1000:.0f} ms" for r in deleting) or "-")
        + " |",
        f"| CPU time of the uploader per round (it did nothing else) | "
        f"{session.uploader_cpu / max(1, len(rounds)) * 1000:.0f} ms |",
        f"| reads during a round: count; p50 / p99 / max | {len(reads.during)}; "
        f"{percentile(reads.during, 0.5):.2f} / {percentile(reads.during, 0.99):.2f} / "
        f"{max(reads.during, default=float('nan')):.2f} ms |",
        f"| reads between rounds: count; p50 / p99 / max | {len(reads.between)}; "
        f"{percentile(reads.between, 0.5):.2f} / {percentile(reads.between, 0.99):.2f} / "
        f"{max(reads.between, default=float('nan')):.2f} ms |",
        f"| reads during a round slower than {SLOW:g} ms, by tenth of the round they began "
        f"in | {' / '.join(str(n) for n in reads.slow_by_tenth)} |",
    ]
    for chunks, held, holds, whole, unpickled in locks:
        lines.append(f"| a listing's result, {chunks:,} chunks stored "
                     f"({chunks * 4 / 1024:g} GiB): longest hold of the engine lock "
                     f"(holds); handling it, lock free between holds; unpickling it | "
                     f"{held * 1000:.1f} ms ({holds}); {whole * 1000:.0f} ms; "
                     f"{unpickled * 1000:.1f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--no-docs", action="store_true",
                        help="print only; leave docs/performance.md alone")
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY)
    env = dict(os.environ)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cloudnbd-gccost-",
                                     dir=os.environ.get("BENCH_DIR")) as name:
        tmp = Path(name)
        (tmp / "weed").mkdir()
        work = tmp / "gc"
        work.mkdir()
        location = f"{S3_BUCKET}/gccost"
        weed = start_seaweedfs(tmp / "weed")
        try:
            with FaultProxy(weed.endpoint, []) as proxy:
                cache = prepare(work, proxy, location, env, args)
                facts = holdings(weed.endpoint, location)
                print(f"  prepared in {time.monotonic() - started:.0f} s: {facts}",
                      file=sys.stderr)
                session = measure_rounds(work, proxy, location, env, cache, args)
        finally:
            weed.stop()
        locks = [(n, *lock_hold(tmp, n)) for n in
                 (int(v) for v in args.lock_chunks.split(",") if v)]
    text = (f"Machine: {machine()}.\n\nCommand: "
            f"`{command_line('bench/gc_cost.py', sys.argv[1:])}`\n\n"
            + report(args, facts, session, locks)
            + f"\n\nWall time of the run: {(time.monotonic() - started) / 60:.1f} min.")
    print(text)
    if not args.no_docs:
        replace_section(ROOT / "docs" / "performance.md", SECTION, text)


if __name__ == "__main__":
    main()
