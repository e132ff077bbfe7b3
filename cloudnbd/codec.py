"""Object encryption and key wrapping: pure functions of bytes and keys.

Everything cloudnbd stores in the cloud, except the clear-text parts of the metadata
object and the head, passes through here: version-1 chunk objects, version-3 sealed
objects (their kinds and key numbers are cloudnbd/layout.py's), key slots, and the MACs
of volume.json and the head. docs/format.md specifies the same thing byte for byte; the
known-answer tests in tests/test_codec.py and tests/vectors_v3.py hold the two together.

Promises:
- decode_chunk() returns exactly the bytes encode_chunk() was given for the same volume and
  chunk index, or raises IntegrityError. A flipped bit, a truncated object, an object moved
  to another index or copied from another volume never decodes. unseal_object() promises
  the same for (kind, ident), and never allocates much more than its limit.
- Every encryption uses a fresh 256-bit random salt from which the AES key and nonce are
  derived, so a (key, nonce) pair repeats only if two salts collide: with 2^64 uploads the
  chance is about 2^-129, far beyond the 2^32 limit of random 96-bit GCM nonces under a
  single key.
- Compressed data is never larger than the plain data plus the fixed overhead: a chunk zstd
  cannot shrink is stored plain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

import zstandard
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloudnbd.errors import CloudnbdError, IntegrityError, WrongPassword

MASTER_KEY_BYTES = 32
VOLUME_ID_BYTES = 16
SALT_BYTES = 32
TAG_BYTES = 16

CHUNK_MAGIC = b"CNBc"
CHUNK_VERSION = 1
OBJECT_MAGIC = b"CNB3"  # version 3 sealed objects; the byte after it is their kind
FLAG_ZSTD = 0x01
_KNOWN_FLAGS = FLAG_ZSTD

#: magic, version (version 3: kind), flags, reserved (must be 0), salt
CHUNK_HEADER = struct.Struct(">4sBBH32s")
CHUNK_OVERHEAD = CHUNK_HEADER.size + TAG_BYTES

_CHUNK_INFO = b"cloudnbd chunk v1"
_META_INFO = b"cloudnbd metadata v1"
_OBJECT_INFO = b"cloudnbd object v3"
_HEAD_INFO = b"cloudnbd head v3"
_SNAPSHOT_INFO = b"cloudnbd snapshot v3"
_SLOT_AAD = b"cloudnbd slot v1"  # scrypt slots
_ARGON2ID_SLOT_AAD = b"cloudnbd argon2id slot v1"
_INDEX = struct.Struct(">Q")

DEFAULT_ZSTD_LEVEL = 3


@dataclass(frozen=True)
class VolumeKeys:
    """The secrets of one unlocked volume. Never logged: repr hides the key."""

    volume_id: bytes
    master_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.volume_id) != VOLUME_ID_BYTES or len(self.master_key) != MASTER_KEY_BYTES:
            raise ValueError("volume id must be 16 bytes and master key 32 bytes")

    @property
    def metadata_key(self) -> bytes:
        """HMAC key that authenticates the metadata object."""
        return _hkdf(self.master_key, None, _META_INFO + self.volume_id, 32)

    @property
    def head_mac_key(self) -> bytes:
        """HMAC key that authenticates the head (version 3)."""
        return _hkdf(self.master_key, None, _HEAD_INFO + self.volume_id, 32)

    @property
    def snapshot_mac_key(self) -> bytes:
        """HMAC key that authenticates a snapshot (version 3): not the head's, so that
        neither can pass for the other."""
        return _hkdf(self.master_key, None, _SNAPSHOT_INFO + self.volume_id, 32)


def _hkdf(key: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor: a ZstdCompressor must not be used by two threads at once."""
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("zstd", {})
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level)
    return comp


_PROBE = 16 * 1024


def _looks_incompressible(plain: bytes | bytearray | memoryview, level: int) -> bool:
    """True if three samples (start, middle, end) all fail to shrink: then compressing the
    whole chunk would only burn CPU (random data, encrypted or already compressed files).
    """
    if len(plain) < 8 * _PROBE:
        return False
    view = memoryview(plain)
    compressor = _compressor(level)
    for start in (0, len(plain) // 2, len(plain) - _PROBE):
        if len(compressor.compress(view[start:start + _PROBE])) < _PROBE * 0.97:
            return False
    return True


def _seal(keys: VolumeKeys, magic: bytes, byte4: int, info: bytes, binding: bytes,
          plain: bytes | bytearray | memoryview, level: int,
          salt: bytes | None) -> bytearray:
    """The header-salt-ciphertext-tag layout that chunk objects (version 1) and sealed
    objects (version 3) share: compress when it helps, then encrypt under a key and nonce
    derived from a fresh salt and info, with header || binding as associated data.

    The object is encrypted straight into its final buffer: no copy beyond the plain
    input, the compressed body and the object itself (memory per upload).
    """
    flags, body = 0, plain
    if not _looks_incompressible(plain, level):
        compressed = _compressor(level).compress(plain)
        if len(compressed) < len(plain):
            flags, body = FLAG_ZSTD, compressed
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    header = CHUNK_HEADER.pack(magic, byte4, flags, 0, salt)
    okm = _hkdf(keys.master_key, salt, info, 44)
    blob = bytearray(len(header) + len(body) + TAG_BYTES)
    blob[:len(header)] = header
    AESGCM(okm[:32]).encrypt_into(okm[32:], body, header + binding,
                                  memoryview(blob)[len(header):])
    return blob


def _unseal(keys: VolumeKeys, magic: bytes, byte4: int, info: bytes, binding: bytes,
            blob: bytes, limit: int, exact: bool, name: str) -> bytes:
    """Inverse of _seal: the plain bytes, at most limit of them (exactly limit if exact),
    or IntegrityError with a message that starts with name."""
    if len(blob) < CHUNK_OVERHEAD:
        raise IntegrityError(f"{name}: object truncated ({len(blob)} bytes)")
    found_magic, found_byte4, flags, reserved, salt = CHUNK_HEADER.unpack_from(blob)
    if found_magic != magic:
        raise IntegrityError(f"{name}: not a cloudnbd object of this kind "
                             f"(magic {found_magic!r})")
    if found_byte4 != byte4 or flags & ~_KNOWN_FLAGS or reserved:
        raise IntegrityError(f"{name}: unknown header (version or kind {found_byte4}, "
                             f"flags {flags}, reserved {reserved})")
    okm = _hkdf(keys.master_key, salt, info, 44)
    try:
        body = AESGCM(okm[:32]).decrypt(okm[32:], blob[CHUNK_HEADER.size:],
                                        blob[:CHUNK_HEADER.size] + binding)
    except InvalidTag:
        raise IntegrityError(
            f"{name}: authentication failed (corrupted, truncated, moved or foreign)"
        ) from None
    plain = _inflate(body, limit, name) if flags & FLAG_ZSTD else body
    if len(plain) > limit or (exact and len(plain) != limit):
        expected = f"expected {limit}" if exact else f"expected at most {limit}"
        raise IntegrityError(f"{name}: holds {len(plain)} bytes, {expected}")
    return plain


def _inflate(body: bytes, limit: int, name: str) -> bytes:
    """The zstd frame body decompressed, never allocating much more than limit: a frame
    that declares no content size is read as a stream, one that declares too much is
    refused before anything is allocated."""
    try:
        size = zstandard.get_frame_parameters(body).content_size
        if size == zstandard.CONTENTSIZE_UNKNOWN:
            with zstandard.ZstdDecompressor().stream_reader(body) as reader:
                parts, total = [], 0
                while total <= limit and (part := reader.read(min(limit + 1 - total,
                                                                  2**24))):
                    parts.append(part)
                    total += len(part)
            return b"".join(parts)
        if size > limit:
            raise IntegrityError(f"{name}: holds {size} bytes, expected at most {limit}")
        return zstandard.ZstdDecompressor().decompress(body)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{name}: bad compressed data: {exc}") from None


# -- version 1 and 2: chunk objects chunks/<N> ---------------------------------------------

def _chunk_binding(keys: VolumeKeys, index: int) -> tuple[bytes, bytes]:
    """HKDF info and associated-data tail of chunk index: bind volume and index."""
    binding = keys.volume_id + _INDEX.pack(index)
    return _CHUNK_INFO + binding, binding


def encode_chunk(keys: VolumeKeys, index: int, plain: bytes | bytearray | memoryview,
                 level: int = DEFAULT_ZSTD_LEVEL, salt: bytes | None = None) -> bytearray:
    """Compress (when it helps) and encrypt one chunk for storage as its object.

    salt is only for known-answer tests; production callers leave it random.
    """
    info, binding = _chunk_binding(keys, index)
    return _seal(keys, CHUNK_MAGIC, CHUNK_VERSION, info, binding, plain, level, salt)


def decode_chunk(keys: VolumeKeys, index: int, blob: bytes, chunk_size: int) -> bytes:
    """Authenticate, decrypt and decompress one chunk object; IntegrityError if it is bad."""
    info, binding = _chunk_binding(keys, index)
    return _unseal(keys, CHUNK_MAGIC, CHUNK_VERSION, info, binding, blob, chunk_size,
                   True, f"chunk {index}")


# -- version 3: sealed objects (chunks/<N>-<S>, map/<P>-<S>, journal/<S>) -----------------
# What the kinds and idents mean is cloudnbd/layout.py's business; here they are bytes.

def seal_object(keys: VolumeKeys, kind: int, ident: bytes,
                plain: bytes | bytearray | memoryview, level: int = DEFAULT_ZSTD_LEVEL,
                salt: bytes | None = None) -> bytearray:
    """A version-3 sealed object of kind, bound to its volume and ident (its key's
    numbers). salt is only for known-answer tests."""
    return _seal(keys, OBJECT_MAGIC, kind, _OBJECT_INFO + keys.volume_id + bytes([kind])
                 + ident, keys.volume_id + ident, plain, level, salt)


def unseal_object(keys: VolumeKeys, kind: int, ident: bytes, blob: bytes, limit: int,
                  exact: bool, name: str) -> bytes:
    """The plain body of a sealed object (at most limit bytes, exactly limit if exact);
    IntegrityError naming it (name) if it is not that object of this volume."""
    return _unseal(keys, OBJECT_MAGIC, kind, _OBJECT_INFO + keys.volume_id + bytes([kind])
                   + ident, keys.volume_id + ident, blob, limit, exact, name)


_zero_buffers: dict[int, bytes] = {}


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte of data is zero (a memcmp against a cached zero buffer)."""
    zeros = _zero_buffers.get(len(data))
    if zeros is None:
        zeros = bytes(len(data))
        if len(data) <= 64 * 2**20:
            _zero_buffers[len(data)] = zeros
    return data == zeros if not isinstance(data, memoryview) else bytes(data) == zeros


# -- key slots ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ScryptParams:
    """scrypt parameters of a key slot (memory use is 128 * n * r bytes). Slots of this
    kind are still opened; new slots use Argon2idParams."""

    n: int = 2**17
    r: int = 8
    p: int = 1

    name: ClassVar[str] = "scrypt"
    aad_label: ClassVar[bytes] = _SLOT_AAD

    def derive(self, password: str, salt: bytes) -> bytes:
        return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=self.n, r=self.r,
                              p=self.p, maxmem=129 * self.n * self.r * self.p + 2**20,
                              dklen=32)

    def fields(self) -> dict[str, int | str]:
        """The slot's KDF fields in volume.json."""
        return {"kdf": self.name, "n": self.n, "r": self.r, "p": self.p}

    def aad_params(self) -> bytes:
        return struct.pack(">III", self.n, self.r, self.p)

    def __str__(self) -> str:
        return f"scrypt n={self.n} r={self.r} p={self.p}"


@dataclass(frozen=True)
class Argon2idParams:
    """Argon2id (RFC 9106, version 0x13) parameters of a key slot: memory in KiB, passes
    over it, lanes. kdf.calibrate() chooses them for new slots, as LUKS2 does."""

    memory_kib: int
    iterations: int
    lanes: int = 4

    name: ClassVar[str] = "argon2id"
    aad_label: ClassVar[bytes] = _ARGON2ID_SLOT_AAD

    def derive(self, password: str, salt: bytes) -> bytes:
        try:
            kdf = Argon2id(salt=salt, length=32, iterations=self.iterations,
                           lanes=self.lanes, memory_cost=self.memory_kib)
            return kdf.derive(password.encode("utf-8"))
        except MemoryError:
            raise CloudnbdError(f"not enough memory to derive the key ({self}); the key "
                                f"slot was made on a machine with more") from None
        except UnsupportedAlgorithm:
            raise CloudnbdError("this build of the cryptography package has no Argon2id "
                                "(it needs OpenSSL 3.2 or later)") from None

    def fields(self) -> dict[str, int | str]:
        return {"kdf": self.name, "memory_kib": self.memory_kib,
                "iterations": self.iterations, "lanes": self.lanes}

    def aad_params(self) -> bytes:
        return struct.pack(">III", self.memory_kib, self.iterations, self.lanes)

    def __str__(self) -> str:
        memory = (f"{self.memory_kib // 1024} MiB" if self.memory_kib % 1024 == 0
                  else f"{self.memory_kib} KiB")
        passes = "pass" if self.iterations == 1 else "passes"
        return f"Argon2id {memory}, {self.iterations} {passes}, {self.lanes} lanes"


KdfParams = ScryptParams | Argon2idParams


@dataclass(frozen=True)
class KeySlot:
    """The master key, wrapped under a key derived from one password."""

    slot: int
    kdf: KdfParams
    salt: bytes
    nonce: bytes
    wrapped_key: bytes

    def binding(self, volume_id: bytes) -> bytes:
        """Associated data: ties the slot to its volume and its own KDF parameters."""
        return (self.kdf.aad_label + volume_id + struct.pack(">I", self.slot)
                + self.kdf.aad_params() + self.salt)


def wrap_master_key(slot: int, password: str, master_key: bytes, volume_id: bytes,
                    kdf: KdfParams, salt: bytes | None = None,
                    nonce: bytes | None = None) -> KeySlot:
    """Make a key slot that password opens. salt and nonce are only for known-answer
    tests; production callers leave them random."""
    salt = os.urandom(16) if salt is None else salt
    nonce = os.urandom(12) if nonce is None else nonce
    draft = KeySlot(slot, kdf, salt, nonce, b"")
    wrapping_key = kdf.derive(password, salt)
    wrapped = AESGCM(wrapping_key).encrypt(nonce, master_key, draft.binding(volume_id))
    return KeySlot(slot, kdf, salt, nonce, wrapped)


def unwrap_master_key(slot: KeySlot, password: str, volume_id: bytes) -> bytes:
    """The master key from slot, or WrongPassword."""
    wrapping_key = slot.kdf.derive(password, slot.salt)
    try:
        key = AESGCM(wrapping_key).decrypt(slot.nonce, slot.wrapped_key,
                                           slot.binding(volume_id))
    except InvalidTag:
        raise WrongPassword("wrong password") from None
    if len(key) != MASTER_KEY_BYTES:
        raise IntegrityError("key slot holds a key of the wrong length")
    return key


def canonical(document: dict[str, Any]) -> bytes:
    """The bytes a JSON object's MAC is computed over (volume.json and the head; see
    docs/format.md): members sorted, no whitespace, ASCII only."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii")


def _mac(key: bytes, canonical: bytes) -> str:
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def metadata_mac(keys: VolumeKeys, canonical: bytes) -> str:
    """Hex HMAC-SHA256 of the canonical metadata bytes."""
    return _mac(keys.metadata_key, canonical)


def verify_metadata_mac(keys: VolumeKeys, canonical: bytes, mac: str) -> None:
    if not hmac.compare_digest(metadata_mac(keys, canonical), mac):
        raise IntegrityError("volume metadata failed authentication: it was modified")


def head_mac(keys: VolumeKeys, canonical: bytes) -> str:
    """Hex HMAC-SHA256 of a head's canonical bytes (version 3)."""
    return _mac(keys.head_mac_key, canonical)


def snapshot_mac(keys: VolumeKeys, canonical: bytes) -> str:
    """Hex HMAC-SHA256 of a snapshot's canonical bytes (version 3)."""
    return _mac(keys.snapshot_mac_key, canonical)
