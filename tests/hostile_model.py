"""What the NBD protocol document lets a server answer to any byte stream a client sends.

Written from doc/proto.md, independently of cloudnbd.nbd: a checker that shared the
server's parser would share its bugs. The one thing taken from the server is a policy
the spec leaves to it (how long an option may be before it is refused or the client is
dropped).

plan(stream) parses the bytes a client sends the way the spec says a server must: the
greeting answer, option after option, then request after request. It does not decide
everything up front: where the spec allows several answers (an error or success, a
reply or a dropped connection), the verdict lists them and the runner
(tests/hostile_harness.py) checks what the server chose. Framing never depends on
those choices, so the positions of every option and request are fixed by the bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cloudnbd.nbd.protocol import MAX_OPTION_LENGTH

# -- wire constants (doc/proto.md) --------------------------------------------------------
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_PLATFORM, ERR_TLS_REQD = (2**31 + n for n in range(1, 6))
ERR_UNKNOWN, ERR_SHUTDOWN, ERR_BLOCK_SIZE_REQD, ERR_TOO_BIG = (2**31 + n for n in range(6, 10))

INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA = 1, 2, 4, 8
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_SEND_DF = 32, 64, 128
TF_SEND_CACHE, TF_SEND_FAST_ZERO = 1024, 2048

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
CF_FUA, CF_NO_HOLE, CF_DF, CF_REQ_ONE, CF_FAST_ZERO = 1, 2, 4, 8, 16
MODIFYING = (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)

CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR, CHUNK_ERROR_OFFSET = 2**15 + 1, 2**15 + 2
REPLY_FLAG_DONE = 1
STATE_HOLE, STATE_ZERO = 1, 2
BASE_ALLOCATION = "base:allocation"

EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
WIRE_ERRNOS = frozenset({EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN})
MAX_STRING = 4096
#: "any payload not exceeding 2^25 bytes SHOULD NOT be considered a denial of service";
#: above it a server may drop the client
DOS_PAYLOAD = 2**25
#: a 28-byte request header
REQUEST = struct.Struct(">IHHQQI")
OPTION_HEADER = struct.Struct(">QII")


# -- encoders -----------------------------------------------------------------------------
def option(opt: int, data: bytes = b"", declared: int | None = None,
           magic: int = IHAVEOPT) -> bytes:
    """An option; declared != len(data) makes it lie about its length."""
    return OPTION_HEADER.pack(magic, opt, len(data) if declared is None else declared) + data


def info_data(name: bytes, infos: list[int]) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos),
                                                             *infos)


def meta_data(name: bytes, queries: list[bytes]) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def request(cmd: int, handle: int, offset: int, length: int, flags: int = 0,
            magic: int = REQUEST_MAGIC) -> bytes:
    return REQUEST.pack(magic, flags, cmd, handle, offset, length)


# -- what the server offers ---------------------------------------------------------------
@dataclass(frozen=True)
class Export:
    """What a server said about its one export (learned once, then held to it)."""

    name: str
    size: int
    flags: int
    minimum: int = 1
    preferred: int = 4096
    maximum: int = DOS_PAYLOAD
    description: str | None = None
    tls: bool = False


@dataclass
class Session:
    """What the handshake negotiated; the transmission verdicts depend on it."""

    structured: bool = False
    meta_id: int | None = None
    block_agreed: bool = False
    no_zeroes: bool = False


# -- verdicts -----------------------------------------------------------------------------
@dataclass(frozen=True)
class OptionVerdict:
    """The answers the spec allows to one option."""

    #: acceptable error reply types
    errors: frozenset[int] = frozenset()
    #: the successful answer, if success is allowed: "ack", "list", "info", "go",
    #: "meta", "export" (NBD_OPT_EXPORT_NAME's bare export data), "abort"
    success: str | None = None
    #: META_CONTEXT names a successful answer carries
    contexts: frozenset[str] = frozenset()
    #: the server may drop the connection instead of answering
    may_close: bool = False
    #: the server must drop the connection without answering
    close: bool = False
    infos_requested: tuple[int, ...] = ()
    #: an NBD_OPT_SET_META_CONTEXT (it replaces the selected contexts, even when it fails)
    sets_meta: bool = False


@dataclass
class OptionStep:
    option: int
    start: int
    end: int
    #: fixed by framing alone (a bad magic, a cut stream, an option too long to read)
    verdict: OptionVerdict
    #: the option's data when it was read in full: then the verdict depends on the
    #: session so far, and the runner asks option_verdict() with what was negotiated
    data: bytes | None = None


@dataclass
class Request:
    index: int
    start: int  # where its header starts in the stream
    end: int  # just past its payload
    magic: int
    flags: int
    cmd: int
    handle: int
    offset: int
    length: int
    payload: bytes | None = None  # a WRITE's data


@dataclass
class Plan:
    """Everything fixed by the bytes of one client stream."""

    stream_length: int
    client_flags: int | None = None
    #: the client's flags leave fixed newstyle, so the server may treat unknown options
    #: as fatal: dropping the connection at any option is allowed
    lenient: bool = False
    steps: list[OptionStep] = field(default_factory=list)
    #: "open" (the stream ended between options), "transmission", or "closed" (a step
    #: must close, or the stream was cut inside the handshake)
    handshake_end: str = "open"
    transmission_start: int = 0
    requests: list[Request] = field(default_factory=list)
    #: how transmission ends: "eof" (the stream ends between or inside requests),
    #: "disc" (NBD_CMD_DISC), "bad-magic"
    terminal: str = "eof"
    #: the terminal request was a clean NBD_CMD_DISC with nothing sent after it: every
    #: request before it must be answered
    clean_disc: bool = False
    #: predicted negotiation (exact for a server that makes the spec's usual choices);
    #: generators use it, checks use what the server actually answered
    predicted: Session = field(default_factory=Session)

    #: the server may drop the connection somewhere with bytes of ours still unread; on a
    #: Unix socket that is a reset, and the replies it sent before are lost with it
    reset_possible: bool = False


class _Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def _string(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parse_info(data: bytes) -> tuple[bytes, list[int]] | None:
    """(name, info requests) of an OPT_INFO/GO payload, None if malformed."""
    if len(data) < 6:
        return None
    (name_length,) = struct.unpack_from(">I", data)
    if name_length > len(data) - 6:
        return None
    name = data[4:4 + name_length]
    (count,) = struct.unpack_from(">H", data, 4 + name_length)
    if len(data) != 4 + name_length + 2 + 2 * count:
        return None
    return name, list(struct.unpack_from(f">{count}H", data, 6 + name_length))


def _parse_meta(data: bytes) -> tuple[bytes, list[bytes]] | None:
    if len(data) < 8:
        return None
    (name_length,) = struct.unpack_from(">I", data)
    if name_length > len(data) - 8:
        return None
    name = data[4:4 + name_length]
    pos = 4 + name_length
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            return None
        (length,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if length > len(data) - pos:
            return None
        queries.append(data[pos:pos + length])
        pos += length
    if pos != len(data):
        return None
    return name, queries


def _name_errors(export: Export, name: bytes) -> frozenset[int] | None:
    """The errors an export name earns, or None if it names the export."""
    if len(name) > MAX_STRING:
        return frozenset({ERR_INVALID, ERR_TOO_BIG, ERR_UNKNOWN})
    text = _string(name)
    if text is None:
        return frozenset({ERR_INVALID, ERR_UNKNOWN})
    return None if text == export.name else frozenset({ERR_UNKNOWN})


def option_verdict(export: Export, s: Session, opt: int, data: bytes) -> OptionVerdict:
    """The spec's answer to one option whose data was read in full."""
    if opt == OPT_EXPORT_NAME:
        # no way to answer an error: a name the server does not serve ends the session
        if _name_errors(export, data) is None:
            return OptionVerdict(success="export")
        return OptionVerdict(close=True)
    if opt == OPT_ABORT:
        return OptionVerdict(success="abort", errors=frozenset({ERR_INVALID}) if data else
                             frozenset(), may_close=True)
    if opt == OPT_LIST:
        return OptionVerdict(errors=frozenset({ERR_INVALID})) if data else \
            OptionVerdict(success="list", errors=frozenset({ERR_POLICY}))
    if opt == OPT_STARTTLS:
        if export.tls:
            raise NotImplementedError("TLS sessions are not fuzzed")
        allowed = {ERR_POLICY, ERR_UNSUP} | ({ERR_INVALID} if data else set())
        return OptionVerdict(errors=frozenset(allowed))
    if opt in (OPT_INFO, OPT_GO):
        parsed = _parse_info(data)
        if parsed is None:
            return OptionVerdict(errors=frozenset({ERR_INVALID}))
        name, infos = parsed
        bad_name = _name_errors(export, name)
        if bad_name is not None:
            return OptionVerdict(errors=bad_name)
        # "The client MUST NOT include any information request in the list more than
        # once": the server may refuse a list that does
        dup = frozenset({ERR_INVALID}) if len(set(infos)) != len(infos) else frozenset()
        return OptionVerdict(success="go" if opt == OPT_GO else "info", errors=dup,
                             infos_requested=tuple(infos))
    if opt == OPT_STRUCTURED_REPLY:
        if data:
            return OptionVerdict(errors=frozenset({ERR_INVALID}))
        # a repeat "MAY" be failed with ERR_INVALID
        return OptionVerdict(success="ack",
                             errors=frozenset({ERR_INVALID}) if s.structured else frozenset())
    if opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
        setting = opt == OPT_SET_META_CONTEXT
        parsed = _parse_meta(data)
        if parsed is None:
            return OptionVerdict(errors=frozenset({ERR_INVALID}), sets_meta=setting)
        name, raw_queries = parsed
        errors: set[int] = set()
        if setting and not s.structured:
            errors.add(ERR_INVALID)  # SHOULD
        bad_name = _name_errors(export, name)
        if bad_name is not None:
            errors |= bad_name
        queries = [_string(q) for q in raw_queries]
        if any(q is None for q in queries) or any(len(q) > MAX_STRING for q in raw_queries):
            errors |= {ERR_INVALID, ERR_TOO_BIG}
        if errors:
            return OptionVerdict(errors=frozenset(errors), sets_meta=setting)
        allowed = {ERR_TOO_BIG} if len(queries) > 16 else set()
        if not setting and not s.structured:
            allowed.add(ERR_INVALID)  # MAY
        if setting:
            wanted = BASE_ALLOCATION in queries
        else:
            wanted = not queries or any(q in (BASE_ALLOCATION, "base:") for q in queries)
        return OptionVerdict(success="meta", errors=frozenset(allowed), sets_meta=setting,
                             contexts=frozenset({BASE_ALLOCATION} if wanted else ()))
    return OptionVerdict(errors=frozenset({ERR_UNSUP}))


def judge(export: Export, s: Session, cmd: int, flags: int, offset: int, length: int
          ) -> frozenset[int]:
    """The answers (errno values; 0 is success) the spec allows to one request."""
    fua = CF_FUA if export.flags & TF_SEND_FUA else 0
    applicable = {
        CMD_READ: CF_DF if s.structured else 0,
        CMD_WRITE: fua,
        CMD_FLUSH: 0,
        CMD_TRIM: fua,
        CMD_CACHE: 0,
        CMD_WRITE_ZEROES: fua | CF_NO_HOLE | (
            CF_FAST_ZERO if export.flags & TF_SEND_FAST_ZERO else 0),
        CMD_BLOCK_STATUS: CF_REQ_ONE,
    }
    if cmd not in applicable:
        return frozenset({EINVAL})
    errors: set[int] = set()
    unspecified = False  # the spec leaves the answer open: any error, or success
    if flags & ~applicable[cmd]:
        errors.add(EINVAL)
    if cmd == CMD_FLUSH:
        if errors:
            return frozenset(errors)
        return frozenset({0} | WIRE_ERRNOS) if offset or length else frozenset({0})
    if cmd in MODIFYING and export.flags & TF_READ_ONLY:
        errors.add(EPERM)
    if cmd == CMD_BLOCK_STATUS and s.meta_id is None:
        errors.add(EINVAL)
    if offset + length > export.size:
        if length:
            errors.add(ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL)
        else:  # past the end, but "one or more sectors beyond" it there are none
            unspecified = True
    oversized = cmd in (CMD_READ, CMD_WRITE) and length > export.maximum
    if oversized and s.block_agreed:  # "the client MUST NOT request a length larger"
        errors |= {EINVAL, EOVERFLOW}
    if s.block_agreed and (offset % export.minimum or length % export.minimum):
        if cmd == CMD_BLOCK_STATUS:
            unspecified = True
        else:
            errors.add(EINVAL)
    if length == 0:
        unspecified = True
    if errors:
        return frozenset(errors)
    ok = {0}
    if cmd == CMD_WRITE_ZEROES and flags & CF_FAST_ZERO:
        ok.add(ENOTSUP)
    if cmd == CMD_READ and flags & CF_DF and length > 65536:
        ok.add(EOVERFLOW)
    if oversized:
        # without agreed sizes the maximum is only the default's floor: a server "SHOULD"
        # take at least 2^25 bytes, and may take more ("effectively unlimited") or
        # "cleanly error commands that fall outside" its own constraints
        ok |= {EINVAL, EOVERFLOW}
    if unspecified:
        ok |= WIRE_ERRNOS
    return frozenset(ok)


def may_drop_at(req: Request) -> bool:
    """A request whose payload the spec lets the server refuse to read (a denial of
    service): it may drop the connection there instead of answering."""
    return req.cmd == CMD_WRITE and req.length > DOS_PAYLOAD


# -- the plan -----------------------------------------------------------------------------
def plan(export: Export, stream: bytes) -> Plan:
    """Parse a client's whole byte stream as the spec says a server must."""
    result = Plan(stream_length=len(stream))
    r = _Reader(stream)
    if r.left() < 4:
        result.handshake_end = "closed"
        return result
    (flags,) = struct.unpack(">I", r.take(4))
    result.client_flags = flags
    if flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        result.handshake_end = "closed"  # unknown client flags: MUST close
        result.steps.append(OptionStep(-1, 0, 4, OptionVerdict(close=True)))
        return result
    result.lenient = not flags & FLAG_FIXED_NEWSTYLE
    s = result.predicted
    s.no_zeroes = bool(flags & FLAG_NO_ZEROES)
    while True:
        start = r.pos
        if r.left() == 0:
            return result  # open: the server waits for the next option
        if r.left() < 16:
            r.take(r.left())
            result.steps.append(OptionStep(-1, start, r.pos, OptionVerdict(close=True)))
            result.handshake_end = "closed"
            return result
        magic, opt, length = OPTION_HEADER.unpack(r.take(16))
        if magic != IHAVEOPT:
            result.steps.append(OptionStep(opt, start, r.pos, OptionVerdict(close=True)))
            result.handshake_end = "closed"
            result.reset_possible = r.left() > 0
            return result
        if length > MAX_OPTION_LENGTH:
            # too long to hold: ERR_TOO_BIG after skipping it, or a dropped client
            if r.left() < length:
                r.take(r.left())
                result.steps.append(OptionStep(opt, start, r.pos, OptionVerdict(close=True)))
                result.handshake_end = "closed"
                return result
            r.take(length)
            verdict = OptionVerdict(errors=frozenset({ERR_TOO_BIG}), may_close=True)
            if opt == OPT_EXPORT_NAME:
                verdict = OptionVerdict(close=True)
            result.steps.append(OptionStep(opt, start, r.pos, verdict))
            result.reset_possible = True
            if verdict.close:
                result.handshake_end = "closed"
                return result
            continue
        if r.left() < length:
            r.take(r.left())
            result.steps.append(OptionStep(opt, start, r.pos, OptionVerdict(close=True)))
            result.handshake_end = "closed"
            return result
        data = r.take(length)
        verdict = option_verdict(export, s, opt, data)
        result.steps.append(OptionStep(opt, start, r.pos, verdict, data))
        if verdict.close or verdict.success == "abort":
            result.handshake_end = "closed"
            result.reset_possible = r.left() > 0
            return result
        if result.lenient:
            result.reset_possible = True
        # the usual choices, for generators: success where it is allowed
        if verdict.sets_meta:
            s.meta_id = 1 if verdict.success == "meta" and verdict.contexts else None
        if verdict.success == "ack" and opt == OPT_STRUCTURED_REPLY:
            s.structured = True
        if verdict.success in ("go", "export"):
            s.block_agreed = INFO_BLOCK_SIZE in verdict.infos_requested
            result.handshake_end = "transmission"
            result.transmission_start = r.pos
            break
    _plan_requests(result, stream, r)
    return result


def _plan_requests(result: Plan, stream: bytes, r: _Reader) -> None:
    while True:
        start = r.pos
        if r.left() == 0:
            result.terminal = "eof"
            return
        if r.left() < REQUEST.size:
            r.take(r.left())
            result.terminal = "eof"
            return
        magic, flags, cmd, handle, offset, length = REQUEST.unpack(r.take(REQUEST.size))
        req = Request(len(result.requests), start, r.pos, magic, flags, cmd, handle, offset,
                      length)
        if magic != REQUEST_MAGIC:
            result.terminal = "bad-magic"
            result.reset_possible |= r.left() > 0
            return
        if cmd == CMD_DISC:
            result.terminal = "disc"
            result.clean_disc = r.left() == 0 and not (flags or offset or length)
            result.reset_possible |= r.left() > 0
            return
        if cmd == CMD_WRITE:
            if may_drop_at(req):
                result.reset_possible = True
            if r.left() < length:
                r.take(r.left())  # cut inside the payload: never a whole request
                result.terminal = "eof"
                return
            req.payload = r.take(length)
            req.end = r.pos
        result.requests.append(req)
