"""One machine at a time: the lease object that `open` takes and `close` gives back.

The lease is the object `lease` under the volume root, created with a conditional write
(If-None-Match: * on S3, ifGenerationMatch=0 on GCS, link() on a directory), so two
machines racing to open the same volume cannot both win. It names its holder so that the
refusal can say who has the volume open. A lease left behind by a crash of this machine's
own server (same host, process gone) is taken over with a warning; one held by another
machine only with --force.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from cloudnbd.backends.base import ObjectStore
from cloudnbd.errors import CloudnbdError, ObjectNotFound, PreconditionFailed

log = logging.getLogger(__name__)

LEASE_KEY = "lease"


class VolumeBusy(CloudnbdError):
    """Another machine (or process) has the volume open."""

    exit_code = 9


@dataclass(frozen=True)
class Lease:
    store: ObjectStore
    token: str

    def release(self) -> None:
        """Delete the lease if it is still ours (a --force takeover may have replaced it)."""
        try:
            holder = json.loads(self.store.get(LEASE_KEY))
        except (ObjectNotFound, ValueError):
            return
        if holder.get("token") == self.token:
            self.store.delete(LEASE_KEY)


def describe_holder(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["since"]))
        return f"{holder['host']} (pid {holder['pid']}, since {since})"
    except (ValueError, KeyError, TypeError):
        return "an unknown holder (the lease object is unreadable)"


def _left_by_dead_local_process(raw: bytes) -> bool:
    """True if the lease names this machine and a pid that is not running."""
    try:
        holder = json.loads(raw)
        if holder["host"] != socket.gethostname():
            return False
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, KeyError, TypeError, PermissionError, OSError):
        return False
    return False


def holder(store: ObjectStore) -> str | None:
    """Who holds the lease, or None if nobody does."""
    try:
        return describe_holder(store.get(LEASE_KEY))
    except ObjectNotFound:
        return None


def acquire(store: ObjectStore, force: bool = False) -> Lease:
    """Take the volume's lease, or raise VolumeBusy naming the holder."""
    token = uuid.uuid4().hex
    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "since": int(time.time()), "token": token}).encode()
    try:
        store.put_if_absent(LEASE_KEY, body)
        return Lease(store, token)
    except PreconditionFailed:
        pass
    try:
        raw = store.get(LEASE_KEY)
    except ObjectNotFound:  # released between our attempt and now: try once more
        store.put_if_absent(LEASE_KEY, body)
        return Lease(store, token)
    holder = describe_holder(raw)
    if _left_by_dead_local_process(raw):
        log.warning("taking over the lease left by %s, a process of this machine that no "
                    "longer runs (it crashed)", holder)
        store.put(LEASE_KEY, body)
        return Lease(store, token)
    if not force:
        raise VolumeBusy(f"volume is open on {holder}; if that machine is gone for good, "
                         f"open with --force to take over")
    log.warning("taking over the lease held by %s (--force)", holder)
    store.put(LEASE_KEY, body)
    return Lease(store, token)
