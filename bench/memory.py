"""Open time of a 1 TiB sparse volume, and memory of all cloudnbd processes (front and
workers: proportional set size, so shared pages count once) while writing through
them, on SeaweedFS.

    python bench/memory.py [--write-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
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
    pss_by_process,
    start,
    start_seaweedfs,
    tree,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-mib", type=int, default=1024)
    parser.add_argument("open_args", nargs="*", help="extra options for cloudnbd open")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as name:
        tmp = Path(name)
        (tmp / "weed").mkdir()
        weed = start_seaweedfs(tmp / "weed")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
        store_args = ["--endpoint-url", weed.endpoint]
        password = make_password_file(tmp)
        try:
            location = f"{S3_BUCKET}/big"
            cloudnbd("init", "s3", location, "1TiB", *store_args, "--password-file",
                     str(password), *KDF, env=env)
            started = time.monotonic()
            served = start(tmp, "s3", location, password, *args.open_args,
                           store_args=store_args, env=env)
            open_seconds = time.monotonic() - started
            at_idle = pss_by_process(tree(served.process.pid))
            idle = sum(at_idle.values())
            peak = [idle]
            worst: dict[str, float] = {}
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.2):
                    now = pss_by_process(tree(served.process.pid))
                    if sum(now.values()) > max(peak):
                        worst.clear()
                        worst.update(now)
                    peak.append(sum(now.values()))

            sampler = threading.Thread(target=sample)
            sampler.start()
            data = tmp / "data"
            with open(data, "wb") as f:
                for _ in range(args.write_mib):
                    f.write(os.urandom(2**20))
            subprocess.run(["nbdcopy", "--flush", str(data), served.uri], check=True)
            done.set()
            sampler.join()
            processes = len(tree(served.process.pid))
            served.close()
        finally:
            weed.stop()
    print(f"Machine: {machine()}")
    print(f"Command: python bench/memory.py --write-mib {args.write_mib} -- "
          f"{' '.join(args.open_args)}\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| open a 1 TiB sparse volume on S3 (command start to accepting) | "
          f"{open_seconds:.2f} s |")
    print(f"| processes (front, uploaders, fetchers) | {processes} |")
    print(f"| memory, all processes, idle (PSS) | {idle:.0f} MiB |")
    print(f"| memory, all processes, peak while writing {args.write_mib} MiB and "
          f"flushing (PSS) | {max(peak):.0f} MiB |")
    for when, found in (("idle", at_idle), ("at the peak", worst)):
        print(f"\nPer process {when} (MiB): " +
              ", ".join(f"{name.split()[1]} {mib:.0f}" for name, mib in found.items()))


if __name__ == "__main__":
    main()
