"""A warm clean cache must not serve, or build on, what another machine replaced (C6).

Machine A closes cleanly, keeping its clean cache; machine B opens the volume, rewrites
and deletes chunks, flushes and closes; A opens again on its warm cache. Before C6, A
trusted its clean files because its own last stop was clean: it served its old data,
and a partial write of A was laid over its stale clean file and uploaded, over B's
flushed write. Two `--cache` directories play the two machines against one real store;
the fetch counts show that only what the other machine changed is dropped, whether the
file came from an upload or a fetch (the version a GET read must match the listing's).
"""

from __future__ import annotations

import os
from pathlib import Path

from cloudnbd import offline, volume
from cloudnbd.password import read_password_file
from testbed.served import KDF, Served, cloudnbd, start
from tests.nbdclient import NbdClient
from tests.servers import BackendEnv

CHUNK = 256 * 1024
SIZE = 8 * CHUNK
PATCH_AT = CHUNK + 8192  # inside chunk 1, which B rewrites in part


def _machine(env: BackendEnv, tmp: Path, location: str, password: Path, cache: Path
             ) -> Served:
    return start(tmp, env.name, location, password, "--writeback-delay", "0",
                 store_args=env.cli_args, env=env.env, cache=cache)


def _stored(env: BackendEnv, location: str, password: Path, index: int) -> bytes:
    """Chunk index as the store holds it, read behind the servers' backs."""
    vol = volume.unlock(env.store(location), read_password_file(password))
    return offline.read_chunk(vol, index) or bytes(CHUNK)


def _session(served: Served) -> NbdClient:
    return NbdClient.unix(str(served.socket))


def test_a_warm_cache_never_serves_or_uploads_what_another_machine_replaced(
        backend_env: BackendEnv, tmp_path: Path, password_file: Path) -> None:
    env = backend_env
    location = env.new_location()
    cloudnbd("init", env.name, location, str(SIZE), "--chunk-size", "256KiB", *env.cli_args,
             "--password-file", str(password_file), *KDF, env=env.env)
    cache_a, cache_b = tmp_path / "cache-a", tmp_path / "cache-b"
    servers: list[Served] = []
    try:
        # A writes chunks 0-3 and reads them back: its clean cache holds all four.
        old = [os.urandom(CHUNK) for _ in range(4)]
        servers.append(a := _machine(env, tmp_path, location, password_file, cache_a))
        client = _session(a)
        for index, data in enumerate(old):
            client.pwrite(data, index * CHUNK)
        client.flush()
        for index, data in enumerate(old):
            assert client.pread(index * CHUNK, CHUNK) == data
        client.close()
        a.close()

        # B replaces chunk 0, rewrites half of chunk 1, trims chunk 2 (its object goes),
        # and reads chunk 3: its cache holds chunk 0 as uploaded, chunk 3 as fetched.
        servers.append(b := _machine(env, tmp_path, location, password_file, cache_b))
        client = _session(b)
        assert client.pread(3 * CHUNK, CHUNK) == old[3]
        newer0, newer1_half = os.urandom(CHUNK), os.urandom(CHUNK // 2)
        client.pwrite(newer0, 0)
        client.pwrite(newer1_half, CHUNK)
        client.trim(2 * CHUNK, CHUNK)
        client.flush()
        client.close()
        b.close()

        # A again, on its warm cache: a partial write to chunk 1 first, then reads.
        servers.append(a := _machine(env, tmp_path, location, password_file, cache_a))
        client = _session(a)
        patch = os.urandom(4096)
        client.pwrite(patch, PATCH_AT)
        client.flush()
        chunk1 = bytearray(newer1_half + old[1][CHUNK // 2:])
        chunk1[PATCH_AT - CHUNK:PATCH_AT - CHUNK + len(patch)] = patch
        expected = [newer0, bytes(chunk1), bytes(CHUNK), old[3]]
        # The flushed write is in the store, laid over B's chunk, not over A's old one.
        assert _stored(env, location, password_file, 1) == expected[1]
        for index in (3, 0, 2, 1):  # out of order: no read-ahead
            assert client.pread(index * CHUNK, CHUNK) == expected[index], index
        # Only what B changed was dropped: chunk 3 came from the cache, chunks 0 and 1
        # from the store (A's FLUSH put its patch in a journal object, laid over B's chunk
        # 1 when read; chunk 2 is no object).
        assert a.status()["fetches"] == 2
        client.close()
        a.close()

        # B again: A changed only chunk 1, so B keeps the files it uploaded and fetched.
        servers.append(b := _machine(env, tmp_path, location, password_file, cache_b))
        client = _session(b)
        for index in (3, 0, 2, 1):
            assert client.pread(index * CHUNK, CHUNK) == expected[index], index
        assert b.status()["fetches"] == 1  # chunk 1
        client.close()
        b.close()
    finally:
        for served in servers:
            if served.process.poll() is None:
                served.kill()

    for index, data in enumerate(expected):
        assert _stored(env, location, password_file, index) == data, index
