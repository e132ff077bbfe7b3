"""The NBD server: listeners, the fixed-newstyle handshake, and the transmission phase.

Threading model. One thread per connection reads requests; each request runs on a pool
shared by all connections, so replies go out in whatever order requests finish. There
are two pools: requests that may wait for the cloud (WRITE, WRITE_ZEROES and TRIM wait
for room past --max-dirty, FLUSH and FUA for uploads) run on one, READ, CACHE and
BLOCK_STATUS on the other, so reads are never queued behind writes held by backpressure,
whichever connection sent them. A READ the device can answer at once (a cache hit:
BlockDevice.pread_now) is answered by the reader itself: the hand-off to a pool thread
cost more than the read (4 KiB random reads went from about 4,000 to 10,000 per second).
A pool thread never waits for a client: it hands its
reply to the socket without blocking (header and payload in one sendmsg), and whatever
the socket will not take yet goes to the connection's outbox, which a writer thread of
that connection drains. So a client that stops reading its replies stalls only itself.
A request counts as outstanding until its reply has reached the socket; a connection
may have at most MAX_IN_FLIGHT requests and MAX_IN_FLIGHT_BYTES of payload outstanding,
past that its reader waits, so a client cannot make the server buffer without bound.

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cloudnbd.nbd import protocol as p
from cloudnbd.nbd.device import BlockDevice, DeviceError

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_BYTES = 8 * 2**20  # per connection; one larger request may still pass alone
#: a WRITE payload larger than this is not drained but drops the connection
MAX_DRAIN = 64 * 2**20
WRITE_THREADS = 32  # requests that may wait for the cloud, all connections together
READ_THREADS = 16
_READS = frozenset((p.Command.READ, p.Command.CACHE, p.Command.BLOCK_STATUS))
_COMMAND_NAMES = {int(c): c.name.lower() for c in p.Command}  # metrics labels
MAX_CONNECTIONS = 128
#: seconds a client has from connecting to entering transmission (qemu-nbd allows 10)
HANDSHAKE_TIMEOUT = 30.0
#: how long the listener waits before accepting again after running out of descriptors
ACCEPT_BACKOFF = 0.1

RequestHook = Callable[[str, float], None]


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


def _advance(views: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of views after sent bytes went out."""
    while views and sent >= len(views[0]):
        sent -= len(views[0])
        views = views[1:]
    if views and sent:
        views = [views[0][sent:], *views[1:]]
    return views


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


class NbdServer:
    """Serves one BlockDevice as one export over TCP and/or a Unix socket."""

    def __init__(self, device: BlockDevice, export_name: str = "", host: str = "127.0.0.1",
                 port: int | None = 10809, unix_path: Path | None = None,
                 read_only: bool = False, tls: str = "off", tls_cert: Path | None = None,
                 tls_key: Path | None = None, tls_ca: Path | None = None,
                 tls_psk: Path | None = None, description: str = "",
                 on_request: RequestHook | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 handshake_timeout: float | None = HANDSHAKE_TIMEOUT) -> None:
        self.device = device
        self.export_name = export_name
        self.host = host
        self.port = None if unix_path is not None else port
        self.unix_path = unix_path
        self.read_only = read_only or device.read_only
        self.tls = TlsSettings(tls, tls_cert, tls_key, tls_ca, tls_psk)
        self.tls_context = self.tls.context()
        self.description = description
        self.on_request = on_request
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
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
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
            except OSError as exc:
                sock.close()
                raise DeviceError(exc.errno or errno.EADDRINUSE,
                                  f"cannot listen on {self.host}:{self.port}: "
                                  f"{exc.strerror}") from None
            self.port = sock.getsockname()[1]
            self._listen(sock)

    def _warn_if_exposed(self) -> None:
        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = self.host == "localhost"
        if not loopback and self.tls.mode != "require":
            log.warning("serving on %s without required TLS: anyone who can reach this "
                        "address can read and write the volume", self.host)

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
            full = len(self._connections) >= self.max_connections
            if full:
                self.connections_refused += 1
        if full:
            if self.connections_refused == 1 or self.connections_refused % 1000 == 0:
                log.warning("refusing connections: %d open already (%d refused so far)",
                            self.max_connections, self.connections_refused)
            sock.close()
            return
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.handshake_timeout)
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


class _Connection:
    """One client: handshake, then the request loop."""

    def __init__(self, server: NbdServer, sock: socket.socket) -> None:
        self.server = server
        self.sock: socket.socket = sock
        self.device = server.device
        self.send_lock = threading.Lock()
        # replies the socket would not take yet, oldest first, each with the payload bytes
        # it releases once sent; the head may be half sent (by the writer)
        self.outbox: collections.deque[tuple[list[memoryview], int]] = collections.deque()
        self.outbox_ready = threading.Condition(self.send_lock)
        self.writer: threading.Thread | None = None
        self.idle = threading.Condition()
        self.in_flight = 0
        self.in_flight_bytes = 0
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
            dropped = [nbytes for _, nbytes in self.outbox]
            self.outbox.clear()
            self.outbox_ready.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a writer blocked in sendmsg
        except OSError:
            pass
        self.sock.close()
        for nbytes in dropped:
            self._release(nbytes)

    def send_blocking(self, data: bytes) -> None:
        """Handshake messages: one thread, nothing else on the socket yet."""
        self.sock.sendall(data)

    def reply(self, parts: tuple[bytes | bytearray | memoryview, ...], nbytes: int) -> None:
        """Send one transmission reply without ever blocking, then release its request
        (nbytes of payload): at once if the socket takes it all, else once the writer
        has sent it. Called by pool threads and by the reader."""
        views = [memoryview(part).cast("B") for part in parts]
        failed = False
        with self.send_lock:
            if not self.closed:
                if not self.outbox and not self.tls_active:
                    try:
                        views = self._send_now(views)
                    except OSError:
                        views, failed = [], True
                if views:
                    if self._queue(views, nbytes):
                        return
                    failed = True
        if failed:
            self.close()
        self._release(nbytes)

    def _send_now(self, views: list[memoryview]) -> list[memoryview]:
        """Send what the socket takes without waiting; what is left."""
        while views:
            try:
                sent = self.sock.sendmsg(views, [], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return views
            views = _advance(views, sent)
        return views

    def _queue(self, views: list[memoryview], nbytes: int) -> bool:
        """Leave a reply to the writer (started on first need); False if no thread can be
        had for it. Called under send_lock."""
        self.outbox.append((views, nbytes))
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
                views, nbytes = self.outbox[0]
            try:
                if self.tls_active:
                    for view in views:
                        self.sock.sendall(view)
                else:
                    while views:
                        views = _advance(views, self.sock.sendmsg(views))
            except OSError:
                self.close()
                return
            with self.send_lock:
                if self.closed:
                    return  # close() dropped and released the whole outbox
                self.outbox.popleft()
            self._release(nbytes)

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
            self.wait_idle(None)
            self.close()
            self.server._forget(self)

    def wait_idle(self, timeout: float | None) -> None:
        with self.idle:
            self.idle.wait_for(lambda: self.in_flight == 0, timeout=timeout)

    # -- handshake -------------------------------------------------------------------------
    def handshake(self) -> bool:
        """Negotiate options; True when the client entered transmission. The whole
        negotiation must end within the server's handshake_timeout."""
        timeout = self.server.handshake_timeout
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
                if name != server.export_name:
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
                           p.server_entry(server.export_name, server.description))
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
        if name != server.export_name:
            self.option_reply(option, p.Reply.ERR_UNKNOWN, f"no export {name!r}".encode())
            return False
        device = server.device
        self.option_reply(option, p.Reply.INFO,
                          p.info_export(device.size, server.transmission_flags))
        for info in set(requests):
            if info == p.Info.NAME:
                self.option_reply(option, p.Reply.INFO, p.info_name(server.export_name))
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
        if name != self.server.export_name:
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
        header = bytearray(p.REQUEST.size)
        header_view = memoryview(header)
        while True:
            _recv_into(self.sock, header_view)
            magic, flags, command, handle, offset, length = p.REQUEST.unpack(header)
            if magic != p.REQUEST_MAGIC:
                raise _Disconnect(f"bad request magic {magic:#x}")
            if command == p.Command.DISC:
                self.wait_idle(None)
                raise _Disconnect("client disconnected")
            payload: bytearray | None = None
            error = self.check(command, flags, offset, length)
            if command == p.Command.WRITE:
                if length > MAX_DRAIN:
                    raise _Disconnect("write payload too large to be drained")
                if error:
                    _discard(self.sock, length)
                else:
                    self._reserve(length)  # before allocating: the bound is on memory
                    try:
                        payload = bytearray(length)
                        _recv_into(self.sock, memoryview(payload))
                    except BaseException:
                        self._release(length)
                        raise
            elif not error:
                self._reserve(length if command == p.Command.READ else 0)
            if error:
                self._reserve(0)  # an answer waiting for the socket counts as in flight
                self.reply(self.error_reply(handle, error), 0)
                continue
            nbytes = length if command in (p.Command.READ, p.Command.WRITE) else 0
            if command == p.Command.READ:
                payload = bytearray(length)  # the reply's buffer, wherever it is filled
                if self.read_now(handle, offset, payload):
                    continue
            pool = self.server.read_pool if command in _READS else self.server.write_pool
            pool.submit(self.execute, command, flags, handle, offset, length, payload,
                        nbytes)

    def _reserve(self, nbytes: int) -> None:
        with self.idle:
            self.idle.wait_for(lambda: self.in_flight < MAX_IN_FLIGHT and (
                self.in_flight_bytes + nbytes <= MAX_IN_FLIGHT_BYTES or not self.in_flight))
            self.in_flight += 1
            self.in_flight_bytes += nbytes

    def _release(self, nbytes: int) -> None:
        with self.idle:
            self.in_flight -= 1
            self.in_flight_bytes -= nbytes
            self.idle.notify_all()

    def check(self, command: int, flags: int, offset: int, length: int) -> int:
        """0 if the request may reach the device, else the errno to answer with."""
        if self.server.closing:
            return p.ESHUTDOWN
        try:
            cmd = p.Command(command)
        except ValueError:
            return p.EINVAL
        if flags & ~int(p.ALLOWED_FLAGS[cmd]):
            return p.EINVAL
        device = self.device
        if cmd == p.Command.FLUSH:
            return p.EINVAL if offset or length else 0
        writes = (p.Command.WRITE, p.Command.TRIM, p.Command.WRITE_ZEROES)
        if cmd in writes and self.server.read_only:
            return p.EPERM
        if flags & p.CommandFlag.DF and not self.structured:
            return p.EINVAL
        if cmd == p.Command.BLOCK_STATUS and not self.meta_base_allocation:
            return p.EINVAL
        if length == 0:
            return p.EINVAL
        if offset + length > device.size:
            return p.ENOSPC if cmd in (p.Command.WRITE, p.Command.WRITE_ZEROES) else p.EINVAL
        minimum, _, maximum = device.block_size
        if cmd in (p.Command.READ, p.Command.WRITE) and length > maximum:
            return p.EINVAL
        if self.block_size_agreed and cmd != p.Command.BLOCK_STATUS and (
                offset % minimum or length % minimum):
            return p.EINVAL
        return 0

    def error_reply(self, handle: int, error: int, message: str = "") -> tuple[bytes]:
        if self.structured:
            return (p.structured_error(handle, error, message),)
        return (p.simple_reply(handle, error),)

    def execute(self, command: int, flags: int, handle: int, offset: int, length: int,
                payload: bytearray | None, nbytes: int) -> None:
        started = time.monotonic()
        parts: tuple[bytes | bytearray, ...] = ()
        try:
            try:
                parts = self._execute(command, flags, handle, offset, length, payload)
            except DeviceError as exc:
                code = exc.errno if exc.errno in p.WIRE_ERRNOS else p.EIO
                log.warning("%s at %d+%d failed: %s", p.Command(command).name, offset,
                            length, exc)
                parts = self.error_reply(handle, code, str(exc))
            except Exception as exc:
                log.exception("%s at %d+%d failed", p.Command(command).name, offset, length)
                parts = self.error_reply(handle, p.EIO, str(exc))
            self._observe(command, started)
        finally:
            self.reply(parts, nbytes)

    def _observe(self, command: int, started: float) -> None:
        hook = self.server.on_request
        if hook is not None:
            hook(_COMMAND_NAMES[command], time.monotonic() - started)

    def read_now(self, handle: int, offset: int, buf: bytearray) -> bool:
        """Answer a READ here, on the reader thread, if the device has the data at hand
        (a cache hit): no hand-off to a pool thread, which costs more than the read.
        False if it must go to the pool (a miss, or any error, which the pool reports),
        which fills the same buffer again."""
        started = time.monotonic()
        try:
            if not self.device.pread_now(memoryview(buf), offset):
                return False
        except Exception:
            return False
        self._observe(p.Command.READ, started)
        self.reply(self._read_reply(handle, offset, buf), len(buf))
        return True

    def _read_reply(self, handle: int, offset: int, buf: bytearray
                    ) -> tuple[bytes | bytearray, ...]:
        if self.structured:
            header = p.structured_header(handle, p.ChunkType.OFFSET_DATA, 8 + len(buf), True)
            return header, struct.pack(">Q", offset), buf
        return p.simple_reply(handle), buf

    def _execute(self, command: int, flags: int, handle: int, offset: int, length: int,
                 payload: bytearray | None) -> tuple[bytes | bytearray, ...]:
        """Do the request; its reply."""
        device = self.device
        fua = bool(flags & p.CommandFlag.FUA)
        if command == p.Command.READ:
            assert payload is not None  # the reply's buffer
            device.pread_into(memoryview(payload), offset)
            return self._read_reply(handle, offset, payload)
        if command == p.Command.WRITE:
            assert payload is not None
            device.pwrite(memoryview(payload), offset, fua)
        elif command == p.Command.FLUSH:
            device.flush()
        elif command == p.Command.TRIM:
            device.trim(offset, length, fua)
        elif command == p.Command.WRITE_ZEROES:
            fast = bool(flags & p.CommandFlag.FAST_ZERO)
            device.zero(offset, length, fua, may_trim=not flags & p.CommandFlag.NO_HOLE,
                        fast=fast)
        elif command == p.Command.CACHE:
            device.cache(offset, length)
        elif command == p.Command.BLOCK_STATUS:
            return self.block_status(handle, flags, offset, length)
        return (p.simple_reply(handle) if not self.structured else
                p.structured_header(handle, p.ChunkType.NONE, 0, True),)

    def block_status(self, handle: int, flags: int, offset: int, length: int
                     ) -> tuple[bytes, bytes]:
        extents = [(n, f & (p.STATE_HOLE | p.STATE_ZERO))
                   for n, f in self.device.extents(offset, length) if n > 0]
        if not extents:
            extents = [(length, 0)]
        if flags & p.CommandFlag.REQ_ONE:
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
    server = NbdServer(MemoryDevice(size), port=port)
    server.start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
