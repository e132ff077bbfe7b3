"""The slow link (testbed/link.py) never passes bytes faster than its cap or sooner than its
round-trip time, shares its cap between connections, and delivers every byte intact.
Only lower bounds on time are asserted: a busy machine can make the link slower than
configured, never faster."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from testbed.link import SLACK, Link, _Transmitter
from testbed.stores import FaultProxy

pytestmark = pytest.mark.unit  # in-process: no servers, no subprocesses


class Sink:
    """A loopback TCP server that reads each connection to its end, answers with the
    sha256 of what it got, and closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with conn:
            digest = hashlib.sha256()
            while data := conn.recv(65536):
                digest.update(data)
            conn.sendall(digest.digest())


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink()
    yield server
    server.sock.close()


def _send(url: str, payload: bytes) -> bytes:
    """Send payload, half-close, return the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while data := conn.recv(65536):
            answer += data
    return answer


def test_bytes_arrive_intact_and_no_faster_than_the_cap(sink: Sink) -> None:
    payload = os.urandom(256 * 1024)
    with FaultProxy(sink.url, [], link=Link(up=512 * 1024)) as proxy:
        started = time.monotonic()
        answer = _send(proxy.url, payload)
        elapsed = time.monotonic() - started
    assert answer == hashlib.sha256(payload).digest()
    assert elapsed >= 0.5 * 0.98  # 256 KiB at 512 KiB/s


def test_connections_share_the_cap(sink: Sink) -> None:
    payloads = [os.urandom(128 * 1024) for _ in range(4)]
    answers: list[bytes] = []
    with FaultProxy(sink.url, [], link=Link(up=512 * 1024)) as proxy:
        threads = [threading.Thread(target=lambda p=p: answers.append(_send(proxy.url, p)))
                   for p in payloads]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    assert sorted(answers) == sorted(hashlib.sha256(p).digest() for p in payloads)
    assert elapsed >= 1.0 * 0.98  # 512 KiB in all through one 512 KiB/s transmitter


def test_a_round_trip_takes_at_least_the_rtt(sink: Sink) -> None:
    with FaultProxy(sink.url, [], link=Link(rtt=0.2)) as proxy:
        started = time.monotonic()
        answer = _send(proxy.url, b"ping")
        elapsed = time.monotonic() - started
    assert answer == hashlib.sha256(b"ping").digest()
    assert elapsed >= 0.2


def test_requests_are_still_counted_through_a_link(sink: Sink) -> None:
    requests = (b"PUT /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
                b"GET /a HTTP/1.1\r\n\r\n")
    with FaultProxy(sink.url, [], link=Link(rtt=0.01, up=10**6)) as proxy:
        _send(proxy.url, requests)
        assert proxy.requests == {"PUT": 1, "GET": 1}


def test_a_late_sender_keeps_the_schedule_and_an_idle_link_banks_nothing() -> None:
    link = _Transmitter(rate=1000.0)  # bytes per second: 100 bytes take 0.1 s
    assert link.reserve(100, now=10.0) == pytest.approx(10.1)  # idle: starts now
    # woken a little late (a busy machine): the link does not lose that time
    assert link.reserve(100, now=10.1 + SLACK / 2) == pytest.approx(10.2)
    assert link.reserve(100, now=10.15) == pytest.approx(10.3)  # early: waits its turn
    # idle for long: no credit saved up, so no burst above the cap
    assert link.reserve(100, now=20.0) == pytest.approx(20.1)
