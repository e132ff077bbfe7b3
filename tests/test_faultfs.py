"""FaultFS, the power-loss file layer, forgets exactly what its rules say it may: the
campaign is only as good as this."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudnbd.engine import localfs
from tests.faultfs import SECTOR, FaultFS, Policy, PowerIsOff

pytestmark = pytest.mark.unit  # in-process: no servers, no subprocesses


def _create(path: Path, data: bytes) -> int:
    fd = localfs.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    localfs.pwritev(fd, [data], 0)
    return fd


def test_unsynced_data_is_dropped_and_fsynced_data_kept(tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(b"A" * 4096)  # there before: durable
    fs = FaultFS(tmp_path)
    with localfs.installed(fs):
        fd = localfs.open(tmp_path / "old", os.O_RDWR)
        localfs.pwritev(fd, [b"B" * 1024], 0)
        localfs.fsync(fd)
        localfs.pwritev(fd, [b"C" * 1024], 1024)  # never fsync'd
        localfs.pwritev(fd, [b"D" * 100], 4096)  # grows the file, never fsync'd
        assert (tmp_path / "old").read_bytes()[1024:2048] == b"C" * 1024  # page cache
        fs.power_loss(Policy.DROP)
        with pytest.raises(PowerIsOff):
            localfs.pwritev(fd, [b"E"], 0)
        localfs.close(fd)
    fs.materialize()
    assert (tmp_path / "old").read_bytes() == b"B" * 1024 + b"A" * 3072


def test_keep_policy_keeps_everything_written(tmp_path: Path) -> None:
    fs = FaultFS(tmp_path)
    with localfs.installed(fs):
        localfs.mkdir(tmp_path / "d")
        localfs.close(_create(tmp_path / "d" / "f", b"xyz" * 1000))
        fs.power_loss(Policy.KEEP)
    fs.materialize()
    assert (tmp_path / "d" / "f").read_bytes() == b"xyz" * 1000


def test_a_new_name_needs_a_directory_fsync(tmp_path: Path) -> None:
    fs = FaultFS(tmp_path)
    with localfs.installed(fs):
        fd = _create(tmp_path / "f", b"data")
        localfs.fsync(fd)  # the data is durable, the name is not
        localfs.close(fd)
        fs.power_loss(Policy.DROP)
    fs.materialize()
    assert not (tmp_path / "f").exists()
    with localfs.installed(fs):
        fd = _create(tmp_path / "f", b"data")
        localfs.fsync(fd)
        localfs.close(fd)
        localfs.fsync_dir(tmp_path)
        fs.power_loss(Policy.DROP)
    fs.materialize()
    assert (tmp_path / "f").read_bytes() == b"data"


def test_renames_and_unlinks_survive_only_in_order(tmp_path: Path) -> None:
    """Directory operations since the last directory fsync survive as a prefix."""
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    seen = set()
    for seed in range(40):
        fs = FaultFS(tmp_path, seed=seed)
        with localfs.installed(fs):
            localfs.unlink(tmp_path / "a")  # op 1
            localfs.replace(tmp_path / "b", tmp_path / "c")  # op 2
            fs.power_loss(Policy.MIX)
        names = tuple(sorted(name for name in fs.image()))
        assert names in {("a", "b"), ("b",), ("c",)}  # never ("a", "c"): not a prefix
        seen.add(names)
        fs.materialize()
        for name in names:
            (tmp_path / name).unlink()
        (tmp_path / "a").write_bytes(b"a")
        (tmp_path / "b").write_bytes(b"b")
    assert len(seen) == 3


def test_mixed_power_loss_keeps_each_sector_at_one_of_its_versions(tmp_path: Path) -> None:
    """Every 512-byte sector holds a version it had; sectors tear apart from each other;
    the size is one the file had."""
    size = 8 * SECTOR
    durable = b"0" * size
    (tmp_path / "f").write_bytes(durable)
    versions_seen: set[bytes] = set()
    for seed in range(30):
        fs = FaultFS(tmp_path, seed=seed)
        with localfs.installed(fs):
            fd = localfs.open(tmp_path / "f", os.O_RDWR)
            localfs.pwritev(fd, [b"1" * size], 0)
            localfs.pwritev(fd, [b"2" * (size // 2)], size // 4)
            localfs.pwritev(fd, [b"3" * SECTOR], size)  # grows by one sector
            localfs.close(fd)
            fs.power_loss(Policy.MIX)
        got = fs.image()["f"]
        assert got is not None and len(got) in (size, size + SECTOR)
        for i in range(len(got) // SECTOR):
            sector = got[i * SECTOR:(i + 1) * SECTOR]
            allowed = {b"0" * SECTOR, b"1" * SECTOR}
            if size // 4 <= i * SECTOR < 3 * size // 4:
                allowed.add(b"2" * SECTOR)
            if i * SECTOR >= size:
                allowed = {bytes(SECTOR), b"3" * SECTOR}
            assert sector in allowed, (seed, i, sector[:4])
            versions_seen.add(sector[:1])
        fs.materialize()
        (tmp_path / "f").write_bytes(durable)
    assert versions_seen >= {b"0", b"1", b"2", b"3"}


def test_armed_cut_happens_instead_of_the_nth_operation(tmp_path: Path) -> None:
    fs = FaultFS(tmp_path)
    cuts = []
    fs.on_power_loss = lambda: cuts.append(fs.mutations)
    with localfs.installed(fs):
        fd = _create(tmp_path / "f", b"1")  # mutations 1 and 2
        localfs.fsync(fd)  # 3
        localfs.fsync_dir(tmp_path)  # 4
        fs.arm(2)
        localfs.pwritev(fd, [b"2"], 0)  # 5
        with pytest.raises(PowerIsOff):
            localfs.pwritev(fd, [b"3"], 0)  # 6: the power goes instead
        with pytest.raises(PowerIsOff):
            localfs.open(tmp_path / "f", os.O_RDONLY)
        localfs.close(fd)
    assert cuts == [6]
    assert fs.image()["f"] in (b"1", b"2")  # "3" never happened
    fs.materialize()
    assert not fs.dead
