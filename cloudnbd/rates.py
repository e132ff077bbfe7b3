"""Recent transfer rates for `cloudnbd status`.

The engine keeps only running totals (cheap, lock-free to read). A sampler thread reads
them once a second and keeps the last WINDOW seconds of samples, so a status request can
answer "bytes per second lately" at once instead of measuring for a while itself.
Prometheus does not need this: it computes rates from the totals it scrapes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW = 10.0
INTERVAL = 1.0


class RateSampler:
    """Rates of a few named counters, over the last WINDOW seconds."""

    def __init__(self, read: Callable[[], dict[str, int]], window: float = WINDOW,
                 interval: float = INTERVAL) -> None:
        self._read = read
        self.window = window
        self._interval = interval
        self._samples: deque[tuple[float, dict[str, int]]] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rates", daemon=True)
        self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        now = time.monotonic()
        values = self._read()
        with self._lock:
            self._samples.append((now, values))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
                self._samples.popleft()

    def rates(self) -> tuple[dict[str, float], float]:
        """(per-second rate of each counter, seconds the rates span)."""
        now = time.monotonic()
        current = self._read()
        with self._lock:
            since, old = self._samples[0]
        span = now - since
        if span <= 0:
            return {name: 0.0 for name in current}, 0.0
        return {name: max(value - old.get(name, 0), 0) / span
                for name, value in current.items()}, span
