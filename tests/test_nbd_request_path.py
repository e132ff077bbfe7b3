"""Who runs a request (issue 15): the connection's reader appends a WRITE itself when the
device takes it without waiting, and hands the others (FUA, backpressure, a failure) to
the write pool, which reports what the device says. The NBD layer alone, over
MemoryDevice variants."""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudnbd.nbd.device import DeviceError, MemoryDevice
from cloudnbd.nbd.server import NbdServer, ServerSettings
from tests import nbdclient as raw

SIZE = 16 * 2**20


class Recording(MemoryDevice):
    """Records which thread ran each write; pwrite_now can be made to refuse or fail."""

    def __init__(self) -> None:
        super().__init__(SIZE)
        self.calls: list[tuple[str, str]] = []  # (method, thread name)
        self.refuse = False
        self.fail = False

    def pwrite_now(self, buf: memoryview, offset: int) -> bool:
        self.calls.append(("pwrite_now", threading.current_thread().name))
        if self.fail:
            raise DeviceError(errno.EIO, "journal write failed")
        if self.refuse:
            return False
        MemoryDevice.pwrite(self, buf, offset, False)  # not recorded as a pwrite
        return True

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        self.calls.append(("pwrite", threading.current_thread().name))
        if self.fail:
            raise DeviceError(errno.EIO, "journal write failed")
        super().pwrite(buf, offset, fua)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[raw.NbdClient, Recording]]:
    device = Recording()
    server = NbdServer(device, ServerSettings(unix_path=tmp_path / "rec.sock", port=None))
    server.start()
    client = raw.NbdClient.unix(str(server.unix_path))
    client.sock.settimeout(30)
    yield client, device
    client.close()
    server.shutdown(timeout=10)


def test_writes_are_appended_by_the_reader_and_fua_goes_to_the_pool(
        served: tuple[raw.NbdClient, Recording]) -> None:
    client, device = served
    handles = [client.send(raw.CMD_WRITE, i * 4096, 4096, bytes([i]) * 4096)
               for i in range(32)]  # pipelined: parsed from a few receives
    big = client.send(raw.CMD_WRITE, 1 << 20, 256 * 1024, b"b" * 256 * 1024)
    fua = client.send(raw.CMD_WRITE, 2 << 20, 4096, b"f" * 4096, flags=raw.FLAG_FUA)
    assert sorted(client.recv()[:2] for _ in range(34)) == sorted(
        (h, 0) for h in [*handles, big, fua])
    assert device.calls[:33] == [("pwrite_now", "nbd-conn")] * 33  # the reader's
    assert len(device.calls) == 34
    method, thread = device.calls[33]
    assert method == "pwrite" and thread.startswith("nbd-write")  # a pool thread
    for i in range(32):
        assert client.pread(i * 4096, 4096) == bytes([i]) * 4096
    assert client.pread(1 << 20, 256 * 1024) == b"b" * 256 * 1024
    assert client.pread(2 << 20, 4096) == b"f" * 4096


def test_a_write_the_device_cannot_take_at_once_waits_on_the_pool(
        served: tuple[raw.NbdClient, Recording]) -> None:
    client, device = served
    device.refuse = True  # as the engine past --max-dirty
    client.pwrite(b"w" * 8192, 4096)
    assert [m for m, _ in device.calls] == ["pwrite_now", "pwrite"]
    assert client.pread(4096, 8192) == b"w" * 8192


def test_a_failing_append_is_reported_by_the_pool(served: tuple[raw.NbdClient, Recording]
                                                  ) -> None:
    client, device = served
    device.fail = True
    handle = client.send(raw.CMD_WRITE, 0, 4096, b"x" * 4096)
    assert client.recv() == (handle, errno.EIO, b"")
    assert [m for m, _ in device.calls] == ["pwrite_now", "pwrite"]
    device.fail = False
    assert client.pread(0, 4096) == bytes(4096)  # in step, nothing written


class Runs(MemoryDevice):
    """Records the runs of WRITEs the reader hands over; takes at most `take` of each."""

    def __init__(self) -> None:
        super().__init__(SIZE)
        self.runs: list[tuple[int, str]] = []  # (writes in the run, thread name)
        self.pool_writes: list[str] = []
        self.take = 1 << 30

    def pwrite_many_now(self, writes):  # type: ignore[no-untyped-def]
        self.runs.append((len(writes), threading.current_thread().name))
        done = min(self.take, len(writes))
        for buf, offset in writes[:done]:
            MemoryDevice.pwrite(self, buf, offset, False)
        return done

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        self.pool_writes.append(threading.current_thread().name)
        super().pwrite(buf, offset, fua)


def test_pipelined_writes_reach_the_device_in_runs_and_a_refused_tail_goes_to_the_pool(
        tmp_path: Path) -> None:
    device = Runs()
    server = NbdServer(device, ServerSettings(unix_path=tmp_path / "runs.sock", port=None))
    server.start()
    client = raw.NbdClient.unix(str(server.unix_path))
    client.sock.settimeout(30)
    try:
        for round_, take in enumerate((1 << 30, 3)):
            device.runs.clear()
            device.take = take
            data = [bytes([round_ * 32 + i]) * 4096 for i in range(32)]
            handles = list(range(1000 * round_, 1000 * round_ + 32))
            client.sock.sendall(b"".join(  # pipelined in one send: a few receives
                struct.pack(">IHHQQI", raw.REQUEST_MAGIC, 0, raw.CMD_WRITE, handle,
                            i * 4096, 4096) + data[i] for i, handle in enumerate(handles)))
            assert sorted(client.recv()[:2] for _ in range(32)) == sorted(
                (h, 0) for h in handles)
            assert all(thread == "nbd-conn" for _, thread in device.runs)
            assert max(n for n, _ in device.runs) > 1  # several writes per call
            if take > 32:
                assert sum(n for n, _ in device.runs) == 32 and not device.pool_writes
            else:  # what a run could not take was written by the pool
                refused = sum(n - min(n, take) for n, _ in device.runs)
                assert refused and len(device.pool_writes) == refused
                assert all(t.startswith("nbd-write") for t in device.pool_writes)
            for i in range(32):
                assert client.pread(i * 4096, 4096) == data[i]
    finally:
        client.close()
        server.shutdown(timeout=10)
