"""Uploads over slow links: throughput to durable against upload concurrency and chunk
size, the contenders on the same links, and whether --upload-limit holds its rate.

The link is testbed/link.py in the relay (testbed.stores.FaultProxy): added round-trip time
and one bandwidth cap per direction shared by every connection, like a home uplink.
Each measurement writes random data (nothing to compress) to a fresh volume with
`nbdcopy --flush` and times it to the end of the FLUSH, i.e. until the store holds it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, FaultProxy, Link, median, run
from contenders import Cloudnbd, Contender, NbdkitS3, S3backer
from workloads import random_file, write_to_durable

from cloudnbd.sizes import parse_size

MB = 10**6
MiB = 2**20


@dataclass(frozen=True)
class SlowLink:
    rtt_ms: float
    mbit: float
    mib: int  # data uploaded per measurement

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.mbit * 1e6 / 8

    @property
    def label(self) -> str:
        return f"{self.rtt_ms:g} ms, {self.mbit:g} Mbit/s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("slow links")
    group.add_argument("--links", nargs="+", default=["80:20:48", "10:200:384"],
                       help="RTT_MS:MBIT:MIB, MIB the data uploaded on that link")
    group.add_argument("--uploaders", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    group.add_argument("--worker-threads", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    group.add_argument("--chunk-sizes", nargs="+", default=["1MiB", "16MiB"],
                       help="besides the default 4MiB")
    group.add_argument("--limits", nargs="+", default=["4MiB:80", "16MiB:320"],
                       help="--upload-limit RATE:MIB uploaded, on an unlimited link")
    group.add_argument("--slow-runs", type=int, default=1,
                       help="medians of this many runs per slow-link point")


def parse_link(text: str) -> SlowLink:
    rtt, mbit, mib = text.split(":")
    return SlowLink(float(rtt), float(mbit), int(mib))


class Sampler:
    """Samples a link's upstream byte count every 50 ms in a thread (for rates)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.monotonic(), self.link.up.sent))

    def __enter__(self) -> Sampler:
        self.samples.append((time.monotonic(), self.link.up.sent))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), self.link.up.sent))

    def sustained(self, low: float = 0.1, high: float = 0.9) -> float:
        """Bytes per second between the moments `low` and `high` of the bytes had
        crossed: the steady rate, without the ramp at the start and the tail."""
        base, total = self.samples[0][1], self.samples[-1][1] - self.samples[0][1]
        t1 = next(t for t, sent in self.samples if sent - base >= low * total)
        t2, b2 = next((t, sent) for t, sent in self.samples if sent - base >= high * total)
        b1 = next(sent for t, sent in self.samples if t == t1)
        return (b2 - b1) / (t2 - t1)


def upload(tmp: Path, endpoint: str, link: Link, cls: type[Contender], key: str,
           data: Path, timeout: float | None = None, **options: tuple[str, ...]
           ) -> tuple[float, Sampler]:
    """Seconds to durable for data written to a fresh volume of cls behind link; the
    write and its FLUSH are given up after timeout seconds."""
    size = data.stat().st_size
    with FaultProxy(endpoint, [], link=link) as proxy:
        device = cls(tmp, endpoint, proxy.url, key, size, **options)
        try:
            device.create()
            uri = device.start()
            with Sampler(link) as sampler:
                seconds = write_to_durable(device, uri, data, timeout)
            device.stop()
        except BaseException:
            device.abort()
            raise
        finally:
            device.remove()
    return seconds, sampler


def raw_puts(tmp: Path, endpoint: str, link: Link, data: Path, parallel: int = 8) -> float:
    """Seconds for curl to PUT data as 4 MiB objects, `parallel` at once: what the link
    and relay deliver to a C client, the reference for the contenders."""
    pieces = tmp / "pieces"
    pieces.mkdir(parents=True)
    run("split", "-b", "4M", str(data), f"{pieces}/p")
    config = tmp / "curl.conf"  # the key goes in a 0600 file, not on a command line
    config.touch(mode=0o600)
    config.write_text(f'user = "{S3_ACCESS_KEY}:{S3_SECRET_KEY}"\n')
    with FaultProxy(endpoint, [], link=link) as proxy:
        started = time.monotonic()
        subprocess.run(
            f"ls | xargs -P {parallel} -I{{}} curl -sSf -K {config} "
            f"--aws-sigv4 aws:amz:us-east-1:s3 -T {{}} {proxy.url}/{S3_BUCKET}/raw/{{}}",
            shell=True, check=True, cwd=pieces, timeout=600)
        seconds = time.monotonic() - started
    run("rm", "-r", str(tmp))
    return seconds


@dataclass
class Sweep:
    """The slow-link rows: setting -> link label -> cell text."""

    runs: int
    rows: dict[str, dict[str, str]] = field(default_factory=dict)
    best: dict[str, tuple[float, str]] = field(default_factory=dict)
    count: int = 0

    def point(self, label: str, spec: SlowLink,
              seconds_for: Callable[[Link, str], float]) -> None:
        """Median over runs of seconds_for(a fresh link, a fresh key), as a row cell."""
        times = []
        for _ in range(self.runs):
            self.count += 1
            try:
                times.append(seconds_for(Link.mbit(spec.rtt_ms, spec.mbit),
                                         f"slow-{self.count}"))
            except Exception as exc:  # a contender that never gets there: say so
                traceback.print_exc()
                reason = ("no FLUSH after " + f"{exc.timeout:.0f} s"
                          if isinstance(exc, subprocess.TimeoutExpired)
                          else str(exc).strip().splitlines()[-1][:120])
                self.rows.setdefault(label, {})[spec.label] = f"failed: {reason}"
                print(f"  {spec.label}: {label}: failed: {reason}", file=sys.stderr,
                      flush=True)
                return
        rate = spec.mib * MiB / median(times)
        share = rate / spec.rate
        self.rows.setdefault(label, {})[spec.label] = f"{rate / MB:.2f} MB/s ({share:.0%})"
        if label.startswith("cloudnbd") and share > self.best.get(spec.label, (0, ""))[0]:
            self.best[spec.label] = (share, label)
        print(f"  {spec.label}: {label}: {rate / MB:.2f} MB/s ({share:.0%})",
              file=sys.stderr, flush=True)


def sweep_link(args: argparse.Namespace, sweep: Sweep, spec: SlowLink, tmp: Path,
               endpoint: str) -> None:
    data = tmp / f"slow-{spec.mib}.img"
    random_file(data, spec.mib * MiB)

    # give up on a point at five times the time the link needs, plus a minute
    timeout = 5 * spec.mib * MiB / spec.rate + 60

    def contender(cls: type[Contender], open_args: tuple[str, ...] = (),
                  init_args: tuple[str, ...] = ()) -> Callable[[Link, str], float]:
        options = {"open_args": open_args, "init_args": init_args} if cls is Cloudnbd else {}
        return lambda link, key: upload(tmp, endpoint, link, cls, key, data, timeout,
                                        **options)[0]

    sweep.point("reference: curl, 8 PUTs of 4 MiB at once", spec,
                lambda link, key: raw_puts(tmp / key, endpoint, link, data))
    for cls in (NbdkitS3, S3backer):
        sweep.point(f"{cls.name}, as in the comparison", spec, contender(cls))
    sweep.point("cloudnbd defaults (1 uploader, 2 threads, 4 MiB chunks)", spec,
                contender(Cloudnbd))
    for n in args.uploaders:
        sweep.point(f"cloudnbd --uploaders {n} (2 threads each)", spec,
                    contender(Cloudnbd, ("--uploaders", str(n))))
    for n in args.worker_threads:
        sweep.point(f"cloudnbd --worker-threads {n} (1 uploader)", spec,
                    contender(Cloudnbd, ("--worker-threads", str(n))))
    for chunk in args.chunk_sizes:
        sweep.point(f"cloudnbd init --chunk-size {chunk} (defaults otherwise)", spec,
                    contender(Cloudnbd, (), ("--chunk-size", chunk)))
    data.unlink()


def upload_limit(tmp: Path, endpoint: str, rate_text: str, mib: int, key: str) -> str:
    """One table row: how close the upload rate stays to --upload-limit rate_text."""
    data = tmp / f"limit-{mib}.img"
    random_file(data, mib * MiB)
    link = Link()  # no cap: it only counts the bytes
    seconds, sampler = upload(tmp, endpoint, link, Cloudnbd, key, data,
                              open_args=("--upload-limit", rate_text))
    data.unlink()
    wanted = parse_size(rate_text, "--upload-limit")  # the CLI's own reading of RATE
    average, sustained = link.up.sent / seconds, sampler.sustained()
    return (f"| {rate_text}/s ({wanted / MB:.2f} MB/s) | {mib} MiB | "
            f"{average / MB:.2f} MB/s ({average / wanted - 1:+.1%}) | "
            f"{sustained / MB:.2f} MB/s ({sustained / wanted - 1:+.1%}) |")


def measure(args: argparse.Namespace, tmp: Path, endpoint: str) -> str:
    links = [parse_link(text) for text in args.links]
    sweep = Sweep(args.slow_runs)
    for spec in links:
        sweep_link(args, sweep, spec, tmp, endpoint)
    limits = []
    for i, text in enumerate(args.limits):
        rate_text, mib = text.split(":")
        limits.append(upload_limit(tmp, endpoint, rate_text, int(mib), f"limit-{i}"))

    names = [spec.label for spec in links]
    runs = "one run" if args.slow_runs == 1 else f"medians of {args.slow_runs} runs"
    lines = ["Upload of random data to durable (`nbdcopy --flush` into a fresh volume: "
             + ", ".join(f"{s.mib} MiB on {s.label}" for s in links)
             + f"); throughput and share of the link's capacity, {runs} per point.", "",
             "| setting | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for label, cells in sweep.rows.items():
        lines.append(f"| {label} | " + " | ".join(cells.get(n, "-") for n in names) + " |")
    lines += ["", "Best cloudnbd setting per link: " + "; ".join(
        f"{name}: {label}, {share:.0%}" for name, (share, label) in sweep.best.items())
        + ".", "", "`--upload-limit` on an uncapped link (bytes counted at the relay, HTTP "
        "included): the average from the first byte written to the end of the FLUSH, and "
        "the sustained rate between 10% and 90% of the bytes.", "",
        "| --upload-limit | data | average to durable | sustained |", "|---|---|---|---|",
        *limits]
    return "\n".join(lines)
