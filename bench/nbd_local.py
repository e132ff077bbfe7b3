"""cloudnbd's NBD front on a warm local cache, side by side with nbdkit's file plugin on
the same disk, in one run: nbdcopy sequential write and read, fio 4 KiB random read and
write at queue depth 16 (issue 15's table). Prints Markdown tables, medians of --runs
runs: the four ratios to nbdkit with the p99 latencies, then every metric. cloudnbd uses
the file backend; the cloud is not what is measured here. Before each measurement (of
any contender) the bench waits until every cloudnbd has uploaded what it will (nothing
dirty, or no upload for 1.5 s), so nothing is measured against the uploads of an earlier
write, the contender's own or another's.

    python bench/nbd_local.py [--runs 3] [--size-mib 512] [--seconds 10] [--iodepth 16]
                              [--baseline DIR] [--save results.json]

--baseline DIR serves a second cloudnbd from another source tree (e.g. `git archive` of
an older commit) in the same runs, for before/after ratios measured side by side: the
machine may be shared, so compare ratios from one run, not numbers from different days.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
import time
from pathlib import Path

from common import (
    KDF,
    Served,
    cloudnbd,
    fio_command,
    fio_result,
    machine,
    make_password_file,
    median,
    run,
    start,
    timed,
)

#: (label, metric): the rows of issue 15's table, in its order
RATIOS = (
    ("nbdcopy sequential write", "nbdcopy write MiB/s"),
    ("nbdcopy sequential read", "nbdcopy read MiB/s"),
    ("fio 4 KiB random write", "randwrite IOPS"),
    ("fio 4 KiB random read", "randread IOPS"),
)


def nbdkit(image: Path, command: str) -> str:
    """Run command (with $uri) against nbdkit's file plugin serving image."""
    return run("nbdkit", "-U", "-", "file", f"file={image}", "--run", command)


def _settle(served: Served) -> None:
    """Wait until the server has uploaded what it will upload (its uploaders compete
    for the CPU with whatever is measured next): nothing dirty, or no upload for three
    polls in a row (1.5 s, past the write-back delay). A chunk written less than half
    stays in the journal until a checkpoint (docs/design.md), so "nothing dirty" may
    not come after random writes."""
    quiet, uploads = 0, -1
    while quiet < 3:
        status = served.status()
        if not status["dirty_chunks"]:
            return
        quiet = quiet + 1 if status["uploads"] == uploads else 0
        uploads = status["uploads"]
        time.sleep(0.5)


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, list[float]]]:
    size = args.size_mib * 2**20
    source = tmp / "source.img"
    with open(source, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(2**20))
    image = tmp / "nbdkit.img"
    run("truncate", "-s", str(size), str(image))
    password = make_password_file(tmp)
    (tmp / "bucket").mkdir()
    trees = {"cloudnbd": None}
    if args.baseline:
        trees["baseline"] = args.baseline.resolve()
    servers: dict[str, Served] = {}
    for who, tree in trees.items():
        # PYTHONSAFEPATH: `python -m` must not put the current directory (maybe this
        # tree) before the baseline's
        env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree),
                                         "PYTHONSAFEPATH": "1"}
        location = str(tmp / "bucket" / who)
        cloudnbd("init", "file", location, str(size), "--password-file", str(password),
                 *KDF, env=env)
        (tmp / who).mkdir()
        servers[who] = start(tmp / who, "file", location, password, "--cache-size",
                             f"{4 * size}", "--max-dirty", f"{4 * size}", env=env)
    results: dict[str, dict[str, list[float]]] = {who: {} for who in ("nbdkit", *servers)}

    def add(who: str, what: str, value: float) -> None:
        results[who].setdefault(what, []).append(value)

    def fio(uri: str, rw: str) -> list[str]:
        return fio_command(uri, rw, args.seconds, size, args.iodepth)

    back = tmp / "back.img"

    def settle() -> None:
        """Every cloudnbd, not only the one measured next: another's uploads of its
        random writes would compete for the CPU with any contender."""
        for served in servers.values():
            _settle(served)

    try:
        for _ in range(args.runs):
            for who in results:
                served = servers.get(who)
                settle()
                if served is None:
                    # nbdkit starts in milliseconds; its start-up is inside these times
                    t_write = timed("nbdkit", "-U", "-", "file", f"file={image}", "--run",
                                    f"nbdcopy {source} $uri")
                    t_read = timed("nbdkit", "-U", "-", "file", f"file={image}", "--run",
                                   f"nbdcopy $uri {back}")
                else:
                    t_write = timed("nbdcopy", str(source), served.uri)
                    settle()
                    t_read = timed("nbdcopy", served.uri, str(back))
                add(who, "nbdcopy write MiB/s", args.size_mib / t_write)
                add(who, "nbdcopy read MiB/s", args.size_mib / t_read)
                for rw in ("randread", "randwrite"):
                    settle()
                    if served is None:
                        # no argument has a space; $uri is for the shell nbdkit --run uses
                        out = nbdkit(image, " ".join(fio("$uri", rw)))
                    else:
                        out = run(*fio(served.uri, rw))
                    iops, p99 = fio_result(out, rw)
                    add(who, f"{rw} IOPS", iops)
                    add(who, f"{rw} p99 ms", p99)
    finally:
        for served in servers.values():
            served.close(check=False)
    return results


def tables(results: dict[str, dict[str, list[float]]], iodepth: int) -> str:
    """The ratio table of issue 15 (each cloudnbd against nbdkit), then every metric."""
    med = {who: {k: median(v) for k, v in r.items()} for who, r in results.items()}
    ours = [who for who in med if who != "nbdkit"]
    lines = ["| workload | " + " | ".join(f"{who} / nbdkit-file" for who in ours)
             + " | p99 ms: " + " / ".join([*ours, "nbdkit"]) + " |",
             "|---" * (len(ours) + 2) + "|"]
    for label, metric in RATIOS:
        label = label + (f", QD{iodepth}" if "fio" in label else "")
        ratios = [f"{med[who][metric] / med['nbdkit'][metric]:.2f}" for who in ours]
        p99 = ""
        if metric.endswith("IOPS"):
            key = metric.replace("IOPS", "p99 ms")
            p99 = " / ".join(f"{med[who][key]:.2f}" for who in [*ours, "nbdkit"])
        lines.append(f"| {label} | {' | '.join(ratios)} | {p99} |")
    lines += ["", "| metric | nbdkit file | " + " | ".join(ours) + " |",
              "|---" * (len(ours) + 2) + "|"]
    for metric in med["nbdkit"]:
        values = " | ".join(f"{med[who][metric]:,.1f}" for who in ours)
        lines.append(f"| {metric} | {med['nbdkit'][metric]:,.1f} | {values} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--iodepth", type=int, default=16)
    parser.add_argument("--baseline", type=Path,
                        help="a cloudnbd source tree to serve side by side with this one")
    parser.add_argument("--save", type=Path, help="also write the raw results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        results = measure(args, Path(tmp))
    if args.save:
        args.save.write_text(json.dumps(results, indent=1))
    print(f"Machine: {machine()}")
    print(f"Command: python bench/nbd_local.py {shlex.join(os.sys.argv[1:])}")
    print(f"Medians of {args.runs} runs.\n")
    print(tables(results, args.iodepth))


if __name__ == "__main__":
    main()
