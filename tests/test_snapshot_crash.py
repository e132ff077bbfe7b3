"""kill -9 during snapshot create, delete, rollback and garbage collection, at points
found by real triggers: a FaultProxy in front of SeaweedFS holds one chosen request (before
the store sees it, or after, with only the answer held) and the process is killed while
it waits. Afterwards no snapshot and no flushed write is lost or torn: every snapshot
that exists exports byte for byte, a snapshot being taken either exists whole or not at
all, the volume holds every flushed write (or, for a rollback, wholly one of the two
states), and running the command again finishes it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cloudnbd.errors import IntegrityError
from testbed.served import CLI, start
from testbed.stores import FaultProxy
from tests.nbdclient import NbdClient
from tests.servers import BackendEnv, backend_env_for
from tests.test_offline import CHUNK, MiB, Offline, assert_image, model, write_image
from tests.test_snapshots import snap

SIZE = 4 * MiB


@pytest.fixture
def s3(tmp_path: Path, request: pytest.FixtureRequest) -> BackendEnv:
    return backend_env_for("s3", tmp_path, request)


def proxied(env: BackendEnv, hold: str, after: bool) -> tuple[FaultProxy, list[str]]:
    """A proxy holding the first request matching hold, and the store arguments that
    route a cloudnbd command through it."""
    proxy = FaultProxy(env.cli_args[1], [], rate=1.0, kinds=("pass",), hold=hold,
                       hold_after=after)
    return proxy, env.through(proxy.url)[0]


def killed_at(vol: Offline, proxy: FaultProxy, store_args: list[str], *args: str) -> None:
    """Run cloudnbd ARGS through the proxy and kill -9 it while its held request waits."""
    process = subprocess.Popen([*CLI, *args, "--password-file", str(vol.password),
                                *store_args], env=vol.env.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        assert proxy.held.wait(timeout=120), process.communicate(timeout=60)[0]
    finally:
        process.kill()
        process.wait(timeout=60)


def exports(vol: Offline, expected: dict[str, bytearray]) -> None:
    """Each named snapshot, and the volume under "", exports as expected. The volume
    with --force: after a crash, export refuses to take the store's state for the
    volume's unless told (what the store holds is what this checks)."""
    for name, image in expected.items():
        _, path = vol.export(f"{name or 'volume'}-{os.urandom(4).hex()}.out",
                             *(("--snapshot", name) if name else ("--force",)))
        assert_image(path, image)


def seeded(vol: Offline) -> tuple[bytearray, bytearray]:
    """A volume with snapshot s1 of image A, then image B as the volume's."""
    vol.init("4MiB")
    first = {0: os.urandom(4 * CHUNK), 20 * CHUNK + 9: os.urandom(3000)}
    write_image(vol.tmp / "a", SIZE, first)
    vol.import_(vol.tmp / "a")
    snap(vol, "create", "s1")
    second = {2 * CHUNK: os.urandom(4 * CHUNK), 40 * CHUNK: os.urandom(CHUNK)}
    write_image(vol.tmp / "b", SIZE, second)
    vol.import_(vol.tmp / "b")
    return model(SIZE, first), model(SIZE, second)


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_kill_during_snapshot_create_of_a_served_volume(
        s3: BackendEnv, tmp_path: Path, after: bool) -> None:
    """The server is killed while its PUT of snapshots/s2 is held: s2 is whole or
    absent, s1 and every flushed write survive (reopen replays), and s2 can be taken
    again."""
    vol = Offline(s3, tmp_path)
    image_a, image_b = seeded(vol)
    proxy, store_args = proxied(s3, r"^PUT \S*/snapshots/s2 ", after)
    served = start(tmp_path, "s3", vol.location, vol.password, *store_args, env=s3.env)
    client = NbdClient.unix(str(served.socket))
    piece = os.urandom(CHUNK + 100)
    client.pwrite(piece, 7 * CHUNK)
    image_b[7 * CHUNK:7 * CHUNK + len(piece)] = piece
    client.flush()
    create = subprocess.Popen([*CLI, "snapshot", "create", *vol.target, "s2", "--cache",
                               str(served.cache), "--password-file", str(vol.password),
                               *s3.cli_args], env=s3.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    assert proxy.held.wait(timeout=120)
    served.kill()
    create.wait(timeout=120)
    client.sock.close()
    proxy.close()
    names = set(vol.unlock().objects.snapshot_names())
    assert names == ({"s1", "s2"} if after else {"s1"})
    exports(vol, {"s1": image_a, "": image_b, **({"s2": image_b} if after else {})})
    again = start(tmp_path, "s3", vol.location, vol.password, *s3.cli_args, env=s3.env)
    try:
        if not after:
            snap(vol, "create", "s2", "--cache", str(again.cache))
        assert NbdClient.unix(str(again.socket)).pread(0, SIZE) == image_b
    finally:
        again.close()
    exports(vol, {"s2": image_b})


@pytest.mark.parametrize("hold", [r"^DELETE \S*/snapshots/s1 ", r"^POST \S*\?delete"],
                         ids=["snapshot-object", "collect"])
def test_kill_during_snapshot_delete(s3: BackendEnv, tmp_path: Path, hold: str) -> None:
    """snapshot delete of a closed volume killed at the deletion of the snapshot object
    (whose answer is held) or of its objects: the volume and s2 are whole; after the
    recovery the crash message names (open, close), the next collection takes the
    rest."""
    vol = Offline(s3, tmp_path)
    _, image_b = seeded(vol)
    snap(vol, "create", "s2")
    proxy, store_args = proxied(s3, hold, after=True)
    with proxy:
        killed_at(vol, proxy, store_args, "snapshot", "delete", *vol.target, "s1")
    assert "s1" not in vol.unlock().objects.snapshot_names()
    exports(vol, {"": image_b, "s2": image_b})
    code, out, _ = vol("verify")
    assert code == 0 and "0 damaged" in out, out
    start(tmp_path, "s3", vol.location, vol.password, *s3.cli_args, env=s3.env).close()
    snap(vol, "delete", "s2")  # what is left is collected with s2's
    code, out, _ = vol("verify")
    assert code == 0 and ", 0 garbage" in out, out


@pytest.mark.parametrize("hold", [r"^PUT \S*/head-", r"^PUT \S*/volume.json ",
                                  r"^POST \S*\?delete"],
                         ids=["head", "size", "collect"])
def test_kill_during_rollback(s3: BackendEnv, tmp_path: Path, hold: str) -> None:
    """Rollback to a snapshot of another size, killed at its head switch (the write
    done, its answer held), at volume.json's new size, or in its collection (with
    --no-keep: else the state before keeps everything): the state before is kept whole
    as a snapshot, the volume holds the snapshot's image, and rolling back again
    finishes."""
    vol = Offline(s3, tmp_path)
    image_a, image_b = seeded(vol)
    vol("resize", "8MiB")
    image_b += bytes(SIZE)
    keep = "delete" not in hold
    proxy, store_args = proxied(s3, hold, after=True)
    with proxy:
        killed_at(vol, proxy, store_args, "snapshot", "rollback", *vol.target, "s1",
                  "--yes", *(() if keep else ("--no-keep",)))
    kept = [n for n in vol.unlock().objects.snapshot_names() if n != "s1"]
    assert len(kept) == keep
    exports(vol, {"s1": image_a, **{name: image_b for name in kept}})
    size = int(vol.info()["size"])  # type: ignore[call-overload]
    _, path = vol.export("volume.out", "--force")
    assert path.read_bytes() == bytes(image_a + bytes(size - SIZE))[:size]
    code, out, _ = snap(vol, "rollback", "s1", "--yes", "--no-keep", "--force",
                        check=False)
    assert code == 0, out
    exports(vol, {"": image_a, **{name: image_b for name in kept}})
    code, out, _ = vol("verify")
    assert code == 0 and ", 0 garbage" in out, out


def test_kill_during_garbage_collection_of_a_served_volume(
        s3: BackendEnv, tmp_path: Path) -> None:
    """The server's collection (grace 0.2 s) deletes garbage while s1 needs objects the
    head no longer names; it is killed with its batch DELETE done but unanswered: s1
    and every flushed write survive, and the reopened server's collection finishes."""
    vol = Offline(s3, tmp_path)
    vol.init("4MiB")
    proxy, store_args = proxied(s3, r"^POST \S*\?delete", after=True)
    served = start(tmp_path, "s3", vol.location, vol.password, "--gc-grace", "0.2",
                   "--checkpoint-size", "64KiB", "--checkpoint-age", "1", *store_args,
                   env=s3.env)
    client = NbdClient.unix(str(served.socket))
    image = bytearray(SIZE)
    for offset in range(0, 8 * CHUNK, CHUNK):
        piece = os.urandom(CHUNK)
        client.pwrite(piece, offset)
        image[offset:offset + CHUNK] = piece
    client.flush()
    snap(vol, "create", "s1", "--cache", str(served.cache))
    image_s1 = bytearray(image)
    round_ = 0
    while not proxy.held.is_set():  # rewrite until garbage is collected
        round_ += 1
        assert round_ < 2000, "the server never collected"
        offset = (round_ % 64) * CHUNK
        piece = os.urandom(CHUNK // 3)
        client.pwrite(piece, offset)
        image[offset:offset + len(piece)] = piece
        client.flush()
    served.kill()
    client.sock.close()
    proxy.close()
    exports(vol, {"s1": image_s1})
    again = start(tmp_path, "s3", vol.location, vol.password, *s3.cli_args, env=s3.env)
    try:
        assert NbdClient.unix(str(again.socket)).pread(0, SIZE) == image
    finally:
        again.close()
    exports(vol, {"": image, "s1": image_s1})
    try:
        vol.unlock().objects.kept_by_snapshots()
    except IntegrityError as exc:
        raise AssertionError(f"s1 lost an object: {exc}") from None
