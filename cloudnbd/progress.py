"""Progress for long operations: a live line on a terminal, silence in logs.

One class serves close-drain, import, export, verify and shrink, so they look alike.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from cloudnbd.sizes import format_size


class Progress:
    """Shows `done of total bytes, rate, ETA` on a terminal; prints nothing otherwise."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 interval: float = 0.2) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.interval = interval
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._samples: list[tuple[float, int]] = []

    def rate(self, done: int) -> float:
        """Bytes per second over the last few seconds."""
        now = time.monotonic()
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > 5:
            self._samples.pop(0)
        t0, d0 = self._samples[0]
        return (done - d0) / (now - t0) if now > t0 else 0.0

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        """Redraw (at most every interval); note, if any, ends the line: why it waits."""
        if total is not None:
            self.total = total
        rate = self.rate(done)
        if not self.live:
            return
        now = time.monotonic()
        if now - self._last_draw < self.interval and done < self.total:
            return
        self._last_draw = now
        left = max(self.total - done, 0)
        eta = f"{int(left / rate) // 60}:{int(left / rate) % 60:02d}" if rate > 0 else "?"
        self.stream.write(f"\r{self.label}: {format_size(done)} of {format_size(self.total)}"
                          f", {format_size(left)} left, {format_size(int(rate))}/s, "
                          f"ETA {eta}{'; ' + note if note else ''}\033[K")
        self.stream.flush()

    def finish(self, message: str | None = None) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()
