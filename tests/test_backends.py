"""The object-store interface, once per backend, against real stores on loopback.

Faults (503, reset connections, lost answers, truncated bodies) are injected by a real
HTTP relay in front of SeaweedFS or fake-gcs-server (tests.servers.FaultProxy), so the
retry and error paths run through the same SDK code as in production.
"""

from __future__ import annotations

import importlib
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloudnbd.backends import BACKENDS, REGISTRY, StoreOptions, open_store
from cloudnbd.backends.base import ObjectStore, RetryPolicy
from cloudnbd.backends.s3 import S3Credentials
from cloudnbd.errors import BackendError, ObjectNotFound, PreconditionFailed, UsageError
from testbed.stores import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, FaultProxy, free_port
from tests.servers import TEST_SERVERS, BackendEnv

ROOT = Path(__file__).resolve().parent.parent

clouds = pytest.mark.parametrize("backend_env", ["s3", "gs"], indirect=True)
s3_only = pytest.mark.parametrize("backend_env", ["s3"], indirect=True)


def test_put_get_overwrite_and_stat(backend_env: BackendEnv) -> None:
    store = backend_env.store(backend_env.new_location())
    store.check()
    data = os.urandom(5 * 2**20 + 3)
    store.put("chunks/0000000000000001", data)
    assert store.get("chunks/0000000000000001") == data
    store.put("chunks/0000000000000001", b"second")
    assert store.get("chunks/0000000000000001") == b"second"
    found = store.stat("chunks/0000000000000001")
    assert found is not None and (found.key, found.size) == ("chunks/0000000000000001", 6)
    store.put("empty", b"")
    assert store.get("empty") == b""
    found = store.stat("empty")
    assert found is not None and (found.key, found.size) == ("empty", 0)
    assert store.stat("chunks/0000000000000002") is None
    with pytest.raises(ObjectNotFound):
        store.get("chunks/0000000000000002")


def test_put_if_absent_creates_once(backend_env: BackendEnv) -> None:
    store = backend_env.store(backend_env.new_location())
    store.put_if_absent("lease", b"first")
    with pytest.raises(PreconditionFailed):
        store.put_if_absent("lease", b"second")
    with pytest.raises(PreconditionFailed):
        store.put_if_absent("lease", b"first")  # same bytes, but not ours: still refused
    assert store.get("lease") == b"first"
    store.delete("lease")
    store.put_if_absent("lease", b"third")  # free again after a delete
    assert store.get("lease") == b"third"


def test_conditional_writes_succeed_only_on_the_version_last_seen(
        backend_env: BackendEnv) -> None:
    store = backend_env.store(backend_env.new_location())
    first = store.put_if("chunks/0000000000000007", b"one", None)
    with pytest.raises(PreconditionFailed):
        store.put_if("chunks/0000000000000007", b"again", None)  # exists now
    second = store.put_if("chunks/0000000000000007", b"two", first)
    assert second != first
    found = store.stat("chunks/0000000000000007")
    assert found is not None and found.version == second
    with pytest.raises(PreconditionFailed):  # a late write that saw only the first
        store.put_if("chunks/0000000000000007", b"stale", first)
    assert store.get("chunks/0000000000000007") == b"two"
    with pytest.raises(PreconditionFailed):
        store.put_if("chunks/0000000000000008", b"x", second)  # never existed


def test_a_get_names_the_version_of_what_it_read(backend_env: BackendEnv) -> None:
    store = backend_env.store(backend_env.new_location())
    key = "chunks/0000000000000003"
    first = store.put_if(key, b"one", None)
    assert store.get_with_version(key) == (b"one", first)
    second = store.put_if(key, os.urandom(3 * 2**20), first)
    data, version = store.get_with_version(key)
    assert (len(data), version) == (3 * 2**20, second) and version != first
    assert [i.version for i in store.list("chunks/")] == [second]  # what open compares
    store.delete_if(key, second)
    with pytest.raises(ObjectNotFound):
        store.get_with_version(key)


# fake-gcs-server ignores ifGenerationMatch on DELETE (real GCS honours it), so a stale
# conditional delete can only be shown refused on the other stores.
@pytest.mark.parametrize("backend_env", ["file", "s3"], indirect=True)
def test_a_stale_conditional_delete_is_refused(backend_env: BackendEnv) -> None:
    store = backend_env.store(backend_env.new_location())
    first = store.put_if("chunks/0000000000000001", b"one", None)
    second = store.put_if("chunks/0000000000000001", b"two", first)
    with pytest.raises(PreconditionFailed):
        store.delete_if("chunks/0000000000000001", first)
    assert store.get("chunks/0000000000000001") == b"two"
    store.delete_if("chunks/0000000000000001", second)
    assert store.stat("chunks/0000000000000001") is None
    store.delete_if("chunks/0000000000000001", second)  # already gone: fine


def test_delete_is_idempotent(backend_env: BackendEnv) -> None:
    store = backend_env.store(backend_env.new_location())
    store.put("a/b", b"x")
    store.delete("a/b")
    assert store.stat("a/b") is None
    store.delete("a/b")
    store.delete("never-existed")
    assert list(store.list()) == []


def test_list_filters_by_prefix_in_key_order(backend_env: BackendEnv) -> None:
    location = backend_env.new_location()
    store = backend_env.store(location)
    neighbour = backend_env.store(backend_env.new_location())
    neighbour.put("chunks/0000000000000000", b"not in our location")
    keys = [f"chunks/{i:016x}" for i in range(0, 40, 3)] + [
        "chunks-old/0", "chunksum", "keys/slot0", "volume.json", "lease"]
    random.Random(7).shuffle(keys)
    for key in keys:
        store.put(key, key.encode() * 2)
    keys_sorted = sorted(keys)
    listed = list(store.list())
    assert sorted((i.key, i.size) for i in listed) == [(k, 2 * len(k)) for k in keys_sorted]
    assert {i.key: i.version for i in listed} == {k: store.stat(k).version  # type: ignore[union-attr]
                                                  for k in keys}
    # str order, or depth first where the store is a directory tree (see ObjectStore.list)
    assert [i.key for i in listed] in (keys_sorted, sorted(keys, key=lambda k: k.split("/")))
    assert [i.key for i in store.list("chunks/")] == [
        k for k in keys_sorted if k.startswith("chunks/")]
    assert sorted(i.key for i in store.list("chunks")) == [
        k for k in keys_sorted if k.startswith("chunks")]
    assert [i.key for i in store.list("chunks/000000000000001")] == [
        "chunks/0000000000000012", "chunks/0000000000000015", "chunks/0000000000000018",
        "chunks/000000000000001b", "chunks/000000000000001e"]
    assert list(store.list("nothing/")) == []


def test_delete_many(backend_env: BackendEnv) -> None:
    store = backend_env.store(backend_env.new_location())
    keys = [f"chunks/{i:016x}" for i in range(12)] + ["volume.json"]
    for key in keys:
        store.put(key, b"x")
    store.delete_many([*keys[:10], "chunks/missing"])  # a missing key is no error
    assert [i.key for i in store.list()] == sorted(keys[10:])
    store.delete_many([])
    assert len(list(store.list())) == 3


def test_parent_is_the_enclosing_location_up_to_the_top(backend_env: BackendEnv) -> None:
    location = backend_env.new_location()
    store = backend_env.store(f"{location}/a/b")
    store.put("x", b"inner")
    backend_env.store(location).put("x", b"outer")
    parent = store.parent()
    assert parent is not None and parent.get("b/x") == b"inner"
    grandparent = parent.parent()
    assert grandparent is not None and grandparent.get("x") == b"outer"
    assert grandparent.description == backend_env.store(location).description
    top = grandparent
    for _ in range(100):  # up to the bucket root, or /
        above = top.parent()
        if above is None:
            break
        top = above
    assert top.parent() is None
    assert top.get(f"{location.partition('/')[2]}/a/b/x" if backend_env.name != "file"
                   else f"{location.lstrip('/')}/a/b/x") == b"inner"
    assert store.get("x") == b"inner"  # the parents share, never close, its connection


def test_missing_bucket_is_a_clear_error(backend_env: BackendEnv) -> None:
    store = backend_env.store(backend_env.missing_bucket_location())
    with pytest.raises(BackendError, match="does not exist") as info:
        store.check()
    assert not isinstance(info.value, ObjectNotFound)


@clouds
def test_object_calls_on_a_missing_bucket_name_the_bucket(backend_env: BackendEnv) -> None:
    location = backend_env.missing_bucket_location()
    store = backend_env.store(location)
    bucket = location.split("/")[0]
    calls = [lambda: store.get("volume.json"), lambda: list(store.list())]
    if backend_env.name == "gs":  # SeaweedFS creates a missing bucket on PUT; AWS would not
        calls += [lambda: store.put("volume.json", b"x"), lambda: store.delete("volume.json")]
    for call in calls:
        with pytest.raises(BackendError, match=f"bucket '{bucket}' does not exist") as info:
            call()
        assert not isinstance(info.value, ObjectNotFound)


@clouds
def test_unreachable_endpoint_fails_after_the_deadline(
        backend_env: BackendEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()  # nothing listens there once the probe socket is closed
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    options = StoreOptions(endpoint_url=url, retry=RetryPolicy(deadline=1.5))
    store = open_store(backend_env.name, backend_env.new_location(), options)
    started = time.monotonic()
    with pytest.raises(BackendError, match=f"cannot reach {url}"):
        store.get("volume.json")
    elapsed = time.monotonic() - started
    # it gives up when the next backoff would cross the deadline, not exactly at it
    assert store.retries >= 3
    assert 0.5 < elapsed < 5.0


def _through(backend_env: BackendEnv, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch,
             location: str) -> ObjectStore:
    """A store at location whose every request passes through proxy."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    return open_store(backend_env.name, location, StoreOptions(
        endpoint_url=proxy.url, retry=RetryPolicy(deadline=20, initial_delay=0.01)))


@clouds
def test_503_is_retried(backend_env: BackendEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    with FaultProxy(backend_env.target, ["503", "503"]) as proxy:
        store = _through(backend_env, proxy, monkeypatch, backend_env.new_location())
        store.put("volume.json", b"payload")
        assert len(proxy.seen) == 2
        assert store.retries == 2
        assert store.get("volume.json") == b"payload"


@clouds
def test_reset_connection_is_retried(backend_env: BackendEnv,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with FaultProxy(backend_env.target, ["reset"]) as proxy:
        store = _through(backend_env, proxy, monkeypatch, backend_env.new_location())
        store.put("volume.json", b"payload")
        assert store.retries == 1
        assert store.get("volume.json") == b"payload"


@clouds
def test_truncated_body_is_retried(backend_env: BackendEnv,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    location = backend_env.new_location()
    data = os.urandom(300_000)
    backend_env.store(location).put("chunks/0", data)
    with FaultProxy(backend_env.target, ["truncate"]) as proxy:
        store = _through(backend_env, proxy, monkeypatch, location)
        assert store.get("chunks/0") == data
        assert proxy.seen[0].startswith("GET ")
        assert store.retries == 1


@clouds
def test_conditional_put_whose_answer_was_lost_succeeds(
        backend_env: BackendEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first attempt creates the object but its answer is lost; the retry meets 412
    and must recognise the object as its own rather than report a lost race."""
    location = backend_env.new_location()
    with FaultProxy(backend_env.target, ["drop"]) as proxy:
        store = _through(backend_env, proxy, monkeypatch, location)
        store.put_if_absent("lease", b"mine")
        assert len(proxy.seen) == 1
        assert store.retries == 1
        with pytest.raises(PreconditionFailed):
            store.put_if_absent("lease", b"someone else")
        assert store.get("lease") == b"mine"  # through the proxy: gs reads the emulator
        # address from the environment, which points at the proxy until the test ends


@s3_only
def test_wrong_credentials_are_permission_denied(backend_env: BackendEnv) -> None:
    from cloudnbd.backends.s3 import S3Store

    endpoint = backend_env.options.endpoint_url
    for access_key, secret in ((S3_ACCESS_KEY, "not-the-secret"), ("nobody", S3_SECRET_KEY)):
        store = S3Store(S3_BUCKET, "x", endpoint_url=endpoint,
                        credentials=S3Credentials(access_key, secret),
                        retry=RetryPolicy(deadline=2))
        for call in (store.check, lambda s=store: s.get("volume.json")):
            with pytest.raises(BackendError, match="permission denied") as info:
                call()
            assert "secret" not in info.value.message.lower()
            assert S3_SECRET_KEY not in info.value.message
        assert store.retries == 0  # refusals are not retried
        assert secret not in repr(S3Credentials(access_key, secret))


def test_requests_are_counted_by_kind_for_the_thread_that_makes_them(
        backend_env: BackendEnv) -> None:
    """ObjectStore.counting (the metrics' cloudnbd_cloud_requests_total): one per request
    answered, by kind, a missing object's GET included; deleting many keys is one
    DeleteObjects request on S3, one request per key elsewhere; what another thread asks
    of the same store meanwhile is not counted in the block."""
    store = backend_env.store(backend_env.new_location())
    with store.counting() as counts, ThreadPoolExecutor(1) as other:
        store.put("chunks/a", b"x")
        store.put("chunks/b", b"y")
        assert store.get("chunks/a") == b"x"
        with pytest.raises(ObjectNotFound):
            store.get("chunks/missing")
        assert store.stat("chunks/a") is not None
        other.submit(store.put, "volume.json", b"z").result()
        assert [info.key for info in store.list("chunks/")] == ["chunks/a", "chunks/b"]
        with store.counting() as inner:
            store.delete_many(["chunks/a", "chunks/b"])
    deletes = 1 if backend_env.name == "s3" else 2
    assert inner == {"delete": deletes}
    assert counts == {"put": 2, "get": 2, "head": 1, "list": 1, "delete": deletes}


@s3_only
def test_delete_many_in_batches_of_1000(backend_env: BackendEnv) -> None:
    store = backend_env.store(backend_env.new_location())
    keys = [f"chunks/{i:016x}" for i in range(1003)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put(k, b"x"), keys))
    calls: list[int] = []
    store.client.meta.events.register(  # type: ignore[attr-defined]
        "provide-client-params.s3.DeleteObjects",
        lambda params, **_: calls.append(len(params["Delete"]["Objects"])))
    store.delete_many(keys)
    assert calls == [1000, 3]
    assert list(store.list()) == []


def test_malformed_locations_are_usage_errors() -> None:
    assert BACKENDS == ("file", "s3", "gs")
    cases = (("s3", "ab/x", "at least 3"), ("gs", "", "at least 3"), ("s3", "/vol", "at least 3"),
             ("gs", "s3://bucket/x", "malformed"), ("ftp", "x/y", "unknown backend"),
             ("file", "", "directory"))
    for backend, location, message in cases:
        with pytest.raises(UsageError, match=message):
            open_store(backend, location)


@pytest.mark.unit
def test_every_backend_is_shipped_documented_and_tested() -> None:
    """What adding a backend takes beyond its module and its REGISTRY entry."""
    setup, spec = (ROOT / "setup.py").read_text(), (ROOT / "cloudnbd.spec").read_text()
    man = (ROOT / "cloudnbd.1").read_text().split(".SH BACKENDS", 1)[1].split(".SH", 1)[0]
    readme = (ROOT / "README").read_text()
    assert set(TEST_SERVERS) == set(BACKENDS)
    for backend in REGISTRY:
        module = importlib.import_module(backend.module)
        assert callable(module.open_store) and callable(module.warm), backend.name
        assert f'.BI "{backend.name} "' in man, backend.name
        assert f"cloudnbd init {backend.name} " in readme, backend.name
        if backend.sdk is not None:
            assert re.search(rf'"{re.escape(backend.sdk)}[>=<"]', setup), backend.sdk
            assert re.search(rf"^Requires:\s+python3-{re.escape(backend.sdk)}$", spec,
                             re.MULTILINE), backend.sdk
            assert backend.loggers, backend.name


def test_the_front_loads_no_cloud_sdk(tmp_path: Path) -> None:
    """Parsing, config, location checks and runtime keys of every backend stay in the
    registry: the front process never imports an SDK (docs/design.md, "Processes")."""
    sdks = sorted({name for backend in REGISTRY for name in backend.loggers})
    assert "boto3" in sdks and "google" in sdks
    probe = f"""
import sys
from cloudnbd import cli, runtime, service
from cloudnbd.backends import REGISTRY, remote
parser = cli.build_parser()
for backend in REGISTRY:
    args = parser.parse_args(["info", backend.name, "bucket/vol"])
    cli._resolve(args)
    backend.check_location("bucket/vol")
    runtime.volume_key(backend.name, "bucket/vol")
print(sorted(m for m in sys.modules if m.split(".")[0] in {sdks!r}))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={**os.environ, "CLOUDNBD_CONFIG_DIR": str(tmp_path)},
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@s3_only
def test_s3_puts_do_not_wait_for_100_continue(backend_env: BackendEnv) -> None:
    """botocore asks for `Expect: 100-continue` on every PutObject, which costs a round
    trip before the body goes; a small FLUSH is two PUTs in a row, so on an 80 ms link
    that doubled its time (docs/performance.md). The bodies are at most a chunk."""
    store = backend_env.store(backend_env.new_location())
    sent: list[dict[str, str]] = []
    store.client.meta.events.register(  # type: ignore[attr-defined]
        "before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers)))
    store.put("chunks/0000000000000001", os.urandom(300_000))
    store.put_if("head-0000000000000001", b"head", None)
    assert len(sent) == 2
    assert all("Expect" not in headers for headers in sent), sent


@pytest.mark.unit
@pytest.mark.parametrize("jitter", [0.0, 0.5, 1.0])
def test_a_request_failing_to_its_deadline_tells_the_terminal_once_before_giving_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jitter: float) -> None:
    """Whatever the backoff's jitter draws, a request that keeps failing says so (once)
    before the user has waited NOTICE_AFTER seconds in silence. With the least jitter the
    backoff used to jump from just under NOTICE_AFTER to giving up, saying nothing."""
    from cloudnbd.backends import base
    from cloudnbd.backends.file import FileStore

    clock = [0.0]
    monkeypatch.setattr(base.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(base.time, "sleep",
                        lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    monkeypatch.setattr(base.random, "uniform", lambda low, high: low + jitter * (high - low))
    notices: list[tuple[float, str]] = []
    monkeypatch.setattr(base, "retry_notice", lambda line: notices.append((clock[0], line)))
    store = FileStore(tmp_path, retry=RetryPolicy(deadline=4))
    monkeypatch.setattr(store, "is_temp_failure", lambda exc: True)

    def refused() -> None:
        clock[0] += 0.001  # a refused connection answers at once
        raise ConnectionRefusedError("refused")

    with pytest.raises(BackendError, match="HEAD failed after"):
        store.retrying("HEAD", refused)
    assert len(notices) == 1, notices
    when, line = notices[0]
    assert when <= base.NOTICE_AFTER and line.endswith("retrying for up to 4s"), notices
