"""cloudnbd's NBD front on a warm local cache, side by side with nbdkit's file plugin on
the same disk, in one run: nbdcopy 1 GiB write and read, fio 4 KiB random read and
write at queue depth 16. Prints a Markdown table (medians of --runs runs, ratios to
nbdkit). cloudnbd uses the file backend; the cloud is not what is measured here.

    python bench/nbd_local.py [--runs 3] [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import shlex
import tempfile
from pathlib import Path

from common import (
    KDF,
    cloudnbd,
    fio,
    fio_command,
    fio_result,
    machine,
    make_password_file,
    median,
    run,
    start,
    timed,
)


def nbdkit(image: Path, command: str) -> str:
    """Run command (with $uri) against nbdkit's file plugin serving image."""
    return run("nbdkit", "-U", "-", "file", f"file={image}", "--run", command)


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, list[float]]]:
    size = args.size_mib * 2**20
    source = tmp / "source.img"
    with open(source, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(2**20))
    image = tmp / "nbdkit.img"
    run("truncate", "-s", str(size), str(image))
    password = make_password_file(tmp)
    location = str(tmp / "bucket" / "vol")
    (tmp / "bucket").mkdir()
    cloudnbd("init", "file", location, str(size), "--password-file", str(password), *KDF)
    served = start(tmp, "file", location, password, "--cache-size", f"{4 * size}",
                   "--max-dirty", f"{4 * size}")
    results: dict[str, dict[str, list[float]]] = {"nbdkit": {}, "cloudnbd": {}}

    def add(who: str, what: str, value: float) -> None:
        results[who].setdefault(what, []).append(value)

    back = tmp / "back.img"
    try:
        for _ in range(args.runs):
            for who in ("nbdkit", "cloudnbd"):
                if who == "nbdkit":
                    # nbdkit starts in milliseconds; its start-up is inside these times
                    t_write = timed("nbdkit", "-U", "-", "file", f"file={image}", "--run",
                                    f"nbdcopy {source} $uri")
                    t_read = timed("nbdkit", "-U", "-", "file", f"file={image}", "--run",
                                   f"nbdcopy $uri {back}")
                    for rw in ("randread", "randwrite"):
                        # no argument has a space; $uri is for the shell nbdkit --run uses
                        command = " ".join(fio_command("$uri", rw, args.seconds, size))
                        iops, p99 = fio_result(nbdkit(image, command), rw)
                        add(who, f"{rw} IOPS", iops)
                        add(who, f"{rw} p99 ms", p99)
                else:
                    t_write = timed("nbdcopy", str(source), served.uri)
                    t_read = timed("nbdcopy", served.uri, str(back))
                    for rw in ("randread", "randwrite"):
                        iops, p99 = fio(served.uri, rw, args.seconds, size)
                        add(who, f"{rw} IOPS", iops)
                        add(who, f"{rw} p99 ms", p99)
                add(who, "nbdcopy write MiB/s", args.size_mib / t_write)
                add(who, "nbdcopy read MiB/s", args.size_mib / t_read)
    finally:
        served.close(check=False)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        results = measure(args, Path(tmp))
    print(f"Machine: {machine()}")
    print(f"Command: python bench/nbd_local.py {shlex.join(os.sys.argv[1:])}")
    print(f"Medians of {args.runs} runs.\n")
    print("| metric | nbdkit file | cloudnbd | cloudnbd / nbdkit |")
    print("|---|---|---|---|")
    for metric in results["nbdkit"]:
        ref, ours = median(results["nbdkit"][metric]), median(results["cloudnbd"][metric])
        print(f"| {metric} | {ref:,.1f} | {ours:,.1f} | {ours / ref:.2f} |")


if __name__ == "__main__":
    main()
