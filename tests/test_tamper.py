"""Tampering with a volume in its store, seen through a running server: a flipped bit, a
truncated object, two chunk objects swapped, an object copied from another volume. Reads
of those chunks fail with EIO, never wrong data; the event is logged and counted; the
untouched chunks still read; `cloudnbd verify` lists exactly the damaged ones. A
rolled-back volume.json is refused by a machine that has seen a newer one."""

from __future__ import annotations

import errno
import random
import urllib.request
from pathlib import Path

import pytest

from cloudnbd.chunks import chunk_key
from cloudnbd.volume import METADATA_KEY
from tests.nbdclient import NbdClient, NbdError
from tests.served import KDF, cloudnbd, start
from tests.servers import BackendEnv, backend_env_for, free_port

CHUNK = 256 * 1024
SIZE = 16 * CHUNK


def _volume_with_data(env: BackendEnv, tmp: Path, password_file: Path, name: str
                      ) -> tuple[str, bytes]:
    """A volume whose first 8 chunks hold distinct random data, uploaded and closed."""
    location = env.new_location()
    cloudnbd("init", env.name, location, str(SIZE), "--chunk-size", "256KiB",
             *env.cli_args, "--password-file", str(password_file), *KDF, env=env.env)
    data = random.Random(name).randbytes(8 * CHUNK)
    served = start(tmp, env.name, location, password_file, store_args=env.cli_args,
                   env=env.env, cache=tmp / f"cache-{name}")
    client = NbdClient.unix(str(served.socket))
    client.pwrite(data, 0)
    client.flush()
    client.close()
    served.close()
    return location, data


@pytest.mark.parametrize("backend", ["s3", "gs"])
def test_tampered_chunks_read_as_eio_are_counted_logged_and_listed_by_verify(
        backend: str, tmp_path: Path, password_file: Path,
        request: pytest.FixtureRequest) -> None:
    env = backend_env_for(backend, tmp_path, request)
    location, data = _volume_with_data(env, tmp_path, password_file, "victim")
    other, _ = _volume_with_data(env, tmp_path, password_file, "other")
    store, foreign = env.store(location), env.store(other)
    flipped = bytearray(store.get(chunk_key(0)))
    flipped[len(flipped) // 2] ^= 0x01
    store.put(chunk_key(0), bytes(flipped))
    store.put(chunk_key(1), store.get(chunk_key(1))[:-100])
    two, three = store.get(chunk_key(2)), store.get(chunk_key(3))
    store.put(chunk_key(2), three)
    store.put(chunk_key(3), two)
    store.put(chunk_key(4), foreign.get(chunk_key(4)))
    damaged = {0, 1, 2, 3, 4}

    port = free_port()
    served = start(tmp_path, backend, location, password_file, "--metrics",
                   f"127.0.0.1:{port}", store_args=env.cli_args, env=env.env,
                   cache=tmp_path / "fresh-cache")
    client = NbdClient.unix(str(served.socket))
    try:
        for index in range(8):
            if index in damaged:
                with pytest.raises(NbdError) as failed:
                    client.pread(index * CHUNK, 4096)
                assert failed.value.errno == errno.EIO
            else:
                assert client.pread(index * CHUNK, CHUNK) == data[index * CHUNK:
                                                                  (index + 1) * CHUNK]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                         timeout=10).read().decode()
    finally:
        client.close()
    served.close()
    counted = sum(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("cloudnbd_integrity_errors_total"))
    assert counted >= len(damaged)
    log = (tmp_path / "server.log").read_text()
    for index in damaged:
        assert f"chunk {index}: authentication failed" in log

    result = cloudnbd("verify", backend, location, *env.cli_args, "--password-file",
                      str(password_file), env=env.env, check=False)
    assert result.returncode != 0
    listed = {int(line.split()[2]) for line in result.stdout.splitlines()
              if line.startswith("damaged: chunk")}
    assert listed == damaged


def test_rolled_back_metadata_is_refused_by_a_machine_that_saw_newer(
        tmp_path: Path, password_file: Path, request: pytest.FixtureRequest) -> None:
    env = backend_env_for("s3", tmp_path, request)
    location, _ = _volume_with_data(env, tmp_path, password_file, "rollback")
    store = env.store(location)
    old = store.get(METADATA_KEY)
    new_password = tmp_path / "new-password"
    new_password.write_text("a second password\n")
    new_password.chmod(0o600)
    cloudnbd("passwd", "s3", location, *env.cli_args, "--password-file",
             str(password_file), "--new-password-file", str(new_password), "--add", *KDF,
             env=env.env)  # generation 2
    cache = tmp_path / "cache-rollback"
    start(tmp_path, "s3", location, password_file, store_args=env.cli_args, env=env.env,
          cache=cache).close()  # this machine has now seen generation 2
    store.put(METADATA_KEY, old)  # generation 1 again, genuine but old
    refused = cloudnbd("open", "s3", location, *env.cli_args, "--foreground", "--socket",
                       str(tmp_path / "x.sock"), "--cache", str(cache), "--password-file",
                       str(password_file), env=env.env, check=False)
    assert refused.returncode == 7
    assert "rolled back" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert store.get(METADATA_KEY) == old  # refusing changed nothing
