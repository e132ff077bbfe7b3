"""Volume metadata and operations on the file backend: the logic, not the transports
(tests/test_cli.py runs the same operations over every backend)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cloudnbd import offline, volume
from cloudnbd.backends.file import FileStore
from cloudnbd.chunks import chunk_index, chunk_key
from cloudnbd.codec import ScryptParams
from cloudnbd.errors import (
    IntegrityError,
    UnsupportedFormat,
    UsageError,
    VolumeExists,
    VolumeNotFound,
    WrongPassword,
)

pytestmark = pytest.mark.unit  # in-process: no servers, no subprocesses

FAST = ScryptParams(n=2**10)
CHUNK = 64 * 1024


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    (tmp_path / "bucket").mkdir()  # the directory that plays the bucket must exist
    return FileStore(tmp_path / "bucket" / "vol")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_create_then_unlock(store: FileStore) -> None:
    created = volume.create(store, 10 * CHUNK, CHUNK, "pw", FAST)
    opened = volume.unlock(store, "pw")
    assert opened.meta == created.meta
    assert opened.keys == created.keys
    assert opened.meta.chunk_count == 10


def test_create_refuses_existing_volume_and_changes_nothing(store: FileStore) -> None:
    volume.create(store, 10 * CHUNK, CHUNK, "pw", FAST)
    before = _snapshot(store.root)
    with pytest.raises(VolumeExists):
        volume.create(store, 20 * CHUNK, CHUNK, "other", FAST)
    assert _snapshot(store.root) == before


def test_wrong_password(store: FileStore) -> None:
    volume.create(store, 10 * CHUNK, CHUNK, "pw", FAST)
    with pytest.raises(WrongPassword):
        volume.unlock(store, "not it")


def test_missing_volume(store: FileStore) -> None:
    with pytest.raises(VolumeNotFound):
        volume.unlock(store, "pw")


@pytest.mark.parametrize("field,value", [("size", 20 * CHUNK), ("chunk_size", 2 * CHUNK),
                                         ("generation", 99), ("created", "yesterday")])
def test_tampered_metadata_is_refused(store: FileStore, field: str, value: object) -> None:
    volume.create(store, 10 * CHUNK, CHUNK, "pw", FAST)
    doc = json.loads(store.get(volume.METADATA_KEY))
    doc[field] = value
    store.put(volume.METADATA_KEY, json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match="modified"):
        volume.unlock(store, "pw")


def test_absurd_kdf_parameters_are_refused_before_running_the_kdf(store: FileStore) -> None:
    volume.create(store, 10 * CHUNK, CHUNK, "pw", FAST)
    doc = json.loads(store.get(volume.METADATA_KEY))
    doc["key_slots"][0]["n"] = 2**40
    store.put(volume.METADATA_KEY, json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match="out of range"):
        volume.unlock(store, "pw")


def test_newer_format_version_is_refused_with_a_clear_message(store: FileStore) -> None:
    volume.create(store, 10 * CHUNK, CHUNK, "pw", FAST)
    doc = json.loads(store.get(volume.METADATA_KEY))
    doc["version"] = volume.FORMAT_VERSION + 1
    store.put(volume.METADATA_KEY, json.dumps(doc).encode())
    with pytest.raises(UnsupportedFormat, match="newer than this cloudnbd"):
        volume.read_metadata(store)


@pytest.mark.parametrize("field,value", [("cipher", "chacha20-poly1305"),
                                         ("compression", "lz4"), ("cipher", None)])
def test_unknown_cipher_or_compression_is_refused_before_the_password(
        store: FileStore, field: str, value: object) -> None:
    volume.create(store, 10 * CHUNK, CHUNK, "pw", FAST)
    doc = json.loads(store.get(volume.METADATA_KEY))
    if value is None:
        del doc[field]
    else:
        doc[field] = value
    store.put(volume.METADATA_KEY, json.dumps(doc).encode())
    with pytest.raises(UnsupportedFormat) as info:
        volume.read_metadata(store)
    assert f"{field} {value!r}" in info.value.message and "\n" not in info.value.message


def test_not_a_volume(store: FileStore) -> None:
    store.put(volume.METADATA_KEY, b"<html>")
    with pytest.raises(UnsupportedFormat):
        volume.read_metadata(store)


def test_password_change_rewrites_only_the_metadata(store: FileStore) -> None:
    vol = volume.create(store, 10 * CHUNK, CHUNK, "old", FAST)
    for index in (0, 3, 9):
        offline.write_chunk(vol, index, os.urandom(CHUNK))
    chunks_before = {k: v for k, v in _snapshot(store.root).items() if k.startswith("chunks")}
    vol.change_password("old", "new")
    after = _snapshot(store.root)
    assert {k: v for k, v in after.items() if k.startswith("chunks")} == chunks_before
    with pytest.raises(WrongPassword):
        volume.unlock(store, "old")
    reopened = volume.unlock(store, "new")
    assert reopened.keys == vol.keys
    assert reopened.meta.generation == 2


def test_key_slots_add_and_remove(store: FileStore) -> None:
    vol = volume.create(store, 10 * CHUNK, CHUNK, "first", FAST)
    assert vol.add_password("second") == 1
    assert volume.unlock(store, "second").keys == vol.keys
    vol.remove_slot(0)
    with pytest.raises(WrongPassword):
        volume.unlock(store, "first")
    with pytest.raises(UsageError, match="last key slot"):
        volume.unlock(store, "second").remove_slot(1)


def test_zero_chunks_are_not_stored(store: FileStore) -> None:
    vol = volume.create(store, 10 * CHUNK, CHUNK, "pw", FAST, version=1)
    offline.write_chunk(vol, 2, os.urandom(CHUNK))
    offline.write_chunk(vol, 2, bytes(CHUNK))
    offline.write_chunk(vol, 4, bytes(CHUNK))
    assert list(vol.stored_chunks()) == []


def test_grow_changes_only_the_size(store: FileStore) -> None:
    vol = volume.create(store, 4 * CHUNK, CHUNK, "pw", FAST)
    before = _snapshot(store.root)
    vol.grow(8 * CHUNK)
    after = _snapshot(store.root)
    assert {k: v for k, v in after.items() if k != "volume.json"} == \
        {k: v for k, v in before.items() if k != "volume.json"}
    reopened = volume.unlock(store, "pw")
    assert reopened.meta.size == 8 * CHUNK and reopened.meta.generation == 2
    with pytest.raises(ValueError):
        vol.grow(4 * CHUNK)  # shrinking is transfer.shrink (tests/test_offline.py)


def test_delete_removes_everything(store: FileStore) -> None:
    vol = volume.create(store, 8 * CHUNK, CHUNK, "pw", FAST, version=1)
    offline.write_chunk(vol, 1, os.urandom(CHUNK))
    assert volume.delete(store) == 2
    assert list(store.list()) == []


@pytest.mark.parametrize("key", [
    "chunks/000000000000000A", "chunks/0000_0000_000000a", "chunks/+00000000000000a",
    "chunks/ 00000000000000a", "chunks/00000000000000a", "chunks/000000000000000a.bak",
    "chunks/sub/000000000000000a", "chunks/", "lease.old", "volume.json.old",
    "sub/volume.json", "sub/lease", "notes.txt"])
def test_keys_that_are_not_the_volumes(key: str) -> None:
    assert chunk_index(key) is None
    assert not volume.owns(key)


def test_the_volumes_own_keys() -> None:
    for key in ("volume.json", "lease", chunk_key(0), chunk_key(2**64 - 1)):
        assert volume.owns(key)
    assert chunk_index("chunks/00000000000000ff") == 255


def test_create_refuses_a_location_inside_a_volume(tmp_path: Path) -> None:
    volume.create(FileStore(tmp_path / "outer"), 4 * CHUNK, CHUNK, "pw", FAST)
    with pytest.raises(VolumeExists, match=r"inside the volume at file .*outer"):
        volume.create(FileStore(tmp_path / "outer" / "inner"), 4 * CHUNK, CHUNK, "pw", FAST)
    assert not (tmp_path / "outer" / "inner").exists()


def test_create_skips_an_enclosing_location_it_cannot_read(tmp_path: Path) -> None:
    # as a prefix-scoped cloud grant refuses reads above its prefix; here a directory
    # named volume.json cannot be read as a file
    (tmp_path / "outer" / "volume.json").mkdir(parents=True)
    volume.create(FileStore(tmp_path / "outer" / "inner"), 4 * CHUNK, CHUNK, "pw", FAST)
    assert volume.unlock(FileStore(tmp_path / "outer" / "inner"), "pw").meta.size == 4 * CHUNK


def test_find_volumes(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    for name in ("a", "b/c"):
        volume.create(FileStore(tmp_path / name), 4 * CHUNK, CHUNK, "pw", FAST)
    found = list(volume.find_volumes(FileStore(tmp_path)))
    assert [(v.location, v.size) for v in found] == [("a", 4 * CHUNK), ("b/c", 4 * CHUNK)]


@pytest.mark.parametrize("size,rounded", [(1, 4096), (4096, 4096), (20 * 10**9, 20000002048)])
def test_size_rounding(size: int, rounded: int) -> None:
    assert volume.round_size(size) == rounded
