"""Cloud faults campaign: a running volume on SeaweedFS (S3) and fake-gcs-server (GCS),
reached through a relay that answers 500 and 503 SlowDown, resets connections, drops
answers after the request took effect, truncates bodies and stalls, at random.

Invariant: every FLUSH that succeeds means its writes are in the store (checked by
exporting the volume straight from the store, without the relay, after close); retries
show in the metrics (those of every request: chunks, journal objects, map pages, the
head). The server checkpoints often (a small --checkpoint-size), so the faults meet
commits and checkpoints alike. With --flush-timeout, a FLUSH during an outage fails with EIO by
its deadline, and the data stays in the journal and reaches the store when it is back.

The default tier runs 4 rounds per backend at a 30% fault rate; `make test-slow` runs
40 rounds per backend.
"""

from __future__ import annotations

import errno
import random
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.served import KDF, Served, cloudnbd, start
from testbed.stores import FaultProxy, free_port
from tests.nbdclient import NbdClient, NbdError
from tests.servers import BackendEnv, backend_env_for

SIZE = 32 * 2**20
SECTOR = 4096
KINDS = ("500", "503", "reset", "drop", "truncate", "stall")


@dataclass
class Report:
    backend: str
    rounds: int
    writes: int
    injected: dict[str, int]
    retries: float
    mismatched_sectors: int

    def summary(self) -> str:
        faults = sum(self.injected.values())
        return (f"cloud-fault campaign ({self.backend}): {self.rounds} rounds, "
                f"{self.writes} writes, {faults} faults injected "
                f"({', '.join(f'{k} {v}' for k, v in sorted(self.injected.items()))}), "
                f"{self.retries:.0f} retries counted, {self.mismatched_sectors} sectors lost")


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return sum(float(line.split()[-1]) for line in text.decode().splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def _new_volume(env: BackendEnv, password_file: Path) -> str:
    location = env.new_location()
    cloudnbd("init", env.name, location, str(SIZE), "--chunk-size", "256KiB",
             *env.cli_args, "--password-file", str(password_file), *KDF, env=env.env)
    return location


def _exported(env: BackendEnv, location: str, password_file: Path, tmp: Path) -> bytes:
    out = tmp / f"export-{location.replace('/', '-')}"
    cloudnbd("export", env.name, location, str(out), *env.cli_args, "--password-file",
             str(password_file), env=env.env)
    return out.read_bytes()


def run_campaign(backend: str, tmp: Path, password_file: Path,
                 request: pytest.FixtureRequest, rounds: int, seed: int) -> Report:
    env = backend_env_for(backend, tmp, request)
    location = _new_volume(env, password_file)
    proxy = FaultProxy(env.target, [], rate=0.3, kinds=KINDS, seed=seed, stall=1.0)
    store_args, served_env = env.through(proxy.url)
    port = free_port()
    # A small --checkpoint-size: every FLUSH's journal object is soon folded into chunk
    # objects and map pages, so faults meet every kind of request a version-3 server
    # makes during the workload (journal objects, chunks, pages, the head), not at close.
    served = start(tmp, backend, location, password_file, "--writeback-delay", "0",
                   "--checkpoint-size", "64KiB", "--metrics", f"127.0.0.1:{port}",
                   store_args=store_args, env=served_env)
    rng = random.Random(seed)
    model = bytearray(SIZE)
    writes = 0
    client = NbdClient.unix(str(served.socket))
    try:
        for _ in range(rounds):
            for _ in range(24):
                sectors = rng.randint(1, 16)
                offset = rng.randrange(0, SIZE // SECTOR - sectors) * SECTOR
                length = sectors * SECTOR
                if rng.random() < 0.15:
                    client.zero(offset, length)
                    model[offset:offset + length] = bytes(length)
                else:
                    data = rng.randbytes(length)
                    client.pwrite(data, offset)
                    model[offset:offset + length] = data
                writes += 1
            client.flush()  # must succeed: every fault is transient
        retries = _metric(port, "cloudnbd_cloud_retries_total")
    finally:
        client.close()
    served.close()
    proxy.close()
    stored = _exported(env, location, password_file, tmp)
    lost = sum(stored[i:i + SECTOR] != model[i:i + SECTOR] for i in range(0, SIZE, SECTOR))
    return Report(backend, rounds, writes, dict(proxy.injected), retries, lost)


@pytest.mark.parametrize("backend", ["s3", "gs"])
def test_cloud_fault_campaign_fast_tier(backend: str, tmp_path: Path, password_file: Path,
                                        request: pytest.FixtureRequest) -> None:
    report = run_campaign(backend, tmp_path, password_file, request, rounds=4, seed=11)
    print(report.summary())
    assert report.mismatched_sectors == 0
    assert sum(report.injected.values()) >= 10
    assert report.retries > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["s3", "gs"])
def test_cloud_fault_campaign_long_tier(backend: str, tmp_path: Path, password_file: Path,
                                        request: pytest.FixtureRequest) -> None:
    report = run_campaign(backend, tmp_path, password_file, request, rounds=40, seed=12)
    print(report.summary())
    assert report.mismatched_sectors == 0
    assert report.retries > 0


@pytest.mark.parametrize("backend", ["s3", "gs"])
def test_flush_fails_with_eio_by_its_deadline_during_an_outage_and_data_survives(
        backend: str, tmp_path: Path, password_file: Path,
        request: pytest.FixtureRequest) -> None:
    env = backend_env_for(backend, tmp_path, request)
    location = _new_volume(env, password_file)
    # Every connection carries one request, so switching kinds takes effect at once.
    proxy = FaultProxy(env.target, [], rate=1.0, kinds=("pass",))
    store_args, served_env = env.through(proxy.url)
    served: Served = start(tmp_path, backend, location, password_file, "--flush-timeout",
                           "2", "--timeout", "1", "--writeback-delay", "0",
                           store_args=store_args, env=served_env)
    data = random.Random(5).randbytes(2 * 2**20)
    client = NbdClient.unix(str(served.socket))
    try:
        client.pwrite(data, 3 * 2**20)  # acknowledged: it is in the journal
        proxy.kinds = ("503",)  # the store is down
        with pytest.raises(NbdError) as failed:
            client.flush()  # every request to the store fails: EIO after 2 s
        assert failed.value.errno == errno.EIO
        assert client.pread(3 * 2**20, len(data)) == data  # still served from the journal
        proxy.kinds = ("pass",)  # the store is back
        client.flush()
    finally:
        client.close()
    served.close()
    proxy.close()
    assert _exported(env, location, password_file, tmp_path)[3 * 2**20:5 * 2**20] == data
