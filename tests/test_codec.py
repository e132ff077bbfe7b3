"""The chunk codec and key wrapping: round trips, tampering, and known answers."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudnbd import codec
from cloudnbd.codec import VolumeKeys
from cloudnbd.errors import IntegrityError, WrongPassword

pytestmark = pytest.mark.unit  # in-process: no servers, no subprocesses

CHUNK = 64 * 1024
KEYS = VolumeKeys(bytes(range(16)), bytes(range(32, 64)))


def test_compressible_chunk_is_compressed_and_round_trips() -> None:
    plain = b"backup " * (CHUNK // 7) + bytes(CHUNK % 7)
    blob = codec.encode_chunk(KEYS, 3, plain)
    assert blob[5] & codec.FLAG_ZSTD
    assert len(blob) < CHUNK // 10
    assert codec.decode_chunk(KEYS, 3, blob, CHUNK) == plain


def test_incompressible_chunk_is_stored_plain_with_fixed_overhead() -> None:
    plain = os.urandom(CHUNK)
    blob = codec.encode_chunk(KEYS, 3, plain)
    assert blob[5] == 0
    assert len(blob) == CHUNK + codec.CHUNK_OVERHEAD
    assert codec.decode_chunk(KEYS, 3, blob, CHUNK) == plain


def test_every_upload_uses_a_fresh_salt() -> None:
    plain = os.urandom(CHUNK)
    first, second = codec.encode_chunk(KEYS, 1, plain), codec.encode_chunk(KEYS, 1, plain)
    assert first[8:40] != second[8:40]
    assert first[40:] != second[40:]


def _flip(blob: bytes, position: int) -> bytes:
    changed = bytearray(blob)
    changed[position] ^= 0x01
    return bytes(changed)


@pytest.mark.parametrize("position", [0, 4, 5, 6, 8, 39, 40, 100, -17, -1])
def test_flipped_bit_anywhere_is_rejected(position: int) -> None:
    blob = codec.encode_chunk(KEYS, 7, os.urandom(CHUNK))
    with pytest.raises(IntegrityError):
        codec.decode_chunk(KEYS, 7, _flip(blob, position), CHUNK)


@pytest.mark.parametrize("keep", [0, 10, 40, 55, 56, 1000, -1])
def test_truncated_object_is_rejected(keep: int) -> None:
    blob = codec.encode_chunk(KEYS, 7, os.urandom(CHUNK))
    with pytest.raises(IntegrityError):
        codec.decode_chunk(KEYS, 7, blob[:keep], CHUNK)


def test_object_moved_to_another_index_is_rejected() -> None:
    blob = codec.encode_chunk(KEYS, 7, os.urandom(CHUNK))
    with pytest.raises(IntegrityError, match="authentication failed"):
        codec.decode_chunk(KEYS, 8, blob, CHUNK)


def test_object_from_another_volume_is_rejected() -> None:
    other_same_key = VolumeKeys(os.urandom(16), KEYS.master_key)
    other_volume = VolumeKeys(os.urandom(16), os.urandom(32))
    for foreign in (other_same_key, other_volume):
        blob = codec.encode_chunk(foreign, 7, os.urandom(CHUNK))
        with pytest.raises(IntegrityError):
            codec.decode_chunk(KEYS, 7, blob, CHUNK)


def test_wrong_plain_length_is_rejected() -> None:
    blob = codec.encode_chunk(KEYS, 2, os.urandom(CHUNK))
    with pytest.raises(IntegrityError, match="expected"):
        codec.decode_chunk(KEYS, 2, blob, CHUNK * 2)


def test_keys_never_appear_in_repr() -> None:
    assert KEYS.master_key.hex() not in repr(KEYS)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=4096), st.integers(0, 2**64 - 1))
def test_round_trip_any_data_any_index(plain: bytes, index: int) -> None:
    blob = codec.encode_chunk(KEYS, index, plain)
    assert codec.decode_chunk(KEYS, index, blob, len(plain)) == plain


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=200))
def test_garbage_never_decodes(garbage: bytes) -> None:
    with pytest.raises(IntegrityError):
        codec.decode_chunk(KEYS, 0, garbage, 16)


def test_is_zero() -> None:
    assert codec.is_zero(bytes(CHUNK))
    assert codec.is_zero(memoryview(bytearray(100)))
    data = bytearray(CHUNK)
    data[-1] = 1
    assert not codec.is_zero(data)
    assert not codec.is_zero(memoryview(data)[CHUNK - 10:])


# Known answer: written once by cloudnbd 0.1 with the fixed keys above and a fixed salt.
# Decoding must keep working forever; the independent reader in test_format_reader.py
# decodes the same bytes.
KAT_SALT = bytes(range(100, 132))
KAT_PLAIN = b"cloudnbd known answer 0123456789"  # 32 bytes, stored plain (too short to shrink)
KAT_INDEX = 0x0102030405060708
KAT_BLOB_HEX = (
    "434e4263010000006465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f80818283"
    "524981d2b0495f9dc389cca8aa9ca2410530b49b3940095e3dbe8fcaa62b5061bc16e09f3d13a090"
    "f3336717fcad979e"
)


def test_known_answer_vector() -> None:
    blob = codec.encode_chunk(KEYS, KAT_INDEX, KAT_PLAIN, salt=KAT_SALT)
    assert blob.hex() == KAT_BLOB_HEX
    assert codec.decode_chunk(KEYS, KAT_INDEX, bytes.fromhex(KAT_BLOB_HEX), 32) == KAT_PLAIN


@pytest.mark.parametrize("params", [codec.ScryptParams(n=2**10),
                                    codec.Argon2idParams(memory_kib=1024, iterations=2)],
                         ids=["scrypt", "argon2id"])
def test_key_slot_opens_with_its_password_only(params: codec.KdfParams) -> None:
    master = os.urandom(32)
    slot = codec.wrap_master_key(0, "correct horse", master, KEYS.volume_id, params)
    assert codec.unwrap_master_key(slot, "correct horse", KEYS.volume_id) == master
    with pytest.raises(WrongPassword):
        codec.unwrap_master_key(slot, "wrong horse", KEYS.volume_id)
    with pytest.raises(WrongPassword):  # a slot copied to another volume does not open
        codec.unwrap_master_key(slot, "correct horse", os.urandom(16))
    for other in (replace(slot, slot=1), replace(slot, salt=os.urandom(16))):
        with pytest.raises(WrongPassword):  # nor one whose number or salt was changed
            codec.unwrap_master_key(other, "correct horse", KEYS.volume_id)


def test_argon2id_slot_binds_its_parameters() -> None:
    params = codec.Argon2idParams(memory_kib=1024, iterations=2, lanes=4)
    master = os.urandom(32)
    slot = codec.wrap_master_key(0, "pw", master, KEYS.volume_id, params)
    # weaker parameters claimed for the same wrapped key must not open it
    for weaker in (codec.Argon2idParams(512, 2, 4), codec.Argon2idParams(1024, 1, 4),
                   codec.Argon2idParams(1024, 2, 1)):
        with pytest.raises(WrongPassword):
            codec.unwrap_master_key(replace(slot, kdf=weaker), "pw", KEYS.volume_id)


def test_argon2id_is_rfc_9106() -> None:
    """The Argon2id test vector of RFC 9106, section 5.3, through the primitive that both
    cloudnbd and the independent reader use."""
    tag = Argon2id(salt=b"\x02" * 16, length=32, iterations=3, lanes=4, memory_cost=32,
                   ad=b"\x04" * 12, secret=b"\x03" * 8).derive(b"\x01" * 32)
    assert tag.hex() == "0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659"


# Known answers for key slots (docs/format.md, "Key slots"), fixed inputs below. The scrypt
# one was made by cloudnbd 0.1.0 before Argon2id existed; test_format_reader.py opens both.
KAT_SLOT_PASSWORD = "correct horse battery staple"
KAT_SLOT_NUMBER = 3
KAT_SLOT_SALT = bytes(range(200, 216))
KAT_SLOT_NONCE = bytes(range(220, 232))
KAT_SLOTS = {
    "scrypt": (codec.ScryptParams(n=2**10, r=8, p=1),
               "756e51d9d4503b39aedbf130728f63189920590ad29ef8857076c2cfb8f37a4b"
               "015c9a23cf84767b98769a943e8bd9da"),
    "argon2id": (codec.Argon2idParams(memory_kib=256, iterations=2, lanes=4),
                 "5f6f366a0da3969c2b2bd8ddcf5278bfe62efaff49749bc4f1d69853e663bb8d"
                 "29e6770939206ce89a4760027689e518"),
}


@pytest.mark.parametrize("kind", KAT_SLOTS)
def test_key_slot_known_answer(kind: str) -> None:
    params, wrapped_hex = KAT_SLOTS[kind]
    slot = codec.wrap_master_key(KAT_SLOT_NUMBER, KAT_SLOT_PASSWORD, KEYS.master_key,
                                 KEYS.volume_id, params, salt=KAT_SLOT_SALT,
                                 nonce=KAT_SLOT_NONCE)
    assert slot.wrapped_key.hex() == wrapped_hex
    assert codec.unwrap_master_key(slot, KAT_SLOT_PASSWORD, KEYS.volume_id) == \
        KEYS.master_key



def test_mostly_compressible_chunk_with_a_random_start_is_still_compressed() -> None:
    plain = os.urandom(16 * 1024) + bytes(CHUNK * 2 - 16 * 1024)
    blob = codec.encode_chunk(KEYS, 1, plain)
    assert blob[5] & codec.FLAG_ZSTD and len(blob) < CHUNK // 2
    assert codec.decode_chunk(KEYS, 1, blob, CHUNK * 2) == plain


def test_encoding_from_many_threads_at_once() -> None:
    from concurrent.futures import ThreadPoolExecutor

    chunks = [os.urandom(CHUNK // 2) + bytes(CHUNK // 2) for _ in range(32)]
    with ThreadPoolExecutor(8) as pool:
        blobs = list(pool.map(lambda i: codec.encode_chunk(KEYS, i, chunks[i]), range(32)))
    assert [codec.decode_chunk(KEYS, i, b, CHUNK) for i, b in enumerate(blobs)] == chunks
