"""One writer at a time: the volume lease, who holds it, and when a holder is provably gone.

The lease is the object `lease` under the volume root, a small JSON record (format in
docs/format.md). `open` takes it before it reads or writes any chunk, and so do the
commands that change a volume's contents behind a server's back (`import`, `resize`,
`delete`, `upgrade`, `rekey`). Its rules:

- L1 Every change of the lease object is conditional on the version read just before
  (ObjectStore.put_if: If-None-Match / If-Match on S3, ifGenerationMatch on GCS, a
  compare under the directory's flock on the file backend), so of two actors racing for
  it exactly one wins; the other re-reads and sees the winner.
- L2 The lease is never deleted while the volume exists: `release` writes a released
  record. Its `epoch` rises by one at every acquisition. A server records the epoch it
  holds next to its journal; a journal whose epoch is not the one the store still shows
  was overtaken by another holder and is never replayed (docs/design.md, "Who else
  touches the store").
- L3 A holder is provably gone only if it was a process of this machine (same machine
  id, same pid namespace) that no longer runs: another boot, or no process with its pid
  and start time. Such a lease is taken over without --force, with a warning. A machine
  is its /etc/machine-id, not its host name, so a clone or a container that shares the
  name does not take a lease silently.
- L4 `open --force` takes the lease from a holder that is not provably gone, but never
  from a live process of this machine. The displaced server learns it when its next head
  write finds the head replaced (E5 in engine/device.py) or its garbage collector finds
  the head moved (G3), and stops.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field

from cloudnbd import identity
from cloudnbd.backends.base import ObjectStore
from cloudnbd.errors import ObjectNotFound, PreconditionFailed, VolumeBusy

log = logging.getLogger(__name__)

LEASE_KEY = "lease"
_ACQUIRE_ATTEMPTS = 5


# -- the record ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Holder:
    """What the lease object says."""

    state: str  # "held" or "released"
    epoch: int
    token: str = ""
    purpose: str = "open"  # what holds it: open, import, resize, delete, upgrade, rekey
    host: str = "?"
    machine_id: str = ""
    boot_id: str = ""
    pid_ns: str = ""
    pid: int = 0
    pid_start: int = 0
    since: int = 0

    @classmethod
    def me(cls, purpose: str, epoch: int) -> Holder:
        return cls(state="held", epoch=epoch, token=uuid.uuid4().hex, purpose=purpose,
                   host=socket.gethostname(), machine_id=identity.machine_id(),
                   boot_id=identity.boot_id(), pid_ns=identity.pid_namespace(),
                   pid=os.getpid(), pid_start=identity.process_start(os.getpid()) or 0,
                   since=int(time.time()))

    @classmethod
    def parse(cls, raw: bytes) -> Holder:
        """The record in raw; an unreadable one counts as held by an unknown holder.
        Leases of earlier versions (no state, no epoch) read as held at epoch 0."""
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError
            known = {k: v for k, v in doc.items() if k in _FIELDS}
            known.setdefault("state", "held")
            known.setdefault("epoch", 0)
            holder = cls(**known)
            for name, kind in _FIELDS.items():
                if not isinstance(getattr(holder, name), kind):
                    raise TypeError(name)
            return holder
        except (ValueError, TypeError):
            return cls(state="held", epoch=0, host="an unknown holder (the lease object "
                                                    "is unreadable)")

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @property
    def held(self) -> bool:
        return self.state == "held"

    def released(self) -> Holder:
        return Holder(state="released", epoch=self.epoch, host=self.host,
                      machine_id=self.machine_id, since=int(time.time()))

    def is_this_machine(self) -> bool:
        return bool(self.machine_id) and self.machine_id == identity.machine_id()

    def alive(self) -> bool | None:
        """True if the holder is a running process of this machine, False if it provably
        is not (L3), None if nobody here can tell (another machine, another namespace)."""
        if not self.is_this_machine():
            return None
        if self.boot_id and self.boot_id != identity.boot_id():
            return False  # this machine rebooted since: no process of that boot runs
        if self.pid_ns != identity.pid_namespace():
            return None  # a container of this machine: its pids are not ours to check
        return identity.process_alive(self.pid, self.pid_start)

    def describe(self) -> str:
        if not self.pid and not self.since:
            return self.host  # an unreadable record
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        what = "" if self.purpose == "open" else f", running {self.purpose}"
        if self.is_this_machine() and self.pid_ns != identity.pid_namespace():
            return f"a container of this machine (pid {self.pid} in it{what}, since {since})"
        if self.is_this_machine():
            return f"this machine (pid {self.pid}{what}, since {since})"
        machine = f"machine {self.machine_id[:12]}, " if self.machine_id else ""
        return f"{self.host} ({machine}pid {self.pid}{what}, since {since})"


_FIELDS = {name: int if f.type == "int" else str
           for name, f in Holder.__dataclass_fields__.items()}


def read(store: ObjectStore) -> tuple[Holder | None, str | None]:
    """The lease record and its version; (None, None) if there is no lease object.

    The version is read first: a record newer than its version only makes a later
    conditional write fail and retry, never succeed against a record it did not see."""
    info = store.stat(LEASE_KEY)
    if info is None:
        return None, None
    try:
        raw = store.get(LEASE_KEY)
    except ObjectNotFound:
        return None, None
    return Holder.parse(raw), info.version


def holder(store: ObjectStore) -> Holder | None:
    """Who holds the lease, or None if nobody does."""
    found, _ = read(store)
    return found if found is not None and found.held else None


# -- taking and giving back ----------------------------------------------------------------

@dataclass
class Lease:
    """A lease this process holds; `version` is the lease object's version as we wrote it,
    which stays the same while we hold it (we never rewrite it until release)."""

    store: ObjectStore
    record: Holder
    version: str
    #: the epoch the lease had before we took it, and whether its holder was provably gone
    previous: Holder | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def epoch(self) -> int:
        return self.record.epoch

    def release(self) -> None:
        """Write the released record, if the lease is still ours (L1, L2)."""
        try:
            self.store.put_if(LEASE_KEY, self.record.released().encode(), self.version)
        except PreconditionFailed:
            now, _ = read(self.store)
            log.warning("the lease is no longer ours (now %s); left as it is",
                        now.describe() if now and now.held else "released")


def acquire(store: ObjectStore, purpose: str = "open", force: bool = False) -> Lease:
    """Take the volume's lease (L1-L4), or raise VolumeBusy naming the holder.

    purpose "open" takes over a provably gone holder's lease by itself (L3) and, with
    force, a holder's nobody here can judge (L4). Any other purpose is a command that
    changes the volume behind a server's back (import, resize, delete), which nothing
    would fence: it needs force even for a provably gone holder (whose journal may still
    hold writes), and never takes a lease whose holder may be alive.
    """
    for _ in range(_ACQUIRE_ATTEMPTS):
        found, version = read(store)
        notes: list[str] = []
        if found is not None and found.held:
            notes.append(_judge(found, purpose, force))
        mine = Holder.me(purpose, (found.epoch if found else 0) + 1)
        try:
            new_version = store.put_if(LEASE_KEY, mine.encode(), version)
        except PreconditionFailed:
            continue  # someone else changed it between our read and write: look again
        for note in notes:
            log.warning("%s", note)
        return Lease(store, mine, new_version, found, notes)
    raise VolumeBusy("the volume's lease keeps changing hands; try again")


def _judge(found: Holder, purpose: str, force: bool) -> str:
    """Why we may take the lease from found (a note to log), or VolumeBusy."""
    alive = found.alive()
    using = "open" if found.purpose == "open" else f"in use ({found.purpose})"
    if alive is True:
        raise VolumeBusy(f"volume is {using} on this machine (pid {found.pid}); "
                         + ("close it first" if found.purpose == "open" else
                            "wait for it to finish")
                         + (" (--force never takes a lease from a running process of "
                            "this machine)" if force else ""), found)
    if alive is False:
        if purpose != "open" and not force:
            raise VolumeBusy(f"volume was left open on this machine by pid {found.pid}, "
                             f"which no longer runs (it crashed); `cloudnbd open` and "
                             f"`close` finish its uploads, or pass --force to {purpose} "
                             f"anyway", found)
        return (f"took over the lease left by {found.describe()}, a process of this "
                f"machine that no longer runs (it crashed)")
    if purpose != "open":
        raise VolumeBusy(f"volume is {using} on {found.describe()}; cloudnbd cannot "
                         f"prove that it is gone. Close it there, or if that machine is "
                         f"gone for good take the volume over here with `open --force`, "
                         f"`close` it, then {purpose}", found)
    if not force:
        raise VolumeBusy(f"volume is {using} on {found.describe()}; if that machine is "
                         f"gone for good, open with --force to take over", found)
    return (f"took over the lease held by {found.describe()} (--force); if that server "
            f"still runs, its FLUSHes now fail")


def check(store: ObjectStore, version: str) -> str | None:
    """None if the lease is still at version (ours); else who holds it now, in words."""
    info = store.stat(LEASE_KEY)
    if info is not None and info.version == version:
        return None
    if info is None:
        return "nobody: the lease object was deleted (the volume was deleted?)"
    now, _ = read(store)
    if now is None or not now.held:
        return "nobody: the lease was released by someone else"
    return now.describe()
