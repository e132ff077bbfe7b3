"""Every actor on the store: another machine, --force, delete, resize, import, a crash.

No command that exits 0 may lose data, and no server may acknowledge a FLUSH that a later
holder of the volume will not see. "Another machine" is a process with its own
/etc/machine-id, pid namespace and runtime directory (tests/machines.py), sharing this
host's name, as a clone or a container would. Every test runs on file, s3 (SeaweedFS)
and gs (fake-gcs-server).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from cloudnbd import volume
from cloudnbd.codec import ScryptParams
from testbed.served import KDF, Served, cloudnbd, start
from tests.machines import Machine
from tests.nbdclient import NbdClient, NbdError
from tests.servers import BackendEnv

CHUNK = 256 * 1024
SIZE = 16 * CHUNK
SECTOR = 4096


def _init(env: BackendEnv, password: Path, size: int = SIZE) -> str:
    location = env.new_location()
    cloudnbd("init", env.name, location, str(size), "--chunk-size", str(CHUNK),
             *env.cli_args, "--password-file", str(password), *KDF, env=env.env)
    return location


def _serve(env: BackendEnv, tmp: Path, location: str, password: Path, name: str,
           *extra: str, prefix: Sequence[str] = ()) -> Served:
    return start(tmp, env.name, location, password, "--writeback-delay", "0.1", *extra,
                 store_args=env.cli_args, env=env.env, cache=tmp / f"cache-{name}",
                 prefix=prefix)


def _cli(env: BackendEnv, command: str, location: str, *args: str,
         prefix: Sequence[str] = ()) -> object:
    return cloudnbd(command, env.name, location, *env.cli_args, *args, env=env.env,
                    check=False, prefix=prefix)


def _export(env: BackendEnv, tmp: Path, location: str, password: Path) -> bytes:
    out = tmp / f"export-{os.urandom(3).hex()}"
    cloudnbd("export", env.name, location, str(out), *env.cli_args, "--password-file",
             str(password), "--cache", str(tmp / "cache-export"), env=env.env)
    return out.read_bytes()


def _flush_fails(client: NbdClient) -> None:
    with pytest.raises(NbdError) as failed:
        client.flush()
    assert failed.value.errno == errno.EIO


def test_open_force_displaces_the_live_holder_and_no_acknowledged_flush_is_lost(
        backend_env: BackendEnv, tmp_path: Path, password_file: Path,
        other_machine: Machine) -> None:
    env = backend_env
    location = _init(env, password_file)
    a = _serve(env, tmp_path, location, password_file, "a")
    client_a = NbdClient.unix(str(a.socket))
    a0, a3 = os.urandom(CHUNK), os.urandom(CHUNK)
    client_a.pwrite(a0, 0)
    client_a.pwrite(a3, 3 * CHUNK)
    client_a.flush()

    b = _serve(env, tmp_path, location, password_file, "b", "--force",
               prefix=other_machine.prefix)
    client_b = NbdClient.unix(str(b.socket))
    assert client_b.pread(0, CHUNK) == a0  # B's clean cache now holds chunk 0
    b3 = os.urandom(SECTOR)
    client_b.pwrite(b3, 3 * CHUNK + SECTOR)
    client_b.flush()

    # A, displaced, writes over what B flushed and into a chunk B holds clean: its
    # FLUSH must fail, and nothing it uploads may replace B's flushed data.
    client_a.pwrite(os.urandom(CHUNK), 3 * CHUNK)
    late = os.urandom(SECTOR)
    client_a.pwrite(late, 2 * SECTOR)
    _flush_fails(client_a)
    with pytest.raises(NbdError):
        client_a.pwrite(b"x" * SECTOR, 0)  # displaced: every request fails now
    assert a.status()["displaced"]

    b0 = os.urandom(SECTOR)
    client_b.pwrite(b0, SECTOR)
    client_b.flush()
    client_b.close()
    b.close()
    client_a.close()
    closed = a.close(check=False)
    assert closed.returncode == 9, closed.stderr
    assert "taken over" in closed.stderr

    image = _export(env, tmp_path, location, password_file)
    assert image[3 * CHUNK:4 * CHUNK] == a3[:SECTOR] + b3 + a3[2 * SECTOR:]
    assert image[:2 * SECTOR] == a0[:SECTOR] + b0
    # A's late write is in no head: only a commit makes a write visible, and A's
    # commit fails against B's head (E5)
    assert image[2 * SECTOR:3 * SECTOR] == a0[2 * SECTOR:3 * SECTOR]
    assert image[3 * SECTOR:CHUNK] == a0[3 * SECTOR:]
    assert any("took over the lease" in note for note in b.notes), b.notes


def test_force_never_takes_the_lease_of_a_live_server_of_this_machine(
        backend_env: BackendEnv, tmp_path: Path, password_file: Path) -> None:
    env = backend_env
    location = _init(env, password_file)
    a = _serve(env, tmp_path, location, password_file, "a")
    try:
        refused = _cli(env, "open", location, "--force", "--password-file",
                       str(password_file), "--cache", str(tmp_path / "cache-b"),
                       "--socket", str(tmp_path / "b.sock"))
        assert refused.returncode == 9  # type: ignore[attr-defined]
        assert f"open on this machine (pid {a.process.pid})" in refused.stderr  # type: ignore[attr-defined]
        client = NbdClient.unix(str(a.socket))
        client.pwrite(b"still mine" * 400, 0)
        client.flush()  # the holder was not disturbed
        client.close()
    finally:
        a.close()


def test_a_clone_with_this_host_name_does_not_take_a_lease_silently(
        backend_env: BackendEnv, tmp_path: Path, password_file: Path) -> None:
    """The lease a clone (or container) of this machine leaves: this host's name, a pid
    that does not run here, another machine id."""
    env = backend_env
    location = _init(env, password_file)
    dead_pid = 4_000_000 + os.getpid() % 100_000  # above any pid_max: never running here
    clone = {"state": "held", "epoch": 1, "token": "clone", "purpose": "open",
             "host": socket.gethostname(), "machine_id": "0123456789abcdef0123456789abcdef",
             "boot_id": "clone-boot", "pid_ns": "1", "pid": dead_pid, "pid_start": 1,
             "since": 1_700_000_000}
    env.store(location).put("lease", json.dumps(clone).encode())
    refused = _cli(env, "open", location, "--password-file", str(password_file),
                   "--cache", str(tmp_path / "cache"), "--socket", str(tmp_path / "s"))
    assert refused.returncode == 9, refused.stderr  # type: ignore[attr-defined]
    assert f"pid {dead_pid}" in refused.stderr and "--force" in refused.stderr  # type: ignore[attr-defined]
    taken = _serve(env, tmp_path, location, password_file, "me", "--force")
    assert any("(--force)" in note for note in taken.notes)
    taken.close()


def test_delete_import_and_shrink_refuse_while_the_volume_is_open(
        backend_env: BackendEnv, tmp_path: Path, password_file: Path,
        other_machine: Machine) -> None:
    env = backend_env
    location = _init(env, password_file)
    image = tmp_path / "image"
    image.write_bytes(os.urandom(CHUNK))
    pw = ("--password-file", str(password_file))
    for holder in ("this machine", "another machine"):
        machine = other_machine.prefix if holder == "another machine" else []
        server = _serve(env, tmp_path, location, password_file, holder.split()[0],
                        prefix=machine)
        client = NbdClient.unix(str(server.socket))
        data = os.urandom(CHUNK)
        client.pwrite(data, CHUNK)
        client.flush()
        shrink = (*pw, str(SIZE // 2), "--shrink", "--yes")
        for command, args in (("delete", ("--yes",)), ("delete", ("--yes", "--force")),
                              ("import", (*pw, "--yes")), ("import", (*pw, "--yes", "--force")),
                              ("resize", shrink), ("resize", (*shrink, "--force"))):
            if command == "import":
                refused = cloudnbd("import", str(image), env.name, location,
                                   *env.cli_args, *args, env=env.env, check=False)
            else:
                refused = _cli(env, command, location, *args)
            assert refused.returncode == 9, (command, refused.stderr)  # type: ignore[attr-defined]
            assert "open on" in refused.stderr, refused.stderr  # type: ignore[attr-defined]
        client.pwrite(data, 2 * CHUNK)
        client.flush()  # the server was not disturbed
        client.close()
        server.close()
        exported = _export(env, tmp_path, location, password_file)
        assert exported[CHUNK:3 * CHUNK] == data + data
        assert len(exported) == SIZE


def test_after_a_crash_every_command_says_what_happened_and_how_to_recover(
        backend_env: BackendEnv, tmp_path: Path, password_file: Path) -> None:
    env = backend_env
    location = _init(env, password_file)
    server = start(tmp_path, env.name, location, password_file, "--writeback-delay",
                   "3600", store_args=env.cli_args, env=env.env, cache=tmp_path / "c")
    client = NbdClient.unix(str(server.socket))
    data = os.urandom(CHUNK)
    client.pwrite(data, 0)  # acknowledged, not flushed: only in the journal
    server.kill()
    target = f"{env.name} {location}"
    recover = f"`cloudnbd open {target}` replays the journal"
    for command, args in (("close", ()), ("status", ()),
                          ("export", (str(tmp_path / "out"), "--password-file",
                                      str(password_file))),
                          ("delete", ("--yes",))):
        said = _cli(env, command, location, *args)
        assert recover in said.stderr, (command, said.stderr)  # type: ignore[attr-defined]
        assert said.returncode in (9, 11), (command, said.returncode)  # type: ignore[attr-defined]
    # the one way back: open (replays), close (uploads)
    again = start(tmp_path, env.name, location, password_file, store_args=env.cli_args,
                  env=env.env, cache=tmp_path / "c")
    assert any("no longer runs" in note for note in again.notes), again.notes
    again.close()
    assert _export(env, tmp_path, location, password_file)[:CHUNK] == data


def test_close_and_status_find_the_server_whatever_cache_it_uses(
        backend_env: BackendEnv, tmp_path: Path, password_file: Path) -> None:
    env = backend_env
    location = _init(env, password_file)
    server = _serve(env, tmp_path, location, password_file, "elsewhere")
    status = _cli(env, "status", location, "--json")
    assert status.returncode == 0, status.stderr  # type: ignore[attr-defined]
    assert json.loads(status.stdout)["pid"] == server.process.pid  # type: ignore[attr-defined]
    closed = _cli(env, "close", location)
    assert closed.returncode == 0, closed.stderr  # type: ignore[attr-defined]
    server.process.wait(timeout=60)
    not_open = _cli(env, "close", location)
    assert not_open.returncode == 10  # type: ignore[attr-defined]
    assert "not open on this machine" in not_open.stderr  # type: ignore[attr-defined]


def test_grow_goes_through_the_running_server_and_shrink_asks_first(
        backend_env: BackendEnv, tmp_path: Path, password_file: Path) -> None:
    env = backend_env
    location = _init(env, password_file)
    pw = ("--password-file", str(password_file))
    server = _serve(env, tmp_path, location, password_file, "a")
    before = NbdClient.unix(str(server.socket))
    grown = _cli(env, "resize", location, *pw, str(2 * SIZE))
    assert grown.returncode == 0, grown.stderr  # type: ignore[attr-defined]
    assert "through its running server" in grown.stdout  # type: ignore[attr-defined]
    after = NbdClient.unix(str(server.socket))
    assert (before.size, after.size) == (SIZE, 2 * SIZE)
    tail = os.urandom(CHUNK)
    after.pwrite(tail, 2 * SIZE - CHUNK)
    after.flush()
    shrink = _cli(env, "resize", location, *pw, str(SIZE), "--shrink", "--yes")
    assert shrink.returncode == 9 and "close it before shrinking" in shrink.stderr  # type: ignore[attr-defined]
    before.close()
    after.close()
    server.close()
    image = _export(env, tmp_path, location, password_file)
    assert len(image) == 2 * SIZE and image[-CHUNK:] == tail
    unconfirmed = _cli(env, "resize", location, *pw, str(SIZE), "--shrink")
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr  # type: ignore[attr-defined]
    assert volume.read_metadata(env.store(location))[0].size == 2 * SIZE


def test_a_journal_overtaken_by_another_server_is_never_replayed(
        backend_env: BackendEnv, tmp_path: Path, password_file: Path,
        other_machine: Machine) -> None:
    env = backend_env
    location = _init(env, password_file)
    a = start(tmp_path, env.name, location, password_file, "--writeback-delay", "3600",
              store_args=env.cli_args, env=env.env, cache=tmp_path / "cache-a")
    client = NbdClient.unix(str(a.socket))
    client.pwrite(os.urandom(CHUNK), 0)  # never flushed: stays in A's journal
    a.kill()
    b = _serve(env, tmp_path, location, password_file, "b", "--force",
               prefix=other_machine.prefix)
    newer = os.urandom(CHUNK)
    client_b = NbdClient.unix(str(b.socket))
    client_b.pwrite(newer, 0)
    client_b.flush()
    client_b.close()
    b.close()
    back = start(tmp_path, env.name, location, password_file, store_args=env.cli_args,
                 env=env.env, cache=tmp_path / "cache-a")
    back.close()
    assert _export(env, tmp_path, location, password_file)[:CHUNK] == newer
    assert any("not uploaded and kept at" in note for note in back.notes), back.notes


def test_concurrent_metadata_updates_lose_nothing(backend_env: BackendEnv) -> None:
    """Two `passwd` runs that read volume.json at the same time: neither update is lost,
    and a removed key slot does not come back."""
    store = backend_env.store(backend_env.new_location())
    kdf = ScryptParams(n=2**10)
    volume.create(store, SIZE, CHUNK, "first", kdf)
    one, two = volume.unlock(store, "first"), volume.unlock(store, "first")
    assert one.add_password("second", kdf) == 1
    assert two.add_password("third", kdf) == 2  # re-read, added next to "second"
    for password in ("first", "second", "third"):
        volume.unlock(store, password)
    three, four = volume.unlock(store, "first"), volume.unlock(store, "first")
    three.remove_slot(1)
    four.change_password("third", "fourth", kdf)
    assert {s.slot for s in volume.unlock(store, "first").meta.slots} == {0, 2}
    with pytest.raises(volume.WrongPassword):
        volume.unlock(store, "second")  # removed, and it stays removed
    volume.unlock(store, "fourth")


def _wait_for_rounds(served: Served, count: int) -> None:
    """Until served's garbage collector has done count more rounds, full listings or
    quiet ones (each a result the engine handled; the bound only guards a hang)."""
    start_at = served.garbage_rounds()
    deadline = time.monotonic() + 120
    while served.garbage_rounds() < start_at + count:
        assert time.monotonic() < deadline, "the garbage collector did not run"
        time.sleep(0.1)  # polling a condition, bounded by the deadline


def _snapshot(env: BackendEnv, action: str, location: str, password: Path, *args: str,
              prefix: Sequence[str] = ()) -> None:
    cloudnbd("snapshot", action, env.name, location, *args, *env.cli_args,
             "--password-file", str(password), env=env.env, prefix=prefix)


def test_a_displaced_idle_server_never_collects_the_new_holders_objects(
        backend_env: BackendEnv, tmp_path: Path, password_file: Path,
        other_machine: Machine) -> None:
    """A server learns it was displaced only when a head write fails; an idle one never
    writes. Its garbage collector must still never take the new holder's objects (its
    own head names none of them) for garbage."""
    env = backend_env
    location = _init(env, password_file)
    a = _serve(env, tmp_path, location, password_file, "a", "--gc-grace", "0.2")
    client_a = NbdClient.unix(str(a.socket))
    client_a.pwrite(os.urandom(CHUNK), 0)
    client_a.flush()
    _snapshot(env, "create", location, password_file, "s0", "--cache", str(a.cache))

    b = _serve(env, tmp_path, location, password_file, "b", "--force",
               prefix=other_machine.prefix)
    client_b = NbdClient.unix(str(b.socket))
    data = os.urandom(3 * CHUNK)
    client_b.pwrite(data, 0)
    client_b.pwrite(data[:SECTOR], 5 * CHUNK + SECTOR)  # a journal write
    client_b.flush()
    client_b.close()
    b.close()  # a checkpoint: new chunk objects and map pages, B's head names them

    # An idle collector lists only the snapshots while they and its head stay as they
    # were (G5); a snapshot deleted on B's machine makes it list everything again,
    # and no snapshot keeps B's objects.
    listed = int(a.status()["garbage_listings"])  # type: ignore[call-overload]
    _snapshot(env, "delete", location, password_file, "s0", prefix=other_machine.prefix)
    # a round in flight, the full listing, and two more: had that listing taken B's
    # objects for garbage, they would be full listings too, and the last would delete
    _wait_for_rounds(a, 4)
    assert int(a.status()["garbage_listings"]) >= listed + 1  # type: ignore[call-overload]
    image = _export(env, tmp_path, location, password_file)
    assert image[:3 * CHUNK] == data
    assert image[5 * CHUNK + SECTOR:5 * CHUNK + 2 * SECTOR] == data[:SECTOR]
    client_a.close()
    a.close(check=False)
