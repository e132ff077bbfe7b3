"""One client of the load campaign (tests/load_harness.py), run as its own process:

    python -m tests.load_client SPEC_JSON      (stdin: one line "go"; stdout: JSON report)

It opens one NBD connection (Unix socket), prints "ready", waits for "go" so that every
client starts at once, then keeps `depth` requests in flight for `seconds`: a random mix
of WRITE (some with FUA), READ, WRITE_ZEROES, TRIM and FLUSH on its own region of the
disk. A sender thread and a receiver thread share the socket, as real clients do: a
client that stops reading replies while it is blocked sending would deadlock against any
server that bounds what it buffers.

Known contents. Requests of one client never overlap a request of it still in flight,
and regions of different clients are disjoint, so the contents of every sector are
known exactly at every moment: every READ is checked sector by sector, and the final
model (one sector id per sector, 0 for zeros) is written out for the check after close.
Sector contents are incompressible (a slice of a seeded random pool, see sector_bytes),
so uploads carry their full size through the throttled link.

Latency is measured per request from just before its header is sent to the end of its
reply (a request the server does not read yet, because of backpressure, is waiting).
"""

from __future__ import annotations

import json
import math
import random
import socket
import struct
import sys
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from tests.nbdclient import (
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_ZEROES,
    FLAG_FUA,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    NbdClient,
)

SECTOR = 4096
ZERO = bytes(SECTOR)
POOL_BYTES = 32 * 2**20
BUCKET_RATIO = 1.05
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
KINDS = ("write", "fua", "read", "zero", "trim", "flush")


def make_pool(seed: int) -> bytes:
    """The random bytes sector contents are cut from (the same for every client of a
    campaign, so the checker can rebuild any sector)."""
    return random.Random(seed).randbytes(POOL_BYTES)


def sector_bytes(pool: bytes, sector_id: int) -> bytes:
    """Contents of the sector written with sector_id: the id, then 4088 bytes of the pool
    at a place the id picks. Incompressible for zstd (the pool is random and much larger
    than its window), cheap to make and to check."""
    if sector_id == 0:
        return ZERO
    at = (sector_id * 0x9E3779B97F4A7C15) % (POOL_BYTES - SECTOR)
    return sector_id.to_bytes(8, "little") + pool[at:at + SECTOR - 8]


@dataclass(frozen=True)
class Spec:
    """What one client does; every field is plain JSON."""

    socket: str
    client: int  # index among the campaign's clients; part of every sector id
    first_sector: int
    sectors: int
    seconds: float
    depth: int
    seed: int
    pool_seed: int
    max_write_sectors: int  # largest WRITE / READ / WRITE_ZEROES, in sectors
    weights: dict[str, float]  # relative frequency of each of KINDS
    model_path: str  # where the final sector ids go (array of uint64, native order)
    drain_timeout: float  # after `seconds`, how long the last replies may take


@dataclass
class _Pending:
    kind: str
    first: int  # sector within the region
    count: int
    sent: float


class LoadClient:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.pool = make_pool(spec.pool_seed)
        self.model = array("Q", bytes(8 * spec.sectors))  # a fresh volume reads zeros
        self.busy = bytearray(spec.sectors)
        self.pending: dict[int, _Pending] = {}
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(spec.depth)
        self.freed = threading.Condition(self.lock)  # a reply freed sectors
        self.latencies: dict[str, list[float]] = {kind: [] for kind in KINDS}
        self.failures: list[str] = []
        self.handle = 0
        self.counter = 0
        self.bytes_written = 0
        self.bytes_read = 0
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(spec.socket)
        self.nbd = NbdClient(sock)
        self.sock = sock
        self.choices = [k for k in KINDS if spec.weights.get(k, 0) > 0]
        self.weights = [spec.weights[k] for k in self.choices]

    # -- the workload ----------------------------------------------------------------------
    def _size(self) -> int:
        """Mostly small requests, a few up to max_write_sectors (log-uniform)."""
        top = self.spec.max_write_sectors
        return max(1, min(top, int(2 ** self.rng.uniform(0, top.bit_length() - 1))))

    def _free_range(self, count: int) -> int | None:
        """A start sector whose `count` sectors no in-flight request touches (lock held)."""
        for _ in range(8):
            first = self.rng.randrange(0, self.spec.sectors - count + 1)
            if not any(self.busy[first:first + count]):
                return first
        return None

    def _next_sector_id(self, index: int) -> int:
        return (self.spec.client << 48) | (self.counter << 16) | index

    def _build(self) -> tuple[int, bytes, _Pending] | None:
        """Choose the next request (lock held): its header, payload and record; None
        when the range drawn is crowded with requests in flight."""
        kind = self.rng.choices(self.choices, self.weights)[0]
        count = 0 if kind == "flush" else self._size()
        first = 0
        if count:
            found = self._free_range(count)
            if found is None:
                return None
            first = found
        self.handle += 1
        payload = b""
        offset = (self.spec.first_sector + first) * SECTOR
        if kind in ("write", "fua"):
            self.counter += 1
            ids = [self._next_sector_id(i) for i in range(count)]
            payload = b"".join(sector_bytes(self.pool, i) for i in ids)
            self.model[first:first + count] = array("Q", ids)
            self.bytes_written += len(payload)
        elif kind in ("zero", "trim"):
            self.model[first:first + count] = array("Q", bytes(8 * count))
        elif kind == "read":
            self.bytes_read += count * SECTOR
        command = {"write": CMD_WRITE, "fua": CMD_WRITE, "read": CMD_READ,
                   "zero": CMD_ZEROES, "trim": CMD_TRIM, "flush": CMD_FLUSH}[kind]
        flags = FLAG_FUA if kind == "fua" else 0
        header = _REQUEST.pack(REQUEST_MAGIC, flags, command, self.handle,
                               offset if count else 0, count * SECTOR)
        self.busy[first:first + count] = b"\1" * count
        return self.handle, header + payload, _Pending(kind, first, count, 0.0)

    def send_loop(self) -> None:
        deadline = time.monotonic() + self.spec.seconds
        while time.monotonic() < deadline and not self.failures:
            self.slots.acquire()
            with self.lock:
                while (built := self._build()) is None:
                    self.freed.wait(timeout=1.0)
                handle, message, record = built
                record.sent = time.monotonic()
                self.pending[handle] = record
            self.sock.sendall(message)
        give_up = time.monotonic() + self.spec.drain_timeout
        for _ in range(self.spec.depth):  # every reply is in
            if not self.slots.acquire(timeout=max(0.0, give_up - time.monotonic())):
                with self.lock:
                    waiting = sorted(r.kind for r in self.pending.values())
                    self.failures.append(f"{len(waiting)} requests unanswered "
                                         f"{self.spec.drain_timeout:.0f} s after the "
                                         f"end: {waiting[:10]}")
                return

    def receive_loop(self) -> None:
        header = bytearray(_REPLY.size)
        try:
            while True:
                _recv_into(self.sock, memoryview(header))
                magic, error, handle = _REPLY.unpack(header)
                if magic != SIMPLE_REPLY_MAGIC:
                    raise ConnectionError(f"bad reply magic {magic:#x}")
                with self.lock:
                    record = self.pending.pop(handle)
                data = b""
                if record.kind == "read" and not error:
                    data = bytearray(record.count * SECTOR)
                    _recv_into(self.sock, memoryview(data))
                done = time.monotonic()
                with self.lock:
                    self.latencies[record.kind].append(done - record.sent)
                    if error:
                        self.failures.append(f"{record.kind} at sector "
                                             f"{record.first}+{record.count}: errno {error}")
                    elif record.kind == "read":
                        self._check(record.first, data)
                    self.busy[record.first:record.first + record.count] = bytes(record.count)
                    self.freed.notify()
                self.slots.release()
        except (OSError, ConnectionError, KeyError) as exc:
            with self.lock:
                if self.pending or not isinstance(exc, ConnectionError):
                    self.failures.append(f"connection failed: {exc!r}")
            for _ in range(self.spec.depth):
                self.slots.release()  # unblock the sender

    def _check(self, first: int, data: bytes) -> None:
        for i in range(len(data) // SECTOR):
            want = sector_bytes(self.pool, self.model[first + i])
            if data[i * SECTOR:(i + 1) * SECTOR] != want:
                got = int.from_bytes(data[i * SECTOR:i * SECTOR + 8], "little")
                self.failures.append(
                    f"read of sector {self.spec.first_sector + first + i}: expected id "
                    f"{self.model[first + i]:#x}, got data starting {got:#x}")
                return

    def run(self) -> dict[str, object]:
        receiver = threading.Thread(target=self.receive_loop, daemon=True)
        receiver.start()
        started = time.monotonic()
        self.send_loop()
        seconds = time.monotonic() - started
        self.sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        receiver.join(timeout=60)
        self.sock.close()
        Path(self.spec.model_path).write_bytes(self.model.tobytes())
        return {"client": self.spec.client, "seconds": seconds,
                "latency": {kind: summarise(values)
                            for kind, values in self.latencies.items()},
                "failures": self.failures[:20], "failure_count": len(self.failures),
                "bytes_written": self.bytes_written, "bytes_read": self.bytes_read}


def bucket(seconds: float) -> int:
    """Histogram bucket of a latency: 5% wide, from 10 us."""
    return max(0, int(math.log(max(seconds, 1e-5) / 1e-5) / math.log(BUCKET_RATIO)))


def bucket_top(index: int) -> float:
    return 1e-5 * BUCKET_RATIO ** (index + 1)


def summarise(values: list[float]) -> dict[str, object]:
    """Count, exact max and a histogram that merges across clients (keys: bucket)."""
    histogram: dict[str, int] = {}
    for value in values:
        key = str(bucket(value))
        histogram[key] = histogram.get(key, 0) + 1
    return {"count": len(values), "max": max(values, default=0.0),
            "histogram": histogram}


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        got = sock.recv_into(view)
        if not got:
            raise ConnectionError("server closed the connection")
        view = view[got:]


def main() -> None:
    spec = Spec(**json.loads(sys.argv[1]))
    client = LoadClient(spec)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    print(json.dumps(client.run()), flush=True)


if __name__ == "__main__":
    main()
