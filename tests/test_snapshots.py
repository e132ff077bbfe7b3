"""Snapshots (docs/format.md, "Snapshots"; cloudnbd/snapshots.py), run as a user runs
them on file, s3 (SeaweedFS) and gs (fake-gcs-server): the images they keep through
rewrites and garbage collection (offline at once, and the engine's with a grace of
0.2 s), what deleting one frees, rollback, retention, and forged or swapped snapshot
objects refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from cloudnbd import layout, lease, runtime, volume
from cloudnbd.layout import Snapshot
from cloudnbd.snapshots import retained
from testbed.served import cloudnbd, start
from testbed.stores import free_port
from tests.nbdclient import NbdClient, NbdError
from tests.servers import BackendEnv
from tests.test_offline import (
    CHUNK,
    MiB,
    Offline,
    apply,
    assert_image,
    commit_journal,
    model,
    own_keys,
    write_image,
)

SIZE = 4 * MiB  # 64 chunks of 64 KiB


@pytest.fixture
def vol(backend_env: BackendEnv, tmp_path: Path) -> Offline:
    return Offline(backend_env, tmp_path)


def snap(vol: Offline, action: str, *args: str, check: bool = True
         ) -> tuple[int, str, str]:
    """cloudnbd snapshot ACTION BACKEND VOLUME ARGS... with the password file."""
    result = cloudnbd("snapshot", action, *vol.target, *args, "--password-file",
                      str(vol.password), *vol.env.cli_args, env=vol.env.env, check=check)
    return result.returncode, result.stdout, result.stderr


def needs(vol: Offline, name: str | None) -> set[str]:
    """Every key snapshot name's image (None: the volume's head) needs, its own key too."""
    unlocked = vol.unlock()
    if name is None:
        head, _ = unlocked.objects.get_head(unlocked.meta.head)
        return unlocked.objects.needed_by(head) | {unlocked.meta.head}
    snap = unlocked.objects.get_snapshot(name)
    return unlocked.objects.needed_by(snap.head) | {layout.snapshot_key(name)}


def test_snapshots_keep_their_images_through_rewrites_and_collection(vol: Offline) -> None:
    """Write A, snapshot s1, write B (a journal object the head names, as a server
    leaves it), snapshot s2, write C (an import: the old image is collected at once):
    s1, s2 and the volume export byte for byte; deleting s1 deletes exactly what only it
    needed; rollback to s2 keeps the state before as a snapshot."""
    vol.init("4MiB")
    first = {0: os.urandom(3 * CHUNK), 10 * CHUNK + 100: os.urandom(5000)}
    write_image(vol.tmp / "a", SIZE, first)
    vol.import_(vol.tmp / "a")
    image_a = model(SIZE, first)
    code, out, _ = snap(vol, "create", "s1")
    assert code == 0 and "Created snapshot s1" in out, out
    records = [("write", 5, os.urandom(700)), ("chunk", 20, os.urandom(CHUNK)),
               ("zero", 10 * CHUNK, CHUNK)]
    commit_journal(vol.store, "first password", records)
    image_b = bytearray(image_a)
    apply(image_b, records)
    snap(vol, "create", "s2")
    third = {CHUNK: os.urandom(2 * CHUNK)}
    write_image(vol.tmp / "c", SIZE, third)
    vol.import_(vol.tmp / "c")  # collects what the old head named, but for snapshots

    for name, expected in (("s1", image_a), ("s2", image_b)):
        (code, out, _), exported = vol.export(f"{name}.out", "--snapshot", name)
        assert code == 0 and f"of snapshot {name}" in out, out
        assert_image(exported, expected)
        code, out, _ = vol("verify", "--snapshot", name)
        assert code == 0 and "0 damaged" in out, out
    _, exported = vol.export("now.out")
    assert_image(exported, model(SIZE, third))
    code, out, _ = vol("verify")
    assert code == 0 and ", 0 garbage" in out, out  # snapshot objects are not garbage

    _, out, _ = snap(vol, "list", "--json")
    listed = {row["name"]: row for row in json.loads(out)}
    assert set(listed) == {"s1", "s2"} and listed["s1"]["size"] == SIZE
    only_s1 = needs(vol, "s1") - needs(vol, "s2") - needs(vol, None)
    sizes = {info.key: info.size for info in volume.own_objects(vol.store)}
    assert listed["s1"]["alone_bytes"] == sum(sizes[k] for k in only_s1) > 0

    before = own_keys(vol)
    code, _, _ = snap(vol, "delete", "s1")
    assert code == 0
    assert before - own_keys(vol) == only_s1  # exactly what only s1 kept alive
    _, exported = vol.export("s2.again", "--snapshot", "s2")
    assert_image(exported, image_b)

    code, out, _ = snap(vol, "rollback", "s2", "--yes")
    assert code == 0 and "back to snapshot s2" in out, out
    _, exported = vol.export("rolled.out")
    assert_image(exported, image_b)
    (kept,) = [n for n in vol.unlock().objects.snapshot_names() if n != "s2"]
    assert kept.startswith("before-rollback-")
    _, exported = vol.export("kept.out", "--snapshot", kept)
    assert_image(exported, model(SIZE, third))
    code, out, _ = vol("verify")
    assert code == 0 and ", 0 garbage" in out, out


def test_a_forged_or_swapped_snapshot_is_refused(vol: Offline) -> None:
    vol.init("4MiB")
    write_image(vol.tmp / "a", SIZE, {0: os.urandom(CHUNK)})
    vol.import_(vol.tmp / "a")
    snap(vol, "create", "s1")
    write_image(vol.tmp / "b", SIZE, {CHUNK: os.urandom(CHUNK)})
    vol.import_(vol.tmp / "b")
    snap(vol, "create", "s2")
    store = vol.store
    one, two = store.get("snapshots/s1"), store.get("snapshots/s2")
    store.put("snapshots/s1", two)  # swapped: s2's genuine object under s1's name
    code, _, err = vol("export", "--snapshot", "s1", str(vol.tmp / "x"), check=False)
    assert code == 7 and "holds snapshot 's2'" in err, err
    doc = json.loads(one)
    doc["size"] = 2 * SIZE  # forged: a field changed without the key
    store.put("snapshots/s1", json.dumps(doc).encode())
    code, _, err = vol("verify", "--snapshot", "s1", check=False)
    assert code == 7 and "failed authentication" in err, err
    before = own_keys(vol)
    write_image(vol.tmp / "c", SIZE, {2 * CHUNK: os.urandom(CHUNK)})
    vol.import_(vol.tmp / "c")  # what s1 needs is unknown now: nothing is collected
    assert before <= own_keys(vol)
    store.put("snapshots/s1", one)
    _, exported = vol.export("s1.out", "--snapshot", "s1")
    assert exported.read_bytes()[:CHUNK] != bytes(CHUNK)


def test_engine_garbage_collection_keeps_what_a_snapshot_needs(
        backend_env: BackendEnv, tmp_path: Path) -> None:
    """A snapshot taken through the running server, the volume rewritten and
    checkpointed, the server's collection run with a grace of 0.2 s until it deleted
    something: the snapshot still exports byte for byte, and the volume too."""
    vol = Offline(backend_env, tmp_path)
    vol.init("4MiB")
    port = free_port()
    served = start(tmp_path, backend_env.name, vol.location, vol.password,
                   "--metrics", f":{port}",
                   "--gc-grace", "0.2", "--checkpoint-size", "64KiB",
                   "--checkpoint-age", "1",
                   *backend_env.cli_args, env=backend_env.env)
    try:
        client = NbdClient.unix(str(served.socket))
        first = os.urandom(4 * CHUNK)
        client.pwrite(first, 0)
        small = os.urandom(300)
        client.pwrite(small, 40 * CHUNK)  # stays in the store's journal
        client.flush()
        _, out, _ = snap(vol, "create", "s1", "--cache", str(served.cache))
        assert "through its running server" in out, out
        snap_image = bytearray(SIZE)
        snap_image[:4 * CHUNK] = first
        snap_image[40 * CHUNK:40 * CHUNK + 300] = small
        second = bytearray(snap_image)
        for offset in range(0, SIZE, CHUNK):  # a quarter of each chunk: journal data
            piece = os.urandom(CHUNK // 4)
            second[offset:offset + len(piece)] = piece
            client.pwrite(piece, offset)
        client.flush()
        deadline = time.monotonic() + 120
        while int(served.status()["garbage_deleted"]) == 0:  # type: ignore[call-overload]
            assert time.monotonic() < deadline, "the server never collected garbage"
            with pytest.raises(subprocess.TimeoutExpired):
                served.process.wait(timeout=0.2)
        client.close()
        _, exported = vol.export("s1.out", "--snapshot", "s1")
        assert_image(exported, snap_image)
        # status: what only the snapshot keeps alive, once the head no longer moves
        # (everything checkpointed) and a listing was done after that
        while served.status()["store_journal_objects"]:
            with pytest.raises(subprocess.TimeoutExpired):
                served.process.wait(timeout=0.2)
        # the second round from now began after the head's last change: a full
        # listing, or a quiet one after such a listing (G5)
        rounds = served.garbage_rounds()
        while served.garbage_rounds() < rounds + 2:
            with pytest.raises(subprocess.TimeoutExpired):
                served.process.wait(timeout=0.2)
        sizes = {info.key: info.size for info in volume.own_objects(vol.store)}
        only_s1 = {key for key in needs(vol, "s1") - needs(vol, None)
                   if layout.parse_key(key) is not None}
        status = served.status()
        assert status["snapshots"] == 1
        assert status["snapshot_only_bytes"] == sum(sizes[key] for key in only_s1) > 0
        text = served.cli("status", "--cache", str(served.cache)).stdout
        assert "snapshots:     1, keeping" in text, text
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30
                                         ).read().decode()
        assert "\ncloudnbd_snapshots 1.0\n" in metrics, metrics
        assert re.search(r"\ncloudnbd_snapshot_only_bytes [1-9]", metrics), metrics
    finally:
        served.close()
    _, exported = vol.export("now.out")
    assert_image(exported, second)


def test_retention_keeps_what_restic_would() -> None:
    head = layout.Head(bytes(16), 1, 0, 0, (), (), "2024-01-01T00:00:00Z")

    def snap(name: str, when: str) -> Snapshot:
        return Snapshot(name, when, 4096, head)

    snaps = [snap("a", "2024-01-01T01:00:00Z"), snap("b", "2024-01-01T23:00:00Z"),
             snap("c", "2024-01-02T03:00:00Z"), snap("d", "2024-01-08T03:00:00Z"),
             snap("e", "2024-01-09T03:00:00Z")]
    assert retained(snaps) == {"a", "b", "c", "d", "e"}
    assert retained(snaps, keep_last=2) == {"d", "e"}
    assert retained(snaps, keep_daily=3) == {"e", "d", "c"}
    assert retained(snaps, keep_daily=4) == {"e", "d", "c", "b"}
    # ISO weeks: 2024-01-01 and 02 are week 1, 08 and 09 week 2
    assert retained(snaps, keep_weekly=2) == {"e", "c"}
    assert retained(snaps, keep_last=1, keep_weekly=2) == {"e", "c"}


def test_snapshot_names_and_keys() -> None:
    assert layout.snapshot_key("nightly-2024.01_31") == "snapshots/nightly-2024.01_31"
    for bad in ("", "-x", "a/b", "a b", "x" * 65, "é"):
        with pytest.raises(ValueError):
            layout.snapshot_key(bad)
        assert layout.snapshot_name("snapshots/" + bad) is None
    assert volume.owns("snapshots/s1") and not volume.owns("snapshots/a/b")


def store_state(vol: Offline) -> dict[str, tuple[int, str]]:
    """Every object of the volume: key -> (size, version)."""
    return {info.key: (info.size, info.version) for info in volume.own_objects(vol.store)}


def test_a_snapshot_served_read_only_beside_the_live_volume(
        backend_env: BackendEnv, tmp_path: Path) -> None:
    """open --snapshot s1 while the volume is open read-write, both under the same cache
    root: a real NBD client reads s1's image byte for byte (a journal object included)
    while the live volume is written and FLUSHed; writes to s1 are refused; the
    snapshot server changes nothing in the store (no lease, head or object of its own)."""
    vol = Offline(backend_env, tmp_path)
    vol.init("4MiB")
    live = start(tmp_path, backend_env.name, vol.location, vol.password,
                 "--gc-grace", "0.2", *backend_env.cli_args, env=backend_env.env)
    served_snapshot = None
    try:
        client = NbdClient.unix(str(live.socket))
        image_a = bytearray(SIZE)
        for offset, data in ((0, os.urandom(3 * CHUNK)), (30 * CHUNK + 7, os.urandom(900))):
            client.pwrite(data, offset)  # whole chunks, and a write for the journal
            image_a[offset:offset + len(data)] = data
        client.flush()
        snap(vol, "create", "s1", "--cache", str(live.cache))
        image_b = bytearray(image_a)
        for offset in range(0, SIZE, 8 * CHUNK):
            piece = os.urandom(CHUNK // 2)
            client.pwrite(piece, offset)
            image_b[offset:offset + len(piece)] = piece
        client.flush()
        before = store_state(vol)
        holder = lease.holder(vol.store)
        assert holder is not None
        epoch = holder.epoch

        served_snapshot = start(tmp_path, backend_env.name, vol.location, vol.password,
                                "--snapshot", "s1", "--gc-grace", "0.2",
                                *backend_env.cli_args, env=backend_env.env,
                                cache=live.cache)
        rounds = live.garbage_rounds()
        reader = NbdClient.unix(str(served_snapshot.socket))
        assert reader.size == SIZE and reader.flags & 2  # NBD_FLAG_READ_ONLY
        assert reader.pread(0, SIZE) == image_a
        for offset in range(4 * CHUNK, SIZE, 8 * CHUNK):  # the live volume goes on
            piece = os.urandom(CHUNK)
            client.pwrite(piece, offset)
            image_b[offset:offset + len(piece)] = piece
        client.flush()
        assert b"".join(reader.pread(offset, min(5 * CHUNK, SIZE - offset))
                        for offset in range(0, SIZE, 5 * CHUNK)) == image_a
        for refused in (lambda: reader.pwrite(b"x" * 512, 0), lambda: reader.trim(0, 4096),
                        lambda: reader.zero(0, 4096)):
            with pytest.raises(NbdError):
                refused()
        assert reader.pread(0, 512) == image_a[:512]
        reader.flush()  # nothing to flush: answered at once
        # the live server's collector as the clock: two of its rounds (a grace
        # apart) since the snapshot server started, whose collector would have listed
        while live.garbage_rounds() < rounds + 2:
            with pytest.raises(subprocess.TimeoutExpired):
                live.process.wait(timeout=0.2)
        status = json.loads(served_snapshot.cli("status", "--cache", str(live.cache),
                                                "--snapshot", "s1", "--json").stdout)
        assert status["snapshot"] == "s1" and status["head_generation"] == \
            vol.unlock().objects.get_snapshot("s1").head.generation
        assert (status["garbage_listings"], status["commits"]) == (0, 0)
        reader.close()
        out = served_snapshot.close("--snapshot", "s1").stdout
        assert "Closed snapshot s1" in out, out
        served_snapshot = None
        assert int(live.status()["commits"]) > 0  # type: ignore[call-overload]

        after = store_state(vol)
        holder = lease.holder(vol.store)
        assert holder is not None and holder.epoch == epoch
        head_key = vol.unlock().meta.head
        changed = {key for key in before.keys() | after.keys()
                   if before.get(key) != after.get(key)}
        # only the live server's own: its head, and objects stamped with its epoch
        assert {key for key in changed if key != head_key
                and layout.stamp_epoch(key) != epoch} == set(), changed
        client.close()
    finally:
        if served_snapshot is not None:
            served_snapshot.close("--snapshot", "s1", check=False)
        live.close()
    _, exported = vol.export("now.out")
    assert_image(exported, image_b)
    _, exported = vol.export("s1.out", "--snapshot", "s1")
    assert_image(exported, image_a)


def test_deleting_a_snapshot_of_an_open_volume_leaves_collection_to_its_server(
        backend_env: BackendEnv, tmp_path: Path) -> None:
    """snapshot delete while the volume is served: the snapshot object goes at once, the
    objects only it kept alive are deleted later by the server's collection (grace
    0.2 s), and nothing the head needs is deleted: the volume exports byte for byte."""
    vol = Offline(backend_env, tmp_path)
    vol.init("4MiB")
    served = start(tmp_path, backend_env.name, vol.location, vol.password,
                   "--gc-grace", "0.2", "--checkpoint-age", "1",
                   *backend_env.cli_args, env=backend_env.env)
    try:
        client = NbdClient.unix(str(served.socket))
        image = bytearray(SIZE)
        for offset in range(0, 16 * CHUNK, CHUNK):
            piece = os.urandom(CHUNK)
            client.pwrite(piece, offset)
            image[offset:offset + CHUNK] = piece
        client.flush()
        snap(vol, "create", "s1", "--cache", str(served.cache))
        for offset in range(0, 8 * CHUNK, CHUNK):  # s1 alone keeps the old chunks now
            piece = os.urandom(CHUNK)
            client.pwrite(piece, offset)
            image[offset:offset + CHUNK] = piece
        client.pwrite(b"j" * 500, 20 * CHUNK)  # and a journal object a checkpoint folds
        image[20 * CHUNK:20 * CHUNK + 500] = b"j" * 500
        client.flush()
        while served.status()["store_journal_objects"]:
            with pytest.raises(subprocess.TimeoutExpired):
                served.process.wait(timeout=0.2)
        only_s1 = needs(vol, "s1") - needs(vol, None)
        assert len(only_s1) > 8
        code, out, _ = snap(vol, "delete", "s1")
        assert code == 0 and "snapshots/s1" not in own_keys(vol), out
        deadline = time.monotonic() + 120
        while only_s1 & own_keys(vol):
            assert time.monotonic() < deadline, "the server never collected"
            with pytest.raises(subprocess.TimeoutExpired):
                served.process.wait(timeout=0.2)
        assert needs(vol, None) <= own_keys(vol)
        assert client.pread(0, SIZE) == image
        client.close()
    finally:
        served.close()
    _, exported = vol.export("now.out")
    assert_image(exported, image)


def test_rollback_across_size_changes(vol: Offline) -> None:
    """s1 at 4 MiB, s2 at 8 MiB (grown), then the volume shrunk to 2 MiB: rolling back
    to s2 grows it to 8 MiB with s2's image, to s1 shrinks it back to 4 MiB with s1's;
    the states before are kept as snapshots at their own sizes; a server then serves
    the size rolled back to."""
    vol.init("4MiB")
    first = {0: os.urandom(CHUNK), SIZE - 1000: os.urandom(1000)}
    write_image(vol.tmp / "a", SIZE, first)
    vol.import_(vol.tmp / "a")
    snap(vol, "create", "s1")
    vol("resize", "8MiB")
    second = {CHUNK: os.urandom(CHUNK), 2 * SIZE - 700: os.urandom(700)}
    write_image(vol.tmp / "b", 2 * SIZE, second)
    vol.import_(vol.tmp / "b")
    snap(vol, "create", "s2")
    vol("resize", "2MiB", "--shrink", "--yes")
    third = {5: os.urandom(CHUNK)}
    write_image(vol.tmp / "c", SIZE // 2, third)
    vol.import_(vol.tmp / "c")

    code, out, _ = snap(vol, "rollback", "s2", "--yes")
    assert code == 0, out
    assert vol.info()["size"] == 2 * SIZE
    _, exported = vol.export("two.out")
    assert_image(exported, model(2 * SIZE, second))
    code, out, _ = snap(vol, "rollback", "s1", "--yes", "--no-keep")
    assert code == 0, out
    assert vol.info()["size"] == SIZE
    _, exported = vol.export("one.out")
    assert_image(exported, model(SIZE, first))
    (kept,) = [n for n in vol.unlock().objects.snapshot_names() if n not in ("s1", "s2")]
    _, exported = vol.export("kept.out", "--snapshot", kept)
    assert_image(exported, model(SIZE // 2, third))
    code, out, _ = vol("verify")
    assert code == 0 and ", 0 garbage" in out, out
    served = start(vol.tmp, vol.env.name, vol.location, vol.password,
                   *vol.env.cli_args, env=vol.env.env)
    try:
        client = NbdClient.unix(str(served.socket))
        assert client.size == SIZE and client.pread(0, SIZE) == model(SIZE, first)
        client.close()
    finally:
        served.close()


def test_delete_purges_the_caches_of_snapshots_served_here(
        backend_env: BackendEnv, tmp_path: Path) -> None:
    """`open --snapshot` keeps a cache of its own (plaintext, like the volume's): `delete`
    removes it with the volume's."""
    vol = Offline(backend_env, tmp_path)
    vol.init("4MiB")
    cache = tmp_path / "cache"
    snap(vol, "create", "s1", "--cache", str(cache))
    served = start(tmp_path, backend_env.name, vol.location, vol.password,
                   "--snapshot", "s1", *backend_env.cli_args, env=backend_env.env,
                   cache=cache)
    served.close("--snapshot", "s1")
    kept = runtime.volume_cache_dir(cache, backend_env.name, vol.location, "s1")
    assert kept.is_dir()
    cloudnbd("delete", *vol.target, "--yes", "--cache", str(cache), *backend_env.cli_args,
             env=backend_env.env)
    assert not kept.exists()


def test_a_snapshot_served_here_is_neither_deleted_nor_pruned(
        backend_env: BackendEnv, tmp_path: Path) -> None:
    """Deleting a snapshot that `open --snapshot` serves on this machine would take the
    objects its server reads (at once when no server of the volume runs): `snapshot
    delete` refuses it (exit 9, naming the close that frees it), `prune` keeps it and
    says so; both work again once it is closed."""
    vol = Offline(backend_env, tmp_path)
    vol.init("4MiB")
    cache = tmp_path / "cache"
    served = start(tmp_path, backend_env.name, vol.location, vol.password,
                   *backend_env.cli_args, env=backend_env.env, cache=cache)
    client = NbdClient.unix(str(served.socket))
    image = os.urandom(2 * CHUNK)
    client.pwrite(image, 0)
    client.flush()
    client.close()
    served.close()
    for name in ("s0", "s1", "s2"):
        snap(vol, "create", name, "--cache", str(cache))
    reader_server = start(tmp_path, backend_env.name, vol.location, vol.password,
                          "--snapshot", "s1", *backend_env.cli_args, env=backend_env.env,
                          cache=cache)
    try:
        code, out, err = snap(vol, "delete", "s1", "--cache", str(cache), check=False)
        assert code == 9, (out, err)
        assert "--snapshot s1` first" in err and len(err.strip().splitlines()) == 1, err
        code, out, err = snap(vol, "prune", "--keep-last", "1", "--cache", str(cache))
        assert code == 0 and "Pruned 1 snapshot: s0" in out, (out, err)
        assert "kept, as served on this machine: s1" in out, out
        assert vol.unlock().objects.snapshot_names() == ["s1", "s2"]
        reader = NbdClient.unix(str(reader_server.socket))
        assert reader.pread(0, 2 * CHUNK) == image
        reader.close()
    finally:
        reader_server.close("--snapshot", "s1")
    snap(vol, "delete", "s1", "--cache", str(cache))
    assert vol.unlock().objects.snapshot_names() == ["s2"]


def test_snapshot_figures_show_soon_after_a_snapshot_through_the_server(
        backend_env: BackendEnv, tmp_path: Path) -> None:
    """With the default garbage grace (15 minutes), status and metrics learn the
    snapshot count from a listing: one comes right after a snapshot is taken through
    the server, not a grace later."""
    vol = Offline(backend_env, tmp_path)
    vol.init("4MiB")
    port = free_port()
    served = start(tmp_path, backend_env.name, vol.location, vol.password,
                   "--metrics", f":{port}", *backend_env.cli_args, env=backend_env.env)
    try:
        client = NbdClient.unix(str(served.socket))
        client.pwrite(os.urandom(2 * CHUNK), 0)
        client.close()
        snap(vol, "create", "s1", "--cache", str(served.cache))
        deadline = time.monotonic() + 60
        while served.status()["snapshots"] != 1:
            assert time.monotonic() < deadline, served.status()
            with pytest.raises(subprocess.TimeoutExpired):
                served.process.wait(timeout=0.2)
        assert served.status()["garbage_deleted"] == 0
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30
                                         ).read().decode()
        assert "\ncloudnbd_snapshots 1.0\n" in metrics, metrics
    finally:
        served.close()
