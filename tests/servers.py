"""The object stores as the tests use them: session fixtures for SeaweedFS and
fake-gcs-server (testbed/stores.py starts them), and `backend_env` (see BackendEnv):
fresh locations, and the CLI arguments and environment a `cloudnbd` subprocess needs
for that backend.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from cloudnbd.backends import BACKENDS, StoreOptions, open_store
from cloudnbd.backends.base import ObjectStore, RetryPolicy
from testbed.stores import (
    FOREIGN_ENV,
    GCS_BUCKET,
    S3_ACCESS_KEY,
    S3_BUCKET,
    S3_SECRET_KEY,
    Server,
    create_gcs_bucket,
    s3_client,
    start_fake_gcs,
    start_seaweedfs,
)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """SeaweedFS S3 for the session; `.endpoint` is its URL."""
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """fake-gcs-server for the session; `.endpoint` is the STORAGE_EMULATOR_HOST value."""
    server = start_fake_gcs(tmp_path_factory.mktemp("fake-gcs"))
    yield server
    server.stop()


@dataclass
class BackendEnv:
    """One backend as a test uses it; one subclass per backend of cloudnbd.backends.REGISTRY
    (TEST_SERVERS below), which starts its store server and names its locations.

    name: the backend's name (the CLI's BACKEND argument).
    env: the environment for a `cloudnbd` subprocess (credentials, emulator host).
    cli_args: arguments to add to a `cloudnbd` command line, e.g. ['--endpoint-url', URL].
    options: the StoreOptions for opening stores in the test process (whose environment
      the fixture has set up the same way, through monkeypatch).
    """

    name: str
    root: Path
    env: dict[str, str]
    cli_args: list[str]
    options: StoreOptions

    server_fixture: ClassVar[str | None] = None  # the session's store server, if any

    @staticmethod
    def reach(server: Server) -> tuple[dict[str, str], list[str], StoreOptions]:
        """How to reach server: environment variables, cloudnbd arguments, StoreOptions."""
        return {}, [], StoreOptions()

    def new_location(self) -> str:
        """A location nothing has used: a directory whose parent exists, or BUCKET/PREFIX in
        an existing bucket."""
        raise NotImplementedError

    def new_bucket(self) -> str:
        """The root of a new, empty bucket (file: a new directory whose parent exists)."""
        raise NotImplementedError

    def missing_bucket_location(self) -> str:
        raise NotImplementedError

    def store(self, location: str, deadline: float = 30) -> ObjectStore:
        """A store at location, giving up on transient failures after deadline seconds."""
        options = StoreOptions(endpoint_url=self.options.endpoint_url,
                               retry=RetryPolicy(deadline=deadline))
        return open_store(self.name, location, options)

    @property
    def target(self) -> str:
        """The store server's URL, for a relay in front of it (s3 and gs only)."""
        raise NotImplementedError

    def through(self, url: str) -> tuple[list[str], dict[str, str]]:
        """Command-line arguments and environment for a `cloudnbd` subprocess that
        reaches the store through a relay at url (s3 and gs only)."""
        raise NotImplementedError


class FileEnv(BackendEnv):
    def new_location(self) -> str:
        (self.root / "bucket").mkdir(exist_ok=True)  # the "bucket" exists, like S3's
        return str(self.root / "bucket" / uuid.uuid4().hex[:12])

    def new_bucket(self) -> str:
        return str(self.root / f"bucket-{uuid.uuid4().hex[:12]}")

    def missing_bucket_location(self) -> str:
        return str(self.root / "no-such-dir" / "vol")


class _BucketEnv(BackendEnv):
    bucket = ""  # the bucket the session's server starts with

    def new_location(self) -> str:
        return f"{self.bucket}/tests/{uuid.uuid4().hex[:12]}"

    def new_bucket(self) -> str:
        unique = f"bucket-{uuid.uuid4().hex[:12]}"
        self._create_bucket(unique)
        return unique

    def _create_bucket(self, name: str) -> None:
        raise NotImplementedError

    def missing_bucket_location(self) -> str:
        return f"no-such-bucket-{uuid.uuid4().hex[:8]}/vol"


class S3Env(_BucketEnv):
    bucket = S3_BUCKET
    server_fixture = "seaweedfs"

    @staticmethod
    def reach(server: Server) -> tuple[dict[str, str], list[str], StoreOptions]:
        return ({"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY},
                ["--endpoint-url", server.endpoint], StoreOptions(endpoint_url=server.endpoint))

    def _create_bucket(self, name: str) -> None:
        s3_client(self.target).create_bucket(Bucket=name)  # type: ignore[attr-defined]

    @property
    def target(self) -> str:
        assert self.options.endpoint_url is not None
        return self.options.endpoint_url

    def through(self, url: str) -> tuple[list[str], dict[str, str]]:
        return ["--endpoint-url", url], self.env


class GcsEnv(_BucketEnv):
    bucket = GCS_BUCKET
    server_fixture = "fake_gcs"

    @staticmethod
    def reach(server: Server) -> tuple[dict[str, str], list[str], StoreOptions]:
        return {"STORAGE_EMULATOR_HOST": server.endpoint}, [], StoreOptions()

    def _create_bucket(self, name: str) -> None:
        create_gcs_bucket(self.target, name)

    @property
    def target(self) -> str:
        return self.env["STORAGE_EMULATOR_HOST"]

    def through(self, url: str) -> tuple[list[str], dict[str, str]]:
        return [], {**self.env, "STORAGE_EMULATOR_HOST": url}


#: every backend cloudnbd knows, with the class that serves it to tests
TEST_SERVERS: dict[str, type[BackendEnv]] = {"file": FileEnv, "s3": S3Env, "gs": GcsEnv}


def backend_env_for(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> BackendEnv:
    """The BackendEnv for name; starts the session's server for it if needed."""
    if name not in TEST_SERVERS:
        raise ValueError(f"no test server for backend {name!r}: add one to TEST_SERVERS")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    for var in FOREIGN_ENV:
        monkeypatch.delenv(var, raising=False)
    kind = TEST_SERVERS[name]
    variables: dict[str, str] = {}
    cli_args: list[str] = []
    options = StoreOptions()
    if kind.server_fixture is not None:
        server: Server = request.getfixturevalue(kind.server_fixture)
        variables, cli_args, options = kind.reach(server)
    for var, value in variables.items():  # for this process too, as for subprocesses
        monkeypatch.setenv(var, value)
    return kind(name, tmp_path, {**os.environ, **variables}, cli_args, options)


@pytest.fixture(params=BACKENDS)
def backend_env(request: pytest.FixtureRequest, tmp_path: Path) -> BackendEnv:
    """Each test using this runs once per backend (cloudnbd.backends.BACKENDS), against a
    real store.

    Restrict a test to some backends with
    `@pytest.mark.parametrize("backend_env", ["s3", "gs"], indirect=True)`.
    """
    return backend_env_for(request.param, tmp_path, request)
