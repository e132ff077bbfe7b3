"""An independent reader of the on-cloud format, written from docs/format.md alone.

It shares no code with cloudnbd: HKDF is spelled out from RFC 5869, the canonical JSON and
every binding are rebuilt from the document, and version 3's sealed objects, map pages,
journal records, head and replay ("Reading the image named by a head") likewise. It reads
the known answers of tests/vectors_v3.py and refuses damage to them; cloudnbd (its CLI
and a real server, driven by an NBD client) only writes the volumes it then reads. If
cloudnbd and docs/format.md drift apart, these tests fail.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
import struct
import subprocess
import time
from base64 import b64decode, b64encode
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from cloudnbd import offline
from cloudnbd import volume as cloudnbd_volume
from cloudnbd.backends.file import FileStore
from cloudnbd.codec import Argon2idParams, ScryptParams
from testbed.served import KDF, cloudnbd, start
from tests import vectors_v3 as V3
from tests.nbdclient import NbdClient
from tests.test_codec import (
    KAT_BLOB_HEX,
    KAT_INDEX,
    KAT_PLAIN,
    KAT_SLOT_NONCE,
    KAT_SLOT_NUMBER,
    KAT_SLOT_PASSWORD,
    KAT_SLOT_SALT,
    KAT_SLOTS,
    KEYS,
)


def hkdf_sha256(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def slot_key_and_aad(slot: dict, password: str, volume_id: bytes) -> tuple[bytes, bytes]:
    """The wrapping key and associated data of one key slot, as docs/format.md says."""
    salt = b64decode(slot["salt"])
    if slot["kdf"] == "scrypt":
        key = hashlib.scrypt(password.encode(), salt=salt, n=slot["n"], r=slot["r"],
                             p=slot["p"], maxmem=2**31 - 1, dklen=32)
        params = (slot["n"], slot["r"], slot["p"])
        label = b"cloudnbd slot v1"
    else:
        assert slot["kdf"] == "argon2id"
        # RFC 9106 Argon2id, version 0x13, no secret, no associated data (test_codec.py
        # checks the primitive against the RFC's own vector)
        key = Argon2id(salt=salt, length=32, iterations=slot["iterations"],
                       lanes=slot["lanes"], memory_cost=slot["memory_kib"]
                       ).derive(password.encode())
        params = (slot["memory_kib"], slot["iterations"], slot["lanes"])
        label = b"cloudnbd argon2id slot v1"
    aad = label + volume_id + struct.pack(">IIII", slot["slot"], *params) + salt
    return key, aad


def open_master_key(doc: dict, password: str) -> bytes:
    volume_id = bytes.fromhex(doc["volume_id"])
    for slot in doc["key_slots"]:
        if slot["kdf"] == "argon2id":
            assert doc["version"] >= 2
        key, aad = slot_key_and_aad(slot, password, volume_id)
        try:
            return AESGCM(key).decrypt(b64decode(slot["nonce"]),
                                       b64decode(slot["wrapped_key"]), aad)
        except Exception:
            continue
    raise ValueError("wrong password")


def verify_mac(doc: dict, master_key: bytes) -> None:
    body = {k: v for k, v in doc.items() if k != "mac"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    key = hkdf_sha256(master_key, None,
                      b"cloudnbd metadata v1" + bytes.fromhex(doc["volume_id"]), 32)
    expected = hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, doc["mac"]):
        raise ValueError("metadata MAC mismatch")


def decrypt_chunk(blob: bytes, master_key: bytes, volume_id: bytes, index: int,
                  chunk_size: int) -> bytes:
    header = blob[:40]
    assert header[:4] == b"CNBc" and header[4] == 1 and header[6:8] == b"\0\0"
    okm = hkdf_sha256(master_key, header[8:40],
                      b"cloudnbd chunk v1" + volume_id + index.to_bytes(8, "big"), 44)
    body = AESGCM(okm[:32]).decrypt(okm[32:44], blob[40:],
                                    header + volume_id + index.to_bytes(8, "big"))
    if header[5] & 1:
        body = zstandard.ZstdDecompressor().decompress(body, max_output_size=chunk_size)
    assert len(body) == chunk_size
    return body


def unlock_dir(root: Path, password: str) -> tuple[dict, bytes]:
    """volume.json of the volume in a directory, checked, and its master key."""
    doc = json.loads((root / "volume.json").read_bytes())
    assert doc["format"] == "cloudnbd-volume" and doc["version"] in (1, 2, 3)
    assert doc["cipher"] == "aes-256-gcm" and doc["compression"] == "zstd"
    master_key = open_master_key(doc, password)
    verify_mac(doc, master_key)
    return doc, master_key


def read_volume(root: Path, password: str, seen_generation: int = 0) -> bytes:
    """The whole volume's bytes, read as docs/format.md says. seen_generation: the
    highest head generation this reader has seen for the volume (version 3)."""
    doc, master_key = unlock_dir(root, password)
    if doc["version"] == 3:
        return assemble(read_chunks_v3(DirObjects(root), doc, master_key, seen_generation),
                        doc["size"], doc["chunk_size"])
    size, chunk_size = doc["size"], doc["chunk_size"]
    volume_id = bytes.fromhex(doc["volume_id"])
    data = bytearray(size)
    for index in range(-(-size // chunk_size)):
        path = root / "chunks" / f"{index:016x}"
        if path.exists():
            plain = decrypt_chunk(path.read_bytes(), master_key, volume_id, index,
                                  chunk_size)
            start = index * chunk_size
            data[start:start + chunk_size] = plain[: max(0, size - start)]
    return bytes(data)


# -- version 3 (docs/format.md, "Version 3") ----------------------------------------------

KIND_CHUNK, KIND_MAP, KIND_JOURNAL = 1, 2, 3
PAGE_ENTRIES = 4096
PAGE_BYTES = PAGE_ENTRIES * 16
JOURNAL_LIMIT = 2**30
SEALED_MIN = 56
REC_WRITE, REC_ZERO, REC_CHUNK = 1, 2, 3
HEX16 = re.compile(r"[0-9a-f]{16}\Z")
WRITTEN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")
HEAD_KEY = re.compile(r"head-[0-9a-f]{16}\Z")


class FormatError(Exception):
    """Damage the reader refuses: never data, never zeros in its place."""


class DirObjects(Mapping[str, bytes]):
    """A file-backend volume's objects by key; a missing one is a KeyError."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __getitem__(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[str]:
        return (str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def __len__(self) -> int:
        return sum(1 for _ in self)


def chunk_key_v3(index: int, stamp: int) -> str:
    return f"chunks/{index:016x}-{stamp:016x}"


def page_key(page: int, stamp: int) -> str:
    return f"map/{page:016x}-{stamp:016x}"


def journal_key(stamp: int) -> str:
    return f"journal/{stamp:016x}"


def fetch(objects: Mapping[str, bytes], key: str) -> bytes:
    try:
        return objects[key]
    except KeyError:
        raise FormatError(f"{key}: named by the head but missing") from None


def zstd_plain(body: bytes, limit: int, key: str) -> bytes:
    """One standard zstd frame, decompressed to at most limit bytes: a frame declaring
    more is refused before decompressing, one that would grow past it while decompressing."""
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as error:
        raise FormatError(f"{key}: not a zstd frame ({error})") from None
    if declared > limit:
        raise FormatError(f"{key}: zstd frame declares {declared} bytes, over {limit}")
    stream = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    try:
        for start in range(0, len(body), 4096):
            out += stream.decompress(body[start:start + 4096])
            if len(out) > limit:
                raise FormatError(f"{key}: decompresses past {limit} bytes")
    except zstandard.ZstdError as error:
        raise FormatError(f"{key}: bad zstd frame ({error})") from None
    if not stream.eof or stream.unused_data:
        raise FormatError(f"{key}: not exactly one whole zstd frame")
    return bytes(out)


def open_sealed(blob: bytes, key: str, master_key: bytes, volume_id: bytes, kind: int,
                ident: bytes, limit: int) -> bytes:
    """The plain body of a sealed object (chunk, map page, journal object) under key."""
    if len(blob) < SEALED_MIN:
        raise FormatError(f"{key}: {len(blob)} bytes, shorter than {SEALED_MIN}")
    header = blob[:40]
    if header[:4] != b"CNB3" or header[4] != kind or header[5] & ~1 or header[6:8] != b"\0\0":
        raise FormatError(f"{key}: bad header {header[:8].hex()}")
    okm = hkdf_sha256(master_key, header[8:40],
                      b"cloudnbd object v3" + volume_id + bytes([kind]) + ident, 44)
    try:
        body = AESGCM(okm[:32]).decrypt(okm[32:44], blob[40:], header + volume_id + ident)
    except InvalidTag:
        raise FormatError(f"{key}: authentication failed") from None
    return zstd_plain(body, limit, key) if header[5] & 1 else body


def open_chunk(objects: Mapping[str, bytes], index: int, stamp: int, master_key: bytes,
               volume_id: bytes, chunk_size: int) -> bytes:
    key = chunk_key_v3(index, stamp)
    plain = open_sealed(fetch(objects, key), key, master_key, volume_id, KIND_CHUNK,
                        struct.pack(">QQ", index, stamp), chunk_size)
    if len(plain) != chunk_size:
        raise FormatError(f"{key}: {len(plain)} bytes, not the chunk size {chunk_size}")
    return plain


def open_page(objects: Mapping[str, bytes], page: int, stamp: int, master_key: bytes,
              volume_id: bytes) -> list[tuple[int, int]]:
    """Map page entries: (stamp, seq) of chunk page * 4096 + i at i."""
    key = page_key(page, stamp)
    plain = open_sealed(fetch(objects, key), key, master_key, volume_id, KIND_MAP,
                        struct.pack(">QQ", page, stamp), PAGE_BYTES)
    if len(plain) != PAGE_BYTES:
        raise FormatError(f"{key}: {len(plain)} bytes, not {PAGE_BYTES}")
    return [struct.unpack_from(">QQ", plain, 16 * i) for i in range(PAGE_ENTRIES)]


@dataclass(frozen=True)
class Record:
    """A journal record: WRITE (a=offset, data), ZERO (a=offset, b=length) or
    CHUNK (a=chunk index, b=stamp)."""

    kind: int
    seq: int
    a: int
    b: int
    data: bytes = b""


def parse_journal(plain: bytes, key: str) -> list[Record]:
    """The records of a journal object's body, refusing what the format says to refuse."""
    records, at, last_write_seq = [], 0, 0
    if not plain:
        raise FormatError(f"{key}: no records")
    while at < len(plain):
        kind = plain[at]
        if kind == REC_WRITE:
            fixed = 1 + 8 + 8 + 4
            if at + fixed > len(plain):
                raise FormatError(f"{key}: torn record at byte {at}")
            seq, offset, length = struct.unpack_from(">QQI", plain, at + 1)
            if at + fixed + length > len(plain):
                raise FormatError(f"{key}: torn record at byte {at}")
            record = Record(kind, seq, offset, length,
                            plain[at + fixed:at + fixed + length])
            at += fixed + length
        elif kind in (REC_ZERO, REC_CHUNK):
            if at + 25 > len(plain):
                raise FormatError(f"{key}: torn record at byte {at}")
            seq, a, b = struct.unpack_from(">QQQ", plain, at + 1)
            record = Record(kind, seq, a, b)
            at += 25
        else:
            raise FormatError(f"{key}: record of kind {kind} at byte {at}")
        if record.seq == 0:
            raise FormatError(f"{key}: record with seq 0")
        if record.kind != REC_CHUNK:
            if record.b == 0:
                raise FormatError(f"{key}: empty write at seq {record.seq}")
            if record.seq < last_write_seq:
                raise FormatError(f"{key}: seq {record.seq} after {last_write_seq}")
            last_write_seq = record.seq
        records.append(record)
    return records


def _is_int(value: object, low: int = 0, high: int | None = None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value < high))


def _stamp(value: object, what: str) -> int:
    if not isinstance(value, str) or not HEX16.match(value) or int(value, 16) == 0:
        raise FormatError(f"head: {what} {value!r} is not a stamp")
    return int(value, 16)


@dataclass(frozen=True)
class Head:
    generation: int
    epoch: int
    seq: int
    pages: list[tuple[int, int]]  # (page, stamp)
    journal: list[tuple[int, int, int, int]]  # (stamp, first_seq, last_seq, bytes)


def read_head(raw: bytes, master_key: bytes, volume_id: bytes,
              seen_generation: int = 0) -> Head:
    """The head, once its MAC (under this volume's key) and every field rule hold."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError("head: not a JSON document") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("mac"), str):
        raise FormatError("head: no MAC")
    body = {k: v for k, v in doc.items() if k != "mac"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    key = hkdf_sha256(master_key, None, b"cloudnbd head v3" + volume_id, 32)
    expected = hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, doc["mac"]):
        raise FormatError("head: MAC mismatch")
    if doc.get("format") != "cloudnbd-head":
        raise FormatError(f"head: format {doc.get('format')!r}")
    if doc.get("volume_id") != volume_id.hex():
        raise FormatError("head: another volume's")
    if not _is_int(doc.get("generation"), 1) or not _is_int(doc.get("epoch"), 0, 2**32) \
            or not _is_int(doc.get("seq")):
        raise FormatError("head: bad generation, epoch or seq")
    if not isinstance(doc.get("written"), str) or not WRITTEN.match(doc["written"]):
        raise FormatError(f"head: written {doc.get('written')!r}")
    if doc["generation"] < seen_generation:
        raise FormatError(f"head: generation {doc['generation']} is older than "
                          f"{seen_generation}, already seen: rolled back")
    if not isinstance(doc.get("map"), list) or not isinstance(doc.get("journal"), list):
        raise FormatError("head: map or journal is not a list")
    pages: list[tuple[int, int]] = []
    for entry in doc["map"]:
        if not isinstance(entry, list) or len(entry) != 2 or not _is_int(entry[0]):
            raise FormatError(f"head: map entry {entry!r}")
        if pages and entry[0] <= pages[-1][0]:
            raise FormatError("head: map pages not strictly ascending")
        pages.append((entry[0], _stamp(entry[1], "map stamp")))
    journal: list[tuple[int, int, int, int]] = []
    for entry in doc["journal"]:
        if not isinstance(entry, list) or len(entry) != 4 \
                or not all(_is_int(v) for v in entry[1:]) \
                or not 1 <= entry[1] <= entry[2]:
            raise FormatError(f"head: journal entry {entry!r}")
        stamp = _stamp(entry[0], "journal stamp")
        if any(stamp == s for s, *_ in journal):
            raise FormatError(f"head: journal object {entry[0]} named twice")
        journal.append((stamp, entry[1], entry[2], entry[3]))
    return Head(doc["generation"], doc["epoch"], doc["seq"], pages, journal)


@dataclass
class ChunkState:
    """A chunk while the journal is replayed: its base (stamp, seq) and the writes laid
    over it, in order: (seq, start within the chunk, data or None for zeros, length)."""

    stamp: int = 0
    seq: int = 0
    writes: list[tuple[int, int, bytes | None, int]] = field(default_factory=list)


def replay(head: Head, objects: Mapping[str, bytes], master_key: bytes, volume_id: bytes,
           size: int, chunk_size: int) -> dict[int, ChunkState]:
    """Every chunk's base and writes as "Reading the image named by a head" says."""
    count = -(-size // chunk_size)
    chunks: dict[int, ChunkState] = {}
    for page, stamp in head.pages:
        entries = open_page(objects, page, stamp, master_key, volume_id)
        for i, (chunk_stamp, seq) in enumerate(entries):
            index = page * PAGE_ENTRIES + i
            if index < count and (chunk_stamp, seq) != (0, 0):
                chunks[index] = ChunkState(chunk_stamp, seq)
    last_write_seq = 0
    for stamp, first_seq, last_seq, sealed_bytes in head.journal:
        key = journal_key(stamp)
        blob = fetch(objects, key)
        if len(blob) != sealed_bytes:
            raise FormatError(f"{key}: {len(blob)} bytes, the head says {sealed_bytes}")
        records = parse_journal(open_sealed(blob, key, master_key, volume_id, KIND_JOURNAL,
                                            struct.pack(">Q", stamp), JOURNAL_LIMIT), key)
        seqs = [r.seq for r in records]
        if (min(seqs), max(seqs)) != (first_seq, last_seq):
            raise FormatError(f"{key}: seqs {min(seqs)}..{max(seqs)}, the head says "
                              f"{first_seq}..{last_seq}")
        for record in records:
            if record.kind == REC_CHUNK:
                if record.a >= count:
                    continue
                state = chunks.setdefault(record.a, ChunkState())
                if record.seq > state.seq:
                    state.stamp, state.seq = record.b, record.seq
                    state.writes = [w for w in state.writes if w[0] > record.seq]
                continue
            if record.seq < last_write_seq:
                raise FormatError(f"{key}: seq {record.seq} goes back across objects")
            if record.seq > head.seq:
                raise FormatError(f"{key}: a write of seq {record.seq}, past the head's "
                                  f"{head.seq}")
            last_write_seq = record.seq
            length = len(record.data) if record.kind == REC_WRITE else record.b
            end = min(record.a + length, size)
            at = record.a
            while at < end:
                index, within = divmod(at, chunk_size)
                piece = min(end - at, chunk_size - within)
                state = chunks.setdefault(index, ChunkState())
                if record.seq > state.seq:
                    data = (record.data[at - record.a:at - record.a + piece]
                            if record.kind == REC_WRITE else None)
                    state.writes.append((record.seq, within, data, piece))
                at += piece
    return chunks


def chunks_from_head(objects: Mapping[str, bytes], head_raw: bytes, master_key: bytes,
                     volume_id: bytes, size: int, chunk_size: int,
                     seen_generation: int = 0) -> dict[int, bytes]:
    """The image a head names, sparse: chunk index -> its bytes (cut at size), every chunk
    not listed all zeros. Every object the image needs (the pages, the journal objects,
    each chunk's base) must exist and authenticate: a missing or failing one is damage,
    not zeros. A chunk object a later record supersedes is not needed, nor opened."""
    head = read_head(head_raw, master_key, volume_id, seen_generation)
    image = {}
    for index, state in sorted(replay(head, objects, master_key, volume_id, size,
                                      chunk_size).items()):
        chunk = bytearray(open_chunk(objects, index, state.stamp, master_key, volume_id,
                                     chunk_size) if state.stamp else bytes(chunk_size))
        for _seq, within, data, length in state.writes:
            chunk[within:within + length] = data if data is not None else bytes(length)
        image[index] = bytes(chunk[:size - index * chunk_size])
    return image


def assemble(chunks: dict[int, bytes], size: int, chunk_size: int) -> bytes:
    image = bytearray(size)
    for index, data in chunks.items():
        image[index * chunk_size:index * chunk_size + len(data)] = data
    return bytes(image)


def image_from_head(objects: Mapping[str, bytes], head_raw: bytes, master_key: bytes,
                    volume_id: bytes, size: int, chunk_size: int,
                    seen_generation: int = 0) -> bytes:
    return assemble(chunks_from_head(objects, head_raw, master_key, volume_id, size,
                                     chunk_size, seen_generation), size, chunk_size)


def read_chunks_v3(objects: Mapping[str, bytes], doc: dict, master_key: bytes,
                   seen_generation: int = 0) -> dict[int, bytes]:
    """A version-3 volume's image (sparse, as chunks_from_head), volume.json already
    opened and its MAC verified."""
    if not isinstance(doc.get("head"), str) or not HEAD_KEY.match(doc["head"]):
        raise FormatError(f"volume.json: head {doc.get('head')!r}")
    return chunks_from_head(objects, fetch(objects, doc["head"]), master_key,
                            bytes.fromhex(doc["volume_id"]), doc["size"], doc["chunk_size"],
                            seen_generation)


def read_volume_v3(root: Path, password: str, seen_generation: int = 0
                   ) -> tuple[dict, dict[int, bytes]]:
    """(volume.json, sparse image) of a version-3 volume in a directory."""
    doc, master_key = unlock_dir(root, password)
    assert doc["version"] == 3
    return doc, read_chunks_v3(DirObjects(root), doc, master_key, seen_generation)


@pytest.mark.unit
def test_independent_reader_decodes_the_known_answer() -> None:
    blob = bytes.fromhex(KAT_BLOB_HEX)
    assert decrypt_chunk(blob, KEYS.master_key, KEYS.volume_id, KAT_INDEX, 32) == KAT_PLAIN


@pytest.mark.unit
def test_independent_reader_reads_a_volume_cloudnbd_wrote(tmp_path: Path) -> None:
    chunk = 64 * 1024
    store = FileStore(tmp_path / "vol")
    vol = cloudnbd_volume.create(store, 5 * chunk - 4096 * 3, chunk, "s3cret",
                                 ScryptParams(n=2**10), version=1)
    vol.add_password("second", ScryptParams(n=2**10))
    expected = bytearray(vol.meta.size)
    contents = {0: os.urandom(chunk), 2: b"compressible " * (chunk // 13) + bytes(chunk % 13),
                4: os.urandom(chunk)}
    for index, plain in contents.items():
        offline.write_chunk(vol, index, plain)
        start = index * chunk
        expected[start:start + chunk] = plain[: vol.meta.size - start]
    # Both passwords open it, and what the independent reader sees is what was written.
    assert read_volume(tmp_path / "vol", "s3cret") == bytes(expected)
    assert read_volume(tmp_path / "vol", "second") == bytes(expected)
    stored = sorted(p.name for p in (tmp_path / "vol" / "chunks").iterdir())
    assert stored == ["0000000000000000", "0000000000000002", "0000000000000004"]


@pytest.mark.unit
@pytest.mark.parametrize("kind", KAT_SLOTS)
def test_independent_reader_opens_the_known_answer_key_slots(kind: str) -> None:
    params, wrapped_hex = KAT_SLOTS[kind]
    slot = {"slot": KAT_SLOT_NUMBER, **params.fields(),
            "salt": b64encode(KAT_SLOT_SALT).decode(),
            "nonce": b64encode(KAT_SLOT_NONCE).decode(),
            "wrapped_key": b64encode(bytes.fromhex(wrapped_hex)).decode()}
    doc = {"version": 2, "volume_id": KEYS.volume_id.hex(), "key_slots": [slot]}
    assert open_master_key(doc, KAT_SLOT_PASSWORD) == KEYS.master_key


@pytest.mark.unit
def test_independent_reader_reads_argon2id_and_scrypt_slots_cloudnbd_wrote(
        tmp_path: Path) -> None:
    chunk = 64 * 1024
    store = FileStore(tmp_path / "vol")
    vol = cloudnbd_volume.create(store, 2 * chunk, chunk, "old", ScryptParams(n=2**10),
                                 version=1)
    vol.add_password("new", Argon2idParams(memory_kib=1024, iterations=2))
    offline.write_chunk(vol, 1, os.urandom(chunk))
    doc = json.loads((tmp_path / "vol" / "volume.json").read_bytes())
    assert doc["version"] == 2
    assert [s["kdf"] for s in doc["key_slots"]] == ["scrypt", "argon2id"]
    assert read_volume(tmp_path / "vol", "new") == read_volume(tmp_path / "vol", "old")
    # with the Argon2id slot gone, the volume is version 1 again: older readers read it
    cloudnbd_volume.unlock(store, "old").remove_slot(1)
    assert json.loads((tmp_path / "vol" / "volume.json").read_bytes())["version"] == 1


# -- version 3: known answers (tests/vectors_v3.py) ---------------------------------------

def vector_objects() -> dict[str, bytes]:
    """The known-answer volume's objects by key, its head under HEAD_KEY_ID's key."""
    objects = {key: bytes.fromhex(sealed) for *_, key, sealed in V3.CHUNKS}
    objects[V3.MAP_KEY] = bytes.fromhex(V3.MAP_HEX)
    objects.update({key: bytes.fromhex(sealed) for *_, key, sealed in V3.JOURNALS})
    objects[f"head-{V3.HEAD_KEY_ID}"] = V3.HEAD
    return objects


def vector_image(objects: Mapping[str, bytes], seen_generation: int = 0) -> bytes:
    return image_from_head(objects, objects[f"head-{V3.HEAD_KEY_ID}"], V3.MASTER_KEY,
                           V3.VOLUME_ID, V3.SIZE, V3.CHUNK_SIZE, seen_generation)


@pytest.mark.unit
def test_v3_reader_opens_every_known_answer_object_under_its_key() -> None:
    objects = vector_objects()
    for index, stamp, plain, salt, key, _ in V3.CHUNKS:
        assert key == chunk_key_v3(index, stamp)
        assert objects[key][8:40] == salt
        assert open_chunk(objects, index, stamp, V3.MASTER_KEY, V3.VOLUME_ID,
                          V3.CHUNK_SIZE) == plain
    assert page_key(V3.MAP_PAGE, V3.MAP_STAMP) == V3.MAP_KEY
    entries = open_page(objects, V3.MAP_PAGE, V3.MAP_STAMP, V3.MASTER_KEY, V3.VOLUME_ID)
    assert {i: e for i, e in enumerate(entries) if e != (0, 0)} == V3.MAP_ENTRIES
    for stamp, records, _, key, sealed in V3.JOURNALS:
        assert key == journal_key(stamp)
        plain = open_sealed(bytes.fromhex(sealed), key, V3.MASTER_KEY, V3.VOLUME_ID,
                            KIND_JOURNAL, struct.pack(">Q", stamp), JOURNAL_LIMIT)
        names = {REC_WRITE: "write", REC_ZERO: "zero", REC_CHUNK: "chunk"}
        assert [(names[r.kind], r.seq, r.a, r.data if r.kind == REC_WRITE else r.b)
                for r in parse_journal(plain, key)] == records
    head = read_head(V3.HEAD, V3.MASTER_KEY, V3.VOLUME_ID)
    assert (head.generation, head.epoch, head.seq) == (V3.HEAD_GENERATION, V3.HEAD_EPOCH,
                                                       V3.HEAD_SEQ)
    assert head.pages == [(V3.MAP_PAGE, V3.MAP_STAMP)]
    assert [(s, len(bytes.fromhex(sealed))) for s, *_, sealed in V3.JOURNALS] == \
        [(s, n) for s, _, _, n in head.journal]


@pytest.mark.unit
def test_v3_reader_reads_the_known_answer_image() -> None:
    image = vector_image(vector_objects())
    assert image == bytes.fromhex(V3.IMAGE_HEX)
    # the stale write (seq 3, under chunk 2's base seq 3) is dropped, the fresh one laid
    assert image[128:130] == bytes(2) and image[130:135] == b"fresh"
    # the zero of seq 5 stays over object B, which a CHUNK record of seq 4 names later
    assert image[60:68] == bytes(8) and image[10:22] == b"known answer"


def _resealed_head(change: Callable[[dict], None], master_key: bytes = V3.MASTER_KEY,
                   volume_id: bytes = V3.VOLUME_ID) -> bytes:
    """The known-answer head changed by a key holder: the MAC is right, the content not."""
    doc = json.loads(V3.HEAD)
    del doc["mac"]
    change(doc)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    key = hkdf_sha256(master_key, None, b"cloudnbd head v3" + volume_id, 32)
    doc["mac"] = hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()
    return json.dumps(doc).encode()


def _flip(blob: bytes, at: int) -> bytes:
    changed = bytearray(blob)
    changed[at] ^= 1
    return bytes(changed)


CHUNK_A, CHUNK_B, CHUNK_C = (key for *_, key, _ in V3.CHUNKS)
JOURNAL_1, JOURNAL_2 = (key for *_, key, _ in V3.JOURNALS)
HEAD_KEY_V = f"head-{V3.HEAD_KEY_ID}"

#: damage to the known-answer volume, and what the reader must say instead of an image
TAMPERED: dict[str, tuple[Callable[[dict[str, bytes]], None], str]] = {
    "chunk bit flipped": (lambda o: o.update({CHUNK_C: _flip(o[CHUNK_C], 70)}),
                          "authentication failed"),
    # the store answers for B with the older genuine object A of the same chunk
    "chunk rolled back": (lambda o: o.update({CHUNK_B: o[CHUNK_A]}), "authentication failed"),
    "chunk missing": (lambda o: o.pop(CHUNK_C), "missing"),
    "chunk truncated": (lambda o: o.update({CHUNK_C: o[CHUNK_C][:55]}), "shorter than"),
    "journal missing": (lambda o: o.pop(JOURNAL_2), "missing"),
    "journal swapped": (lambda o: o.update({JOURNAL_1: o[JOURNAL_2], JOURNAL_2: o[JOURNAL_1]}),
                        "bytes, the head says"),
    "journal of another kind": (lambda o: o.update({JOURNAL_1: o[JOURNAL_1][:4] + b"\1"
                                                    + o[JOURNAL_1][5:]}),
                                "bad header"),
    "map page missing": (lambda o: o.pop(V3.MAP_KEY), "missing"),
    "map page bit flipped": (lambda o: o.update({V3.MAP_KEY: _flip(o[V3.MAP_KEY], 45)}),
                             "authentication failed"),
    "head bit flipped": (lambda o: o.update({HEAD_KEY_V: V3.HEAD.replace(b'"seq":7',
                                                                        b'"seq":6')}),
                         "MAC mismatch"),
    "head of another volume": (lambda o: o.update({HEAD_KEY_V: _resealed_head(
        lambda d: d.update(volume_id=bytes(16).hex()), volume_id=bytes(16))}), "MAC mismatch"),
    "head names a page under another stamp": (lambda o: o.update({HEAD_KEY_V: _resealed_head(
        lambda d: d.update(map=[[0, "0000000000000002"]]))}), "missing"),
    "head with a write past its seq": (lambda o: o.update({HEAD_KEY_V: _resealed_head(
        lambda d: d.update(seq=6))}), "past the head's"),
    "head with journal seqs that lie": (lambda o: o.update({HEAD_KEY_V: _resealed_head(
        lambda d: d["journal"][1].__setitem__(1, 5))}), "the head says"),
    "head with journal objects reordered": (lambda o: o.update({HEAD_KEY_V: _resealed_head(
        lambda d: d["journal"].reverse())}), "goes back"),
}


@pytest.mark.unit
@pytest.mark.parametrize("damage", TAMPERED)
def test_v3_reader_refuses_damage_to_the_known_answer_volume(damage: str) -> None:
    objects = vector_objects()
    change, message = TAMPERED[damage]
    change(objects)
    with pytest.raises(FormatError, match=message):
        vector_image(objects)


@pytest.mark.unit
def test_v3_reader_needs_no_chunk_object_a_later_record_superseded() -> None:
    """A is named by the map, but B's CHUNK record (seq 4 > 2) supersedes it: the image
    does not need it, and a writer may have collected it as garbage."""
    objects = vector_objects()
    del objects[CHUNK_A]
    assert vector_image(objects) == bytes.fromhex(V3.IMAGE_HEX)


@pytest.mark.unit
def test_v3_reader_refuses_a_head_older_than_one_it_saw() -> None:
    assert vector_image(vector_objects(), seen_generation=V3.HEAD_GENERATION)
    with pytest.raises(FormatError, match="rolled back"):
        vector_image(vector_objects(), seen_generation=V3.HEAD_GENERATION + 1)


# -- version 3: volumes cloudnbd wrote ----------------------------------------------------
# These start cloudnbd (the `import` command, a real `cloudnbd open` server), so they are
# not unit tests; the reader above still shares nothing with cloudnbd.

SERVED_CHUNK = 64 * 1024
SERVED_SIZE = 4096 * SERVED_CHUNK + 40 * SERVED_CHUNK  # map pages 0 and 1
SECTOR = 4096


class Model:
    """What a client wrote, chunk by chunk (absent: zeros): what a reader must see."""

    def __init__(self, size: int, chunk_size: int) -> None:
        self.size, self.chunk_size = size, chunk_size
        self.chunks: dict[int, bytearray] = {}

    def apply(self, offset: int, data: bytes) -> None:
        at = offset
        while at < offset + len(data):
            index, within = divmod(at, self.chunk_size)
            piece = min(offset + len(data) - at, self.chunk_size - within)
            chunk = self.chunks.setdefault(index, bytearray(self.chunk_size))
            chunk[within:within + piece] = data[at - offset:at - offset + piece]
            at += piece

    def snapshot(self) -> dict[int, bytes]:
        return {i: bytes(c) for i, c in self.chunks.items()}


def same_image(read: dict[int, bytes], expected: dict[int, bytes], chunk_size: int,
               what: str = "what the client flushed") -> None:
    """Both sparse images hold the same bytes (a chunk absent from one is zeros)."""
    zeros = bytes(chunk_size)
    differ = [i for i in sorted(set(read) | set(expected))
              if read.get(i, zeros).ljust(chunk_size, b"\0")
              != expected.get(i, zeros).ljust(chunk_size, b"\0")]
    assert not differ, f"chunks {differ[:10]} differ from {what}"


def random_writes(client: NbdClient, model: Model, rng: random.Random, count: int,
                  aligned: bool = False) -> None:
    """count writes, zeroes and trims of every shape, to the client and the model: small
    and unaligned ones, whole chunks, ones across chunk and map page boundaries."""
    spots = [0, 5 * SERVED_CHUNK, 4095 * SERVED_CHUNK, 4096 * SERVED_CHUNK - 3000,
             SERVED_SIZE - 3 * SERVED_CHUNK]
    for _ in range(count):
        op = rng.choice(["small", "small", "small", "chunks", "zero", "trim"])
        if op == "chunks":
            offset = rng.choice(spots) // SERVED_CHUNK * SERVED_CHUNK
            length = rng.randint(1, 2) * SERVED_CHUNK
        else:
            length = rng.randint(1, 3 * SECTOR) if not aligned else \
                rng.randint(1, 3) * SECTOR
            offset = rng.choice(spots) + rng.randint(0, 2 * SERVED_CHUNK)
            if aligned:
                offset -= offset % SECTOR
        length = min(length, SERVED_SIZE - offset)
        if op in ("zero", "trim"):
            (client.zero if op == "zero" else client.trim)(offset, length)
            model.apply(offset, bytes(length))
        else:
            data = rng.randbytes(length) if rng.random() < 0.5 else \
                (b"compressible %d " % rng.randint(0, 99) * length)[:length]
            client.pwrite(data, offset)
            model.apply(offset, data)


def _new_served_volume(tmp_path: Path, password_file: Path) -> Path:
    location = tmp_path / "bucket" / "vol"
    location.parent.mkdir()
    cloudnbd("init", "file", str(location), str(SERVED_SIZE), "--chunk-size", "64KiB",
             "--password-file", str(password_file), *KDF)
    return location


def _write_image(path: Path, model: Model) -> None:
    with open(path, "wb") as out:
        out.truncate(model.size)
        for index, chunk in model.chunks.items():
            out.seek(index * model.chunk_size)
            out.write(chunk)


def test_v3_reader_reads_a_volume_cloudnbd_imported(tmp_path: Path,
                                                    password_file: Path) -> None:
    """`cloudnbd import`, offline: the image the reader reads is the file imported; also
    over a volume a server wrote, whose server then reads the new image, not its cache."""
    location = _new_served_volume(tmp_path, password_file)
    password = password_file.read_text().strip()
    rng = random.Random(3)
    first = Model(SERVED_SIZE, SERVED_CHUNK)
    first.apply(0, rng.randbytes(3 * SERVED_CHUNK + 100))
    first.apply(4096 * SERVED_CHUNK + 7, b"page one " * 1000)
    _write_image(tmp_path / "first", first)
    cloudnbd("import", str(tmp_path / "first"), "file", str(location), "--password-file",
             str(password_file), "--yes", "--cache", str(tmp_path / "import-cache"))
    same_image(read_volume_v3(location, password)[1], first.snapshot(), SERVED_CHUNK,
               "the image imported")

    served = start(tmp_path, "file", str(location), password_file)
    client = NbdClient.unix(str(served.socket))
    assert client.pread(0, 3 * SERVED_CHUNK) == bytes(first.chunks[0] + first.chunks[1]
                                                      + first.chunks[2])
    client.pwrite(b"served", 5 * SERVED_CHUNK)
    client.flush()
    client.close()
    served.close()
    second = Model(SERVED_SIZE, SERVED_CHUNK)
    second.apply(SERVED_CHUNK, rng.randbytes(SERVED_CHUNK))
    _write_image(tmp_path / "second", second)
    cloudnbd("import", str(tmp_path / "second"), "file", str(location), "--password-file",
             str(password_file), "--yes", "--cache", str(tmp_path / "import-cache"))
    same_image(read_volume_v3(location, password)[1], second.snapshot(), SERVED_CHUNK,
               "the image imported second")
    served = start(tmp_path, "file", str(location), password_file)  # its cache is stale
    client = NbdClient.unix(str(served.socket))
    for index in (0, 1, 2, 5, 4096):
        assert client.pread(index * SERVED_CHUNK, SERVED_CHUNK) == \
            second.snapshot().get(index, bytes(SERVED_CHUNK))
    client.close()
    served.close()


def test_v3_reader_reads_what_a_served_client_flushed_then_closed(
        tmp_path: Path, password_file: Path) -> None:
    """A real server, an NBD client, FLUSHes, `close`: the reader's image is what the
    client wrote, from map pages (both of them) folded by the close."""
    location = _new_served_volume(tmp_path, password_file)
    model = Model(SERVED_SIZE, SERVED_CHUNK)
    rng = random.Random(1)
    served = start(tmp_path, "file", str(location), password_file)
    client = NbdClient.unix(str(served.socket))
    for _ in range(4):
        random_writes(client, model, rng, 15)
        client.flush()
    # the server agrees with the model (so that a difference below is the store's)
    for index in sorted(model.chunks):
        assert client.pread(index * SERVED_CHUNK, SERVED_CHUNK) == model.chunks[index]
    client.close()
    served.close()
    doc, read = read_volume_v3(location, password_file.read_text().strip())
    head = json.loads((location / doc["head"]).read_bytes())
    assert [page for page, _ in head["map"]] == [0, 1]
    same_image(read, model.snapshot(), SERVED_CHUNK)


def test_v3_reader_replays_the_journal_a_killed_server_left(
        tmp_path: Path, password_file: Path) -> None:
    """Writes folded into map pages by a close, then more writes and FLUSHes and kill -9:
    the head names map pages and journal objects, and replaying them gives exactly what
    the client flushed."""
    location = _new_served_volume(tmp_path, password_file)
    model = Model(SERVED_SIZE, SERVED_CHUNK)
    rng = random.Random(2)
    served = start(tmp_path, "file", str(location), password_file)
    client = NbdClient.unix(str(served.socket))
    random_writes(client, model, rng, 20)
    client.flush()
    client.close()
    served.close()
    served = start(tmp_path, "file", str(location), password_file)
    client = NbdClient.unix(str(served.socket))
    for _ in range(3):
        random_writes(client, model, rng, 15)
        client.flush()
    served.kill()
    doc, read = read_volume_v3(location, password_file.read_text().strip())
    head = json.loads((location / doc["head"]).read_bytes())
    assert head["map"] and head["journal"], "the head should name pages and journal objects"
    same_image(read, model.snapshot(), SERVED_CHUNK)


def test_v3_reader_sees_a_flush_point_plus_later_writes_after_a_kill(
        tmp_path: Path, password_file: Path) -> None:
    """Writes after the last FLUSH, then kill -9: every 4 KiB sector the reader sees is
    as flushed or as one of the later writes left it, never torn."""
    location = _new_served_volume(tmp_path, password_file)
    model = Model(SERVED_SIZE, SERVED_CHUNK)
    rng = random.Random(4)
    served = start(tmp_path, "file", str(location), password_file)
    client = NbdClient.unix(str(served.socket))
    random_writes(client, model, rng, 30, aligned=True)
    client.flush()
    flushed = model.snapshot()
    later: list[dict[int, bytes]] = []
    for _ in range(30):
        random_writes(client, model, rng, 1, aligned=True)
        later.append(model.snapshot())
    served.kill()
    _, read = read_volume_v3(location, password_file.read_text().strip())
    zeros = bytes(SERVED_CHUNK)
    for index in sorted(set(read) | set(model.chunks)):
        got = read.get(index, zeros).ljust(SERVED_CHUNK, b"\0")
        for at in range(0, SERVED_CHUNK, SECTOR):
            allowed = {version.get(index, zeros)[at:at + SECTOR]
                       for version in [flushed, *later]}
            assert got[at:at + SECTOR] in allowed, f"chunk {index} sector {at // SECTOR}"


def test_v3_reader_reads_a_volume_whose_superseded_chunk_object_was_collected(
        tmp_path: Path, password_file: Path) -> None:
    """A chunk folded into a map page (object A), then rewritten whole: its CHUNK record
    names B, and the server's garbage collection deletes A while the head's page still
    names it. The image does not need A: the reader reads what the client flushed."""
    location = _new_served_volume(tmp_path, password_file)
    model = Model(SERVED_SIZE, SERVED_CHUNK)
    rng = random.Random(5)
    served = start(tmp_path, "file", str(location), password_file)
    client = NbdClient.unix(str(served.socket))
    model.apply(SERVED_CHUNK, rng.randbytes(SERVED_CHUNK))
    client.pwrite(model.snapshot()[1], SERVED_CHUNK)
    client.flush()
    client.close()
    served.close()
    (folded,) = (location / "chunks").iterdir()  # object A
    served = start(tmp_path, "file", str(location), password_file, "--gc-grace", "0.2")
    client = NbdClient.unix(str(served.socket))
    model.apply(SERVED_CHUNK, rng.randbytes(SERVED_CHUNK))
    client.pwrite(model.snapshot()[1], SERVED_CHUNK)
    client.flush()
    deadline = time.monotonic() + 60
    while folded.exists():  # the server's garbage collection runs every 0.2 s
        assert time.monotonic() < deadline, f"{folded.name} was never collected"
        with pytest.raises(subprocess.TimeoutExpired):  # the interval and liveness check
            served.process.wait(timeout=0.1)
    served.kill()
    doc, read = read_volume_v3(location, password_file.read_text().strip())
    head = json.loads((location / doc["head"]).read_bytes())
    entries = open_page(DirObjects(location), 0, int(head["map"][0][1], 16),
                        unlock_dir(location, password_file.read_text().strip())[1],
                        bytes.fromhex(doc["volume_id"]))
    assert folded.name == chunk_key_v3(1, entries[1][0]).split("/")[1]  # still named
    same_image(read, model.snapshot(), SERVED_CHUNK)
