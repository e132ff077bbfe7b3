"""A real filesystem on cloudnbd, end to end: nbdfuse exposes the export as a file,
losetup makes it a block device, mkfs and mount it, copy a tree, unmount, close (upload
everything), reopen with an empty cache (everything comes back from the store), mount
again and compare every file's checksum.

These machines have no nbd kernel module; README documents the nbd-client workflow.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from testbed import served as serving
from testbed.fs import mounted
from tests.servers import BackendEnv


def checksums(root: Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and "lost+found" not in path.parts:
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def populate(root: Path) -> None:
    shutil.copytree(Path(__file__).resolve().parent.parent / "cloudnbd", root / "src")
    (root / "random.bin").write_bytes(os.urandom(24 * 2**20))
    (root / "zeros.bin").write_bytes(bytes(8 * 2**20))
    deep = root / "a" / "b" / "c"
    deep.mkdir(parents=True)
    for i in range(200):
        (deep / f"small{i}.txt").write_text(f"file {i}\n" * (i + 1))


@pytest.mark.parametrize("mkfs", [["mkfs.btrfs", "-q", "-f"], ["mkfs.ext4", "-q", "-F"]],
                         ids=["btrfs", "ext4"])
def test_filesystem_survives_close_and_reopen_from_the_store(
        tmp_path: Path, password_file: Path, mkfs: list[str], backend_env: BackendEnv
        ) -> None:
    backend, location = backend_env.name, backend_env.new_location()
    store_args, env = backend_env.cli_args, backend_env.env
    serving.cloudnbd("init", backend, location, "1GiB", *store_args, "--password-file",
                     str(password_file), *serving.KDF, env=env)
    server = serving.start(tmp_path, backend, location, password_file,
                           store_args=store_args, env=env)
    with mounted(server, tmp_path, mkfs) as root:
        populate(root)
        before = checksums(root)
    assert len(before) > 200
    server.close()

    shutil.rmtree(server.cache)  # nothing local: every block must come from the store
    again = serving.start(tmp_path, backend, location, password_file,
                          store_args=store_args, env=env)
    try:
        with mounted(again, tmp_path) as root:
            assert checksums(root) == before
        assert again.status()["fetches"] > 0
    finally:
        again.close()
