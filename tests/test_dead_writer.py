"""A writer that dies in the middle of a PUT must leave the old object in place.

Workers are killed with kill -9 (by the crash campaign, by the kernel when their front
dies, or by the OOM killer) at any moment, so some die after sending a PUT's headers
and before its body. SeaweedFS answered such a PUT with 200 and stored an empty object
instead of the chunk that was there: the crash campaign's long tier then read EIO
("object truncated (0 bytes)") for a chunk whose data had been flushed long before.
Every PUT now carries a checksum of its body (Content-MD5 on S3, crc32c on GCS), which
the store checks before replacing anything.

The dying writer is played by a relay (a FaultProxy with one more fault) that passes on
only the head of the request and then ends the connection, as the kernel does for a
killed process: deterministic, and the store is the real one.
"""

from __future__ import annotations

import os
import socket

import pytest

from cloudnbd.backends import StoreOptions, open_store
from cloudnbd.backends.base import RetryPolicy
from cloudnbd.errors import BackendError
from testbed.stores import FaultProxy, _read_request, _reset
from tests.servers import BackendEnv

clouds = pytest.mark.parametrize("backend_env", ["s3", "gs"], indirect=True)


class DyingWriterProxy(FaultProxy):
    """FaultProxy with the fault "headers-only": the request's head reaches the store, its
    body never does, and the store sees the connection end (FIN), as it would after the
    sender was killed between the two. The store's answer goes nowhere; the client's
    connection is reset."""

    def __init__(self, target: str, faults: list[str]) -> None:
        self.answers: list[bytes] = []  # the status line the store gave each cut request
        super().__init__(target, faults)

    def _serve(self, client: socket.socket, fault: str | None) -> None:
        if fault != "headers-only":
            super()._serve(client, fault)
            return
        with client:
            head, _ = _read_request(client)
            self.seen.append(head.split(b"\r\n", 1)[0].decode())
            lines = [line for line in head.split(b"\r\n")
                     if not line.lower().startswith((b"connection:", b"expect:"))]
            with socket.create_connection(self.target) as upstream:
                upstream.sendall(b"\r\n".join(lines))
                upstream.shutdown(socket.SHUT_WR)
                answer = b""
                while data := upstream.recv(65536):
                    answer += data
            self.answers.append(answer.split(b"\r\n", 1)[0])
            _reset(client)


@clouds
def test_put_cut_after_its_headers_keeps_the_old_object(
        backend_env: BackendEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    location = backend_env.new_location()
    old = os.urandom(1000)
    backend_env.store(location).put("chunks/0000000000000007", old)
    with DyingWriterProxy(backend_env.target, ["headers-only"]) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        # no retry: the writer is dead, nobody sends the request again
        store = open_store(backend_env.name, location, StoreOptions(
            endpoint_url=proxy.url, retry=RetryPolicy(deadline=0)))
        with pytest.raises(BackendError):
            store.put("chunks/0000000000000007", os.urandom(300_000))
        assert len(proxy.seen) == 1 and proxy.seen[0].split()[0] in ("PUT", "POST")
        assert not proxy.answers[0].startswith(b"HTTP/1.1 2"), proxy.answers
        # later connections are relayed untouched
        assert store.get("chunks/0000000000000007") == old


@clouds
def test_conditional_create_cut_after_its_headers_creates_nothing(
        backend_env: BackendEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease is created this way: an empty lease would read as unreadable."""
    location = backend_env.new_location()
    with DyingWriterProxy(backend_env.target, ["headers-only"]) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        store = open_store(backend_env.name, location, StoreOptions(
            endpoint_url=proxy.url, retry=RetryPolicy(deadline=0)))
        with pytest.raises(BackendError):
            store.put_if_absent("lease", b"holder")
        assert store.stat("lease") is None
        store.put_if_absent("lease", b"holder")
        assert store.get("lease") == b"holder"
