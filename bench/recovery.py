"""Recovery time after kill -9 grows with the dirty data, not with the volume size.

For each volume size and amount of unflushed data: write the data (write-back held
back), kill -9 the front, and time `open` from start to accepting connections (journal
replay included), on SeaweedFS.

    python bench/recovery.py [--dirty-mib 64 256] [--sizes 1GiB 1TiB]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import (
    KDF,
    S3_ACCESS_KEY,
    S3_BUCKET,
    S3_SECRET_KEY,
    cloudnbd,
    machine,
    make_password_file,
    start,
    start_seaweedfs,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dirty-mib", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--sizes", nargs="+", default=["1GiB", "1TiB"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as name:
        tmp = Path(name)
        (tmp / "weed").mkdir()
        weed = start_seaweedfs(tmp / "weed")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
        store_args = ["--endpoint-url", weed.endpoint]
        password = make_password_file(tmp)
        try:
            for size in args.sizes:
                for dirty in args.dirty_mib:
                    location = f"{S3_BUCKET}/recovery-{size}-{dirty}"
                    cloudnbd("init", "s3", location, size, *store_args, "--password-file",
                             str(password), *KDF, env=env)
                    cache = tmp / f"cache-{size}-{dirty}"
                    hold = ("--writeback-delay", "3600", "--max-dirty", f"{2 * dirty}MiB")
                    served = start(tmp, "s3", location, password, *hold,
                                   store_args=store_args, env=env, cache=cache)
                    data = tmp / "data"
                    data.write_bytes(os.urandom(dirty * 2**20))
                    subprocess.run(["nbdcopy", str(data), served.uri], check=True)
                    served.kill()
                    started = time.monotonic()
                    again = start(tmp, "s3", location, password, *hold,
                                  store_args=store_args, env=env, cache=cache)
                    seconds = time.monotonic() - started
                    again.close()
                    rows.append((size, dirty, seconds))
        finally:
            weed.stop()
    print(f"Machine: {machine()}")
    print("Command: python bench/recovery.py "
          f"--dirty-mib {' '.join(map(str, args.dirty_mib))} --sizes {' '.join(args.sizes)}\n")
    print("| volume size | unflushed data at kill -9 | open after the crash (replay included) |")
    print("|---|---|---|")
    for size, dirty, seconds in rows:
        print(f"| {size} | {dirty} MiB | {seconds:.2f} s |")


if __name__ == "__main__":
    main()
