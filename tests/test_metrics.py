"""The Prometheus endpoint of a running volume: what it counts, that promtool accepts its
names and units, that the workers' transfers reach it, and that the Grafana dashboard
queries only metrics it has. (tests/test_operator.py has a real Prometheus scrape it.)"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from testbed.served import KDF, cloudnbd, start
from testbed.stores import FaultProxy
from tests.nbdclient import NbdClient
from tests.servers import BackendEnv

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "cloudnbd.json"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listeners(port: int) -> list[str]:
    """Addresses with a TCP socket listening on port, from /proc/net/tcp and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.append(socket.inet_ntop(socket.AF_INET,
                                                  bytes.fromhex(address)[::-1]))
                else:
                    found.append(address)  # any IPv6 listener is a failure to report
    return found


def test_metrics_are_served_and_the_dashboard_queries_only_existing_ones(
        tmp_path: Path, password_file: Path) -> None:
    (tmp_path / "bucket").mkdir()
    location = str(tmp_path / "bucket" / "vol")
    cloudnbd("init", "file", location, "64MiB", "--password-file", str(password_file), *KDF)
    port = _free_port()
    server = start(tmp_path, "file", location, password_file, "--metrics", f":{port}")
    try:
        assert _listeners(port) == ["127.0.0.1"]  # no address given: loopback only
        client = NbdClient.unix(str(server.socket))
        client.pwrite(b"m" * 65536, 0)
        client.flush()
        client.pread(0, 4096)
        client.close()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30
                                      ).read().decode()
    finally:
        server.close()
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), \
        f"promtool: {lint.stdout}{lint.stderr}"
    exposed = set(re.findall(r"^(cloudnbd_[a-z_]+)", text, re.MULTILINE))
    assert 'cloudnbd_nbd_request_duration_seconds_count{command="write"} 1.0' in text
    # the FLUSH: one journal object, then the head naming it (format 3, E5)
    assert 'cloudnbd_cloud_objects_written_total{family="journal"} 1.0' in text
    assert 'cloudnbd_cloud_objects_written_total{family="head"} 1.0' in text
    assert 'cloudnbd_cloud_requests_total{kind="put"} 2.0' in text
    queried = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"cloudnbd_[a-z_]+", target["expr"]))
    assert queried, "the dashboard queries nothing"
    assert queried <= exposed, f"dashboard queries missing metrics: {queried - exposed}"


def _scrape(port: int) -> dict[str, float]:
    """Every sample of the endpoint, by its name and labels as exposed."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30
                                  ).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.mark.parametrize("backend_env", ["s3"], indirect=True)
def test_transfers_of_every_worker_process_are_counted_once(
        tmp_path: Path, backend_env: BackendEnv, password_file: Path) -> None:
    """Two uploaders and two fetchers (separate processes) move objects; the front's
    counters must match what the store holds, byte for byte."""
    env, chunk = backend_env, 4 * 2**20
    location = env.new_location()
    cloudnbd("init", env.name, location, "64MiB", *env.cli_args, "--password-file",
             str(password_file), *KDF, env=env.env)
    seed = tmp_path / "seed.img"
    seed.write_bytes(os.urandom(3 * chunk))
    cloudnbd("import", str(seed), env.name, location, *env.cli_args, "--yes",
             "--password-file", str(password_file), env=env.env)
    store = env.store(location)
    before = {info.key: info for info in store.list("")}
    port = _free_port()
    # no write-back before the FLUSH, no checkpoint: what the FLUSH sends is all there is
    server = start(tmp_path, env.name, location, password_file, "--metrics",
                   f"127.0.0.1:{port}", "--uploaders", "2", "--fetchers", "2",
                   "--writeback-delay", "3600", "--checkpoint-age", "3600",
                   store_args=env.cli_args, env=env.env)
    try:
        pids = server.status()["worker_pids"]
        assert len(set(pids["upload"]) | set(pids["fetch"])) == 4  # type: ignore[index]
        client = NbdClient.unix(str(server.socket))
        client.pread(chunk, 4096)             # chunk 1: a fetch
        client.pread(2 * chunk, 4096)         # chunk 2: another
        client.pwrite(b"p" * 4096, 4096)      # chunk 0 partly: into the journal object
        client.pwrite(os.urandom(chunk), 5 * chunk)   # chunk 5 whole: a chunk object
        client.pwrite(b"q" * 4096, 6 * chunk)          # chunk 6 partly: the journal object
        client.flush()
        client.close()
        m = _scrape(port)
        flushed = {info.key: info for info in store.list("")}  # before close folds
    finally:
        server.close()
    new = [info for key, info in flushed.items() if key not in before]
    assert sorted(info.key.split("/")[0] for info in new) == ["chunks", "journal"]
    [head] = [info for key, info in flushed.items() if key.startswith("head-")]
    assert head.version != before[head.key].version
    fetched = [key for key in before if key.startswith(("chunks/0000000000000001-",
                                                          "chunks/0000000000000002-"))]
    assert len(fetched) == 2, sorted(before)
    assert m['cloudnbd_cloud_objects_written_total{family="chunk"}'] == 1
    assert m['cloudnbd_cloud_objects_written_total{family="journal"}'] == 1
    assert m['cloudnbd_cloud_objects_written_total{family="head"}'] == 1
    assert m['cloudnbd_cloud_objects_written_total{family="map"}'] == 0
    assert m['cloudnbd_cloud_requests_total{kind="put"}'] == 3
    assert m['cloudnbd_cloud_requests_total{kind="get"}'] == 2  # the two fetches
    assert m['cloudnbd_cloud_requests_total{kind="delete"}'] == 0
    assert m['cloudnbd_cloud_bytes_total{direction="sent"}'] == sum(
        info.size for info in new) + head.size
    assert m['cloudnbd_cloud_bytes_total{direction="received"}'] == sum(
        before[k].size for k in fetched)
    assert m["cloudnbd_uploaded_bytes_total"] == chunk
    assert m["cloudnbd_upload_duration_seconds_count"] == 2  # the chunk, the journal
    assert m["cloudnbd_fetch_duration_seconds_count"] == 2
    assert m['cloudnbd_nbd_request_duration_seconds_count{command="write"}'] == 3


@pytest.mark.parametrize("backend_env", ["s3"], indirect=True)
def test_garbage_collection_deletes_are_counted_as_requests(
        tmp_path: Path, backend_env: BackendEnv, password_file: Path) -> None:
    """cloudnbd_cloud_requests_total counts the engine's requests by kind, as its help
    says: the objects a checkpoint unnamed all at once are deleted by one round, in one
    DeleteObjects request on S3, and that is one delete (the relay counts the requests);
    the rounds' LISTs and the HEAD of the head count too."""
    env, chunk = backend_env, 4 * 2**20
    location = env.new_location()
    cloudnbd("init", env.name, location, "64MiB", *env.cli_args, "--password-file",
             str(password_file), *KDF, env=env.env)
    port = _free_port()
    with FaultProxy(env.target, []) as proxy:
        args, run_env = env.through(proxy.url)
        server = start(tmp_path, env.name, location, password_file, "--metrics",
                       f"127.0.0.1:{port}", "--gc-grace", "0.5", "--checkpoint-age", "1",
                       store_args=args, env=run_env)
        try:
            client = NbdClient.unix(str(server.socket))
            for _ in range(2):  # the first version of each chunk is garbage after the fold
                for index in range(4):
                    client.pwrite(os.urandom(chunk), index * chunk)
                client.flush()
            client.close()
            deadline = time.monotonic() + 120
            while int(server.status()["garbage_deleted"]) < 4:  # type: ignore[call-overload]
                assert time.monotonic() < deadline, "no garbage was deleted"
                time.sleep(0.2)
            m = _scrape(port)
            deletes = proxy.requests["POST"] + proxy.requests["DELETE"]
            relayed = dict(proxy.requests)  # rounds go on: these only grow after the scrape
        finally:
            server.close()
    assert 1 <= deletes < 4
    assert m['cloudnbd_cloud_requests_total{kind="delete"}'] == deletes
    assert m["cloudnbd_garbage_deleted_objects_total"] >= 4
    # every round lists chunks/, map/, journal/ and snapshots/; the deleting one checks
    # the head (G3) first
    assert 8 <= m['cloudnbd_cloud_requests_total{kind="list"}'] <= relayed["LIST"]
    assert 1 <= m['cloudnbd_cloud_requests_total{kind="head"}'] <= relayed["HEAD"]
