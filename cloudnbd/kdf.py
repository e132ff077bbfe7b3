"""Key-derivation parameters for new key slots: Argon2id, calibrated on this machine.

A password is the weakest part of the volume's encryption: whoever gets volume.json
(anyone with read access to the bucket) can try passwords offline, and the KDF's cost
per guess is all that slows them down. So, as LUKS2 does, a new slot gets Argon2id with
as much memory as is reasonable (up to MAX_MEMORY_KIB, but at most half of the memory
available here, so that `init` and `open` work on small machines) and as many passes as
make one derivation take about TARGET_SECONDS on this machine. Opening costs the same
time and memory, once per open.

Promises:
- calibrate() never returns parameters below the floor (FLOOR_MEMORY_KIB, FLOOR_WORK_KIB:
  OWASP's minimum for Argon2id, 19 MiB and 2 passes); explicit() may, for tests and tiny
  devices, and weakness() says so.
- Memory and passes stay within what volume.py accepts from volume.json.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from cloudnbd.codec import Argon2idParams

TARGET_SECONDS = 1.0
MAX_MEMORY_KIB = 2**20  # 1 GiB, as LUKS2
LANES = 4  # RFC 9106's recommendation, and LUKS2's
MAX_ITERATIONS = 64
FLOOR_MEMORY_KIB = 19 * 1024
FLOOR_WORK_KIB = 2 * FLOOR_MEMORY_KIB  # memory x passes: 19 MiB x 2, or 38 MiB x 1
_START_KIB = 32 * 1024
#: passes for explicit (--kdf-cost) parameters: RFC 9106's second recommendation
EXPLICIT_ITERATIONS = 3


def available_memory() -> int:
    """Bytes this process could allocate now: MemAvailable, or less under a cgroup limit."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        group = Path("/proc/self/cgroup").read_text().split("::", 1)[1].strip()
        limit = Path(f"/sys/fs/cgroup{group}/memory.max").read_text().strip()
        used = int(Path(f"/sys/fs/cgroup{group}/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError, IndexError):
        pass
    return max(available, 0)


def seconds_to_derive(params: Argon2idParams) -> float:
    """CPU seconds one derivation with params takes here: the work an attacker pays per
    guess on this machine, unlike wall-clock time not inflated by other processes'
    load (the derivation runs on this thread alone)."""
    started = time.process_time()
    params.derive("calibration", bytes(16))
    return time.process_time() - started


def calibrate(target: float = TARGET_SECONDS, memory_cap_kib: int | None = None,
              measure: Callable[[Argon2idParams], float] = seconds_to_derive
              ) -> Argon2idParams:
    """Argon2id parameters that take about target seconds here, memory first.

    Memory doubles (one pass) until a derivation takes half the target or the cap is
    reached; then memory (below the cap) or passes (at it) are scaled to the target.
    Costs up to about twice the target. The cap defaults to MAX_MEMORY_KIB or half the
    memory available, whichever is less.
    """
    if memory_cap_kib is None:
        memory_cap_kib = min(MAX_MEMORY_KIB, available_memory() // 2 // 1024)
    cap = max(FLOOR_MEMORY_KIB, memory_cap_kib)
    memory = min(cap, _START_KIB)
    elapsed = measure(Argon2idParams(memory, 1, LANES))
    while elapsed < target / 2 and memory < cap:
        memory = min(cap, memory * 2)
        elapsed = measure(Argon2idParams(memory, 1, LANES))
    scale = target / max(elapsed, 1e-6)
    if memory < cap or scale < 1:
        memory, iterations = min(cap, int(memory * scale)), 1
    else:
        iterations = round(scale)
    memory = max(FLOOR_MEMORY_KIB, memory // 1024 * 1024)  # whole MiB
    iterations = max(iterations, -(-FLOOR_WORK_KIB // memory))
    return Argon2idParams(memory, min(iterations, MAX_ITERATIONS), LANES)


def explicit(cost: int) -> Argon2idParams:
    """`--kdf-cost N`: 2^N KiB of memory (as scrypt's cost N used), no calibration."""
    return Argon2idParams(2**cost, EXPLICIT_ITERATIONS, LANES)


def weakness(params: Argon2idParams) -> str | None:
    """Why params are below the floor, or None."""
    if params.memory_kib < FLOOR_MEMORY_KIB or \
            params.memory_kib * params.iterations < FLOOR_WORK_KIB:
        return (f"{params} is below the floor of 19 MiB and 2 passes (OWASP's minimum): "
                f"a stolen volume.json makes guessing the password cheap")
    return None
