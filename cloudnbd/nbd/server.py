"""The NBD server: listeners, the fixed-newstyle handshake, and the transmission phase.

Threading model. One thread per connection reads requests. One recv brings every request
the socket holds into a receive buffer, and the reader parses them all. What needs no
waiting it answers itself: a READ the device has at hand (a cache hit:
BlockDevice.pread_now) and a WRITE the device appends without waiting (no FUA, no
backpressure). Small WRITEs are gathered where they lie in the receive buffer and handed
to the device as one run (BlockDevice.pwrite_many_now: the engine takes its lock once
and appends the run's journal records with one pwritev) before the reader does anything
else: another request, a recv, or moving the buffer. Those replies wait in a batch that
goes out in one sendmsg before the reader's next recv that may block, or once
BATCH_BYTES of payload wait. The hand-off to a pool thread cost more than
the request itself (4 KiB random reads went from about 4,000 to 10,000 per second when
they stopped taking it; writes, with the batching, from about 4,200 to 10,200: see
docs/performance.md). Everything else runs on a pool shared by all connections, so
replies go out in whatever order requests finish. There are two pools: requests that
may wait for the cloud (WRITE, WRITE_ZEROES and TRIM wait for room past --max-dirty,
FLUSH and FUA for uploads) run on one, READ, CACHE and BLOCK_STATUS on the other, so
reads are never queued behind writes held by backpressure, whichever connection sent
them.

No pool thread ever waits for a client: it hands its reply to the socket without
blocking (header and payload in one sendmsg), and whatever the socket will not take yet
goes to the connection's outbox, which a writer thread of that connection drains; the
reader's batch does the same. So a client that stops reading its replies stalls only
itself. A request counts as outstanding until its reply has reached the socket; a
connection may have at most MAX_IN_FLIGHT requests and MAX_IN_FLIGHT_BYTES of payload
outstanding, past that its reader sends its batch and waits, so a client cannot make the
server buffer without bound.

Request sizes. A client that agreed on block sizes (NBD_OPT_GO with NBD_INFO_BLOCK_SIZE)
is held to the advertised maximum; one that did not may send a READ or WRITE as long as
the export. One with more payload than MAX_IN_FLIGHT_BYTES is streamed on the reader,
alone in flight on its connection: a WRITE is received and written in pieces of at most
STREAM_PIECE, cut on SECTOR boundaries (so a crash tears no sector), FUA becoming a flush
after the last piece; a READ is read and sent a piece at a time (one content chunk per
piece with structured replies, else one reply or chunk streamed). Only that connection
waits on its client meanwhile, as its writer thread would. So one connection never holds
more than MAX_IN_FLIGHT_BYTES of payload, whatever it asks for.

Promises (the NBD protocol document, `doc/proto.md`, is the reference):
- every request gets exactly one reply, unless its connection is dropped;
- a request is checked completely (magic, command, flags, bounds, alignment, read-only)
  before the device sees it; bounds checks use Python integers, so nothing overflows;
- the payload of a rejected WRITE is read and thrown away so the stream stays in step;
  one too large to be a sane request drops the connection instead;
- a bad request magic or a malformed handshake drops only that connection;
- after shutdown() begins, new requests get ESHUTDOWN and in-flight ones finish;
- hostile clients cannot take the server down: at most max_connections at once (more are
  closed on arrival, so clients cannot use up the process's file descriptors), a
  handshake must be done within handshake_timeout, and running out of descriptors or
  threads refuses the connection at hand, never the listener.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import os
import socket
import ssl
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cloudnbd.nbd import protocol as p
from cloudnbd.nbd.device import BlockDevice, DeviceError

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_BYTES = 8 * 2**20  # per connection: its budget of request payload
#: a READ or WRITE with more payload than the budget is streamed in pieces of at most the
#: budget, each a whole number of sectors: a crash never leaves one half written
STREAM_PIECE = MAX_IN_FLIGHT_BYTES
SECTOR = 4096
#: a refused WRITE payload larger than this is not drained but drops the connection
MAX_DRAIN = 64 * 2**20
#: the reader's receive buffer: one recv brings every request header (and small WRITE
#: payload) the socket holds, up to this much
RECV_BUFFER = 128 * 1024
#: WRITE payloads up to this size are used where they lie in the receive buffer; larger
#: ones are received into a buffer of their own, without passing through it
SMALL_PAYLOAD = 64 * 1024
#: request buffers up to this size (a READ's reply, a large WRITE's payload) are better
#: reused from the process's heap than mapped afresh for each request (engine/malloc.py:
#: the front asks glibc for that); 2 MiB requests of qemu, 256 KiB of nbdcopy
REUSED_BUFFER_BYTES = 2 * 2**20 + 2**16
#: replies the reader answers itself wait in a batch, sent in one sendmsg when the
#: receive buffer holds no complete request, or once this much payload waits
BATCH_BYTES = 256 * 1024
WRITE_THREADS = 32  # requests that may wait for the cloud, all connections together
READ_THREADS = 16
# commands and flags as plain ints: enum arithmetic costs microseconds per request
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = (
    int(c) for c in (p.Command.READ, p.Command.WRITE, p.Command.DISC, p.Command.FLUSH,
                     p.Command.TRIM, p.Command.CACHE, p.Command.WRITE_ZEROES,
                     p.Command.BLOCK_STATUS))
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = (
    int(f) for f in (p.CommandFlag.FUA, p.CommandFlag.NO_HOLE, p.CommandFlag.DF,
                     p.CommandFlag.REQ_ONE, p.CommandFlag.FAST_ZERO))
_ALLOWED_FLAGS = {int(c): int(f) for c, f in p.ALLOWED_FLAGS.items() if c != p.Command.DISC}
_MODIFYING = frozenset((WRITE, TRIM, WRITE_ZEROES))
_READS = frozenset((READ, CACHE, BLOCK_STATUS))
_STATES = int(p.BlockState.HOLE | p.BlockState.ZERO)  # what base:allocation may report
_REQUEST_BYTES = p.REQUEST.size
_OFFSET = struct.Struct(">Q")
MAX_CONNECTIONS = 128
#: seconds a client has from connecting to entering transmission (qemu-nbd allows 10)
HANDSHAKE_TIMEOUT = 30.0
#: how long the listener waits before accepting again after running out of descriptors
ACCEPT_BACKOFF = 0.1

#: called with (command, seconds) for each request answered; the command is a
#: protocol.Command value, as a plain int
RequestHook = Callable[[int, float], None]


class _Disconnect(Exception):
    """End this connection (protocol violation, abort, or the peer went away)."""


#: Python's ssl module serves TLS with pre-shared keys from Python 3.13 on
PSK_SUPPORTED = hasattr(ssl.SSLContext, "set_psk_server_callback")
MIN_PSK_BYTES = 16


def read_psk_file(path: Path) -> dict[str, bytes]:
    """The keys of a PSK file in the format nbdkit, qemu and GnuTLS's psktool use: one
    `username:hexkey` per line. ValueError naming the line if it is malformed."""
    keys: dict[str, bytes] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        name, sep, hexkey = line.strip().partition(":")
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            key = b""
        if not sep or not name or not key:
            raise ValueError(f"{path}:{number}: expected username:hexkey")
        if len(key) < MIN_PSK_BYTES:
            raise ValueError(f"{path}:{number}: the key of {name} is {len(key)} bytes, "
                             f"fewer than {MIN_PSK_BYTES} (psktool -u {name} -p {path} "
                             f"makes a 32-byte one)")
        keys[name] = key
    if not keys:
        raise ValueError(f"{path} holds no keys")
    return keys


@dataclass(frozen=True)
class TlsSettings:
    """STARTTLS with a certificate (and optionally a CA that client certificates must
    chain to), or with pre-shared keys (which authenticate both sides)."""

    mode: str = "off"  # off | on | require
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    psk: Path | None = None

    @property
    def authenticates_clients(self) -> bool:
        return self.ca is not None or self.psk is not None

    def context(self) -> ssl.SSLContext | None:
        """The server's TLS context; ValueError, OSError or ssl.SSLError if the settings
        or the files they name are wrong."""
        if self.mode == "off":
            if self.psk or self.cert or self.ca:
                raise ValueError("TLS files are given but --tls is off")
            return None
        if self.psk is not None:
            return self._psk_context(self.psk)
        if self.cert is None or self.key is None:
            raise ValueError("TLS needs a certificate and a key (--tls-cert, --tls-key), "
                             "or pre-shared keys (--tls-psk)")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.ca)
        return context

    def _psk_context(self, path: Path) -> ssl.SSLContext:
        if self.cert or self.key or self.ca:
            raise ValueError("--tls-psk replaces certificates: give either --tls-psk or "
                             "--tls-cert and --tls-key (and --tls-ca), not both")
        if not PSK_SUPPORTED:
            version = ".".join(map(str, sys.version_info[:3]))
            raise ValueError(f"--tls-psk needs Python 3.13 or later (this is Python "
                             f"{version}); use --tls-cert and --tls-key, or run cloudnbd "
                             f"with a newer Python")
        keys = read_psk_file(path)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # TLS 1.3 only: its PSK key exchange adds ephemeral (EC)DHE, so a key that leaks
        # later does not decrypt recorded sessions.
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.set_psk_server_callback(  # type: ignore[attr-defined]
            lambda identity: keys.get(identity or "", b""))
        return context


@dataclass(frozen=True)
class ServerSettings:
    """Where and how to serve the export. The layers above fill it (cli.py from the
    command line and config files, through service.ServeSettings; tests directly) and
    NbdServer takes it whole."""

    export_name: str = ""
    host: str = "127.0.0.1"
    port: int | None = 10809  # 0: any free port; no TCP listener when unix_path is set
    unix_path: Path | None = None
    read_only: bool = False  # the export is read-only with this or a read-only device
    tls: TlsSettings = field(default_factory=TlsSettings)
    max_connections: int = MAX_CONNECTIONS
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT


@dataclass(frozen=True)
class ServerSnapshot:
    """The server at one moment, for `cloudnbd status` and the metrics."""

    connections: int  # open now
    connections_accepted: int  # since start


def _recv_into(sock: socket.socket, view: memoryview, deadline: float | None = None
               ) -> None:
    """Fill view; with a deadline (time.monotonic()), time out when it passes."""
    while view:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Disconnect("handshake not finished in time")
            sock.settimeout(left)
        got = sock.recv_into(view)
        if not got:
            raise _Disconnect("peer closed the connection")
        view = view[got:]


def _recv(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf), deadline)
    return bytes(buf)


_TRANSIENT_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                      errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO,
                                      errno.EINTR})


Part = bytes | bytearray | memoryview


def _advance(views: list[Part], sent: int) -> list[Part]:
    """What is left of views after sent bytes went out."""
    done = 0
    while done < len(views) and sent >= len(views[done]):
        sent -= len(views[done])
        done += 1
    if done == len(views):
        return []
    left = views[done:]
    if sent:
        left[0] = memoryview(left[0])[sent:]
    return left


def _pieces(offset: int, length: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the pieces a streamed request is cut into: at most
    STREAM_PIECE each, and every cut on a sector boundary of the device."""
    position, end = offset, offset + length
    while position < end:
        cut = min(end, (position + STREAM_PIECE) // SECTOR * SECTOR)
        yield position, cut - position
        position = cut


def _discard(sock: socket.socket, n: int, deadline: float | None = None) -> None:
    scratch = memoryview(bytearray(min(n, 1 << 20)))
    while n:
        chunk = scratch[: min(n, len(scratch))]
        _recv_into(sock, chunk, deadline)
        n -= len(chunk)


def stale_socket(path: Path) -> bool:
    """True if a socket (left by an earlier server) is at path and may be replaced;
    DeviceError if anything else is there: a mistyped --socket must never delete a file."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise DeviceError(errno.EEXIST, f"refusing to listen on {path}: it exists and is "
                                        f"not a socket")
    return True


def _failure(command: int, offset: int, length: int, exc: Exception) -> tuple[int, str]:
    """(errno, message) to answer a request whose device call raised exc; logged."""
    name = p.Command(command).name  # check() let only known commands through
    if isinstance(exc, DeviceError):
        log.warning("%s at %d+%d failed: %s", name, offset, length, exc)
        return (exc.errno if exc.errno in p.WIRE_ERRNOS else p.EIO), str(exc)
    log.error("%s at %d+%d failed", name, offset, length, exc_info=exc)
    return p.EIO, str(exc)


class NbdServer:
    """Serves one BlockDevice as one export over TCP and/or a Unix socket."""

    def __init__(self, device: BlockDevice, settings: ServerSettings, description: str = "",
                 on_request: RequestHook | None = None) -> None:
        self.device = device
        self.settings = settings
        #: the TCP port listened on (known once started, when settings.port is 0); None
        #: when serving on a Unix socket
        self.port = None if settings.unix_path is not None else settings.port
        self.unix_path = settings.unix_path
        self.read_only = settings.read_only or device.read_only
        self.tls = settings.tls
        self.tls_context = settings.tls.context()
        self.description = description
        self.on_request = on_request
        self.write_pool = ThreadPoolExecutor(max_workers=WRITE_THREADS,
                                             thread_name_prefix="nbd-write")
        self.read_pool = ThreadPoolExecutor(max_workers=READ_THREADS,
                                            thread_name_prefix="nbd-read")
        self._listeners: list[socket.socket] = []
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self.closing = False
        self._stopped = threading.Event()
        self.connections_accepted = 0
        self.connections_refused = 0

    # -- what we advertise -----------------------------------------------------------------
    @property
    def transmission_flags(self) -> int:
        d = self.device
        f = p.TransmissionFlag.HAS_FLAGS | p.TransmissionFlag.SEND_DF
        if self.read_only:
            f |= p.TransmissionFlag.READ_ONLY
        if d.can_flush:
            f |= p.TransmissionFlag.SEND_FLUSH
        if d.can_fua and not self.read_only:
            f |= p.TransmissionFlag.SEND_FUA
        if d.can_trim and not self.read_only:
            f |= p.TransmissionFlag.SEND_TRIM
        if d.can_zero and not self.read_only:
            f |= p.TransmissionFlag.SEND_WRITE_ZEROES
            if d.can_fast_zero:
                f |= p.TransmissionFlag.SEND_FAST_ZERO
        if d.can_multi_conn:
            f |= p.TransmissionFlag.CAN_MULTI_CONN
        if d.can_cache:
            f |= p.TransmissionFlag.SEND_CACHE
        return int(f)

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def snapshot(self) -> ServerSnapshot:
        with self._lock:
            return ServerSnapshot(len(self._connections), self.connections_accepted)

    # -- listening -------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and start accepting in background threads."""
        if self.unix_path is not None:
            if stale_socket(self.unix_path):
                self.unix_path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)
            try:
                sock.bind(str(self.unix_path))
            finally:
                os.umask(old_umask)
            self._listen(sock)
        if self.port is not None:
            self._warn_if_exposed()
            host = self.settings.host
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, self.port))
            except OSError as exc:
                sock.close()
                raise DeviceError(exc.errno or errno.EADDRINUSE,
                                  f"cannot listen on {host}:{self.port}: "
                                  f"{exc.strerror}") from None
            self.port = sock.getsockname()[1]
            self._listen(sock)

    def _warn_if_exposed(self) -> None:
        host = self.settings.host
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback and self.tls.mode != "require":
            log.warning("serving on %s without required TLS: anyone who can reach this "
                        "address can read and write the volume", host)

    def _listen(self, sock: socket.socket) -> None:
        sock.listen(64)
        self._listeners.append(sock)
        threading.Thread(target=self._accept, args=(sock,), name="nbd-accept",
                         daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        failing = False
        while not self.closing:
            try:
                sock, _ = listener.accept()
            except OSError as exc:
                if self.closing or exc.errno not in _TRANSIENT_ACCEPT_ERRORS:
                    return  # the listener was closed
                # out of descriptors (or memory): the client waits in the backlog until
                # some are free again; the listener must live on
                if not failing:
                    log.warning("cannot accept connections: %s", exc.strerror)
                failing = True
                self._stopped.wait(ACCEPT_BACKOFF)
                continue
            if failing:
                log.warning("accepting connections again")
                failing = False
            if self.closing:
                sock.close()
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        with self._lock:
            full = len(self._connections) >= self.settings.max_connections
            if full:
                self.connections_refused += 1
        if full:
            if self.connections_refused == 1 or self.connections_refused % 1000 == 0:
                log.warning("refusing connections: %d open already (%d refused so far)",
                            self.settings.max_connections, self.connections_refused)
            sock.close()
            return
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.settings.handshake_timeout)
        connection = _Connection(self, sock)
        with self._lock:
            self._connections.add(connection)
            self.connections_accepted += 1
        try:
            threading.Thread(target=connection.run, name="nbd-conn", daemon=True).start()
        except RuntimeError:
            log.warning("refusing a connection: cannot start a thread for it")
            self._forget(connection)
            connection.close()

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    # -- stopping --------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        """No new connections; requests that arrive from now on get ESHUTDOWN."""
        self.closing = True
        self._stopped.set()
        for listener in self._listeners:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        if self.unix_path is not None:
            try:
                self.unix_path.unlink()
            except FileNotFoundError:
                pass

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting; let in-flight requests finish (new ones get ESHUTDOWN); then
        close every connection."""
        if not self.closing:
            self.stop_accepting()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.wait_idle(timeout)
            connection.close()
        self.write_pool.shutdown(wait=True)
        self.read_pool.shutdown(wait=True)


class _Inbox:
    """The reader's receive buffer. One recv takes whatever the socket holds, so a client
    with many requests in flight has several parsed per system call. Before a recv that
    may block, and before the buffer's contents move, the connection appends the WRITEs
    it gathered in place and sends the replies its reader has batched (the client may
    be waiting for them before it sends more): before_waiting."""

    def __init__(self, sock: socket.socket, before_waiting: Callable[[], None]) -> None:
        self.sock = sock
        self.before_waiting = before_waiting
        self.buf = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buf)
        self.start = self.end = 0  # unread bytes are buf[start:end]

    def _recv(self, view: memoryview) -> int:
        got = self.sock.recv_into(view)
        if not got:
            raise _Disconnect("peer closed the connection")
        return got

    def need(self, n: int) -> None:
        """Have at least n (<= RECV_BUFFER) unread bytes in the buffer."""
        if self.end - self.start >= n:
            return
        self.before_waiting()
        if self.start + n > len(self.buf):  # move the unread tail to the front
            left = self.end - self.start
            self.view[:left] = self.view[self.start:self.end]
            self.start, self.end = 0, left
        while self.end - self.start < n:
            self.end += self._recv(self.view[self.end:])

    def take(self, n: int) -> memoryview:
        """The next n bytes, in place: valid until the next before_waiting."""
        self.need(n)
        self.start += n
        return self.view[self.start - n:self.start]

    def take_into(self, target: memoryview) -> None:
        """Fill target with the next bytes: what is buffered is copied, the rest is
        received straight into target."""
        have = min(self.end - self.start, len(target))
        target[:have] = self.view[self.start:self.start + have]
        self.start += have
        target = target[have:]
        if target:
            self.before_waiting()
        while target:
            target = target[self._recv(target):]

    def skip(self, n: int) -> None:
        """Throw the next n bytes away (a refused WRITE's payload)."""
        while n:
            if self.start == self.end:
                self.before_waiting()
                self.start = self.end = 0
                self.end = self._recv(self.view)
            dropped = min(n, self.end - self.start)
            self.start += dropped
            n -= dropped


class _Connection:
    """One client: handshake, then the request loop."""

    def __init__(self, server: NbdServer, sock: socket.socket) -> None:
        self.server = server
        self.sock: socket.socket = sock
        self.device = server.device
        self.size = server.device.size  # fixed while served
        self.send_lock = threading.Lock()
        # replies the socket would not take yet, oldest first, each with the requests and
        # payload bytes it releases once sent; the head may be half sent (by the writer)
        self.outbox: collections.deque[tuple[list[Part], int, int]] = collections.deque()
        self.outbox_ready = threading.Condition(self.send_lock)
        self.writer: threading.Thread | None = None
        self.idle = threading.Condition()
        self.in_flight = 0
        self.in_flight_bytes = 0
        # WRITEs the reader gathered from its receive buffer, payload in place, to append
        # as one run (_write_batch): (payload, offset) as the device takes them, and
        # their handles; reader thread only
        self.writes: list[tuple[memoryview, int]] = []
        self.write_handles: list[int] = []
        # replies the reader answered itself and has not sent yet (reader thread only)
        self.batch: list[Part] = []
        self.batch_requests = 0
        self.batch_bytes = 0
        self.no_zeroes = False
        self.structured = False
        self.meta_base_allocation = False
        self.block_size_agreed = False
        self.tls_active = False
        self.closed = False

    # -- plumbing --------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the connection; replies not sent yet are dropped with it."""
        with self.send_lock:
            if self.closed:
                return
            self.closed = True
            dropped = [(requests, nbytes) for _, requests, nbytes in self.outbox]
            self.outbox.clear()
            self.outbox_ready.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a writer blocked in sendmsg
        except OSError:
            pass
        self.sock.close()
        for requests, nbytes in dropped:
            self._release(nbytes, requests)

    def send_blocking(self, data: bytes) -> None:
        """Handshake messages: one thread, nothing else on the socket yet."""
        self.sock.sendall(data)

    def reply(self, parts: tuple[Part, ...], nbytes: int) -> None:
        """Send one transmission reply of a request counted in flight (a pool thread's,
        or a streamed request's) without ever blocking, then release the request (nbytes
        of payload): at once if the socket takes it all, else once the writer has sent
        it."""
        self._send(list(parts), 1, nbytes, counted=True)

    def _send(self, views: list[Part], requests: int, nbytes: int, counted: bool) -> None:
        """Send replies of requests without blocking; what the socket will not take goes
        to the outbox, and counts in flight until the writer has sent it. counted: the
        requests are in flight already (else they are the reader's batch)."""
        failed = False
        with self.send_lock:
            if not self.closed:
                if not self.outbox and not self.tls_active:
                    try:
                        views = self._send_now(views)
                    except OSError:
                        views, failed = [], True
                if views:
                    if not counted:
                        self._count(requests, nbytes)
                    if self._queue(views, requests, nbytes):
                        return
                    failed = True
        if failed:
            self.close()
        if counted or (failed and views):
            self._release(nbytes, requests)

    def _send_now(self, views: list[Part]) -> list[Part]:
        """Send what the socket takes without waiting; what is left."""
        while views:
            try:
                sent = self.sock.sendmsg(views, [], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return views
            views = _advance(views, sent)
        return views

    def _queue(self, views: list[Part], requests: int, nbytes: int) -> bool:
        """Leave replies to the writer (started on first need); False if no thread can be
        had for it. Called under send_lock."""
        self.outbox.append((views, requests, nbytes))
        if self.writer is None:
            self.writer = threading.Thread(target=self._write_outbox, name="nbd-write",
                                           daemon=True)
            try:
                self.writer.start()
            except RuntimeError:  # out of threads: this connection cannot go on
                self.outbox.pop()
                return False
        self.outbox_ready.notify()
        return True

    def _write_outbox(self) -> None:
        """Send the outbox in order, blocking on the socket as long as the client
        takes; only this connection waits."""
        while True:
            with self.send_lock:
                self.outbox_ready.wait_for(lambda: self.outbox or self.closed)
                if self.closed:
                    return
                views, requests, nbytes = self.outbox[0]
            try:
                self._send_all(views)
            except OSError:
                self.close()
                return
            with self.send_lock:
                if self.closed:
                    return  # close() dropped and released the whole outbox
                self.outbox.popleft()
            self._release(nbytes, requests)

    def _send_all(self, views: list[Part]) -> None:
        """Send views, blocking as long as the client takes (writer or streaming reader:
        only this connection waits)."""
        if self.tls_active:
            for view in views:
                self.sock.sendall(view)
        else:
            while views:
                views = _advance(views, self.sock.sendmsg(views))

    def run(self) -> None:
        try:
            if self.handshake():
                self.sock.settimeout(None)  # an idle client may stay as long as it likes
                self.transmission()
        except _Disconnect as exc:
            log.debug("connection ended: %s", exc)
        except (OSError, ssl.SSLError) as exc:
            log.debug("connection failed: %s", exc)
        except Exception:
            log.exception("NBD connection failed")
        finally:
            self._flush()  # what the reader answered before the connection ended
            self.wait_idle(None)
            self.close()
            self.server._forget(self)

    def wait_idle(self, timeout: float | None) -> None:
        """Until every request is answered (the reader's batch too) and its reply sent."""
        with self.idle:
            self.idle.wait_for(lambda: self.in_flight == 0 and not self.batch_requests,
                               timeout=timeout)

    # -- handshake -------------------------------------------------------------------------
    def handshake(self) -> bool:
        """Negotiate options; True when the client entered transmission. The whole
        negotiation must end within the server's handshake_timeout."""
        timeout = self.server.settings.handshake_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        flags = p.HandshakeFlag.FIXED_NEWSTYLE | p.HandshakeFlag.NO_ZEROES
        self.send_blocking(p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, flags))
        (client_flags,) = p.CLIENT_FLAGS.unpack(_recv(self.sock, 4, deadline))
        if client_flags & ~int(p.ClientFlag.FIXED_NEWSTYLE | p.ClientFlag.NO_ZEROES):
            raise _Disconnect(f"unknown client flags {client_flags:#x}")
        self.no_zeroes = bool(client_flags & p.ClientFlag.NO_ZEROES)
        while True:
            magic, option, length = p.OPTION_HEADER.unpack(_recv(self.sock, 16, deadline))
            if magic != p.IHAVEOPT:
                raise _Disconnect("bad option magic")
            if length > p.MAX_OPTION_LENGTH:
                if length > p.MAX_OPTION_LENGTH * 16:
                    raise _Disconnect("absurd option length")
                _discard(self.sock, length, deadline)
                self.option_reply(option, p.Reply.ERR_TOO_BIG, b"option too long")
                continue
            data = _recv(self.sock, length, deadline)
            if self.server.tls.mode == "require" and not self.tls_active and option not in (
                    p.Option.STARTTLS, p.Option.ABORT):
                if option == p.Option.EXPORT_NAME:
                    raise _Disconnect("EXPORT_NAME before the required STARTTLS")
                self.option_reply(option, p.Reply.ERR_TLS_REQD, b"TLS is required")
                continue
            if self.handle_option(option, data):
                return True

    def option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self.send_blocking(p.option_reply(option, reply, data))

    def handle_option(self, option: int, data: bytes) -> bool:
        server = self.server
        try:
            if option == p.Option.EXPORT_NAME:
                # no error reply exists for EXPORT_NAME: any failure ends the session
                name = data.decode("utf-8", errors="replace")
                if name != server.settings.export_name:
                    raise _Disconnect(f"unknown export {name!r}")
                zeroes = b"" if self.no_zeroes else bytes(124)
                self.send_blocking(p.EXPORT_NAME_REPLY.pack(
                    server.device.size, server.transmission_flags) + zeroes)
                return True
            if option == p.Option.ABORT:
                self.option_reply(option, p.Reply.ACK)
                raise _Disconnect("client aborted")
            if option == p.Option.LIST:
                if data:
                    self.option_reply(option, p.Reply.ERR_INVALID, b"LIST takes no data")
                    return False
                self.option_reply(option, p.Reply.SERVER,
                           p.server_entry(server.settings.export_name, server.description))
                self.option_reply(option, p.Reply.ACK)
                return False
            if option == p.Option.STARTTLS:
                return self.starttls(data)
            if option in (p.Option.INFO, p.Option.GO):
                return self.info_or_go(option, data)
            if option == p.Option.STRUCTURED_REPLY:
                if data:
                    self.option_reply(option, p.Reply.ERR_INVALID, b"takes no data")
                    return False
                self.structured = True
                self.option_reply(option, p.Reply.ACK)
                return False
            if option in (p.Option.LIST_META_CONTEXT, p.Option.SET_META_CONTEXT):
                self.meta_context(option, data)
                return False
        except (p.ParseError, UnicodeDecodeError) as exc:
            self.option_reply(option, p.Reply.ERR_INVALID, str(exc).encode()[: p.MAX_STRING])
            return False
        self.option_reply(option, p.Reply.ERR_UNSUP, b"option not supported")
        return False

    def starttls(self, data: bytes) -> bool:
        context = self.server.tls_context
        if data:
            self.option_reply(p.Option.STARTTLS, p.Reply.ERR_INVALID, b"takes no data")
        elif context is None:
            self.option_reply(p.Option.STARTTLS, p.Reply.ERR_POLICY, b"TLS is not configured")
        elif self.tls_active:
            self.option_reply(p.Option.STARTTLS, p.Reply.ERR_INVALID, b"TLS is already active")
        else:
            self.option_reply(p.Option.STARTTLS, p.Reply.ACK)
            try:
                self.sock = context.wrap_socket(self.sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                raise _Disconnect(f"TLS handshake failed: {exc}") from None
            self.tls_active = True
            # the spec resets option state negotiated before TLS
            self.structured = False
            self.meta_base_allocation = False
        return False

    def info_or_go(self, option: int, data: bytes) -> bool:
        name, requests = p.parse_info_request(data)
        server = self.server
        if name != server.settings.export_name:
            self.option_reply(option, p.Reply.ERR_UNKNOWN, f"no export {name!r}".encode())
            return False
        device = server.device
        self.option_reply(option, p.Reply.INFO,
                          p.info_export(device.size, server.transmission_flags))
        for info in set(requests):
            if info == p.Info.NAME:
                self.option_reply(option, p.Reply.INFO, p.info_name(server.settings.export_name))
            elif info == p.Info.DESCRIPTION:
                self.option_reply(option, p.Reply.INFO, p.info_description(server.description))
            elif info == p.Info.BLOCK_SIZE:
                self.option_reply(option, p.Reply.INFO, p.info_block_size(*device.block_size))
        self.option_reply(option, p.Reply.ACK)
        if option == p.Option.GO:
            self.block_size_agreed = p.Info.BLOCK_SIZE in requests
            return True
        return False

    def meta_context(self, option: int, data: bytes) -> None:
        if option == p.Option.SET_META_CONTEXT:
            # it replaces the selected contexts "including when this command fails"
            self.meta_base_allocation = False
        name, queries = p.parse_meta_context_request(data)
        if option == p.Option.SET_META_CONTEXT and not self.structured:
            self.option_reply(option, p.Reply.ERR_INVALID, b"structured replies first")
            return
        if name != self.server.settings.export_name:
            self.option_reply(option, p.Reply.ERR_UNKNOWN, f"no export {name!r}".encode())
            return
        listing = option == p.Option.LIST_META_CONTEXT
        wanted = any(q == p.BASE_ALLOCATION or (listing and q == "base:") for q in queries)
        if listing and not queries:
            wanted = True
        if option == p.Option.SET_META_CONTEXT:
            self.meta_base_allocation = wanted and self.device.can_extents
        if wanted and self.device.can_extents:
            self.option_reply(option, p.Reply.META_CONTEXT,
                       p.meta_context(p.BASE_ALLOCATION_ID, p.BASE_ALLOCATION))
        self.option_reply(option, p.Reply.ACK)

    # -- transmission ----------------------------------------------------------------------
    def transmission(self) -> None:
        """The request loop: parse every request the last receive brought, answer on
        this thread what needs no waiting (cache-hit reads, journal appends) and send
        those replies together before the next receive that may block; requests that
        may wait go to a pool."""
        inbox = _Inbox(self.sock, self._flush)
        unpack = p.REQUEST.unpack_from
        while True:
            inbox.need(_REQUEST_BYTES)
            magic, flags, command, handle, offset, length = unpack(inbox.buf, inbox.start)
            inbox.start += _REQUEST_BYTES
            if magic != p.REQUEST_MAGIC:
                raise _Disconnect(f"bad request magic {magic:#x}")
            if command == DISC:
                self._flush()
                self.wait_idle(None)
                raise _Disconnect("client disconnected")
            error = self.check(command, flags, offset, length)
            if error:
                if command == WRITE:
                    if length > MAX_DRAIN:
                        raise _Disconnect("write payload too large to be drained")
                    inbox.skip(length)
                self._room(0)
                self._answer(self.error_reply(handle, error), 0)
            elif command == WRITE:
                self.write(inbox, flags, handle, offset, length)
            elif command == READ:
                self._write_batch()  # in order: the writes it may read come first
                self.read(flags, handle, offset, length)
            else:
                self._write_batch()
                self._room(0)
                self._reserve(0)
                pool = self.server.read_pool if command in _READS else self.server.write_pool
                pool.submit(self.execute, command, flags, handle, offset, length, None, 0)

    def check(self, command: int, flags: int, offset: int, length: int) -> int:
        """0 if the request may reach the device, else the errno to answer with."""
        if self.server.closing:
            return p.ESHUTDOWN
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None or flags & ~allowed:
            return p.EINVAL
        if command == FLUSH:
            return p.EINVAL if offset or length else 0
        if command in _MODIFYING and self.server.read_only:
            return p.EPERM
        if flags & DF and not self.structured:
            return p.EINVAL
        if command == BLOCK_STATUS and not self.meta_base_allocation:
            return p.EINVAL
        if length == 0:
            return p.EINVAL
        if offset + length > self.size:
            return p.ENOSPC if command in (WRITE, WRITE_ZEROES) else p.EINVAL
        if self.block_size_agreed:
            # a client that asked for the block sizes is held to them; one that did not
            # may send READ and WRITE of any size the export holds (the spec's default
            # maximum is only a floor), and large ones are streamed
            minimum, _, maximum = self.device.block_size
            if command in (READ, WRITE) and length > maximum:
                return p.EINVAL
            if command != BLOCK_STATUS and (offset % minimum or length % minimum):
                return p.EINVAL
        return 0

    # -- in flight ---------------------------------------------------------------------------
    def _room(self, nbytes: int) -> None:
        """Wait until one more request with nbytes of payload fits in the connection's
        limits (sending the batch first: it counts, and the client may wait for it).
        Only the reader adds to what is in flight, so the room lasts until it does."""
        if (self.in_flight + self.batch_requests < MAX_IN_FLIGHT and self.in_flight_bytes
                + self.batch_bytes + nbytes <= MAX_IN_FLIGHT_BYTES):
            return
        self._flush()
        with self.idle:
            self.idle.wait_for(lambda: self.in_flight < MAX_IN_FLIGHT and
                               self.in_flight_bytes + nbytes <= MAX_IN_FLIGHT_BYTES)

    def _reserve(self, nbytes: int) -> None:
        """Count a request in flight (after _room): it is going to a pool."""
        self._count(1, nbytes)

    def _reserve_alone(self) -> None:
        """Wait until nothing is in flight, then count a streamed request with the whole
        budget: its pieces are all the payload this connection holds."""
        self._flush()
        with self.idle:
            self.idle.wait_for(lambda: self.in_flight == 0)
        self._count(1, STREAM_PIECE)

    def _count(self, requests: int, nbytes: int) -> None:
        with self.idle:
            self.in_flight += requests
            self.in_flight_bytes += nbytes

    def _release(self, nbytes: int, requests: int = 1) -> None:
        with self.idle:
            self.in_flight -= requests
            self.in_flight_bytes -= nbytes
            self.idle.notify_all()

    def _answer(self, parts: tuple[Part, ...], nbytes: int) -> None:
        """Add a reply the reader produced itself to its batch (after _room)."""
        self.batch += parts
        self.batch_requests += 1
        self.batch_bytes += nbytes
        if self.batch_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Append the WRITEs gathered, then send the reader's batch, in one sendmsg as far
        as the socket takes it."""
        self._write_batch()
        if not self.batch_requests:
            return
        views, requests, nbytes = self.batch, self.batch_requests, self.batch_bytes
        self.batch, self.batch_requests, self.batch_bytes = [], 0, 0
        self._send(views, requests, nbytes, counted=False)
        if self.server.closing:  # shutdown() may be waiting for this batch
            with self.idle:
                self.idle.notify_all()

    # -- requests ----------------------------------------------------------------------------
    def read(self, flags: int, handle: int, offset: int, length: int) -> None:
        if length > STREAM_PIECE:
            self.stream_read(flags, handle, offset, length)
            return
        self._room(length)
        buf = bytearray(length)  # the reply's buffer, wherever it is filled
        started = time.monotonic()
        try:
            # a cache hit is read here: the hand-off to a pool thread costs more
            done = self.device.pread_now(memoryview(buf), offset)
        except Exception:
            done = False  # the pool reads it again and reports the error
        if done:
            self._observe(READ, started)
            self._answer(self._read_reply(handle, offset, buf), length)
            return
        self._reserve(length)
        self.server.read_pool.submit(self.execute, READ, flags, handle, offset, length, buf,
                                     length)

    def write(self, inbox: _Inbox, flags: int, handle: int, offset: int, length: int
              ) -> None:
        if length <= SMALL_PAYLOAD and not flags & FUA:
            self._room(0)
            payload = inbox.take(length)  # first: taking may append the run so far
            self.writes.append((payload, offset))  # appended with its run, in place
            self.write_handles.append(handle)
            self.batch_requests += 1
            return
        self._write_batch()  # in order: the run before this one
        if length > STREAM_PIECE:
            self.stream_write(inbox, flags, handle, offset, length)
            return
        payload: memoryview | bytearray
        if length <= SMALL_PAYLOAD:  # with FUA: it waits for the cloud, on the pool
            self._room(length)
            payload = bytearray(inbox.take(length))  # the inbox is reused: a copy
            self._reserve(length)
        else:
            self._room(length)
            self._reserve(length)  # before allocating: the bound is on memory
            try:
                payload = bytearray(length)
                inbox.take_into(memoryview(payload))
            except BaseException:
                self._release(length)
                raise
            if not flags & FUA and self._write_now(offset, payload):
                self._release(length)  # its place is the batch's now
                self._answer(self._done_reply(handle), 0)
                return
        self.server.write_pool.submit(self.execute, WRITE, flags, handle, offset, length,
                                      payload, length)

    def _write_batch(self) -> None:
        """Append the WRITEs gathered from the receive buffer in one call to the device
        (the engine takes its lock once and writes the run's journal records with one
        pwritev) and batch their replies. Those it cannot take without waiting go to the
        write pool with a copy of their payload (the buffer is reused), as does a run
        the device failed: the pool writes them again and reports the error."""
        writes, handles = self.writes, self.write_handles
        if not writes:
            return
        self.writes, self.write_handles = [], []
        started = time.monotonic()
        try:
            done = self.device.pwrite_many_now(writes)
        except Exception:
            done = 0
        for handle in handles[:done]:
            self._observe(WRITE, started)
            self.batch += self._done_reply(handle)
        self.batch_requests -= len(writes) - done
        for handle, (payload, offset) in zip(handles[done:], writes[done:], strict=True):
            length = len(payload)
            self._room(length)
            copy = bytearray(payload)
            self._reserve(length)
            self.server.write_pool.submit(self.execute, WRITE, 0, handle, offset, length,
                                          copy, length)

    def _write_now(self, offset: int, payload: memoryview | bytearray) -> bool:
        """Append a WRITE on this thread if the device takes it without waiting (no
        FUA, no backpressure): the hand-off to a pool thread costs more than the append.
        False: the pool is to write it (and report any error)."""
        started = time.monotonic()
        try:
            if not self.device.pwrite_now(memoryview(payload), offset):
                return False
        except Exception:
            return False
        self._observe(WRITE, started)
        return True

    def stream_write(self, inbox: _Inbox, flags: int, handle: int, offset: int,
                     length: int) -> None:
        """A WRITE larger than the connection's budget, received and written a piece at
        a time on this thread (alone in flight on its connection). FUA covers the whole
        request: the pieces are written without it and a flush follows, which makes them
        all durable (FUA on the last piece alone would promise nothing for the others)."""
        self._reserve_alone()
        started = time.monotonic()
        parts: tuple[Part, ...] = ()
        try:
            buf = memoryview(bytearray(min(length, STREAM_PIECE)))
            failure: tuple[int, str] | None = None
            for position, n in _pieces(offset, length):
                piece = buf[:n]
                inbox.take_into(piece)
                if failure is None:  # after a failure the rest is only drained
                    try:
                        self.device.pwrite(piece, position, False)
                    except Exception as exc:
                        failure = _failure(WRITE, position, n, exc)
            if failure is None and flags & FUA:
                try:
                    self.device.flush()
                except Exception as exc:
                    failure = _failure(FLUSH, offset, length, exc)
            self._observe(WRITE, started)
            parts = self._done_reply(handle) if failure is None else \
                self.error_reply(handle, *failure)
        finally:
            self.reply(parts, STREAM_PIECE)  # releases the request, whatever happened

    def stream_read(self, flags: int, handle: int, offset: int, length: int) -> None:
        """A READ larger than the connection's budget, read and sent a piece at a time on
        this thread (alone in flight on its connection, so nothing else is sent between
        its pieces). It blocks on the client as the outbox writer would: only this
        connection waits."""
        self._reserve_alone()
        try:
            self._stream_read(flags, handle, offset, length)
        finally:
            self._release(STREAM_PIECE)

    def _stream_read(self, flags: int, handle: int, offset: int, length: int) -> None:
        started = time.monotonic()
        structured = self.structured
        # one content chunk (simple replies, or DF), else a chunk per piece
        whole = not structured or bool(flags & DF)
        if structured and whole and 8 + length > 0xFFFFFFFF:
            self._send_all(list(self.error_reply(handle, p.EOVERFLOW, "too long for DF")))
            return
        buf = memoryview(bytearray(min(length, STREAM_PIECE)))
        end = offset + length
        for position, n in _pieces(offset, length):
            piece = buf[:n]
            try:
                self.device.pread_into(piece, position)
            except Exception as exc:
                code, message = _failure(READ, position, n, exc)
                if whole and position == offset:  # nothing sent yet: an ordinary error
                    self._send_all(list(self.error_reply(handle, code, message)))
                    return
                if not structured:  # the spec: after a header without error, hang up
                    raise _Disconnect("READ failed after its reply header was sent") from None
                if whole:  # the content chunk must be completed: with zeros
                    buf[:] = bytes(len(buf))
                    for _, rest in _pieces(position, end - position):
                        self._send_all([buf[:rest]])
                self._send_all([p.structured_error_offset(handle, code, position, message)])
                return
            head: list[Part] = []
            if not whole:
                head = [p.structured_header(handle, p.ChunkType.OFFSET_DATA, 8 + n,
                                            position + n == end), _OFFSET.pack(position)]
            elif position == offset:
                head = [p.simple_reply(handle)] if not structured else [
                    p.structured_header(handle, p.ChunkType.OFFSET_DATA, 8 + length, False),
                    _OFFSET.pack(offset)]
            self._send_all([*head, piece])
        if structured and whole:
            self._send_all([p.structured_header(handle, p.ChunkType.NONE, 0, True)])
        self._observe(READ, started)

    def error_reply(self, handle: int, error: int, message: str = "") -> tuple[bytes]:
        if self.structured:
            return (p.structured_error(handle, error, message),)
        return (p.simple_reply(handle, error),)

    def _done_reply(self, handle: int) -> tuple[bytes]:
        if self.structured:
            return (p.structured_header(handle, p.ChunkType.NONE, 0, True),)
        return (p.simple_reply(handle),)

    def execute(self, command: int, flags: int, handle: int, offset: int, length: int,
                payload: bytearray | None, nbytes: int) -> None:
        """A request on a pool thread."""
        started = time.monotonic()
        parts: tuple[Part, ...] = ()
        try:
            try:
                parts = self._execute(command, flags, handle, offset, length, payload)
            except Exception as exc:
                parts = self.error_reply(handle, *_failure(command, offset, length, exc))
            self._observe(command, started)
        finally:
            self.reply(parts, nbytes)

    def _observe(self, command: int, started: float) -> None:
        hook = self.server.on_request
        if hook is not None:
            hook(command, time.monotonic() - started)

    def _read_reply(self, handle: int, offset: int, buf: bytearray) -> tuple[Part, ...]:
        if self.structured:
            header = p.structured_header(handle, p.ChunkType.OFFSET_DATA, 8 + len(buf), True)
            return header, _OFFSET.pack(offset), buf
        return p.simple_reply(handle), buf

    def _execute(self, command: int, flags: int, handle: int, offset: int, length: int,
                 payload: bytearray | None) -> tuple[Part, ...]:
        """Do the request; its reply."""
        device = self.device
        fua = bool(flags & FUA)
        if command == READ:
            assert payload is not None  # the reply's buffer
            device.pread_into(memoryview(payload), offset)
            return self._read_reply(handle, offset, payload)
        if command == WRITE:
            assert payload is not None
            device.pwrite(memoryview(payload), offset, fua)
        elif command == FLUSH:
            device.flush()
        elif command == TRIM:
            device.trim(offset, length, fua)
        elif command == WRITE_ZEROES:
            device.zero(offset, length, fua, may_trim=not flags & NO_HOLE,
                        fast=bool(flags & FAST_ZERO))
        elif command == CACHE:
            device.cache(offset, length)
        elif command == BLOCK_STATUS:
            return self.block_status(handle, flags, offset, length)
        return self._done_reply(handle)

    def block_status(self, handle: int, flags: int, offset: int, length: int
                     ) -> tuple[bytes, bytes]:
        extents = [(n, f & _STATES) for n, f in self.device.extents(offset, length) if n > 0]
        if not extents:
            extents = [(length, 0)]
        if flags & REQ_ONE:
            extents = extents[:1]
        payload = p.block_status_payload(p.BASE_ALLOCATION_ID, extents)
        return (p.structured_header(handle, p.ChunkType.BLOCK_STATUS, len(payload), True),
                payload)


def main() -> None:
    """Serve an in-memory device: `python -m cloudnbd.nbd.server SIZE PORT` (tests)."""
    import sys

    logging.basicConfig(level=logging.INFO)
    from cloudnbd.nbd.device import MemoryDevice

    size, port = int(sys.argv[1]), int(sys.argv[2])
    server = NbdServer(MemoryDevice(size), ServerSettings(port=port))
    server.start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
