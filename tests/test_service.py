"""The running volume as a whole: the lease, close when the cloud is gone, and the
engine's bounds (clean cache size, dirty data)."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from cloudnbd.engine.workers import UploadTask
from testbed.served import CLI, KDF, cloudnbd, on_terminal, start
from testbed.stores import FaultProxy
from tests.engine_harness import CHUNK, EngineRig
from tests.nbdclient import NbdClient
from tests.servers import BackendEnv, backend_env_for


def test_second_open_is_refused_naming_the_holder(
        tmp_path: Path, password_file: Path, request: pytest.FixtureRequest) -> None:
    env = backend_env_for("s3", tmp_path, request)
    location = env.new_location()
    cloudnbd("init", "s3", location, "1GiB", *env.cli_args, "--password-file",
             str(password_file), *KDF, env=env.env)
    first = start(tmp_path, "s3", location, password_file, store_args=env.cli_args,
                  env=env.env, cache=tmp_path / "cache-a")
    try:
        refused = cloudnbd("open", "s3", location, *env.cli_args, "--password-file",
                           str(password_file), "--cache", str(tmp_path / "cache-b"),
                           "--socket", str(tmp_path / "b.sock"), env=env.env, check=False)
        assert refused.returncode == 9
        assert f"volume is open on this machine (pid {first.process.pid})" in refused.stderr
    finally:
        first.close()
    # after close the lease is released: a plain open works again
    again = start(tmp_path, "s3", location, password_file, store_args=env.cli_args,
                  env=env.env, cache=tmp_path / "cache-b")
    again.close()


def test_close_without_the_cloud_keeps_the_data_for_the_next_open(
        tmp_path: Path, password_file: Path, request: pytest.FixtureRequest) -> None:
    env: BackendEnv = backend_env_for("s3", tmp_path, request)
    location = env.new_location()
    cloudnbd("init", "s3", location, "64MiB", *env.cli_args, "--password-file",
             str(password_file), *KDF, env=env.env)
    direct = env.cli_args[1]
    proxy = FaultProxy(direct, [])
    server = start(tmp_path, "s3", location, password_file, "--timeout", "2",
                   "--writeback-delay", "3600", store_args=["--endpoint-url", proxy.url],
                   env=env.env)
    client = NbdClient.unix(str(server.socket))
    data = os.urandom(3 * 2**20)
    client.pwrite(data, 2**20)
    client.close()
    proxy.close()  # the cloud is gone
    result = server.close("--timeout", "3", check=False)
    assert result.returncode != 0
    assert "the data is safe in the local journal" in result.stderr
    server.process.wait(timeout=60)
    # the next open, with the cloud back, uploads what the journal kept
    back = start(tmp_path, "s3", location, password_file, store_args=env.cli_args,
                 env=env.env)
    back.close()
    out = tmp_path / "export"
    cloudnbd("export", "s3", location, str(out), *env.cli_args, "--password-file",
             str(password_file), env=env.env)
    assert out.read_bytes()[2**20:4 * 2**20] == data


def test_close_gives_up_by_its_timeout_says_why_and_exits_as_a_store_error(
        tmp_path: Path, password_file: Path, request: pytest.FixtureRequest) -> None:
    """The server retries each upload for its own --timeout (60 s here); `close
    --timeout 3` stops waiting after 3 s without an upload, shows on the terminal that it
    is retrying, and exits 3 (object store error, cloudnbd.1 EXIT STATUS)."""
    env: BackendEnv = backend_env_for("s3", tmp_path, request)
    location = env.new_location()
    cloudnbd("init", "s3", location, "64MiB", *env.cli_args, "--password-file",
             str(password_file), *KDF, env=env.env)
    proxy = FaultProxy(env.cli_args[1], [])
    server = start(tmp_path, "s3", location, password_file, "--writeback-delay", "3600",
                   store_args=["--endpoint-url", proxy.url], env=env.env)
    client = NbdClient.unix(str(server.socket))
    client.pwrite(os.urandom(2**20), 0)
    client.close()
    proxy.close()  # the cloud is gone
    began = time.monotonic()
    code, _, terminal = on_terminal(
        [*CLI, "close", "s3", location, "--endpoint-url", proxy.url, "--cache",
         str(server.cache), "--timeout", "3"], env=env.env)
    took = time.monotonic() - began
    assert code == 3, terminal
    assert re.search(r"no upload has succeeded for [1-3]s, retrying", terminal), terminal
    last = re.split(r"[\r\n]+", terminal.strip())[-1].replace("\033[K", "")
    assert last.startswith("cloudnbd: error: no upload succeeded for 3s"), terminal
    # bounded by the close's timeout, not by the 60 s the workers would go on retrying
    assert took < 30, took
    server.process.wait(timeout=60)


@pytest.mark.unit
def test_clean_cache_stays_within_its_bound(tmp_path: Path) -> None:
    rig = EngineRig(tmp_path, chunks=32, cache_bytes=4 * CHUNK)
    for index in range(32):
        rig.write(index * CHUNK, os.urandom(CHUNK))
    rig.engine.flush()
    assert rig.engine.clean.bytes <= 4 * CHUNK
    files = list((rig.cache_dir / "clean").iterdir())
    assert len(files) <= 4
    assert rig.read(0, 32 * CHUNK) == rig.cloud_bytes()  # evicted chunks come back


@pytest.mark.unit
def test_writes_past_max_dirty_wait_for_uploads(tmp_path: Path) -> None:
    rig = EngineRig(tmp_path, chunks=64, auto=False, max_dirty=4 * CHUNK)
    for index in range(4):
        rig.write(index * CHUNK, os.urandom(CHUNK))
    blocked = threading.Thread(target=rig.write, args=(10 * CHUNK, os.urandom(CHUNK)))
    blocked.start()
    blocked.join(timeout=0.5)
    assert blocked.is_alive()  # waiting, not failing, not growing
    assert rig.engine.journal.live_bytes == 4 * CHUNK
    while blocked.is_alive():  # uploads make room
        rig.pool.run(rig.pool.wait_for(UploadTask))
        blocked.join(timeout=0.5)
    rig.pool.auto = True
    rig.pool.run_all()
    rig.engine.flush()
    assert rig.engine.journal.live_bytes == 0
