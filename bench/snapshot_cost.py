"""What keeping daily snapshots costs (issue 14): a volume of incompressible data,
served by cloudnbd on SeaweedFS, gets 1% of its size rewritten each "day", folded into
chunks, then `cloudnbd snapshot create` through the running server. After the last day
the server collects garbage (reopened with a short --gc-grace) and the store is listed:
stored bytes against the live volume alone and against one full copy per day, in
dollars per month at S3 Standard.

Two ways to change 1% a day: 1 MiB runs at random 1 MiB-aligned places (each touches one
4 MiB chunk), and scattered 4 KiB writes (about ten per 4 MiB chunk, so every chunk
changes every day).

    python bench/snapshot_cost.py [--snapshot-days 30] [--snapshot-change 1]
        [--snapshot-runs-mib 1024] [--snapshot-scattered-mib 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    KDF,
    ROOT,
    S3_ACCESS_KEY,
    S3_BUCKET,
    S3_SECRET_KEY,
    STORAGE_PER_GB_MONTH,
    TIER1,
    TIER1_PER_REQUEST,
    TIER2,
    TIER2_PER_REQUEST,
    FaultProxy,
    Served,
    cloudnbd,
    command_line,
    garbage_rounds,
    machine,
    make_password_file,
    replace_section,
    run,
    s3_client,
    start,
    start_seaweedfs,
)
from workloads import random_file

MiB = 2**20
GB = 10**9
SECTION = "bench/run: snapshots"  # its place in docs/performance.md
WAIT = 900.0  # seconds any one wait for the server may take before the run fails


@dataclass(frozen=True)
class Pattern:
    """One way of changing the volume each day."""

    key: str
    label: str
    block: int  # bytes per write, at random block-aligned offsets, no block twice a day


PATTERNS = (Pattern("runs", "1 MiB runs at random places", MiB),
            Pattern("scattered", "scattered 4 KiB writes", 4096))


@dataclass
class Outcome:
    pattern: Pattern
    size: int
    days: int
    changed: int  # bytes written per day
    stored: dict[str, int]  # bytes in the store by kind (chunks, map, journal, ...)
    live: int  # what the head alone names (stored minus what only snapshots keep)
    first: int  # the store after the initial fill, before any snapshot
    listed_alone: list[int]  # `snapshot list`: bytes each snapshot alone keeps
    listed_needed: int  # `snapshot list`: bytes the newest snapshot needs in all
    requests: Counter[str] = field(default_factory=Counter)  # over all the days
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.stored.values())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--snapshot-days", type=int, default=30,
                        help="daily snapshots kept (default 30)")
    parser.add_argument("--snapshot-change", type=float, default=1.0,
                        help="percent of the volume rewritten each day (default 1)")
    parser.add_argument("--snapshot-runs-mib", type=int, default=1024,
                        help="volume size for the 1 MiB runs (0: skip them)")
    parser.add_argument("--snapshot-scattered-mib", type=int, default=128,
                        help="volume size for the scattered 4 KiB writes, which upload "
                             "every chunk every day (0: skip them)")


def measure(args: argparse.Namespace, tmp: Path, endpoint: str) -> str:
    """Run every pattern asked for; the section's text."""
    sizes = {"runs": args.snapshot_runs_mib, "scattered": args.snapshot_scattered_mib}
    outcomes = [volume_history(tmp, endpoint, pattern, sizes[pattern.key] * MiB,
                               args.snapshot_days, args.snapshot_change)
                for pattern in PATTERNS if sizes[pattern.key]]
    return report(outcomes)


# -- one volume's month ------------------------------------------------------------------

def volume_history(tmp: Path, endpoint: str, pattern: Pattern, size: int, days: int,
                   percent: float) -> Outcome:
    """Fill a fresh volume, then `days` times: change percent of it, let the server fold
    it into chunks, snapshot. Then collect garbage and measure."""
    started = time.monotonic()
    work = tmp / f"snap-{pattern.key}"
    work.mkdir()
    location = f"{S3_BUCKET}/snapcost-{pattern.key}"
    prefix = location.split("/", 1)[1] + "/"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    password = make_password_file(work)
    changed = max(pattern.block, int(size * percent / 100) // pattern.block * pattern.block)
    with FaultProxy(endpoint, []) as proxy:
        store_args = ["--endpoint-url", proxy.url]
        cloudnbd("init", "s3", location, str(size), *store_args, "--password-file",
                 str(password), *KDF, env=env)
        # a short --checkpoint-age folds each day's writes before its snapshot, as the
        # default hour does for a nightly snapshot; --gc-grace stays at its default
        served = start(work, "s3", location, password, "--checkpoint-age", "1",
                       store_args=store_args, env=env, cache=work / "cache")
        try:
            random_file(work / "fill.img", size)
            run("nbdcopy", "--flush", str(work / "fill.img"), served.uri)
            (work / "fill.img").unlink()
            until(served, folded, "the fill folded into chunks")
            first = stored_bytes(endpoint, prefix)
            proxy.requests.clear()
            for day in range(days):
                change(served.uri, pattern, size, changed, seed=day + 1)
                until(served, folded, f"day {day + 1} folded into chunks")
                cloudnbd("snapshot", "create", "s3", location, f"day{day + 1:02d}",
                         *store_args, "--password-file", str(password), "--cache",
                         str(served.cache), env=env)
                print(f"  {pattern.key}: day {day + 1} of {days}", file=sys.stderr)
            requests = Counter(proxy.requests)
        finally:
            served.close()
        # reopened with a short grace, the server deletes what nothing names any more
        served = start(work, "s3", location, password, "--gc-grace", "1",
                       store_args=store_args, env=env, cache=work / "cache")
        try:
            before = served.garbage_rounds()
            until(served, lambda s: garbage_rounds(s) >= before + 3,
                  "three rounds of garbage collection")
            status = served.status()
        finally:
            served.close()
        stored = stored_bytes(endpoint, prefix)
        listing = json.loads(cloudnbd("snapshot", "list", "s3", location, *store_args,
                                      "--json", "--password-file", str(password),
                                      env=env).stdout)
    total = sum(stored.values())
    return Outcome(pattern, size, days, changed, stored,
                   total - int(status["snapshot_only_bytes"]),  # type: ignore[call-overload]
                   sum(first.values()), [row["alone_bytes"] for row in listing],
                   listing[-1]["needed_bytes"] if listing else 0, requests,
                   time.monotonic() - started)


def change(uri: str, pattern: Pattern, size: int, changed: int, seed: int) -> None:
    """Write `changed` bytes of fresh random data in pattern.block writes at random
    block-aligned offsets (fio's random map: no block twice), then FLUSH."""
    run("fio", "--name=day", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
        f"--bs={pattern.block}", f"--size={size}", f"--io_size={changed}",
        "--iodepth=16", "--refill_buffers", f"--randseed={seed}", "--end_fsync=1",
        "--output-format=terse")


def folded(status: dict[str, object]) -> bool:
    """Everything written is uploaded and the store's journal folded into chunks."""
    return not status["dirty_bytes"] and not status["store_journal_objects"]


def until(served: Served, done: Callable[[dict[str, object]], bool], what: str) -> None:
    """Poll the server's status until done(status), for at most WAIT seconds; fail if
    the server dies or it takes longer."""
    deadline = time.monotonic() + WAIT
    while True:
        if done(served.status()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {WAIT:.0f} s for {what}")
        try:
            served.process.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"the server exited while waiting for {what}")


def stored_bytes(endpoint: str, prefix: str) -> dict[str, int]:
    """Bytes of the volume's objects in the store, by kind (first path component)."""
    client = s3_client(endpoint)
    sizes: Counter[str] = Counter()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET,
                                                                 Prefix=prefix):
        for item in page.get("Contents", []):
            rest = item["Key"][len(prefix):]
            sizes[rest.split("/", 1)[0] if "/" in rest else "other"] += item["Size"]
    return dict(sizes)


# -- the table ---------------------------------------------------------------------------

def gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


def dollars(count: int) -> str:
    return f"${count / GB * STORAGE_PER_GB_MONTH:.3f}"


def others(counts: dict[str, int], named: tuple[str, ...]) -> int:
    return sum(n for kind, n in counts.items() if kind not in named)


def request_dollars(requests: Counter[str]) -> float:
    return sum(n * (TIER1_PER_REQUEST if kind in TIER1 else
                    TIER2_PER_REQUEST if kind in TIER2 else 0)
               for kind, n in requests.items())


def report(outcomes: list[Outcome]) -> str:
    rows: list[tuple[str, Callable[[Outcome], str]]] = [
        ("volume; changed per day", lambda o: f"{o.size // MiB} MiB; "
         f"{o.changed / MiB:.2f} MiB in {o.changed // o.pattern.block:,} writes"),
        ("store after the fill (no snapshots)", lambda o: gib(o.first)),
        ("live volume alone (store minus what only snapshots keep)",
         lambda o: f"{gib(o.live)} ({dollars(o.live)}/month)"),
        ("store with the snapshots: total", lambda o: f"**{gib(o.total)}** "
         f"(**{dollars(o.total)}/month**), {o.total / o.live:.2f}x the live volume"),
        ("... of which chunks / map pages / journal / other", lambda o: " / ".join(
            gib(o.stored.get(kind, 0)) for kind in ("chunks", "map", "journal"))
         + f" / {others(o.stored, ('chunks', 'map', 'journal')) / 2**10:.0f} KiB"),
        ("kept only by snapshots, per snapshot (mean)",
         lambda o: f"{gib((o.total - o.live) // o.days)}, "
                   f"{(o.total - o.live) / o.days / o.changed:.1f}x the bytes changed"),
        ("`snapshot list`: bytes each keeps alone (min / median / max)", lambda o: (
            " / ".join(f"{v / MiB:.1f} MiB" for v in (min(o.listed_alone),
                       sorted(o.listed_alone)[len(o.listed_alone) // 2],
                       max(o.listed_alone))) if o.listed_alone else "none")),
        ("`snapshot list`: bytes the newest needs in all", lambda o: gib(o.listed_needed)),
        ("live volume + one full copy per day instead",
         lambda o: f"{gib(o.live * (o.days + 1))} ({dollars(o.live * (o.days + 1))}/month)"),
        ("snapshots cost, as a share of the full copies' extra storage",
         lambda o: f"{(o.total - o.live) / (o.live * o.days):.1%}"),
        ("requests over the days (PUT / GET / LIST / DELETE / other); dollars",
         lambda o: " / ".join(f"{o.requests.get(k, 0):,}" for k in
                              ("PUT", "GET", "LIST", "DELETE"))
         + f" / {others(o.requests, ('PUT', 'GET', 'LIST', 'DELETE')):,}"
         + f"; ${request_dollars(o.requests):.4f}"),
        ("wall time of the run", lambda o: f"{o.seconds / 60:.1f} min"),
    ]
    head = "| | " + " | ".join(f"{o.pattern.label}, {o.days} days" for o in outcomes) + " |"
    lines = [head, "|---|" + "---|" * len(outcomes)]
    lines += [f"| {label} | " + " | ".join(cell(o) for o in outcomes) + " |"
              for label, cell in rows]
    return ("Each day: rewrite the share of the volume below with fresh random data "
            "(fio, nbd engine, FLUSH), wait until the server folded it into chunks "
            "(`--checkpoint-age 1`, as the default hour does before a nightly snapshot), "
            "then `cloudnbd snapshot create` through the running server. After the last "
            "day the volume is reopened with `--gc-grace 1` until three rounds of garbage "
            "collection have passed, and the store is listed (sum of object sizes). Dollars: S3 "
            f"Standard ${STORAGE_PER_GB_MONTH}/GB-month; requests at $0.005 per 1,000 "
            "PUT/LIST, $0.0004 per 1,000 GET (the relay counts them; the garbage "
            "listings during the days ran at the default --gc-grace of 900 s).\n\n"
            + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--no-docs", action="store_true",
                        help="print only; leave docs/performance.md alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cloudnbd-snapcost-",
                                     dir=os.environ.get("BENCH_DIR")) as name:
        tmp = Path(name)
        (tmp / "weed").mkdir()
        weed = start_seaweedfs(tmp / "weed")
        try:
            text = measure(args, tmp, weed.endpoint)
        finally:
            weed.stop()
    text = (f"Machine: {machine()}.\n\nCommand: "
            f"`{command_line('bench/snapshot_cost.py', sys.argv[1:])}`\n\n{text}")
    print(text)
    if not args.no_docs:
        replace_section(ROOT / "docs" / "performance.md", SECTION, text)


if __name__ == "__main__":
    main()
