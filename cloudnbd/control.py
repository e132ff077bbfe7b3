"""The control socket of a running volume: `status` and `close` talk to it.

A Unix socket, mode 0600 inside the 0700 cache directory, so only the owner can use it.
Requests and replies are JSON objects, one per line. `close` streams progress lines and
ends with a line holding "done" or "error".

A socket's path may hold at most SUN_PATH_MAX bytes; a deeper cache directory (a long
--cache, or a test's temporary directory) is reached through /proc/self/fd/N/, N a
descriptor of the directory (`_address`), so any cache directory works.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cloudnbd.errors import CloudnbdError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], Callable[[dict[str, Any]], None]], dict[str, Any]]

#: The longest path a Unix socket address holds (sun_path is 108 bytes with its NUL).
SUN_PATH_MAX = 107


@contextmanager
def _address(path: Path) -> Iterator[str]:
    """path as an AF_UNIX address, valid inside the with block (for bind or connect)."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)


class ControlServer:
    """Serves one request per connection, each in its own thread."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            with _address(path) as address:
                self._sock.bind(address)
        finally:
            os.umask(old_umask)
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            def send(message: dict[str, Any]) -> None:
                stream.write(json.dumps(message).encode() + b"\n")
                stream.flush()

            try:
                request = json.loads(stream.readline() or b"{}")
                send(self.handler(request, send))
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as exc:
                log.exception("control request failed")
                try:
                    send({"error": str(exc)})
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def request(path: Path, message: dict[str, Any], timeout: float | None = 10.0
            ) -> Iterator[dict[str, Any]]:
    """Send message to the control socket at path; yield each reply line."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _address(path) as address:
            sock.connect(address)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise CloudnbdError("the volume is not open on this machine (no server at "
                            f"{path})") from None
    with sock, sock.makefile("rwb") as stream:
        stream.write(json.dumps(message).encode() + b"\n")
        stream.flush()
        for line in stream:
            yield json.loads(line)
