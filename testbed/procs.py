"""Process trees and their memory, read from /proc (used by tests and bench/memory.py)."""

from __future__ import annotations

from pathlib import Path


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def tree(pid: int) -> list[int]:
    """pid and all its descendants, parents before children."""
    found = [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            tokens = child.read_text().split()
        except OSError:
            continue
        for token in tokens:
            found += tree(int(token))
    return found


def role(pid: int, front: int) -> str:
    """front, zygote, tracker (multiprocessing's resource tracker) or worker."""
    if pid == front:
        return "front"
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    if "resource_tracker" in command:
        return "tracker"
    if "forkserver" in command and parent_of(pid) == front:
        return "zygote"
    return "worker"


def pss_by_process(pids: list[int]) -> dict[str, float]:
    """Proportional set size in MiB of each process (shared pages split between their
    sharers, so a sum counts each page once), keyed by "pid role"; pids[0] is the front."""
    found = {}
    for pid in pids:
        try:
            name = role(pid, pids[0])
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    found[f"{pid} {name}"] = int(line.split()[1]) / 1024
        except OSError:  # exited meanwhile
            continue
    return found
