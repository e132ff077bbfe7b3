"""A real filesystem on cloudnbd, end to end: nbdfuse exposes the export as a file,
losetup makes it a block device, mkfs and mount it, copy a tree, unmount, close (upload
everything), reopen with an empty cache (everything comes back from the store), mount
again and compare every file's checksum.

These machines have no nbd kernel module; README documents the nbd-client workflow.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import served as serving
from tests.servers import BackendEnv


def sh(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout.strip()


def start_nbdfuse(directory: Path, uri: str, log_path: Path) -> subprocess.Popen[bytes]:
    """nbdfuse, returned once its file is mounted.

    The wait is event-driven: /proc/self/mountinfo signals POLLPRI on every change of the
    mount table, and the watch is registered before nbdfuse starts, so no mount is missed.
    """
    with open("/proc/self/mountinfo", "rb") as mountinfo, open(log_path, "ab") as log:
        poller = select.poll()
        poller.register(mountinfo, select.POLLPRI | select.POLLERR)
        fuse = subprocess.Popen(["nbdfuse", str(directory / "disk"), uri],
                                stdout=log, stderr=log)
        while not os.path.ismount(directory):
            assert fuse.poll() is None, f"nbdfuse exited: {log_path.read_text()}"
            poller.poll(1000)  # a mount-table change, or a second to re-check nbdfuse
            mountinfo.seek(0)
            mountinfo.read()
    return fuse


@contextmanager
def mounted(server: serving.Served, work: Path, mkfs: list[str] | None = None
            ) -> Iterator[Path]:
    """The export as a mounted filesystem (formatted first when mkfs is given)."""
    fuse_dir, mount_point = work / "fuse", work / "mnt"
    fuse_dir.mkdir(exist_ok=True)
    mount_point.mkdir(exist_ok=True)
    fuse = start_nbdfuse(fuse_dir, server.uri, work / "nbdfuse.log")
    loop = None
    try:
        loop = sh("losetup", "--find", "--show", "--direct-io=off", str(fuse_dir / "disk"))
        if mkfs:
            sh(*mkfs, loop)
        sh("mount", loop, str(mount_point))
        try:
            yield mount_point
        finally:
            sh("umount", str(mount_point))
    finally:
        if loop:
            sh("losetup", "-d", loop)
        sh("fusermount3", "-u", str(fuse_dir))
        fuse.wait(timeout=60)


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
