"""Hostile clients (issue 5, campaign 5): the server answers by the spec or drops that
connection; it never crashes, hangs, leaks memory without bound, or disturbs other
connections' data. One test per bug found, each a plain story.
"""

from __future__ import annotations

import errno
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudnbd.nbd.device import MemoryDevice
from cloudnbd.nbd.server import NbdServer
from tests import hostile_harness as h
from tests import hostile_model as m
from tests.nbdclient import NbdClient

SIZE = 64 * 2**20


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Live:
    """The NBD layer over a MemoryDevice in this process, on a Unix socket (or TCP on
    loopback without a path), and how to reach it."""

    def __init__(self, path: Path | None, **options: object) -> None:
        self.server = NbdServer(MemoryDevice(SIZE), unix_path=path, port=0,
                                description="memory", **options)  # type: ignore[arg-type]
        self.server.start()
        if path is not None:
            self.connect = h.unix_connector(str(path))
        else:
            self.connect = h.tcp_connector("127.0.0.1", self.server.port or 0)
        self.export = h.learn_export(self.connect)

    def idle(self) -> bool:
        """Every hostile connection is gone, with its threads (none leaked)."""
        return wait_until(lambda: self.server.connection_count == 0 and not any(
            t.name in ("nbd-conn", "nbd-write") for t in threading.enumerate()))

    def stop(self) -> None:
        self.server.shutdown(timeout=10)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    server = Live(tmp_path_factory.mktemp("hostile") / "nbd.sock")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live_tcp() -> Iterator[Live]:
    server = Live(None)
    yield server
    server.stop()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Callable[..., Live]]:
    started: list[Live] = []

    def make(**options: object) -> Live:
        started.append(Live(tmp_path / f"nbd{len(started)}.sock", **options))
        return started[-1]

    yield make
    for server in started:
        server.stop()


class Child:
    """tests/hostile_harness.py serving a MemoryDevice in a child process."""

    def __init__(self, tmp: Path, size: int = SIZE) -> None:
        self.path = tmp / "child.sock"
        self.log = open(tmp / "child.log", "wb")  # noqa: SIM115 - as long as the child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.hostile_harness", str(self.path), str(size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            cwd=Path(__file__).resolve().parent.parent)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == b"ready"
        self.connect = h.unix_connector(str(self.path))

    def connections(self) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(b"connections\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def status(self, field: str) -> int:
        """A VmRSS-style line of /proc/PID/status, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def stop(self) -> str:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self.log.close()
        return Path(self.log.name).read_text()


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Child]:
    server = Child(tmp_path)
    yield server
    if server.process.poll() is None:
        server.stop()



# -- one story per bug found ---------------------------------------------------------------
def test_a_client_that_stops_reading_holds_up_nobody(fresh: Callable[..., Live]) -> None:
    """Found by the hammer: pool threads blocked sending to a client that read nothing,
    and with 32 of them stuck every other connection stopped."""
    live = fresh()
    stalled = NbdClient(live.connect())
    handles = [stalled.send(m.CMD_READ, i * 131072, 131072) for i in range(64)]
    good = NbdClient(live.connect())
    good.sock.settimeout(10)
    for i in range(50):  # each would have timed out behind the stalled client
        good.pwrite(bytes([i]) * 4096, SIZE - 4096)
        assert good.pread(SIZE - 4096, 4096) == bytes([i]) * 4096
    good.close()
    got = {stalled.recv(131072)[0] for _ in handles}  # and the stalled one still gets all
    assert got == set(handles)
    stalled.close()
    assert live.idle()


def test_a_client_that_stops_reading_and_leaves_frees_its_connection(
        fresh: Callable[..., Live]) -> None:
    live = fresh()
    stalled = NbdClient(live.connect())
    for i in range(64):
        stalled.send(m.CMD_READ, i * 1048576 % SIZE, 1048576)
    stalled.sock.close()
    assert live.idle()


def test_the_listener_survives_running_out_of_file_descriptors(child: Child) -> None:
    """Found by a connection flood: accept() failed with EMFILE and the listener thread
    returned, so the server never accepted again, even after the flood left."""
    resource.prlimit(child.process.pid, resource.RLIMIT_NOFILE, (64, 64))
    flood: list[socket.socket] = []
    while len(flood) < 100:  # until one is left waiting: the server is out of descriptors
        flood.append(child.connect())
        flood[-1].settimeout(2)
        try:
            if flood[-1].recv(18, socket.MSG_WAITALL)[:8] == m.NBDMAGIC:
                continue
        except TimeoutError:
            break
    assert len(flood) < 64, "the descriptor limit was never reached"
    for sock in flood:
        sock.close()
    socks: list[socket.socket] = []

    def connected() -> bool:
        try:
            socks.append(child.connect())
        except BlockingIOError:  # the backlog is still full of the flood
            return False
        return True

    assert wait_until(connected)
    client = NbdClient(socks[0])  # must be accepted and served
    client.pwrite(b"z" * 4096, 0)
    assert client.pread(0, 4096) == b"z" * 4096
    client.close()
    assert "Traceback" not in child.stop()


def test_connections_past_the_limit_are_refused_until_one_leaves(
        fresh: Callable[..., Live]) -> None:
    live = fresh(max_connections=4)
    clients = [NbdClient(live.connect()) for _ in range(4)]
    extra = live.connect()
    assert extra.recv(1) == b""  # closed on arrival
    clients.pop().close()
    assert wait_until(lambda: live.server.connection_count == 3)
    late = NbdClient(live.connect())
    late.pwrite(b"x" * 512, 0)
    for client in [*clients, late]:
        client.close()
    assert live.server.connections_refused >= 1


def test_a_stalled_handshake_is_dropped_but_an_idle_session_is_not(
        fresh: Callable[..., Live]) -> None:
    live = fresh(handshake_timeout=0.5)
    idle = NbdClient(live.connect())  # in transmission: may idle as long as it likes
    stalled = live.connect()
    stalled.settimeout(10)
    assert stalled.recv(18, socket.MSG_WAITALL)[:8] == m.NBDMAGIC
    stalled.sendall(struct.pack(">I", 3) + m.option(m.OPT_GO, b"")[:7])
    assert stalled.recv(1) == b""  # dropped at the deadline, long before 10 s
    idle.pwrite(b"y" * 512, 512)
    assert idle.pread(512, 512) == b"y" * 512
    idle.close()


def test_export_name_that_is_not_utf8_ends_the_session(live: Live) -> None:
    """Found by the streams: it was answered with an option reply, which
    NBD_OPT_EXPORT_NAME does not have; the client read it as export data."""
    sock = live.connect()
    assert sock.recv(18, socket.MSG_WAITALL)[:8] == m.NBDMAGIC
    sock.sendall(struct.pack(">I", 3) + m.option(m.OPT_EXPORT_NAME, b"\xff\xfe"))
    assert sock.recv(1) == b""
    sock.close()


def test_a_failed_set_meta_context_unselects_base_allocation(live: Live) -> None:
    """The spec: SET_META_CONTEXT replaces the selected contexts "including when this
    command fails"; the server kept base:allocation selected."""
    sock = live.connect()
    wire = h.Wire(sock, 10)
    wire.recv(18)
    good = m.meta_data(b"", [b"base:allocation"])
    sock.sendall(struct.pack(">I", 3) + m.option(m.OPT_STRUCTURED_REPLY)
                 + m.option(m.OPT_SET_META_CONTEXT, good)
                 + m.option(m.OPT_SET_META_CONTEXT, good[:-1])  # malformed
                 + m.option(m.OPT_GO, m.info_data(b"", [])))
    replies = []
    while not replies or replies[-1][:2] != (m.OPT_GO, m.REP_ACK):
        _, opt, kind, length = struct.unpack(">QIII", wire.recv(20))
        wire.recv(length)
        replies.append((opt, kind))
    assert (m.OPT_SET_META_CONTEXT, m.ERR_INVALID) in replies
    sock.sendall(m.request(m.CMD_BLOCK_STATUS, 1, 0, 4096))
    magic, _, kind, handle, length = struct.unpack(">IHHQI", wire.recv(20))
    assert (magic, kind, handle) == (m.STRUCTURED_MAGIC, m.CHUNK_ERROR, 1)
    assert struct.unpack(">I", wire.recv(length)[:4])[0] == errno.EINVAL
    sock.close()


