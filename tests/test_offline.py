"""The commands that work on a volume without a server, on format version 3: export,
verify, info, import, resize, upgrade, rekey and delete (docs/design.md, "Offline
commands on version 3"), run as a user runs them on file, s3 (SeaweedFS) and gs
(fake-gcs-server), and their rules held in this process where a failure must be
injected (offline.py R1-R5, convert.py).

What a server leaves in the store (journal objects named by the head, as after a crash)
is written here object by object with the format's own encoders (commit_journal), as
the engine writes it, so that these tests do not depend on the served path.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from cloudnbd import layout, lease, offline, volume
from cloudnbd.backends.base import ObjectStore
from cloudnbd.backends.file import FileStore
from cloudnbd.chunks import chunk_key, stored_chunks
from cloudnbd.cli import main
from cloudnbd.codec import ScryptParams
from cloudnbd.errors import BackendError, IntegrityError
from cloudnbd.layout import Entry, JournalBuilder, JournalRef
from cloudnbd.offline import ImageWriter
from cloudnbd.reader import Image
from testbed.served import KDF, cloudnbd
from tests.servers import BackendEnv

MiB = 2**20
CHUNK = 64 * 1024
PASSWORD = "first password"
FAST = ScryptParams(n=2**10)


# -- helpers -------------------------------------------------------------------------------

class Offline:
    """One volume under test and the CLI on it, for one backend."""

    def __init__(self, env: BackendEnv, tmp: Path, location: str | None = None) -> None:
        self.env = env
        self.tmp = tmp
        self.location = location or env.new_location()
        self.password = _password_file(tmp, "pw", PASSWORD)
        self.target = [env.name, self.location]

    def __call__(self, command: str, *args: str, check: bool = True,
                 password: Path | None = None) -> tuple[int, str, str]:
        """cloudnbd COMMAND BACKEND VOLUME ARGS... with the password file."""
        pw = ["--password-file", str(password or self.password)]
        result = cloudnbd(command, *self.target, *args, *pw, *self.env.cli_args,
                          env=self.env.env, check=check)
        return result.returncode, result.stdout, result.stderr

    def init(self, size: str, *args: str) -> None:
        self("init", size, "--chunk-size", "64KiB", *KDF, *args)

    def import_(self, image: Path) -> str:
        result = cloudnbd("import", str(image), *self.target, "--yes", "--password-file",
                          str(self.password), *self.env.cli_args, env=self.env.env)
        return result.stdout

    def export(self, name: str, *args: str, check: bool = True,
               password: Path | None = None) -> tuple[tuple[int, str, str], Path]:
        target = self.tmp / name
        pw = ["--password-file", str(password or self.password)]
        result = cloudnbd("export", *self.target, str(target), *pw, *args,
                          *self.env.cli_args, env=self.env.env, check=check)
        return (result.returncode, result.stdout, result.stderr), target

    @property
    def store(self) -> ObjectStore:
        return self.env.store(self.location)

    def snapshot(self) -> dict[str, bytes]:
        store = self.store
        return {info.key: store.get(info.key) for info in store.list()}

    def unlock(self, password: str = PASSWORD) -> volume.Volume:
        return volume.unlock(self.store, password)

    def info(self) -> dict[str, object]:
        _, out, _ = self("info", "--json")
        return json.loads(out)  # type: ignore[no-any-return]


def _password_file(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def vol(backend_env: BackendEnv, tmp_path: Path) -> Offline:
    return Offline(backend_env, tmp_path)


def write_image(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    """A sparse image of size bytes holding pieces (offset -> bytes), zeros elsewhere."""
    with open(path, "wb") as image:
        image.truncate(size)
        for offset, data in pieces.items():
            image.seek(offset)
            image.write(data)


def model(size: int, pieces: dict[int, bytes]) -> bytearray:
    image = bytearray(size)
    for offset, data in pieces.items():
        image[offset:offset + len(data)] = data
    return image


def assert_image(path: Path, expected: bytes | bytearray) -> None:
    data = path.read_bytes()
    assert len(data) == len(expected)
    if data != expected:
        first = next(i for i in range(len(data)) if data[i] != expected[i])
        raise AssertionError(f"the image differs first at byte {first} (chunk "
                             f"{first // CHUNK})")


def commit_journal(store: ObjectStore, password: str, records: list[tuple]
                   ) -> layout.Head:
    """What a server that crashed after FLUSHes leaves: one journal object holding
    records (("write", offset, bytes), ("zero", offset, length), ("chunk", index,
    plain)), named by a new head, under a lease epoch of its own; returns the head."""
    vol = volume.unlock(store, password)
    held = lease.acquire(store, "open")
    try:
        head, version = vol.objects.get_head(vol.meta.head)
        image = Image(vol, head)
        seq, counter = image.max_seq, 0
        builder = JournalBuilder()
        for kind, where, what in records:
            seq += 1
            if kind == "write":
                builder.add_write(seq, where, what)
            elif kind == "zero":
                builder.add_zero(seq, where, what)
            else:
                counter += 1
                stamp = layout.stamp(held.epoch, counter)
                vol.objects.put_chunk(where, stamp, what)
                builder.add_chunk(seq, where, stamp)
        counter += 1
        stamp = layout.stamp(held.epoch, counter)
        sent = vol.objects.put_journal(stamp, builder)
        ref = JournalRef(stamp, builder.first_seq, builder.last_seq, sent.wire_bytes)
        new = replace(head, generation=head.generation + 1, epoch=held.epoch, seq=seq,
                      journal=(*head.journal, ref))
        vol.objects.put_head(vol.meta.head, new, version)
        return new
    finally:
        held.release()


def apply(image: bytearray, records: list[tuple]) -> None:
    """The records of commit_journal laid over a model image."""
    for kind, where, what in records:
        if kind == "write":
            image[where:where + len(what)] = what
        elif kind == "zero":
            image[where:where + what] = bytes(what)
        else:
            image[where * CHUNK:(where + 1) * CHUNK] = what


def head_of(vol: Offline) -> layout.Head:
    unlocked = vol.unlock()
    head, _ = unlocked.objects.get_head(unlocked.meta.head)
    return head


def own_keys(vol: Offline) -> set[str]:
    return {info.key for info in volume.own_objects(vol.store)}


# -- import, export, verify, info ----------------------------------------------------------

def test_import_export_verify_and_info_through_the_head(vol: Offline) -> None:
    size = 300 * MiB  # 4800 chunks of 64 KiB: two map pages
    vol.init("300MiB")
    first = {0: os.urandom(100_000), 5 * CHUNK + 17: os.urandom(CHUNK),
             4097 * CHUNK: os.urandom(3 * CHUNK), size - 5000: os.urandom(5000)}
    write_image(vol.tmp / "one", size, first)
    assert "8 chunks stored" in vol.import_(vol.tmp / "one")
    _, exported = vol.export("one.out")
    assert_image(exported, model(size, first))
    code, out, _ = vol("verify")
    assert code == 0 and "0 damaged, 0 stray, 0 garbage" in out, out
    info = vol.info()
    assert info["format_version"] == 3 and info["stored_chunks"] == 8
    assert info["head"]["generation"] == 2 and info["journal_objects"] == 0  # type: ignore[index]
    assert info["garbage_objects"] == 0
    named = own_keys(vol)
    assert len([k for k in named if k.startswith("map/")]) == 2
    assert lease.holder(vol.store) is None  # released

    # a second import replaces everything: the first one's objects are deleted
    second = {CHUNK: os.urandom(2 * CHUNK)}
    write_image(vol.tmp / "two", 4 * MiB, second)
    vol.import_(vol.tmp / "two")
    _, exported = vol.export("two.out")
    assert_image(exported, model(size, second))
    assert sorted(k for k in own_keys(vol) if k.startswith(("chunks/", "map/"))) == \
        sorted(k for k in own_keys(vol) - named if k.startswith(("chunks/", "map/")))
    assert head_of(vol).generation == 3
    assert vol("verify")[1].endswith("0 garbage.\n")


def test_export_of_an_open_volume_reads_its_last_commit_and_import_waits(
        vol: Offline) -> None:
    """A version-3 export is one point in time whoever writes: it goes ahead, warning,
    while the lease is held; import and shrink are refused."""
    vol.init("1MiB")
    data = {0: os.urandom(CHUNK)}
    write_image(vol.tmp / "image", MiB, data)
    vol.import_(vol.tmp / "image")
    held = lease.acquire(vol.store, "open")
    try:
        (code, _, err), exported = vol.export("open.out")
        assert code == 0 and "open on this machine" in err, err
        assert_image(exported, model(MiB, data))
        code, _, err = vol("resize", "64KiB", "--shrink", "--yes", check=False)
        assert code == 9 and "open on this machine" in err, err
        result = cloudnbd("import", str(vol.tmp / "image"), *vol.target, "--yes",
                          "--password-file", str(vol.password), *vol.env.cli_args,
                          env=vol.env.env, check=False)
        assert result.returncode == 9, result.stderr
    finally:
        held.release()


def test_a_store_journal_is_read_by_export_and_folded_by_shrink(vol: Offline) -> None:
    size = 16 * CHUNK
    vol.init("1MiB")
    pieces = {0: os.urandom(size)}
    write_image(vol.tmp / "image", size, pieces)
    vol.import_(vol.tmp / "image")
    expected = model(size, pieces)
    records = [("write", 3 * CHUNK + 100, os.urandom(5000)),
               ("zero", 5 * CHUNK - 10, CHUNK + 20),
               ("chunk", 9, os.urandom(CHUNK)),
               ("write", 9 * CHUNK + 7, b"after the chunk record"),
               ("write", 14 * CHUNK + 1000, os.urandom(2 * CHUNK - 1000))]
    head = commit_journal(vol.store, PASSWORD, records)
    apply(expected, records)
    _, exported = vol.export("journal.out")
    assert_image(exported, expected)
    code, out, _ = vol("verify")
    assert code == 0 and "0 damaged" in out, out
    info = vol.info()
    assert info["journal_objects"] == 1 and info["journal_bytes"] > 0  # type: ignore[operator]

    new_size = 10 * CHUNK + 4096  # the new last chunk keeps 4 KiB
    vol("resize", str(new_size), "--shrink", "--yes")
    after = head_of(vol)
    assert after.journal == () and after.seq > head.seq
    assert not any(k.startswith("journal/") for k in own_keys(vol))
    assert max(layout.parse_key(k)[1] for k in own_keys(vol)  # type: ignore[index]
               if k.startswith("chunks/")) == 10
    _, exported = vol.export("shrunk.out")
    assert_image(exported, expected[:new_size])
    vol("resize", "1MiB")  # growing again shows zeros, never the data cut away
    _, exported = vol.export("grown.out")
    assert_image(exported, expected[:new_size] + bytes(MiB - new_size))
    assert vol("verify")[1].endswith("0 damaged, 0 stray, 0 garbage.\n")


@pytest.mark.unit
def test_a_new_image_numbers_past_everything_the_old_head_holds(tmp_path: Path) -> None:
    """R3: the imported image's entries and head carry one seq above the store's journal
    and map, so a server's later writes (numbered past the head) are never taken as
    older than what the image holds."""
    (tmp_path / "bucket").mkdir()
    store = FileStore(tmp_path / "bucket" / "vol")
    vol = volume.create(store, 8 * CHUNK, CHUNK, PASSWORD, FAST)
    commit_journal(store, PASSWORD, [("write", 0, b"x" * 10)] * 5)
    # a map entry with a seq past the head's (a checkpoint of an early CHUNK record)
    held = lease.acquire(store, "open")
    head, version = vol.objects.get_head(vol.meta.head)
    writer = ImageWriter(vol.objects, held.epoch, 1000)
    writer.keep(2, Entry(0, 1000))
    writer.put_chunk(3, os.urandom(CHUNK))
    pages = writer.write_pages(1)
    vol.objects.put_head(vol.meta.head, replace(head, generation=head.generation + 1,
                                                pages=pages), version)
    held.release()
    image = tmp_path / "image"
    write_image(image, 8 * CHUNK, {CHUNK: b"y" * CHUNK})
    code = main(["import", str(image), "file", str(store.root), "--yes", "--password-file",
                 str(_password_file(tmp_path, "pw", PASSWORD))])
    assert code == 0
    head, _ = vol.objects.get_head(vol.meta.head)
    assert head.seq == 1001 and head.journal == ()
    [(page, stamp)] = head.pages
    entries = vol.objects.get_page(page, stamp)
    assert [(i, e.seq) for i, e in enumerate(entries) if e != layout.ZERO_ENTRY] == \
        [(1, 1001)]


# -- verify's findings ---------------------------------------------------------------------

def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """cloudnbd argv in this process: (exit status, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def made(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, list[str]]:
    """A new 1 MiB file-backend volume of 64 KiB chunks, by `init` in this process: its
    location and the password options."""
    (tmp_path / "bucket").mkdir()
    location = str(tmp_path / "bucket" / "vol")
    pw = ["--password-file", str(_password_file(tmp_path, "pw", PASSWORD))]
    assert run(capsys, "init", "file", location, "1MiB", "--chunk-size", "64KiB",
               *KDF, *pw)[0] == 0
    return location, pw


@pytest.mark.unit
def test_verify_tells_damage_stray_chunks_and_garbage_apart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    location, pw = made(tmp_path, capsys)
    image = tmp_path / "image"
    write_image(image, MiB, {0: os.urandom(MiB)})
    assert run(capsys, "import", str(image), "file", location, "--yes", *pw)[0] == 0
    store = FileStore(location)
    vol = volume.unlock(store, PASSWORD)
    named = sorted(k for k in own_keys_of(store) if k.startswith("chunks/"))

    # garbage alone: reported, exit 0
    garbage = layout.chunk_key(2, layout.stamp(99, 1))
    store.put(garbage, store.get(named[2]))
    code, out, _ = run(capsys, "verify", "file", location, *pw)
    assert code == 0 and "garbage: 1 objects (" in out and ", 1 garbage." in out, out

    # a chunk that does not authenticate, one missing: exit 7, each named
    genuine = {key: store.get(key) for key in named[:2]}
    flipped = bytearray(genuine[named[0]])
    flipped[100] ^= 1
    store.put(named[0], bytes(flipped))
    store.delete(named[1])
    code, out, err = run(capsys, "verify", "file", location, *pw)
    assert code == 7, err
    assert f"damaged: chunk 0 ({named[0]}): authentication failed" in out
    assert f"damaged: chunk 1 ({named[1]}): " in out and "missing" in out
    assert err.strip() == "cloudnbd: error: 2 damaged chunks; what they hold reads as " \
                          "I/O errors"
    for key, blob in genuine.items():
        store.put(key, blob)

    # a map page missing: the volume's image is unknown, and so is its garbage
    head, version = vol.objects.get_head(vol.meta.head)
    page_key = layout.map_key(*head.pages[0])
    page = store.get(page_key)
    store.delete(page_key)
    code, out, err = run(capsys, "verify", "file", location, *pw)
    assert code == 7 and "1 damaged map page" in err, err
    assert "garbage: not counted" in out
    store.put(page_key, page)

    # a head naming a chunk past the end (a shrink cut short): stray, exit 1
    held = lease.acquire(store, "open")
    writer = ImageWriter(vol.objects, held.epoch, head.seq)
    for index in range(16):
        writer.keep(index, vol.objects.get_page(*head.pages[0])[index])
    writer.put_chunk(100, os.urandom(CHUNK))
    vol.objects.put_head(vol.meta.head, replace(
        head, generation=head.generation + 1, pages=writer.write_pages(1)), version)
    held.release()
    code, out, err = run(capsys, "verify", "file", location, *pw)
    assert "stray: chunk 100 lies past the end of the volume" in out
    assert code == 1 and "1 stray chunk past the end" in err, err


@pytest.mark.unit
def test_verify_of_a_version_1_volume_reads_its_chunk_objects(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bucket").mkdir()
    store = FileStore(tmp_path / "bucket" / "vol")
    old_volume(store, {i: os.urandom(CHUNK) for i in range(4)}, 8 * CHUNK)
    pw = ["--password-file", str(_password_file(tmp_path, "pw", PASSWORD))]
    location = str(store.root)
    assert run(capsys, "verify", "file", location, *pw)[0] == 0
    store.put(chunk_key(100), store.get(chunk_key(0)))  # what a shrink cut short left
    code, out, err = run(capsys, "verify", "file", location, *pw)
    assert "stray: chunk 100 lies past the end of the volume" in out
    assert code == 1 and "1 stray chunk past the end" in err
    store.put(chunk_key(1), b"\0" * 100)  # damage: its own exit status, whatever else
    code, out, err = run(capsys, "verify", "file", location, *pw)
    assert code == 7 and "1 damaged chunk" in err, err
    assert "damaged: chunk 1 (chunks/0000000000000001): chunk 1: not a cloudnbd object" in out


def own_keys_of(store: ObjectStore) -> set[str]:
    return {info.key for info in volume.own_objects(store)}


# -- upgrade -------------------------------------------------------------------------------

def old_volume(store: ObjectStore, chunks: dict[int, bytes], size: int = 16 * CHUNK
               ) -> volume.Volume:
    """A volume of format version 1 (as cloudnbd before version 3 made it) at store."""
    vol = volume.create(store, size, CHUNK, PASSWORD, FAST, version=1)
    for index, data in chunks.items():
        offline.write_chunk(vol, index, data)
    return vol


def test_upgrade_converts_a_version_1_volume_in_place(vol: Offline) -> None:
    chunks = {i: os.urandom(CHUNK) for i in (0, 1, 2, 7, 15)}
    old_volume(vol.store, chunks)
    vol.store.put(chunk_key(40), os.urandom(100))  # a stray chunk: dropped
    vol.store.put("notes.txt", b"not the volume's")
    code, _, err = vol("open", "--socket", str(vol.tmp / "s"), check=False)
    assert code == 8 and err.count("\n") == 1, err
    assert f"convert it once with `cloudnbd upgrade {vol.env.name} {vol.location}`" in err
    (code, _, _), before = vol.export("before.out")
    expected = bytearray(16 * CHUNK)
    for index, data in chunks.items():
        expected[index * CHUNK:(index + 1) * CHUNK] = data
    assert_image(before, expected)

    held = lease.acquire(vol.store, "open")  # an older cloudnbd serves it
    code, _, err = vol("upgrade", check=False)
    held.release()
    assert code == 9 and "open on this machine" in err, err
    assert volume.read_metadata(vol.store)[0].version == 1
    _, out, _ = vol("upgrade")
    assert "from format version 1 to 3: 5 chunks sealed again, 6 old objects" in out, out
    keys = own_keys(vol)
    assert not any(stored_chunks(vol.store))
    assert sorted(k for k in keys if k.startswith("chunks/")) == \
        [layout.chunk_key(i, layout.UPGRADE_STAMP) for i in sorted(chunks)]
    assert vol.store.get("notes.txt") == b"not the volume's"
    assert head_of(vol).generation == 1 and vol.info()["format_version"] == 3
    _, after = vol.export("after.out")
    assert_image(after, expected)
    assert vol("verify")[1].endswith("0 damaged, 0 stray, 0 garbage.\n")
    assert "already; nothing to do" in vol("upgrade")[1]


class _Interrupted(FileStore):
    """A file store whose writes of map pages, or deletions, fail: an upgrade cut short
    before its switch, or after it."""

    fail: str = "map/"
    chunk_puts = 0

    def _put_if(self, key: str, data: bytes, expected: str | None) -> str:
        if key.startswith(self.fail):
            raise BackendError("injected: the machine lost its network")
        if key.startswith("chunks/"):
            self.chunk_puts += 1
        return super()._put_if(key, data, expected)

    def delete_many(self, keys: object) -> None:
        if self.fail == "delete":
            raise BackendError("injected: the machine lost its network")
        super().delete_many(keys)  # type: ignore[arg-type]


@pytest.mark.unit
def test_an_interrupted_upgrade_resumes_and_adopts_only_what_still_holds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cloudnbd import convert

    (tmp_path / "bucket").mkdir()
    root = tmp_path / "bucket" / "vol"
    chunks = {i: os.urandom(CHUNK) for i in range(10)}
    vol = old_volume(FileStore(root), chunks)
    broken = _Interrupted(root)
    with pytest.raises(BackendError, match="injected"):
        convert.upgrade(volume.unlock(broken, PASSWORD), epoch=1, threads=2)
    assert volume.unlock(FileStore(root), PASSWORD).meta.version == 1  # not switched
    assert broken.chunk_puts == 10
    # meanwhile an older cloudnbd wrote chunk 3 (the volume was still version 1)
    chunks[3] = os.urandom(CHUNK)
    offline.write_chunk(vol, 3, chunks[3])

    again = _Interrupted(root)
    again.fail = "delete"
    with pytest.raises(BackendError, match="injected"):
        convert.upgrade(volume.unlock(again, PASSWORD), epoch=2, threads=2)
    assert again.chunk_puts == 1  # chunk 3 under a fresh stamp; the others adopted
    upgraded = volume.unlock(FileStore(root), PASSWORD)
    assert upgraded.meta.version == 3  # switched; the old chunks are left
    image = Image(upgraded)
    assert {i: image.chunk(i) for i in image.stored()} == chunks
    assert image.sources[3].stamp == layout.stamp(2, 1)
    assert len(list(stored_chunks(FileStore(root)))) == 10
    code, out, err = run(capsys, "upgrade", "file", str(root), "--password-file",
                         str(_password_file(tmp_path, "pw", PASSWORD)))
    assert code == 0, err
    assert "Finished the upgrade" in out and "deleted the 11 objects" in out, out
    assert not list(stored_chunks(FileStore(root)))
    assert {i: image.chunk(i) for i in Image(upgraded).stored()} == chunks


@pytest.mark.unit
def test_upgrade_stops_at_a_damaged_chunk_with_the_volume_unchanged(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bucket").mkdir()
    store = FileStore(tmp_path / "bucket" / "vol")
    old_volume(store, {i: os.urandom(CHUNK) for i in range(3)}, 8 * CHUNK)
    store.put(chunk_key(1), store.get(chunk_key(2)))  # moved: fails authentication
    before = volume.read_metadata(store)[0]
    code, _, err = run(capsys, "upgrade", "file", str(store.root), "--password-file",
                       str(_password_file(tmp_path, "pw", PASSWORD)))
    assert code == 7 and "chunk 1" in err and "still version 1" in err, err
    assert volume.read_metadata(store)[0] == before


# -- rekey ---------------------------------------------------------------------------------

def test_rekey_leaves_nothing_the_old_master_key_opens(vol: Offline) -> None:
    vol.init("1MiB")
    size = MiB
    pieces = {0: os.urandom(3 * CHUNK), 10 * CHUNK: os.urandom(CHUNK)}
    write_image(vol.tmp / "image", size, pieces)
    vol.import_(vol.tmp / "image")
    records = [("write", 5 * CHUNK, os.urandom(300))]
    commit_journal(vol.store, PASSWORD, records)
    expected = model(size, pieces)
    apply(expected, records)
    second = _password_file(vol.tmp, "pw2", "second password")
    vol("passwd", "--add", "--new-password-file", str(second), *KDF)
    old_doc = vol.store.get("volume.json")
    old_keys = vol.unlock().keys
    generation = head_of(vol).generation

    new = _password_file(vol.tmp, "pw3", "new password")
    held = lease.acquire(vol.store, "open")
    code, _, err = vol("rekey", "--new-password-file", str(new), *KDF, check=False)
    held.release()
    assert code == 9 and "open on this machine" in err, err
    assert vol.store.get("volume.json") == old_doc
    _, out, err = vol("rekey", "--new-password-file", str(new), *KDF)
    assert "under a new master key: 5 chunks written" in out, out  # 0-2, 5, 10
    assert "key slots dropped: 1" in err, err
    _, exported = vol.export("rekeyed.out", password=new)
    assert_image(exported, expected)
    assert vol("info", check=False)[0] == 6  # the old password opens nothing
    assert vol("info", check=False, password=second)[0] == 6
    rekeyed = volume.unlock(vol.store, "new password")
    assert [s.slot for s in rekeyed.meta.slots] == [0]
    head, _ = rekeyed.objects.get_head(rekeyed.meta.head)
    assert head.generation == generation + 1 and head.journal == ()
    # the old master key opens no object the store holds
    for info in volume.own_objects(vol.store):
        blob = vol.store.get(info.key)
        parsed = layout.parse_key(info.key)
        with pytest.raises(IntegrityError):
            if parsed is not None:
                kind, number, stamp = parsed
                ident = layout.journal_ident(stamp) if kind == layout.Kind.JOURNAL else \
                    layout.chunk_ident(number, stamp)
                layout.unseal(old_keys, kind, ident, blob, 2**30, False)
            elif info.key.startswith("head-"):
                layout.decode_head(old_keys, blob)
            else:  # volume.json, lease
                raise IntegrityError("not encrypted under any key")
    # and a copy of the old volume.json leads to nothing
    vol.store.put("volume.json", old_doc)
    code, _, err = vol("export", str(vol.tmp / "old.out"), check=False)
    assert code == 7 and "missing" in err, err


# -- every unlocking command refuses a rolled-back head ------------------------------------

@pytest.mark.unit
def test_a_rolled_back_head_is_refused_by_every_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    location, pw = made(tmp_path, capsys)
    new_pw = ["--new-password-file", str(_password_file(tmp_path, "pw2", "other"))]
    image = tmp_path / "image"
    write_image(image, MiB, {0: os.urandom(CHUNK)})
    store = FileStore(location)
    head_key = volume.read_metadata(store)[0].head
    assert run(capsys, "import", str(image), "file", location, "--yes", *pw)[0] == 0
    older = store.get(head_key)  # generation 2, which this machine saw
    assert run(capsys, "import", str(image), "file", location, "--yes", *pw)[0] == 0
    store.put(head_key, older)  # generation 3 rolled back to 2
    before = {info.key: store.get(info.key) for info in store.list()}
    for argv in (["info"], ["verify"], ["export", str(tmp_path / "out")],
                 ["passwd", *new_pw, *KDF], ["resize", "2MiB"],
                 ["resize", "64KiB", "--shrink", "--yes"], ["rekey", *new_pw, *KDF],
                 ["upgrade"]):
        command, *rest = argv
        code, _, err = run(capsys, command, "file", location, *rest, *pw)
        assert code == 7, (argv, err)
        assert "rolled back: the store has generation 2, this machine has seen 3" in err
    code, _, err = run(capsys, "import", str(image), "file", location, "--yes", *pw)
    assert code == 7 and "rolled back" in err
    assert {info.key: store.get(info.key) for info in store.list()} == before


# -- delete --------------------------------------------------------------------------------

def test_delete_removes_every_object_of_a_version_3_volume_and_nothing_else(
        vol: Offline) -> None:
    vol.init("1MiB")
    write_image(vol.tmp / "image", MiB, {0: os.urandom(MiB)})
    vol.import_(vol.tmp / "image")
    commit_journal(vol.store, PASSWORD, [("write", 0, b"journaled")])
    store = vol.store
    store.put(layout.chunk_key(3, layout.stamp(77, 1)), b"garbage")
    store.put(layout.head_key(layout.new_key_id()), b"{}")  # an interrupted rekey's
    store.put(chunk_key(3), b"left by an upgrade")
    foreign = {"notes.txt": b"mine", "head-notes": b"not a head key",
               "map/README": b"not a page", "journal/0000000000000001.bak": b"copy",
               "chunks/0000000000000001-xyz": b"not a chunk", "sub/volume.json": b"{}"}
    for key, data in foreign.items():
        store.put(key, data)
    owned = own_keys(vol)
    assert any(k.startswith("journal/") for k in owned)
    assert len([k for k in owned if k.startswith("head-")]) == 2
    result = cloudnbd("delete", *vol.target, "--yes", *vol.env.cli_args, env=vol.env.env)
    assert f"({len(owned)} objects)" in result.stdout, result.stdout
    assert vol.snapshot() == foreign


@pytest.mark.parametrize("backend_env", ["file"], indirect=True)
def test_export_to_a_block_device_writes_zeros_where_nothing_is_stored(
        vol: Offline) -> None:
    """A device keeps what it held: an export to one must write the unstored ranges
    too, or the restored filesystem would find stale blocks where it left zeros."""
    import subprocess

    vol.init("1MiB")
    pieces = {CHUNK + 5: os.urandom(3000), 9 * CHUNK: os.urandom(CHUNK)}
    write_image(vol.tmp / "image", MiB, pieces)
    vol.import_(vol.tmp / "image")
    backing = vol.tmp / "device"
    backing.write_bytes(b"\xff" * MiB)
    loop = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        result = cloudnbd("export", *vol.target, loop, "--password-file",
                          str(vol.password), *vol.env.cli_args, env=vol.env.env)
        assert "Exported 1 MiB" in result.stdout
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    assert_image(backing, model(MiB, pieces))


@pytest.mark.parametrize("backend_env", ["file", "s3"], indirect=True)
def test_what_upgrade_shrink_and_rekey_write_is_served(vol: Offline) -> None:
    """The engine opens what the offline commands wrote, and a server's later writes are
    numbered past it (R3): a volume upgraded from version 1, written through NBD, shrunk,
    re-encrypted, and served again reads as written."""
    from testbed.served import start
    from tests.nbdclient import NbdClient

    data = bytearray(os.urandom(16 * CHUNK))
    old_volume(vol.store, {i: bytes(data[i * CHUNK:(i + 1) * CHUNK])
                                       for i in range(16)})
    vol("upgrade")

    def serve(password: Path, cache: str) -> tuple[object, NbdClient]:
        server = start(vol.tmp, vol.env.name, vol.location, password,
                       store_args=vol.env.cli_args, env=vol.env.env,
                       cache=vol.tmp / cache)
        return server, NbdClient.unix(str(server.socket))

    server, client = serve(vol.password, "cache")
    assert client.pread(0, len(data)) == data
    client.pwrite(b"w" * 4096, 3 * CHUNK + 8192)
    data[3 * CHUNK + 8192:3 * CHUNK + 12288] = b"w" * 4096
    client.flush()
    client.close()
    server.close()  # type: ignore[attr-defined]

    vol("resize", str(10 * CHUNK), "--shrink", "--yes")
    new = _password_file(vol.tmp, "pw-new", "new password")
    vol("rekey", "--new-password-file", str(new), *KDF)
    server, client = serve(new, "cache")  # the same cache: its copies are not reused
    assert client.pread(0, 10 * CHUNK) == data[:10 * CHUNK]
    client.pwrite(b"v" * 4096, 9 * CHUNK)
    data[9 * CHUNK:9 * CHUNK + 4096] = b"v" * 4096
    client.flush()
    client.close()
    server.close()  # type: ignore[attr-defined]
    _, exported = vol.export("served.out", password=new)
    assert_image(exported, data[:10 * CHUNK])
    assert vol("verify", password=new)[0] == 0
