"""A real filesystem on an NBD export: nbdfuse exposes it as a file, losetup makes that a
block device, mkfs and mount (these machines have no nbd kernel module)."""

from __future__ import annotations

import os
import select
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from testbed.served import Served


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
def mounted(server: Served, work: Path, mkfs: list[str] | None = None
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
        # The kernel lets go of a detached loop device's file a moment after losetup
        # returns (on a loaded machine: "Device or resource busy"): unmount lazily, and
        # nbdfuse exits once the loop device has let go.
        sh("fusermount3", "-u", "-z", str(fuse_dir))
        fuse.wait(timeout=60)
