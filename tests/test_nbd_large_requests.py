"""READ and WRITE requests larger than the advertised maximum payload (issue 15).

A client that did not agree on block sizes (NBD_OPT_EXPORT_NAME, or NBD_OPT_GO without
NBD_INFO_BLOCK_SIZE) may send requests as long as the export; the server streams them
through a buffer of one connection's payload budget, so memory does not grow with the
request. A client that did agree keeps the advertised maximum.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudnbd.nbd.device import DeviceError, MemoryDevice
from cloudnbd.nbd.server import (
    MAX_IN_FLIGHT_BYTES,
    RECV_BUFFER,
    STREAM_PIECE,
    NbdServer,
    ServerSettings,
)
from testbed.served import Served
from tests import nbdclient as raw

MiB = 2**20
BIG = 100 * MiB


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class FailingPastDevice(MemoryDevice):
    """Reads of anything at or past `bad` fail with EIO; writes there too."""

    def __init__(self, size: int, bad: int) -> None:
        super().__init__(size)
        self.bad = bad
        self.writes: list[tuple[int, int]] = []

    def pread_into(self, buf: memoryview, offset: int) -> None:
        if offset + len(buf) > self.bad:
            raise DeviceError(errno.EIO, "medium error")
        super().pread_into(buf, offset)

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        self.writes.append((offset, len(buf)))
        if offset + len(buf) > self.bad:
            raise DeviceError(errno.EIO, "medium error")
        super().pwrite(buf, offset, fua)


@pytest.fixture
def big_memory(tmp_path: Path) -> Iterator[tuple[NbdServer, FailingPastDevice]]:
    """The NBD layer over a 256 MiB MemoryDevice whose last 16 MiB fail."""
    device = FailingPastDevice(256 * MiB, 240 * MiB)
    server = NbdServer(device, ServerSettings(unix_path=tmp_path / "big.sock", port=None))
    server.start()
    yield server, device
    threading.Thread(target=server.shutdown, daemon=True).start()


def _client(server: NbdServer) -> raw.NbdClient:
    client = raw.NbdClient.unix(str(server.unix_path))  # OPT_GO without BLOCK_SIZE
    client.sock.settimeout(120)
    return client


def test_100_mib_write_and_read_without_block_size_negotiation(
        big_memory: tuple[NbdServer, FailingPastDevice]) -> None:
    server, device = big_memory
    client = _client(server)
    data = pattern(BIG, 1)
    offset = 3 * MiB + 512  # not on a piece boundary: the cuts still fall on sectors
    client.pwrite(data, offset, fua=True)
    assert device.flushes == 1  # FUA covered the whole request with one flush
    pieces = [w for w in device.writes if w[0] >= offset]
    assert sum(n for _, n in pieces) == BIG
    assert all(n <= STREAM_PIECE for _, n in pieces)
    assert all((at + n) % 4096 == 0 for at, n in pieces[:-1])
    assert client.pread(offset, BIG) == data
    assert client.pread(offset - 512, 1024) == bytes(512) + data[:512]
    client.close()


def test_a_large_write_that_fails_is_drained_and_answered(
        big_memory: tuple[NbdServer, FailingPastDevice]) -> None:
    server, _ = big_memory
    client = _client(server)
    handle = client.send(raw.CMD_WRITE, 200 * MiB, 50 * MiB, bytes(50 * MiB))
    assert client.recv() == (handle, errno.EIO, b"")
    assert client.pread(0, 4096) == bytes(4096)  # still in step


def test_a_simple_reply_that_fails_midway_hangs_up(
        big_memory: tuple[NbdServer, FailingPastDevice]) -> None:
    """The spec: once a simple reply's header went out without an error, a failure can
    only be reported by a hard disconnect."""
    server, _ = big_memory
    client = _client(server)
    handle = client.send(raw.CMD_READ, 200 * MiB, 50 * MiB)
    magic, error, got = struct.unpack(">IIQ", raw._recv_exact(client.sock, 16))
    assert (magic, error, got) == (raw.SIMPLE_REPLY_MAGIC, 0, handle)
    received = 0
    while chunk := client.sock.recv(MiB):
        received += len(chunk)
    assert 0 < received < 50 * MiB
    failing_at_once = _client(server)  # the first piece fails: an ordinary error
    handle = failing_at_once.send(raw.CMD_READ, 236 * MiB, 20 * MiB)
    assert failing_at_once.recv() == (handle, errno.EIO, b"")


def test_an_agreed_maximum_still_holds(big_memory: tuple[NbdServer, FailingPastDevice]
                                       ) -> None:
    server, _ = big_memory
    result = _nbdsh(server, """
t("agreed_read", lambda: h.pread(33 * 2**20, 0))
t("agreed_write", lambda: h.pwrite(bytes(33 * 2**20), 0))
""", agree=True)
    assert result == {"agreed_read": errno.EINVAL, "agreed_write": errno.EINVAL}


def test_structured_replies_split_large_reads_and_report_errors_with_offsets(
        big_memory: tuple[NbdServer, FailingPastDevice]) -> None:
    """libnbd (which takes at most 64 MiB per request) without block sizes: a large
    read comes as several chunks, or as one with DF; a failure midway is an error chunk
    after the data read so far."""
    server, _ = big_memory
    result = _nbdsh(server, """
import os
data = os.urandom(64 * 2**20)
h.pwrite(data, 4096)
res["read"] = h.pread(64 * 2**20, 4096) == data
chunks = []
def chunk(sub, offset, status, err):
    chunks.append((offset, len(sub)))
    return 0
res["df_read"] = h.pread_structured(64 * 2**20, 4096, chunk,
                                    flags=nbd.CMD_FLAG_DF) == data
res["df_chunks"] = chunks
t("failing_read", lambda: h.pread(40 * 2**20, 210 * 2**20))
t("failing_df_read", lambda: h.pread(40 * 2**20, 210 * 2**20, flags=nbd.CMD_FLAG_DF))
res["after"] = h.pread(4096, 4096) == data[:4096]
""")
    assert result == {"read": True, "df_read": True, "df_chunks": [[4096, 64 * MiB]],
                      "failing_read": errno.EIO, "failing_df_read": errno.EIO,
                      "after": True}


def _nbdsh(server: NbdServer, script: str, agree: bool = False) -> dict[str, object]:
    import json

    prelude = (
        "import errno, json, nbd\n"
        "res = {}\n"
        "def t(name, fn):\n"
        "    try:\n"
        "        fn(); res[name] = 0\n"
        "    except nbd.Error as e:\n"
        "        res[name] = getattr(errno, e.errno) if isinstance(e.errno, str) "
        "else e.errno\n"
    )
    setup = (f"h.set_request_block_size({agree})\n"
             "h.set_strict_mode(0)\n"
             f"h.connect_uri('nbd+unix:///?socket={server.unix_path}')\n")
    env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
    result = subprocess.run(["nbdsh", "-c", prelude + setup + script
                             + "\nprint(json.dumps(res))"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the real server: data and the front's memory ------------------------------------------
def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def test_100_mib_requests_to_cloudnbd_open_keep_the_front_small(served: Served) -> None:
    pid = served.process.pid
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(served.socket))
    client = raw.NbdClient(sock)
    sock.settimeout(300)
    client.pwrite(b"warm" * 1024, 0)  # the first request's one-time allocations
    assert client.pread(0, 4096) == b"warm" * 1024
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status(pid, "VmRSS")
    data = pattern(BIG, 2)
    client.pwrite(data, 300 * MiB + 4096, fua=True)
    assert client.pread(300 * MiB + 4096, BIG) == data
    growth = _status(pid, "VmHWM") - before
    client.close()
    # one streamed piece, the receive buffer, and room for the engine's own buffers;
    # a request held whole would add 100 MiB
    bound = MAX_IN_FLIGHT_BYTES + RECV_BUFFER + STREAM_PIECE + 8 * MiB
    print(f"front RSS {before / MiB:.0f} MiB before, peak growth {growth / MiB:.1f} MiB "
          f"(bound {bound / MiB:.0f} MiB)")
    assert growth < bound
    assert served.close().returncode == 0
