"""Load campaign: several clients at queue depth 64 against a real `cloudnbd open` on
SeaweedFS, reached through a relay that caps the upload bandwidth (testbed/link.py), with
--max-dirty at its minimum so that the backlog fills and writes must wait for uploads.

What it checks (docs/reliability.md, "6. Load", states the numbers):
- no request starves: every request of every client is answered within latency_bound(),
  derived from the throttle, and every client makes progress;
- memory stays bounded: the PSS of all cloudnbd processes, sampled through the run, stays
  under memory_bound();
- everything is intact: every READ during the run returns exactly what the client's
  model says, and after close the volume exported straight from the store (no relay)
  equals every client's final model, sector by sector;
- the backlog really reached --max-dirty (otherwise nothing was tested).

The clients are separate processes (tests/load_client.py), each on its own NBD
connection and its own region of the disk, with different mixes (see PROFILES).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
import urllib.request
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.link import Link
from testbed.procs import pss_by_process, tree
from testbed.served import KDF, Served, cloudnbd, start
from testbed.stores import FaultProxy, free_port
from tests.load_client import SECTOR, Spec, bucket_top, make_pool, sector_bytes
from tests.servers import backend_env_for

MiB = 2**20
CHUNK = 4 * MiB  # the default chunk size
PAYLOAD_PER_CONNECTION_MIB = 8  # the NBD server's in-flight payload bound per connection
TRANSFERS = 4  # default workers: 1 uploader and 1 fetcher with 2 transfer threads each
PER_TRANSFER_MIB = 12  # a plain chunk, its encrypted object, and what surrounds them
HEAP_SLACK_MIB = 8  # extent maps, request records, thread stacks
GROWTH_SLACK_MIB = 8  # how much higher the second half of a long run may peak

# Relative frequency of each request kind, and the largest request, per client profile.
PROFILES: dict[str, tuple[dict[str, float], int]] = {
    # everything, requests up to 1 MiB
    "mixed": ({"write": 0.50, "fua": 0.01, "read": 0.30, "zero": 0.08, "trim": 0.03,
               "flush": 0.02}, 256),
    # large writes: at QD64 it asks the server to hold 256 MiB of payload
    "bulk": ({"write": 0.90, "read": 0.08, "flush": 0.02}, 1024),
    # reads only: must not wait behind the other clients' writes
    "reader": ({"read": 1.0}, 64),
    # small writes scattered over the region: each dirties a chunk for a few KiB
    "scatter": ({"write": 0.998, "flush": 0.002}, 4),
}


@dataclass(frozen=True)
class LoadSettings:
    clients: int = 4
    depth: int = 64
    seconds: float = 20.0
    volume_mib: int = 128
    max_dirty_mib: int = 64  # the smallest --max-dirty the CLI accepts
    up_mib_s: float = 8.0  # the link's cap towards the store
    down_mib_s: float = 32.0
    rtt: float = 0.02
    cache_size: str = "2GiB"  # --cache-size; smaller makes uploads and reads fetch
    seed: int = 1
    mix: tuple[str, ...] = ("mixed", "bulk", "reader")  # profiles, given out in turn

    @property
    def profiles(self) -> list[str]:
        return [self.mix[i % len(self.mix)] for i in range(self.clients)]


def latency_bound(s: LoadSettings) -> float:
    """Seconds within which every request must be answered.

    The slowest request is a FLUSH (or a FUA write) sent when the backlog is full: it
    waits until every chunk holding a write acknowledged before it has been uploaded.
    --max-dirty bounds the backlog in bytes, but an upload moves a whole chunk, so what
    must cross the link is up to every chunk of the volume: volume / up-rate seconds.
    Chunks already uploading an older version when it arrives go once more (up to the
    4 uploads in flight, 2 per transfer thread). Writes wait for room and reads for a
    pool thread (writes waiting for room hold them), both less than a FLUSH. Doubled for
    a machine shared by the store, the relay, the clients and cloudnbd, plus 10 s for
    connection set-up and retries.
    """
    chunks = math.ceil(s.volume_mib * MiB / CHUNK) + 4
    return 2 * chunks * CHUNK / (s.up_mib_s * MiB) + 10


def reader_bound(s: LoadSettings) -> float:
    """The p99 latency of a read-only client, whose reads are all served locally: under
    the time one chunk takes to cross the link. Its reads need no upload, so they must
    not wait for the other clients' writes (when they shared one thread pool, its p99
    was 4.5 s in the fast tier, against 0.5 s for one chunk)."""
    return CHUNK / (s.up_mib_s * MiB)


def memory_bound(s: LoadSettings, idle: float) -> float:
    """MiB of PSS all cloudnbd processes together may reach under load, from their PSS
    when idle (measured in the same run, clients connected): the memory budget's own
    terms (docs/design.md): 8 MiB of request payload per connection (the NBD server
    holds no more, whatever the client sends), 12 MiB per transfer in flight (plain
    chunk and encrypted object, 4 MiB each, and the buffers around them; measured, with
    4 MiB chunks) for the 4 transfers of the default workers, and 8 MiB of heap. With 4
    clients and an idle 96 MiB that is 184 MiB; the measured peak is about 150."""
    return (idle + PAYLOAD_PER_CONNECTION_MIB * s.clients + PER_TRANSFER_MIB * TRANSFERS
            + HEAP_SLACK_MIB)


@dataclass
class LoadReport:
    settings: LoadSettings
    requests: dict[str, int] = field(default_factory=dict)
    per_client: list[dict[str, object]] = field(default_factory=list)
    max_latency: float = 0.0
    p999: float = 0.0
    p99: float = 0.0
    latency_by_kind: dict[str, tuple[float, float]] = field(default_factory=dict)
    idle_pss: float = 0.0
    peak_pss: float = 0.0
    peak_first_half: float = 0.0  # of the load, to see growth over time
    peak_second_half: float = 0.0
    peak_by_process: dict[str, float] = field(default_factory=dict)
    peak_backlog_mib: float = 0.0
    written_mib: float = 0.0
    read_mib: float = 0.0
    uploaded_mib: float = 0.0
    close_seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def summary(self) -> str:
        s = self.settings
        kinds = ", ".join(f"{k} {v}" for k, v in self.requests.items() if v)
        return (f"load campaign: {s.clients} clients x QD{s.depth} for {s.seconds:.0f} s "
                f"({', '.join(s.profiles)}), {self.total_requests} requests ({kinds}), "
                f"{self.written_mib:.0f} MiB written, {self.read_mib:.0f} MiB read; "
                f"link up {s.up_mib_s:g} MiB/s, --max-dirty {s.max_dirty_mib} MiB, "
                f"backlog peak {self.peak_backlog_mib:.0f} MiB; latency max "
                f"{self.max_latency:.2f} s, p99.9 {self.p999:.2f} s, p99 {self.p99:.3f} s "
                f"(bound {latency_bound(s):.0f} s); PSS of all cloudnbd processes: idle "
                f"{self.idle_pss:.0f} MiB, peak {self.peak_pss:.0f} MiB (bound "
                f"{memory_bound(s, self.idle_pss):.0f}; first half "
                f"{self.peak_first_half:.0f}, second half {self.peak_second_half:.0f}); close "
                f"{self.close_seconds:.1f} s; {len(self.failures)} failures")

    def details(self) -> str:
        lines = [f"  {kind}: p99.9 {p999:.3f} s, max {top:.3f} s"
                 for kind, (p999, top) in self.latency_by_kind.items()]
        for client in self.per_client:
            kinds = ", ".join(f"{kind} {count} max {top:.2f} s"
                              for kind, (count, top) in client["kinds"].items() if count)
            lines.append(f"  client {client['client']} ({client['profile']}): "
                         f"{client['requests']} requests, p99 {client['p99']:.3f} s, "
                         f"max {client['max']:.3f} s ({kinds})")
        lines.append("  peak PSS by process (MiB): " + ", ".join(
            f"{name.split()[1]} {mib:.0f}" for name, mib in self.peak_by_process.items()))
        return "\n".join(lines)


def _percentile(histogram: dict[int, int], fraction: float) -> float:
    total = sum(histogram.values())
    if not total:
        return 0.0
    rank = math.ceil(fraction * total)
    seen = 0
    for key in sorted(histogram):
        seen += histogram[key]
        if seen >= rank:
            return bucket_top(key)
    return bucket_top(max(histogram))


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return sum(float(line.split()[-1]) for line in text.decode().splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


class _Sampler:
    """Samples the PSS of every process of the server and its backlog until stopped."""

    def __init__(self, front: int, metrics_port: int) -> None:
        self.front, self.port = front, metrics_port
        self.peak: dict[str, float] = {}
        self.series: list[tuple[float, float]] = []  # (monotonic time, MiB of all)
        self.peak_backlog = 0.0
        self.errors: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        tick = 0
        while not self._done.wait(0.1):
            now = pss_by_process(tree(self.front))
            self.series.append((time.monotonic(), sum(now.values())))
            if sum(now.values()) > sum(self.peak.values()):
                self.peak = now
            tick += 1
            if tick % 5 == 0:
                try:
                    backlog = _metric(self.port, "cloudnbd_backlog_bytes")
                except OSError as exc:
                    self.errors.append(f"metrics: {exc}")
                    continue
                self.peak_backlog = max(self.peak_backlog, backlog)


def _client_process(spec: Spec) -> subprocess.Popen[str]:
    spec_json = json.dumps(spec.__dict__)
    return subprocess.Popen([sys.executable, "-m", "tests.load_client", spec_json],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)


def _start_clients(s: LoadSettings, served: Served, tmp: Path
                   ) -> list[tuple[Spec, subprocess.Popen[str]]]:
    region = s.volume_mib * MiB // SECTOR // s.clients
    clients = []
    for i, profile in enumerate(s.profiles):
        weights, largest = PROFILES[profile]
        spec = Spec(socket=str(served.socket), client=i + 1, first_sector=i * region,
                    sectors=region, seconds=s.seconds, depth=s.depth,
                    seed=s.seed * 1000 + i, pool_seed=s.seed, max_write_sectors=largest,
                    weights=weights, model_path=str(tmp / f"model-{i}"),
                    drain_timeout=latency_bound(s))
        clients.append((spec, _client_process(spec)))
    for spec, process in clients:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line == "ready", f"client {spec.client} did not connect: {line!r}"
    return clients


def _check_export(s: LoadSettings, clients: list[tuple[Spec, object]], image: bytes,
                  report: LoadReport) -> None:
    """Every sector of the exported volume against the clients' final models."""
    pool = make_pool(s.seed)
    expected = array("Q", bytes(8 * (len(image) // SECTOR)))
    for spec, _ in clients:
        model = array("Q")
        model.frombytes(Path(spec.model_path).read_bytes())
        expected[spec.first_sector:spec.first_sector + spec.sectors] = model
    wrong = 0
    for sector, sector_id in enumerate(expected):
        if image[sector * SECTOR:(sector + 1) * SECTOR] != sector_bytes(pool, sector_id):
            wrong += 1
            if wrong <= 5:
                got = int.from_bytes(image[sector * SECTOR:sector * SECTOR + 8], "little")
                report.failures.append(f"after close, sector {sector}: expected id "
                                       f"{sector_id:#x}, found data starting {got:#x}")
    if wrong > 5:
        report.failures.append(f"after close: {wrong} sectors wrong in all")


def run_load(s: LoadSettings, tmp: Path, password_file: Path,
             request: pytest.FixtureRequest) -> LoadReport:
    env = backend_env_for("s3", tmp, request)
    location = env.new_location()
    cloudnbd("init", "s3", location, f"{s.volume_mib}MiB", *env.cli_args,
             "--password-file", str(password_file), *KDF, env=env.env)
    link = Link(s.rtt, s.up_mib_s * MiB, s.down_mib_s * MiB)
    proxy = FaultProxy(env.cli_args[1], [], link=link)
    port = free_port()
    served = start(tmp, "s3", location, password_file, "--max-dirty",
                   f"{s.max_dirty_mib}MiB", "--cache-size", s.cache_size,
                   "--metrics", f"127.0.0.1:{port}",
                   store_args=["--endpoint-url", proxy.url], env=env.env)
    report = LoadReport(s)
    try:
        clients = _start_clients(s, served, tmp)
        report.idle_pss = sum(pss_by_process(tree(served.process.pid)).values())
        with _Sampler(served.process.pid, port) as sampler:
            began = time.monotonic()
            for _, process in clients:
                assert process.stdin is not None
                process.stdin.write("go\n")
                process.stdin.flush()
            results = []
            for spec, process in clients:
                out, _ = process.communicate(timeout=s.seconds + latency_bound(s) + 120)
                if process.returncode != 0 or not out.strip():
                    report.failures.append(f"client {spec.client} exited "
                                           f"{process.returncode}")
                    continue
                results.append(json.loads(out.strip().splitlines()[-1]))
        uploaded = _metric(port, "cloudnbd_uploaded_bytes")
        report.peak_pss = sum(sampler.peak.values())
        report.peak_by_process = sampler.peak
        middle = began + s.seconds / 2
        report.peak_first_half = max((m for t, m in sampler.series if t < middle),
                                     default=0.0)
        report.peak_second_half = max((m for t, m in sampler.series if t >= middle),
                                      default=0.0)
        report.peak_backlog_mib = sampler.peak_backlog / MiB
        report.failures += sampler.errors
        started = time.monotonic()
        served.close()
        report.close_seconds = time.monotonic() - started
    finally:
        if served.process.poll() is None:
            served.kill()
        proxy.close()
    report.uploaded_mib = uploaded / MiB
    _merge(report, results, s)
    image = tmp / "export.img"
    cloudnbd("export", "s3", location, str(image), *env.cli_args, "--password-file",
             str(password_file), env=env.env)
    _check_export(s, clients, image.read_bytes(), report)
    return report


def _merge(report: LoadReport, results: list[dict], s: LoadSettings) -> None:
    everything: dict[int, int] = {}
    profiles = s.profiles
    for result in results:
        client_histogram: dict[int, int] = {}
        client_max = 0.0
        for kind, summary in result["latency"].items():
            report.requests[kind] = report.requests.get(kind, 0) + summary["count"]
            histogram = {int(k): v for k, v in summary["histogram"].items()}
            for key, count in histogram.items():
                client_histogram[key] = client_histogram.get(key, 0) + count
                everything[key] = everything.get(key, 0) + count
            client_max = max(client_max, summary["max"])
            p999, top = report.latency_by_kind.get(kind, (0.0, 0.0))
            report.latency_by_kind[kind] = (max(p999, _percentile(histogram, 0.999)),
                                            max(top, summary["max"]))
        report.max_latency = max(report.max_latency, client_max)
        report.per_client.append({
            "client": result["client"], "profile": profiles[result["client"] - 1],
            "requests": sum(client_histogram.values()),
            "p99": _percentile(client_histogram, 0.99), "max": client_max,
            "kinds": {kind: (summary["count"], summary["max"])
                      for kind, summary in result["latency"].items()}})
        report.written_mib += result["bytes_written"] / MiB
        report.read_mib += result["bytes_read"] / MiB
        report.failures += [f"client {result['client']}: {f}" for f in result["failures"]]
        if result["failure_count"] > len(result["failures"]):
            report.failures.append(f"client {result['client']}: "
                                   f"{result['failure_count'] - len(result['failures'])} "
                                   f"more failures")
    report.p999 = _percentile(everything, 0.999)
    report.p99 = _percentile(everything, 0.99)


def check(report: LoadReport, long_run: bool = False) -> None:
    """The campaign's assertions, with the summary in every message."""
    s = report.settings
    text = report.summary() + "\n" + report.details()
    assert not report.failures, text + "\n" + "\n".join(report.failures[:20])
    assert len(report.per_client) == s.clients, text
    assert report.max_latency < latency_bound(s), text
    assert report.peak_pss < memory_bound(s, report.idle_pss), text
    if long_run:  # and it does not creep up over the run
        assert report.peak_second_half < report.peak_first_half + GROWTH_SLACK_MIB, text
    # the run tested backpressure: the backlog reached --max-dirty
    assert report.peak_backlog_mib >= s.max_dirty_mib * 0.9, text
    for client in report.per_client:  # every client got past its first window
        assert client["requests"] > s.depth, text
        if client["profile"] == "reader":  # and one that never waits for the link
            assert client["p99"] < reader_bound(s), text
