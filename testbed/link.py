"""A slow network link for relays: added round-trip time and a bandwidth cap per direction.

Used by tests.servers.FaultProxy (its `link` argument) so that tests and benchmarks can
put cloudnbd, or a contender, behind a link such as 80 ms RTT and 20 Mbit/s to the store.

Model: every byte crossing the link in one direction waits half the round-trip time (the
propagation delay), then queues for the direction's transmitter, which sends at `rate`
bytes per second. One transmitter per direction is shared by every connection through
the link, as a home uplink is shared by all of a machine's connections, so N parallel
PUTs share the rate rather than each getting it. Each connection buffers at most
BUFFER_CHUNKS reads in the link; beyond that its sender is held back by TCP, so a
client cannot "send" faster than the link drains.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

READ_BYTES = 16 * 1024  # small reads keep the cap smooth at a few Mbit/s
# ...but every read costs a wake-up and a sleep, so at high rates a read carries up to
# READ_SECONDS of the cap: at 200 Mbit/s, 16 KiB reads held one connection to 14 MB/s.
READ_SECONDS = 0.002
BUFFER_CHUNKS = 32  # per connection and direction: 512 KiB in the link at most
# How late a sender may be without the link losing that time: a thread woken a little
# after its bytes left (a busy machine) must not leave the link idle meanwhile, or one
# connection at 200 Mbit/s got 40% of the cap.
SLACK = 0.005


@dataclass
class _Transmitter:
    """Serialises one direction's bytes at rate bytes/s (None: unlimited)."""

    rate: float | None
    _free_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0

    def transmit(self, nbytes: int) -> None:
        """Return when nbytes have left the link: after the bytes queued before them."""
        with self._lock:
            self.sent += nbytes
            if self.rate is None:
                return
            done = self.reserve(nbytes, time.monotonic())
        _sleep_until(done)

    def reserve(self, nbytes: int, now: float) -> float:
        """When nbytes handed over at `now` will have left (lock held): right after the
        bytes before them; a sender less than SLACK late is counted as on time, and an
        idle link banks nothing."""
        assert self.rate is not None
        start = self._free_at if now < self._free_at + SLACK else now
        self._free_at = start + nbytes / self.rate
        return self._free_at


def _sleep_until(deadline: float) -> None:
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(left)


class Link:
    """Round-trip time rtt (seconds) and caps up (client to store) and down (store to
    client) in bytes per second; None means no cap."""

    def __init__(self, rtt: float = 0.0, up: float | None = None,
                 down: float | None = None) -> None:
        self.rtt = rtt
        self.up = _Transmitter(up)
        self.down = _Transmitter(down)

    @classmethod
    def mbit(cls, rtt_ms: float, mbit_per_s: float) -> Link:
        """A symmetric link: rtt in milliseconds, both directions capped at mbit_per_s."""
        rate = mbit_per_s * 1e6 / 8
        return cls(rtt_ms / 1000, rate, rate)

    def pipe(self, src: socket.socket, dst: socket.socket, upstream: bool,
             on_data: Callable[[bytes], None] | None = None) -> None:
        """Move bytes from src to dst through the link until src closes; on_data sees
        each read as it enters the link. Returns once everything was delivered; an error
        reading src is raised after what was read before it is delivered."""
        transmitter = self.up if upstream else self.down
        delay = self.rtt / 2
        line: queue.Queue[tuple[float, bytes] | None] = queue.Queue(BUFFER_CHUNKS)

        def deliver() -> None:
            broken = False
            while (item := line.get()) is not None:
                if broken:
                    continue  # keep draining so the reader never blocks on a full line
                entered, data = item
                _sleep_until(entered + delay)
                transmitter.transmit(len(data))
                try:
                    dst.sendall(data)
                except OSError:
                    broken = True

        sender = threading.Thread(target=deliver, daemon=True)
        sender.start()
        try:
            size = max(READ_BYTES, int((transmitter.rate or 0) * READ_SECONDS))
            while data := src.recv(size):
                if on_data is not None:
                    on_data(data)
                line.put((time.monotonic(), data))
        finally:
            line.put(None)
            sender.join()
