"""Load campaign (tests/load_harness.py): several clients at queue depth 64 with
--max-dirty 64 MiB and the uploads throttled by the relay's link.

Stated bounds (docs/reliability.md, "6. Load"):
- every request is answered within latency_bound(): twice the time to push every chunk
  of the volume (plus the 4 uploads that may be in flight) through the link, plus 10 s;
  fast tier 128 MiB at 8 MiB/s: 46 s; long tier 256 MiB at 4 MiB/s: 146 s;
- a read-only client, whose reads are all local, answers 99% of them within the time
  one chunk takes to cross the link (reader_bound(): 0.5 s fast, 1 s long);
- the PSS of all cloudnbd processes stays under memory_bound(): their idle PSS in the
  same run plus 8 MiB of payload per connection, 12 MiB per transfer in flight (4) and
  8 MiB of heap; the long run's second half peaks less than 8 MiB above its first;
- every READ returns exactly what was written, and after close the store holds exactly
  what every client wrote last.
"""

from __future__ import annotations

import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudnbd.nbd import server as server_module
from cloudnbd.nbd.device import MemoryDevice
from cloudnbd.nbd.server import MAX_IN_FLIGHT_BYTES, RECV_BUFFER, NbdServer, ServerSettings
from tests.load_harness import LoadSettings, check, run_load
from tests.nbdclient import CMD_READ, CMD_WRITE, NbdClient


def test_load_fast_tier(tmp_path: Path, password_file: Path,
                        request: pytest.FixtureRequest) -> None:
    report = run_load(LoadSettings(clients=4, seconds=20, seed=1), tmp_path, password_file,
                      request)
    print(report.summary())
    print(report.details())
    check(report)


@pytest.mark.slow
def test_load_long_tier(tmp_path: Path, password_file: Path,
                        request: pytest.FixtureRequest) -> None:
    settings = LoadSettings(clients=6, seconds=300, volume_mib=256, up_mib_s=4.0,
                            down_mib_s=16.0, rtt=0.04, cache_size="64MiB", seed=2,
                            mix=("mixed", "bulk", "reader", "scatter"))
    report = run_load(settings, tmp_path, password_file, request)
    print(report.summary())
    print(report.details())
    check(report, long_run=True)


# -- the NBD server's own queueing, over an in-process device that holds writes ----------

class HeldWrites(MemoryDevice):
    """Writes wait until the test opens the gate, as writes wait for room past
    --max-dirty; reads are served at once."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = threading.Event()
        self.waiting = 0
        self.lock = threading.Lock()

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        with self.lock:
            self.waiting += 1
        self.gate.wait(timeout=120)
        super().pwrite(buf, offset, fua)

    def pwrite_now(self, buf: memoryview, offset: int) -> bool:
        return False  # as the engine's writes past --max-dirty: they must wait


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[NbdServer, HeldWrites]]:
    device = HeldWrites(256 * 2**20)
    server = NbdServer(device, ServerSettings(unix_path=tmp_path / "held.sock"))
    server.start()
    yield server, device
    device.gate.set()
    server.shutdown(timeout=30)


def _connect(server: NbdServer) -> NbdClient:
    return NbdClient.unix(str(server.unix_path))


def _until(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_reads_of_one_client_do_not_wait_behind_anothers_held_writes(
        held: tuple[NbdServer, HeldWrites]) -> None:
    server, device = held
    writer, reader = _connect(server), _connect(server)
    writes = [writer.send(CMD_WRITE, i * 4096, 4096, bytes(4096)) for i in range(60)]
    _until(lambda: device.waiting >= 32, "the writes to reach the device")
    read = reader.send(CMD_READ, 0, 4096)
    reader.sock.settimeout(10)  # far longer than a read from memory takes
    assert reader.recv(4096)[:2] == (read, 0)  # while every write is still held
    device.gate.set()
    assert sorted(writer.recv()[0] for _ in writes) == writes


def _reader_stopped(server: NbdServer) -> bool:
    """True once a connection's reader thread is blocked: reserving in-flight room, or
    writing a streamed request's piece to the held device."""
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        if names.get(ident) != "nbd-conn":
            continue
        while frame is not None:
            if (frame.f_code.co_name in ("_room", "_reserve_alone")
                    or frame.f_code is HeldWrites.pwrite.__code__):
                return True
            frame = frame.f_back
    return False


@pytest.mark.parametrize(("request_mib", "count"), [(4, 64), (32, 4), (100, 2)])
def test_payload_held_per_connection_stays_within_its_bound(
        held: tuple[NbdServer, HeldWrites], request_mib: int, count: int) -> None:
    """A client sending large writes at QD64 to a device that holds them: the server
    buffers at most MAX_IN_FLIGHT_BYTES of payload per connection (a larger request is
    streamed in pieces of that size), besides its receive buffer, and allocates nothing
    for a request it is not ready to take."""
    server, device = held
    client = _connect(server)
    payload = bytes(request_mib * 2**20)
    tracemalloc.start()
    try:
        sender = threading.Thread(target=lambda: [
            client.send(CMD_WRITE, i * len(payload) % (128 * 2**20), len(payload), payload)
            for i in range(count)], daemon=True)
        sender.start()
        _until(lambda: _reader_stopped(server), "the server to stop reading")
        held_bytes = sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, server_module.__file__)]).statistics("filename"))
    finally:
        tracemalloc.stop()
    bound = MAX_IN_FLIGHT_BYTES + RECV_BUFFER
    assert MAX_IN_FLIGHT_BYTES <= held_bytes < bound + 2**20, (held_bytes, bound)
    device.gate.set()
    sender.join(timeout=60)
    for _ in range(count):
        assert client.recv()[1] == 0
