"""cloudnbd against nbdkit's S3 plugin on the same SeaweedFS, in one run: time from the
start of writing to the end of its FLUSH (durable in the store), cold sequential read,
requests per GiB (counted by a relay in front of the store), and bytes stored per GiB
of random and of compressible data. nbdkit-S3 has no compression, encryption or cache.

    python bench/cloud.py [--size-mib 1024] [--object-size 64k]
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import KDF, cloudnbd, machine, make_password_file, run, start

from tests.servers import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, FaultProxy, start_seaweedfs

WORDS = ["block", "device", "journal", "chunk", "flush", "upload", "fetch", "cache",
         "volume", "backup", "restore", "encrypt", "compress", "bucket", "object", "durable"]


def compressible(path: Path, size: int) -> None:
    rng = random.Random(7)
    with open(path, "wb") as f:
        while f.tell() < size:
            line = " ".join(rng.choice(WORDS) for _ in range(12)) + f" {rng.random()}\n"
            f.write(line.encode() * 64)
        f.truncate(size)


def random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // 2**20):
            f.write(os.urandom(2**20))


def stored_bytes(prefix: str) -> int:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["BENCH_S3"], region_name="us-east-1",
                          aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY)
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET,
                                                                   Prefix=prefix):
        total += sum(item["Size"] for item in page.get("Contents", []))
    return total


def bench_nbdkit(args: argparse.Namespace, proxy: FaultProxy, data: Path, tmp: Path,
                 key: str) -> dict[str, float]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "PATH": "/usr/bin:" + os.environ["PATH"]}
    size = data.stat().st_size
    plugin = ["nbdkit", "-U", "-", "S3", f"endpoint-url={proxy.url}", f"bucket={S3_BUCKET}",
              f"key={key}", f"size={size}", f"object-size={args.object_size}"]
    result: dict[str, float] = {}
    proxy.requests.clear()
    started = time.monotonic()
    run(*plugin, "--run", f"nbdcopy --flush {data} $uri", env=env)
    result["write+flush s"] = time.monotonic() - started
    result["PUT per GiB"] = proxy.requests["PUT"] * 2**30 / size
    proxy.requests.clear()
    started = time.monotonic()
    run(*plugin, "--run", f"nbdcopy $uri {tmp / 'back'}", env=env)
    result["cold read s"] = time.monotonic() - started
    result["GET per GiB"] = proxy.requests["GET"] * 2**30 / size
    result["stored per GiB"] = stored_bytes(key + "/") * 2**30 / size
    return result


def bench_cloudnbd(args: argparse.Namespace, proxy: FaultProxy, data: Path, tmp: Path,
                   key: str) -> dict[str, float]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    size = data.stat().st_size
    location = f"{S3_BUCKET}/{key}"
    store_args = ["--endpoint-url", proxy.url]
    password = make_password_file(tmp)
    cloudnbd("init", "s3", location, str(size), *store_args, "--password-file",
             str(password), *KDF, env=env)
    cache = tmp / f"cache-{key}"
    result: dict[str, float] = {}
    served = start(tmp, "s3", location, password, store_args=store_args, env=env,
                   cache=cache)
    proxy.requests.clear()
    started = time.monotonic()
    run("nbdcopy", "--flush", str(data), served.uri)
    result["write+flush s"] = time.monotonic() - started
    result["PUT per GiB"] = proxy.requests["PUT"] * 2**30 / size
    served.close()
    shutil.rmtree(cache)  # cold: nothing local
    served = start(tmp, "s3", location, password, store_args=store_args, env=env,
                   cache=cache)
    proxy.requests.clear()
    started = time.monotonic()
    run("nbdcopy", served.uri, str(tmp / "back"))
    result["cold read s"] = time.monotonic() - started
    result["GET per GiB"] = proxy.requests["GET"] * 2**30 / size
    served.close()
    result["stored per GiB"] = stored_bytes(key + "/chunks/") * 2**30 / size
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--object-size", default="64k",
                        help="nbdkit-S3 object-size (its NBD minimum block size must stay "
                             "<= 64k in nbdkit 1.32)")
    args = parser.parse_args()
    size = args.size_mib * 2**20
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as name:
        tmp = Path(name)
        (tmp / "weed").mkdir()
        weed = start_seaweedfs(tmp / "weed")
        try:
            os.environ["BENCH_S3"] = weed.endpoint
            proxy = FaultProxy(weed.endpoint, [])
            results: dict[str, dict[str, dict[str, float]]] = {}
            for kind, make in (("random", random_file), ("compressible", compressible)):
                data = tmp / f"{kind}.img"
                make(data, size)
                results[kind] = {
                    "nbdkit-S3": bench_nbdkit(args, proxy, data, tmp, f"nbdkit-{kind}"),
                    "cloudnbd": bench_cloudnbd(args, proxy, data, tmp, f"cloudnbd-{kind}"),
                }
                data.unlink()
        finally:
            weed.stop()
    print(f"Machine: {machine()}")
    print(f"Command: python bench/cloud.py {shlex.join(sys.argv[1:])}")
    print(f"Data: {args.size_mib} MiB; nbdkit-S3 object-size={args.object_size}; cloudnbd "
          f"defaults (4 MiB chunks, zstd, AES-256-GCM, 1 uploader and 1 fetcher, 2 threads "
          f"each)\n")
    print("| data | metric | nbdkit-S3 | cloudnbd | nbdkit / cloudnbd |")
    print("|---|---|---|---|---|")
    for kind, pair in results.items():
        for metric in pair["cloudnbd"]:
            ref, ours = pair["nbdkit-S3"][metric], pair["cloudnbd"][metric]
            ratio = ref / ours if ours else float("inf")
            unit_ref = f"{ref / 2**20:,.1f} MiB" if "stored" in metric else f"{ref:,.1f}"
            unit_ours = f"{ours / 2**20:,.1f} MiB" if "stored" in metric else f"{ours:,.1f}"
            print(f"| {kind} | {metric} | {unit_ref} | {unit_ours} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
