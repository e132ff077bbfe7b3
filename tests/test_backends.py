"""The object-store interface, once per backend, against real stores on loopback."""

from __future__ import annotations

import os
import socket

import pytest

from cloudnbd.backends import StoreOptions, open_store
from cloudnbd.backends.base import ObjectInfo, RetryPolicy
from cloudnbd.errors import BackendError, ObjectNotFound, PreconditionFailed, UsageError
from tests.proxy import HttpProxy
from tests.servers import BackendEnv


def test_put_get_overwrite_and_stat(backend_env: BackendEnv) -> None:
    store = backend_env.store(backend_env.new_location())
    store.check()
    data = os.urandom(5 * 2**20 + 3)
    store.put("chunks/0000000000000001", data)
    assert store.get("chunks/0000000000000001") == data
    store.put("chunks/0000000000000001", b"second")
    assert store.get("chunks/0000000000000001") == b"second"
    assert store.stat("chunks/0000000000000001") == ObjectInfo("chunks/0000000000000001", 6)
    assert store.stat("chunks/0000000000000002") is None
    with pytest.raises(ObjectNotFound):
        store.get("chunks/0000000000000002")


def test_put_if_absent_creates_once(backend_env: BackendEnv) -> None:
    store = backend_env.store(backend_env.new_location())
    store.put_if_absent("lease", b"first")
    with pytest.raises(PreconditionFailed):
        store.put_if_absent("lease", b"second")
    assert store.get("lease") == b"first"


def test_delete_list_and_delete_many(backend_env: BackendEnv) -> None:
    store = backend_env.store(backend_env.new_location())
    keys = [f"chunks/{i:016x}" for i in range(12)] + ["volume.json", "lease"]
    for key in keys:
        store.put(key, key.encode())
    assert [i.key for i in store.list("chunks/")] == sorted(keys[:12])
    assert sorted(i.key for i in store.list()) == sorted(keys)
    store.delete("lease")
    store.delete("lease")  # deleting a missing object is fine
    store.delete_many(keys[:10])
    assert [i.key for i in store.list()] == sorted([*keys[10:12], "volume.json"])


def test_missing_bucket_is_a_clear_error(backend_env: BackendEnv) -> None:
    store = backend_env.store(backend_env.missing_bucket_location())
    with pytest.raises(BackendError, match="does not exist"):
        store.check()


def test_unreachable_endpoint_fails_after_the_deadline() -> None:
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "x")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "y")
    store = open_store("s3", "somebucket/vol", StoreOptions(
        endpoint_url=f"http://127.0.0.1:{port}", retry=RetryPolicy(deadline=3.0)))
    with pytest.raises(BackendError, match=r"Could not connect|cannot reach"):
        store.get("volume.json")
    assert store.retries > 0


def test_wrong_secret_is_permission_denied(seaweedfs: object, backend_env: BackendEnv
                                           ) -> None:
    if backend_env.name != "s3":
        return  # credentials are checked by the S3 server only
    from cloudnbd.backends.s3 import S3Store

    store = S3Store("cloudnbd-test", "x", endpoint_url=backend_env.options.endpoint_url,
                    access_key="cloudnbdtest", secret_key="not-the-secret",
                    retry=RetryPolicy(deadline=2))
    with pytest.raises(BackendError, match="permission denied"):
        store.check()


def test_transient_errors_are_retried(backend_env: BackendEnv) -> None:
    """A proxy answers the first two requests with 503 SlowDown; the store retries."""
    if backend_env.name == "file":
        return  # nothing between us and a directory to fail
    real = backend_env.options.endpoint_url or os.environ["STORAGE_EMULATOR_HOST"]
    proxy = HttpProxy(real, failures=2)
    options = StoreOptions(endpoint_url=proxy.url, retry=RetryPolicy(deadline=20,
                                                                     initial_delay=0.01))
    location = backend_env.new_location()
    if backend_env.name == "gs":
        os.environ["STORAGE_EMULATOR_HOST"] = proxy.url
    try:
        store = open_store(backend_env.name, location, options)
        store.put("volume.json", b"payload")
        assert store.get("volume.json") == b"payload"
        assert proxy.failed == 2
        if backend_env.name == "s3":
            assert store.retries == 2
        else:  # the GCS library makes one bucket lookup of its own and ignores its failure
            assert 1 <= store.retries <= 2
    finally:
        if backend_env.name == "gs":
            os.environ["STORAGE_EMULATOR_HOST"] = real
        proxy.close()


def test_malformed_locations_are_usage_errors() -> None:
    for backend, location in (("s3", "ab/x"), ("gs", ""), ("ftp", "x/y"), ("file", "")):
        with pytest.raises(UsageError):
            open_store(backend, location)
