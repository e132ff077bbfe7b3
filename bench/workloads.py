"""The client workloads of bench/run, the same for every contender: nbdcopy for sequential
copies, fio's nbd engine for 4 KiB random I/O, and a btrfs filesystem through nbdfuse
and a loop device (the test suite's stack, tests/test_filesystem.py; these machines have
no nbd kernel module).

Every workload runs in child processes, so the bench process, whose threads relay the
store's traffic, stays idle while it is measured.
"""

from __future__ import annotations

import os
import random
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common import mounted, run
from contenders import Contender

WORDS = ["block", "device", "journal", "chunk", "flush", "upload", "fetch", "cache",
         "volume", "backup", "restore", "encrypt", "compress", "bucket", "object", "durable"]


def random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // 2**20):
            f.write(os.urandom(2**20))


def compressible_file(path: Path, size: int) -> None:
    """Generated text: each line repeated 64 times (zstd -3 shrinks it about 160x)."""
    rng = random.Random(7)
    with open(path, "wb") as f:
        while f.tell() < size:
            line = " ".join(rng.choice(WORDS) for _ in range(12)) + f" {rng.random()}\n"
            f.write(line.encode() * 64)
        f.truncate(size)


def source_tree(path: Path) -> tuple[int, int]:
    """A tar of this Python's standard library (without site-packages and bytecode): a
    source tree of thousands of files. Returns (files, bytes of file data)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    run("tar", "-cf", str(path), "-C", stdlib, "--exclude=site-packages",
        "--exclude=__pycache__", ".")
    files = total = 0
    for line in run("tar", "-tvf", str(path)).splitlines():
        if line.startswith("-"):
            files += 1
            total += int(line.split()[2])
    return files, total


def write_to_durable(device: Contender, uri: str, data: Path,
                     timeout: float | None = None) -> float:
    """Seconds from the first byte written to the end of the FLUSH, and (for a contender
    whose FLUSH does not wait for the store) until the store holds it all."""
    started = time.monotonic()
    run("nbdcopy", "--flush", str(data), uri, timeout=timeout)
    device.settle(None if timeout is None else max(1.0, started + timeout - time.monotonic()))
    return time.monotonic() - started


def read_all(uri: str) -> float:
    started = time.monotonic()
    run("nbdcopy", uri, "null:")
    return time.monotonic() - started


@dataclass
class _Uri:
    uri: str  # what tests.test_filesystem.mounted needs of a server


@contextmanager
def filesystem(uri: str, work: Path, mkfs: bool = False) -> Iterator[Path]:
    """The device as a mounted btrfs (made first with mkfs): nbdfuse, loop, mount. All
    of it is torn down on exit, so no page cache above the NBD server survives."""
    with mounted(_Uri(uri), work,  # type: ignore[arg-type]
                 ["mkfs.btrfs", "-q", "-f"] if mkfs else None) as root:
        yield root


def unpack_to_durable(device: Contender, uri: str, work: Path, tarball: Path) -> float:
    """mkfs.btrfs (not timed), then seconds to unpack the tree and sync it to durable."""
    with filesystem(uri, work, mkfs=True) as root:
        started = time.monotonic()
        run("tar", "-xf", str(tarball), "-C", str(root))
        run("sync", "-f", str(root))
        device.settle()
        return time.monotonic() - started


def read_back(uri: str, work: Path) -> float:
    """Seconds to mount the filesystem afresh and read every file."""
    with filesystem(uri, work) as root:
        started = time.monotonic()
        subprocess.run(f"find {root} -type f -print0 | xargs -0 cat > /dev/null",
                       shell=True, check=True)
        return time.monotonic() - started
