"""Issue 13's targets for format 3, measured side by side in one run against format 1 and
(for small scattered writes) nbdkit-S3 and s3backer, on the SeaweedFS of bench/run.

Format 1 is the code of an older commit (FORMAT1_COMMIT, main before format 3), unpacked
with `git archive` into the bench's temporary directory and run as its own contender:
the same `cloudnbd` command line with PYTHONPATH pointing at that tree. Every contender
reaches the store through its own counting relay (testbed.stores.FaultProxy through an
uncapped testbed.link.Link), which counts the requests by method and the bytes sent to the
store (HTTP heads included); the slow-link measurement puts the relay behind an 80 ms /
20 Mbit/s link instead.

Small writes and FLUSHes come from bench/nbd_client.py (libnbd in Debian's python3),
which pauses after each step so that the bench reads the counters while nothing moves:
"bytes sent before the FLUSH returned" is read then.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    ROOT,
    S3_ACCESS_KEY,
    S3_BUCKET,
    S3_SECRET_KEY,
    TIER1_PER_REQUEST,
    TIER2_PER_REQUEST,
    FaultProxy,
    Link,
    median,
    run,
    s3_client,
)
from contenders import Cloudnbd, Contender, NbdkitS3, S3backer, session, stored_bytes
from workloads import filesystem, random_file, write_to_durable

FORMAT1_COMMIT = "29a914b"  # main with format 1: the merge before format 3
NBD_PYTHON = "/usr/bin/python3"  # the python3 with libnbd's `nbd` module
CLIENT = Path(__file__).resolve().parent / "nbd_client.py"
MiB, GiB = 2**20, 2**30
BLOCK = 4096
HELD = 256 * MiB  # the data on the volume of the small-FLUSH targets


class Format3(Cloudnbd):
    name = "cloudnbd format 3"


class Format1(Cloudnbd):
    """cloudnbd as of FORMAT1_COMMIT, from the tree in `tree` (set by the bench)."""

    name = "cloudnbd format 1"
    tree: Path | None = None

    def __init__(self, *args, **options) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **options)
        assert self.tree is not None, "Format1.tree: unpack the old code first"
        self.env["PYTHONPATH"] = str(self.tree)
        # `python -m cloudnbd` puts the working directory (this tree) first on sys.path
        # unless told not to
        self.env["PYTHONSAFEPATH"] = "1"


def unpack_format1(tmp: Path, commit: str) -> Path:
    """The code of commit, from this repository, in tmp/format1."""
    tree = tmp / "format1"
    tree.mkdir()
    subprocess.run(f"git -C {ROOT} archive {commit} | tar -x -C {tree}", shell=True,
                   check=True)
    return tree


@dataclass
class Mark:
    """What the store had received through a relay at one moment."""

    sent: int
    requests: Counter[str]

    def since(self, before: Mark) -> Mark:
        return Mark(self.sent - before.sent, self.requests - before.requests)

    def puts(self) -> int:
        return self.requests["PUT"] + self.requests["POST"]

    def dollars(self) -> float:
        tier1 = sum(self.requests[k] for k in ("PUT", "COPY", "POST", "LIST"))
        tier2 = sum(self.requests[k] for k in ("GET", "HEAD"))
        return tier1 * TIER1_PER_REQUEST + tier2 * TIER2_PER_REQUEST

    def text(self) -> str:
        return ", ".join(f"{n:,} {k}" for k, n in sorted(self.requests.items())) or "none"


class CountingProxy(FaultProxy):
    """The relay, also counting the bytes sent to the store (HTTP heads included). Not
    testbed.link.Link's count: an uncapped Link still cuts the stream into 16 KiB pieces
    sent one by one, which made a 64 KiB PUT through it three times slower."""

    sent = 0

    def _pipe(self, src, dst, upstream, on_data=None):  # type: ignore[no-untyped-def]
        if upstream:
            counter = on_data

            def on_data(data: bytes) -> None:
                with self._lock:
                    self.sent += len(data)
                if counter is not None:
                    counter(data)

        super()._pipe(src, dst, upstream, on_data)


class Relay:
    """A counting relay to the store, or behind a slow link (testbed.link.Link)."""

    def __init__(self, endpoint: str, link: Link | None = None) -> None:
        self.proxy = CountingProxy(endpoint, [], link=link)
        self.url = self.proxy.url

    def mark(self) -> Mark:
        return Mark(self.proxy.sent, Counter(self.proxy.requests))

    def close(self) -> None:
        self.proxy.close()


class Client:
    """bench/nbd_client.py running `plan` against uri; next() is each step's result."""

    def __init__(self, uri: str, plan: list[dict[str, object]]) -> None:
        self.process = subprocess.Popen([NBD_PYTHON, str(CLIENT), uri, json.dumps(plan)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)

    def next(self) -> dict[str, object]:
        assert self.process.stdout is not None and self.process.stdin is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=60)
            raise RuntimeError(f"nbd_client failed: {self.process.stderr.read()}")  # type: ignore[union-attr]
        return json.loads(line)

    def go_on(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def finish(self) -> None:
        self.go_on()
        if self.process.wait(timeout=600):
            raise RuntimeError(f"nbd_client failed: {self.process.stderr.read()}")  # type: ignore[union-attr]


@dataclass
class Targets:
    """The measurements, by contender name then key (one value per run)."""

    tmp: Path
    endpoint: str
    names: list[str]
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: dict[str, dict[str, str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, who: str, key: str, value: float) -> None:
        self.values.setdefault(who, {}).setdefault(key, []).append(value)
        print(f"  {who}: {key} {value:,.3f}", file=sys.stderr, flush=True)

    def note(self, who: str, key: str, text: str) -> None:
        self.notes.setdefault(who, {})[key] = text

    def get(self, who: str, key: str) -> float:
        found = self.values.get(who, {}).get(key)
        return median(found) if found else float("nan")

    def device(self, cls: type[Contender], relay: Relay, size: int,
               open_args: tuple[str, ...] = ()) -> Contender:
        self.count += 1
        key = f"t{self.count}-{cls.name.replace(' ', '-').lower()}"
        if issubclass(cls, Cloudnbd):
            return cls(self.tmp, self.endpoint, relay.url, key, size, open_args=open_args)
        return cls(self.tmp, self.endpoint, relay.url, key, size)


def guarded(targets: Targets, what: str, body: Callable[[], None]) -> None:
    """Run one measurement; a failure is reported in the table, not fatal."""
    try:
        body()
    except Exception as exc:
        import traceback

        traceback.print_exc()
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else repr(exc)
        targets.failures.append(f"{what}: {reason}")


def plain_puts(tmp: Path, endpoint: str, count: int = 32, size: int = 64 * 1024
               ) -> float:
    """Seconds for `count` PUTs of `size` random bytes, one after another on one kept-alive
    connection, by curl straight to the store: the store's own speed for small objects,
    the reference of the FLUSH loop. The objects are deleted afterwards."""
    pieces = tmp / "plain"
    pieces.mkdir(exist_ok=True)
    names = [f"p{i}" for i in range(count)]
    for name in names:
        (pieces / name).write_bytes(os.urandom(size))
    config = pieces / "curl.conf"  # the key goes in a 0600 file, not on a command line
    config.touch(mode=0o600)
    config.write_text(f'user = "{S3_ACCESS_KEY}:{S3_SECRET_KEY}"\n')
    started = time.monotonic()
    subprocess.run(["curl", "-sSf", "-K", str(config), "--aws-sigv4", "aws:amz:us-east-1:s3",
                    "-T", "{" + ",".join(names) + "}", f"{endpoint}/{S3_BUCKET}/plain/"],
                   check=True, cwd=pieces, capture_output=True)
    seconds = time.monotonic() - started
    client = s3_client(endpoint)
    for name in names:
        client.delete_object(Bucket=S3_BUCKET, Key=f"plain/{name}")  # type: ignore[attr-defined]
    return seconds


def fresh_session(device: Contender, relay: Relay, body: Callable[[str], None]) -> None:
    """body(uri) on a new volume of device, removed afterwards with its relay."""
    try:
        device.create()
        session(device, body)
    finally:
        device.remove()
        relay.close()


# -- the small-FLUSH targets (1 and 2) ---------------------------------------------------

def small_flushes(targets: Targets, cls: type[Cloudnbd], held: Path, slow_steps: int
                  ) -> None:
    """On a volume holding 256 MiB (written, then closed): 64 scattered 4 KiB writes +
    FLUSH, counting the bytes sent before the FLUSH returned, and 32 x (4 KiB write +
    FLUSH) for its requests, through the counting relay; the 32 steps again timed
    straight to the store (as the reference PUTs are); then steps behind an 80 ms /
    20 Mbit/s link."""
    who = cls.name
    relay = Relay(targets.endpoint)
    device = targets.device(cls, relay, HELD)

    def scattered(uri: str) -> None:
        client = Client(uri, [{"op": "scattered", "writes": 64, "span": HELD},
                              {"op": "steps", "count": 32, "span": HELD, "seed": 2}])
        before = relay.mark()
        flushed = client.next()
        sent = relay.mark().since(before)
        client.go_on()
        targets.add(who, "scattered bytes", sent.sent / (64 * BLOCK))
        targets.add(who, "scattered seconds", float(flushed["seconds"]))  # type: ignore[arg-type]
        targets.note(who, "scattered requests", sent.text())
        before = relay.mark()
        client.next()
        targets.note(who, "loop requests", relay.mark().since(before).text())
        client.finish()

    def loop(uri: str) -> None:
        client = Client(uri, [{"op": "steps", "count": 32, "span": HELD, "seed": 4}])
        targets.add(who, "loop seconds", sum(client.next()["steps"]))  # type: ignore[arg-type]
        client.finish()

    try:
        device.create()
        session(device, lambda uri: run("nbdcopy", "--flush", str(held), uri))
        session(device, scattered)
        device.store_args = ["--endpoint-url", targets.endpoint]  # type: ignore[attr-defined]
        session(device, loop)
        slow = Relay(targets.endpoint, Link.mbit(80, 20))
        device.store_args = ["--endpoint-url", slow.url]  # type: ignore[attr-defined]
        try:
            uri = device.start()
            client = Client(uri, [{"op": "steps", "count": slow_steps, "span": HELD,
                                   "seed": 3}])
            times = client.next()["steps"]
            client.finish()
            targets.add(who, "slow step median", median(times))  # type: ignore[arg-type]
            targets.add(who, "slow step max", max(times))  # type: ignore[arg-type]
        finally:
            device.abort()  # a close would fold the journal over the slow link: not measured
            slow.close()
    finally:
        device.remove()
        relay.close()


# -- sequential 1 GiB (target 3) ------------------------------------------------------------

def sequential(targets: Targets, cls: type[Cloudnbd], data: Path) -> None:
    """Written with `nbdcopy --flush` into a fresh volume, then closed: time to durable,
    bytes sent and PUTs up to durable and up to the end of close."""
    who = cls.name
    size = data.stat().st_size
    relay = Relay(targets.endpoint)
    device = targets.device(cls, relay, size)
    try:
        device.create()
        uri = device.start()
        try:
            before = relay.mark()
            targets.add(who, "seq seconds", write_to_durable(device, uri, data))
            durable = relay.mark().since(before)
            device.stop()
        except BaseException:
            device.abort()
            raise
        closed = relay.mark().since(before)
        targets.add(who, "seq bytes durable", durable.sent / size)
        targets.add(who, "seq bytes closed", closed.sent / size)
        targets.add(who, "seq puts durable", durable.puts() * GiB / size)
        targets.add(who, "seq puts closed", closed.puts() * GiB / size)
        targets.note(who, "seq requests closed", closed.text())
    finally:
        device.remove()
        relay.close()


# -- scattered small writes against the others (target 4) ---------------------------------

FIO_WRITES = 256  # 4 KiB random writes, an fsync after every 16
FS_EDITS = 32  # small edits of a btrfs, each followed by `sync`
SCATTER_VOLUME = GiB
SCATTER_SPAN = 256 * MiB


def fio_fsync(targets: Targets, cls: type[Contender], held: Path) -> None:
    """fio's nbd engine: FIO_WRITES random 4 KiB writes over the first 256 MiB of a
    volume, which hold data (held, written and stored first: a used disk), at queue
    depth 1, a FLUSH after every 16, each write fresh random data
    (--refill_buffers: fio otherwise repeats one buffer, which compresses to nothing);
    time, bytes and requests to durable."""
    who = cls.name
    relay = Relay(targets.endpoint)
    device = targets.device(cls, relay, SCATTER_VOLUME)

    def body(uri: str) -> None:
        run("nbdcopy", "--flush", str(held), uri)
        device.settle()
        before = relay.mark()
        started = time.monotonic()
        run("fio", "--name=fsync16", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bs=4k", "--iodepth=1", "--refill_buffers", f"--size={SCATTER_SPAN}",
            f"--io_size={FIO_WRITES * BLOCK}", "--fsync=16", "--randrepeat=1",
            "--output-format=json")
        device.settle()
        seconds = time.monotonic() - started
        done = relay.mark().since(before)
        record(targets, who, "fio", seconds, done, FIO_WRITES)

    fresh_session(device, relay, body)


def fs_edits(targets: Targets, cls: type[Contender]) -> None:
    """A fresh btrfs (made and synced untimed), then FS_EDITS small edits (a line
    appended to one of 8 files), each followed by `sync -f` and, for a contender whose
    FLUSH does not wait for the store, by waiting until it is stored; time, bytes and
    requests to durable."""
    who = cls.name
    relay = Relay(targets.endpoint)
    device = targets.device(cls, relay, SCATTER_VOLUME)
    stack = device.work / "fs"
    stack.mkdir()

    def body(uri: str) -> None:
        with filesystem(uri, stack, mkfs=True) as root:
            run("sync", "-f", str(root))
            device.settle()
            before = relay.mark()
            started = time.monotonic()
            for i in range(FS_EDITS):
                subprocess.run(f'echo "edit {i} $(date +%s.%N)" >> f{i % 8} && sync -f .',
                               shell=True, check=True, cwd=root)
                device.settle()  # s3backer's fsync does nothing: wait until it is stored
            seconds = time.monotonic() - started
            done = relay.mark().since(before)
        record(targets, who, "fs", seconds, done, FS_EDITS)

    fresh_session(device, relay, body)


def record(targets: Targets, who: str, kind: str, seconds: float, done: Mark,
           operations: int) -> None:
    targets.add(who, f"{kind} seconds", seconds)
    targets.add(who, f"{kind} bytes", done.sent / operations)
    targets.add(who, f"{kind} requests", sum(done.requests.values()) / operations)
    targets.add(who, f"{kind} dollars", done.dollars() * 1e6 / operations)
    targets.note(who, f"{kind} requests", done.text())


# -- a fresh machine opens a volume with 256 MiB of store journal (target 5) ---------------

JOURNAL_OPEN = ("--checkpoint-size", "4GiB", "--checkpoint-age", "86400")


def fresh_open(targets: Targets, journal_mib: int) -> None:
    """Write journal_mib MiB as 64 KiB writes spread over a volume four times as big (a
    quarter of each chunk: nothing is uploaded as a whole chunk), FLUSH every 16 MiB,
    with checkpoints held off; kill -9 the server; then open with an empty cache (a
    fresh machine): seconds until it accepts connections, and until `close` (which
    folds the journal) returns."""
    who = Format3.name
    relay = Relay(targets.endpoint)
    size = 4 * journal_mib * MiB
    device = targets.device(Format3, relay, size, open_args=JOURNAL_OPEN)
    try:
        device.create()
        uri = device.start()
        try:
            client = Client(uri, [{"op": "spread", "span": size, "chunk": 4 * MiB,
                                   "per_chunk": MiB, "write": 64 * 1024,
                                   "flush_every": 16 * MiB}])
            client.next()
            client.finish()
        finally:
            device.abort()  # kill -9: the store's journal stays as it is
        journal = stored_bytes(targets.endpoint, f"{device.key}/journal/")
        targets.add(who, "open journal MiB", journal / MiB)
        (device.work / "cache").rename(device.work / "old-cache")  # another machine
        before = relay.mark()
        started = time.monotonic()
        device.start()
        targets.add(who, "open seconds", time.monotonic() - started)
        opened = relay.mark().since(before)
        targets.note(who, "open requests", opened.text())
        started = time.monotonic()
        device.stop()
        targets.add(who, "open close seconds", time.monotonic() - started)
    except BaseException:
        device.abort()
        raise
    finally:
        device.remove()
        relay.close()


# -- the run and its table -------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("format 3 targets (issue 13)")
    group.add_argument("--no-targets", action="store_true", help="skip issue 13's targets")
    group.add_argument("--format1", default=FORMAT1_COMMIT, metavar="COMMIT",
                       help="the commit whose cloudnbd is the format 1 contender")
    group.add_argument("--target-runs", type=int, default=1,
                       help="medians of this many runs of each target")
    group.add_argument("--slow-steps", type=int, default=12,
                       help="4 KiB write + FLUSH steps behind the 80 ms / 20 Mbit/s link")
    group.add_argument("--journal-mib", type=int, default=256,
                       help="store journal a fresh machine opens")


def measure(args: argparse.Namespace, tmp: Path, endpoint: str) -> str:
    """Every target, --target-runs times; the section's text."""
    Format1.tree = unpack_format1(tmp, args.format1)
    ours = [Format3, Format1]
    others: list[type[Contender]] = [NbdkitS3, S3backer]
    targets = Targets(tmp, endpoint, [c.name for c in ours + others])
    held = tmp / "held.img"
    random_file(held, HELD)
    data = tmp / "sequential.img"
    random_file(data, args.size_mib * MiB)
    for index in range(args.target_runs):
        print(f"targets run {index + 1}/{args.target_runs}", file=sys.stderr, flush=True)
        guarded(targets, "plain PUTs", lambda: targets.add(
            "store", "plain puts seconds", plain_puts(tmp, endpoint)))
        for cls in ours:
            guarded(targets, f"{cls.name}: small FLUSHes",
                    lambda c=cls: small_flushes(targets, c, held, args.slow_steps))
        guarded(targets, "plain PUTs", lambda: targets.add(
            "store", "plain puts seconds", plain_puts(tmp, endpoint)))
        for cls in ours:
            guarded(targets, f"{cls.name}: sequential",
                    lambda c=cls: sequential(targets, c, data))
        for cls in ours + others:
            guarded(targets, f"{cls.name}: fio fsync",
                    lambda c=cls: fio_fsync(targets, c, held))
            guarded(targets, f"{cls.name}: fs edits", lambda c=cls: fs_edits(targets, c))
        guarded(targets, "fresh open", lambda: fresh_open(targets, args.journal_mib))
    held.unlink()
    data.unlink()
    return table(targets, args)


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"


def verdict(value: float, limit: float) -> str:
    if value != value:
        return "not measured"
    return "pass" if value <= limit else f"**missed by {value / limit:.2f}x**"


def table(t: Targets, args: argparse.Namespace) -> str:
    f3, f1 = Format3.name, Format1.name
    puts = t.get("store", "plain puts seconds")
    size_label = f"{args.size_mib} MiB" if args.size_mib % 1024 else (
        f"{args.size_mib // 1024} GiB")
    rows = [
        ("64 scattered 4 KiB writes + FLUSH on a volume holding 256 MiB: bytes sent "
         "before the FLUSH returned / bytes written",
         t.get(f3, "scattered bytes"), t.get(f1, "scattered bytes"), 4.0, "x", 1),
        ("32 x (4 KiB write + FLUSH) / 32 plain 64 KiB PUTs "
         f"({fmt(puts * 1000 / 32)} ms each)",
         t.get(f3, "loop seconds") / puts, t.get(f1, "loop seconds") / puts, 4.0, "x", 1),
        ("median 4 KiB write + FLUSH behind 80 ms / 20 Mbit/s",
         t.get(f3, "slow step median"), t.get(f1, "slow step median"), 0.4, " s", 2),
        (f"sequential {size_label} + FLUSH, then close: bytes sent to the end of close "
         "/ bytes written",
         t.get(f3, "seq bytes closed"), t.get(f1, "seq bytes closed"), 1.15, "x", 3),
        (f"sequential {size_label} + FLUSH: s to durable",
         t.get(f3, "seq seconds"), t.get(f1, "seq seconds"),
         t.get(f1, "seq seconds"), " s", 1),
        ("sequential: PUTs per GiB, to the end of close",
         t.get(f3, "seq puts closed"), t.get(f1, "seq puts closed"),
         t.get(f1, "seq puts closed"), "", 0),
        (f"a fresh machine opens a volume with {fmt(t.get(f3, 'open journal MiB'), 0)} "
         "MiB of store journal: s to accepting connections",
         t.get(f3, "open seconds"), float("nan"), float("nan"), " s", 1),
    ]
    lines = ["| target | format 3 | format 1 | target | verdict |", "|---|---|---|---|---|"]
    for label, ours, old, limit, unit, digits in rows:
        limit_text = "-" if limit != limit else f"<= {fmt(limit, digits)}{unit}"
        if "durable" in label or "PUTs per GiB" in label:
            limit_text = "no worse than format 1"
        lines.append(f"| {label} | {fmt(ours, digits)}{unit} | "
                     f"{fmt(old, digits) + unit if old == old else '-'} | {limit_text} | "
                     f"{verdict(ours, limit) if limit == limit else 'stated'} |")
    detail = [
        "", "Requests behind the rows (format 3 / format 1):", "",
        *[f"- {label}: {t.notes.get(f3, {}).get(key, '-')} / "
          f"{t.notes.get(f1, {}).get(key, '-')}"
          for label, key in (("the scattered FLUSH", "scattered requests"),
                             ("the 32-step loop", "loop requests"),
                             ("sequential, to the end of close", "seq requests closed"))],
        f"- scattered FLUSH: {fmt(t.get(f3, 'scattered seconds'), 3)} s (format 3), "
        f"{fmt(t.get(f1, 'scattered seconds'), 3)} s (format 1); behind the slow link "
        f"the slowest of {args.slow_steps} steps: "
        f"{fmt(t.get(f3, 'slow step max'), 2)} s / {fmt(t.get(f1, 'slow step max'), 2)} s",
        f"- fresh open: {t.notes.get(f3, {}).get('open requests', '-')}; its close "
        f"(folding the journal into chunks) took {fmt(t.get(f3, 'open close seconds'))} s",
    ]
    names = t.names
    small = ["", f"Scattered small writes on a {SCATTER_VOLUME // GiB} GiB volume: "
             f"fio's nbd engine, {FIO_WRITES} random 4 KiB writes (fresh random data "
             f"each) over the first {SCATTER_SPAN // MiB} MiB, which hold random data "
             "written and stored before, at queue depth 1 with a FLUSH after every 16; "
             f"and a fresh btrfs (made and synced untimed) given {FS_EDITS} small edits "
             "(a line appended to one of 8 files), each followed by `sync -f`. Time "
             "until the store holds it all (s3backer, whose FLUSH does not wait for the "
             "store: until no block is dirty, after each edit and at the end of fio), "
             "bytes sent to the store and requests per operation, and request dollars "
             "per million operations at S3 list prices.", "",
             "| workload | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for kind, what in (("fio", "fio 4 KiB writes, fsync every 16"),
                       ("fs", "btrfs edit + sync")):
        for key, label, digits in (("seconds", "s to durable", 1),
                                   ("bytes", "bytes sent per operation", 0),
                                   ("requests", "requests per operation", 2),
                                   ("dollars", "request $ per million operations", 2)):
            cells = [fmt(t.get(n, f"{kind} {key}"), digits) for n in names]
            if key == "dollars":
                cells = ["$" + c if c != "-" else c for c in cells]
            small.append(f"| {what}: {label} | " + " | ".join(cells) + " |")
    small += ["", "Requests by kind (per workload run):", ""]
    for kind in ("fio", "fs"):
        small.append(f"- {kind}: " + "; ".join(
            f"{n}: {t.notes.get(n, {}).get(f'{kind} requests', '-')}" for n in names))
    runs = "One run." if args.target_runs == 1 else f"Medians of {args.target_runs} runs."
    failed = "".join(f"\n- failed: {line}" for line in t.failures)
    return "\n".join([f"Measured {time.strftime('%Y-%m-%d')}. {runs} Format 1 is commit "
                      f"{args.format1} run from a `git archive` of it in the same run."
                      f"{failed}", "", *lines, *detail, *small])
