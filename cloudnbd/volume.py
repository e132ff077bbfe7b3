"""Volume metadata, key slots, and the volume-level operations (init, unlock, passwd,
resize, delete, list).

A volume is a set of objects under one store root (see docs/format.md):
  volume.json         metadata: size, chunk size, format version, key slots, MAC
  chunks/<16 hex>     one object per chunk that holds any non-zero byte

Promises:
- The metadata is authenticated as a whole (HMAC under a key derived from the master key):
  a changed size, chunk size, generation or key slot is refused with IntegrityError.
- Changing passwords touches volume.json only; chunk objects stay byte-identical.
- A failed operation leaves the bucket as it was (init writes with create-if-absent; the
  metadata object is always replaced atomically and last).
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from cloudnbd import codec
from cloudnbd.backends.base import ObjectInfo, ObjectStore
from cloudnbd.codec import KeySlot, ScryptParams, VolumeKeys
from cloudnbd.errors import (
    CloudnbdError,
    IntegrityError,
    ObjectNotFound,
    PreconditionFailed,
    UnsupportedFormat,
    UsageError,
    VolumeExists,
    VolumeNotFound,
    WrongPassword,
)
from cloudnbd.sizes import format_size

log = logging.getLogger(__name__)

FORMAT_NAME = "cloudnbd-volume"
FORMAT_VERSION = 1
METADATA_KEY = "volume.json"
CHUNK_PREFIX = "chunks/"

#: sizes are rounded up to this, the largest logical block size NBD clients and the Linux
#: kernel use, so that a 4 KiB-block filesystem fills the whole device
SIZE_ALIGNMENT = 4096
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
#: see docs/chunk-size.md for the measurement behind this choice
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MAX_SIZE = 2**63 - SIZE_ALIGNMENT  # NBD sizes are 64-bit; keep signed arithmetic safe
#: The most chunks a volume may have. A serving process keeps 1 byte per chunk of the
#: volume and 16 per stored chunk (engine/versions.py): 256 MiB at open, 4.25 GiB when
#: every chunk is stored. That is 1 PiB in 4 MiB chunks, 16 PiB in 64 MiB chunks.
MAX_CHUNKS = 2**28
MAX_SLOTS = 8
_DELETE_BATCH = 1000  # keys per delete_many call: one S3 DeleteObjects, one progress step
_KDF_LIMITS = {"n": (2**10, 2**24), "r": (1, 32), "p": (1, 16)}


def chunk_key(index: int) -> str:
    """Object key of chunk index."""
    return f"{CHUNK_PREFIX}{index:016x}"


def chunk_index(key: str) -> int | None:
    """Inverse of chunk_key, or None for keys that are not chunk objects."""
    if not key.startswith(CHUNK_PREFIX):
        return None
    tail = key[len(CHUNK_PREFIX):]
    if len(tail) != 16:
        return None
    try:
        return int(tail, 16)
    except ValueError:
        return None


def round_size(size: int) -> int:
    """size rounded up to SIZE_ALIGNMENT."""
    return -(-size // SIZE_ALIGNMENT) * SIZE_ALIGNMENT


def check_size(size: int) -> None:
    if size <= 0:
        raise UsageError("volume size must be larger than zero")
    if size > MAX_SIZE:
        raise UsageError("volume size is larger than NBD can address (2^63 bytes)")


def check_chunk_count(size: int, chunk_size: int) -> None:
    """Refuse a size that `open` could not hold in memory (MAX_CHUNKS)."""
    if -(-size // chunk_size) > MAX_CHUNKS:
        raise UsageError(
            f"a volume of {format_size(chunk_size)} chunks can be at most "
            f"{format_size(MAX_CHUNKS * chunk_size)}: serving it takes 1 byte per chunk of "
            f"memory, plus 16 per stored chunk, so a volume has at most 2^28 chunks (256 MiB "
            f"to open, 4.25 GiB when full); a larger --chunk-size (up to "
            f"{format_size(MAX_CHUNK_SIZE)}) allows a larger volume")


def check_chunk_size(chunk_size: int) -> None:
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size & (chunk_size - 1):
        raise UsageError(f"chunk size must be a power of two between "
                         f"{MIN_CHUNK_SIZE // 1024} KiB and {MAX_CHUNK_SIZE // 2**20} MiB")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise IntegrityError(f"volume metadata: {what} is not a string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise IntegrityError(f"volume metadata: {what} is not base64") from None


@dataclass(frozen=True)
class VolumeMeta:
    """The contents of volume.json."""

    volume_id: bytes
    size: int
    chunk_size: int
    generation: int
    created: str
    slots: tuple[KeySlot, ...]
    version: int = FORMAT_VERSION

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    def document(self) -> dict[str, Any]:
        """The JSON document without its MAC."""
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "volume_id": self.volume_id.hex(),
            "size": self.size,
            "chunk_size": self.chunk_size,
            "cipher": "aes-256-gcm",
            "compression": "zstd",
            "generation": self.generation,
            "created": self.created,
            "key_slots": [
                {"slot": s.slot, "kdf": "scrypt", "n": s.kdf.n, "r": s.kdf.r, "p": s.kdf.p,
                 "salt": _b64(s.salt), "nonce": _b64(s.nonce),
                 "wrapped_key": _b64(s.wrapped_key)}
                for s in self.slots
            ],
        }


def canonical(document: dict[str, Any]) -> bytes:
    """The bytes the metadata MAC is computed over (see docs/format.md)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii")


def _field(doc: dict[str, Any], name: str, kind: type) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise IntegrityError(f"volume metadata: field {name!r} missing or malformed")
    return value


def _parse_slot(raw: Any) -> KeySlot:
    if not isinstance(raw, dict) or raw.get("kdf") != "scrypt":
        raise IntegrityError("volume metadata: key slot malformed or of an unknown KDF")
    params = {}
    for name, (low, high) in _KDF_LIMITS.items():
        value = _field(raw, name, int)
        if not low <= value <= high:
            raise IntegrityError(f"volume metadata: KDF parameter {name}={value} out of range")
        params[name] = value
    return KeySlot(slot=_field(raw, "slot", int), kdf=ScryptParams(**params),
                   salt=_unb64(raw.get("salt"), "slot salt"),
                   nonce=_unb64(raw.get("nonce"), "slot nonce"),
                   wrapped_key=_unb64(raw.get("wrapped_key"), "wrapped key"))


def parse_metadata(blob: bytes) -> tuple[VolumeMeta, dict[str, Any], str]:
    """Parse volume.json, checking format and version before anything else.

    Returns the metadata, the document without its MAC, and the MAC; the MAC is NOT
    verified here (that needs the master key; see unlock()).
    """
    try:
        doc = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        raise UnsupportedFormat("volume.json is not JSON: not a cloudnbd volume") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise UnsupportedFormat("volume.json is not a cloudnbd volume")
    version = doc.get("version")
    if not isinstance(version, int) or version < 1:
        raise IntegrityError("volume metadata: malformed format version")
    if version > FORMAT_VERSION:
        raise UnsupportedFormat(f"volume format version {version} is newer than this "
                                f"cloudnbd supports ({FORMAT_VERSION}); upgrade cloudnbd")
    mac = _field(doc, "mac", str)
    del doc["mac"]
    try:
        volume_id = bytes.fromhex(_field(doc, "volume_id", str))
    except ValueError:
        raise IntegrityError("volume metadata: malformed volume id") from None
    if len(volume_id) != codec.VOLUME_ID_BYTES:
        raise IntegrityError("volume metadata: malformed volume id")
    slots = doc.get("key_slots")
    if not isinstance(slots, list) or not slots or len(slots) > MAX_SLOTS:
        raise IntegrityError("volume metadata: key slots missing or malformed")
    meta = VolumeMeta(
        volume_id=volume_id,
        size=_field(doc, "size", int),
        chunk_size=_field(doc, "chunk_size", int),
        generation=_field(doc, "generation", int),
        created=_field(doc, "created", str),
        slots=tuple(_parse_slot(raw) for raw in slots),
        version=version,
    )
    return meta, doc, mac


def read_metadata(store: ObjectStore) -> tuple[VolumeMeta, dict[str, Any], str]:
    """Fetch and parse volume.json (unauthenticated); VolumeNotFound if absent."""
    try:
        blob = store.get(METADATA_KEY)
    except ObjectNotFound:
        raise VolumeNotFound(f"no cloudnbd volume at {store.description}") from None
    return parse_metadata(blob)


@dataclass
class Volume:
    """An unlocked volume: verified metadata plus its keys."""

    store: ObjectStore
    meta: VolumeMeta
    keys: VolumeKeys

    def serialize(self, meta: VolumeMeta) -> bytes:
        doc = meta.document()
        doc["mac"] = codec.metadata_mac(self.keys, canonical(meta.document()))
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("ascii")

    def save(self, meta: VolumeMeta) -> None:
        """Replace volume.json with meta (its generation one higher than the current)."""
        meta = replace(meta, generation=self.meta.generation + 1)
        self.store.put(METADATA_KEY, self.serialize(meta))
        self.meta = meta

    # -- key slots ------------------------------------------------------------------------
    def _slot_opened_by(self, password: str) -> KeySlot:
        for slot in self.meta.slots:
            try:
                codec.unwrap_master_key(slot, password, self.meta.volume_id)
                return slot
            except WrongPassword:
                continue
        raise WrongPassword("wrong password: no key slot opens with it")

    def change_password(self, old_password: str, new_password: str,
                        kdf: ScryptParams | None = None) -> int:
        """Re-wrap the slot old_password opens under new_password; returns the slot."""
        old = self._slot_opened_by(old_password)
        new = codec.wrap_master_key(old.slot, new_password, self.keys.master_key,
                                    self.meta.volume_id, kdf or old.kdf)
        slots = tuple(new if s.slot == old.slot else s for s in self.meta.slots)
        self.save(replace(self.meta, slots=slots))
        return old.slot

    def add_password(self, new_password: str, kdf: ScryptParams | None = None) -> int:
        """Add a key slot for new_password; returns its number."""
        if len(self.meta.slots) >= MAX_SLOTS:
            raise UsageError(f"all {MAX_SLOTS} key slots are in use; remove one first")
        used = {s.slot for s in self.meta.slots}
        number = min(set(range(MAX_SLOTS)) - used)
        slot = codec.wrap_master_key(number, new_password, self.keys.master_key,
                                     self.meta.volume_id, kdf or self.meta.slots[0].kdf)
        self.save(replace(self.meta, slots=(*self.meta.slots, slot)))
        return number

    def remove_slot(self, number: int) -> None:
        """Remove key slot number; the last slot can never be removed."""
        if number not in {s.slot for s in self.meta.slots}:
            raise UsageError(f"there is no key slot {number}")
        if len(self.meta.slots) == 1:
            raise UsageError("refusing to remove the last key slot: the volume would be "
                             "unreadable forever")
        slots = tuple(s for s in self.meta.slots if s.slot != number)
        self.save(replace(self.meta, slots=slots))

    # -- chunks ---------------------------------------------------------------------------
    def read_chunk(self, index: int) -> bytes | None:
        """The plain contents of chunk index, or None if it is not stored (all zeros)."""
        try:
            blob = self.store.get(chunk_key(index))
        except ObjectNotFound:
            return None
        return codec.decode_chunk(self.keys, index, blob, self.meta.chunk_size)

    def write_chunk(self, index: int, plain: bytes) -> None:
        """Store chunk index; an all-zero chunk is deleted instead of stored."""
        if codec.is_zero(plain):
            self.store.delete(chunk_key(index))
        else:
            self.store.put(chunk_key(index), codec.encode_chunk(self.keys, index, plain))

    def stored_chunks(self) -> Iterator[tuple[int, ObjectInfo]]:
        """(index, object size and version) of every stored chunk, from a listing."""
        for info in self.store.list(CHUNK_PREFIX):
            index = chunk_index(info.key)
            if index is not None:
                yield index, info

    # -- size -----------------------------------------------------------------------------
    def resize(self, new_size: int, allow_shrink: bool = False,
               progress: Callable[[int, int], None] | None = None) -> None:
        """Grow, or with allow_shrink shrink, the volume to new_size (already rounded).

        Shrinking first deletes the chunks past the new end and zeroes the tail of the
        new last chunk, and only then records the new size: were it the other way round, a
        crash in between followed by a grow would resurrect stale data past the end.
        progress(bytes deleted, bytes to delete) follows the deletion, which can be long.
        """
        check_size(new_size)
        check_chunk_count(new_size, self.meta.chunk_size)
        old_size = self.meta.size
        if new_size < old_size:
            if not allow_shrink:
                raise UsageError("the new size is smaller than the volume: data past it "
                                 "would be destroyed; pass --shrink to do so")
            keep = -(-new_size // self.meta.chunk_size)
            doomed = [chunk_key(i) for i, _ in self.stored_chunks() if i >= keep]
            total = len(doomed) * self.meta.chunk_size
            if progress is not None:
                progress(0, total)
            for start in range(0, len(doomed), _DELETE_BATCH):
                self.store.delete_many(doomed[start:start + _DELETE_BATCH])
                if progress is not None:
                    done = min(start + _DELETE_BATCH, len(doomed))
                    progress(done * self.meta.chunk_size, total)
            tail = new_size % self.meta.chunk_size
            if tail:
                last = keep - 1
                plain = self.read_chunk(last)
                if plain is not None:
                    self.write_chunk(last, plain[:tail] + bytes(self.meta.chunk_size - tail))
        if new_size != old_size:
            self.save(replace(self.meta, size=new_size))


def create(store: ObjectStore, size: int, chunk_size: int, password: str,
           kdf: ScryptParams | None = None) -> Volume:
    """Create a new, empty volume at store; VolumeExists if one is already there."""
    check_size(size)
    check_chunk_size(chunk_size)
    check_chunk_count(size, chunk_size)
    if size % SIZE_ALIGNMENT:
        raise UsageError(f"volume size must be a multiple of {SIZE_ALIGNMENT}")
    if not password:
        raise UsageError("the password must not be empty")
    store.check()
    if store.stat(METADATA_KEY) is not None:
        raise VolumeExists(f"a volume already exists at {store.description}")
    volume_id = os.urandom(codec.VOLUME_ID_BYTES)
    master_key = os.urandom(codec.MASTER_KEY_BYTES)
    slot = codec.wrap_master_key(0, password, master_key, volume_id, kdf or ScryptParams())
    meta = VolumeMeta(
        volume_id=volume_id, size=size, chunk_size=chunk_size, generation=1,
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), slots=(slot,),
    )
    volume = Volume(store, meta, VolumeKeys(volume_id, master_key))
    try:
        store.put_if_absent(METADATA_KEY, volume.serialize(meta))
    except PreconditionFailed:
        raise VolumeExists(f"a volume already exists at {store.description}") from None
    log.info("created volume %s at %s", volume_id.hex(), store.description)
    return volume


def unlock(store: ObjectStore, password: str) -> Volume:
    """Open the volume at store with password, verifying its metadata."""
    meta, doc, mac = read_metadata(store)
    for slot in meta.slots:
        try:
            master_key = codec.unwrap_master_key(slot, password, meta.volume_id)
            break
        except WrongPassword:
            continue
    else:
        raise WrongPassword("wrong password: no key slot opens with it")
    keys = VolumeKeys(meta.volume_id, master_key)
    codec.verify_metadata_mac(keys, canonical(doc), mac)
    # Only now, authenticated, may the values be trusted; still refuse nonsense.
    try:
        check_size(meta.size)
        check_chunk_size(meta.chunk_size)
    except UsageError as exc:
        raise IntegrityError(f"volume metadata: {exc.message}") from None
    return Volume(store, meta, keys)


def delete(store: ObjectStore) -> int:
    """Remove every object of the volume; volume.json goes last. Returns objects deleted."""
    read_metadata(store)  # refuses anything that is not a cloudnbd volume
    keys = [info.key for info in store.list() if info.key != METADATA_KEY]
    store.delete_many(keys)
    store.delete(METADATA_KEY)
    return len(keys) + 1


@dataclass(frozen=True)
class VolumeListing:
    """A volume found by list(); values unauthenticated (no password was given)."""

    location: str
    size: int | None
    chunk_size: int | None
    error: str | None = None


def find_volumes(store: ObjectStore) -> Iterator[VolumeListing]:
    """Every volume under store's root, by its metadata object."""
    for info in store.list():
        if info.key == METADATA_KEY or info.key.endswith("/" + METADATA_KEY):
            location = info.key[: -len(METADATA_KEY)].rstrip("/")
            try:
                meta, _, _ = parse_metadata(store.get(info.key))
                yield VolumeListing(location, meta.size, meta.chunk_size)
            except CloudnbdError as exc:
                yield VolumeListing(location, None, None, exc.message)
