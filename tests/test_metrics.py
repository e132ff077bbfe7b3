"""The Prometheus endpoint of a running volume, and the Grafana dashboard against it."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

from tests.nbdclient import NbdClient
from tests.served import KDF, cloudnbd, start

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "cloudnbd.json"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_metrics_are_served_and_the_dashboard_queries_only_existing_ones(
        tmp_path: Path, password_file: Path) -> None:
    (tmp_path / "bucket").mkdir()
    location = str(tmp_path / "bucket" / "vol")
    cloudnbd("init", "file", location, "64MiB", "--password-file", str(password_file), *KDF)
    port = _free_port()
    server = start(tmp_path, "file", location, password_file, "--metrics",
                   f"127.0.0.1:{port}")
    try:
        client = NbdClient.unix(str(server.socket))
        client.pwrite(b"m" * 65536, 0)
        client.flush()
        client.pread(0, 4096)
        client.close()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30
                                      ).read().decode()
    finally:
        server.close()
    exposed = set(re.findall(r"^(cloudnbd_[a-z_]+)", text, re.MULTILINE))
    assert 'cloudnbd_nbd_request_duration_seconds_count{command="write"} 1.0' in text
    assert 'cloudnbd_cloud_requests_total{kind="put"} 1.0' in text
    queried = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"cloudnbd_[a-z_]+", target["expr"]))
    assert queried, "the dashboard queries nothing"
    assert queried <= exposed, f"dashboard queries missing metrics: {queried - exposed}"
