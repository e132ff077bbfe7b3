"""Shared pieces of the benchmarks: run commands, time them, describe the machine, and
serve cloudnbd the way the tests do (testbed/served.py)."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# What the benchmarks share with the tests (object stores, relay, slow link, process
# tree, filesystem stack) lives in testbed/, which neither owns (issue 17).
from testbed.fs import mounted  # noqa: E402
from testbed.link import Link  # noqa: E402
from testbed.procs import pss_by_process, tree  # noqa: E402
from testbed.served import (  # noqa: E402
    KDF,
    Served,
    cloudnbd,
    garbage_rounds,
    make_password_file,
    start,
)
from testbed.stores import (  # noqa: E402
    S3_ACCESS_KEY,
    S3_BUCKET,
    S3_SECRET_KEY,
    FaultProxy,
    s3_client,
    start_seaweedfs,
    weed_binary,
)

__all__ = ["KDF", "PRICES", "S3_ACCESS_KEY", "S3_BUCKET", "S3_SECRET_KEY",
           "STORAGE_PER_GB_MONTH", "TIER1", "TIER1_PER_REQUEST", "TIER2",
           "TIER2_PER_REQUEST", "FaultProxy", "Link", "Served", "cloudnbd", "fio",
           "fio_command", "fio_result", "garbage_rounds", "machine", "make_password_file", "median",
           "mounted", "pss_by_process", "replace_section", "run", "s3_client", "start",
           "start_seaweedfs", "timed", "tree", "weed_binary"]

# S3 Standard list prices, us-east-1 (aws.amazon.com/s3/pricing).
STORAGE_PER_GB_MONTH = 0.023
TIER1_PER_REQUEST = 0.005 / 1000  # PUT, COPY, POST, LIST
TIER2_PER_REQUEST = 0.0004 / 1000  # GET, HEAD and all other requests but DELETE
TIER1, TIER2 = ("PUT", "COPY", "POST", "LIST"), ("GET", "HEAD")
PRICES = ("S3 Standard list prices in us-east-1 as of 2025 (aws.amazon.com/s3/pricing, "
          "as quoted by 2024-2025 pricing guides): storage $0.023 per GB-month (first 50 "
          "TB), PUT, COPY, POST and LIST $0.005 per 1,000 requests, GET and HEAD $0.0004 "
          "per 1,000, DELETE free. Data transfer out of AWS is not counted (it is free to "
          "EC2 in the same region).")


def run(*args: str, env: dict[str, str] | None = None, timeout: float | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def timed(*args: str, env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    run(*args, env=env)
    return time.monotonic() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), {memory:.0f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def fio_command(uri: str, rw: str, seconds: float, size: int, iodepth: int = 16
                ) -> list[str]:
    """fio's nbd engine doing 4 KiB random I/O (rw: randread or randwrite) at queue depth
    iodepth over the first `size` bytes, for `seconds`."""
    return ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
            f"--iodepth={iodepth}", f"--size={size}", f"--runtime={seconds}", "--time_based",
            "--output-format=json"]


def fio_result(out: str, rw: str) -> tuple[float, float]:
    """(IOPS, p99 completion latency in ms) from fio's JSON output."""
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read" if "read" in rw else "write"]
    return side["iops"], side["clat_ns"]["percentile"]["99.000000"] / 1e6


def fio(uri: str, rw: str, seconds: float, size: int) -> tuple[float, float]:
    """(IOPS, p99 latency in ms) of 4 KiB random I/O at queue depth 16."""
    return fio_result(run(*fio_command(uri, rw, seconds, size)), rw)


def replace_section(path: Path, name: str, text: str) -> None:
    """Put text between the markers of section `name` in the Markdown file at path,
    adding the section at the end the first time. Other sections stay as they are."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end (generated) -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = path.read_text()
    found = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    new = found.sub(lambda _: block, old) if found.search(old) else (
        old.rstrip() + "\n\n" + block + "\n")
    path.write_text(new if new.endswith("\n") else new + "\n")


def command_line(script: str, argv: list[str]) -> str:
    return shlex.join([script, *argv])
