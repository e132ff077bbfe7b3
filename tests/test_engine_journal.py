"""The journal: records survive reopening, torn tails are dropped, segments are reclaimed
oldest first (journal invariants J2, J3)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cloudnbd.engine import localfs
from cloudnbd.engine.journal import HEADER_BYTES, Journal, Kind
from cloudnbd.engine.localfs import OsLayer
from tests.faultfs import FaultFS, Policy

pytestmark = pytest.mark.unit  # in-process: no servers, no subprocesses


def _write(journal: Journal, offset: int, data: bytes) -> tuple[int, int, int]:
    return journal.append(Kind.WRITE, offset, len(data), data)


def test_records_come_back_in_order_with_their_data(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", segment_bytes=4096)
    written = [(i * 512, os.urandom(300 + i)) for i in range(20)]
    for offset, data in written:
        _write(journal, offset, data)
    journal.append(Kind.ZERO, 1 << 40, 1 << 30)
    journal.close()

    reopened = Journal(tmp_path / "j", segment_bytes=4096)
    records = list(reopened.recover())
    assert len(reopened.segments_on_disk()) > 1  # the test crossed segment boundaries
    assert [r.seq for r in records] == list(range(1, 22))
    for record, (offset, data) in zip(records[:-1], written, strict=True):
        assert record.kind == Kind.WRITE and record.offset == offset
        fd = os.open(reopened.path(record.segment), os.O_RDONLY)
        assert os.pread(fd, record.length, record.data_pos) == data
        os.close(fd)
    assert records[-1].kind == Kind.ZERO and records[-1].length == 1 << 30
    assert reopened.next_seq == 22


def test_a_run_of_writes_is_one_pwritev_per_segment_and_recovers_as_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """append_writes: the run's records go out in as few pwritev calls as the segments
    (and BATCH_RECORDS) allow, numbered in order, and read back as single appends do."""
    from cloudnbd.engine import journal as journal_module

    monkeypatch.setattr(journal_module, "BATCH_RECORDS", 8)
    calls: list[int] = []

    class Counting(OsLayer):
        def pwritev(self, fd: int, buffers, offset: int) -> int:  # type: ignore[no-untyped-def,override]
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
                calls.append(len(buffers))  # this journal's, not another test's engine
            return os.pwritev(fd, buffers, offset)

    segment_bytes = 6 * (HEADER_BYTES + 500)  # six records of 500 bytes per segment
    journal = Journal(tmp_path / "j", segment_bytes=segment_bytes)
    writes = [(os.urandom(500), i * 4096) for i in range(20)]
    placed: list[tuple[int, int, int]] = []
    with localfs.installed(Counting()):
        while len(placed) < len(writes):
            placed += journal.append_writes(writes[len(placed):])
    assert [seq for seq, _, _ in placed] == list(range(1, 21))
    assert [segment for _, segment, _ in placed] == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 2
    assert calls == [18, 18, 18, 6]  # three buffers a record, one call per segment
    journal.close()
    records = list(Journal(tmp_path / "j", segment_bytes=segment_bytes).recover())
    assert [(r.seq, r.segment, r.data_pos) for r in records] == placed
    for record, (data, offset) in zip(records, writes, strict=True):
        assert record.kind == Kind.WRITE and record.offset == offset
        fd = os.open(tmp_path / "j" / f"{record.segment:016x}.log", os.O_RDONLY)
        assert os.pread(fd, record.length, record.data_pos) == data
        os.close(fd)

    monkeypatch.setattr(journal_module, "BATCH_RECORDS", 4)
    journal = Journal(tmp_path / "k")
    assert len(journal.append_writes(writes)) == 4  # at most BATCH_RECORDS a call


def test_torn_tail_and_bad_crc_are_dropped(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    for i in range(5):
        _write(journal, i * 4096, bytes([i + 1]) * 4096)
    journal.close()
    segment = Journal(tmp_path / "j").segments_on_disk()[0]
    path = tmp_path / "j" / f"{segment:016x}.log"
    record_bytes = HEADER_BYTES + 4096
    with open(path, "r+b") as f:  # corrupt one byte of record 4's data, tear record 5
        f.seek(3 * record_bytes + HEADER_BYTES + 100)
        f.write(b"\xff")
        f.truncate(4 * record_bytes + 50)
    records = list(Journal(tmp_path / "j").recover())
    assert [r.seq for r in records] == [1, 2, 3]


def test_appends_after_recovery_go_to_a_new_segment(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    _write(journal, 0, b"a" * 10)
    journal.close()
    with open(tmp_path / "j" / f"{0:016x}.log", "ab") as f:
        f.write(b"garbage that looks like nothing")
    again = Journal(tmp_path / "j")
    assert [r.seq for r in again.recover()] == [1]
    seq, segment, _ = _write(again, 0, b"b" * 10)
    assert (seq, segment) == (2, 1)
    again.close()
    assert [r.seq for r in Journal(tmp_path / "j").recover()] == [1, 2]


def test_segments_are_deleted_oldest_first_only(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", segment_bytes=HEADER_BYTES + 100)
    placed = [_write(journal, 0, b"x" * 100) for _ in range(4)]  # one record per segment
    segments = [segment for _, segment, _ in placed]
    assert segments == [0, 1, 2, 3]
    journal.account({s: 100 for s in segments}, {})
    journal.account({}, {1: 100, 2: 100})  # newer segments dead, the oldest still live
    assert journal.segments_on_disk() == [0, 1, 2, 3]  # J2: nothing skips the oldest
    journal.pin({1})
    journal.account({}, {0: 100})
    assert journal.segments_on_disk() == [1, 2, 3]  # 1 is pinned by a reader
    journal.unpin({1})
    assert journal.segments_on_disk() == [3]  # the active segment stays
    journal.account({}, {3: 100})
    journal.reset()
    assert journal.segments_on_disk() == []


class _FailingUnlink(OsLayer):
    """The real file calls, except that removing paths ending in `failing` fails (EIO)."""

    def __init__(self, failing: str) -> None:
        self.failing = failing

    def unlink(self, path: str | os.PathLike[str]) -> None:  # type: ignore[override]
        if str(path).endswith(self.failing):
            raise OSError(errno.EIO, "injected I/O error")
        os.unlink(path)


def test_a_failed_deletion_stops_every_later_one(tmp_path: Path) -> None:
    """J2: were segment 1 deleted after segment 0 failed to go, a crash could leave 0
    without 1, and replaying 0's older writes would roll back what 1 had overwritten."""
    journal = Journal(tmp_path / "j", segment_bytes=HEADER_BYTES + 100)
    placed = [_write(journal, 0, bytes([i]) * 100) for i in range(4)]
    segments = [segment for _, segment, _ in placed]
    assert segments == [0, 1, 2, 3]  # 3 is the active one
    journal.account({s: 100 for s in segments}, {})
    with localfs.installed(_FailingUnlink(f"{0:016x}.log")):
        journal.account({}, {0: 100, 1: 100})  # logged, not raised into the caller
    assert journal.segments_on_disk() == [0, 1, 2, 3]
    journal.account({}, {2: 100})
    assert journal.segments_on_disk() == [0, 1, 2, 3]  # nothing more deleted this run
    journal.close()
    assert [r.seq for r in Journal(tmp_path / "j").recover()] == [1, 2, 3, 4]


def test_a_new_journal_survives_a_power_loss_with_its_synced_records(tmp_path: Path) -> None:
    """J2: the journal directory's own name is durable before a record relies on it. The
    power-loss campaign (seed 1) lost a journal made by the first open: its segments
    were fsync'd into journal/, but journal/ itself was never fsync'd into the cache
    directory, so the power loss took them all, and with them FLUSHed writes that only
    the store's journal objects still held (an open on this machine trusts its own)."""
    fs = FaultFS(tmp_path)
    with localfs.installed(fs):
        journal = Journal(tmp_path / "cache" / "journal")
        _write(journal, 0, b"flushed")
        journal.sync()  # what an upload or a FUA does before the store sees the record
        fs.power_loss(Policy.DROP)
        journal.close()
    fs.materialize()
    assert [r.seq for r in Journal(tmp_path / "cache" / "journal").recover()] == [1]


def test_records_checksummed_by_either_crc32_read_back_by_the_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal's CRC-32 comes from zlib-ng when it is installed, else from zlib:
    the same function, so a journal written with one is read with the other."""
    import zlib

    from zlib_ng.zlib_ng import crc32 as ng_crc32

    from cloudnbd.engine import journal as journal_module

    data = os.urandom(300_000)
    assert journal_module.crc32 is ng_crc32  # the fast one is what the journal uses
    assert ng_crc32(memoryview(data)[7:], 12345) == zlib.crc32(data[7:], 12345)
    for writer, reader in ((ng_crc32, zlib.crc32), (zlib.crc32, ng_crc32)):
        directory = tmp_path / writer.__module__
        monkeypatch.setattr(journal_module, "crc32", writer)
        journal = Journal(directory)
        _write(journal, 4096, data)
        journal.close()
        monkeypatch.setattr(journal_module, "crc32", reader)
        records = list(Journal(directory).recover())
        assert [(r.seq, r.offset, r.length) for r in records] == [(1, 4096, len(data))]
