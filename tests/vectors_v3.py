"""Known answers for format version 3 (docs/format.md, "Version 3"): a tiny volume whose
every object cloudnbd wrote once from the fixed inputs below, stored as hex.

Plain Python data only, no cloudnbd types, so that an independent reader can import it:
with VOLUME_ID and MASTER_KEY it must open every object under its key, verify HEAD, and
read IMAGE from them. tests/test_layout.py holds cloudnbd to the same bytes. An object
whose flags byte (offset 5) is 0 is stored plain and is reproduced byte for byte from its
salt; a compressed one (the map page, the journal objects) depends on the zstd version
for writing, never for reading.

The volume: CHUNK_SIZE 64 (no real volume's size, but the layout does not care), SIZE
256, so four chunks, all in map page 0. Chunk 0 starts as object A (stamp 1, the upgrade
stamp, holding the writes up to seq 2), chunk 2 as zeros up to seq 3, chunk 3 as object
C. Journal J1 holds a stale write to chunk 2 (seq 3, not above its base seq, so dropped),
writes of seq 4 and 6, and a zero of seq 5 across chunks 0 and 1. J2 says chunk 0 became
object B at seq 4 (an upload that finished after the zero of seq 5 was journaled: the
zero stays over it), then writes to chunk 3 at seq 7.
"""

from __future__ import annotations

VOLUME_ID = bytes(range(16))
MASTER_KEY = bytes(range(32, 64))
CHUNK_SIZE = 64
SIZE = 256

PLAIN_A = bytes(range(64))
PLAIN_B = PLAIN_A[:10] + b"known answer" + PLAIN_A[22:]  # A with the write of seq 4
PLAIN_C = bytes(range(128, 192))

#: chunk objects: (index, stamp, plain, salt, key, sealed object as hex); all stored plain
CHUNKS = [
    (0, 1, PLAIN_A, bytes(range(100, 132)), "chunks/0000000000000000-0000000000000001",
     "434e4233010000006465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f80818283d89f"
     "3429ffe3dc5527bf236b9ed41e1a7aaee01f1aba2294bae455a68da159c1cb3090e78b97b802e7f09f4c"
     "54aafad80c776d00a83a9246cecdc502a49f64ed3180ae6ebe607582547d90f7a902bdfe"),
    (0, 7 * 2**32 + 2, PLAIN_B, bytes(range(164, 196)),
     "chunks/0000000000000000-0000000700000002",
     "434e423301000000a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c37d2e"
     "f57068e925425d50c82cf51d5bdd3041dba4637f3f309054aff194e88c08bb1a4ce5bd1f72451970b43b"
     "af0f0ec6164590ca426313c9e6d48e2c7c0a55ce53a8daba7d02f804235895eef076f4ac"),
    (3, 1, PLAIN_C, bytes(range(196, 228)), "chunks/0000000000000003-0000000000000001",
     "434e423301000000c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3a239"
     "039794ec6a8227cd94e36fd3d0e4afd06aeaea425b023514c0ed951a5947d8e38d16979ef602e170cfd8"
     "eb6725c7ea805586505232b02e3c7ce418fc8d8d07c619c1715ca1f184429c27ed2b375f"),
]

#: map page 0 under stamp 1; its entries that are not (0, 0): index -> (stamp, seq)
MAP_PAGE, MAP_STAMP = 0, 1
MAP_ENTRIES = {0: (1, 2), 2: (0, 3), 3: (1, 1)}
MAP_SALT = bytes(range(132, 164))
MAP_KEY = "map/0000000000000000-0000000000000001"
MAP_HEX = (
    "434e4233020100008485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3b851"
    "e71bde2908a25145ac6d3edf0a46a92e9b337e8fadee9a3c354acc944d91dcc4b65acc5a5a6326fc6784"
    "b862405740a1e5448c57"
)

#: journal objects in the head's order: (stamp, records, salt, key, sealed hex), records
#: as ("write", seq, offset, data), ("zero", seq, offset, length), ("chunk", seq, index,
#: stamp)
JOURNALS: list[tuple[int, list[tuple[str, int, int, int | bytes]], bytes, str, str]] = [
    (7 * 2**32 + 1,
     [("write", 3, 128, b"stale"), ("write", 4, 10, b"known answer"), ("zero", 5, 60, 8),
      ("write", 6, 130, b"fresh")],
     bytes(range(1, 33)), "journal/0000000700000001",
     "434e4233030100000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20905a"
     "67d59acf3ded2b0563d583d3d14cc1880815b41669d0ca04da3ca66562e5fb9586540e992dcbefabac97"
     "58fb674dbf588eff1937fb305133de0d4cd0fad214226d9f89812e1504882bbe32d763be4fe76651e0e3"
     "112cf9671b443bf64ac3eb242f"),
    (7 * 2**32 + 3,
     [("chunk", 4, 0, 7 * 2**32 + 2), ("write", 7, 200, b"tail")],
     bytes(range(33, 65)), "journal/0000000700000003",
     "434e4233030100002122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f4050da"
     "d33f985f5ba1fd8d303d1520705fcfae4cdc7207eee4719c2b50e40a47fe2eda67b6ad7bd3ceae6d50da"
     "b62f13298c132c1de7f483d36164"),
]

#: the head, as volume.json's "head": "head-0123456789abcdef" would name it
HEAD_KEY_ID = "0123456789abcdef"
HEAD_GENERATION, HEAD_EPOCH, HEAD_SEQ = 3, 7, 7
HEAD_WRITTEN = "2025-01-02T03:04:05Z"
HEAD = (
    b'{"epoch":7,"format":"cloudnbd-head","generation":3,"journal":[["0000000700000001",3,'
    b'6,139],["0000000700000003",4,7,98]],"mac":"9585b54ceada42d15fd9e14a428782f7bd285227'
    b'6013dec6f44c1b06e9551ee8","map":[[0,"0000000000000001"]],"seq":7,"volume_id":"00010'
    b'2030405060708090a0b0c0d0e0f","written":"2025-01-02T03:04:05Z"}\n'
)

#: the volume's SIZE bytes as the head names them
IMAGE_HEX = (
    "000102030405060708096b6e6f776e20616e73776572161718191a1b1c1d1e1f20212223242526272829"
    "2a2b2c2d2e2f303132333435363738393a3b000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000006672657368000000000000000000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000080818283848586877461696c8c8d8e8f9091"
    "92939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babb"
    "bcbdbebf"
)
