"""What this machine knows about a volume: the servers running here, and what a crashed
one left behind.

Every running server registers itself in a per-user runtime directory
($XDG_RUNTIME_DIR/cloudnbd, /run/cloudnbd for root): one small JSON file per volume,
named like its cache directory, saying which process serves it and which cache and
control socket it uses. `close` and `status` find the server there whatever `--cache`
it was opened with; an entry whose process no longer runs is a crash.

`local_state` is the one place that decides what to tell a user about a volume on this
machine, so that after a crash every command says the same thing: what happened, and
the commands that recover (`open` replays the journal, `close` then uploads it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from cloudnbd import backends, identity
from cloudnbd.errors import CacheLocked, CloudnbdError


def default_cache_root() -> Path:
    """/var/cache/cloudnbd for root; the XDG cache directory for everyone else."""
    if os.geteuid() == 0:
        return Path("/var/cache/cloudnbd")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "cloudnbd"


def normalize_location(backend: str, location: str) -> str:
    """The location as a stable key: absolute for directories, no trailing slash."""
    return backends.find(backend).normalize(location)


def volume_key(backend: str, location: str, snapshot: str | None = None) -> str:
    """16 hex digits naming a volume location on this machine (cache and registry), or
    one of its snapshots served read-only (`open --snapshot`): a server of its own, with
    a cache and a registry entry apart from the volume's."""
    key = f"{backend}:{normalize_location(backend, location)}"
    if snapshot is not None:
        key += f"\0snapshot:{snapshot}"  # no location holds a NUL
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def volume_cache_dir(root: Path, backend: str, location: str,
                     snapshot: str | None = None) -> Path:
    """One subdirectory per volume location (and per snapshot served), named by a hash of
    backend and location."""
    return root / volume_key(backend, location, snapshot)


def registry_dir() -> Path:
    """The per-user runtime directory of running volumes (created 0700, ours alone)."""
    if os.geteuid() == 0:
        path = Path("/run/cloudnbd")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "cloudnbd"
    else:
        path = Path(f"/tmp/cloudnbd-{os.geteuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or \
            info.st_mode & 0o077:
        raise CloudnbdError(f"{path} is not a private directory of this user; remove it")
    return path


@dataclass(frozen=True)
class Entry:
    """A server registered as running a volume."""

    backend: str
    location: str
    pid: int
    pid_start: int
    cache_dir: str
    control_socket: str

    @property
    def alive(self) -> bool:
        return identity.process_alive(self.pid, self.pid_start)


def _entry_path(backend: str, location: str, snapshot: str | None) -> Path:
    return registry_dir() / f"{volume_key(backend, location, snapshot)}.json"


def register(backend: str, location: str, cache_dir: Path, control_socket: Path,
             snapshot: str | None = None) -> None:
    """Record this process as the server of the volume, or of its snapshot (replacing a
    crashed one's entry)."""
    entry = Entry(backend, normalize_location(backend, location), os.getpid(),
                  identity.process_start(os.getpid()) or 0, str(cache_dir),
                  str(control_socket))
    path = _entry_path(backend, location, snapshot)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(entry)))
    os.replace(tmp, path)


def unregister(backend: str, location: str, snapshot: str | None = None) -> None:
    """Remove this process's entry (close)."""
    path = _entry_path(backend, location, snapshot)
    found = lookup(backend, location, snapshot)
    if found is not None and found.pid == os.getpid():
        path.unlink(missing_ok=True)


def lookup(backend: str, location: str, snapshot: str | None = None) -> Entry | None:
    try:
        doc = json.loads(_entry_path(backend, location, snapshot).read_text())
        return Entry(**doc)
    except (OSError, ValueError, TypeError):
        return None


def journal_bytes(cache_dir: Path) -> int:
    """Bytes of journal segments in a cache directory: writes not known to be uploaded."""
    total = 0
    try:
        for path in (cache_dir / "journal").iterdir():
            if path.suffix == ".log":
                total += path.stat().st_size
    except OSError:
        pass
    return total


@dataclass(frozen=True)
class LocalState:
    """What this machine knows about a volume (see local_state)."""

    target: str  # how the user names the volume, for the commands we suggest
    running: Entry | None = None  # a live server, its control socket
    crashed_pid: int | None = None  # a server of this machine that died
    cache_dir: Path | None = None
    unuploaded: int = 0  # journal bytes the crash left

    @property
    def stopped_unclean(self) -> bool:
        """A server of this machine stopped without closing: crashed, or its close could
        not reach the cloud."""
        return self.running is None and (self.crashed_pid is not None or self.unuploaded > 0)

    def crash_message(self) -> str:
        """What happened and how to recover, the same words for every command."""
        who = f" (pid {self.crashed_pid})" if self.crashed_pid else ""
        if not self.unuploaded:
            return (f"the volume's server on this machine{who} is no longer running (it "
                    f"crashed) and left nothing to upload")
        return (f"the volume's server on this machine{who} stopped without uploading "
                f"everything (it crashed, or its close could not reach the cloud): "
                f"{self.unuploaded} bytes of writes wait in its journal at "
                f"{self.cache_dir}. `cloudnbd open {self.target}` replays the journal "
                f"and resumes; `cloudnbd close {self.target}` then uploads everything")


def local_state(backend: str, location: str, target: str,
                cache_root: Path | None = None, snapshot: str | None = None) -> LocalState:
    """Find the volume's server (or its snapshot's) on this machine: running (registry),
    crashed (a registry entry whose process is gone, or a cache directory whose journal
    holds writes and whose lock nobody holds), or neither. A snapshot's server has
    nothing to upload: its journal only copies the store's."""
    entry = lookup(backend, location, snapshot)
    if entry is not None and entry.alive:
        return LocalState(target, running=entry)
    candidates = []
    if entry is not None:
        candidates.append(Path(entry.cache_dir))
    for root in (cache_root, default_cache_root()):
        if root is not None:
            candidates.append(volume_cache_dir(root, backend, location, snapshot))
    for cache_dir in candidates:
        unuploaded = journal_bytes(cache_dir) if snapshot is None else 0
        if (entry is not None and Path(entry.cache_dir) == cache_dir) or unuploaded:
            if _lock_held(cache_dir):
                continue  # a server is starting or stopping right now
            return LocalState(target, crashed_pid=entry.pid if entry else None,
                              cache_dir=cache_dir, unuploaded=unuploaded)
    return LocalState(target)


# -- the cache lock ------------------------------------------------------------------------
# A volume's cache directory has a `lock` file that its server flocks for its whole
# life (and `delete` while it deletes the volume), holding the holder's pid.

def _lock_path(cache_dir: Path) -> Path:
    return cache_dir / "lock"


def lock_cache_dir(cache_dir: Path) -> int:
    """Take the exclusive lock of a volume's cache directory: CacheLocked, naming the
    server's pid, if a process on this machine holds it. Returns the locked descriptor;
    closing it lets go."""
    fd = os.open(_lock_path(cache_dir), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        raise CacheLocked(f"the volume is already open on this machine (pid {holder})"
                          ) from None
    return fd


def _lock_held(cache_dir: Path) -> bool:
    try:
        fd = os.open(_lock_path(cache_dir), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def wait_until_unlocked(cache_dir: Path) -> None:
    """Block until the server of cache_dir has let go of its lock: it exits right after
    answering close, and an open straight after close must not find it held."""
    fd = os.open(_lock_path(cache_dir), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)
