"""Crash campaign: random workloads against a real `cloudnbd open`, kill -9 of the front
process, an uploader or a fetcher at random moments, then the invariant.

The invariant, per 4 KiB sector:
- a sector whose last change was acknowledged before a completed FLUSH (or was a FUA
  write) reads back exactly that; requests pipelined together have no order between
  them (the server runs them on a thread pool), so if several of them wrote the sector,
  it reads back one of their values;
- any other sector reads one of: its value at the last FLUSH, or a value written to it
  since (acknowledged or still in flight at the kill);
- nothing else: no torn sector, no data that was never written there.
A crash that keeps the local journal replays it at open, so writes no FLUSH covered
read back again: visible, yet still not durable. Until the next FLUSH (or a FUA write to
the sector), a machine loss may take such a sector back to any value it could have held
before that crash; only then, and only to those values.

Besides plain kills, a "machine loss" kills the front and deletes its local cache and
journal: then only the cloud remains, and the flushed-writes rule tests that FLUSH
really waited for the cloud.

Format 3 adds crash points inside the commit protocol. The server reaches the store
through a relay (CrashRelay) that sees every request, one per connection; armed with a
trap, it kills the front at the moment the trap's request arrives, and either drops the
request or lets it reach the store first (then only its answer is lost):
- "page": a checkpoint's map page write (pages being written, the head not yet);
- "checkpoint head": the head write that follows a checkpoint's pages (retiring the
  journal objects it folded);
- "journal head": the head write that follows a FLUSH's journal object (the object is
  stored, the head may not name it);
- "gc": a garbage collection's DELETE.
Each server runs in one of two modes: "checkpointing" (checkpoints after every few
FLUSHes, garbage collected a second after it appears) or "journal" (checkpoints never
come, so the store's journal grows with every FLUSH); a "machine loss with journal" is a
machine loss in the journal mode after several FLUSHes, so that the new machine must
replay the store's uncompacted journal.

A Model keeps, for every sector, the list of values it may hold. The workload pipelines
requests, so a kill can land with writes in flight.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cloudnbd.engine.workers import WORKERS_LOCK, wait_for_orphans
from testbed.served import Served, start
from testbed.stores import FaultProxy, _read_request
from tests.nbdclient import CMD_FLUSH, CMD_READ, CMD_WRITE, CMD_ZEROES, FLAG_FUA, NbdClient

SECTOR = 4096
ZERO = bytes(SECTOR)


@dataclass
class Model:
    """Per sector, the values it may hold, oldest first.

    Requests of one batch are pipelined, and the server runs them on a thread pool: two
    of them that overlap may take effect in either order, so any value the last batch
    that wrote a sector wrote to it may be the one that stays. A FLUSH or a FUA therefore
    keeps that whole group, not just the value sent last.
    """

    sectors: int
    allowed: dict[int, list[bytes]] = field(default_factory=dict)
    batch: int = 0
    # sector -> (last batch that wrote it, index in allowed where that batch's values start)
    group: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: sector -> what a machine loss may bring back: its values before a crash whose
    #: local journal survived (the replay shows them, no FLUSH has covered them yet)
    revertible: dict[int, list[bytes]] = field(default_factory=dict)

    def values(self, sector: int) -> list[bytes]:
        return self.allowed.get(sector, [ZERO])

    def begin_batch(self) -> None:
        """Requests sent from now until the next call may run in any order."""
        self.batch += 1

    def wrote(self, first: int, data: list[bytes]) -> None:
        for i, value in enumerate(data):
            values = self.allowed.setdefault(first + i, [ZERO])
            if self.group.get(first + i, (0, 0))[0] != self.batch:
                self.group[first + i] = (self.batch, len(values))
            values.append(value)

    def _keep_last_group(self, sector: int) -> None:
        values = self.allowed[sector]
        batch, start = self.group.get(sector, (0, len(values) - 1))
        self.allowed[sector] = values[start:]
        self.group[sector] = (batch, 0)

    def made_durable(self, first: int, data: list[bytes]) -> None:
        """A FUA write was acknowledged: older values are gone for good, but the writes
        of its own batch (sent before or after it) and later ones may still land."""
        for i, value in enumerate(data):
            self._keep_last_group(first + i)
            self.revertible.pop(first + i, None)
            assert value in self.allowed[first + i]

    def flushed(self) -> None:
        for sector in self.allowed:
            self._keep_last_group(sector)
        self.revertible.clear()  # the replayed writes too: they are in the journal

    def snapshot(self, first: int, count: int) -> list[list[bytes]]:
        """What a read of these sectors may return if sent now: a FLUSH or FUA that
        completes while it runs must not narrow that down."""
        return [list(self.values(first + i)) for i in range(count)]

    def violations(self, read: bytes, first: int = 0,
                   snapshot: list[list[bytes]] | None = None,
                   machine_lost: bool = False) -> list[str]:
        """Sectors of read (at sector first) that hold what they may not; machine_lost:
        read from the store alone, after a machine loss (revertible values count)."""
        problems = []
        for i in range(len(read) // SECTOR):
            got = read[i * SECTOR:(i + 1) * SECTOR]
            options = snapshot[i] if snapshot is not None else self.values(first + i)
            if machine_lost and got in self.revertible.get(first + i, ()):
                continue
            if got not in options:
                kind = "lost flushed write" if len(options) == 1 else "unexpected contents"
                problems.append(f"sector {first + i}: {kind} (got {got[:12]!r}, "
                                f"allowed {[o[:12] for o in options]})")
        return problems

    def reverted(self, read: bytes, first: int = 0) -> int:
        """How many sectors of read a machine loss took back to a revertible value."""
        return sum(1 for i in range(len(read) // SECTOR)
                   if read[i * SECTOR:(i + 1) * SECTOR] not in self.values(first + i)
                   and read[i * SECTOR:(i + 1) * SECTOR] in self.revertible.get(first + i, ()))

    def settle(self, read: bytes, first: int = 0, machine_lost: bool = False) -> None:
        """After a crash: what is there now is the new baseline of what reads return.
        After a machine loss it came from the store, so it is durable too; otherwise
        the values it could have held stay revertible until the next FLUSH."""
        for i in range(len(read) // SECTOR):
            sector = first + i
            if machine_lost:
                self.revertible.pop(sector, None)
            else:
                kept = self.revertible.setdefault(sector, [])
                kept.extend(v for v in self.values(sector) if v not in kept)
            self.allowed[sector] = [read[i * SECTOR:(i + 1) * SECTOR]]
            self.group.pop(sector, None)


#: crash points the relay springs (CrashRelay), and what each needs of the server
TRAPS = ("page", "checkpoint head", "journal head", "gc")
#: every kind of crash point; the first run through covers each once
KINDS = ("front", "machine", "machine with journal", "upload", "fetch", *TRAPS)
#: server settings per mode: checkpoints (and garbage collection) all the time, or never
MODES = {"checkpointing": ["--checkpoint-size", "64KiB", "--gc-grace", "1"],
         "journal": ["--checkpoint-size", "1GiB", "--checkpoint-age", "86400"]}
#: the mode a kind of crash point needs (the others run in either)
NEEDS = {"page": "checkpointing", "checkpoint head": "checkpointing", "gc": "checkpointing",
         "machine with journal": "journal"}
#: batches of requests a trap may take to spring before the point counts as missed
TRAP_PATIENCE = 400


@dataclass
class CrashReport:
    crash_points: int = 0
    front_kills: int = 0
    machine_losses: int = 0
    worker_kills: int = 0
    where: Counter[str] = field(default_factory=Counter)  # kind -> crash points
    landed: Counter[str] = field(default_factory=Counter)  # trap -> requests let through
    missed: Counter[str] = field(default_factory=Counter)  # trap -> never sprung
    #: journal objects the head named at each machine loss in the journal mode
    uncompacted: list[int] = field(default_factory=list)
    writes: int = 0
    flushes: int = 0
    records_replayed: int = 0
    #: sectors a machine loss took back to a value a replay had shown, no FLUSH since
    reverted: int = 0
    violations: list[str] = field(default_factory=list)
    #: the crash points after which violations were first seen: (index, kind, count)
    violated_at: list[tuple[int, str, int]] = field(default_factory=list)

    def summary(self) -> str:
        kinds = ", ".join(f"{self.where[k]} {k}" for k in KINDS)
        landed = ", ".join(f"{k} {n}" for k, n in sorted(self.landed.items()))
        return (f"crash campaign: {self.crash_points} crash points ({kinds}; "
                f"{self.front_kills} front kills, {self.machine_losses} of them with the "
                f"local disk lost, {self.worker_kills} worker kills; traps whose request "
                f"reached the store: {landed or 'none'}; missed: "
                f"{dict(self.missed) or 'none'}; store journal objects at the losses with "
                f"journal: {sorted(self.uncompacted)}); {self.writes} writes, "
                f"{self.flushes} flushes, {self.records_replayed} journal records "
                f"replayed, {self.reverted} unflushed replayed sectors taken back by a "
                f"machine loss; {len(self.violations)} failures"
                + (f" (first seen after crash points {self.violated_at})"
                   if self.violated_at else ""))


def store_request(head: bytes) -> str:
    """What an HTTP request to the store is, from its request line: a write of a "chunk",
    "page", "journal" object or the "head", a "delete", or "other"."""
    method, path = head.split(b" ", 2)[:2]
    key = path.split(b"?", 1)[0]
    if method == b"DELETE" or (method == b"POST" and b"?delete" in path):
        return "delete"
    if method != b"PUT":
        return "other"
    name = key.rsplit(b"/", 2)
    if name[-1].startswith(b"head-"):
        return "head"
    return {b"chunks": "chunk", b"map": "page", b"journal": "journal"}.get(
        name[-2] if len(name) > 1 else b"", "other")


class CrashRelay(FaultProxy):
    """Relays every request to the store, one per connection, and watches them. Armed
    with a trap, it calls `spring` (kill -9 of the front) when the trap's request
    arrives; with `lands`, the request reaches the store first and only its answer is
    lost, else it never does. Which head write follows which: one commit runs at a
    time (E5), so the head write after a page write is that checkpoint's, and the one
    after a journal object's is that FLUSH's."""

    def __init__(self, target: str) -> None:
        super().__init__(target, [], rate=1.0, kinds=("pass",))
        self._trap: tuple[str, bool, Callable[[], None]] | None = None
        self._last = ""  # the last page or journal write since the last head write
        self.sprung = threading.Event()

    def arm(self, trap: str, lands: bool, spring: Callable[[], None]) -> None:
        with self._lock:
            self.sprung.clear()
            self._trap = (trap, lands, spring)

    def disarm(self) -> bool:
        """Take the trap away; whether it had sprung (a spring under way finishes)."""
        with self._lock:
            self._trap = None
        return self.sprung.is_set()

    def _matches(self, what: str, trap: str) -> bool:
        if trap in ("page", "gc"):
            return what == {"page": "page", "gc": "delete"}[trap]
        after = {"checkpoint head": "page", "journal head": "journal"}[trap]
        return what == "head" and self._last == after

    def _serve(self, client: socket.socket, fault: str | None) -> None:
        with client:
            try:
                head, body = _read_request(client)
            except (ConnectionError, OSError):
                return
            what = store_request(head)
            with self._lock:
                trap = self._trap
                if trap is not None and self._matches(what, trap[0]):
                    self._trap = None
                else:
                    trap = None
                if what in ("page", "journal"):
                    self._last = what
                elif what == "head":
                    self._last = ""
            if trap is None:
                self._answer(client, self._forward(head, body))
                return
            _, lands, spring = trap
            if lands:
                self._forward(head, body)
            spring()
            self.sprung.set()


class Campaign:
    """The crash campaign against one volume. relay: the CrashRelay the server's
    store_args lead through; store_journal: how many journal objects the head in the
    store names now (read straight from the store)."""

    def __init__(self, tmp: Path, backend: str, location: str, password_file: Path,
                 store_args: list[str], env: dict[str, str] | None, size: int,
                 seed: int, relay: CrashRelay | None = None,
                 store_journal: Callable[[], int] | None = None) -> None:
        self.tmp, self.backend, self.location = tmp, backend, location
        self.password_file, self.store_args, self.env = password_file, store_args, env
        self.relay, self.store_journal = relay, store_journal
        self.model = Model(size // SECTOR)
        self.rng = random.Random(seed)
        self.report = CrashReport()
        self.server: Served | None = None
        self.client: NbdClient | None = None
        self.counter = 0
        self.mode = "checkpointing"

    def start(self, mode: str | None = None) -> None:
        self.mode = mode or self.rng.choice(sorted(MODES))
        self.server = start(self.tmp, self.backend, self.location, self.password_file,
                            "--writeback-delay", "0.05", "--uploaders", "2",
                            "--fetchers", "2", "--cache-size", "4MiB", *MODES[self.mode],
                            store_args=self.store_args, env=self.env, cache=self.tmp / "cache")
        self.client = NbdClient.unix(str(self.server.socket))

    def _value(self) -> bytes:
        self.counter += 1
        tag = f"w{self.counter:08d}".encode()
        return (tag * (SECTOR // len(tag) + 1))[:SECTOR]

    def run_ops(self, count: int) -> None:
        """count operations, a few pipelined at a time; every reply is modelled."""
        assert self.client is not None
        rng = self.rng
        for _ in range(count):
            batch = []
            self.model.begin_batch()
            for _ in range(rng.randint(1, 4)):
                first = rng.randrange(self.model.sectors - 16)
                n = rng.randint(1, 16)
                kind = rng.random()
                if kind < 0.6:
                    data = [self._value() for _ in range(n)]
                    fua = rng.random() < 0.1
                    batch.append((None, "fua" if fua else "write", first, data))
                elif kind < 0.75:
                    batch.append((None, "zero", first, [ZERO] * n))
                else:
                    batch.append((None, "read", first, n))
            # every request in the batch may take effect even if its reply never comes
            for _, kind, first, data in batch:
                if kind in ("write", "fua", "zero"):
                    self.model.wrote(first, data)
                    self.report.writes += 1
            may_read = [self.model.snapshot(first, d) if kind == "read" else None
                        for _, kind, first, d in batch]
            pending, lengths = {}, {}
            for (_, kind, first, data), snapshot in zip(batch, may_read, strict=True):
                if kind == "read":
                    handle = self.client.send(CMD_READ, first * SECTOR, data * SECTOR)
                    lengths[handle] = data * SECTOR
                elif kind == "zero":
                    handle = self.client.send(CMD_ZEROES, first * SECTOR, len(data) * SECTOR)
                else:
                    handle = self.client.send(CMD_WRITE, first * SECTOR, len(data) * SECTOR,
                                              b"".join(data), FLAG_FUA if kind == "fua" else 0)
                pending[handle] = (kind, first, data, snapshot)
            while pending:  # replies come in any order
                handle, error, payload = self.client.recv(lengths)
                kind, first, data, snapshot = pending.pop(handle)
                assert error == 0, f"request failed with errno {error}"
                if kind == "fua":
                    self.model.made_durable(first, data)
                elif kind == "read":
                    problems = self.model.violations(payload, first, snapshot)
                    assert not problems, problems
            if rng.random() < 0.15:
                self.flush()

    def flush(self) -> None:
        assert self.client is not None
        self.client.send(CMD_FLUSH, 0, 0)
        assert self.client.recv()[1] == 0
        self.model.flushed()
        self.report.flushes += 1

    def kill_front(self) -> None:
        """kill -9 the front process with requests possibly in flight."""
        assert self.server is not None and self.client is not None
        rng = self.rng
        self.model.begin_batch()
        for _ in range(rng.randint(0, 3)):  # requests that may or may not land
            first, n = rng.randrange(self.model.sectors - 16), rng.randint(1, 16)
            data = [self._value() for _ in range(n)]
            self.model.wrote(first, data)
            self.client.send(CMD_WRITE, first * SECTOR, n * SECTOR, b"".join(data))
        self.server.kill()

    def recover(self, lose_machine: bool, mode: str | None) -> None:
        """After the front was killed: with lose_machine, the local cache and journal
        are deleted too, as if the disk died with the process: only what reached the
        cloud survives, so this is what tests that FLUSH means durable in the cloud.
        Then open again (in mode) and check every sector."""
        assert self.server is not None and self.client is not None
        self.report.front_kills += 1
        self.client.sock.close()
        if lose_machine:
            # The machine's workers die with it: wait for them (they hold workers.lock
            # until they exit) so none writes into the cache while it is deleted.
            for lock in self.server.cache.glob(f"*/{WORKERS_LOCK}"):
                wait_for_orphans(lock.parent)
            shutil.rmtree(self.server.cache)
            self.report.machine_losses += 1
        self.start(mode)
        self.verify_all(settle=True, machine_lost=lose_machine)

    def spring_trap(self, trap: str) -> bool:
        """Run the workload until the relay's trap kills the front; False if it never
        came within TRAP_PATIENCE batches (the point is then a plain front kill)."""
        assert self.relay is not None and self.server is not None
        server = self.server
        lands = self.rng.random() < 0.5
        self.relay.arm(trap, lands, server.kill)
        try:
            for _ in range(TRAP_PATIENCE):
                self.run_ops(1)
                if self.relay.sprung.is_set():
                    break
        except OSError:  # the connection died with the front in the middle of a batch
            if not self.relay.sprung.wait(timeout=60):
                raise
        if not self.relay.disarm():
            self.report.missed[trap] += 1
            return False
        if lands:
            self.report.landed[trap] += 1
        return True

    def kill_worker(self, kind: str) -> None:
        assert self.server is not None
        pids = self.server.status()["worker_pids"][kind]  # type: ignore[index]
        os.kill(self.rng.choice(pids), signal.SIGKILL)
        self.report.worker_kills += 1

    def verify_all(self, settle: bool, machine_lost: bool = False) -> None:
        assert self.client is not None
        step = 256
        for first in range(0, self.model.sectors, step):
            n = min(step, self.model.sectors - first)
            read = self.client.pread(first * SECTOR, n * SECTOR)
            self.report.violations += self.model.violations(read, first,
                                                            machine_lost=machine_lost)
            if machine_lost:
                self.report.reverted += self.model.reverted(read, first)
            if settle:
                self.model.settle(read, first, machine_lost)

    def _plan(self, crash_points: int) -> list[str]:
        """Every kind once (the traps only with a relay), in random order, then kinds
        at random."""
        kinds = [k for k in KINDS if self.relay is not None or k not in TRAPS]
        first = self.rng.sample(kinds, len(kinds))
        rest = [self.rng.choice(kinds) for _ in range(crash_points)]
        return (first + rest)[:crash_points]

    def crash(self, kind: str, following: str | None) -> None:
        """One crash point of kind; following: the next one's kind (the mode the server
        started now runs in must suit it)."""
        assert self.server is not None
        mode = NEEDS.get(following or "")
        if kind in ("upload", "fetch"):
            self.run_ops(self.rng.randint(2, 25))
            self.kill_worker(kind)
            if mode is not None and mode != self.mode:  # a clean restart in that mode
                assert self.client is not None
                self.client.close()
                self.server.close()
                self.start(mode)
            return
        if kind == "machine with journal":
            for _ in range(self.rng.randint(2, 6)):  # several FLUSHes, several objects
                self.run_ops(self.rng.randint(1, 6))
                self.flush()
            self.run_ops(self.rng.randint(0, 6))  # and writes no FLUSH covered
            self.kill_front()
            assert self.store_journal is not None
            self.report.uncompacted.append(self.store_journal())
            self.recover(lose_machine=True, mode=mode)
            return
        if kind in TRAPS and self.spring_trap(kind):
            self.recover(lose_machine=self.rng.random() < 0.3, mode=mode)
            return
        self.run_ops(self.rng.randint(2, 25))
        self.kill_front()
        self.recover(lose_machine=kind == "machine", mode=mode)

    def run(self, crash_points: int) -> CrashReport:
        plan = self._plan(crash_points)
        self.start(NEEDS.get(plan[0]) if plan else None)
        try:
            for i, kind in enumerate(plan):
                before = len(self.report.violations)
                self.crash(kind, plan[i + 1] if i + 1 < len(plan) else None)
                if len(self.report.violations) > before:
                    self.report.violated_at.append(
                        (i, kind, len(self.report.violations) - before))
                self.report.where[kind] += 1
                self.report.crash_points += 1
            # the end: everything acknowledged reads back, and survives a clean close
            assert self.client is not None and self.server is not None
            self.client.flush()
            self.model.flushed()
            self.verify_all(settle=False)
            self.client.close()
            self.server.close()
            self.start()
            self.verify_all(settle=False)
        finally:
            if self.client is not None:
                self.client.close()
            if self.server is not None and self.server.process.poll() is None:
                self.server.close(check=False)
            self.report.records_replayed = replayed(self.tmp / "server.log")
        return self.report


def replayed(log: Path) -> int:
    """Journal records the servers replayed at open, local and the store's, from their
    log."""
    if not log.exists():
        return 0
    return sum(int(n) for n in re.findall(r"replayed (\d+) journal records",
                                          log.read_text(errors="replace")))
