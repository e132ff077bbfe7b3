"""Volume metadata, key slots, and the volume-level operations (init, unlock, passwd,
resize, delete, list).

A volume is a set of objects under one store root (docs/format.md, "Objects of a volume"):
  volume.json         metadata: size, chunk size, format version, key slots, MAC
  lease               who has the volume open (cloudnbd.lease)
  chunks/<16 hex>     one object per chunk that holds any non-zero byte

Promises:
- A volume owns only its own keys (owns(), own_objects(): the one definition). Nothing
  here reads, writes or deletes any other key under the root, and init refuses a root
  that holds anything else, or lies inside or above another volume.
- The metadata is authenticated as a whole (HMAC under a key derived from the master key):
  a changed size, chunk size, generation or key slot is refused with IntegrityError.
- Changing passwords touches volume.json only; chunk objects stay byte-identical.
- A failed operation leaves the bucket as it was (init writes with create-if-absent; the
  metadata object is always replaced atomically and last).
- M1 volume.json is only ever replaced conditionally on the version read before the
  change was computed (Volume.update): of two concurrent updates (two `passwd` runs, a
  `resize` and a `passwd`) the second re-reads, re-applies its change to what the first
  wrote, or fails with a message; it never writes over an update it did not see.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from cloudnbd import codec, layout
from cloudnbd.backends.base import ObjectInfo, ObjectStore
from cloudnbd.chunks import ChunkCodec, ChunkStore, chunk_index, stored_chunks
from cloudnbd.codec import (
    Argon2idParams,
    KdfParams,
    KeySlot,
    ScryptParams,
    VolumeKeys,
    canonical,
)
from cloudnbd.errors import (
    BackendError,
    CloudnbdError,
    IntegrityError,
    LocationInUse,
    ObjectNotFound,
    PreconditionFailed,
    UnsupportedFormat,
    UsageError,
    VolumeExists,
    VolumeNotFound,
    WrongPassword,
)
from cloudnbd.kdf import calibrate, weakness
from cloudnbd.lease import LEASE_KEY
from cloudnbd.objects import VolumeObjects
from cloudnbd.sizes import format_size

log = logging.getLogger(__name__)

FORMAT_NAME = "cloudnbd-volume"
#: the newest format this code reads and writes. Version 2 added Argon2id key slots; a
#: volume without one is still written as version 1, so that older cloudnbd reads it.
FORMAT_VERSION = 3
#: the version that stores data as immutable objects under a head (docs/format.md)
LAYOUT_V3 = 3
METADATA_KEY = "volume.json"
#: what every chunk is sealed and packed with (codec.py); volume.json names them, and a
#: volume that names others was not written by this cloudnbd
CIPHER = "aes-256-gcm"
COMPRESSION = "zstd"

#: sizes are rounded up to this, the largest logical block size NBD clients and the Linux
#: kernel use, so that a 4 KiB-block filesystem fills the whole device
SIZE_ALIGNMENT = 4096
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
#: see docs/chunk-size.md for the measurement behind this choice
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MAX_SIZE = 2**63 - SIZE_ALIGNMENT  # NBD sizes are 64-bit; keep signed arithmetic safe
#: The most chunks a volume may have. A serving process keeps 1 byte per chunk of the
#: volume and 16 per map entry, in pages of 4096 entries wherever a chunk is stored
#: (engine/chunkmap.py): 256 MiB at open, 4.25 GiB when every chunk is stored. That is
#: 1 PiB in 4 MiB chunks, 16 PiB in 64 MiB chunks.
MAX_CHUNKS = 2**28
MAX_SLOTS = 8
DELETE_BATCH = 1000  # keys per delete_many call: one S3 DeleteObjects, one progress step
_UPDATE_ATTEMPTS = 5  # M1: re-reads of volume.json when concurrent updates keep winning
_SCAN_LIMIT = 1000  # objects init looks at in an occupied location to name what is there
#: what a key slot may ask of the machine that opens it (docs/format.md)
_KDFS: dict[str, tuple[type[KdfParams], dict[str, tuple[int, int]]]] = {
    "scrypt": (ScryptParams, {"n": (2**10, 2**24), "r": (1, 32), "p": (1, 16)}),
    "argon2id": (Argon2idParams, {"memory_kib": (8, 2**22), "iterations": (1, 64),
                                  "lanes": (1, 16)}),
}


def format_version(slots: tuple[KeySlot, ...], head: str = "") -> int:
    """The lowest format version that describes a volume: 3 with a head (every volume
    cloudnbd creates now), else 2 with an Argon2id key slot, else 1."""
    if head:
        return LAYOUT_V3
    return 2 if any(isinstance(s.kdf, Argon2idParams) for s in slots) else 1


# -- what a volume owns --------------------------------------------------------------------
# The one definition of a volume's keys (docs/format.md, "Objects of a volume"). delete,
# resize, import and init go by it; a later format adds its keys here, and nowhere else.

#: keys a volume owns by name; with the chunk keys (chunk_index) they are all of it
_OWN_KEYS = (LEASE_KEY, METADATA_KEY)


def owns(key: str) -> bool:
    """True if key (relative to a volume's root) is one of the volume's own keys: those
    of versions 1 and 2, and version 3's families (layout.owns_v3)."""
    return key in _OWN_KEYS or chunk_index(key) is not None or layout.owns_v3(key)


def own_objects(store: ObjectStore) -> Iterator[ObjectInfo]:
    """Every object of the volume at store, and nothing else under its root: the chunks
    and the other version-3 objects, then _OWN_KEYS in their order (volume.json last)."""
    for _, info in stored_chunks(store):
        yield info
    for prefix in ("chunks/", "map/", "journal/", "head-", layout.SNAPSHOT_PREFIX):
        for info in store.list(prefix):
            if layout.owns_v3(info.key):
                yield info
    for key in _OWN_KEYS:
        found = store.stat(key)
        if found is not None:
            yield found


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


def check_geometry(size: int, chunk_size: int) -> None:
    """Refuse a volume cloudnbd could not serve: the one rule of init, resize and a grow
    through the running server. UsageError unless size (rounded already, round_size)
    is one NBD can address and chunk_size one of the allowed, and the chunks fit in
    memory at open (MAX_CHUNKS)."""
    check_size(size)
    check_chunk_size(chunk_size)
    check_chunk_count(size, chunk_size)
    if size % SIZE_ALIGNMENT:
        raise UsageError(f"volume size must be a multiple of {SIZE_ALIGNMENT}")


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
    head: str = ""  # version 3: the key of the head object

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
            "cipher": CIPHER,
            "compression": COMPRESSION,
            "generation": self.generation,
            "created": self.created,
            "key_slots": [
                {"slot": s.slot, **s.kdf.fields(), "salt": _b64(s.salt),
                 "nonce": _b64(s.nonce), "wrapped_key": _b64(s.wrapped_key)}
                for s in self.slots
            ],
            **({"head": self.head} if self.version >= LAYOUT_V3 else {}),
        }


def _field(doc: dict[str, Any], name: str, kind: type) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise IntegrityError(f"volume metadata: field {name!r} missing or malformed")
    return value


def _parse_slot(raw: Any, version: int) -> KeySlot:
    kind = raw.get("kdf") if isinstance(raw, dict) else None
    if kind not in _KDFS or (kind == "argon2id" and version < 2):
        raise IntegrityError("volume metadata: key slot malformed or of an unknown KDF")
    params_type, limits = _KDFS[kind]
    params = {}
    for name, (low, high) in limits.items():
        value = _field(raw, name, int)
        if not low <= value <= high:
            raise IntegrityError(f"volume metadata: KDF parameter {name}={value} out of range")
        params[name] = value
    if kind == "argon2id" and params["memory_kib"] < 8 * params["lanes"]:
        raise IntegrityError("volume metadata: Argon2id memory below 8 KiB per lane")
    return KeySlot(slot=_field(raw, "slot", int), kdf=params_type(**params),
                   salt=_unb64(raw.get("salt"), "slot salt"),
                   nonce=_unb64(raw.get("nonce"), "slot nonce"),
                   wrapped_key=_unb64(raw.get("wrapped_key"), "wrapped key"))


def _volume_document(blob: bytes) -> dict[str, Any] | None:
    """The JSON document of blob if it is a cloudnbd volume.json (of any version, valid
    or not), None if it is something else that happens to bear the name."""
    try:
        doc = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT_NAME else None


def parse_metadata(blob: bytes) -> tuple[VolumeMeta, dict[str, Any], str]:
    """Parse volume.json, checking format, version, cipher and compression before
    anything else (all before a password is asked for).

    Returns the metadata, the document without its MAC, and the MAC; the MAC is NOT
    verified here (that needs the master key; see unlock()).
    """
    doc = _volume_document(blob)
    if doc is None:
        raise UnsupportedFormat("volume.json is not a cloudnbd volume")
    version = doc.get("version")
    if not isinstance(version, int) or version < 1:
        raise IntegrityError("volume metadata: malformed format version")
    if version > FORMAT_VERSION:
        raise UnsupportedFormat(f"volume format version {version} is newer than this "
                                f"cloudnbd supports ({FORMAT_VERSION}); upgrade cloudnbd")
    for name, known in (("cipher", CIPHER), ("compression", COMPRESSION)):
        if doc.get(name) != known:
            raise UnsupportedFormat(f"volume.json names {name} {doc.get(name)!r}; this "
                                    f"cloudnbd reads {known} only")
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
        slots=tuple(_parse_slot(raw, version) for raw in slots),
        version=version,
        head=_head_field(doc) if version >= LAYOUT_V3 else "",
    )
    return meta, doc, mac


def _head_field(doc: dict[str, Any]) -> str:
    head = _field(doc, "head", str)
    if layout.head_key_id(head) is None:
        raise IntegrityError(f"volume metadata: malformed head key {head!r}")
    return head


def read_metadata(store: ObjectStore) -> tuple[VolumeMeta, dict[str, Any], str]:
    """Fetch and parse volume.json (unauthenticated); VolumeNotFound if absent."""
    meta, doc, mac, _ = read_versioned_metadata(store)
    return meta, doc, mac


def read_versioned_metadata(store: ObjectStore
                            ) -> tuple[VolumeMeta, dict[str, Any], str, str]:
    """read_metadata, plus the version of volume.json that was read (for M1).

    The version is taken before the contents: were the object replaced in between, the
    version is older than the contents, so a conditional write based on it fails and
    re-reads, instead of succeeding against contents it did not see."""
    info = store.stat(METADATA_KEY)
    try:
        blob = store.get(METADATA_KEY)
    except ObjectNotFound:
        info = None
    if info is None:
        raise VolumeNotFound(f"no cloudnbd volume at {store.description}")
    return (*parse_metadata(blob), info.version)


@dataclass
class Volume:
    """An unlocked volume: verified metadata plus its keys."""

    store: ObjectStore
    meta: VolumeMeta
    keys: VolumeKeys
    #: the version of volume.json that meta was read from (M1)
    meta_version: str | None = None
    #: the key slot the password opened (unlock), if known
    slot: int | None = None

    def serialize(self, meta: VolumeMeta) -> bytes:
        doc = meta.document()
        doc["mac"] = codec.metadata_mac(self.keys, canonical(meta.document()))
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("ascii")

    def update(self, change: Callable[[VolumeMeta], VolumeMeta],
               keys: VolumeKeys | None = None) -> VolumeMeta:
        """Replace volume.json with change(current metadata), conditionally (M1).

        change may be called several times, each time on the newest metadata, and may
        raise a CloudnbdError when the change no longer applies (a slot someone else
        removed). Returns the metadata written. With keys (rekey: a new master key, the
        same volume id), the new volume.json is authenticated under them, and they are
        this Volume's keys from then on.
        """
        for attempt in range(_UPDATE_ATTEMPTS):
            if attempt or self.meta_version is None:
                self.refresh()
            meta = change(self.meta)
            meta = replace(meta, generation=self.meta.generation + 1,
                           version=format_version(meta.slots, meta.head))
            signer = self if keys is None else Volume(self.store, meta, keys)
            try:
                self.meta_version = self.store.put_if(METADATA_KEY, signer.serialize(meta),
                                                      self.meta_version)
            except PreconditionFailed:
                log.info("volume.json changed while we updated it; reading it again")
                continue
            self.meta = meta
            if keys is not None:
                self.keys = keys
            return meta
        raise CloudnbdError(f"{self.store.description}: volume.json keeps changing while "
                            f"this command updates it (another command is updating it "
                            f"too); nothing was changed, try again")

    def refresh(self) -> None:
        """Read volume.json again, authenticated with this volume's keys."""
        meta, doc, mac, version = read_versioned_metadata(self.store)
        if meta.volume_id != self.meta.volume_id:
            raise IntegrityError(f"{self.store.description}: volume.json now belongs to "
                                 f"another volume ({meta.volume_id.hex()})")
        codec.verify_metadata_mac(self.keys, canonical(doc), mac)
        if meta.generation < self.meta.generation:
            raise IntegrityError(f"{self.store.description}: volume.json went back from "
                                 f"generation {self.meta.generation} to {meta.generation}")
        self.meta, self.meta_version = meta, version

    # -- key slots ------------------------------------------------------------------------
    def _slot_opened_by(self, meta: VolumeMeta, password: str) -> KeySlot:
        for slot in meta.slots:
            try:
                codec.unwrap_master_key(slot, password, meta.volume_id)
                return slot
            except WrongPassword:
                continue
        raise WrongPassword("wrong password: no key slot opens with it (changed "
                            "meanwhile by another command?)")

    def change_password(self, old_password: str, new_password: str,
                        kdf: KdfParams | None = None) -> int:
        """Re-wrap the slot old_password opens under new_password, with kdf or newly
        calibrated Argon2id parameters (a scrypt slot is upgraded); returns the slot."""
        changed: list[int] = []
        kdf = kdf or calibrate()  # once, not per attempt of update()

        def change(meta: VolumeMeta) -> VolumeMeta:
            old = self._slot_opened_by(meta, old_password)
            new = new_slot(old.slot, new_password, self.keys.master_key, meta.volume_id, kdf)
            changed[:] = [old.slot]
            return replace(meta, slots=tuple(new if s.slot == old.slot else s
                                             for s in meta.slots))

        self.update(change)
        return changed[0]

    def add_password(self, new_password: str, kdf: KdfParams | None = None) -> int:
        """Add a key slot for new_password (kdf, or calibrated Argon2id); its number."""
        added: list[int] = []
        kdf = kdf or calibrate()  # once, not per attempt of update()

        def change(meta: VolumeMeta) -> VolumeMeta:
            if len(meta.slots) >= MAX_SLOTS:
                raise UsageError(f"all {MAX_SLOTS} key slots are in use; remove one first")
            number = min(set(range(MAX_SLOTS)) - {s.slot for s in meta.slots})
            slot = new_slot(number, new_password, self.keys.master_key, meta.volume_id, kdf)
            added[:] = [number]
            return replace(meta, slots=(*meta.slots, slot))

        self.update(change)
        return added[0]

    def remove_slot(self, number: int) -> None:
        """Remove key slot number; the last slot can never be removed."""
        def change(meta: VolumeMeta) -> VolumeMeta:
            if number not in {s.slot for s in meta.slots}:
                raise UsageError(f"there is no key slot {number}")
            if len(meta.slots) == 1:
                raise UsageError("refusing to remove the last key slot: the volume would "
                                 "be unreadable forever")
            return replace(meta, slots=tuple(s for s in meta.slots if s.slot != number))

        self.update(change)

    # -- chunks ---------------------------------------------------------------------------
    @property
    def chunk_codec(self) -> ChunkCodec:
        return ChunkCodec(self.keys, self.meta.chunk_size)

    @property
    def objects(self) -> VolumeObjects:
        """The volume's version-3 objects (cloudnbd/objects.py)."""
        return VolumeObjects(self.store, self.chunk_codec)

    @property
    def chunks(self) -> ChunkStore:
        """The volume's chunks (cloudnbd/chunks.py)."""
        return ChunkStore(self.store, self.chunk_codec)

    def stored_chunks(self) -> Iterator[tuple[int, ObjectInfo]]:
        """(index, object size and version) of every stored chunk, from a listing."""
        return self.chunks.list()

    # -- size -----------------------------------------------------------------------------
    def grow(self, new_size: int) -> None:
        """Record a larger size (already rounded) in volume.json (M1). Nothing else
        changes: past the old end nothing is stored (a shrink drops it, and no writer
        stores past the end), so the new space reads as zeros. Shrinking is
        transfer.shrink()."""
        check_geometry(new_size, self.meta.chunk_size)
        if new_size < self.meta.size:
            raise ValueError("grow() makes a volume larger; transfer.shrink() shrinks")
        if new_size != self.meta.size:
            self.update(lambda meta: replace(meta, size=new_size))


def new_slot(number: int, password: str, master_key: bytes, volume_id: bytes,
          kdf: KdfParams | None) -> KeySlot:
    """A new key slot: with kdf, or Argon2id calibrated on this machine (kdf.py)."""
    if kdf is None:
        kdf = calibrate()
    if isinstance(kdf, Argon2idParams) and (weak := weakness(kdf)):
        log.warning("key slot %d: %s", number, weak)
    return codec.wrap_master_key(number, password, master_key, volume_id, kdf)


def create(store: ObjectStore, size: int, chunk_size: int, password: str,
           kdf: KdfParams | None = None, version: int = LAYOUT_V3) -> Volume:
    """Create a new, empty volume at store; VolumeExists if one is already there.

    Version 3 (the default) writes its first head (generation 1, nothing stored)
    before volume.json, so that a volume.json never names a head that is not there.
    Versions 1 and 2 are for tests of reading and upgrading old volumes."""
    check_geometry(size, chunk_size)
    if not password:
        raise UsageError("the password must not be empty")
    check_location_free(store)
    volume_id = os.urandom(codec.VOLUME_ID_BYTES)
    master_key = os.urandom(codec.MASTER_KEY_BYTES)
    slot = new_slot(0, password, master_key, volume_id, kdf)
    head = layout.head_key(layout.new_key_id()) if version >= LAYOUT_V3 else ""
    created = layout.utc_now()
    meta = VolumeMeta(
        volume_id=volume_id, size=size, chunk_size=chunk_size, generation=1,
        created=created, slots=(slot,), version=format_version((slot,), head), head=head,
    )
    volume = Volume(store, meta, VolumeKeys(volume_id, master_key))
    if head:
        first = layout.Head(volume_id, 1, 0, 0, (), (), created)
        try:
            store.put_if(head, layout.encode_head(volume.keys, first), None)
        except PreconditionFailed:
            raise VolumeExists(f"a volume already exists at {store.description}") from None
    try:
        volume.meta_version = store.put_if(METADATA_KEY, volume.serialize(meta), None)
    except PreconditionFailed:
        raise VolumeExists(f"a volume already exists at {store.description}") from None
    log.info("created volume %s at %s", volume_id.hex(), store.description)
    return volume


def unlock(store: ObjectStore, password: str) -> Volume:
    """Open the volume at store with password, verifying its metadata."""
    meta, doc, mac, version = read_versioned_metadata(store)
    for slot in meta.slots:
        try:
            master_key = codec.unwrap_master_key(slot, password, meta.volume_id)
            break
        except WrongPassword:
            continue
    else:
        raise WrongPassword("wrong password: no key slot opens with it")
    opened = slot.slot
    keys = VolumeKeys(meta.volume_id, master_key)
    codec.verify_metadata_mac(keys, canonical(doc), mac)
    # Only now, authenticated, may the values be trusted; still refuse nonsense.
    try:
        check_size(meta.size)
        check_chunk_size(meta.chunk_size)
    except UsageError as exc:
        raise IntegrityError(f"volume metadata: {exc.message}") from None
    return Volume(store, meta, keys, version, opened)


def check_location_free(store: ObjectStore) -> None:
    """Refuse a location a new volume would share: VolumeExists if a volume is there,
    LocationInUse if the location lies inside another volume, or holds any object (a
    volume further down among them).

    Only the location's own folder marker (an empty object named PREFIX/, which a cloud
    console's "create folder" leaves) is no object.
    """
    store.check()
    if store.stat(METADATA_KEY) is not None:
        raise VolumeExists(f"a volume already exists at {store.description}")
    outer = _enclosing_volume(store)
    if outer is not None:
        raise LocationInUse(f"{store.description} lies inside the volume at {outer}: a "
                            f"volume cannot hold another; choose a location outside it")
    found = []
    for info in store.list():
        if info.key or info.size:
            found.append(info.key)
            if len(found) == _SCAN_LIMIT:
                break
    if not found:
        return
    for key in found:
        if key.endswith("/" + METADATA_KEY) and _is_volume(store, key):
            raise LocationInUse(
                f"{store.description} lies above the volume at {store.description}/"
                f"{key[:-len(METADATA_KEY) - 1]}: a volume cannot hold another; choose a "
                f"location outside it")
    named = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    if all(owns(key) for key in found):
        raise LocationInUse(f"{store.description} holds the remains of a volume whose "
                            f"volume.json is gone ({named}); remove them, or choose "
                            f"another location")
    raise LocationInUse(f"{store.description} is not empty ({named}): a volume starts in "
                        f"an empty location, as delete removes only the volume's own "
                        f"objects; choose another location")


def _enclosing_volume(store: ObjectStore) -> str | None:
    """The location of a volume whose root encloses store's, up to the bucket root (one
    request per level). A level that may not be read is skipped: a prefix-scoped grant
    refuses reads above its prefix, and even a volume there would lose nothing, as no
    command touches another volume's keys."""
    outer = store.parent()
    while outer is not None:
        try:
            if _is_volume(outer, METADATA_KEY):
                return outer.description
        except BackendError as exc:
            log.info("cannot look for a volume at %s: %s", outer.description, exc.message)
        outer = outer.parent()
    return None


def _is_volume(store: ObjectStore, key: str) -> bool:
    """True if key holds a cloudnbd volume.json (not just any object of that name)."""
    try:
        return _volume_document(store.get(key)) is not None
    except ObjectNotFound:
        return False


def delete(store: ObjectStore) -> int:
    """Remove the volume's own objects (own_objects), volume.json last, and nothing else
    under its root. Returns the number of objects deleted."""
    read_metadata(store)  # refuses anything that is not a cloudnbd volume
    keys = [info.key for info in own_objects(store) if info.key != METADATA_KEY]
    for start in range(0, len(keys), DELETE_BATCH):
        store.delete_many(keys[start:start + DELETE_BATCH])
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
