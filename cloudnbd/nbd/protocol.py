"""NBD wire constants and structures (fixed newstyle), from the NBD protocol document.

Pure data: no sockets here, so the encoders and decoders can be tested on their own.
All integers are big-endian on the wire.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake: server greeting after NBDMAGIC, client flags, option header, option reply
GREETING = struct.Struct(">8sQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
# transmission
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")

MAX_OPTION_LENGTH = 64 * 1024
MAX_STRING = 4096  # names, descriptions and meta context queries


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1
    NO_ZEROES = 2


class ClientFlag(IntFlag):
    FIXED_NEWSTYLE = 1
    NO_ZEROES = 2


class Option(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Reply(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 0x80000001
    ERR_POLICY = 0x80000002
    ERR_INVALID = 0x80000003
    ERR_PLATFORM = 0x80000004
    ERR_TLS_REQD = 0x80000005
    ERR_UNKNOWN = 0x80000006
    ERR_SHUTDOWN = 0x80000007
    ERR_BLOCK_SIZE_REQD = 0x80000008
    ERR_TOO_BIG = 0x80000009


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Command(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


#: which flags each command may carry (anything else is EINVAL)
ALLOWED_FLAGS = {
    Command.READ: CommandFlag.DF,
    Command.WRITE: CommandFlag.FUA,
    Command.DISC: CommandFlag(0),
    Command.FLUSH: CommandFlag(0),
    Command.TRIM: CommandFlag.FUA,
    Command.CACHE: CommandFlag(0),
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
    Command.BLOCK_STATUS: CommandFlag.REQ_ONE,
}


class ChunkType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = 32769
    ERROR_OFFSET = 32770


REPLY_FLAG_DONE = 1

# errno values the protocol carries (Linux numbering, as the spec requires)
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
WIRE_ERRNOS = frozenset({EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN})

BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1


class BlockState(IntFlag):
    """The flags of an extent in the base:allocation context (NBD_STATE_*)."""

    HOLE = 1 << 0
    ZERO = 1 << 1


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", Info.EXPORT, size, flags)


def info_name(name: str) -> bytes:
    return struct.pack(">H", Info.NAME) + name.encode()


def info_description(text: str) -> bytes:
    return struct.pack(">H", Info.DESCRIPTION) + text.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", Info.BLOCK_SIZE, minimum, preferred, maximum)


def server_entry(name: str, description: str = "") -> bytes:
    encoded = name.encode()
    return struct.pack(">I", len(encoded)) + encoded + description.encode()


def meta_context(context_id: int, name: str) -> bytes:
    return struct.pack(">I", context_id) + name.encode()


def simple_reply(handle: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def structured_header(handle: int, chunk_type: int, length: int, done: bool) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                                 chunk_type, handle, length)


def structured_error(handle: int, error: int, message: str = "") -> bytes:
    text = message.encode()[:MAX_STRING]
    payload = struct.pack(">IH", error, len(text)) + text
    return structured_header(handle, ChunkType.ERROR, len(payload), True) + payload


def structured_error_offset(handle: int, error: int, offset: int, message: str = ""
                            ) -> bytes:
    """A final NBD_REPLY_TYPE_ERROR_OFFSET chunk: the read failed at offset."""
    text = message.encode()[:MAX_STRING]
    payload = struct.pack(">IH", error, len(text)) + text + struct.pack(">Q", offset)
    return structured_header(handle, ChunkType.ERROR_OFFSET, len(payload), True) + payload


def block_status_payload(context_id: int, extents: list[tuple[int, int]]) -> bytes:
    return struct.pack(">I", context_id) + b"".join(
        struct.pack(">II", length, flags) for length, flags in extents)


class ParseError(ValueError):
    """An option's data does not follow its declared layout."""


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """(export name, requested info types) of an OPT_INFO / OPT_GO payload."""
    if len(data) < 4:
        raise ParseError("option too short")
    (name_length,) = struct.unpack_from(">I", data)
    if name_length > MAX_STRING or 4 + name_length + 2 > len(data):
        raise ParseError("bad export name length")
    name = data[4:4 + name_length].decode("utf-8", errors="strict")
    (count,) = struct.unpack_from(">H", data, 4 + name_length)
    rest = data[4 + name_length + 2:]
    if len(rest) != 2 * count:
        raise ParseError("info request count does not match the option length")
    return name, list(struct.unpack(f">{count}H", rest))


def parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """(export name, queries) of an OPT_LIST_/SET_META_CONTEXT payload."""
    if len(data) < 8:
        raise ParseError("option too short")
    (name_length,) = struct.unpack_from(">I", data)
    if name_length > MAX_STRING or 4 + name_length + 4 > len(data):
        raise ParseError("bad export name length")
    name = data[4:4 + name_length].decode("utf-8", errors="strict")
    pos = 4 + name_length
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise ParseError("truncated query")
        (length,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if length > MAX_STRING or pos + length > len(data):
            raise ParseError("bad query length")
        queries.append(data[pos:pos + length].decode("utf-8", errors="strict"))
        pos += length
    if pos != len(data):
        raise ParseError("trailing bytes after the queries")
    return name, queries
