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

Besides plain kills, a "machine loss" kills the front and deletes its local cache and
journal: then only the cloud remains, and the flushed-writes rule tests that FLUSH
really waited for the cloud.

A Model keeps, for every sector, the list of values it may hold. The workload pipelines
requests, so a kill can land with writes in flight.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from cloudnbd.engine.workers import WORKERS_LOCK, wait_for_orphans
from testbed.served import Served, start
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
            assert value in self.allowed[first + i]

    def flushed(self) -> None:
        for sector in self.allowed:
            self._keep_last_group(sector)

    def snapshot(self, first: int, count: int) -> list[list[bytes]]:
        """What a read of these sectors may return if sent now: a FLUSH or FUA that
        completes while it runs must not narrow that down."""
        return [list(self.values(first + i)) for i in range(count)]

    def violations(self, read: bytes, first: int = 0,
                   snapshot: list[list[bytes]] | None = None) -> list[str]:
        problems = []
        for i in range(len(read) // SECTOR):
            got = read[i * SECTOR:(i + 1) * SECTOR]
            options = snapshot[i] if snapshot is not None else self.values(first + i)
            if got not in options:
                kind = "lost flushed write" if len(options) == 1 else "unexpected contents"
                problems.append(f"sector {first + i}: {kind} (got {got[:12]!r}, "
                                f"allowed {[o[:12] for o in options]})")
        return problems

    def settle(self, read: bytes, first: int = 0) -> None:
        """After a crash: what is there now is the new baseline."""
        for i in range(len(read) // SECTOR):
            self.allowed[first + i] = [read[i * SECTOR:(i + 1) * SECTOR]]
            self.group.pop(first + i, None)


@dataclass
class CrashReport:
    crash_points: int = 0
    front_kills: int = 0
    machine_losses: int = 0
    worker_kills: int = 0
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"crash campaign: {self.crash_points} crash points ({self.front_kills} front "
                f"kills, {self.machine_losses} of them with the local disk lost, "
                f"{self.worker_kills} worker kills), {len(self.violations)} failures")


class Campaign:
    def __init__(self, tmp: Path, backend: str, location: str, password_file: Path,
                 store_args: list[str], env: dict[str, str] | None, size: int,
                 seed: int) -> None:
        self.tmp, self.backend, self.location = tmp, backend, location
        self.password_file, self.store_args, self.env = password_file, store_args, env
        self.model = Model(size // SECTOR)
        self.rng = random.Random(seed)
        self.report = CrashReport()
        self.server: Served | None = None
        self.client: NbdClient | None = None
        self.counter = 0

    def start(self) -> None:
        self.server = start(self.tmp, self.backend, self.location, self.password_file,
                            "--writeback-delay", "0.05", "--uploaders", "2",
                            "--fetchers", "2", "--cache-size", "4MiB",
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
                    handle = self.client.send(CMD_WRITE, first * SECTOR, n * SECTOR,
                                              b"".join(data), FLAG_FUA if fua else 0)
                    batch.append((handle, "fua" if fua else "write", first, data))
                elif kind < 0.75:
                    handle = self.client.send(CMD_ZEROES, first * SECTOR, n * SECTOR)
                    batch.append((handle, "write", first, [ZERO] * n))
                else:
                    handle = self.client.send(CMD_READ, first * SECTOR, n * SECTOR)
                    batch.append((handle, "read", first, n))
            # every request in the batch may take effect even if its reply never comes
            for _, kind, first, data in batch:
                if kind in ("write", "fua"):
                    self.model.wrote(first, data)
            pending = {handle: (kind, first, data) for handle, kind, first, data in batch}
            lengths = {h: d * SECTOR for h, (k, _, d) in pending.items() if k == "read"}
            may_read = {h: self.model.snapshot(first, d)
                        for h, (k, first, d) in pending.items() if k == "read"}
            while pending:  # replies come in any order
                handle, error, payload = self.client.recv(lengths)
                kind, first, data = pending.pop(handle)
                assert error == 0, f"request failed with errno {error}"
                if kind == "fua":
                    self.model.made_durable(first, data)
                elif kind == "read":
                    problems = self.model.violations(payload, first, may_read[handle])
                    assert not problems, problems
            if rng.random() < 0.15:
                self.client.send(CMD_FLUSH, 0, 0)
                assert self.client.recv()[1] == 0
                self.model.flushed()

    def kill_front(self, lose_machine: bool = False) -> None:
        """kill -9 the front process with requests possibly in flight, reopen, check.

        With lose_machine, the local cache and journal are deleted too, as if the disk
        died with the process: only what reached the cloud survives, so this is what
        tests that FLUSH means durable in the cloud.
        """
        assert self.server is not None and self.client is not None
        rng = self.rng
        self.model.begin_batch()
        for _ in range(rng.randint(0, 3)):  # requests that may or may not land
            first, n = rng.randrange(self.model.sectors - 16), rng.randint(1, 16)
            data = [self._value() for _ in range(n)]
            self.model.wrote(first, data)
            self.client.send(CMD_WRITE, first * SECTOR, n * SECTOR, b"".join(data))
        self.server.kill()
        self.report.front_kills += 1
        self.client.sock.close()
        if lose_machine:
            # The machine's workers die with it: wait for them (they hold workers.lock
            # until they exit) so none writes into the cache while it is deleted.
            for lock in self.server.cache.glob(f"*/{WORKERS_LOCK}"):
                wait_for_orphans(lock.parent)
            shutil.rmtree(self.server.cache)
            self.report.machine_losses += 1
        self.start()
        self.verify_all(settle=True)

    def kill_worker(self, kind: str) -> None:
        assert self.server is not None
        pids = self.server.status()["worker_pids"][kind]  # type: ignore[index]
        os.kill(self.rng.choice(pids), signal.SIGKILL)
        self.report.worker_kills += 1

    def verify_all(self, settle: bool) -> None:
        assert self.client is not None
        step = 256
        for first in range(0, self.model.sectors, step):
            n = min(step, self.model.sectors - first)
            read = self.client.pread(first * SECTOR, n * SECTOR)
            problems = self.model.violations(read, first)
            self.report.violations += problems
            if settle:
                self.model.settle(read, first)

    def run(self, crash_points: int) -> CrashReport:
        self.start()
        try:
            for _ in range(crash_points):
                self.run_ops(self.rng.randint(2, 25))
                victim = self.rng.choice(["front", "machine", "upload", "fetch"])
                if victim in ("front", "machine"):
                    self.kill_front(lose_machine=victim == "machine")
                else:
                    self.kill_worker(victim)
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
        return self.report
