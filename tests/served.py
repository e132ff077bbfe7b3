"""Fixtures that run cloudnbd for tests (testbed/served.py does the running): a real
`cloudnbd open` on a file-backend volume, the NBD layer alone over a MemoryDevice,
a password file."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudnbd.nbd.device import MemoryDevice
from cloudnbd.nbd.server import NbdServer, ServerSettings
from testbed.served import KDF, Served, cloudnbd, make_password_file, start


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    return make_password_file(tmp_path)


@pytest.fixture
def served(tmp_path: Path, password_file: Path) -> Iterator[Served]:
    """A fresh 1 GiB file-backend volume, served."""
    (tmp_path / "bucket").mkdir()
    location = str(tmp_path / "bucket" / "vol")
    cloudnbd("init", "file", location, "1GiB", "--password-file", str(password_file), *KDF)
    server = start(tmp_path, "file", location, password_file, "--writeback-delay", "0.2")
    yield server
    if server.process.poll() is None:
        server.close(check=False)
        if server.process.poll() is None:
            server.kill()


@pytest.fixture
def memory_server(tmp_path: Path) -> Iterator[tuple[NbdServer, MemoryDevice, str]]:
    """The NBD layer alone over a 64 MiB MemoryDevice, in this process."""
    device = MemoryDevice(64 * 2**20)
    server = NbdServer(device, ServerSettings(unix_path=tmp_path / "mem.sock"),
                       description="memory")
    server.start()
    yield server, device, f"nbd+unix:///?socket={tmp_path / 'mem.sock'}"
    threading.Thread(target=server.shutdown, daemon=True).start()
