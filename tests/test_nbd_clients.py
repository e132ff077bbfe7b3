"""Real NBD clients against `cloudnbd open` on the file backend: libnbd's tools, qemu, fio.

Each client is the Debian package the README names, driven as a user would.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from cloudnbd import offline, volume
from cloudnbd.backends.file import FileStore
from testbed.served import Served
from tests.nbdclient import NbdClient

MiB = 2**20


def run(*args: str, timeout: float = 300) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


def test_nbdinfo_reports_what_the_server_advertises(served: Served) -> None:
    info = json.loads(run("nbdinfo", "--json", served.uri))
    export = info["exports"][0]
    assert info["protocol"] == "newstyle-fixed"
    assert export["export-size"] == 2**30
    assert export["can_multi_conn"] and export["can_flush"] and export["can_fua"]
    assert export["can_trim"] and export["can_zero"] and export["can_cache"]
    assert not export["is_read_only"]
    assert "base:allocation" in export["contexts"]
    assert export["block_size_minimum"] == 512
    listing = run("nbdinfo", "--list", served.uri)
    assert "cloudnbd volume" in listing
    subprocess.run(["nbdinfo", "--can", "multi-conn", served.uri], check=True)


def test_nbdinfo_map_shows_holes_until_written(served: Served) -> None:
    assert run("nbdinfo", "--map", "--totals", served.uri).split()[:3] == \
        [str(2**30), "100.0%", "3"]
    run("nbdcopy", "--", "[", "nbdkit", "pattern", "size=8M", "]", served.uri)
    mapped = run("nbdinfo", "--map", served.uri).splitlines()
    first = mapped[0].split()
    assert first[0] == "0" and first[2] == "0"  # data at the start
    assert int(first[1]) >= 8 * MiB
    assert mapped[-1].split()[3:] == ["hole,zero"]


def test_nbdcopy_round_trip_with_checksums(served: Served, tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(48 * MiB))
    run("nbdcopy", "--flush", str(source), served.uri)
    back = tmp_path / "back.img"
    run("nbdcopy", served.uri, str(back))
    data = back.read_bytes()
    assert hashlib.sha256(data[: 48 * MiB]).digest() == \
        hashlib.sha256(source.read_bytes()).digest()
    assert data[48 * MiB:] == bytes(len(data) - 48 * MiB)


def test_qemu_img_convert_and_compare(served: Served, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(16 * MiB) + bytes(16 * MiB) + os.urandom(MiB))
    run("truncate", "-s", "1G", str(image))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), served.uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), served.uri)


def test_qemu_io_patterns_discard_and_write_zeroes(served: Served) -> None:
    commands = ["write -P 0xab 0 2M", "read -P 0xab 0 2M", "discard 0 1M",
                "read -P 0 0 1M", "read -P 0xab 1M 1M", "write -z 1536k 512k",
                "read -P 0 1536k 512k", "write -P 0x5c 5000k 64k", "flush",
                "read -P 0x5c 5000k 64k"]
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    out = run(*args, served.uri)
    assert "Pattern verification failed" not in out
    assert out.count("read ") == 5


def test_fio_verify_with_several_jobs(served: Served) -> None:
    out = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={served.uri}",
              "--rw=randwrite", "--bs=4k", "--size=16M", "--offset_increment=16M",
              "--numjobs=4", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1",
              "--verify_state_save=0",
              "--group_reporting", "--output-format=json")
    report = json.loads(out[out.index("{"):])
    job = report["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 64 * MiB
    assert job["read"]["io_bytes"] == 64 * MiB  # the verify pass read everything back


def test_flush_on_one_connection_covers_writes_on_another(served: Served) -> None:
    first, second = NbdClient.unix(str(served.socket)), NbdClient.unix(str(served.socket))
    data = os.urandom(3 * MiB)
    first.pwrite(data, 5 * MiB)  # acknowledged on connection 1 ...
    second.flush()  # ... and made durable by a FLUSH on connection 2
    vol = volume.unlock(FileStore(served.location), "correct horse battery")
    chunk = vol.meta.chunk_size
    cloud = b"".join(offline.read_chunk(vol, i) or bytes(chunk) for i in range(8 * MiB // chunk))
    assert cloud[5 * MiB:8 * MiB] == data
    assert second.pread(5 * MiB, 3 * MiB) == data
    first.close()
    second.close()


def test_qemu_nbd_lists_the_export(served: Served) -> None:
    listing = run("qemu-nbd", "--list", "-k", str(served.socket))
    assert "exports available: 1" in listing
    assert "cloudnbd volume" in listing  # the description
    assert "size:  1073741824" in listing
