"""The block devices bench/run compares, each served over NBD on a Unix socket, with its
volume in the same SeaweedFS, reached through the counting relay:

- cloudnbd: defaults (4 MiB chunks, zstd, AES-256-GCM, 1 uploader and 1 fetcher with 2
  threads each), `cloudnbd open` on a Unix socket;
- nbdkit-S3: Debian nbdkit's S3 plugin (Python, boto3), one object per 64 KiB, no cache,
  no compression, no encryption;
- s3backer: Debian s3backer (FUSE: one file backed by S3 blocks) with --encrypt (which
  turns on its zlib compression) and a block cache file, served by `nbdkit file`;
- local file: nbdkit's file plugin on the local disk, the limit the others are held to.

Every contender has the same life cycle: create, start (returns the NBD URI), settle
(returns once what a FLUSH covered is in the store), stop (everything written is in the
store afterwards), drop_cache (the next start begins cold), stored, remove, and abort
(cleanup after a failure: no process or mount stays behind).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    KDF,
    S3_ACCESS_KEY,
    S3_BUCKET,
    S3_SECRET_KEY,
    Served,
    cloudnbd,
    make_password_file,
    run,
    s3_client,
    start,
)

S3_ENV = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
START_TIMEOUT = 120.0
# s3backer's block size is cloudnbd's chunk size, so that both make as many objects per
# GiB and the comparison is between the engines.
S3BACKER_BLOCK = 4 * 2**20
CACHE_BYTES = 2 * 2**30  # cloudnbd's default --cache-size, given to s3backer too


def wait_until(condition: Callable[[], bool], what: str, timeout: float = START_TIMEOUT,
               process: subprocess.Popen[bytes] | None = None, log: Path | None = None
               ) -> None:
    """Poll condition() until true; fail at the deadline, or when process exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            detail = log.read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"{what}: process exited with {process.returncode}\n{detail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done after {timeout:.0f}s")
        time.sleep(0.05)


def stored_bytes(endpoint: str, prefix: str) -> int:
    """Bytes of all objects under prefix in the bench bucket (asked of the store itself,
    not through the relay, so the asking is not counted)."""
    total = 0
    pages = s3_client(endpoint).get_paginator("list_objects_v2")  # type: ignore[attr-defined]
    for page in pages.paginate(Bucket=S3_BUCKET, Prefix=prefix):
        total += sum(item["Size"] for item in page.get("Contents", []))
    return total


def remove_prefix(endpoint: str, prefix: str) -> None:
    """Delete every object under prefix, straight at the store."""
    client = s3_client(endpoint)
    for page in client.get_paginator("list_objects_v2").paginate(  # type: ignore[attr-defined]
            Bucket=S3_BUCKET, Prefix=prefix):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(  # type: ignore[attr-defined]
                Bucket=S3_BUCKET, Delete={"Objects": keys, "Quiet": True})


class NbdkitServer:
    """`nbdkit --foreground` on a Unix socket; ready once its pid file exists (nbdkit
    writes it after binding the socket)."""

    def __init__(self, work: Path, name: str, plugin: list[str],
                 env: dict[str, str] | None = None) -> None:
        self.socket = work / f"{name}.sock"
        self.socket.unlink(missing_ok=True)  # left by the previous nbdkit of this volume
        pidfile = work / f"{name}.pid"
        pidfile.unlink(missing_ok=True)
        log_path = work / f"{name}.nbdkit.log"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(self.socket),
                 "--pidfile", str(pidfile), *plugin], stdout=log, stderr=log, env=env)
        wait_until(pidfile.exists, f"nbdkit {plugin[0]}", process=self.process, log=log_path)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Contender:
    """One volume of one contender."""

    name = ""
    cloud = True  # False: the local limit (no store, no requests)
    cached = True  # keeps a local cache, which warm reads hit

    def __init__(self, tmp: Path, endpoint: str, relay: str, key: str, size: int) -> None:
        self.endpoint, self.relay, self.key, self.size = endpoint, relay, key, size
        self.work = tmp / key
        self.work.mkdir(parents=True)
        self.server: NbdkitServer | None = None

    def create(self) -> None:
        """Make the empty volume."""

    def start(self) -> str:
        raise NotImplementedError

    def settle(self, timeout: float | None = None) -> None:
        """Return once everything a completed FLUSH covered is in the store."""

    def stop(self) -> None:
        assert self.server is not None
        self.server.stop()
        self.server = None

    def drop_cache(self) -> None:
        """Forget every local copy of the data, so that the next start reads cold."""

    def stored(self) -> int:
        return stored_bytes(self.endpoint, self.key + "/")

    def remove(self) -> None:
        remove_prefix(self.endpoint, self.key + "/")
        shutil.rmtree(self.work, ignore_errors=True)

    def abort(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server = None


class Cloudnbd(Contender):
    name = "cloudnbd"

    def __init__(self, *args, open_args: tuple[str, ...] = (),  # type: ignore[no-untyped-def]
                 init_args: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.open_args, self.init_args = open_args, init_args
        self.env = {**os.environ, **S3_ENV}
        self.location = f"{S3_BUCKET}/{self.key}"
        self.store_args = ["--endpoint-url", self.relay]
        self.password = make_password_file(self.work)
        self.served: Served | None = None

    def create(self) -> None:
        cloudnbd("init", "s3", self.location, str(self.size), *self.store_args,
                 "--password-file", str(self.password), *KDF, *self.init_args, env=self.env)

    def start(self) -> str:
        self.served = start(self.work, "s3", self.location, self.password, *self.open_args,
                            store_args=self.store_args, env=self.env,
                            cache=self.work / "cache")
        return self.served.uri

    def stop(self) -> None:  # close: uploads everything, then stops
        assert self.served is not None
        self.served.close()
        self.served = None

    def drop_cache(self) -> None:
        shutil.rmtree(self.work / "cache")

    def abort(self) -> None:
        if self.served is not None and self.served.process.poll() is None:
            self.served.kill()
        self.served = None


class NbdkitS3(Contender):
    """nbdkit's S3 plugin. Its minimum NBD block size is its object size, so clients may
    not send it 4 KiB requests; nbdkit's blocksize filter takes them and does the
    read-modify-write of the 64 KiB object."""

    name = "nbdkit-S3"
    cached = False
    object_size = "64k"  # the blocksize filter handles at most 64 KiB blocks

    def start(self) -> str:
        env = {**os.environ, **S3_ENV, "PATH": "/usr/bin:" + os.environ["PATH"]}
        self.server = NbdkitServer(
            self.work, "s3", ["--filter=blocksize", "S3", f"endpoint-url={self.relay}",
                              f"bucket={S3_BUCKET}",
                              f"key={self.key}", f"size={self.size}",
                              f"object-size={self.object_size}"], env)
        return self.server.uri


class S3backer(Contender):
    """s3backer's FUSE file, served by nbdkit's file plugin.

    s3backer 1.5.4 ignores fsync (its FUSE fsync does nothing), so a FLUSH returns with
    blocks still dirty in its cache; settle() waits until its stats file shows no dirty
    block, which is when the data is in the store.
    """

    name = "s3backer"

    def __init__(self, *args) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args)
        self.mount = self.work / "mnt"
        self.mount.mkdir()
        self.cache_file = self.work / "blocks.cache"
        self.access = self.work / "access"
        self.access.write_text(f"{S3_ACCESS_KEY}:{S3_SECRET_KEY}\n")
        self.access.chmod(0o600)
        self.password = make_password_file(self.work)
        self.log = self.work / "s3backer.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        args = ["s3backer", "-f", f"--baseURL={self.relay}/", f"--accessFile={self.access}",
                f"--prefix={self.key}/", f"--size={self.size}",
                f"--blockSize={S3BACKER_BLOCK}", "--listBlocks",
                "--encrypt", f"--passwordFile={self.password}",
                f"--blockCacheFile={self.cache_file}",
                f"--blockCacheSize={CACHE_BYTES // S3BACKER_BLOCK}",
                # Without big_writes FUSE 2 cuts every write into 4 KiB pages, each a
                # read-modify-write of a whole block: twice as slow to durable.
                "-o", "big_writes", S3_BUCKET, str(self.mount)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=log)
        wait_until(lambda: os.path.ismount(self.mount), "s3backer mount",
                   process=self.process, log=self.log)
        self.server = NbdkitServer(self.work, "file", ["file", f"file={self.mount / 'file'}"])
        return self.server.uri

    def dirty_ratio(self) -> float:
        text = (self.mount / "stats").read_text()
        found = re.search(r"block_cache_dirty_ratio\s+([0-9.]+)", text)
        if found is None:
            raise RuntimeError(f"no dirty ratio in s3backer's stats:\n{text}")
        return float(found.group(1))

    def settle(self, timeout: float | None = None) -> None:
        wait_until(lambda: self.dirty_ratio() == 0.0, "s3backer writing its dirty blocks",
                   timeout=timeout or 3600, process=self.process, log=self.log)

    def stop(self) -> None:
        super().stop()
        run("fusermount", "-u", str(self.mount))  # s3backer writes its dirty blocks, exits
        assert self.process is not None
        self.process.wait(timeout=3600)
        self.process = None

    def drop_cache(self) -> None:
        self.cache_file.unlink(missing_ok=True)

    def abort(self) -> None:
        super().abort()
        if os.path.ismount(self.mount):
            subprocess.run(["fusermount", "-u", "-z", str(self.mount)], check=False)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


class LocalFile(Contender):
    """nbdkit's file plugin on a file of the local disk: the limit of the machine."""

    name = "local file"
    cloud = False

    def create(self) -> None:
        self.image = self.work / "disk.img"
        with open(self.image, "wb") as f:
            f.truncate(self.size)

    def start(self) -> str:
        self.server = NbdkitServer(self.work, "local", ["file", f"file={self.image}"])
        return self.server.uri

    def drop_cache(self) -> None:
        fd = os.open(self.image, os.O_RDONLY)
        try:
            os.fsync(fd)  # only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def stored(self) -> int:
        return self.image.stat().st_blocks * 512

    def remove(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


CONTENDERS: dict[str, type[Contender]] = {
    c.name: c for c in (LocalFile, Cloudnbd, NbdkitS3, S3backer)}


def session(device: Contender, body: Callable[[str], None]) -> None:
    """Run body(uri) against the started device; always clean up."""
    try:
        body(device.start())
        device.stop()
    except BaseException:
        device.abort()
        raise
