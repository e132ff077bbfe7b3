"""An HTTP/1.1 relay on loopback between a client and a real object store, for tests and
benchmarks: it counts requests by method and can fail the first N with 503 SlowDown.

It parses just enough HTTP to find request boundaries on kept-alive connections (the
request line, headers, and a Content-Length body); that is all S3 and GCS clients send
when streaming checksums are off.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter

_SLOW_DOWN = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
              b"Connection: close\r\nContent-Length: 64\r\n\r\n"
              b"<Error><Code>SlowDown</Code><Message>slow down</Message></Error>")


class HttpProxy:
    def __init__(self, target: str, failures: int = 0) -> None:
        host, port = target.removeprefix("http://").rstrip("/").split(":")
        self.target = (host, int(port))
        self.failures = failures
        self.failed = 0
        self.requests: Counter[str] = Counter()
        self.bytes_up = 0
        self.bytes_down = 0
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            fail = self.failed < self.failures
            if fail:
                self.failed += 1
        if fail:
            client.recv(65536)
            client.sendall(_SLOW_DOWN)
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._downstream, args=(upstream, client), daemon=True).start()
        self._upstream(client, upstream)

    def _upstream(self, src: socket.socket, dst: socket.socket) -> None:
        buffer = b""
        body_left = 0
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
                with self._lock:
                    self.bytes_up += len(data)
                buffer += data
                while True:
                    if body_left:
                        take = min(body_left, len(buffer))
                        body_left -= take
                        buffer = buffer[take:]
                        if body_left:
                            break
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head, buffer = buffer[:end].decode("latin-1"), buffer[end + 4:]
                    lines = head.split("\r\n")
                    with self._lock:
                        self.requests[lines[0].split(" ", 1)[0]] += 1
                    for line in lines[1:]:
                        name, _, value = line.partition(":")
                        if name.strip().lower() == "content-length":
                            body_left = int(value.strip())
        except OSError:
            pass
        finally:
            _close(src, dst)

    def _downstream(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
                with self._lock:
                    self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            _close(src, dst)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_up = self.bytes_down = 0

    def close(self) -> None:
        self.sock.close()


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
