"""Who this machine and this process are, in terms that survive a look from outside.

A machine is its /etc/machine-id, not its host name: clones and containers often share a
name, and a lease or a registry entry must not mistake one for another. A process is
its pid plus its start time, which together name one process for a whole boot (a pid
alone is reused).
"""

from __future__ import annotations

import os
import uuid
from functools import cache
from pathlib import Path


def _read_id(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def state_dir() -> Path:
    """Where cloudnbd keeps small per-machine state: /var/lib/cloudnbd for root, the XDG
    state directory for everyone else."""
    if os.geteuid() == 0:
        return Path("/var/lib/cloudnbd")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "cloudnbd"


@cache
def machine_id() -> str:
    """/etc/machine-id (or D-Bus's copy); without either (some containers), a random id
    kept in the state directory, so that it is stable here and shared with nobody."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        found = _read_id(Path(path))
        if found:
            return found
    kept = state_dir() / "machine-id"
    found = _read_id(kept)
    if found:
        return found
    kept.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = kept.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(uuid.uuid4().hex + "\n")
    try:
        os.link(tmp, kept)  # the first writer wins; everyone reads what it wrote
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return _read_id(kept)


def boot_id() -> str:
    """This boot of this machine: a process of another boot no longer runs."""
    return _read_id(Path("/proc/sys/kernel/random/boot_id"))


def pid_namespace() -> str:
    """The pid namespace this process sees: pids of another one are not ours to check."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """The start time of process pid (clock ticks since boot), or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its end
    return int(stat[stat.rindex(")") + 2:].split()[19])


def process_alive(pid: int, start: int) -> bool:
    """Whether process pid, started at start (0: unknown), still runs in this namespace."""
    found = process_start(pid)
    return found is not None and (not start or found == start)
