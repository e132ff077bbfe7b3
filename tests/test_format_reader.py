"""An independent reader of the on-cloud format, written from docs/format.md alone.

It shares no code with cloudnbd: HKDF is spelled out from RFC 5869, the canonical JSON and
every binding are rebuilt from the document. If cloudnbd and docs/format.md drift apart,
these tests fail.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from base64 import b64decode, b64encode
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from cloudnbd import volume as cloudnbd_volume
from cloudnbd.backends.file import FileStore
from cloudnbd.codec import Argon2idParams, ScryptParams
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

pytestmark = pytest.mark.unit  # in-process: no servers, no subprocesses


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


def read_volume(root: Path, password: str) -> bytes:
    """The whole volume's bytes, read as docs/format.md says."""
    doc = json.loads((root / "volume.json").read_bytes())
    assert doc["format"] == "cloudnbd-volume" and doc["version"] in (1, 2)
    assert doc["cipher"] == "aes-256-gcm" and doc["compression"] == "zstd"
    master_key = open_master_key(doc, password)
    verify_mac(doc, master_key)
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


def test_independent_reader_decodes_the_known_answer() -> None:
    blob = bytes.fromhex(KAT_BLOB_HEX)
    assert decrypt_chunk(blob, KEYS.master_key, KEYS.volume_id, KAT_INDEX, 32) == KAT_PLAIN


def test_independent_reader_reads_a_volume_cloudnbd_wrote(tmp_path: Path) -> None:
    chunk = 64 * 1024
    store = FileStore(tmp_path / "vol")
    vol = cloudnbd_volume.create(store, 5 * chunk - 4096 * 3, chunk, "s3cret",
                                 ScryptParams(n=2**10))
    vol.add_password("second", ScryptParams(n=2**10))
    expected = bytearray(vol.meta.size)
    contents = {0: os.urandom(chunk), 2: b"compressible " * (chunk // 13) + bytes(chunk % 13),
                4: os.urandom(chunk)}
    for index, plain in contents.items():
        vol.write_chunk(index, plain)
        start = index * chunk
        expected[start:start + chunk] = plain[: vol.meta.size - start]
    # Both passwords open it, and what the independent reader sees is what was written.
    assert read_volume(tmp_path / "vol", "s3cret") == bytes(expected)
    assert read_volume(tmp_path / "vol", "second") == bytes(expected)
    stored = sorted(p.name for p in (tmp_path / "vol" / "chunks").iterdir())
    assert stored == ["0000000000000000", "0000000000000002", "0000000000000004"]


@pytest.mark.parametrize("kind", KAT_SLOTS)
def test_independent_reader_opens_the_known_answer_key_slots(kind: str) -> None:
    params, wrapped_hex = KAT_SLOTS[kind]
    slot = {"slot": KAT_SLOT_NUMBER, **params.fields(),
            "salt": b64encode(KAT_SLOT_SALT).decode(),
            "nonce": b64encode(KAT_SLOT_NONCE).decode(),
            "wrapped_key": b64encode(bytes.fromhex(wrapped_hex)).decode()}
    doc = {"version": 2, "volume_id": KEYS.volume_id.hex(), "key_slots": [slot]}
    assert open_master_key(doc, KAT_SLOT_PASSWORD) == KEYS.master_key


def test_independent_reader_reads_argon2id_and_scrypt_slots_cloudnbd_wrote(
        tmp_path: Path) -> None:
    chunk = 64 * 1024
    store = FileStore(tmp_path / "vol")
    vol = cloudnbd_volume.create(store, 2 * chunk, chunk, "old", ScryptParams(n=2**10))
    vol.add_password("new", Argon2idParams(memory_kib=1024, iterations=2))
    vol.write_chunk(1, os.urandom(chunk))
    doc = json.loads((tmp_path / "vol" / "volume.json").read_bytes())
    assert doc["version"] == 2
    assert [s["kdf"] for s in doc["key_slots"]] == ["scrypt", "argon2id"]
    assert read_volume(tmp_path / "vol", "new") == read_volume(tmp_path / "vol", "old")
    # with the Argon2id slot gone, the volume is version 1 again: older readers read it
    cloudnbd_volume.unlock(store, "old").remove_slot(1)
    assert json.loads((tmp_path / "vol" / "volume.json").read_bytes())["version"] == 1
