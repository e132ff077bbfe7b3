"""Shared pieces of the benchmarks: run commands, time them, describe the machine, and
serve cloudnbd the way the tests do (tests/served.py)."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.served import KDF, Served, cloudnbd, make_password_file, start  # noqa: E402

__all__ = ["KDF", "Served", "cloudnbd", "machine", "make_password_file", "median", "run",
           "start", "timed"]


def run(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, env=env)
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
