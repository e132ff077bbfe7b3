"""The operator's story end to end, on S3 (SeaweedFS): a volume defined only in a config
directory is created, seeded, opened and closed by name, scraped by a real Prometheus
whose answers to every query of the Grafana dashboard are checked, watched with
`cloudnbd status`, and finally restored with `cloudnbd export` to a raw image that must
equal what was written.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from testbed.served import KDF, cloudnbd
from testbed.stores import FOREIGN_ENV, S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, Server, free_port
from tests.nbdclient import NbdClient
from tests.prometheus import finite, prometheus

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "cloudnbd.json"
MiB = 2**20
CHUNK = 4 * MiB
USED_COMMANDS = ("read", "write", "flush")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query the dashboard makes."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel["targets"]]


def private_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def config_only_env(etc: Path) -> dict[str, str]:
    """An environment with no cloud credentials at all: they come from etc/ alone."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k not in FOREIGN_ENV}
    env["CLOUDNBD_CONFIG_DIR"] = str(etc)
    return env


def test_config_defined_volume_is_served_scraped_graphed_closed_and_restored(
        tmp_path: Path, seaweedfs: Server) -> None:
    etc = tmp_path / "etc"
    (etc / "volumes.d").mkdir(parents=True)
    metrics_port = free_port()
    socket_path = tmp_path / "backup.sock"
    location = f"{S3_BUCKET}/operator/{os.urandom(6).hex()}"
    (etc / "cloudnbd.conf").write_text(
        f"[defaults]\ncache = {tmp_path / 'cache'}\nwriteback_delay = 0.2\nuploaders = 2\n"
        f"fetchers = 2\n")
    credentials = private_file(etc / "credentials", f"[s3]\naws_access_key_id = "
                               f"{S3_ACCESS_KEY}\naws_secret_access_key = {S3_SECRET_KEY}\n")
    password = private_file(etc / "backup.password", "operator's secret\n")
    (etc / "volumes.d" / "backup.conf").write_text(
        f"[volume]\nbackend = s3\nlocation = {location}\n"
        f"endpoint_url = {seaweedfs.endpoint}\ncredentials = {credentials}\n"
        f"password_file = {password}\nsocket = {socket_path}\n"
        f"metrics = 127.0.0.1:{metrics_port}\n")
    env = config_only_env(etc)

    def run(*args: str) -> str:
        return cloudnbd(*args, env=env).stdout

    # Create and seed by name: three chunks of data, the rest of 64 MiB never stored.
    run("init", "backup", "64MiB", *KDF)
    expected = bytearray(64 * MiB)
    expected[:3 * CHUNK] = os.urandom(3 * CHUNK)
    seed = tmp_path / "seed.img"
    seed.write_bytes(expected[:3 * CHUNK])
    assert "3 chunks stored" in run("import", str(seed), "backup", "--yes")

    instance = f"127.0.0.1:{metrics_port}"
    with prometheus(tmp_path / "prometheus", [instance]) as prom:
        assert "Serving" in run("open", "backup")
        try:
            # The first scrape comes before any I/O, so rates over the window see it all.
            prom.wait_for(f'up{{instance="{instance}"}}', lambda v: v == [1.0])
            client = NbdClient.unix(str(socket_path))
            assert client.pread(CHUNK, CHUNK) == expected[CHUNK:2 * CHUNK]  # a fetch
            news = os.urandom(MiB)
            client.pwrite(news, 3 * CHUNK + 4096)
            client.pwrite(b"\xee" * 8192, 8192)
            client.flush()  # one journal object holds both writes, then the head
            expected[3 * CHUNK + 4096:3 * CHUNK + 4096 + MiB] = news
            expected[8192:16384] = b"\xee" * 8192

            status = json.loads(run("status", "backup", "--json"))
            assert status["connections"] == 1
            assert status["dirty_bytes"] == 0  # the FLUSH is answered: nothing is left
            assert status["upload_rate"] > 0 and status["download_rate"] > 0
            assert status["cache_bytes"] >= CHUNK  # the fetched chunk
            assert status["store_journal_objects"] == 1
            assert status["store_journal_bytes"] > MiB
            shown = run("status", "backup")
            assert re.search(r"^connections:\s+1$", shown, re.MULTILINE), shown
            assert re.search(r"^download rate:\s+[1-9]", shown, re.MULTILINE), shown

            # Prometheus has scraped the front after the I/O: the workers' PUTs and GETs
            # (2 uploaders, 2 fetchers) arrived in it: the journal object and the head,
            # the fetch of chunk 1.
            puts = prom.wait_for(f'cloudnbd_cloud_requests_total{{kind="put",'
                                 f'instance="{instance}"}}', lambda v: v and v[0] >= 2)
            assert puts == [2.0]
            assert prom.values(f'cloudnbd_cloud_requests_total{{kind="get",'
                               f'instance="{instance}"}}') == [1.0]
            assert prom.values(f'cloudnbd_upload_duration_seconds_count{{instance='
                               f'"{instance}"}}') == [1.0]  # the journal object
            assert prom.values(f'cloudnbd_store_journal_objects{{instance='
                               f'"{instance}"}}') == [1.0]
            assert prom.values(f'cloudnbd_nbd_connections{{instance="{instance}"}}'
                               ) == [1.0]

            # The dashboard: its instance variable finds this server, and every query
            # parses and returns numbers. A latency quantile is NaN (a gap in the graph)
            # only for a command that was not used in the window.
            assert instance in prom.label_values("instance", "cloudnbd_backlog_bytes")
            for title, expr in dashboard_queries():
                series = prom.query(expr.replace("$instance", instance))
                values = {sample["metric"].get("command", ""): float(sample["value"][1])
                          for sample in series}
                used = {k: v for k, v in values.items() if k in ("", *USED_COMMANDS)}
                assert finite(list(used.values())), f"{title!r}: {expr} gave {values}"
                if "command" in expr:
                    assert set(used) == set(USED_COMMANDS), f"{title!r}: {values}"
            client.close()
        finally:
            closed = cloudnbd("close", "backup", env=env, check=False)
        assert closed.returncode == 0, closed.stderr
        assert "everything is uploaded" in closed.stdout

    # Restore by name, and as after losing everything but the bucket and the password:
    # no config directory, credentials from the environment.
    restored = tmp_path / "restored.img"
    run("export", "backup", str(restored))
    assert restored.read_bytes() == expected
    bare_env = {**config_only_env(tmp_path / "gone"), "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    again = tmp_path / "again.img"
    cloudnbd("export", "s3", location, str(again), "--endpoint-url", seaweedfs.endpoint,
             "--password-file", str(password), env=bare_env)
    assert again.read_bytes() == expected
