"""Hostile clients (issue 5, campaign 5): the server answers by the spec or drops that
connection; it never crashes, hangs, leaks memory without bound, or disturbs other
connections' data. One test per bug found, each a plain story.
"""

from __future__ import annotations

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


