"""Power-loss campaign: the engine over FaultFS, the power cut at random moments, the disk
left as the kernel may leave it, then a fresh engine on that disk and the invariant.

The engine runs in this process with the real uploader and fetcher code on threads
(cloudnbd's InProcessPool), against a real object store, so that one FaultFS sees every fsync,
rename and unlink of the journal, the clean cache and the workers. A power-loss point:
1. arm FaultFS to cut the power at its N-th mutating operation from now (N random), and
   run a random workload of writes (10% FUA), WRITE_ZEROES, reads and FLUSHes, a few at
   a time on several threads; sometimes end it with a clean close;
2. the cut lands wherever the N-th operation is: a journal append, an uploader's fsync,
   a clean-file rename, a segment deletion, the close's fsyncs, or, with a quarter of the
   points, in the recovery after the previous cut (replay, cache discard, refetches).
   If the workload ends first, the power is cut at that quiet moment;
3. the engine is abandoned (its threads stopped; uploads already past their fsync still
   reach the cloud, as a request already sent would); the disk state FaultFS drew is
   written out; a new engine opens the same cache directory and replays its journal;
4. every sector is read and checked against the crash harness's Model (tests/
   crash_harness.py): a write acknowledged before a completed FLUSH, or with FUA, reads
   back exactly; any other sector reads its value at the last FLUSH or one written
   since; nothing else. What was read becomes the new baseline.
At the end everything is flushed and checked exactly, closed cleanly, the power cut once
more, and the volume reopened and checked exactly again.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cloudnbd.engine import localfs
from cloudnbd.engine.device import CloudState, Engine, EngineSettings
from cloudnbd.engine.inprocess import InProcessPool
from cloudnbd.engine.workers import Result, WorkerConfig, WorkerKind
from cloudnbd.nbd.device import DeviceError
from cloudnbd.volume import Volume
from tests.crash_harness import SECTOR, ZERO, Model
from tests.faultfs import FaultFS, Policy


class PowerLost(Exception):
    """The power was cut while the campaign was doing something."""


@dataclass
class PowerLossReport:
    points: int = 0
    where: Counter[str] = field(default_factory=Counter)  # phase -> power losses
    writes: int = 0
    fua_writes: int = 0
    flushes: int = 0
    records_replayed: int = 0
    checkpoints: int = 0  # the store's journal folded into chunks and map pages
    garbage_deleted: int = 0  # objects garbage collection deleted
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        phases = ", ".join(f"{n} {phase}" for phase, n in sorted(self.where.items()))
        return (f"power-loss campaign: {self.points} power-loss points ({phases}); "
                f"{self.writes} writes ({self.fua_writes} FUA), {self.flushes} flushes, "
                f"{self.records_replayed} journal records replayed, {self.checkpoints} "
                f"checkpoints, {self.garbage_deleted} objects collected; "
                f"{len(self.violations)} failures")


@dataclass(frozen=True)
class Target:
    """The volume under test and how workers reach its store."""

    volume: Volume
    backend: str
    location: str
    options: Any  # StoreOptions


class PowerLossCampaign:
    """One cache directory on FaultFS, one volume, many power losses (module doc)."""

    CHUNK_SECTORS = 16  # the largest request, in sectors

    def __init__(self, cache_dir: Path, target: Target, seed: int,
                 max_mutations: int = 1000, batches: int = 40) -> None:
        self.cache_dir = cache_dir
        cache_dir.mkdir(mode=0o700, exist_ok=True)
        self.target = target
        meta = target.volume.meta
        self.chunk_size = meta.chunk_size
        self.model = Model(meta.size // SECTOR)
        self.rng = random.Random(seed)
        self.fs = FaultFS(cache_dir, seed=seed)
        self.fs.on_power_loss = self._power_went_off
        self.max_mutations = max_mutations
        self.batches = batches
        self.settings = EngineSettings(
            cache_bytes=8 * meta.chunk_size, writeback_delay=0.05, retry_backoff=0.05,
            segment_bytes=64 * 1024,  # small segments: many rolls and deletions
            # the store's journal is folded into chunks every few FLUSHes, and garbage
            # collected at once: checkpoints (J4's floor moving up) and deletions
            # run during the workload, not only at a close
            checkpoint_bytes=4096, gc_grace=0.3,
            # FLUSHes of more than 16 KiB of journal data commit several objects at once
            journal_object_bytes=16 * 1024)
        self.report = PowerLossReport()
        self.engine: Engine | None = None
        self.pool: InProcessPool | None = None
        self.errors: list[str] = []  # the engine failing on a result with the power on
        self.ops = ThreadPoolExecutor(4, thread_name_prefix="client")
        self.counter = 0
        self.epoch = 0  # plays the lease: every open takes the next epoch
        self.seed = seed

    # -- engine life ------------------------------------------------------------------------
    def _make_pool(self, on_result: Callable[[WorkerKind, Result], None]) -> InProcessPool:
        config = WorkerConfig(backend=self.target.backend, location=self.target.location,
                              options=self.target.options,
                              codec=self.target.volume.chunk_codec,
                              clean_dir=self.cache_dir / "clean",
                              journal_dir=self.cache_dir / "journal")
        self.pool = InProcessPool(config, on_result, capacity=2,
                                  on_failure=self._engine_failed)
        return self.pool

    def _engine_failed(self, what: str) -> None:
        if not self.fs.dead:  # with the power off the engine's own unlinks fail
            self.errors.append(what)

    def _open(self) -> Engine:
        """An engine as `open` on this machine makes it after a crash: its own journal
        is the newest (J1 made it durable before the store had it), a new epoch."""
        volume = self.target.volume
        self.epoch += 1
        head, version = volume.objects.get_head(volume.meta.head)
        cloud = CloudState(volume.meta.head, head, version, self.epoch,
                           import_journal=False)
        self.engine = Engine(volume.meta.size, self.chunk_size, self.cache_dir, cloud,
                             self.settings, self._make_pool)  # type: ignore[arg-type]
        self.engine.start()
        self.report.records_replayed += self.engine.recovered_records
        return self.engine

    def _power_went_off(self) -> None:
        """Called by FaultFS, possibly under the engine lock: wake waiters elsewhere."""
        if self.engine is not None:
            self.engine.interrupt()  # a FLUSH waiting for uploads that now fail gives up

    def _abandon(self) -> None:
        """What is left of a running engine after the power is cut: nothing."""
        engine, self.engine = self.engine, None
        if engine is None:
            return
        self._count(engine)
        engine.halt()
        if self.pool is not None:
            self.pool.stop()
            assert not self.errors, self.errors

    def _count(self, engine: Engine) -> None:
        self.report.checkpoints += engine.stats.checkpoints
        self.report.garbage_deleted += engine.stats.garbage_deleted

    # -- workload ---------------------------------------------------------------------------
    def _value(self) -> bytes:
        self.counter += 1
        tag = f"p{self.seed:03d}:{self.counter:08d}".encode()
        return (tag * (SECTOR // len(tag) + 1))[:SECTOR]

    def _guard(self, action: Callable[[], Any]) -> Any:
        """Run action; failures once the power is off mean the power loss, not a bug."""
        try:
            return action()
        except (OSError, DeviceError) as exc:
            if self.fs.dead:
                raise PowerLost() from exc
            raise

    def _request(self, engine: Engine, op: tuple[str, int, Any]) -> bytes | None:
        kind, first, arg = op
        if kind in ("write", "fua"):
            engine.pwrite(memoryview(b"".join(arg)), first * SECTOR, kind == "fua")
        elif kind == "zero":
            engine.zero(first * SECTOR, arg * SECTOR, fua=False)
        else:
            buf = bytearray(arg * SECTOR)
            engine.pread_into(memoryview(buf), first * SECTOR)
            return bytes(buf)
        return None

    def _batch(self, engine: Engine) -> None:
        """One to four requests at once on distinct sectors, every outcome modelled."""
        rng, model = self.rng, self.model
        ops: list[tuple[str, int, Any]] = []
        taken: set[int] = set()
        for _ in range(rng.randint(1, 4)):
            n = rng.randint(1, self.CHUNK_SECTORS)
            first = rng.randrange(model.sectors - n)
            if taken & set(range(first, first + n)):
                continue  # requests in flight together never overlap: any order is fine
            taken |= set(range(first, first + n))
            kind = rng.random()
            if kind < 0.6:
                data = [self._value() for _ in range(n)]
                fua = rng.random() < 0.1
                model.wrote(first, data)  # it may land even if it never returns
                ops.append(("fua" if fua else "write", first, data))
            elif kind < 0.75:
                model.wrote(first, [ZERO] * n)
                ops.append(("zero", first, n))
            else:
                ops.append(("read", first, n))
        futures = [self.ops.submit(self._request, engine, op) for op in ops]
        lost = None
        for future, (kind, first, arg) in zip(futures, ops, strict=True):
            try:
                got = self._guard(future.result)
            except PowerLost as exc:
                lost = exc
                continue
            if kind == "fua":
                model.made_durable(first, arg)
                self.report.fua_writes += 1
            if kind in ("write", "fua"):
                self.report.writes += 1
            if kind == "read":
                problems = model.violations(got, first)
                assert not problems, problems  # a live read: the engine serves garbage
        if lost is not None:
            raise lost

    def _workload(self, engine: Engine) -> None:
        for _ in range(self.batches):
            self._batch(engine)
            if self.fs.dead:
                raise PowerLost()
            if self.rng.random() < 0.15:
                self._guard(engine.flush)
                self.model.flushed()
                self.report.flushes += 1

    def _close(self, engine: Engine) -> None:
        """A clean close: FLUSH, drain, stop (which leaves the clean-shutdown marker)."""
        self._guard(engine.flush)
        self.model.flushed()
        self._guard(partial(engine.drain, stall_timeout=30))
        self._guard(lambda: engine.stop(clean=True))

    def verify_all(self, engine: Engine, settle: bool) -> None:
        """Read every sector and check it; with settle, what was read becomes the
        baseline (only once the whole volume was read: a cut may interrupt this)."""
        data = bytearray(self.model.sectors * SECTOR)
        step = 64
        for first in range(0, self.model.sectors, step):
            n = min(step, self.model.sectors - first)
            view = memoryview(data)[first * SECTOR:(first + n) * SECTOR]
            self._guard(partial(engine.pread_into, view, first * SECTOR))
            problems = self.model.violations(bytes(view), first)
            self.report.violations += [f"point {self.report.points}: {p}" for p in problems]
        if settle:
            self.model.settle(bytes(data))

    # -- the campaign -----------------------------------------------------------------------
    def run(self, points: int) -> PowerLossReport:
        with localfs.installed(self.fs):
            try:
                self._run(points)
            finally:
                self._abandon()
                self.ops.shutdown()
        return self.report

    def _run(self, points: int) -> None:
        rng, fs = self.rng, self.fs
        settled = True
        while self.report.points < points:
            in_recovery = not settled and rng.random() < 0.25
            if in_recovery:
                fs.arm(rng.randint(1, 40))
            phase = "recovery"
            try:
                engine = self.engine or self._guard(self._open)
                if not settled:
                    self.verify_all(engine, settle=True)
                    settled = True
                if not in_recovery:
                    fs.arm(rng.randint(1, self.max_mutations))
                phase = "workload"
                self._workload(engine)
                if rng.random() < 0.2:
                    phase = "close"
                    self._close(engine)
                    phase = "after close"
                    fs.power_loss()
                else:
                    phase = "quiet moment"
                    fs.power_loss()
            except PowerLost:
                pass
            assert fs.dead
            self.report.where[phase] += 1
            self.report.points += 1
            self._abandon()
            fs.materialize()
            settled = False
        self._finish()

    def _finish(self) -> None:
        """Flush and check exactly; close cleanly, cut the power, reopen, check exactly."""
        engine = self.engine or self._open()
        self.verify_all(engine, settle=True)
        engine.flush()
        self.model.flushed()
        self.verify_all(engine, settle=False)
        engine.drain()
        engine.stop(clean=True)
        self.fs.power_loss(Policy.MIX)
        self._abandon()
        self.fs.materialize()
        engine = self._open()
        self.verify_all(engine, settle=False)
        engine.drain()
        engine.stop(clean=True)
        self._count(engine)
        self.engine = None
