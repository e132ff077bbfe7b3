"""Version 3 of the on-cloud format as pure functions of bytes and keys: object keys and
stamps, sealed objects (chunks, map pages, journal objects), the head, and the reading of
the image a head names (docs/format.md, "Version 3"). No I/O, no engine: the engine,
upgrade, verify and export build on this, and tests/test_layout.py holds it to a
brute-force model and to the known-answer vectors of tests/vectors_v3.py.

Invariants the engine relies on (each has tests):
- L1 A decoder returns exactly what its encoder was given, for the same volume and the
  same key numbers, or raises IntegrityError naming the object: a flipped bit, a
  truncated object, another kind, another chunk, page or stamp, another volume, a wrong
  plain size, a torn or unknown journal record, or journal writes whose sequence numbers
  go back never decode.
- L2 decode_head() returns a head only if its MAC verifies under this volume's keys and
  it names this volume; encode_head() refuses a head decode_head() would refuse.
- L3 ImageBuilder computes the image docs/format.md defines: every byte of chunk N is
  that of the write with the highest sequence number above N's base seq, where the base
  is the map entry or CHUNK record with the highest seq (the first of equals); else the
  base's. Writes and map entries past the volume's size are ignored.
- L4 named_keys() names every object a head names, directly or through a map entry or
  a CHUNK record: collecting garbage by it can never delete a live object.
"""

from __future__ import annotations

import json
import os
import re
import struct
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from hmac import compare_digest
from typing import Any

from cloudnbd import codec
from cloudnbd.codec import DEFAULT_ZSTD_LEVEL, VolumeKeys
from cloudnbd.errors import IntegrityError, UnsupportedFormat

PAGE_CHUNKS = 4096  # chunks per map page
_ENTRY = struct.Struct(">QQ")  # a map entry (stamp, seq); also a chunk's or page's ident
PAGE_BYTES = PAGE_CHUNKS * _ENTRY.size
MAX_JOURNAL_BYTES = 2**30  # plain body limit of a journal object
UPGRADE_STAMP = 1  # stamp of the objects upgrade writes (epoch 0, counter 1)
HEAD_FORMAT = "cloudnbd-head"
SNAPSHOT_FORMAT = "cloudnbd-snapshot"

_U64 = 2**64
_U32 = 2**32
_HEX = frozenset("0123456789abcdef")
_STAMP = struct.Struct(">Q")  # a journal object's ident
_WRITE = struct.Struct(">BQQI")  # kind, seq, offset, length; then the data
_ZERO = struct.Struct(">BQQQ")  # kind, seq, offset, length
_CHUNK = struct.Struct(">BQQQ")  # kind, seq, chunk index, stamp
#: plain bytes a record takes in a journal object: a WRITE's header (its data follows),
#: a ZERO or CHUNK record (for JournalBuilder users that keep below MAX_JOURNAL_BYTES)
WRITE_HEADER_BYTES = _WRITE.size
FIXED_RECORD_BYTES = _ZERO.size
_WRITTEN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


class Kind(IntEnum):
    """Byte 4 of a sealed object: what it holds."""

    CHUNK = 1
    MAP = 2
    JOURNAL = 3


class RecordKind(IntEnum):
    """The first byte of a journal record."""

    WRITE = 1
    ZERO = 2
    CHUNK = 3


def utc_now() -> str:
    """The time now as the format writes times (`written`, `created`): UTC, to the
    second."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- stamps and keys ----------------------------------------------------------------------

def _u64(value: int, what: str) -> int:
    if not 0 <= value < _U64:
        raise ValueError(f"{what} {value} is not a 64-bit unsigned number")
    return value


def stamp(epoch: int, counter: int) -> int:
    """The stamp of the counter-th object a writer holding the lease at epoch creates:
    unique per object, as no two writers share an epoch. Never 0 (0 means no object)."""
    if not 0 <= epoch < _U32:
        raise ValueError(f"lease epoch {epoch} does not fit a stamp")
    if not 0 <= counter < _U32:
        raise ValueError(f"object counter {counter} does not fit a stamp")
    value = epoch * _U32 + counter
    if value == 0:
        raise ValueError("stamp 0 means no object")
    return value


def chunk_key(index: int, stamp: int) -> str:
    return f"chunks/{_u64(index, 'chunk'):016x}-{_u64(stamp, 'stamp'):016x}"


def map_key(page: int, stamp: int) -> str:
    return f"map/{_u64(page, 'page'):016x}-{_u64(stamp, 'stamp'):016x}"


def journal_key(stamp: int) -> str:
    return f"journal/{_u64(stamp, 'stamp'):016x}"


def head_key(key_id: str) -> str:
    """Key of the head that volume.json's `head` field names: 'head-' and key_id."""
    if _hex16(key_id) is None:
        raise ValueError(f"head key id {key_id!r} is not 16 lower-case hex digits")
    return "head-" + key_id


def new_key_id() -> str:
    """A fresh head key id (init, rekey)."""
    return os.urandom(8).hex()


def _hex16(text: str) -> int | None:
    """The number exactly 16 lower-case hex digits spell, else None (int() alone would
    take 'A', '_', '+' or spaces, and claim keys that are not the volume's)."""
    if len(text) != 16 or not _HEX.issuperset(text):
        return None
    return int(text, 16)


def _hex_pair(text: str) -> tuple[int, int] | None:
    if len(text) != 33 or text[16] != "-":
        return None
    first, second = _hex16(text[:16]), _hex16(text[17:])
    return None if first is None or second is None else (first, second)


def parse_key(key: str) -> tuple[Kind, int, int] | None:
    """(kind, number, stamp) of a sealed object's key (a journal object's number is its
    stamp), None for any other key."""
    if key.startswith("chunks/"):
        pair = _hex_pair(key[7:])
        return None if pair is None else (Kind.CHUNK, *pair)
    if key.startswith("map/"):
        pair = _hex_pair(key[4:])
        return None if pair is None else (Kind.MAP, *pair)
    if key.startswith("journal/"):
        number = _hex16(key[8:])
        return None if number is None else (Kind.JOURNAL, number, number)
    return None


def stamp_epoch(key: str) -> int:
    """The lease epoch of the writer that created the sealed object named key (0 for
    any other key)."""
    parsed = parse_key(key)
    return 0 if parsed is None else epoch_of(parsed[2])


def epoch_of(stamp: int) -> int:
    """The lease epoch of the writer that made stamp (the high half)."""
    return stamp // _U32


def head_key_id(key: str) -> str | None:
    """The key id of a head key, None for any other key."""
    if key.startswith("head-") and _hex16(key[5:]) is not None:
        return key[5:]
    return None


SNAPSHOT_PREFIX = "snapshots/"
_SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def valid_snapshot_name(name: str) -> bool:
    """A snapshot's name: 1 to 64 ASCII letters, digits, '.', '_' or '-', the first a
    letter or digit (it is part of a key on every store, and of a command line)."""
    return _SNAPSHOT_NAME.fullmatch(name) is not None


def snapshot_key(name: str) -> str:
    if not valid_snapshot_name(name):
        raise ValueError(f"snapshot name {name!r} is not 1 to 64 letters, digits, '.', "
                         f"'_' or '-' starting with a letter or digit")
    return SNAPSHOT_PREFIX + name


def snapshot_name(key: str) -> str | None:
    """The name of a snapshot's key, None for any other key."""
    if key.startswith(SNAPSHOT_PREFIX) and valid_snapshot_name(key[len(SNAPSHOT_PREFIX):]):
        return key[len(SNAPSHOT_PREFIX):]
    return None


def owns_v3(key: str) -> bool:
    """True if key has the form of a version-3 object: sealed object, head or snapshot."""
    return parse_key(key) is not None or head_key_id(key) is not None \
        or snapshot_name(key) is not None


# -- sealed objects -----------------------------------------------------------------------

def chunk_ident(index: int, stamp: int) -> bytes:
    return _ENTRY.pack(_u64(index, "chunk"), _u64(stamp, "stamp"))


def map_ident(page: int, stamp: int) -> bytes:
    return _ENTRY.pack(_u64(page, "page"), _u64(stamp, "stamp"))


def journal_ident(stamp: int) -> bytes:
    return _STAMP.pack(_u64(stamp, "stamp"))


def object_key(kind: Kind, ident: bytes) -> str:
    """The key a sealed object of kind with ident is stored under (inverse of the idents)."""
    if kind == Kind.JOURNAL and len(ident) == _STAMP.size:
        return journal_key(*_STAMP.unpack(ident))
    if kind in (Kind.CHUNK, Kind.MAP) and len(ident) == _ENTRY.size:
        return (chunk_key if kind == Kind.CHUNK else map_key)(*_ENTRY.unpack(ident))
    raise ValueError(f"an ident of {len(ident)} bytes does not name a {Kind(kind).name}")


def seal(keys: VolumeKeys, kind: Kind, ident: bytes, plain: bytes | bytearray | memoryview,
         level: int = DEFAULT_ZSTD_LEVEL, salt: bytes | None = None) -> bytearray:
    """The sealed object of kind under the key ident names (codec.seal_object). salt is
    only for known-answer tests."""
    object_key(kind, ident)  # refuse an ident that names no key
    return codec.seal_object(keys, kind, ident, plain, level, salt)


def unseal(keys: VolumeKeys, kind: Kind, ident: bytes, blob: bytes, limit: int,
           exact: bool) -> bytes:
    """The plain body of the object of kind under the key ident names: at most limit
    bytes, exactly limit if exact. IntegrityError naming the key otherwise (L1)."""
    return codec.unseal_object(keys, kind, ident, blob, limit, exact,
                               object_key(kind, ident))


def encode_chunk(keys: VolumeKeys, index: int, stamp: int,
                 plain: bytes | bytearray | memoryview, level: int = DEFAULT_ZSTD_LEVEL,
                 salt: bytes | None = None) -> bytearray:
    """Object chunks/<index>-<stamp> holding plain (the chunk's chunk_size bytes)."""
    return seal(keys, Kind.CHUNK, chunk_ident(index, stamp), plain, level, salt)


def decode_chunk(keys: VolumeKeys, index: int, stamp: int, blob: bytes,
                 chunk_size: int) -> bytes:
    return unseal(keys, Kind.CHUNK, chunk_ident(index, stamp), blob, chunk_size, True)


# -- map pages ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Entry:
    """A map entry: chunk N is object chunks/<N>-<stamp> as of seq (every write to it up
    to seq); stamp 0 means zeros up to seq. Entry(0, 0): never written."""

    stamp: int
    seq: int


ZERO_ENTRY = Entry(0, 0)


def encode_map_page(keys: VolumeKeys, page: int, stamp: int, entries: Sequence[Entry],
                    level: int = DEFAULT_ZSTD_LEVEL, salt: bytes | None = None
                    ) -> bytearray:
    """Object map/<page>-<stamp>: entries for chunks page*PAGE_CHUNKS onwards."""
    if len(entries) != PAGE_CHUNKS:
        raise ValueError(f"a map page has {PAGE_CHUNKS} entries, not {len(entries)}")
    body = bytearray(PAGE_BYTES)
    try:
        for i, entry in enumerate(entries):
            _ENTRY.pack_into(body, i * _ENTRY.size, entry.stamp, entry.seq)
    except struct.error:
        raise ValueError(f"map entry {entry} is not two 64-bit numbers") from None
    return seal(keys, Kind.MAP, map_ident(page, stamp), body, level, salt)


def decode_map_page(keys: VolumeKeys, page: int, stamp: int, blob: bytes) -> list[Entry]:
    plain = unseal(keys, Kind.MAP, map_ident(page, stamp), blob, PAGE_BYTES, True)
    return [Entry(s, q) for s, q in _ENTRY.iter_unpack(plain)]


# -- journal objects ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class JWrite:
    """Bytes data written at offset of the volume."""

    seq: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class JZero:
    """length bytes from offset of the volume made zero (write zeroes, trim)."""

    seq: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class JChunk:
    """Chunk index's contents up to seq are object chunks/<index>-<stamp> (0: zeros)."""

    seq: int
    index: int
    stamp: int


Record = JWrite | JZero | JChunk


class JournalBuilder:
    """The plain body of one journal object, record by record. Each write's data is
    copied once, into the body, which seal() encrypts (and compresses) as it is.

    It refuses (ValueError) what decode_journal() would: seq 0, empty writes, writes
    whose seq goes back, a body past MAX_JOURNAL_BYTES (check size before adding)."""

    def __init__(self) -> None:
        self._body = bytearray()
        self._write_seq = 0  # highest WRITE/ZERO seq so far
        self._first: int | None = None
        self._last = 0

    @property
    def size(self) -> int:
        """Plain bytes so far."""
        return len(self._body)

    @property
    def first_seq(self) -> int:
        """The lowest seq of the records so far (0: none), for the head's JournalRef."""
        return self._first or 0

    @property
    def last_seq(self) -> int:
        """The highest seq of the records so far (0: none)."""
        return self._last

    def _record(self, seq: int, nbytes: int, write: bool) -> None:
        if not 0 < seq < _U64:
            raise ValueError(f"sequence number {seq} out of range")
        if write and seq < self._write_seq:
            raise ValueError(f"write seq {seq} after {self._write_seq}: seqs never go back")
        if len(self._body) + nbytes > MAX_JOURNAL_BYTES:
            raise ValueError("journal object full: seal it and start another")
        if write:
            self._write_seq = seq
        self._first = seq if self._first is None else min(self._first, seq)
        self._last = max(self._last, seq)

    def add_write(self, seq: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        _check_range(offset, length)
        self._record(seq, _WRITE.size + length, True)
        self._body += _WRITE.pack(RecordKind.WRITE, seq, offset, length)
        self._body += data

    def add_zero(self, seq: int, offset: int, length: int) -> None:
        _check_range(offset, length)
        self._record(seq, _ZERO.size, True)
        self._body += _ZERO.pack(RecordKind.ZERO, seq, offset, length)

    def add_chunk(self, seq: int, index: int, stamp: int) -> None:
        _u64(index, "chunk"), _u64(stamp, "stamp")  # before _record() counts it
        self._record(seq, _CHUNK.size, False)
        self._body += _CHUNK.pack(RecordKind.CHUNK, seq, index, stamp)

    def seal(self, keys: VolumeKeys, stamp: int, level: int = DEFAULT_ZSTD_LEVEL,
             salt: bytes | None = None) -> bytearray:
        """Object journal/<stamp> holding the records so far. salt: known answers only."""
        if not self._body:
            raise ValueError("a journal object holds at least one record")
        return seal(keys, Kind.JOURNAL, journal_ident(stamp), self._body, level, salt)


def _check_range(offset: int, length: int) -> None:
    if length <= 0 or offset < 0 or offset + length > _U64:
        raise ValueError(f"write of {length} bytes at {offset} is empty or past 2^64")


def decode_journal(keys: VolumeKeys, stamp: int, blob: bytes,
                   ref: JournalRef | None = None) -> list[Record]:
    """The records of object journal/<stamp>; IntegrityError if it is not authentic, or
    a record is torn, unknown, empty or goes back in seq (L1). With ref (the head's
    entry for it), also if its size or its records' seq span differ from ref's."""
    name = journal_key(stamp)
    if ref is not None and (ref.stamp != stamp or ref.size != len(blob)):
        raise IntegrityError(f"{name}: {len(blob)} bytes, the head says {ref.size} bytes "
                             f"of {journal_key(ref.stamp)}")
    plain = unseal(keys, Kind.JOURNAL, journal_ident(stamp), blob, MAX_JOURNAL_BYTES, False)
    records = _parse_records(plain, name)
    if ref is not None:
        span = (min(r.seq for r in records), max(r.seq for r in records))
        if span != (ref.first_seq, ref.last_seq):
            raise IntegrityError(f"{name}: holds seqs {span[0]} to {span[1]}, the head "
                                 f"says {ref.first_seq} to {ref.last_seq}")
    return records


def _parse_records(plain: bytes, name: str) -> list[Record]:
    records: list[Record] = []
    pos, end, write_seq = 0, len(plain), 0
    if not end:
        raise IntegrityError(f"{name}: holds no records")
    while pos < end:
        start, kind = pos, plain[pos]
        record: Record
        if kind == RecordKind.WRITE:
            if pos + _WRITE.size > end:
                raise IntegrityError(f"{name}: torn record at byte {pos}")
            _, seq, offset, length = _WRITE.unpack_from(plain, pos)
            data_end = pos + _WRITE.size + length
            if data_end > end:
                raise IntegrityError(f"{name}: torn record at byte {pos}")
            record = JWrite(seq, offset, plain[pos + _WRITE.size:data_end])
            pos = data_end
        elif kind in (RecordKind.ZERO, RecordKind.CHUNK):
            if pos + _ZERO.size > end:
                raise IntegrityError(f"{name}: torn record at byte {pos}")
            _, seq, first, second = _ZERO.unpack_from(plain, pos)
            record = JZero(seq, first, second) if kind == RecordKind.ZERO else \
                JChunk(seq, first, second)
            length = second
            pos += _ZERO.size
        else:
            raise IntegrityError(f"{name}: unknown record kind {kind} at byte {pos}")
        if seq == 0:
            raise IntegrityError(f"{name}: record with sequence number 0 at byte {start}")
        if not isinstance(record, JChunk):
            if length == 0 or record.offset + length > _U64:
                raise IntegrityError(f"{name}: write of {length} bytes at {record.offset} "
                                     f"(record at byte {start}) is empty or past 2^64")
            if seq < write_seq:
                raise IntegrityError(f"{name}: write seq {seq} after {write_seq}: "
                                     f"sequence numbers went back")
            write_seq = seq
        records.append(record)
    return records


# -- the head -----------------------------------------------------------------------------

@dataclass(frozen=True)
class JournalRef:
    """A journal object as the head names it: its stamp, the lowest and highest seq of its
    records, and the size of the sealed object."""

    stamp: int
    first_seq: int
    last_seq: int
    size: int

    def __post_init__(self) -> None:
        if not 0 < self.stamp < _U64:
            raise ValueError(f"journal stamp {self.stamp} out of range")
        if not 0 < self.first_seq <= self.last_seq < _U64:
            raise ValueError(f"journal seqs {self.first_seq} to {self.last_seq} malformed")
        if not codec.CHUNK_OVERHEAD < self.size <= MAX_JOURNAL_BYTES + codec.CHUNK_OVERHEAD:
            raise ValueError(f"journal object size {self.size} out of range")


@dataclass(frozen=True)
class Head:
    """The commit point: which map pages and journal objects make up the image."""

    volume_id: bytes
    generation: int
    epoch: int
    seq: int
    pages: tuple[tuple[int, int], ...]  # (page, stamp), page ascending
    journal: tuple[JournalRef, ...]
    written: str  # "YYYY-MM-DDTHH:MM:SSZ", UTC

    def __post_init__(self) -> None:
        object.__setattr__(self, "pages", tuple((p, s) for p, s in self.pages))
        object.__setattr__(self, "journal", tuple(self.journal))
        if len(self.volume_id) != codec.VOLUME_ID_BYTES:
            raise ValueError("volume id is not 16 bytes")
        if not 0 < self.generation < _U64 or not 0 <= self.epoch < _U32 \
                or not 0 <= self.seq < _U64:
            raise ValueError(f"generation {self.generation}, epoch {self.epoch} or seq "
                             f"{self.seq} out of range")
        last_page = -1
        for page, page_stamp in self.pages:
            if not last_page < page < _U64 // PAGE_CHUNKS or not 0 < page_stamp < _U64:
                raise ValueError(f"map page {page} (stamp {page_stamp}) out of range or "
                                 f"out of order")
            last_page = page
        stamps = [ref.stamp for ref in self.journal]
        if len(set(stamps)) != len(stamps):
            raise ValueError("a journal object is named twice")
        if not _WRITTEN.fullmatch(self.written):
            raise ValueError(f"time written {self.written!r} is not YYYY-MM-DDTHH:MM:SSZ")


def _head_document(head: Head) -> dict[str, Any]:
    """The head's JSON object without its MAC."""
    return {
        "format": HEAD_FORMAT,
        "volume_id": head.volume_id.hex(),
        "generation": head.generation,
        "epoch": head.epoch,
        "seq": head.seq,
        "map": [[page, f"{page_stamp:016x}"] for page, page_stamp in head.pages],
        "journal": [[f"{r.stamp:016x}", r.first_seq, r.last_seq, r.size]
                    for r in head.journal],
        "written": head.written,
    }


def encode_head(keys: VolumeKeys, head: Head) -> bytes:
    """The head object: its canonical JSON with the MAC (L2)."""
    if head.volume_id != keys.volume_id:
        raise ValueError("the head is another volume's")
    doc = _head_document(head)
    doc["mac"] = codec.head_mac(keys, codec.canonical(doc))
    return codec.canonical(doc) + b"\n"


def peek_head(blob: bytes) -> dict[str, Any]:
    """The head's JSON object, unverified (for messages and `list`): IntegrityError if it
    is not JSON, UnsupportedFormat if it is not a cloudnbd head."""
    try:
        doc = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        raise IntegrityError("head: not a JSON object (damaged or replaced)") from None
    if not isinstance(doc, dict):
        raise IntegrityError("head: not a JSON object (damaged or replaced)")
    if doc.get("format") != HEAD_FORMAT:
        raise UnsupportedFormat(f"head: not a cloudnbd head (format {doc.get('format')!r})")
    return doc


def _authenticate(doc: dict[str, Any], keys: VolumeKeys, what: str,
                  mac_of: Callable[[VolumeKeys, bytes], str]) -> None:
    """IntegrityError unless doc is this volume's and its `mac` (removed from doc)
    verifies: the head's and a snapshot's rule, each under its own MAC key."""
    if doc.get("volume_id") != keys.volume_id.hex():
        raise IntegrityError(f"{what}: belongs to another volume "
                             f"({doc.get('volume_id')!r}, not {keys.volume_id.hex()})")
    mac = doc.pop("mac", None)
    if not isinstance(mac, str) or not compare_digest(mac_of(keys, codec.canonical(doc)),
                                                      mac):
        raise IntegrityError(f"{what}: failed authentication (modified, or written under "
                             f"another key)")


def decode_head(keys: VolumeKeys, blob: bytes) -> Head:
    """The head blob holds, if it is this volume's and its MAC verifies (L2); else
    IntegrityError. Whether it is the newest is for the caller to judge (generation)."""
    doc = peek_head(blob)
    _authenticate(doc, keys, "head", codec.head_mac)
    try:
        return _head_of(keys, doc)
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"head: malformed ({exc})") from None


def _head_of(keys: VolumeKeys, doc: dict[str, Any]) -> Head:
    """The Head of an authenticated head document; KeyError, TypeError or ValueError if
    a field is missing or malformed."""
    return Head(
        volume_id=keys.volume_id,
        generation=_int(doc["generation"]),
        epoch=_int(doc["epoch"]),
        seq=_int(doc["seq"]),
        pages=tuple((_int(p), _stamp_text(s)) for p, s in doc["map"]),
        journal=tuple(JournalRef(_stamp_text(s), _int(first), _int(last), _int(size))
                      for s, first, last, size in doc["journal"]),
        written=_text(doc["written"]),
    )


# -- snapshots ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """A kept copy of a head (S1-S3 in docs/format.md, "Snapshots"): the image that head
    names, at the volume size of that moment, under a name."""

    name: str
    created: str  # "YYYY-MM-DDTHH:MM:SSZ", UTC
    size: int  # the volume's size when it was taken: the image's size
    head: Head

    def __post_init__(self) -> None:
        snapshot_key(self.name)  # refuses a name no key can hold
        if not _WRITTEN.fullmatch(self.created):
            raise ValueError(f"time created {self.created!r} is not YYYY-MM-DDTHH:MM:SSZ")
        if not 0 < self.size < 2**63:
            raise ValueError(f"snapshot size {self.size} out of range")


def encode_snapshot(keys: VolumeKeys, snap: Snapshot) -> bytes:
    """The snapshot object: its canonical JSON with the MAC (S1)."""
    if snap.head.volume_id != keys.volume_id:
        raise ValueError("the snapshot's head is another volume's")
    doc = _snapshot_document(snap)
    doc["mac"] = codec.snapshot_mac(keys, codec.canonical(doc))
    return codec.canonical(doc) + b"\n"


def _snapshot_document(snap: Snapshot) -> dict[str, Any]:
    head = _head_document(snap.head)
    del head["format"], head["volume_id"]  # the snapshot's own say it
    return {"format": SNAPSHOT_FORMAT, "volume_id": snap.head.volume_id.hex(),
            "name": snap.name, "created": snap.created, "size": snap.size, "head": head}


def decode_snapshot(keys: VolumeKeys, name: str, blob: bytes) -> Snapshot:
    """The snapshot stored under name's key, if it is this volume's, its MAC verifies and
    it is named name (S1, S2); else IntegrityError naming it."""
    what = f"snapshot {name} ({snapshot_key(name)})"
    try:
        doc = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        raise IntegrityError(f"{what}: not a JSON object (damaged or replaced)") from None
    if not isinstance(doc, dict) or doc.get("format") != SNAPSHOT_FORMAT:
        raise IntegrityError(f"{what}: not a cloudnbd snapshot")
    _authenticate(doc, keys, what, codec.snapshot_mac)
    if doc.get("name") != name:
        raise IntegrityError(f"{what}: holds snapshot {doc.get('name')!r} (an object "
                             f"copied or renamed)")
    try:
        return Snapshot(name, _text(doc["created"]), _int(doc["size"]),
                        _head_of(keys, doc["head"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{what}: malformed ({exc})") from None


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _stamp_text(value: Any) -> int:
    number = _hex16(_text(value))
    if number is None:
        raise ValueError(f"stamp {value!r} is not 16 lower-case hex digits")
    return number


# -- the image a head names ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Overlay:
    """A write laid over a chunk: bytes [start, end) of the chunk become data (None:
    zeros). seq is the write's."""

    seq: int
    start: int
    end: int
    data: bytes | None


@dataclass(frozen=True, slots=True)
class ChunkSource:
    """How to make one chunk: the base object (stamp 0: zeros) holding every write up to
    seq, with overlays laid over it in order (seq non-decreasing). A write wholly hidden
    by a later one may be left out."""

    stamp: int
    seq: int
    overlays: tuple[Overlay, ...]


class _Chunk:
    """A chunk some journal record touched: base and overlays so far."""

    __slots__ = ("overlays", "seq", "stamp")

    def __init__(self, base_stamp: int, seq: int) -> None:
        self.stamp, self.seq = base_stamp, seq
        self.overlays: list[Overlay] = []

    def source(self) -> ChunkSource:
        return ChunkSource(self.stamp, self.seq, tuple(self.overlays))


class ImageBuilder:
    """docs/format.md's "Reading the image named by a head", incrementally (L3): give it
    the head's map pages (set_page), then its journal objects' records in the head's order
    (apply); chunks() says how to make every chunk that is not zeros.

    Memory: 16 bytes per chunk of a named page, plus a small object per chunk a journal
    record touches and the journal's write data (less what later writes hid).
    """

    def __init__(self, chunk_size: int, size: int) -> None:
        if chunk_size <= 0 or size < 0:
            raise ValueError("chunk size must be positive and size not negative")
        self.chunk_size = chunk_size
        self.size = size
        self.chunk_count = -(-size // chunk_size)
        self._pages: dict[int, array[int]] = {}  # page -> stamp, seq, stamp, seq...
        self._touched: dict[int, _Chunk] = {}
        self._write_seq = 0  # highest WRITE/ZERO seq applied
        self._applying = False

    def set_page(self, page: int, entries: Sequence[Entry]) -> None:
        """Start chunks page*PAGE_CHUNKS onwards from entries (the head's page)."""
        if self._applying:
            raise ValueError("map pages are set before any journal record is applied")
        if page in self._pages:
            raise ValueError(f"map page {page} set twice")
        if len(entries) != PAGE_CHUNKS:
            raise ValueError(f"a map page has {PAGE_CHUNKS} entries, not {len(entries)}")
        if page * PAGE_CHUNKS < self.chunk_count:  # a page past the end holds nothing
            flat = array("Q", bytes(PAGE_BYTES))
            for i, entry in enumerate(entries):
                flat[2 * i], flat[2 * i + 1] = entry.stamp, entry.seq
            self._pages[page] = flat

    def _entry(self, index: int) -> tuple[int, int]:
        flat = self._pages.get(index // PAGE_CHUNKS)
        if flat is None:
            return 0, 0
        i = 2 * (index % PAGE_CHUNKS)
        return flat[i], flat[i + 1]

    def _chunk(self, index: int) -> _Chunk:
        state = self._touched.get(index)
        if state is None:
            state = self._touched[index] = _Chunk(*self._entry(index))
        return state

    def apply(self, records: Iterable[Record]) -> None:
        """Apply one journal object's records, in order; IntegrityError if a write's seq
        is below one applied before (objects in the wrong order)."""
        self._applying = True
        for record in records:
            if isinstance(record, JChunk):
                if record.index < self.chunk_count:
                    self._rebase(self._chunk(record.index), record)
                continue
            if record.seq < self._write_seq:
                raise IntegrityError(f"journal write seq {record.seq} after "
                                     f"{self._write_seq}: objects out of order")
            self._write_seq = record.seq
            self._lay(record)

    def _rebase(self, state: _Chunk, record: JChunk) -> None:
        if record.seq > state.seq:
            state.stamp, state.seq = record.stamp, record.seq
            # overlays are in seq order: those the new base holds are a prefix
            del state.overlays[:bisect_right(state.overlays, record.seq,
                                             key=lambda o: o.seq)]

    def _lay(self, record: JWrite | JZero) -> None:
        size = self.chunk_size
        data = record.data if isinstance(record, JWrite) else None
        start = record.offset
        end = min(start + (len(data) if data is not None else record.length), self.size)
        if end <= start:  # wholly past the end: the volume shrank, or grew after we read it
            return
        for index in range(start // size, -(-end // size)):
            state = self._chunk(index)
            if record.seq <= state.seq:
                continue
            base = index * size
            low, high = max(start, base) - base, min(end, base + size) - base
            piece = data
            if data is not None and high - low != len(data):  # else share, not copy
                piece = data[base + low - start:base + high - start]
            overlays = state.overlays
            if low == 0 and high == size:
                overlays.clear()
            else:  # cheap pruning of what this write hides (a block rewritten)
                while overlays and overlays[-1].start >= low and overlays[-1].end <= high:
                    overlays.pop()
            overlays.append(Overlay(record.seq, low, high, piece))

    def source(self, index: int) -> ChunkSource:
        """How to make chunk index now."""
        state = self._touched.get(index)
        return ChunkSource(*self._entry(index), ()) if state is None else state.source()

    def chunks(self) -> Iterator[tuple[int, ChunkSource]]:
        """(index, source) of every chunk that is not Entry(0, 0) with nothing laid over
        it, ascending. A chunk zeroed at seq s (stamp 0, seq s) is listed: a map page
        written for it must keep s, or older writes still in the journal would return."""
        touched_by_page: dict[int, list[int]] = {}
        for index in sorted(self._touched):
            touched_by_page.setdefault(index // PAGE_CHUNKS, []).append(index)
        for page in sorted(self._pages.keys() | touched_by_page.keys()):
            flat = self._pages.get(page)
            if flat is None:
                for index in touched_by_page[page]:
                    yield index, self._touched[index].source()
                continue
            first = page * PAGE_CHUNKS
            for i in range(min(PAGE_CHUNKS, self.chunk_count - first)):
                state = self._touched.get(first + i)
                if state is not None:
                    yield first + i, state.source()
                elif flat[2 * i] or flat[2 * i + 1]:
                    yield first + i, ChunkSource(flat[2 * i], flat[2 * i + 1], ())


def materialize(source: ChunkSource, base: bytes | None, chunk_size: int) -> bytes:
    """The chunk's bytes: base (the decoded object source.stamp names; None for stamp 0)
    with source's overlays laid over."""
    if (base is None) != (source.stamp == 0):
        raise ValueError("base is given exactly when the source names an object")
    if base is not None and len(base) != chunk_size:
        raise ValueError(f"base of {len(base)} bytes for a chunk of {chunk_size}")
    if not source.overlays:
        return bytes(chunk_size) if base is None else bytes(base)
    chunk = bytearray(chunk_size) if base is None else bytearray(base)
    for overlay in source.overlays:
        length = overlay.end - overlay.start
        if overlay.data is not None and len(overlay.data) != length:
            raise ValueError(f"overlay of {len(overlay.data)} bytes for {length}")
        chunk[overlay.start:overlay.end] = overlay.data or bytes(length)
    return bytes(chunk)


def named_keys(head: Head, pages: Mapping[int, Sequence[Entry]],
               journals: Mapping[int, Sequence[Record]]) -> set[str]:
    """Every key the head names (L4): its map pages and journal objects, and the chunk
    objects their map entries and CHUNK records name. pages maps each page the head
    names to its entries, journals each journal stamp to its records; a missing one is
    a ValueError, as garbage collected without it could be live. The head's own key is
    volume.json's business and not included."""
    names: set[str] = set()
    for page, page_stamp in head.pages:
        if page not in pages:
            raise ValueError(f"map page {page} of the head was not given")
        names.add(map_key(page, page_stamp))
        first = page * PAGE_CHUNKS
        names.update(chunk_key(first + i, entry.stamp)
                     for i, entry in enumerate(pages[page]) if entry.stamp)
    for ref in head.journal:
        if ref.stamp not in journals:
            raise ValueError(f"{journal_key(ref.stamp)} of the head was not given")
        names.add(journal_key(ref.stamp))
        names.update(chunk_key(r.index, r.stamp) for r in journals[ref.stamp]
                     if isinstance(r, JChunk) and r.stamp)
    return names
