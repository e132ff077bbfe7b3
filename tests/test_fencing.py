"""A late request of a dead or displaced writer must not undo a newer write (fencing).

An uploader killed with its PUT already on its way leaves that request in the network:
in a socket buffer, a proxy, a congested link. The engine resubmits the task to a new
uploader, and the client goes on writing and flushing. On format 3 every object is
created under a fresh name, create-if-absent (W1), so the late PUT either finds its
object already made by the resubmitted task (412) or makes an object no head names.

A server displaced by another (open --force elsewhere) may still have uploads on their
way when the new holder commits. They land, but only the head says what the image is,
and the displaced server's head write is conditional on the version it last wrote (W2,
E5): it fails, its FLUSH fails with EIO, and the image is the new holder's.

The late request is played by a relay that holds the first write of a chunk object
until the test releases it: deterministic, against the real SeaweedFS and
fake-gcs-server.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
from pathlib import Path

import pytest

from cloudnbd import offline, volume
from cloudnbd.password import read_password_file
from testbed.served import KDF, Served, cloudnbd, start
from testbed.stores import FaultProxy, _read_request
from tests.machines import Machine
from tests.nbdclient import CMD_FLUSH, NbdClient
from tests.servers import BackendEnv

CHUNK = 256 * 1024
SIZE = 8 * CHUNK
DEADLINE = 120.0


class HoldingProxy(FaultProxy):
    """Relays every request, one per connection, except the first chunk write it sees
    whose method is in `methods`: that one is read whole, then held until release(),
    then passed to the store, whose answer is kept in `late_answer`, and passed on to its
    sender with `deliver` (without, the sender is gone by then: killed)."""

    def __init__(self, target: str, methods: tuple[bytes, ...], deliver: bool = False
                 ) -> None:
        self.methods = methods
        self.deliver = deliver
        self.holding = threading.Event()
        self._release = threading.Event()
        self._took = threading.Lock()
        self._taken = False
        self.late_answer = b""
        self.answered = threading.Event()
        super().__init__(target, [], rate=1.0, kinds=("pass",))

    def release(self) -> None:
        self._release.set()

    def _serve(self, client: socket.socket, fault: str | None) -> None:
        with client:
            try:
                head, body = _read_request(client)
            except (ConnectionError, OSError):
                return
            with self._took:
                hold = (not self._taken and head.split(b" ", 1)[0] in self.methods
                        and b"chunks" in head + body[:4096])
                self._taken = self._taken or hold
            if not hold:
                self._pass(client, head, body)
                return
            self.holding.set()
            self._release.wait()
            response = self._forward(head, body)
            self.late_answer = response.split(b"\r\n", 1)[0]
            self.answered.set()
            if self.deliver:
                self._answer(client, response)

    def _pass(self, client: socket.socket, head: bytes, body: bytes) -> None:
        self._answer(client, self._forward(head, body))


def _wait(event: threading.Event, what: str) -> None:
    if not event.wait(DEADLINE):
        raise AssertionError(f"timed out waiting for {what}")


def _serve_through(env: BackendEnv, proxy: HoldingProxy, tmp: Path, password: Path
                   ) -> tuple[Served, str]:
    location = env.new_location()
    cloudnbd("init", env.name, location, str(SIZE), "--chunk-size", "256KiB",
             *env.cli_args, "--password-file", str(password), *KDF, env=env.env)
    store_args, served_env = env.through(proxy.url)
    served = start(tmp, env.name, location, password, "--writeback-delay", "0",
                   "--uploaders", "1", "--worker-threads", "1",
                   store_args=store_args, env=served_env)
    return served, location


def _kill_uploader(served: Served) -> None:
    """kill -9 the uploader now holding a request in the relay; the server replaces it."""
    pid = served.status()["worker_pids"]["upload"][0]  # type: ignore[index]
    os.kill(pid, signal.SIGKILL)


def _chunk_in_store(env: BackendEnv, location: str, password: Path) -> bytes:
    stored = offline.read_chunk(volume.unlock(env.store(location), read_password_file(password)), 0)
    return stored if stored is not None else bytes(CHUNK)


def _write_and_flush(client: NbdClient, data: bytes) -> None:
    client.pwrite(data, 0)
    client.flush()


def _run(env: BackendEnv, tmp: Path, password: Path, methods: tuple[bytes, ...],
         first: bytes) -> tuple[HoldingProxy, str]:
    """Write `first` to chunk 0 and flush while its upload's request is held and its
    uploader killed; then write newer data, flush, release the held request, close.
    Returns the proxy and the location; the chunk in the store must be the newer data."""
    proxy = HoldingProxy(env.target, methods)
    served, location = _serve_through(env, proxy, tmp, password)
    client = NbdClient.unix(str(served.socket))
    try:
        client.pwrite(first, 0)
        client.send(CMD_FLUSH, 0, 0)
        _wait(proxy.holding, "the first upload to reach the relay")
        _kill_uploader(served)
        assert client.recv()[1] == 0  # the resubmitted upload made the flush succeed
        newer = os.urandom(CHUNK)
        _write_and_flush(client, newer)
        proxy.release()
        _wait(proxy.answered, "the store's answer to the late request")
        client.close()
        served.close()
    finally:
        proxy.close()
        if served.process.poll() is None:
            served.kill()
    assert _chunk_in_store(env, location, password) == newer
    return proxy, location


@pytest.mark.parametrize("backend_env", ["s3", "gs"], indirect=True)
def test_a_late_put_of_a_killed_uploader_cannot_roll_a_chunk_back(
        backend_env: BackendEnv, tmp_path: Path, password_file: Path) -> None:
    proxy, _ = _run(backend_env, tmp_path, password_file, (b"PUT", b"POST"),
                    first=os.urandom(CHUNK))
    assert b" 412 " in proxy.late_answer + b" ", proxy.late_answer


@pytest.mark.parametrize("backend_env", ["s3", "gs"], indirect=True)
def test_a_displaced_writers_late_upload_cannot_change_the_image(
        backend_env: BackendEnv, tmp_path: Path, password_file: Path,
        other_machine: Machine) -> None:
    """Server A's upload of chunk 0 is held in the relay while B, on another machine,
    takes the volume over (--force), writes chunk 0 and FLUSHes. Then A's upload lands
    (a new object) and A goes on to commit it: its head write is refused, its FLUSH
    fails with EIO, and the head names B's data."""
    env = backend_env
    proxy = HoldingProxy(env.target, (b"PUT", b"POST"), deliver=True)
    a, location = _serve_through(env, proxy, tmp_path, password_file)
    client_a = NbdClient.unix(str(a.socket))
    try:
        client_a.pwrite(os.urandom(CHUNK), 0)  # whole: uploaded as a chunk object
        client_a.send(CMD_FLUSH, 0, 0)
        _wait(proxy.holding, "A's upload to reach the relay")
        b = start(tmp_path, env.name, location, password_file, "--force",
                  store_args=env.cli_args, env=env.env, cache=tmp_path / "cache-b",
                  prefix=other_machine.prefix)
        newer = os.urandom(CHUNK)
        client_b = NbdClient.unix(str(b.socket))
        _write_and_flush(client_b, newer)
        client_b.close()
        b.close()
        proxy.release()  # A's upload lands now, and A learns it did
        _wait(proxy.answered, "the store's answer to A's late upload")
        assert b" 200 " in proxy.late_answer + b" ", proxy.late_answer  # a new object
        assert client_a.recv()[1] == errno.EIO  # A's FLUSH: its head write was refused
        assert a.status()["displaced"]
        client_a.close()
        closed = a.close(check=False)
        assert closed.returncode == 9 and "taken over" in closed.stderr, closed.stderr
    finally:
        proxy.close()
        if a.process.poll() is None:
            a.kill()
    assert _chunk_in_store(env, location, password_file) == newer
