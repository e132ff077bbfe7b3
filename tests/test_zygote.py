"""The zygote and the front's store agent: workers share one loaded cloud SDK, the front
loads none, and every process of a running volume together stays under 150 MB."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cloudnbd.backends import StoreOptions
from cloudnbd.backends.remote import RemoteStore
from cloudnbd.errors import BackendError, ObjectNotFound, PreconditionFailed
from testbed.procs import parent_of, pss_by_process, tree
from testbed.served import KDF, cloudnbd, start
from tests.servers import backend_env_for

MEMORY_GOAL_MIB = 150e6 / 2**20  # the goal is 150 MB (143 MiB), PSS of all processes


def _wait_until(condition: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_remote_store_answers_like_the_store_it_wraps(tmp_path: Path) -> None:
    (tmp_path / "bucket").mkdir()
    store = RemoteStore("file", str(tmp_path / "bucket" / "vol"), StoreOptions())
    with store.counting() as counts:  # the agent's requests count here
        store.put("a", b"alpha")
        assert store.get("a") == b"alpha"
        assert store.stat("a") is not None and store.stat("a").size == 5  # type: ignore[union-attr]
        assert store.get_with_version("a") == (b"alpha", store.stat("a").version)  # type: ignore[union-attr]
        assert store.stat("missing") is None
        with pytest.raises(ObjectNotFound):
            store.get("missing")
        store.put_if_absent("b", b"beta")
        with pytest.raises(PreconditionFailed):
            store.put_if_absent("b", b"other")
        assert store.get("b") == b"beta"
        store.delete("b")
        with pytest.raises(ObjectNotFound):
            store.get("b")
        assert [info.key for info in store.list()] == ["a"]
    assert counts == {"put": 3, "get": 5, "head": 4, "delete": 1, "list": 1}


def test_listing_streams_in_pages_and_survives_an_abandoned_listing(tmp_path: Path) -> None:
    (tmp_path / "bucket").mkdir()
    store = RemoteStore("file", str(tmp_path / "bucket" / "vol"), StoreOptions())
    keys = [f"chunks/{i:016x}" for i in range(2500)]  # more than two agent pages
    for key in keys:
        store.put(key, b"x")
    assert [info.key for info in store.list("chunks/")] == keys
    listing = store.list("chunks/")
    assert next(listing).key == keys[0]
    listing.close()  # the rest of the pages are drained, not read by the next request
    assert store.get(keys[-1]) == b"x"
    store.delete_many(keys[:2000])
    assert [info.key for info in store.list("chunks/")] == keys[2000:]


def test_agent_stops_when_idle_and_a_dead_agent_is_reported_then_replaced(
        tmp_path: Path) -> None:
    (tmp_path / "bucket").mkdir()
    store = RemoteStore("file", str(tmp_path / "bucket" / "vol"), StoreOptions())
    store.put("k", b"v")
    first = store._process.pid
    store.idle()
    assert store._process is None
    assert store.get("k") == b"v"  # a new agent
    second = store._process.pid
    assert second != first
    os.kill(second, signal.SIGKILL)
    with pytest.raises(BackendError, match="agent died"):
        store.get("k")  # seen on the answer, or on the request if the agent was gone
    assert store.get("k") == b"v"
    third = store._process
    os.kill(third.pid, signal.SIGKILL)
    third.join()  # gone for sure: the request itself meets a closed pipe
    with pytest.raises(BackendError, match="agent died"):
        store.get("k")
    assert store.get("k") == b"v"
    fourth = store._process
    os.kill(fourth.pid, signal.SIGKILL)
    fourth.join()
    with pytest.raises(BackendError, match="agent died"):
        next(store.list(""))
    assert store.get("k") == b"v"


def test_agent_reports_a_store_that_cannot_open(tmp_path: Path) -> None:
    with pytest.raises(BackendError):
        RemoteStore("s3", "no-such-bucket-x/vol",
                    StoreOptions(endpoint_url="http://127.0.0.1:9")).check()


def test_open_volume_stays_under_memory_goal_and_dies_with_its_front(
        tmp_path: Path, password_file: Path, request: pytest.FixtureRequest) -> None:
    env = backend_env_for("s3", tmp_path, request)
    location = env.new_location()
    cloudnbd("init", "s3", location, "1TiB", *env.cli_args, "--password-file",
             str(password_file), *KDF, env=env.env)
    served = start(tmp_path, "s3", location, password_file, store_args=env.cli_args,
                   env=env.env)
    front = served.process.pid
    peak: dict[str, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            now = pss_by_process(tree(front))
            if sum(now.values()) > sum(peak.values()):
                peak.clear()
                peak.update(now)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        data = tmp_path / "data"
        data.write_bytes(os.urandom(96 * 2**20))
        subprocess.run(["nbdcopy", "--flush", str(data), served.uri], check=True,
                       timeout=300)
    finally:
        done.set()
        sampler.join()
    assert sum(peak.values()) < MEMORY_GOAL_MIB, peak
    # Workers are children of the zygote, which is the front's child; the store agent
    # has gone since open (it comes back only for the lease release at close).
    roles = {name.split()[1] for name in pss_by_process(tree(front))}
    assert roles == {"front", "zygote", "tracker", "worker"}, roles
    for pid in served.status()["worker_pids"]["upload"]:  # type: ignore[index]
        assert parent_of(parent_of(pid)) == front
    family = tree(front)[1:]
    served.kill()
    _wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in family), 30,
                "the zygote and the workers to die with the front")
