"""Hostile clients against a live NBD server: generated cases, a checker, a well-behaved
client that must not notice, and a hammer that runs them all at once.

A case is one connection. A generator (drawing from a Chooser, so the same code serves
hypothesis, which shrinks a failing case, and a seeded random.Random, which the hammer
uses and counts failures with) writes the client's whole byte stream: client flags,
options (valid, malformed, lying about their length, oversized, unknown), then requests
(valid, unknown commands and flags, offsets and lengths out of range or overflowing 64
bits, above the maximum payload, misaligned, WRITE payloads drained, cut short or lying),
and barriers where the client waits for every answer so far. It ends with a DISC, a bad
magic, a cut, or nothing (the client half-closes).

tests/hostile_model.py says what the spec allows for those exact bytes; run_case() sends
them (a second thread, so a server that stops reading cannot deadlock the check), reads
every answer with a deadline and checks:
- each option and request is answered as the spec allows, or the connection is dropped
  only where a server may drop it; no reply the spec does not allow, no garbage;
- each read returns what this connection's shadow of its own region says (requests
  between two barriers run in any order, so bytes they change are not checked there);
- the server closes the connection when the stream ends (no hang).

Writes that could succeed always land in the connection's own region, so the good
client's region changes only if the server executes what it should have refused.
"""

from __future__ import annotations

import collections
import logging
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from tests import hostile_model as m
from tests.nbdclient import NbdClient, NbdError

T = TypeVar("T")
Connect = Callable[[], socket.socket]
BARRIER = None
Piece = bytes | None


# -- choosing -------------------------------------------------------------------------------
class Chooser:
    """Where generators get their decisions. Subclasses: seeded random, hypothesis."""

    def int(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def chance(self, p: float) -> bool:
        """True with probability p. Hypothesis shrinks it towards False (the plain path)."""
        return self.int(0, 999) >= round((1 - p) * 1000)

    def pick(self, options: Sequence[T]) -> T:
        return options[self.int(0, len(options) - 1)]

    def bytes(self, n: int) -> bytes:
        return random.Random(self.int(0, 2**32 - 1)).randbytes(n)


class RandomChooser(Chooser):
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


class DrawChooser(Chooser):
    """Decisions drawn from hypothesis' st.data(), so a failing case shrinks."""

    def __init__(self, data: object) -> None:
        from hypothesis import strategies as st

        self.data = data
        self.st = st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Scale:
    """How big a case may get."""

    max_requests: int = 10
    max_io: int = 128 * 1024  # valid reads and writes
    max_sent_payload: int = 1 << 20  # payload of a refused WRITE that is really sent
    max_sent_option: int = 80 * 1024  # data of an oversized option that is really sent


SMALL = Scale()
LARGE = Scale(max_requests=24, max_io=1 << 20, max_sent_payload=40 << 20,
              max_sent_option=1 << 20)


@dataclass(frozen=True)
class Region:
    """Bytes one connection owns: the only place its writes may succeed."""

    base: int
    length: int

    @property
    def end(self) -> int:
        return self.base + self.length


# -- generating a case --------------------------------------------------------------------
NAMES = (b"nope", b"\xff\xfe", b"x" * 5000, b"caf\xc3\xa9")
QUERIES = (b"base:allocation", b"base:", b"base:foo", b"qemu:dirty-bitmap:x", b"nocolon",
           b"\xff", b"base:" + b"a" * 5000, b"")


def _name(c: Chooser, export: m.Export) -> bytes:
    if c.chance(0.6):
        return export.name.encode()
    return c.pick(NAMES) if c.chance(0.7) else c.bytes(c.int(0, 20))


def _mutate(c: Chooser, data: bytes) -> bytes:
    """Sometimes break a well-formed option payload."""
    if not data or not c.chance(0.25):
        return data
    how = c.int(0, 3)
    if how == 0:  # a length or count field lies
        at = c.int(0, max(0, len(data) - 4))
        return data[:at] + struct.pack(">I", c.pick((0, 1, 2**31, 2**32 - 1, c.int(0, 64))))\
            + data[at + 4:]
    if how == 1:
        return data[:c.int(0, len(data) - 1)]
    if how == 2:
        return data + c.bytes(c.int(1, 8))
    at = c.int(0, len(data) - 1)
    return data[:at] + bytes([data[at] ^ (1 << c.int(0, 7))]) + data[at + 1:]


def gen_option(c: Chooser, export: m.Export, scale: Scale, kind: str = "") -> bytes:
    if kind:
        pass
    elif c.chance(0.2):  # one that is likely to end the handshake
        kind = c.pick(("lie", "oversized", "garbage", "bad_magic", "export_name", "abort"))
    else:
        kind = c.pick(("list", "info", "go", "structured", "list_meta", "set_meta",
                       "starttls", "unknown"))
    if kind == "list":
        return m.option(m.OPT_LIST, c.bytes(c.int(1, 8)) if c.chance(0.2) else b"")
    if kind in ("info", "go"):
        infos = [c.pick((m.INFO_EXPORT, m.INFO_NAME, m.INFO_DESCRIPTION, m.INFO_BLOCK_SIZE,
                         c.int(4, 65535))) for _ in range(c.int(0, 4))]
        name = _name(c, export) if kind == "info" else c.pick(NAMES)  # a GO here must fail
        opt = m.OPT_INFO if kind == "info" else m.OPT_GO
        return m.option(opt, _mutate(c, m.info_data(name, infos)))
    if kind == "structured":
        return m.option(m.OPT_STRUCTURED_REPLY, c.bytes(c.int(1, 4)) if c.chance(0.2) else b"")
    if kind in ("list_meta", "set_meta"):
        queries = [c.pick(QUERIES) for _ in range(c.int(0, 3))]
        opt = m.OPT_LIST_META_CONTEXT if kind == "list_meta" else m.OPT_SET_META_CONTEXT
        return m.option(opt, _mutate(c, m.meta_data(_name(c, export), queries)))
    if kind == "starttls":
        return m.option(m.OPT_STARTTLS, c.bytes(2) if c.chance(0.3) else b"")
    if kind == "unknown":
        code = c.pick((0, 4, 11, 12, 0xFFFF, 2**31, 2**32 - 1, c.int(11, 2**32 - 1)))
        return m.option(code, c.bytes(c.int(0, 32)))
    if kind == "lie":
        data = m.info_data(_name(c, export), [m.INFO_BLOCK_SIZE])
        declared = max(0, len(data) + c.pick((-1, 1, -len(data), 16, c.int(-len(data), 64))))
        return m.option(c.pick((m.OPT_INFO, m.OPT_LIST, m.OPT_STRUCTURED_REPLY)), data,
                        declared=declared)
    if kind == "oversized":
        from tests.hostile_model import MAX_OPTION_LENGTH

        if c.chance(0.5):  # sent in full: must be skipped and refused
            length = c.int(MAX_OPTION_LENGTH + 1, max(MAX_OPTION_LENGTH + 1,
                                                      scale.max_sent_option))
            return m.option(c.pick((m.OPT_INFO, m.OPT_LIST, 99)), bytes(length))
        return m.option(m.OPT_GO, c.bytes(c.int(0, 64)), declared=c.pick((2**31, 2**32 - 1)))
    if kind == "garbage":
        return c.bytes(c.int(1, 40))
    if kind == "bad_magic":
        return m.option(m.OPT_LIST, magic=c.int(0, 2**64 - 1) ^ m.IHAVEOPT or 1)
    if kind == "export_name":
        return m.option(m.OPT_EXPORT_NAME, c.pick(NAMES))
    return m.option(m.OPT_ABORT, c.bytes(2) if c.chance(0.2) else b"")


def gen_handshake(c: Chooser, export: m.Export, scale: Scale) -> list[bytes]:
    flags = c.int(0, 2**32 - 1) if c.chance(0.1) else c.pick((3, 3, 3, 3, 1, 1, 2, 0))
    pieces = [struct.pack(">I", flags)]
    pieces += [gen_option(c, export, scale) for _ in range(c.int(0, 3))]
    ending = c.pick(("go", "go", "go", "go", "export_name", "none"))
    if ending == "go":
        if c.chance(0.5):
            pieces.append(m.option(m.OPT_STRUCTURED_REPLY))
            if c.chance(0.6):
                pieces.append(m.option(m.OPT_SET_META_CONTEXT, m.meta_data(
                    export.name.encode(), [b"base:allocation"])))
            if c.chance(0.3):  # anything may come between: a failed SET unselects
                pieces.append(gen_option(c, export, scale, c.pick(("", "set_meta"))))
        infos = [i for i in (m.INFO_BLOCK_SIZE, m.INFO_NAME, m.INFO_DESCRIPTION)
                 if c.chance(0.5)]
        pieces.append(m.option(m.OPT_GO, m.info_data(export.name.encode(), infos)))
    elif ending == "export_name":
        pieces.append(m.option(m.OPT_EXPORT_NAME, export.name.encode()))
    return pieces


def _edge_offset(c: Chooser, export: m.Export) -> int:
    size = export.size
    return c.pick((0, 1, 511, size - 512, size - 1, size, size + 1, size + 4096, 2**63 - 1,
                   2**63, 2**64 - 512, 2**64 - 1, c.int(0, 2**64 - 1)))


def _edge_length(c: Chooser, export: m.Export) -> int:
    return c.pick((0, 1, 512, 4096, export.maximum, export.maximum + 1, m.DOS_PAYLOAD + 1,
                   2**31, 2**32 - 1, c.int(0, 2**32 - 1)))


class _Requests:
    """Builds the transmission part of a case."""

    def __init__(self, c: Chooser, export: m.Export, s: m.Session, region: Region,
                 scale: Scale) -> None:
        self.c, self.export, self.s, self.region, self.scale = c, export, s, region, scale
        self.handle = c.pick((0, 1, 2**63, 2**64 - 2**20, c.int(0, 2**64 - 2**20)))
        self.pieces: list[Piece] = []
        self.ended = False

    def next_handle(self) -> int:
        self.handle += 1
        return self.handle

    def span(self, max_length: int) -> tuple[int, int]:
        """A valid (offset, length) inside the region."""
        c = self.c
        align = self.export.minimum if self.s.block_agreed else c.pick((1, 512, 4096))
        align = max(align, self.export.minimum if self.s.block_agreed else 1)
        most = max(1, min(max_length, self.region.length) // align)
        length = c.int(1, most) * align
        offset = self.region.base + c.int(0, (self.region.length - length) // align) * align
        return offset, length

    def safe(self, cmd: int, offset: int, length: int) -> tuple[int, int]:
        """Move a request that could change data inside the device into the region."""
        if cmd not in m.MODIFYING or offset + length > self.export.size:
            return offset, length
        if self.region.base <= offset and offset + length <= self.region.end:
            return offset, length
        length = min(length, self.region.length)
        offset = self.region.base + (offset % (self.region.length - length + 1))
        return offset, length

    def add(self, cmd: int, offset: int, length: int, flags: int = 0,
            payload: bytes | None = None, magic: int = m.REQUEST_MAGIC) -> None:
        offset, length = self.safe(cmd, offset, length)
        header = m.request(cmd, self.next_handle(), offset, length, flags, magic)
        if cmd == m.CMD_WRITE and payload is None:
            if length > self.scale.max_sent_payload:
                # too big to send: cut inside the payload, and that ends the stream
                self.pieces += [header, self.c.bytes(self.c.int(0, 4096))]
                self.ended = True
                return
            payload = bytes(length) if length > self.scale.max_io else self.c.bytes(length)
        self.pieces.append(header + (payload or b""))

    def random_request(self) -> None:
        c, e = self.c, self.export
        cmd = c.pick((m.CMD_READ, m.CMD_WRITE, m.CMD_FLUSH, m.CMD_TRIM, m.CMD_CACHE,
                      m.CMD_WRITE_ZEROES, m.CMD_BLOCK_STATUS, 8, 9, 255, 0xFFFF,
                      c.int(8, 0xFFFF)))
        flags = c.pick((0, c.int(0, 0xFFFF), 1 << c.int(0, 15)))
        self.add(cmd, _edge_offset(c, e), _edge_length(c, e), flags)

    def one(self) -> None:
        c, s = self.c, self.s
        kind = c.pick(("read", "read", "write", "write", "write_read", "write_read", "zero",
                       "trim", "cache", "flush", "block_status", "random", "random",
                       "random", "bad_flags", "beyond", "misaligned", "drained_write",
                       "lie_write", "zero_length", "block_status" if s.structured else "read"))
        max_io = self.scale.max_io
        if kind == "read":
            offset, length = self.span(max_io)
            flags = m.CF_DF if s.structured and c.chance(0.3) else 0
            self.add(m.CMD_READ, offset, length, flags)
        elif kind in ("write", "write_read"):
            offset, length = self.span(max_io)
            self.add(m.CMD_WRITE, offset, length, m.CF_FUA if c.chance(0.2) else 0)
            if kind == "write_read":
                self.pieces.append(BARRIER)
                self.add(m.CMD_READ, offset, length)
        elif kind == "zero":
            offset, length = self.span(4 * max_io)
            flags = c.pick((0, m.CF_NO_HOLE, m.CF_FAST_ZERO, m.CF_FUA | m.CF_NO_HOLE))
            self.add(m.CMD_WRITE_ZEROES, offset, length, flags)
        elif kind == "trim":
            self.add(m.CMD_TRIM, *self.span(4 * max_io))
        elif kind == "cache":
            self.add(m.CMD_CACHE, *self.span(4 * max_io))
        elif kind == "flush":
            self.add(m.CMD_FLUSH, 0, 0)
        elif kind == "block_status":
            offset, length = self.span(4 * max_io)
            self.add(m.CMD_BLOCK_STATUS, offset, length,
                     m.CF_REQ_ONE if c.chance(0.3) else 0)
        elif kind == "random":
            self.random_request()
        elif kind == "bad_flags":
            cmd = c.pick((m.CMD_READ, m.CMD_WRITE, m.CMD_FLUSH, m.CMD_TRIM, m.CMD_CACHE,
                          m.CMD_WRITE_ZEROES, m.CMD_BLOCK_STATUS))
            self.add(cmd, *self.span(max_io), flags=c.pick((32, 64, 1 << 15, 0xFFFF,
                                                            m.CF_DF, m.CF_REQ_ONE)))
        elif kind == "beyond":
            cmd = c.pick((m.CMD_READ, m.CMD_WRITE, m.CMD_TRIM, m.CMD_CACHE,
                          m.CMD_WRITE_ZEROES, m.CMD_BLOCK_STATUS))
            length = c.pick((512, 4096, 65536))
            offset = c.pick((self.export.size - length // 2, self.export.size,
                             2**64 - length // 2, 2**64 - 1))
            self.add(cmd, offset, length)
        elif kind == "misaligned":
            offset, length = self.span(max_io)
            self.add(c.pick((m.CMD_READ, m.CMD_WRITE, m.CMD_TRIM, m.CMD_WRITE_ZEROES)),
                     offset + c.int(1, 511), max(1, length - c.int(0, 511)))
        elif kind == "drained_write":
            # a WRITE the server must refuse, payload sent in full: it must be skipped
            length = c.int(1, self.scale.max_sent_payload)
            offset = c.pick((self.export.size, 2**64 - 1, self.region.base))
            flags = 0 if offset != self.region.base else c.pick((m.CF_DF, 1 << 9))
            self.add(m.CMD_WRITE, offset, length, flags, payload=bytes(length))
        elif kind == "lie_write":
            offset, length = self.span(8192)
            real = max(0, length + c.pick((-1, 1, -length, 28, -28, c.int(-length, 64))))
            self.add(m.CMD_WRITE, offset, length, payload=c.bytes(real))
        elif kind == "zero_length":
            self.add(c.pick((m.CMD_READ, m.CMD_WRITE, m.CMD_TRIM, m.CMD_CACHE,
                             m.CMD_WRITE_ZEROES)), self.region.base, 0)

    def ending(self) -> None:
        c = self.c
        how = c.pick(("disc", "disc", "disc", "probe", "eof", "bad_magic", "disc_junk",
                      "cut"))
        if how == "probe":  # the connection must still be in step: a clean read, then DISC
            self.pieces.append(BARRIER)
            self.add(m.CMD_READ, self.region.base, self.export.minimum * 8)
            how = "disc"
        if how == "disc":
            self.pieces.append(m.request(m.CMD_DISC, self.next_handle(), 0, 0))
        elif how == "bad_magic":
            self.pieces.append(m.request(m.CMD_READ, self.next_handle(), 0, 512,
                                         magic=c.pick((0, 0x25609514, c.int(0, 2**32 - 1))))
                               + (c.bytes(c.int(0, 64)) if c.chance(0.3) else b""))
        elif how == "disc_junk":
            self.pieces.append(m.request(m.CMD_DISC, self.next_handle(), c.int(0, 9),
                                         c.int(0, 9), c.int(0, 3))
                               + (c.bytes(c.int(1, 64)) if c.chance(0.5) else b""))
        elif how == "cut":
            header = m.request(m.CMD_READ, self.next_handle(), self.region.base, 512)
            self.pieces.append(header[:c.int(1, len(header) - 1)])


def gen_case(c: Chooser, export: m.Export, region: Region, scale: Scale) -> list[Piece]:
    """One connection's byte stream, with barriers."""
    pieces: list[Piece] = list(gen_handshake(c, export, scale))
    handshake = m.plan(export, b"".join(pieces))  # type: ignore[arg-type]
    if handshake.handshake_end == "transmission":
        build = _Requests(c, export, handshake.predicted, region, scale)
        for _ in range(c.int(0, scale.max_requests)):
            build.one()
            if build.ended:
                break
            if c.chance(0.2):
                build.pieces.append(BARRIER)
        if not build.ended:
            build.ending()
        pieces += build.pieces
    elif handshake.handshake_end == "open" and c.chance(0.5):
        pieces.append(m.option(m.OPT_ABORT))
    return _fragment(c, pieces)


def _fragment(c: Chooser, pieces: list[Piece]) -> list[Piece]:
    """Split some pieces, so the server sees headers and payloads arrive in parts."""
    out: list[Piece] = []
    for piece in pieces:
        if piece is not None and len(piece) > 1 and c.chance(0.15):
            at = c.int(1, len(piece) - 1)
            out += [piece[:at], piece[at:]]
        else:
            out.append(piece)
    return out


# -- what a connection knows --------------------------------------------------------------
class Shadow:
    """A connection's copy of its region: the bytes, and which of them it knows."""

    def __init__(self, region: Region) -> None:
        self.region = region
        self.data = bytearray(region.length)
        self.known = bytearray(b"\x01") * region.length

    def _clip(self, offset: int, length: int) -> tuple[int, int] | None:
        a = max(offset, self.region.base) - self.region.base
        b = min(offset + length, self.region.end) - self.region.base
        return (a, b) if a < b else None

    def write(self, offset: int, data: bytes) -> None:
        span = self._clip(offset, len(data))
        if span:
            a, b = span
            skip = a + self.region.base - offset
            self.data[a:b] = data[skip:skip + b - a]
            self.known[a:b] = b"\x01" * (b - a)

    def zero(self, offset: int, length: int) -> None:
        span = self._clip(offset, length)
        if span:
            a, b = span
            self.data[a:b] = bytes(b - a)
            self.known[a:b] = b"\x01" * (b - a)

    def forget(self, offset: int, length: int) -> None:
        span = self._clip(offset, length)
        if span:
            a, b = span
            self.known[a:b] = bytes(b - a)

    def mask(self, hidden: list[tuple[int, int]]) -> bytearray:
        """The known-mask with some ranges (changed by concurrent requests) hidden."""
        mask = bytearray(self.known)
        for offset, length in hidden:
            span = self._clip(offset, length)
            if span:
                mask[span[0]:span[1]] = bytes(span[1] - span[0])
        return mask

    def mismatch(self, mask: bytearray, offset: int, got: bytes) -> str | None:
        """Where got (read at offset) contradicts a known byte, if anywhere."""
        span = self._clip(offset, len(got))
        if not span:
            return None
        a, b = span
        skip = a + self.region.base - offset
        for run in re.finditer(b"\x01+", mask[a:b]):
            s, e = run.start(), run.end()
            if got[skip + s:skip + e] != self.data[a + s:a + e]:
                bad = next(i for i in range(s, e)
                           if got[skip + i] != self.data[a + i])
                return (f"byte {self.region.base + a + bad} reads {got[skip + bad]:#x}, "
                        f"the connection wrote {self.data[a + bad]:#x}")
        return None

    def nonzero_known(self, mask: bytearray, offset: int, length: int) -> int | None:
        span = self._clip(offset, length)
        if not span:
            return None
        a, b = span
        for run in re.finditer(b"\x01+", mask[a:b]):
            s, e = a + run.start(), a + run.end()
            if any(self.data[s:e]):
                return self.region.base + s + next(i for i in range(e - s)
                                                   if self.data[s + i])
        return None


# -- running a case -----------------------------------------------------------------------
class Violation(Exception):
    """The server broke the spec; the case stops here."""


class Closed(Exception):
    """The server ended the connection: EOF, or a reset (on a Unix socket, closing with
    our bytes unread resets, and the replies not yet read are lost)."""

    def __init__(self, reset: bool) -> None:
        super().__init__("reset" if reset else "closed")
        self.reset = reset


class Wire:
    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        sock.settimeout(timeout)

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got_any = False
        while view:
            try:
                got = self.sock.recv_into(view)
            except (ConnectionResetError, BrokenPipeError):
                raise Closed(True) from None
            except TimeoutError:
                raise Violation(f"no answer and no close within {self.timeout:.0f}s "
                                f"(hang)") from None
            if not got:
                raise Closed(got_any)  # cut inside a reply: treated like a reset
            got_any = True
            view = view[got:]
        return bytes(buf)


@dataclass
class Answer:
    simple: bool
    error: int = 0
    data: bytes | None = None
    chunks: list[tuple[int, int, bytes]] = field(default_factory=list)


class _Tracker:
    """Answers so far, shared by the reader and the sender waiting at barriers."""

    def __init__(self, plan: m.Plan) -> None:
        self.plan = plan
        self.answered: set[int] = set()
        self.ended = False
        self.cond = threading.Condition()

    def answer(self, index: int) -> None:
        with self.cond:
            self.answered.add(index)
            self.cond.notify_all()

    def end(self) -> None:
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def wait_settled(self, position: int, timeout: float) -> bool:
        needed = {r.index for r in self.plan.requests if r.end <= position}
        with self.cond:
            return self.cond.wait_for(lambda: self.ended or needed <= self.answered, timeout)


@dataclass
class CaseResult:
    violations: list[str] = field(default_factory=list)
    requests: int = 0
    answered: int = 0


def _describe_request(r: m.Request) -> str:
    return (f"#{r.index} cmd={r.cmd} flags={r.flags:#x} offset={r.offset} "
            f"length={r.length}")


def _describe_stream(plan: m.Plan) -> str:
    opts = [s.option for s in plan.steps]
    return (f"options {opts}, then {len(plan.requests)} requests ending in {plan.terminal}"
            if plan.handshake_end == "transmission" else
            f"options {opts}, handshake {plan.handshake_end}")


def run_case(connect: Connect, export: m.Export, pieces: list[Piece], shadow: Shadow,
             timeout: float = 30.0) -> CaseResult:
    """Send one case's stream on a new connection and check every answer."""
    stream = b"".join(p for p in pieces if p is not None)
    plan = m.plan(export, stream)
    result = CaseResult(requests=len(plan.requests))
    tracker = _Tracker(plan)
    sock = connect()
    wire = Wire(sock, timeout)
    hung: list[str] = []

    def send() -> None:
        position = 0
        try:
            for piece in pieces:
                if piece is None:
                    if not tracker.wait_settled(position, timeout):
                        hung.append(f"no answers to the requests before byte {position} "
                                    f"within {timeout:.0f}s (hang)")
                        return
                    if tracker.ended:
                        return
                    continue
                sock.sendall(piece)
                position += len(piece)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server closed: what that means is the reader's to judge

    sender = threading.Thread(target=send, name="hostile-send", daemon=True)
    sender.start()
    barriers, position = [], 0
    for piece in pieces:
        if piece is None:
            barriers.append(position)
        else:
            position += len(piece)
    checker = _Checker(wire, plan, export, shadow, tracker, result, barriers)
    try:
        checker.run()
    except Violation as exc:
        result.violations.append(str(exc))
    finally:
        tracker.end()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        sender.join(timeout)
    result.violations += hung
    if result.violations:
        result.violations = [f"{v} [{_describe_stream(plan)}]" for v in result.violations]
    return result


class _Checker:
    def __init__(self, wire: Wire, plan: m.Plan, export: m.Export, shadow: Shadow,
                 tracker: _Tracker, result: CaseResult, barriers: list[int]) -> None:
        self.wire, self.plan, self.export, self.shadow = wire, plan, export, shadow
        self.tracker, self.result, self.barriers = tracker, result, barriers
        self.session = m.Session()

    # -- handshake ------------------------------------------------------------------------
    def run(self) -> None:
        greeting = self._or_violation(lambda: self.wire.recv(18), "before its greeting")
        magic, opt_magic, flags = struct.unpack(">8sQH", greeting)
        if magic != m.NBDMAGIC or opt_magic != m.IHAVEOPT or not flags & 1:
            raise Violation(f"bad greeting {greeting!r}")
        plan = self.plan
        if plan.client_flags is None:
            self._expect_close("a stream cut inside the client flags")
            return
        self.session.no_zeroes = bool(flags & plan.client_flags & m.FLAG_NO_ZEROES)
        for step in plan.steps:
            verdict = step.verdict if step.data is None else m.option_verdict(
                self.export, self.session, step.option, step.data)
            what = f"option {step.option} ({len(step.data or b'')} bytes)"
            if verdict.close:
                self._expect_close(what)
                return
            try:
                outcome = self._option(step.option, verdict)
            except Closed as exc:
                if verdict.may_close or plan.lenient or (exc.reset and plan.reset_possible):
                    return
                raise Violation(f"dropped the connection instead of answering {what}; "
                                f"the spec allows {verdict}") from None
            if outcome == "abort":
                self._expect_close("NBD_OPT_ABORT")
                return
            if outcome == "transmission":
                self._transmission()
                return
        self._expect_close("a stream that ended during the handshake")

    def _or_violation(self, read: Callable[[], bytes], what: str) -> bytes:
        try:
            return read()
        except Closed:
            raise Violation(f"closed the connection {what}") from None

    def _expect_close(self, what: str) -> None:
        try:
            extra = self.wire.recv(1)
        except Closed:
            return
        raise Violation(f"sent {extra!r}... after {what}, where it must close")

    def _option(self, opt: int, verdict: m.OptionVerdict) -> str:
        if verdict.success == "export":
            return self._export_name()
        infos: dict[int, bytes] = {}
        contexts: list[tuple[int, str]] = []
        while True:
            magic, echo, kind, length = struct.unpack(">QIII", self.wire.recv(20))
            if magic != m.OPT_REPLY_MAGIC or echo != opt:
                raise Violation(f"option {opt}: reply with magic {magic:#x} for option {echo}")
            if length > 1 << 20:
                raise Violation(f"option {opt}: reply of {length} bytes")
            payload = self.wire.recv(length)
            if kind & 2**31:
                if kind not in verdict.errors:
                    raise Violation(f"option {opt}: error {kind - 2**31} where the spec "
                                    f"allows {verdict}")
                if len(payload) > m.MAX_STRING or m._string(payload) is None:
                    raise Violation(f"option {opt}: error message {payload[:40]!r}")
                if verdict.sets_meta:
                    self.session.meta_id = None  # a failed SET still replaces the contexts
                return "error"
            if verdict.success is None:
                raise Violation(f"option {opt}: reply type {kind} where the spec requires "
                                f"an error from {sorted(e - 2**31 for e in verdict.errors)}")
            if kind == m.REP_ACK:
                if length:
                    raise Violation(f"option {opt}: ACK with {length} bytes")
                return self._acked(opt, verdict, infos, contexts)
            if kind == m.REP_SERVER and verdict.success == "list":
                (n,) = struct.unpack_from(">I", payload) if length >= 4 else (length,)
                if length < 4 or n > length - 4 or m._string(payload[4:4 + n]) is None:
                    raise Violation(f"malformed NBD_REP_SERVER {payload[:40]!r}")
            elif kind == m.REP_INFO and verdict.success in ("info", "go"):
                self._info(payload, infos)
            elif kind == m.REP_META_CONTEXT and verdict.success == "meta":
                name = m._string(payload[4:]) if length >= 4 else None
                if name not in verdict.contexts or any(n == name for _, n in contexts):
                    raise Violation(f"option {opt}: context {payload!r}, expected "
                                    f"{sorted(verdict.contexts)} once each")
                contexts.append((struct.unpack_from(">I", payload)[0], name))
            else:
                raise Violation(f"option {opt}: unexpected reply type {kind}")

    def _acked(self, opt: int, verdict: m.OptionVerdict, infos: dict[int, bytes],
               contexts: list[tuple[int, str]]) -> str:
        kind, s = verdict.success, self.session
        if kind in ("info", "go") and m.INFO_EXPORT not in infos:
            raise Violation(f"option {opt} succeeded without NBD_INFO_EXPORT")
        if kind == "meta":
            if {n for _, n in contexts} != verdict.contexts:
                raise Violation(f"option {opt}: contexts {contexts}, expected "
                                f"{sorted(verdict.contexts)}")
            if verdict.sets_meta:
                s.meta_id = contexts[0][0] if contexts else None
        if opt == m.OPT_STRUCTURED_REPLY:
            s.structured = True
        if kind == "go":
            s.block_agreed = (m.INFO_BLOCK_SIZE in verdict.infos_requested
                              and m.INFO_BLOCK_SIZE in infos)
            return "transmission"
        return "abort" if kind == "abort" else "ack"

    def _info(self, payload: bytes, infos: dict[int, bytes]) -> None:
        e = self.export
        if len(payload) < 2:
            raise Violation(f"NBD_REP_INFO of {len(payload)} bytes")
        (kind,) = struct.unpack_from(">H", payload)
        infos[kind] = payload
        if kind == m.INFO_EXPORT:
            if len(payload) != 12 or struct.unpack_from(">QH", payload, 2) != (e.size,
                                                                               e.flags):
                raise Violation(f"NBD_INFO_EXPORT {payload!r}, expected size {e.size} "
                                f"flags {e.flags:#x}")
        elif kind in (m.INFO_NAME, m.INFO_DESCRIPTION):
            if len(payload) - 2 > m.MAX_STRING or m._string(payload[2:]) is None:
                raise Violation(f"NBD_REP_INFO string {payload[:40]!r}")
        elif kind == m.INFO_BLOCK_SIZE and (
                len(payload) != 14 or struct.unpack_from(">III", payload, 2) != (
                    e.minimum, e.preferred, e.maximum)):
            raise Violation(f"NBD_INFO_BLOCK_SIZE {payload!r}")

    def _export_name(self) -> str:
        e = self.export
        size, flags = struct.unpack(">QH", self.wire.recv(10))
        if (size, flags) != (e.size, e.flags):
            raise Violation(f"NBD_OPT_EXPORT_NAME answered size {size} flags {flags:#x}")
        if not self.session.no_zeroes and self.wire.recv(124) != bytes(124):
            raise Violation("NBD_OPT_EXPORT_NAME: the 124 bytes of padding are not zeroes")
        return "transmission"

    # -- transmission ---------------------------------------------------------------------
    def _transmission(self) -> None:
        plan, s = self.plan, self.session
        pending: dict[int, collections.deque[m.Request]] = collections.defaultdict(
            collections.deque)
        for req in plan.requests:
            pending[req.handle].append(req)
        partial: dict[int, tuple[m.Request, Answer]] = {}
        answers: dict[int, Answer] = {}
        reset = False
        # the longest payload a reply may carry: a client that agreed on block sizes
        # gets at most the maximum; one that did not may ask for the whole export
        limit = (max(self.export.maximum, 1 << 20) if s.block_agreed else
                 max(self.export.maximum, self.export.size)) + 64
        while True:
            try:
                (magic,) = struct.unpack(">I", self.wire.recv(4))
                if magic == m.SIMPLE_MAGIC:
                    error, handle = struct.unpack(">IQ", self.wire.recv(12))
                    req = self._claim(pending, handle, "simple reply")
                    if s.structured and req.cmd == m.CMD_READ:
                        raise Violation(f"simple reply to READ {_describe_request(req)} "
                                        "after structured replies were negotiated")
                    data = None
                    if req.cmd == m.CMD_READ and not error:
                        if req.length > limit:
                            raise Violation(f"accepted {_describe_request(req)}")
                        data = self.wire.recv(req.length)
                    answers[req.index] = Answer(True, error, data)
                    self.tracker.answer(req.index)
                elif magic == m.STRUCTURED_MAGIC:
                    flags, kind, handle, length = struct.unpack(">HHQI", self.wire.recv(16))
                    if not s.structured:
                        raise Violation("structured reply without negotiation")
                    if flags & ~m.REPLY_FLAG_DONE:
                        raise Violation(f"structured reply flags {flags:#x}")
                    if length > limit:
                        raise Violation(f"structured chunk of {length} bytes")
                    payload = self.wire.recv(length)
                    if handle not in partial:
                        partial[handle] = (self._claim(pending, handle, "structured chunk"),
                                           Answer(False))
                    req, answer = partial[handle]
                    answer.chunks.append((flags, kind, payload))
                    if flags & m.REPLY_FLAG_DONE:
                        del partial[handle]
                        answers[req.index] = answer
                        self.tracker.answer(req.index)
                else:
                    raise Violation(f"reply magic {magic:#x}")
            except Closed as exc:
                reset = exc.reset
                break
        self.result.answered = len(answers)
        self._judge(answers, reset)

    def _claim(self, pending: dict[int, collections.deque[m.Request]], handle: int,
               what: str) -> m.Request:
        queue = pending.get(handle)
        if not queue:
            raise Violation(f"{what} for handle {handle:#x}, which has no request waiting")
        return queue.popleft()

    def _judge(self, answers: dict[int, Answer], reset: bool) -> None:
        plan = self.plan
        if reset and not plan.reset_possible:
            self.result.violations.append("the connection was reset where the server had "
                                          "no reason to drop it")
        dropped_at = None
        for req in plan.requests:
            if m.may_drop_at(req) and req.index not in answers and not any(
                    j in answers for j in range(req.index, len(plan.requests))):
                dropped_at = req.index
                break
        required = plan.clean_disc and dropped_at is None and not reset
        # A request belongs to the segment its last byte is sent in: a barrier waits only
        # for requests that ended before it, and the server cannot run a request before
        # it has all of it, so one whose payload straddles a barrier runs with the
        # requests after it (a seed-101 case once put a WRITE there and read it back)
        segments: dict[int, list[m.Request]] = collections.defaultdict(list)
        for req in plan.requests:
            segments[sum(1 for b in self.barriers if b < req.end)].append(req)
        for segment in sorted(segments):
            self._segment(segments[segment], answers, required)

    def _segment(self, reqs: list[m.Request], answers: dict[int, Answer],
                 required: bool) -> None:
        s, e, shadow = self.session, self.export, self.shadow
        allowed = {r.index: m.judge(e, s, r.cmd, r.flags, r.offset, r.length) for r in reqs}
        touched = [(r.offset, r.length) for r in reqs
                   if r.cmd in m.MODIFYING and 0 in allowed[r.index]]
        mask = shadow.mask(touched)
        changes: list[tuple[m.Request, str]] = []
        for r in reqs:
            answer = answers.get(r.index)
            if answer is None:
                if required:
                    self.result.violations.append(
                        f"{_describe_request(r)} never answered before the server closed "
                        "after a clean DISC")
                if r.cmd in m.MODIFYING:
                    changes.append((r, "unknown"))
                continue
            try:
                error = self._check_answer(r, answer, allowed[r.index], mask)
            except Violation as exc:
                self.result.violations.append(f"{_describe_request(r)}: {exc}")
                if r.cmd in m.MODIFYING:
                    changes.append((r, "unknown"))
                continue
            if r.cmd in m.MODIFYING:
                if error == 0:
                    changes.append((r, {m.CMD_WRITE: "write", m.CMD_TRIM: "unknown",
                                        m.CMD_WRITE_ZEROES: "zero"}[r.cmd]))
                elif error not in (m.EINVAL, m.ENOSPC, m.EPERM, m.EOVERFLOW):
                    changes.append((r, "unknown"))
        for r, how in changes:
            if how == "write":
                shadow.write(r.offset, r.payload or b"")
            elif how == "zero":
                shadow.zero(r.offset, r.length)
        for r, how in changes:
            if how == "unknown":
                shadow.forget(r.offset, r.length)
        done = [r for r, how in changes if how != "unknown"]
        for i, a in enumerate(done):  # overlapping changes in one segment: either order
            for b in done[i + 1:]:
                lo, hi = max(a.offset, b.offset), min(a.offset + a.length,
                                                      b.offset + b.length)
                if lo < hi:
                    shadow.forget(lo, hi - lo)

    def _check_answer(self, r: m.Request, answer: Answer, allowed: frozenset[int],
                      mask: bytearray) -> int:
        """The errno answered (0: success); raise Violation if the spec forbids it."""
        if answer.simple:
            if answer.error not in allowed:
                raise Violation(f"answered {answer.error}, the spec allows {sorted(allowed)}")
            if answer.error == 0 and r.cmd == m.CMD_BLOCK_STATUS:
                raise Violation("BLOCK_STATUS answered by a simple reply")
            if answer.data is not None:
                self._compare(r, answer.data, mask)
            return answer.error
        return self._structured(r, answer, allowed, mask)

    def _compare(self, r: m.Request, data: bytes, mask: bytearray) -> None:
        where = self.shadow.mismatch(mask, r.offset, data)
        if where:
            raise Violation(f"wrong data: {where}")

    def _structured(self, r: m.Request, answer: Answer, allowed: frozenset[int],
                    mask: bytearray) -> int:
        lo, hi = r.offset, r.offset + r.length
        content: list[tuple[int, bytes]] = []
        status: list[bytes] = []
        error = 0
        last = len(answer.chunks) - 1
        for i, (_flags, kind, payload) in enumerate(answer.chunks):
            if kind == m.CHUNK_NONE:
                if payload or i != last:
                    raise Violation("NBD_REPLY_TYPE_NONE with a payload or not last")
            elif kind in (m.CHUNK_ERROR, m.CHUNK_ERROR_OFFSET):
                tail = 8 if kind == m.CHUNK_ERROR_OFFSET else 0
                if len(payload) < 6 + tail:
                    raise Violation(f"error chunk of {len(payload)} bytes")
                code, n = struct.unpack_from(">IH", payload)
                if code == 0 or n > len(payload) - 6 - tail or \
                        m._string(payload[6:6 + n]) is None:
                    raise Violation(f"malformed error chunk {payload[:40]!r}")
                if tail:
                    (at,) = struct.unpack_from(">Q", payload, 6 + n)
                    if not lo <= at < hi:
                        raise Violation(f"error offset {at} outside the request")
                error = error or code
            elif kind == m.CHUNK_OFFSET_DATA and r.cmd == m.CMD_READ:
                if len(payload) < 9:
                    raise Violation(f"OFFSET_DATA chunk of {len(payload)} bytes")
                (at,) = struct.unpack_from(">Q", payload)
                content.append((at, payload[8:]))
            elif kind == m.CHUNK_OFFSET_HOLE and r.cmd == m.CMD_READ:
                if len(payload) != 12:
                    raise Violation(f"OFFSET_HOLE chunk of {len(payload)} bytes")
                at, n = struct.unpack(">QI", payload)
                if n == 0:
                    raise Violation("OFFSET_HOLE of 0 bytes")
                content.append((at, bytes(n)))
            elif kind == m.CHUNK_BLOCK_STATUS and r.cmd == m.CMD_BLOCK_STATUS:
                status.append(payload)
            else:
                raise Violation(f"chunk type {kind} in a reply to command {r.cmd}")
        content.sort(key=lambda item: item[0])
        position = lo
        for at, data in content:
            if at < position or at + len(data) > hi:
                raise Violation(f"content chunk at {at}+{len(data)} overlaps or leaves "
                                f"{lo}+{r.length}")
            position = at + len(data)
        if error:
            if error not in allowed:
                raise Violation(f"answered {error}, the spec allows {sorted(allowed)}")
            return error
        if 0 not in allowed:
            raise Violation(f"succeeded, the spec requires one of {sorted(allowed)}")
        if r.cmd == m.CMD_READ:
            if sum(len(d) for _, d in content) != r.length:
                raise Violation(f"content chunks cover {sum(len(d) for _, d in content)} "
                                f"of {r.length} bytes")
            if r.flags & m.CF_DF and len(content) > 1:
                raise Violation(f"{len(content)} content chunks despite NBD_CMD_FLAG_DF")
            self._compare(r, b"".join(d for _, d in content), mask)
        elif r.cmd == m.CMD_BLOCK_STATUS:
            if len(status) != 1:
                raise Violation(f"{len(status)} BLOCK_STATUS chunks for one context")
            self._block_status(r, status[0], mask)
        return 0

    def _block_status(self, r: m.Request, payload: bytes, mask: bytearray) -> None:
        if len(payload) < 12 or (len(payload) - 4) % 8:
            raise Violation(f"BLOCK_STATUS chunk of {len(payload)} bytes")
        (context,) = struct.unpack_from(">I", payload)
        if context != self.session.meta_id:
            raise Violation(f"BLOCK_STATUS for context {context}, negotiated "
                            f"{self.session.meta_id}")
        descriptors = list(struct.iter_unpack(">II", payload[4:]))
        if r.flags & m.CF_REQ_ONE and (len(descriptors) != 1
                                       or descriptors[0][0] > r.length):
            raise Violation(f"NBD_CMD_FLAG_REQ_ONE answered with {descriptors[:4]}")
        position = r.offset
        for i, (length, flags) in enumerate(descriptors):
            if length == 0 or flags & ~(m.STATE_HOLE | m.STATE_ZERO):
                raise Violation(f"block status descriptor ({length}, {flags:#x})")
            if position >= r.offset + r.length and i:
                raise Violation("block status descriptors past the end of the request")
            if flags & m.STATE_ZERO:
                end = min(position + length, r.offset + r.length)
                at = self.shadow.nonzero_known(mask, position, end - position)
                if at is not None:
                    raise Violation(f"block status says zero, but byte {at} was written "
                                    "non-zero")
            position += length

# -- the server's side of things ----------------------------------------------------------
def learn_export(connect: Connect) -> m.Export:
    """What the server says about its default export (NBD_OPT_INFO with every item)."""
    sock = connect()
    wire = Wire(sock, 30)
    try:
        wire.recv(18)
        sock.sendall(struct.pack(">I", 3) + m.option(m.OPT_INFO, m.info_data(
            b"", [m.INFO_NAME, m.INFO_DESCRIPTION, m.INFO_BLOCK_SIZE])))
        size = flags = 0
        minimum, preferred, maximum = 1, 4096, m.DOS_PAYLOAD
        description = None
        while True:
            _, _, kind, length = struct.unpack(">QIII", wire.recv(20))
            payload = wire.recv(length)
            if kind == m.REP_ACK:
                break
            assert kind == m.REP_INFO, f"NBD_OPT_INFO refused: {kind:#x} {payload!r}"
            (info,) = struct.unpack_from(">H", payload)
            if info == m.INFO_EXPORT:
                size, flags = struct.unpack_from(">QH", payload, 2)
            elif info == m.INFO_BLOCK_SIZE:
                minimum, preferred, maximum = struct.unpack_from(">III", payload, 2)
            elif info == m.INFO_DESCRIPTION:
                description = payload[2:].decode()
        sock.sendall(m.option(m.OPT_ABORT))
    finally:
        sock.close()
    return m.Export("", size, flags, minimum, preferred, maximum, description)


def unix_connector(path: str) -> Connect:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(path)
        return sock

    return connect


def tcp_connector(host: str, port: int) -> Connect:
    def connect() -> socket.socket:
        sock = socket.create_connection((host, port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return connect


class ServerErrors:
    """Errors the in-process server logged or let escape from a thread."""

    def __init__(self) -> None:
        self.records: list[str] = []
        self._handler = _ListHandler(self.records)
        self._old_hook = threading.excepthook

    def __enter__(self) -> ServerErrors:
        logging.getLogger("cloudnbd").addHandler(self._handler)

        def hook(args: threading.ExceptHookArgs) -> None:
            self.records.append(f"uncaught {args.exc_type.__name__} in thread "
                                f"{args.thread.name if args.thread else '?'}: "
                                f"{args.exc_value}")
            self._old_hook(args)

        threading.excepthook = hook
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("cloudnbd").removeHandler(self._handler)
        threading.excepthook = self._old_hook


class _ListHandler(logging.Handler):
    def __init__(self, records: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.out = records

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(self.format(record))


# -- a client that must not notice ----------------------------------------------------------
class GoodClient:
    """A well-behaved client on its own region: writes random blocks and reads them back,
    re-reads older ones, flushes; each request with a deadline. Any error, wrong byte or
    timeout is a failure: hostile neighbours must not disturb it."""

    BLOCK = 4096

    def __init__(self, connect: Connect, region: Region, seed: int) -> None:
        self.connect, self.region = connect, region
        self.rng = random.Random(seed)
        self.shadow = bytearray(region.length)
        self.written: list[tuple[int, int]] = []
        self.ops = 0
        self.failures: list[str] = []
        self.max_latency = 0.0
        self.cond = threading.Condition()

    def run(self, stop: threading.Event) -> None:
        client: NbdClient | None = None
        while not stop.is_set() and len(self.failures) < 20:
            try:
                if client is None:
                    client = NbdClient(self.connect())
                self._one(client)
            except (OSError, ConnectionError, NbdError, AssertionError) as exc:
                self.failures.append(f"good client: {type(exc).__name__}: {exc}")
                if client is not None:
                    client.sock.close()
                client = None
        if client is not None:
            client.close()

    def _one(self, client: NbdClient) -> None:
        rng, region = self.rng, self.region
        started = time.monotonic()
        if self.ops % 16 == 15:
            client.flush()
        elif self.ops % 4 == 3 and self.written:
            offset, length = rng.choice(self.written)
            self._check(client.pread(offset, length), offset)
        else:
            length = rng.randint(1, 16) * self.BLOCK
            offset = region.base + rng.randrange(0, region.length - length + 1, self.BLOCK)
            data = rng.randbytes(length)
            client.pwrite(data, offset, fua=rng.random() < 0.1)
            at = offset - region.base
            self.shadow[at:at + length] = data
            self.written.append((offset, length))
            self._check(client.pread(offset, length), offset)
        with self.cond:
            self.max_latency = max(self.max_latency, time.monotonic() - started)
            self.ops += 1
            self.cond.notify_all()

    def _check(self, got: bytes, offset: int) -> None:
        at = offset - self.region.base
        if got != self.shadow[at:at + len(got)]:
            bad = next(i for i in range(len(got)) if got[i] != self.shadow[at + i])
            raise AssertionError(f"data disturbed: byte {offset + bad} reads {got[bad]:#x}, "
                                 f"it wrote {self.shadow[at + bad]:#x}")

    def wait_for_ops(self, more: int, timeout: float) -> bool:
        with self.cond:
            target = self.ops + more
            return self.cond.wait_for(lambda: self.ops >= target or len(self.failures) >= 20,
                                      timeout) and self.ops >= target

    def verify_all(self) -> None:
        """Read the whole region back on a new connection."""
        client = NbdClient(self.connect())
        try:
            step = 1 << 20
            for offset in range(self.region.base, self.region.end, step):
                self._check(client.pread(offset, min(step, self.region.end - offset)), offset)
        finally:
            client.close()


# -- attacks that are not one stream ---------------------------------------------------------
def slow_reader(connect: Connect, export: m.Export, region: Region, shadow: Shadow,
                good: GoodClient | None, c: Chooser, timeout: float) -> CaseResult:
    """Pipeline many READs and read none of the answers until the good client has
    done more work: a client that stops reading must hold up nobody else."""
    result = CaseResult()
    client = NbdClient(connect())
    try:
        length = c.pick((64 << 10, 256 << 10, 1 << 20))
        reads = {}
        for _ in range(c.int(8, 64)):
            offset = region.base + c.int(0, (region.length - length) // 4096) * 4096
            reads[client.send(m.CMD_READ, offset, length)] = offset
        result.requests = len(reads)
        if good is not None and not good.wait_for_ops(3, timeout):
            result.violations.append(f"the good client made no progress in {timeout:.0f}s "
                                     f"while a client left {len(reads)} reads unread")
            return result
        mask = shadow.mask([])
        for _ in reads:
            handle, error, data = client.recv({h: length for h in reads})
            where = shadow.mismatch(mask, reads[handle], data) if not error else \
                f"error {error}"
            if where:
                result.violations.append(f"slow reader: read at {reads[handle]}: {where}")
            result.answered += 1
        client.send(m.CMD_DISC, 0, 0)
        if client.sock.recv(1) != b"":
            result.violations.append("slow reader: no close after DISC")
    except (OSError, ConnectionError, AssertionError) as exc:
        result.violations.append(f"slow reader: {type(exc).__name__}: {exc}")
    finally:
        client.sock.close()
    return result


def slowloris(connect: Connect, good: GoodClient | None, c: Chooser, timeout: float
              ) -> CaseResult:
    """A connection that stops halfway through the handshake must not hold up others."""
    result = CaseResult()
    sock = connect()
    try:
        sock.recv(18)
        prefix = struct.pack(">I", 3) + m.option(m.OPT_GO, m.info_data(b"", []))
        sock.sendall(prefix[:c.int(0, len(prefix) - 1)])
        if good is not None and not good.wait_for_ops(2, timeout):
            result.violations.append("the good client made no progress while a handshake "
                                     "stalled")
    except OSError as exc:
        result.violations.append(f"slowloris: {exc}")
    finally:
        sock.close()
    return result


# -- the hammer ---------------------------------------------------------------------------
@dataclass
class Report:
    name: str
    cases: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    requests: int = 0
    good_ops: int = 0
    good_failures: list[str] = field(default_factory=list)
    good_max_latency: float = 0.0
    seconds: float = 0.0
    slowest_case: tuple[float, str] = (0.0, "")

    def add(self, kind: str, result: CaseResult, seconds: float = 0.0) -> None:
        self.cases[kind] += 1
        self.requests += result.requests
        self.failures += result.violations
        self.slowest_case = max(self.slowest_case, (seconds, kind))

    def merge(self, other: Report) -> None:
        self.cases.update(other.cases)
        self.failures += other.failures
        self.requests += other.requests
        self.good_ops += other.good_ops
        self.good_failures += other.good_failures
        self.good_max_latency = max(self.good_max_latency, other.good_max_latency)
        self.seconds += other.seconds
        self.slowest_case = max(self.slowest_case, other.slowest_case)

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.cases.items()))
        good = (f"; good client {self.good_ops} ops, {len(self.good_failures)} failures, "
                f"slowest {self.good_max_latency:.2f}s" if self.good_ops or
                self.good_failures else "")
        slowest = f", slowest case {self.slowest_case[0]:.1f}s" if self.slowest_case[1] else ""
        return (f"{self.name}: {self.total} cases run ({kinds}; {self.requests} requests), "
                f"{len(self.failures)} failures{good}{slowest}, {self.seconds:.0f}s")


def reset_regions(connect: Connect, regions: list[Region]) -> None:
    """Zero the regions through a plain client, so shadows may start as all zeros
    whatever earlier runs left on the device."""
    client = NbdClient(connect())
    try:
        for region in regions:
            client.zero(region.base, region.length)
    finally:
        client.close()


def layout(size: int, workers: int) -> tuple[Region, list[Region]]:
    """The good client's region first, then one per hostile worker."""
    good = Region(0, min(4 << 20, size // 4) // 4096 * 4096)
    each = min(4 << 20, (size - good.length) // max(1, workers)) // 4096 * 4096
    return good, [Region(good.end + i * each, each) for i in range(workers)]


def hammer(connect: Connect, export: m.Export, *, seed: int, workers: int, cases: int,
           scale: Scale = LARGE, name: str = "hostile hammer", attacks: bool = True,
           timeout: float = 30.0, good: bool = True) -> Report:
    """workers hostile connections at once, each running `cases` cases back to back,
    while a good client works on its own region."""
    report = Report(name)
    started = time.monotonic()
    good_region, regions = layout(export.size, workers)
    reset_regions(connect, [good_region, *regions])
    stop = threading.Event()
    good_client = GoodClient(connect, good_region, seed) if good else None
    good_thread = None
    if good_client is not None:
        good_thread = threading.Thread(target=good_client.run, args=(stop,),
                                       name="good-client", daemon=True)
        good_thread.start()
    lock = threading.Lock()

    def work(i: int) -> None:
        c = RandomChooser(random.Random(seed * 7919 + i))
        shadow = Shadow(regions[i])
        for _ in range(cases):
            begun = time.monotonic()
            roll = c.int(0, 99)
            if attacks and roll < 4:
                kind, res = "slow-reader", slow_reader(connect, export, regions[i], shadow,
                                                       good_client, c, timeout)
            elif attacks and roll < 7:
                kind, res = "slowloris", slowloris(connect, good_client, c, timeout)
            else:
                kind = "stream"
                res = run_case(connect, export, gen_case(c, export, regions[i], scale),
                               shadow, timeout)
            with lock:
                report.add(kind, res, time.monotonic() - begun)

    threads = [threading.Thread(target=work, args=(i,), name=f"hostile-{i}", daemon=True)
               for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    if good_client is not None and good_thread is not None:
        good_thread.join(timeout + 5)
        try:
            good_client.verify_all()
        except (OSError, ConnectionError, NbdError, AssertionError) as exc:
            good_client.failures.append(f"good client, final read: {exc}")
        report.good_ops = good_client.ops
        report.good_failures = good_client.failures
        report.good_max_latency = good_client.max_latency
    report.seconds = time.monotonic() - started
    return report


# -- a server in its own process (for memory and file-descriptor limits) ------------------
def serve_main(argv: list[str]) -> None:
    """`python -m tests.hostile_harness SOCKET SIZE`: serve a MemoryDevice on a Unix
    socket as the real front would (malloc tuned the same way) and print "ready"; then
    answer each line "connections" on stdin with the number open, and exit when stdin
    closes."""
    import sys
    from pathlib import Path

    from cloudnbd.engine.malloc import limit_malloc_retention
    from cloudnbd.nbd.device import MemoryDevice
    from cloudnbd.nbd.server import NbdServer, ServerSettings

    logging.basicConfig(level=logging.WARNING)
    limit_malloc_retention()
    server = NbdServer(MemoryDevice(int(argv[1])), ServerSettings(unix_path=Path(argv[0])))
    server.start()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "connections":
            print(server.connection_count, flush=True)
    server.shutdown(timeout=5)


if __name__ == "__main__":
    import sys

    serve_main(sys.argv[1:])
