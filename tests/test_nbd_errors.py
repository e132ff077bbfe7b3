"""Every error case of the protocol layer, by the spec: nbdsh with strict mode off for
what libnbd can send, and raw sockets for what it will not (bad magic, unknown commands
and options, the old EXPORT_NAME ending, payload draining, shutdown and DISC ordering).

The server runs the NBD layer alone over in-memory devices.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudnbd.nbd.device import DeviceError, MemoryDevice
from cloudnbd.nbd.server import NbdServer, ServerSettings
from tests import nbdclient as raw

SIZE = 64 * 2**20


class GatedDevice(MemoryDevice):
    """With the gate closed, FLUSH waits for the test to open it; reads past 32 MiB fail
    with EIO."""

    def __init__(self, size: int, read_only: bool = False) -> None:
        super().__init__(size, read_only)
        self.gate = threading.Event()
        self.gate.set()
        self.flush_started = threading.Event()

    def flush(self) -> None:
        self.flush_started.set()
        self.gate.wait(timeout=60)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        if offset >= 32 * 2**20:
            raise DeviceError(errno.EIO, "backend failure")
        super().pread_into(buf, offset)


def _serve(tmp_path: Path, name: str, device: MemoryDevice, **options: object
           ) -> Iterator[NbdServer]:
    server = NbdServer(device, ServerSettings(unix_path=tmp_path / f"{name}.sock",
                                              **options))  # type: ignore[arg-type]
    server.start()
    yield server
    device.gate.set() if isinstance(device, GatedDevice) else None
    server.shutdown(timeout=10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NbdServer]:
    yield from _serve(tmp_path, "rw", GatedDevice(SIZE))


@pytest.fixture
def read_only_server(tmp_path: Path) -> Iterator[NbdServer]:
    yield from _serve(tmp_path, "ro", GatedDevice(SIZE), read_only=True)


def uri(server: NbdServer) -> str:
    return f"nbd+unix:///?socket={server.unix_path}"


def nbdsh(server: NbdServer, script: str) -> dict[str, object]:
    """Run script in nbdsh (h connected, strict mode off); it prints one JSON object."""
    prelude = (
        "import errno, json\n"
        "h.set_strict_mode(0)\n"
        "res = {}\n"
        "def t(name, fn):\n"
        "    try:\n"
        "        fn(); res[name] = 0\n"
        "    except nbd.Error as e:\n"
        "        res[name] = getattr(errno, e.errno) if isinstance(e.errno, str) else e.errno\n"
    )
    # nbdsh runs `python3 -m nbd`, and the nbd module belongs to Debian's python3
    env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
    result = subprocess.run(["nbdsh", "--base-allocation", "-u", uri(server), "-c",
                             prelude + script + "\nprint(json.dumps(res))"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_bounds_alignment_and_flags_get_the_errors_the_spec_names(server: NbdServer
                                                                  ) -> None:
    res = nbdsh(server, f"""
size = {SIZE}
t("read_past_end", lambda: h.pread(4096, size))
t("read_straddling_end", lambda: h.pread(8192, size - 4096))
t("write_past_end", lambda: h.pwrite(b"x" * 4096, size))
t("write_straddling_end", lambda: h.pwrite(b"x" * 8192, size - 4096))
t("zero_past_end", lambda: h.zero(4096, size))
t("trim_past_end", lambda: h.trim(4096, size))
t("cache_past_end", lambda: h.cache(4096, size))
t("huge_offset", lambda: h.pread(4096, 2**63 - 1))
t("misaligned_read", lambda: h.pread(100, 1))
t("misaligned_write", lambda: h.pwrite(b"x" * 100, 0))
t("read_with_fua", lambda: h.pread(4096, 0, flags=nbd.CMD_FLAG_FUA))
t("write_with_req_one", lambda: h.pwrite(b"x" * 4096, 0, flags=nbd.CMD_FLAG_REQ_ONE))
t("trim_with_no_hole", lambda: h.trim(4096, 0, flags=nbd.CMD_FLAG_NO_HOLE))
t("backend_failure", lambda: h.pread(4096, 40 * 2**20))
t("ok_write_fua", lambda: h.pwrite(b"y" * 4096, 4096, flags=nbd.CMD_FLAG_FUA))
t("ok_df_read", lambda: h.pread(4096, 4096, flags=nbd.CMD_FLAG_DF))
t("ok_fast_zero", lambda: h.zero(65536, 2**20, flags=nbd.CMD_FLAG_FAST_ZERO))
t("ok_zero_no_hole", lambda: h.zero(65536, 2**20, flags=nbd.CMD_FLAG_NO_HOLE))
t("ok_cache", lambda: h.cache(65536, 0))
res["read_back"] = h.pread(4096, 4096) == b"y" * 4096
""")
    einval, enospc, eio = errno.EINVAL, errno.ENOSPC, errno.EIO
    assert res == {
        "read_past_end": einval, "read_straddling_end": einval, "write_past_end": enospc,
        "write_straddling_end": enospc, "zero_past_end": enospc, "trim_past_end": einval,
        "cache_past_end": einval, "huge_offset": einval, "misaligned_read": einval,
        "misaligned_write": einval, "read_with_fua": einval, "write_with_req_one": einval,
        "trim_with_no_hole": einval, "backend_failure": eio, "ok_write_fua": 0,
        "ok_df_read": 0, "ok_fast_zero": 0, "ok_zero_no_hole": 0, "ok_cache": 0,
        "read_back": True}


def test_block_status_and_req_one(server: NbdServer) -> None:
    res = nbdsh(server, """
h.pwrite(b"d" * 65536, 1 << 20)
seen = []
cb = lambda meta, offset, entries, err: seen.append((meta, list(entries)))
h.block_status(4 << 20, 0, cb)
res["all"] = seen[-1]
h.block_status(4 << 20, 0, cb, flags=nbd.CMD_FLAG_REQ_ONE)
res["one"] = seen[-1]
""")
    hole_zero = 3
    assert res["all"] == ["base:allocation",
                          [1 << 20, hole_zero, 65536, 0, (3 << 20) - 65536, hole_zero]]
    assert res["one"] == ["base:allocation", [1 << 20, hole_zero]]


def test_read_only_export_refuses_writes_with_eperm(read_only_server: NbdServer) -> None:
    res = nbdsh(read_only_server, """
t("write", lambda: h.pwrite(b"x" * 4096, 0))
t("trim", lambda: h.trim(4096, 0))
t("zero", lambda: h.zero(4096, 0))
t("read", lambda: h.pread(4096, 0))
t("flush", lambda: h.flush())
res["read_only"] = h.is_read_only()
""")
    assert res == {"write": errno.EPERM, "trim": errno.EPERM, "zero": errno.EPERM,
                   "read": 0, "flush": 0, "read_only": True}


# -- raw sockets: what libnbd will not send -----------------------------------------------

def connect(server: NbdServer) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(server.unix_path))
    return sock


def greet(sock: socket.socket, client_flags: int = 3) -> None:
    assert raw._recv_exact(sock, 8) == raw.NBDMAGIC
    _, flags = struct.unpack(">QH", raw._recv_exact(sock, 10))
    assert flags == 3
    sock.sendall(struct.pack(">I", client_flags))


def option(sock: socket.socket, opt: int, data: bytes = b"") -> tuple[int, bytes]:
    sock.sendall(struct.pack(">QII", raw.IHAVEOPT, opt, len(data)) + data)
    magic, got_opt, reply, length = struct.unpack(">QIII", raw._recv_exact(sock, 20))
    assert magic == raw.REPLY_MAGIC and got_opt == opt
    return reply, raw._recv_exact(sock, length)


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_unknown_option_is_unsupported_and_negotiation_goes_on(server: NbdServer) -> None:
    sock = connect(server)
    greet(sock)
    assert option(sock, 99, b"some data the server must skip")[0] == 0x80000001  # ERR_UNSUP
    assert option(sock, 3)[0] == 2  # LIST still works: REP_SERVER
    raw._recv_exact(sock, 20)  # its ACK
    name = b"nope"
    reply, _ = option(sock, raw.OPT_GO, struct.pack(">I", 4) + name + struct.pack(">H", 0))
    assert reply == 0x80000006  # ERR_UNKNOWN for an export that does not exist
    reply, _ = option(sock, raw.OPT_GO, struct.pack(">IH", 0, 0))
    assert reply == 3  # the default export: REP_INFO (export size and flags) ...
    sock.close()


def test_export_name_sends_124_zeroes_unless_no_zeroes(server: NbdServer) -> None:
    for client_flags, expect_zeroes in ((1, True), (3, False)):
        sock = connect(server)
        greet(sock, client_flags)
        sock.sendall(struct.pack(">QII", raw.IHAVEOPT, 1, 0))  # EXPORT_NAME ""
        size, _ = struct.unpack(">QH", raw._recv_exact(sock, 10))
        assert size == SIZE
        if expect_zeroes:
            assert raw._recv_exact(sock, 124) == bytes(124)
        # transmission works right after: the next bytes are a simple reply
        sock.sendall(struct.pack(">IHHQQI", raw.REQUEST_MAGIC, 0, raw.CMD_READ, 7, 0, 512))
        magic, error, handle = struct.unpack(">IIQ", raw._recv_exact(sock, 16))
        assert (magic, error, handle) == (raw.SIMPLE_REPLY_MAGIC, 0, 7)
        assert raw._recv_exact(sock, 512) == bytes(512)
        sock.close()


def client(server: NbdServer) -> raw.NbdClient:
    return raw.NbdClient.unix(str(server.unix_path))


def test_bad_request_magic_drops_only_that_connection(server: NbdServer) -> None:
    victim, bystander = client(server), client(server)
    victim.sock.sendall(b"\xde\xad\xbe\xef" + bytes(24))
    assert closed(victim.sock)
    bystander.pwrite(b"z" * 4096, 0)
    assert bystander.pread(0, 4096) == b"z" * 4096


def test_unknown_command_and_bad_flush_are_einval(server: NbdServer) -> None:
    c = client(server)
    handle = c.send(99, 0, 4096)
    assert c.recv() == (handle, errno.EINVAL, b"")
    handle = c.send(raw.CMD_FLUSH, 4096, 0)
    assert c.recv() == (handle, errno.EINVAL, b"")
    handle = c.send(7, 0, 4096)  # BLOCK_STATUS without a negotiated meta context
    assert c.recv() == (handle, errno.EINVAL, b"")
    assert c.pread(0, 512) == bytes(512)


def test_rejected_write_payload_is_drained(read_only_server: NbdServer) -> None:
    c = client(read_only_server)
    handle = c.send(raw.CMD_WRITE, 0, 65536, b"\x01" * 65536)
    assert c.recv() == (handle, errno.EPERM, b"")
    handle = c.send(raw.CMD_WRITE, SIZE, 4096, b"\x02" * 4096)
    assert c.recv() == (handle, errno.EPERM, b"")
    assert c.pread(0, 4096) == bytes(4096)  # still in step: the payloads were skipped


def test_replies_come_out_of_order(server: NbdServer) -> None:
    device = server.device
    assert isinstance(device, GatedDevice)
    device.gate.clear()
    c = client(server)
    flush = c.send(raw.CMD_FLUSH, 0, 0)
    device.flush_started.wait(timeout=30)
    read = c.send(raw.CMD_READ, 0, 4096)
    assert c.recv(4096)[0] == read  # the read overtakes the blocked flush
    device.gate.set()
    assert c.recv() == (flush, 0, b"")


def test_shutdown_answers_eshutdown_and_finishes_in_flight(server: NbdServer) -> None:
    device = server.device
    assert isinstance(device, GatedDevice)
    device.gate.clear()
    c = client(server)
    flush = c.send(raw.CMD_FLUSH, 0, 0)
    device.flush_started.wait(timeout=30)
    server.stop_accepting()
    late = c.send(raw.CMD_READ, 0, 4096)
    assert c.recv() == (late, errno.ESHUTDOWN, b"")
    device.gate.set()
    assert c.recv() == (flush, 0, b"")  # the request already running completes


def test_disc_finishes_in_flight_requests_first(server: NbdServer) -> None:
    device = server.device
    assert isinstance(device, GatedDevice)
    device.gate.clear()
    c = client(server)
    flush = c.send(raw.CMD_FLUSH, 0, 0)
    device.flush_started.wait(timeout=30)
    c.send(raw.CMD_DISC, 0, 0)
    device.gate.set()
    assert c.recv() == (flush, 0, b"")
    assert closed(c.sock)
