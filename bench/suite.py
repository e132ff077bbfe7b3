"""cloudnbd against the alternatives, in one run on one machine against one SeaweedFS:
speed of every workload, request counts and storage turned into dollars, issue 13's
targets for format 3 (bench/targets.py), upload throughput on slow links, and the cost of
keeping daily snapshots (bench/snapshot_cost.py). Prints the tables and writes them into
docs/performance.md.
Run it through bench/run (which installs what is missing first).

    bench/run [--size-mib 1024] [--runs 3] [--seconds 10] [--contenders ...]
              [--no-slow-links] [--no-compare] [--no-targets] [--no-snapshots] [--no-docs]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import slowlink
import snapshot_cost
import targets
from common import (
    PRICES,
    ROOT,
    STORAGE_PER_GB_MONTH,
    TIER1,
    TIER1_PER_REQUEST,
    TIER2,
    TIER2_PER_REQUEST,
    FaultProxy,
    command_line,
    fio,
    machine,
    median,
    replace_section,
    start_seaweedfs,
    weed_binary,
)
from contenders import CONTENDERS, Contender, session
from workloads import (
    compressible_file,
    random_file,
    read_all,
    read_back,
    source_tree,
    unpack_to_durable,
    write_to_durable,
)

GiB = 2**30
FS_SIZE = GiB  # the filesystem workload's volume, whatever --size-mib says

@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    lower_is_better: bool
    digits: int = 1


def speed_metrics(size_label: str, files: int, tree_mib: float) -> list[Metric]:
    tree = f"{files:,} files, {tree_mib:.0f} MiB"
    return [
        Metric("write", f"sequential write {size_label} + FLUSH: s to durable", True),
        Metric("cold read", f"cold sequential read {size_label} (empty cache): s", True),
        Metric("warm read", f"warm sequential read {size_label}: s", True),
        Metric("randread iops", "4 KiB random read, QD16 (warm): IOPS", False, 0),
        Metric("randread p99", "4 KiB random read, QD16: p99 ms", True, 2),
        Metric("randwrite iops", "4 KiB random write, QD16: IOPS", False, 0),
        Metric("randwrite p99", "4 KiB random write, QD16: p99 ms", True, 2),
        Metric("write compressible",
               f"compressible write {size_label} + FLUSH: s to durable", True),
        Metric("cold read compressible",
               f"compressible cold read {size_label}: s", True),
        Metric("fs unpack", f"btrfs: unpack a tree ({tree}) + sync: s to durable", True),
        Metric("fs read", "btrfs: read the tree back, page cache dropped: s", True),
        Metric("fs cold read", "btrfs: read the tree back, device cache dropped too: s",
               True),
    ]


@dataclass
class Bench:
    """What every measurement needs: where, against what, with which data."""

    tmp: Path
    endpoint: str
    proxy: FaultProxy
    size: int
    seconds: float
    random: Path
    compressible: Path
    tarball: Path
    results: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    requests: dict[str, dict[str, list[Counter[str]]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, who: str, key: str, value: float) -> None:
        self.results.setdefault(who, {}).setdefault(key, []).append(value)

    def count(self, who: str, phase: str) -> None:
        """Record the relay's requests since the last count as `phase`, and restart."""
        self.requests.setdefault(who, {}).setdefault(phase, []).append(
            Counter(self.proxy.requests))
        self.reset()

    def reset(self) -> None:
        self.proxy.requests.clear()


def volume(bench: Bench, cls: type[Contender], name: str, size: int | None = None
           ) -> Contender:
    return cls(bench.tmp, bench.endpoint, bench.proxy.url, name, size or bench.size)


def measure_random(bench: Bench, cls: type[Contender], tag: str) -> None:
    who = cls.name
    device = volume(bench, cls, f"{tag}-random")
    try:
        device.create()

        def written(uri: str) -> None:
            bench.reset()
            bench.add(who, "write", write_to_durable(device, uri, bench.random))
            bench.count(who, "written random")
            bench.add(who, "stored random", device.stored() * GiB / bench.size)
            bench.add(who, "warm read", read_all(uri))
            for rw in ("randread", "randwrite"):
                iops, p99 = fio(uri, rw, bench.seconds, bench.size)
                bench.add(who, f"{rw} iops", iops)
                bench.add(who, f"{rw} p99", p99)

        session(device, written)
        device.drop_cache()
        bench.reset()

        def cold(uri: str) -> None:
            bench.count(who, "open")
            bench.add(who, "cold read", read_all(uri))
            bench.count(who, "read random")

        session(device, cold)
        bench.count(who, "close")
    finally:
        device.remove()


def measure_compressible(bench: Bench, cls: type[Contender], tag: str) -> None:
    who = cls.name
    device = volume(bench, cls, f"{tag}-text")
    try:
        device.create()

        def written(uri: str) -> None:
            bench.reset()
            bench.add(who, "write compressible",
                      write_to_durable(device, uri, bench.compressible))
            bench.count(who, "written compressible")
            bench.add(who, "stored compressible", device.stored() * GiB / bench.size)

        session(device, written)
        device.drop_cache()

        def cold(uri: str) -> None:
            bench.reset()
            bench.add(who, "cold read compressible", read_all(uri))
            bench.count(who, "read compressible")

        session(device, cold)
    finally:
        device.remove()


def measure_filesystem(bench: Bench, cls: type[Contender], tag: str) -> None:
    who = cls.name
    device = volume(bench, cls, f"{tag}-fs", FS_SIZE)
    stack = device.work / "fs"
    stack.mkdir()
    try:
        device.create()

        def unpack(uri: str) -> None:
            bench.add(who, "fs unpack", unpack_to_durable(device, uri, stack, bench.tarball))
            bench.add(who, "fs read", read_back(uri, stack))

        session(device, unpack)
        device.drop_cache()
        session(device, lambda uri: bench.add(who, "fs cold read", read_back(uri, stack)))
    finally:
        device.remove()


#: the workloads of the comparison, by the name --workloads takes
WORKLOADS = {"random": measure_random, "compressible": measure_compressible,
             "filesystem": measure_filesystem}


def compare(bench: Bench, names: list[str], runs: int, save: Path | None,
            workloads: list[str]) -> None:
    """The workloads of every contender, `runs` times. A workload that fails is
    reported (bench.failures) and its run left out of the medians."""
    for index in range(runs):
        order = names[index % len(names):] + names[:index % len(names)]  # spread drift
        for name in order:
            cls = CONTENDERS[name]
            tag = f"{name.replace(' ', '-').lower()}-{index}"
            print(f"run {index + 1}/{runs}: {name}", file=sys.stderr, flush=True)
            for workload in workloads:
                try:
                    WORKLOADS[workload](bench, cls, tag)
                except Exception as exc:
                    traceback.print_exc()
                    reason = str(exc).strip().splitlines()[-1][:200]
                    bench.failures.append(f"run {index + 1}, {name}, {workload}: {reason}")
            print("  " + ", ".join(f"{key} {values[-1]:,.2f}" for key, values
                                   in bench.results.get(name, {}).items()),
                  file=sys.stderr, flush=True)
            if save is not None:
                save.write_text(json.dumps({"results": bench.results,
                                            "requests": bench.requests,
                                            "failures": bench.failures}, indent=1))


# -- tables --------------------------------------------------------------------------------

def fmt(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def middle(values: list[float]) -> float:
    """The median, or NaN when every run failed."""
    return median(values) if values else math.nan


def speed_table(bench: Bench, names: list[str], metrics: list[Metric]) -> str:
    header = ["workload", *[f"{n} (limit)" if not CONTENDERS[n].cloud else n for n in names]]
    others = [n for n in names if CONTENDERS[n].cloud and n != "cloudnbd"]
    if "cloudnbd" in names and others:
        header.append("cloudnbd vs best other cloud contender")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in metrics:
        values = {n: median(bench.results[n][metric.key]) for n in names
                  if bench.results.get(n, {}).get(metric.key)}
        row = [metric.label, *[fmt(values[n], metric.digits) if n in values else "-"
                               for n in names]]
        if len(header) > len(names) + 1:
            row.append(verdict(metric, values, others))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdict(metric: Metric, values: dict[str, float], others: list[str]) -> str:
    """How many times better cloudnbd is than the best other cloud contender."""
    rivals = [values[n] for n in others if n in values and not math.isnan(values[n])]
    if math.isnan(values.get("cloudnbd", math.nan)) or not rivals:
        return "-"
    ours = values["cloudnbd"]
    best = min(rivals) if metric.lower_is_better else max(rivals)
    if ours == best:
        return "equal"
    if 0 in (ours, best):  # no requests of a kind at all
        ahead = (ours < best) == metric.lower_is_better
        return "ahead (none)" if ahead else "**behind**"
    ratio = best / ours if metric.lower_is_better else ours / best
    if abs(ratio - 1) < 0.005:
        return f"equal within 0.5% ({ratio - 1:+.2%})"
    return f"{ratio:.2f}x ahead" if ratio >= 1 else f"**{ratio:.2f}x: behind**"


def per_gib(bench: Bench, who: str, phase: str, kinds: tuple[str, ...]) -> float:
    counts = bench.requests.get(who, {}).get(phase, [])
    return middle([sum(c[k] for k in kinds) * GiB / bench.size for c in counts])


def dollars(bench: Bench, who: str, kind: str) -> float:
    """First month of 1 TiB written once and read once: storage plus requests."""
    tib = 1024  # GiB
    stored_gb = middle(bench.results.get(who, {}).get(f"stored {kind}", [])) * tib / 1e9
    requests = 0.0
    for phase in (f"written {kind}", f"read {kind}"):
        requests += per_gib(bench, who, phase, TIER1) * tib * TIER1_PER_REQUEST
        requests += per_gib(bench, who, phase, TIER2) * tib * TIER2_PER_REQUEST
    return stored_gb * STORAGE_PER_GB_MONTH + requests


def session_requests(bench: Bench, who: str) -> str:
    total: Counter[str] = Counter()
    for phase in ("open", "close"):
        counts = bench.requests.get(who, {}).get(phase, [])
        if counts:
            total += counts[-1]
    return ", ".join(f"{n} {k}" for k, n in sorted(total.items())) or "none"


def cost_table(bench: Bench, names: list[str]) -> str:
    cloud = [n for n in names if CONTENDERS[n].cloud]
    others = [n for n in cloud if n != "cloudnbd"]
    compared = "cloudnbd" in cloud and others
    header = ["per GiB of data", *cloud] + (["cloudnbd vs best other"] if compared else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(label: str, value: Callable[[str], float], text: Callable[[float], str],
            skip_zero: bool = False) -> None:
        values = {n: value(n) for n in cloud}
        if skip_zero and not any(v for v in values.values() if not math.isnan(v)):
            return  # a kind of request nobody sent
        cells = [text(values[n]) for n in cloud]
        if compared:
            cells.append(verdict(Metric("", "", True), values, others))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for phase, what in (("written random", "written"), ("read random", "read (cold)")):
        for kinds in (("PUT", "POST"), ("GET", "HEAD"), ("DELETE",), ("LIST",)):
            row(f"{' + '.join(kinds)} per GiB {what}",
                lambda n, p=phase, k=kinds: per_gib(bench, n, p, k),
                lambda v: fmt(v, 0), skip_zero=True)
    for kind in ("random", "compressible"):
        row(f"stored per GiB of {kind} data",
            lambda n, k=kind: middle(bench.results.get(n, {}).get(f"stored {k}", [])),
            lambda v: fmt(v / 2**20, 1) + " MiB")
    for kind in ("random", "compressible"):
        row(f"$ for 1 TiB of {kind} data written once and read once (first month)",
            lambda n, k=kind: dollars(bench, n, k), lambda v: "$" + fmt(v, 2))
    lines.append("| requests to open and close a volume | "
                 + " | ".join(session_requests(bench, n) for n in cloud)
                 + (" | |" if compared else " |"))
    return "\n".join(lines)


def versions() -> str:
    def first_line(*command: str) -> str:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except OSError:
            return "?"
        return (out.stdout or out.stderr).strip().splitlines()[0]

    commit = first_line("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    return (f"cloudnbd {commit}, {first_line('nbdkit', '--version')}, "
            f"{first_line('s3backer', '--version')}, SeaweedFS "
            f"{first_line(weed_binary(), 'version').removeprefix('version ')}, "
            f"{first_line('nbdcopy', '--version')}, {first_line('fio', '--version')}")


# -- main ----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024,
                        help="data written and read by the sequential workloads")
    parser.add_argument("--runs", type=int, default=3, help="medians of this many runs")
    parser.add_argument("--seconds", type=float, default=10, help="each fio run")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS),
                        choices=list(CONTENDERS))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS),
                        choices=list(WORKLOADS), help="the contenders' workloads to run")
    parser.add_argument("--no-compare", action="store_true", help="skip the contenders")
    parser.add_argument("--no-slow-links", action="store_true", help="skip the slow links")
    parser.add_argument("--no-snapshots", action="store_true",
                        help="skip the cost of keeping daily snapshots")
    parser.add_argument("--no-docs", action="store_true",
                        help="print only; leave docs/performance.md alone")
    parser.add_argument("--save", type=Path,
                        help="keep the raw results here (JSON, rewritten after each run)")
    parser.add_argument("--tables-from", type=Path, metavar="SAVED",
                        help="measure nothing: publish the comparison from a --save file "
                             "(the runs a stopped bench/run completed; same --size-mib)")
    targets.add_arguments(parser)
    slowlink.add_arguments(parser)
    snapshot_cost.add_arguments(parser)
    args = parser.parse_args()
    # a TERM (timeout, CI) unwinds like ^C, so no server or mount stays behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    header = (f"Machine: {machine()}.\n\nVersions: {versions()}.\n\n"
              f"Command: `{command_line('bench/run', sys.argv[1:])}`\n")

    def publish(name: str, text: str) -> None:
        """Print a finished section and put it into docs/performance.md at once."""
        print(f"{header}\n{text}\n", flush=True)
        if not args.no_docs:
            replace_section(ROOT / "docs" / "performance.md", name, f"{header}\n{text}")
            print(f"({name} written to docs/performance.md)", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="cloudnbd-bench-",
                                     dir=os.environ.get("BENCH_DIR")) as name:
        tmp = Path(name)
        if args.tables_from is not None:
            publish("bench/run: contenders", saved_comparison(args, tmp))
            return
        (tmp / "weed").mkdir()
        weed = start_seaweedfs(tmp / "weed")
        proxy = FaultProxy(weed.endpoint, [])
        try:
            if not args.no_compare:
                publish("bench/run: contenders", contenders(args, tmp, weed.endpoint, proxy))
            if not args.no_targets:
                publish("bench/run: format 3 targets",
                        targets.measure(args, tmp, weed.endpoint))
            if not args.no_slow_links:
                publish("bench/run: slow links", slowlink.measure(args, tmp, weed.endpoint))
            if not args.no_snapshots:
                publish(snapshot_cost.SECTION, snapshot_cost.measure(args, tmp, weed.endpoint))
        finally:
            proxy.close()
            weed.stop()


def contenders(args: argparse.Namespace, tmp: Path, endpoint: str, proxy: FaultProxy
               ) -> str:
    """Measure the contenders side by side; the section's text."""
    size = args.size_mib * 2**20
    size_label = f"{args.size_mib // 1024} GiB" if args.size_mib % 1024 == 0 else (
        f"{args.size_mib} MiB")
    random_file(tmp / "random.img", size)
    compressible_file(tmp / "text.img", size)
    files, tree_bytes = source_tree(tmp / "tree.tar")
    bench = Bench(tmp, endpoint, proxy, size, args.seconds, tmp / "random.img",
                  tmp / "text.img", tmp / "tree.tar")
    compare(bench, args.contenders, args.runs, args.save, args.workloads)
    return comparison(bench, args.contenders, size_label, files, tree_bytes)


def comparison(bench: Bench, names: list[str], size_label: str, files: int,
               tree_bytes: int) -> str:
    """The section's text from the results of however many runs were completed."""
    runs = min(len(values) for who in names for values in bench.results.get(who, {}).values())
    metrics = speed_metrics(size_label, files, tree_bytes / 2**20)
    failed = "".join(f"\n- failed: {line}" for line in bench.failures)
    how_many = "One run." if runs == 1 else f"Medians of {runs} runs."
    return (f"{how_many}{failed}\n\n"
            + speed_table(bench, names, metrics) + "\n\n"
            "Requests counted at the store by the relay; dollars at " + PRICES + "\n\n"
            + cost_table(bench, names))


def saved_comparison(args: argparse.Namespace, tmp: Path) -> str:
    """The section from a --save file: the runs a stopped bench/run completed."""
    saved = json.loads(args.tables_from.read_text())
    bench = Bench(tmp, "", None, args.size_mib * 2**20, args.seconds,  # type: ignore[arg-type]
                  tmp, tmp, tmp, results=saved["results"], failures=saved["failures"],
                  requests={who: {phase: [Counter(c) for c in counts]
                                  for phase, counts in phases.items()}
                            for who, phases in saved["requests"].items()})
    files, tree_bytes = source_tree(tmp / "tree.tar")
    size_label = f"{args.size_mib // 1024} GiB" if args.size_mib % 1024 == 0 else (
        f"{args.size_mib} MiB")
    names = [n for n in args.contenders if n in bench.results]
    return comparison(bench, names, size_label, files, tree_bytes)


if __name__ == "__main__":
    main()
