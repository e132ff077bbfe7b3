"""The worker pool in one process: the real uploader and fetcher code on threads.

What nbd.MemoryDevice is to the NBD layer, InProcessPool is to the engine: WorkerPool's
interface without worker processes, so that tests and benchmarks can drive the engine
over a real store and see everything the workers do (a fault-injecting file layer
installed in this process sees their file operations too). Three uses:

- plain: tasks run as they come, on `threads` threads;
- held (`auto=False`): uploads and fetches wait in `pending` until the caller runs them,
  so a test can keep an upload "in flight" while it writes, or lose a task as a killed
  worker would (the other tasks, commits and reads of the store's metadata, run);
- observed: `observe(task, result)` sees every task with its result before the engine
  does (counting requests in a benchmark).

Results reach the engine from the pool's threads, as they reach it from the real pool's
watcher thread: never from the thread that submitted the task (it holds the engine lock).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from cloudnbd.engine.workers import (
    FetchTask,
    Result,
    Task,
    UploadTask,
    WorkerConfig,
    WorkerKind,
    _Worker,
    kind_of,
)

log = logging.getLogger(__name__)


class InProcessPool:
    """WorkerPool's interface; see the module docstring."""

    def __init__(self, config: WorkerConfig, on_result: Callable[[WorkerKind, Result], None],
                 threads: int = 3, auto: bool = True, capacity: int = 4,
                 observe: Callable[[Task, Result], None] | None = None,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.worker = _Worker(config, None)
        self.on_result = on_result
        self.auto = auto
        self.observe = observe
        self.on_failure = on_failure  # the engine raised handling a result
        self._capacity = capacity
        self.pending: list[Task] = []
        self.changed = threading.Condition(threading.Lock())
        self._tasks: queue.Queue[Task | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._serve, daemon=True,
                                          name="inprocess-worker") for _ in range(threads)]
        self._started = False

    # -- WorkerPool's interface ----------------------------------------------------------
    def start(self) -> None:
        if not self._started:
            self._started = True
            for thread in self._threads:
                thread.start()

    def stop(self, grace: float = 30.0) -> None:
        """Let every thread finish its task (threads cannot be killed: grace is moot)."""
        if not self._started:
            return
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            thread.join()
        self._started = False

    def capacity(self, kind: WorkerKind | str) -> int:
        return self._capacity

    def pids(self, kind: WorkerKind | str) -> list[int]:
        return []

    def submit(self, task: Task) -> None:
        if self.auto or not isinstance(task, UploadTask | FetchTask):
            self.run(task)
            return
        with self.changed:
            self.pending.append(task)
            self.changed.notify_all()

    # -- held tasks ------------------------------------------------------------------------
    def wait_for(self, kind: type, timeout: float = 10) -> Task:
        """Take the first pending task of type kind, waiting for one to be submitted."""
        with self.changed:
            ok = self.changed.wait_for(lambda: any(isinstance(t, kind) for t in self.pending),
                                       timeout=timeout)
            assert ok, f"no {kind.__name__} was submitted"
            task = next(t for t in self.pending if isinstance(t, kind))
            self.pending.remove(task)
            return task

    def run(self, task: Task) -> None:
        """Run task now (on one of the pool's threads)."""
        self.start()
        self._tasks.put(task)

    def run_all(self) -> None:
        """Run every pending task."""
        with self.changed:
            tasks, self.pending = self.pending, []
        for task in tasks:
            self.run(task)

    # -- the threads -----------------------------------------------------------------------
    def _serve(self) -> None:
        while (task := self._tasks.get()) is not None:
            result = self.worker.run(task)
            if self.observe is not None:
                self.observe(task, result)
            try:
                self.on_result(kind_of(task), result)
            except Exception as exc:  # the real pool's watcher survives a bad result too
                log.exception("handling %s failed", result)
                if self.on_failure is not None:
                    self.on_failure(f"{kind_of(task)} result {result}: {exc!r}")
