"""A volume owns only its own objects (docs/design.md), on every backend.

The store is shared space: other files, other volumes, a bucket root. `init` refuses a
location that holds anything but nothing, or lies inside or above another volume;
`delete`, `resize` and `import` touch only the volume's own keys; `delete` also removes
this machine's cache of the volume, and refuses while a server here serves it.

Volumes made before these rules may sit inside one another or among other objects: such
a state is planted object by object (plant_volume), as `init` no longer makes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudnbd import layout, offline, volume
from cloudnbd.codec import ScryptParams
from cloudnbd.runtime import volume_cache_dir
from testbed.served import KDF, cloudnbd, start
from tests.servers import BackendEnv
from tests.test_cli import Cli, assert_one_line_error, cli

__all__ = ["cli"]

FAST = ScryptParams(n=2**10)
CHUNK = 64 * 1024

# Objects a user keeps next to, or inside, a volume's location: none is the volume's,
# though some look like it to a careless prefix match.
FOREIGN = {
    "notes.txt": b"my notes",
    "backups/important.tar": b"tar" * 100,
    "chunks/README": b"not a chunk",
    "chunks/000000000000000A": b"upper-case hex is not a chunk key",
    "chunks/0000000000000001.bak": b"a copy someone made",
    "chunks/sub/0000000000000002": b"one level too deep",
    "volume.json.old": b"{}",
    "leases/x": b"",
}


def _mkdir_parent(env: BackendEnv, location: str) -> None:
    """The file backend wants a volume's parent directory to exist, like a bucket."""
    if env.name == "file":
        Path(location).parent.mkdir(parents=True, exist_ok=True)


def init(cli: Cli, location: str, *args: str, check: bool = True) -> tuple[int, str, str]:
    _mkdir_parent(cli.env, location)
    return cli("init", location, "1GiB", "--password-file", str(cli.password), *KDF, *args,
               check=check)


def put_all(env: BackendEnv, location: str, objects: dict[str, bytes]) -> None:
    store = env.store(location)
    for key, data in objects.items():
        store.put(key, data)


def under(prefix: str, objects: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{prefix}/{key}": data for key, data in objects.items()}


def plant_volume(env: BackendEnv, location: str) -> dict[str, bytes]:
    """Write a volume with one stored chunk and a lease to location, object by object
    (a state older cloudnbd versions could leave: nested, or among other objects).
    Returns its objects."""
    scratch = env.store(env.new_location())
    vol = volume.create(scratch, 4 * CHUNK, CHUNK, "pw", FAST, version=1)
    offline.write_chunk(vol, 1, os.urandom(CHUNK))
    scratch.put("lease", b'{"host": "elsewhere"}')
    objects = {info.key: scratch.get(info.key) for info in scratch.list()}
    assert sorted(objects) == ["chunks/0000000000000001", "lease", "volume.json"]
    put_all(env, location, objects)
    return objects


def write_data(cli: Cli, location: str) -> None:
    """Store two chunks (and so a map page, and a released lease) in the volume at
    location, as `import` does."""
    chunk = volume.unlock(cli.env.store(location), "first password").meta.chunk_size
    image = cli.password.parent / "data.img"
    with open(image, "wb") as out:
        out.write(os.urandom(chunk))
        out.seek(3 * chunk)
        out.write(os.urandom(chunk))
    cloudnbd("import", str(image), cli.env.name, location, *cli.env.cli_args,
             "--password-file", str(cli.password), "--yes", env=cli.env.env)


# -- delete --------------------------------------------------------------------------------

def test_delete_of_a_bucket_root_volume_leaves_the_rest_of_the_bucket(cli: Cli) -> None:
    root = cli.env.new_bucket()
    init(cli, root)
    write_data(cli, root)
    put_all(cli.env, root, FOREIGN)
    other = plant_volume(cli.env, f"{root}/other")
    cli("delete", root, "--yes")
    assert cli.snapshot(root) == {**FOREIGN, **under("other", other)}


def test_delete_leaves_objects_under_the_volume_that_are_not_its_own(cli: Cli) -> None:
    base = cli.env.new_location()
    location = f"{base}/nest/ab"
    init(cli, location)
    write_data(cli, location)
    put_all(cli.env, location, FOREIGN)
    # keys that share the volume's prefix as a string, not as a path
    neighbours = {"nest/abc/keep.txt": b"abc", "nest/ab.txt": b"ab.txt",
                  "nest/abc/volume.json": b"{}"}
    put_all(cli.env, base, neighbours)
    _, out, _ = cli("delete", location, "--yes")
    assert "(6 objects)" in out  # volume.json, lease, head, a map page, two chunks
    assert cli.snapshot(base) == {**under("nest/ab", FOREIGN), **neighbours}


def test_delete_leaves_a_volume_nested_inside(cli: Cli) -> None:
    base = cli.env.new_location()
    init(cli, f"{base}/nest/a")
    write_data(cli, f"{base}/nest/a")
    nested = plant_volume(cli.env, f"{base}/nest/a/b")
    cli("delete", f"{base}/nest/a", "--yes")
    assert cli.snapshot(base) == under("nest/a/b", nested)
    assert offline.read_chunk(volume.unlock(cli.env.store(f"{base}/nest/a/b"), "pw"), 1) is not None


@pytest.mark.parametrize("backend_env", ["file"], indirect=True)
def test_delete_in_a_directory_keeps_the_other_files_and_the_directory(cli: Cli) -> None:
    directory = Path(cli.env.new_location())
    init(cli, str(directory))
    write_data(cli, str(directory))
    (directory / "thesis.tex").write_text("\\documentclass{article}\n")
    (directory / "figures").mkdir()
    cli("delete", str(directory), "--yes")
    assert sorted(p.name for p in directory.iterdir()) == ["figures", "thesis.tex"]
    assert (directory / "thesis.tex").read_text() == "\\documentclass{article}\n"
    # a directory the volume alone filled goes with it, as a bucket prefix would
    init(cli, str(directory / "figures" / "vol"))
    write_data(cli, str(directory / "figures" / "vol"))
    cli("delete", str(directory / "figures" / "vol"), "--yes")
    assert sorted(p.name for p in (directory / "figures").iterdir()) == []


# -- init ----------------------------------------------------------------------------------

def test_init_refuses_a_location_holding_other_objects(cli: Cli) -> None:
    location = cli.env.new_location()
    put_all(cli.env, location, {"backups/important.tar": b"tar"})
    assert_one_line_error(init(cli, location, check=False), 5, "backups/important.tar")
    assert cli.snapshot(location) == {"backups/important.tar": b"tar"}


def test_init_refuses_a_bucket_root_holding_objects(cli: Cli) -> None:
    root = cli.env.new_bucket()
    put_all(cli.env, root, {"thesis.tex": b"\\section{}"})
    assert_one_line_error(init(cli, root, check=False), 5, "thesis.tex")
    assert cli.snapshot(root) == {"thesis.tex": b"\\section{}"}


def test_init_refuses_leftovers_of_a_volume_without_its_metadata(cli: Cli) -> None:
    # chunks of a volume whose volume.json is gone would be read as the new volume's
    location = cli.env.new_location()
    leftovers = plant_volume(cli.env, location)
    cli.env.store(location).delete("volume.json")
    del leftovers["volume.json"]
    assert_one_line_error(init(cli, location, check=False), 5, "chunks/0000000000000001")
    assert cli.snapshot(location) == leftovers


def test_init_refuses_a_location_inside_a_volume(cli: Cli) -> None:
    base = cli.env.new_location()
    init(cli, f"{base}/a")
    before = cli.snapshot(base)
    for inner in (f"{base}/a/b", f"{base}/a/b/c"):
        assert_one_line_error(init(cli, inner, check=False), 5, f"{base}/a")
    assert cli.snapshot(base) == before


def test_init_refuses_a_location_inside_a_bucket_root_volume(cli: Cli) -> None:
    root = cli.env.new_bucket()
    init(cli, root)
    before = cli.snapshot(root)
    assert_one_line_error(init(cli, f"{root}/photos", check=False), 5, "inside the volume")
    assert cli.snapshot(root) == before


def test_init_refuses_a_location_above_a_volume(cli: Cli) -> None:
    base = cli.env.new_location()
    init(cli, f"{base}/x/y")
    before = cli.snapshot(base)
    for outer in (base, f"{base}/x"):
        assert_one_line_error(init(cli, outer, check=False), 5, "x/y")
    assert cli.snapshot(base) == before


def test_init_accepts_neighbours_that_only_share_a_string_prefix(cli: Cli) -> None:
    base = cli.env.new_location()
    init(cli, f"{base}/abc")
    put_all(cli.env, base, {"ab.txt": b"x", "volume.json": b'{"not": "cloudnbd"}'})
    init(cli, f"{base}/ab")
    assert "volume.json" in cli.snapshot(f"{base}/ab")
    assert "volume.json" in cli.snapshot(f"{base}/abc")


@pytest.mark.parametrize("backend_env", ["s3", "gs"], indirect=True)
def test_init_accepts_the_folder_marker_of_its_own_location(cli: Cli) -> None:
    # a console's "create folder" leaves an empty object named PREFIX/
    base = cli.env.new_location()
    bucket, _, prefix = base.partition("/")
    cli.env.store(bucket).put(f"{prefix}/vol/", b"")
    init(cli, f"{base}/vol")
    assert "volume.json" in cli.snapshot(f"{base}/vol")


def test_list_finds_volumes_planted_inside_others(cli: Cli) -> None:
    root = cli.env.new_bucket()
    init(cli, root)
    plant_volume(cli.env, f"{root}/a/b")
    put_all(cli.env, root, FOREIGN)
    out = cloudnbd("list", cli.env.name, root, *cli.env.cli_args, env=cli.env.env).stdout
    assert f"{root}\t1 GiB" in out and f"{root}/a/b\t256 KiB" in out


# -- resize and import ---------------------------------------------------------------------

def test_resize_and_import_leave_other_objects_alone(cli: Cli, tmp_path: Path) -> None:
    location = cli.env.new_location()
    cli("init", location, "1MiB", "--password-file", str(cli.password), *KDF,
        "--chunk-size", "64KiB")
    put_all(cli.env, location, FOREIGN)
    nested = plant_volume(cli.env, f"{location}/inner")
    image = tmp_path / "image"
    for fill in (b"\x05", b"\x00", b"\x05"):  # zeros: import deletes the stored chunks
        image.write_bytes(fill * 2**20)
        cloudnbd("import", str(image), cli.env.name, location, *cli.env.cli_args,
                 "--password-file", str(cli.password), "--yes", env=cli.env.env)
    cli("resize", location, "64KiB", "--shrink", "--yes", "--password-file",
        str(cli.password))
    after = cli.snapshot(location)
    own = sorted(k for k in after if k not in FOREIGN and not k.startswith("inner/"))
    # the head, one map page naming chunk 0, the lease (released by resize)
    assert [layout.parse_key(k)[:2] if layout.parse_key(k) else k[:5] for k in own] == \
        [(layout.Kind.CHUNK, 0), "head-", "lease", (layout.Kind.MAP, 0), "volum"]
    assert {k: v for k, v in after.items() if k in FOREIGN} == FOREIGN
    assert {k: v for k, v in after.items() if k.startswith("inner/")} == \
        under("inner", nested)


# -- the local cache -----------------------------------------------------------------------

def _serve_and_close(cli: Cli, tmp_path: Path, location: str, cache: Path) -> None:
    server = start(tmp_path, cli.env.name, location, cli.password, cache=cache,
                   store_args=cli.env.cli_args, env=cli.env.env)
    server.close()


def test_delete_purges_this_machines_cache_of_the_volume(cli: Cli, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    kept, doomed = cli.env.new_location(), cli.env.new_location()
    for location in (kept, doomed):
        init(cli, location)
        _serve_and_close(cli, tmp_path, location, cache)
    doomed_cache = volume_cache_dir(cache, cli.env.name, doomed)
    assert (doomed_cache / "volume_id").exists()
    cli("delete", doomed, "--yes", "--cache", str(cache))
    assert not doomed_cache.exists()
    assert (volume_cache_dir(cache, cli.env.name, kept) / "volume_id").exists()
    # a later volume at the same location starts from an empty cache
    init(cli, doomed)
    _serve_and_close(cli, tmp_path, doomed, cache)


@pytest.mark.parametrize("backend_env", ["file", "s3"], indirect=True)
def test_delete_refuses_while_a_server_here_serves_the_volume(cli: Cli, tmp_path: Path
                                                              ) -> None:
    cache = tmp_path / "cache"
    location = cli.env.new_location()
    init(cli, location)
    server = start(tmp_path, cli.env.name, location, cli.password, cache=cache,
                   store_args=cli.env.cli_args, env=cli.env.env)
    try:
        before = cli.snapshot(location)
        cached = sorted(p.name for p in volume_cache_dir(cache, cli.env.name,
                                                         location).iterdir())
        assert_one_line_error(cli("delete", location, "--yes", "--cache", str(cache),
                                  check=False), 9, "open on this machine")
        assert cli.snapshot(location) == before
        assert sorted(p.name for p in volume_cache_dir(cache, cli.env.name,
                                                       location).iterdir()) == cached
    finally:
        server.close()
    cli("delete", location, "--yes", "--cache", str(cache))
    assert cli.snapshot(location) == {}
    assert not volume_cache_dir(cache, cli.env.name, location).exists()
