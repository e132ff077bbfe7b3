"""A minimal NBD client for tests that need exact control over requests and replies.

Written from the protocol document, independently of cloudnbd.nbd (a test client that
shared code with the server would share its bugs). Fixed newstyle handshake with OPT_GO,
simple replies only, one request at a time unless the caller pipelines with send/recv.
"""

from __future__ import annotations

import socket
import struct

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_ZEROES = 0, 1, 2, 3, 4, 5, 6
FLAG_FUA = 1
OPT_GO = 7
REP_ACK, REP_INFO = 1, 3
INFO_EXPORT = 0


class NbdError(Exception):
    def __init__(self, errno_: int) -> None:
        super().__init__(f"NBD error {errno_}")
        self.errno = errno_


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        got = sock.recv_into(view)
        if not got:
            raise ConnectionError("server closed the connection")
        view = view[got:]
    return bytes(buf)


class NbdClient:
    def __init__(self, sock: socket.socket, export: str = "") -> None:
        self.sock = sock
        self._handle = 0
        if _recv_exact(sock, 8) != NBDMAGIC:
            raise ConnectionError("not an NBD server")
        magic, flags = struct.unpack(">QH", _recv_exact(sock, 10))
        assert magic == IHAVEOPT and flags & 1, "server is not fixed newstyle"
        sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        self.size = -1
        self.flags = 0
        while True:
            magic, option, reply, length = struct.unpack(">QIII", _recv_exact(sock, 20))
            payload = _recv_exact(sock, length)
            assert magic == REPLY_MAGIC and option == OPT_GO
            if reply == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", payload[2:12])
            elif reply == REP_ACK:
                break
            elif reply & 0x80000000:
                raise ConnectionError(f"OPT_GO refused ({reply:#x}): {payload!r}")

    @classmethod
    def tcp(cls, host: str, port: int, export: str = "") -> NbdClient:
        return cls(socket.create_connection((host, port)), export)

    @classmethod
    def unix(cls, path: str, export: str = "") -> NbdClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock, export)

    def send(self, command: int, offset: int, length: int, data: bytes = b"",
             flags: int = 0) -> int:
        self._handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, self._handle,
                                      offset, length) + data)
        return self._handle

    def recv(self, read_length: int | dict[int, int] = 0) -> tuple[int, int, bytes]:
        """(handle, error, data) of the next simple reply. Replies may come in any order:
        with several reads in flight, pass {handle: length} to read the right payload."""
        magic, error, handle = struct.unpack(">IIQ", _recv_exact(self.sock, 16))
        assert magic == SIMPLE_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        length = read_length.get(handle, 0) if isinstance(read_length, dict) else read_length
        data = _recv_exact(self.sock, length) if length and not error else b""
        return handle, error, data

    def _call(self, command: int, offset: int, length: int, data: bytes = b"",
              flags: int = 0, read_length: int = 0) -> bytes:
        handle = self.send(command, offset, length, data, flags)
        got, error, payload = self.recv(read_length)
        assert got == handle
        if error:
            raise NbdError(error)
        return payload

    def pread(self, offset: int, length: int) -> bytes:
        return self._call(CMD_READ, offset, length, read_length=length)

    def pwrite(self, data: bytes, offset: int, fua: bool = False) -> None:
        self._call(CMD_WRITE, offset, len(data), data, FLAG_FUA if fua else 0)

    def flush(self) -> None:
        self._call(CMD_FLUSH, 0, 0)

    def trim(self, offset: int, length: int) -> None:
        self._call(CMD_TRIM, offset, length)

    def zero(self, offset: int, length: int) -> None:
        self._call(CMD_ZEROES, offset, length)

    def close(self) -> None:
        try:
            self.send(CMD_DISC, 0, 0)
        except OSError:
            pass
        self.sock.close()
