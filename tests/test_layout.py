"""Format version 3's pure layer (cloudnbd/layout.py): keys, sealed objects, the head, and
the image a head names, against tampering, a brute-force model and known answers."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import zstandard
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cloudnbd import codec, layout
from cloudnbd.codec import VolumeKeys
from cloudnbd.errors import IntegrityError, UnsupportedFormat
from cloudnbd.layout import (
    PAGE_CHUNKS,
    ChunkSource,
    Entry,
    Head,
    ImageBuilder,
    JChunk,
    JournalBuilder,
    JournalRef,
    JWrite,
    JZero,
    Kind,
    Overlay,
    Record,
)
from tests import vectors_v3 as kat

pytestmark = pytest.mark.unit  # in-process: no servers, no subprocesses

KEYS = VolumeKeys(kat.VOLUME_ID, kat.MASTER_KEY)
OTHER_VOLUME = VolumeKeys(bytes(range(100, 116)), os.urandom(32))
SAME_ID_OTHER_KEY = VolumeKeys(KEYS.volume_id, os.urandom(32))  # after a rekey
CHUNK = 64 * 1024
S1, S2 = layout.stamp(5, 1), layout.stamp(5, 2)
U64 = st.integers(0, 2**64 - 1)


def _flip(blob: bytes | bytearray, position: int) -> bytes:
    changed = bytearray(blob)
    changed[position] ^= 0x01
    return bytes(changed)


def _entries(**nonzero: Entry) -> list[Entry]:
    entries = [layout.ZERO_ENTRY] * PAGE_CHUNKS
    for index, entry in nonzero.items():
        entries[int(index.lstrip("c"))] = entry
    return entries


def _journal(*records: Record) -> JournalBuilder:
    builder = JournalBuilder()
    for record in records:
        if isinstance(record, JWrite):
            builder.add_write(record.seq, record.offset, record.data)
        elif isinstance(record, JZero):
            builder.add_zero(record.seq, record.offset, record.length)
        else:
            builder.add_chunk(record.seq, record.index, record.stamp)
    return builder


# -- stamps and keys ----------------------------------------------------------------------

def test_stamp_is_epoch_and_counter() -> None:
    assert layout.stamp(0, 1) == layout.UPGRADE_STAMP
    assert layout.stamp(7, 3) == 7 * 2**32 + 3
    assert layout.stamp(2**32 - 1, 2**32 - 1) == 2**64 - 1


@pytest.mark.parametrize(("epoch", "counter"),
                         [(0, 2**32), (2**32, 0), (-1, 1), (1, -1), (0, 0)])
def test_stamp_refuses_what_does_not_fit(epoch: int, counter: int) -> None:
    with pytest.raises(ValueError):
        layout.stamp(epoch, counter)


def test_keys_are_sixteen_lower_case_hex_digits() -> None:
    assert layout.chunk_key(10, S1) == "chunks/000000000000000a-0000000500000001"
    assert layout.map_key(1, 1) == "map/0000000000000001-0000000000000001"
    assert layout.journal_key(S2) == "journal/0000000500000002"
    assert layout.head_key("0123456789abcdef") == "head-0123456789abcdef"
    with pytest.raises(ValueError):
        layout.chunk_key(-1, 1)
    with pytest.raises(ValueError):
        layout.journal_key(2**64)
    for bad in ("0123456789ABCDEF", "0123456789abcde", "../0123456789abc"):
        with pytest.raises(ValueError):
            layout.head_key(bad)


def test_new_key_ids_are_random_hex() -> None:
    ids = {layout.new_key_id() for _ in range(20)}
    assert len(ids) == 20
    assert all(layout.head_key_id(layout.head_key(i)) == i for i in ids)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Kind)), U64, U64)
def test_parse_key_inverts_every_key(kind: Kind, number: int, stamp: int) -> None:
    if kind == Kind.CHUNK:
        key = layout.chunk_key(number, stamp)
    elif kind == Kind.MAP:
        key = layout.map_key(number, stamp)
    else:
        key, number = layout.journal_key(stamp), stamp
    assert layout.parse_key(key) == (kind, number, stamp)
    assert layout.owns_v3(key)


@pytest.mark.parametrize("key", [
    "chunks/0000000000000001",  # a version-1 chunk
    "chunks/000000000000000A-0000000000000001",
    "chunks/0000000000000001-0000000000000001.bak",
    "chunks/0000000000000001_0000000000000001",
    "chunks/sub/0000000000000001-0000000000000001",
    "chunks/+000000000000001-0000000000000001",
    "map/0000000000000001",
    "map/0000000000000001-000000000000001",
    "journal/0000000000000001-0000000000000001",
    "journal/00000000000000001",
    "journal/ 000000000000001",
    "head-0123456789ABCDEF",
    "head-0123456789abcdef.old",
    "sub/head-0123456789abcdef",
    "volume.json",
    "lease",
    "",
])
def test_other_keys_are_not_the_volumes(key: str) -> None:
    assert layout.parse_key(key) is None
    assert not layout.owns_v3(key)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="chunksmapjournalhead/-0123456789abcdefABCDEF_. ", max_size=50))
def test_parse_key_claims_only_canonical_keys(key: str) -> None:
    parsed = layout.parse_key(key)
    if parsed is not None:
        kind, number, stamp = parsed
        rebuilt = {Kind.CHUNK: layout.chunk_key(number, stamp),
                   Kind.MAP: layout.map_key(number, stamp),
                   Kind.JOURNAL: layout.journal_key(stamp)}[kind]
        assert rebuilt == key
    if layout.head_key_id(key) is not None:
        assert layout.head_key(layout.head_key_id(key) or "") == key
    assert layout.owns_v3(key) == (parsed is not None or layout.head_key_id(key) is not None)


# -- sealed objects: round trips ----------------------------------------------------------

def test_chunk_round_trips_compressed_and_plain() -> None:
    compressible = b"backup " * (CHUNK // 7) + bytes(CHUNK % 7)
    random_data = os.urandom(CHUNK)
    for plain, flags in ((compressible, codec.FLAG_ZSTD), (random_data, 0)):
        blob = layout.encode_chunk(KEYS, 9, S1, plain)
        assert blob[:5] == b"CNB3\x01" and blob[5] == flags
        assert layout.decode_chunk(KEYS, 9, S1, bytes(blob), CHUNK) == plain
    assert len(layout.encode_chunk(KEYS, 9, S1, random_data)) == CHUNK + 56


def test_every_object_gets_a_fresh_salt() -> None:
    plain = os.urandom(1000)
    first, second = (layout.encode_chunk(KEYS, 1, S1, plain) for _ in range(2))
    assert first[8:40] != second[8:40] and first[40:] != second[40:]


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=3000), U64, U64)
def test_chunk_round_trip_any_data_any_numbers(plain: bytes, index: int, stamp: int) -> None:
    blob = layout.encode_chunk(KEYS, index, stamp, plain)
    assert layout.decode_chunk(KEYS, index, stamp, bytes(blob), len(plain)) == plain


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.integers(0, PAGE_CHUNKS - 1), st.tuples(U64, U64), max_size=40),
       U64, st.integers(1, 2**64 - 1))
def test_map_page_round_trips(nonzero: dict[int, tuple[int, int]], page: int,
                              stamp: int) -> None:
    entries = [Entry(*nonzero.get(i, (0, 0))) for i in range(PAGE_CHUNKS)]
    blob = layout.encode_map_page(KEYS, page, stamp, entries)
    assert layout.decode_map_page(KEYS, page, stamp, bytes(blob)) == entries


def test_map_page_must_have_every_entry() -> None:
    with pytest.raises(ValueError):
        layout.encode_map_page(KEYS, 0, S1, [layout.ZERO_ENTRY] * (PAGE_CHUNKS - 1))
    with pytest.raises(ValueError):
        layout.encode_map_page(KEYS, 0, S1, _entries(c5=Entry(2**64, 1)))


_RECORD = st.one_of(
    st.builds(JWrite, st.integers(1, 50), st.integers(0, 2**63),
              st.binary(min_size=1, max_size=300)),
    st.builds(JZero, st.integers(1, 50), st.integers(0, 2**62), st.integers(1, 2**62)),
    st.builds(JChunk, st.integers(1, 2**64 - 1), U64, U64),
)


def _ordered(records: list[Record]) -> list[Record]:
    """records with the WRITE and ZERO seqs made non-decreasing, as the format asks."""
    seq, out = 0, []
    for record in records:
        if not isinstance(record, JChunk):
            seq += record.seq - 1
            record = replace(record, seq=seq + 1)
        out.append(record)
    return out


@settings(max_examples=100, deadline=None)
@given(st.lists(_RECORD, min_size=1, max_size=20).map(_ordered), U64.filter(bool))
def test_journal_round_trips(records: list[Record], stamp: int) -> None:
    builder = _journal(*records)
    blob = builder.seal(KEYS, stamp)
    assert layout.decode_journal(KEYS, stamp, bytes(blob)) == records
    ref = JournalRef(stamp, builder.first_seq, builder.last_seq, len(blob))
    assert ref.first_seq == min(r.seq for r in records)
    assert ref.last_seq == max(r.seq for r in records)
    assert layout.decode_journal(KEYS, stamp, bytes(blob), ref) == records


def test_journal_builder_counts_plain_bytes_and_copies_once() -> None:
    builder = JournalBuilder()
    data = bytearray(b"x" * 100)
    builder.add_write(1, 4096, memoryview(data))
    data[:] = b"y" * 100  # the builder took its copy when the record was added
    builder.add_zero(2, 0, 4096)
    builder.add_chunk(1, 3, S1)
    assert builder.size == (21 + 100) + 25 + 25  # docs/format.md's record layouts
    assert (layout.WRITE_HEADER_BYTES, layout.FIXED_RECORD_BYTES) == (21, 25)
    records = layout.decode_journal(KEYS, S2, bytes(builder.seal(KEYS, S2)))
    assert records == [JWrite(1, 4096, b"x" * 100), JZero(2, 0, 4096), JChunk(1, 3, S1)]


def test_journal_builder_refuses_what_readers_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    builder = JournalBuilder()
    builder.add_write(5, 0, b"a")
    for bad in (lambda: builder.add_write(4, 0, b"a"),  # seq going back
                lambda: builder.add_zero(4, 0, 1),
                lambda: builder.add_write(6, 0, b""),  # empty
                lambda: builder.add_zero(6, 0, 0),
                lambda: builder.add_write(0, 0, b"a"),  # seq 0
                lambda: builder.add_chunk(0, 0, S1),
                lambda: builder.add_zero(6, 2**64 - 1, 2)):  # past 2^64
        with pytest.raises(ValueError):
            bad()
    builder.add_chunk(1, 0, S1)  # a CHUNK record may have a lower seq
    with pytest.raises(ValueError):
        JournalBuilder().seal(KEYS, S1)  # no records
    monkeypatch.setattr(layout, "MAX_JOURNAL_BYTES", builder.size + 30)
    builder.add_write(6, 0, b"12345678")
    with pytest.raises(ValueError, match="full"):
        builder.add_write(6, 8, b"1")
    assert layout.decode_journal(KEYS, S1, bytes(builder.seal(KEYS, S1)))[-1] == \
        JWrite(6, 0, b"12345678")


# -- sealed objects: tampering ------------------------------------------------------------

def _objects() -> dict[str, tuple[Kind, bytes, bytes, int, bool]]:
    """One object of each kind: kind, ident, blob, limit, exact."""
    journal = _journal(JWrite(3, 100, os.urandom(5000)), JChunk(2, 1, S1)).seal(KEYS, S2)
    return {
        "chunk": (Kind.CHUNK, layout.chunk_ident(7, S1),
                  bytes(layout.encode_chunk(KEYS, 7, S1, os.urandom(CHUNK))), CHUNK, True),
        "map": (Kind.MAP, layout.map_ident(2, S1),
                bytes(layout.encode_map_page(KEYS, 2, S1, _entries(c3=Entry(S1, 4)))),
                layout.PAGE_BYTES, True),
        "journal": (Kind.JOURNAL, layout.journal_ident(S2), bytes(journal),
                    layout.MAX_JOURNAL_BYTES, False),
    }


OBJECTS = _objects()


@pytest.mark.parametrize("name", OBJECTS)
@pytest.mark.parametrize("position", [0, 3, 4, 5, 6, 7, 8, 39, 40, 41, -17, -16, -1])
def test_a_flipped_bit_anywhere_is_refused(name: str, position: int) -> None:
    kind, ident, blob, limit, exact = OBJECTS[name]
    with pytest.raises(IntegrityError, match=layout.object_key(kind, ident)):
        layout.unseal(KEYS, kind, ident, _flip(blob, position), limit, exact)


@pytest.mark.parametrize("name", OBJECTS)
@pytest.mark.parametrize("keep", [0, 4, 39, 40, 55, 56, 57, -1])
def test_a_truncated_object_is_refused(name: str, keep: int) -> None:
    kind, ident, blob, limit, exact = OBJECTS[name]
    with pytest.raises(IntegrityError):
        layout.unseal(KEYS, kind, ident, blob[:keep], limit, exact)


@pytest.mark.parametrize("name", OBJECTS)
def test_an_object_of_another_kind_is_refused(name: str) -> None:
    kind, _, blob, _, _ = OBJECTS[name]
    for other in Kind:
        if other != kind:
            other_ident = (layout.journal_ident(S2) if other == Kind.JOURNAL
                           else layout.chunk_ident(7, S1))
            with pytest.raises(IntegrityError, match="unknown header"):
                layout.unseal(KEYS, other, other_ident, blob, 2**30, False)


def test_an_object_renamed_to_another_number_or_stamp_is_refused() -> None:
    chunk = bytes(layout.encode_chunk(KEYS, 7, S1, os.urandom(1000)))
    for index, stamp in ((8, S1), (7, S2), (2**63 + 7, S1), (S1, 7)):
        with pytest.raises(IntegrityError, match="authentication failed"):
            layout.decode_chunk(KEYS, index, stamp, chunk, 1000)
    page = bytes(layout.encode_map_page(KEYS, 2, S1, _entries()))
    for number, stamp in ((3, S1), (2, S2)):
        with pytest.raises(IntegrityError, match="authentication failed"):
            layout.decode_map_page(KEYS, number, stamp, page)
    journal = bytes(_journal(JZero(1, 0, 10)).seal(KEYS, S1))
    with pytest.raises(IntegrityError, match="authentication failed"):
        layout.decode_journal(KEYS, S2, journal)


def test_an_object_of_another_volume_is_refused() -> None:
    for foreign in (OTHER_VOLUME, SAME_ID_OTHER_KEY, VolumeKeys(OTHER_VOLUME.volume_id,
                                                               KEYS.master_key)):
        chunk = bytes(layout.encode_chunk(foreign, 7, S1, os.urandom(1000)))
        with pytest.raises(IntegrityError, match="authentication failed"):
            layout.decode_chunk(KEYS, 7, S1, chunk, 1000)
        page = bytes(layout.encode_map_page(foreign, 0, S1, _entries()))
        with pytest.raises(IntegrityError, match="authentication failed"):
            layout.decode_map_page(KEYS, 0, S1, page)


def test_a_version_one_chunk_is_not_a_version_three_chunk() -> None:
    old = bytes(codec.encode_chunk(KEYS, 7, os.urandom(1000)))
    with pytest.raises(IntegrityError, match="not a cloudnbd object"):
        layout.decode_chunk(KEYS, 7, S1, old, 1000)
    new = bytes(layout.encode_chunk(KEYS, 7, S1, os.urandom(1000)))
    with pytest.raises(IntegrityError):
        codec.decode_chunk(KEYS, 7, new, 1000)


def test_a_wrong_plain_size_is_refused() -> None:
    chunk = bytes(layout.encode_chunk(KEYS, 7, S1, bytes(1000)))  # compressed
    for size in (999, 1001):
        with pytest.raises(IntegrityError, match="expected"):
            layout.decode_chunk(KEYS, 7, S1, chunk, size)
    short_page = bytes(layout.seal(KEYS, Kind.MAP, layout.map_ident(0, S1),
                                   bytes(layout.PAGE_BYTES - 16)))
    with pytest.raises(IntegrityError, match="expected 65536"):
        layout.decode_map_page(KEYS, 0, S1, short_page)
    body = _journal(JWrite(1, 0, os.urandom(100)))
    blob = bytes(body.seal(KEYS, S1))
    with pytest.raises(IntegrityError, match="at most 50"):
        layout.unseal(KEYS, Kind.JOURNAL, layout.journal_ident(S1), blob, 50, False)


def test_a_frame_without_content_size_is_bounded_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """zstd frames may omit their size; the reader then streams, and still stops at the
    limit instead of allocating what the frame would expand to."""
    monkeypatch.setattr(codec, "_compressor", lambda level: zstandard.ZstdCompressor(
        level=level, write_content_size=False))
    frame = codec._compressor(3).compress(bytes(100))
    assert zstandard.get_frame_parameters(frame).content_size == zstandard.CONTENTSIZE_UNKNOWN
    blob = bytes(layout.encode_chunk(KEYS, 1, S1, bytes(CHUNK)))
    assert blob[5] == codec.FLAG_ZSTD
    assert layout.decode_chunk(KEYS, 1, S1, blob, CHUNK) == bytes(CHUNK)
    for limit in (CHUNK - 1, CHUNK + 1):
        with pytest.raises(IntegrityError, match="expected"):
            layout.decode_chunk(KEYS, 1, S1, blob, limit)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(list(Kind)))
def test_garbage_never_unseals(garbage: bytes, kind: Kind) -> None:
    ident = layout.journal_ident(S1) if kind == Kind.JOURNAL else layout.chunk_ident(0, S1)
    with pytest.raises(IntegrityError):
        layout.unseal(KEYS, kind, ident, garbage, 100, False)


# -- journal objects: records -------------------------------------------------------------

def _sealed_body(body: bytes) -> bytes:
    """A journal object holding body as it is, sealed with the volume's keys: what only a
    writer with a bug (or the master key) could make."""
    return bytes(layout.seal(KEYS, Kind.JOURNAL, layout.journal_ident(S1), body))


_W = layout._WRITE
_Z = layout._ZERO


@pytest.mark.parametrize(("body", "message"), [
    (b"", "no records"),
    (_W.pack(1, 1, 0, 10) + b"123456789", "torn record at byte 0"),
    (_W.pack(1, 1, 0, 10)[:20], "torn"),
    (_Z.pack(2, 1, 0, 10) + _Z.pack(3, 1, 0, S1)[:24], "torn record at byte 25"),
    (_Z.pack(2, 1, 0, 10) + b"\x02", "torn record at byte 25"),
    (_Z.pack(4, 1, 0, 10), "unknown record kind 4"),
    (_Z.pack(2, 1, 0, 10) + b"\x00" * 25, "unknown record kind 0"),
    (_W.pack(1, 1, 0, 0), "empty"),
    (_Z.pack(2, 1, 0, 0), "empty"),
    (_Z.pack(2, 1, 2**64 - 1, 2), "past 2"),
    (_Z.pack(2, 0, 0, 1), "sequence number 0 at byte 0"),
    (_Z.pack(2, 1, 0, 1) + _Z.pack(3, 0, 0, S1), "sequence number 0 at byte 25"),
    (_Z.pack(2, 5, 0, 1) + _W.pack(1, 4, 0, 1) + b"x", "went back"),
    (_W.pack(1, 5, 0, 1) + b"x" + _Z.pack(2, 4, 0, 1), "went back"),
])
def test_a_bad_journal_body_is_refused(body: bytes, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        layout.decode_journal(KEYS, S1, _sealed_body(body))


def test_a_chunk_record_may_go_back_in_seq() -> None:
    body = _Z.pack(2, 5, 0, 1) + _Z.pack(3, 2, 0, S1) + _W.pack(1, 5, 1, 1) + b"x"
    assert layout.decode_journal(KEYS, S1, _sealed_body(body)) == \
        [JZero(5, 0, 1), JChunk(2, 0, S1), JWrite(5, 1, b"x")]


def test_a_journal_that_disagrees_with_the_head_is_refused() -> None:
    builder = _journal(JWrite(3, 0, b"abc"), JChunk(2, 0, S1))
    blob = bytes(builder.seal(KEYS, S2))
    good = JournalRef(S2, 2, 3, len(blob))
    assert layout.decode_journal(KEYS, S2, blob, good)
    for ref in (replace(good, size=len(blob) + 1), replace(good, first_seq=1),
                replace(good, last_seq=4), replace(good, stamp=S1)):
        with pytest.raises(IntegrityError, match="the head says"):
            layout.decode_journal(KEYS, S2, blob, ref)


# -- the head -----------------------------------------------------------------------------

HEAD = Head(KEYS.volume_id, generation=4, epoch=5, seq=40,
            pages=((0, S1), (3, layout.UPGRADE_STAMP)),
            journal=(JournalRef(S1 + 1, 30, 35, 4000), JournalRef(S2 + 1, 20, 40, 100)),
            written="2025-06-01T12:00:00Z")


_HEADS = st.builds(
    Head,
    volume_id=st.just(KEYS.volume_id),
    generation=st.integers(1, 2**64 - 1),
    epoch=st.integers(0, 2**32 - 1),
    seq=st.just(2**64 - 1),
    pages=st.dictionaries(st.integers(0, 2**52 - 1), st.integers(1, 2**64 - 1),
                          max_size=5).map(lambda d: tuple(sorted(d.items()))),
    journal=st.dictionaries(
        st.integers(1, 2**64 - 1),
        st.tuples(st.integers(1, 2**63), st.integers(0, 2**63 - 1), st.integers(57, 2**30)),
        max_size=5).map(lambda d: tuple(JournalRef(s, a, a + b, n)
                                        for s, (a, b, n) in d.items())),
    written=st.just("2030-12-31T23:59:59Z"),
)


@settings(max_examples=100, deadline=None)
@given(_HEADS)
def test_head_round_trips(head: Head) -> None:
    blob = layout.encode_head(KEYS, head)
    assert layout.decode_head(KEYS, blob) == head
    assert layout.peek_head(blob)["generation"] == head.generation


def test_head_is_canonical_json_with_its_mac() -> None:
    blob = layout.encode_head(KEYS, HEAD)
    doc = json.loads(blob)
    mac = doc.pop("mac")
    assert mac == codec.head_mac(KEYS, codec.canonical(doc))
    assert mac != codec.metadata_mac(KEYS, codec.canonical(doc))  # its own key
    assert doc["map"] == [[0, "0000000500000001"], [3, "0000000000000001"]]
    assert doc["journal"][1] == ["0000000500000003", 20, 40, 100]


@pytest.mark.parametrize(("field", "value"), [
    ("generation", 5), ("epoch", 6), ("seq", 41), ("written", "2025-06-01T12:00:01Z"),
    ("map", [[0, "0000000500000001"]]), ("map", [[0, "0000000500000002"], [3, "0000000000000001"]]),
    ("journal", [["0000000500000002", 30, 35, 4000]]),
    ("journal", [["0000000500000003", 20, 40, 100], ["0000000500000002", 30, 35, 4000]]),
    ("mac", "0" * 64), ("mac", 7), ("mac", None), ("extra", 1),
])
def test_a_changed_head_fails_its_mac(field: str, value: object) -> None:
    doc = json.loads(layout.encode_head(KEYS, HEAD))
    if value is None:
        del doc[field]
    else:
        doc[field] = value
    with pytest.raises(IntegrityError, match="failed authentication"):
        layout.decode_head(KEYS, json.dumps(doc).encode())


def test_a_head_of_another_volume_is_refused() -> None:
    foreign = replace(HEAD, volume_id=OTHER_VOLUME.volume_id)
    with pytest.raises(IntegrityError, match="another volume"):
        layout.decode_head(KEYS, layout.encode_head(OTHER_VOLUME, foreign))
    # its volume id changed to ours: the MAC, under another key, still fails
    doc = json.loads(layout.encode_head(OTHER_VOLUME, foreign))
    doc["volume_id"] = KEYS.volume_id.hex()
    with pytest.raises(IntegrityError, match="failed authentication"):
        layout.decode_head(KEYS, json.dumps(doc).encode())
    # the same volume id under another master key (before or after a rekey)
    with pytest.raises(IntegrityError, match="failed authentication"):
        layout.decode_head(KEYS, layout.encode_head(SAME_ID_OTHER_KEY, HEAD))
    with pytest.raises(ValueError):
        layout.encode_head(KEYS, foreign)


def test_a_head_with_a_valid_mac_but_malformed_fields_is_refused() -> None:
    """What only a writer with a bug could make: refused, not crashed on."""
    good = json.loads(layout.encode_head(KEYS, HEAD))
    for field, value in (("map", [[3, "0000000000000001"], [0, "0000000500000001"]]),
                         ("map", [[0, "000000050000000G"]]), ("map", [[0, 5]]),
                         ("map", [[0, "0000000000000000"]]), ("map", {"0": "x"}),
                         ("journal", [["0000000500000002", 35, 30, 4000]]),  # backwards
                         ("journal", [["0000000500000002", 30, 35, 4000]] * 2),
                         ("journal", [["0000000500000002", 30, 35]]),
                         ("generation", 0), ("generation", True), ("seq", -1),
                         ("epoch", 2**32), ("written", "yesterday"), ("seq", "40")):
        doc = {**good, field: value}
        del doc["mac"]
        doc["mac"] = codec.head_mac(KEYS, codec.canonical(doc))
        with pytest.raises(IntegrityError, match="malformed"):
            layout.decode_head(KEYS, json.dumps(doc).encode())


@pytest.mark.parametrize(("blob", "error"), [
    (b"", IntegrityError), (b"\xff\xfe", IntegrityError), (b"[1, 2]", IntegrityError),
    (b'{"format": "cloudnbd-volume"}', UnsupportedFormat), (b"{}", UnsupportedFormat),
])
def test_something_else_is_not_a_head(blob: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        layout.peek_head(blob)
    with pytest.raises(error):
        layout.decode_head(KEYS, blob)


def test_peek_head_reads_without_keys() -> None:
    doc = layout.peek_head(layout.encode_head(KEYS, HEAD))
    assert doc["volume_id"] == KEYS.volume_id.hex() and doc["seq"] == 40


@pytest.mark.parametrize("change", [
    {"pages": ((3, S1), (0, S1))}, {"pages": ((0, S1), (0, S2))}, {"pages": ((0, 0),)},
    {"generation": 0}, {"epoch": 2**32}, {"seq": -1}, {"written": "2025-06-01 12:00:00"},
    {"journal": (JournalRef(S1, 1, 2, 100),) * 2}, {"volume_id": b"short"},
])
def test_a_head_readers_would_refuse_cannot_be_made(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        replace(HEAD, **change)


@pytest.mark.parametrize("fields", [(0, 1, 1, 100), (S1, 0, 1, 100), (S1, 2, 1, 100),
                                    (S1, 1, 1, 56), (S1, 1, 1, 2**31)])
def test_a_malformed_journal_ref_cannot_be_made(fields: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        JournalRef(*fields)


# -- the image a head names ---------------------------------------------------------------

def _object_plain(index: int, stamp: int, chunk_size: int) -> bytes:
    """Contents of the (imaginary) object chunks/<index>-<stamp>: distinct, never zero."""
    return bytes((index * 31 + stamp * 7 + i) % 251 + 1 for i in range(chunk_size))


def _model_image(chunk_size: int, size: int, pages: dict[int, list[Entry]],
                 journals: list[list[Record]]) -> bytes:
    """The image by the format's rules, byte by byte: a chunk's base is the map entry or
    CHUNK record with the highest seq (the first of equals); a byte is that of the write
    with the highest seq covering it if that seq is above the base's, else the base's."""
    count = -(-size // chunk_size)
    base: dict[int, tuple[int, int]] = {}
    for page, entries in pages.items():
        for i, entry in enumerate(entries):
            if page * PAGE_CHUNKS + i < count:
                base[page * PAGE_CHUNKS + i] = (entry.seq, entry.stamp)
    best_seq = [0] * size
    best_byte = bytearray(size)
    for records in journals:
        for record in records:
            if isinstance(record, JChunk):
                if record.index < count and record.seq > base.get(record.index, (0, 0))[0]:
                    base[record.index] = (record.seq, record.stamp)
                continue
            data = record.data if isinstance(record, JWrite) else None
            length = len(data) if data is not None else record.length
            for at in range(record.offset, min(record.offset + length, size)):
                best_seq[at] = record.seq
                best_byte[at] = data[at - record.offset] if data is not None else 0
    image = bytearray(size)
    touched = {at // chunk_size for at in range(size) if best_seq[at]}
    for index in touched | set(base):
        seq, stamp = base.get(index, (0, 0))
        plain = _object_plain(index, stamp, chunk_size) if stamp else bytes(chunk_size)
        for at in range(index * chunk_size, min((index + 1) * chunk_size, size)):
            image[at] = best_byte[at] if best_seq[at] > seq else plain[at % chunk_size]
    return bytes(image)


def _built_image(builder: ImageBuilder) -> bytes:
    image = bytearray(builder.chunk_count * builder.chunk_size)
    indices = []
    for index, source in builder.chunks():
        indices.append(index)
        base = _object_plain(index, source.stamp, builder.chunk_size) if source.stamp \
            else None
        assert all(o.seq > source.seq and 0 <= o.start < o.end <= builder.chunk_size
                   for o in source.overlays)
        assert [o.seq for o in source.overlays] == sorted(o.seq for o in source.overlays)
        assert builder.source(index) == source
        start = index * builder.chunk_size
        image[start:start + builder.chunk_size] = layout.materialize(
            source, base, builder.chunk_size)
    assert indices == sorted(set(indices))
    return bytes(image[:builder.size])


#: chunks near the ends of the two pages, where off-by-ones live
_HOT = [0, 1, 2, PAGE_CHUNKS - 2, PAGE_CHUNKS - 1, PAGE_CHUNKS, PAGE_CHUNKS + 1]
_STAMPS = [S1, S2, layout.UPGRADE_STAMP, 0]


@st.composite
def _volumes(draw: st.DrawFn) -> tuple[int, int, dict[int, list[Entry]], list[list[Record]]]:
    chunk_size = draw(st.sampled_from([4, 8]))
    size = draw(st.integers((PAGE_CHUNKS + 1) * chunk_size + 1,
                            (PAGE_CHUNKS + 2) * chunk_size))
    pages: dict[int, list[Entry]] = {}
    for page in draw(st.sets(st.sampled_from([0, 1, 2]))):  # page 2 lies past the end
        entries = [layout.ZERO_ENTRY] * PAGE_CHUNKS
        for index in draw(st.lists(st.sampled_from([*_HOT, 2 * PAGE_CHUNKS]), max_size=5)):
            if index // PAGE_CHUNKS == page:
                entries[index % PAGE_CHUNKS] = Entry(draw(st.sampled_from(_STAMPS)),
                                                     draw(st.integers(0, 6)))
        pages[page] = entries
    journals: list[list[Record]] = []
    seq = draw(st.integers(0, 4))
    for _ in range(draw(st.integers(0, 4))):
        records: list[Record] = []
        for _ in range(draw(st.integers(1, 8))):
            kind = draw(st.sampled_from(["write", "zero", "chunk", "write"]))
            if kind == "chunk":
                # often equal to a seq already there, sometimes above any write
                records.append(JChunk(draw(st.integers(max(1, seq - 3), seq + 2)),
                                      draw(st.sampled_from([*_HOT, PAGE_CHUNKS + 2])),
                                      draw(st.sampled_from(_STAMPS))))
                continue
            seq += draw(st.integers(0, 2))  # equal seqs: pieces of one write
            if seq == 0:
                seq = 1
            offset = max(0, draw(st.sampled_from([*_HOT, size // chunk_size])) * chunk_size
                         + draw(st.integers(-chunk_size, chunk_size)))
            length = draw(st.integers(1, 3 * chunk_size))
            if kind == "zero":
                records.append(JZero(seq, offset, length))
            else:
                records.append(JWrite(seq, offset, draw(st.binary(min_size=length,
                                                                  max_size=length))))
        journals.append(records)
    return chunk_size, size, pages, journals


def _no_overlap_within_a_seq(journals: list[list[Record]]) -> bool:
    """The format's promise for pieces of one write: they share a seq, never a byte."""
    covered: dict[int, list[tuple[int, int]]] = {}
    for record in (r for records in journals for r in records):
        if isinstance(record, JChunk):
            continue
        end = record.offset + (len(record.data) if isinstance(record, JWrite)
                               else record.length)
        spans = covered.setdefault(record.seq, [])
        if any(a < end and record.offset < b for a, b in spans):
            return False
        spans.append((record.offset, end))
    return True


@settings(max_examples=150, deadline=None)
@given(_volumes())
def test_image_builder_matches_the_byte_by_byte_model(
        volume: tuple[int, int, dict[int, list[Entry]], list[list[Record]]]) -> None:
    chunk_size, size, pages, journals = volume
    assume(_no_overlap_within_a_seq(journals))
    builder = ImageBuilder(chunk_size, size)
    for page, entries in pages.items():  # (their codec has its own tests)
        builder.set_page(page, entries)
    for number, records in enumerate(journals):
        blob = _journal(*records).seal(KEYS, S2 + number)
        builder.apply(layout.decode_journal(KEYS, S2 + number, bytes(blob)))
    assert _built_image(builder) == _model_image(chunk_size, size, pages, journals)


def test_a_late_chunk_record_keeps_the_newer_writes_over_it() -> None:
    builder = ImageBuilder(16, 64)
    builder.apply([JWrite(5, 0, b"a" * 16), JWrite(6, 4, b"bb"), JChunk(5, 0, S1),
                   JWrite(7, 8, b"c")])
    assert builder.source(0) == ChunkSource(S1, 5, (Overlay(6, 4, 6, b"bb"),
                                                     Overlay(7, 8, 9, b"c")))
    builder.apply([JChunk(6, 0, S2), JChunk(6, 0, S1)])  # equal seq: the first stays
    assert builder.source(0) == ChunkSource(S2, 6, (Overlay(7, 8, 9, b"c"),))


def test_a_trimmed_chunk_is_listed_with_its_seq() -> None:
    """Zeros up to seq s are not 'never written': a page written from chunks() must
    keep s, or a write older than s still in a named journal object would return."""
    builder = ImageBuilder(16, 64)
    builder.set_page(0, _entries(c1=Entry(0, 9), c2=Entry(S1, 3)))
    builder.apply([JChunk(10, 3, 0)])
    assert list(builder.chunks()) == [(1, ChunkSource(0, 9, ())), (2, ChunkSource(S1, 3, ())),
                                      (3, ChunkSource(0, 10, ()))]
    builder.apply([JWrite(8, 16, b"old")])  # at or below the base seq: dropped
    assert builder.source(1) == ChunkSource(0, 9, ())


def test_writes_and_entries_past_the_size_are_ignored() -> None:
    builder = ImageBuilder(16, 40)  # three chunks, the last one half inside
    builder.set_page(0, _entries(c3=Entry(S1, 1), c2=Entry(S2, 1)))
    builder.apply([JWrite(2, 36, b"12345678"), JZero(3, 48, 100), JChunk(4, 5, S1),
                   JZero(5, 2**63, 2**62)])
    assert list(builder.chunks()) == [(2, ChunkSource(S2, 1, (Overlay(2, 4, 8, b"1234"),)))]


def test_whole_chunk_writes_hide_what_they_cover() -> None:
    builder = ImageBuilder(16, 32)
    builder.apply([JWrite(1, 2, b"ab"), JWrite(2, 2, b"cd"), JWrite(3, 0, b"x")])
    assert builder.source(0).overlays == (Overlay(2, 2, 4, b"cd"), Overlay(3, 0, 1, b"x"))
    builder.apply([JZero(4, 0, 20)])
    assert builder.source(0).overlays == (Overlay(4, 0, 16, None),)
    assert builder.source(1).overlays == (Overlay(4, 0, 4, None),)


def test_image_builder_refuses_misuse() -> None:
    builder = ImageBuilder(16, 64)
    builder.set_page(0, _entries())
    with pytest.raises(ValueError):
        builder.set_page(0, _entries())  # twice
    with pytest.raises(ValueError):
        builder.set_page(1, [layout.ZERO_ENTRY])
    builder.apply([JWrite(5, 0, b"a")])
    with pytest.raises(ValueError):
        builder.set_page(1, _entries())  # after a journal
    with pytest.raises(IntegrityError, match="out of order"):
        builder.apply([JWrite(4, 0, b"a")])


def test_materialize() -> None:
    source = ChunkSource(S1, 1, (Overlay(2, 0, 2, b"ab"), Overlay(3, 1, 3, None)))
    assert layout.materialize(source, b"123456", 6) == b"a\0\x00456"
    assert layout.materialize(ChunkSource(0, 0, ()), None, 4) == bytes(4)
    for bad in ((source, None, 6), (source, b"12345", 6), (ChunkSource(0, 0, ()), b"1", 1),
                (ChunkSource(0, 0, (Overlay(1, 0, 2, b"abc"),)), None, 6)):
        with pytest.raises(ValueError):
            layout.materialize(*bad)


def test_named_keys_are_everything_the_head_names() -> None:
    head = replace(HEAD, pages=((0, S1), (1, S2)),
                   journal=(JournalRef(S1 + 5, 30, 35, 4000),))
    pages = {0: _entries(c0=Entry(S1, 1), c7=Entry(0, 3)),
             1: _entries(c1=Entry(layout.UPGRADE_STAMP, 2))}
    journals = {S1 + 5: [JWrite(31, 0, b"x"), JChunk(30, 9, S2), JChunk(35, 2, 0)]}
    assert layout.named_keys(head, pages, journals) == {
        layout.map_key(0, S1), layout.map_key(1, S2), layout.journal_key(S1 + 5),
        layout.chunk_key(0, S1), layout.chunk_key(PAGE_CHUNKS + 1, 1),
        layout.chunk_key(9, S2)}
    with pytest.raises(ValueError, match="page 1"):
        layout.named_keys(head, {0: pages[0]}, journals)
    with pytest.raises(ValueError, match="journal"):
        layout.named_keys(head, pages, {})


# -- known answers ------------------------------------------------------------------------

def _kat_records(records: list[tuple[str, int, int, int | bytes]]) -> list[Record]:
    kinds = {"write": JWrite, "zero": JZero, "chunk": JChunk}
    return [kinds[kind](seq, a, b) for kind, seq, a, b in records]


def test_known_answer_chunks() -> None:
    for index, stamp, plain, salt, key, blob_hex in kat.CHUNKS:
        assert layout.chunk_key(index, stamp) == key
        assert layout.encode_chunk(KEYS, index, stamp, plain, salt=salt).hex() == blob_hex
        assert layout.decode_chunk(KEYS, index, stamp, bytes.fromhex(blob_hex),
                                   kat.CHUNK_SIZE) == plain


def test_known_answer_map_page() -> None:
    entries = _entries(**{f"c{i}": Entry(*e) for i, e in kat.MAP_ENTRIES.items()})
    assert layout.map_key(kat.MAP_PAGE, kat.MAP_STAMP) == kat.MAP_KEY
    blob = bytes.fromhex(kat.MAP_HEX)
    assert layout.decode_map_page(KEYS, kat.MAP_PAGE, kat.MAP_STAMP, blob) == entries
    again = layout.encode_map_page(KEYS, kat.MAP_PAGE, kat.MAP_STAMP, entries,
                                   salt=kat.MAP_SALT)
    assert again[:40] == blob[:40]  # compressed: the rest depends on the zstd version


def test_known_answer_journal_objects() -> None:
    for stamp, records, salt, key, blob_hex in kat.JOURNALS:
        assert layout.journal_key(stamp) == key
        blob = bytes.fromhex(blob_hex)
        assert layout.decode_journal(KEYS, stamp, blob) == _kat_records(records)
        again = _journal(*_kat_records(records)).seal(KEYS, stamp, salt=salt)
        assert again[:40] == blob[:40]


def test_known_answer_head_and_image() -> None:
    journals = [_kat_records(records) for _, records, _, _, _ in kat.JOURNALS]
    head = Head(KEYS.volume_id, kat.HEAD_GENERATION, kat.HEAD_EPOCH, kat.HEAD_SEQ,
                ((kat.MAP_PAGE, kat.MAP_STAMP),),
                tuple(JournalRef(stamp, min(r.seq for r in recs), max(r.seq for r in recs),
                                 len(blob_hex) // 2)
                      for (stamp, _, _, _, blob_hex), recs in zip(kat.JOURNALS, journals,
                                                                  strict=True)),
                kat.HEAD_WRITTEN)
    assert layout.encode_head(KEYS, head) == kat.HEAD
    assert layout.decode_head(KEYS, kat.HEAD) == head
    assert layout.head_key(kat.HEAD_KEY_ID) == "head-" + kat.HEAD_KEY_ID

    builder = ImageBuilder(kat.CHUNK_SIZE, kat.SIZE)
    for page, page_stamp in head.pages:
        builder.set_page(page, layout.decode_map_page(KEYS, page, page_stamp,
                                                      bytes.fromhex(kat.MAP_HEX)))
    for ref, (_, _, _, _, blob_hex) in zip(head.journal, kat.JOURNALS, strict=True):
        builder.apply(layout.decode_journal(KEYS, ref.stamp, bytes.fromhex(blob_hex), ref))
    objects = {(index, stamp): bytes.fromhex(blob_hex)
               for index, stamp, _, _, _, blob_hex in kat.CHUNKS}
    image = bytearray(kat.SIZE)
    for index, source in builder.chunks():
        base = None if not source.stamp else layout.decode_chunk(
            KEYS, index, source.stamp, objects[index, source.stamp], kat.CHUNK_SIZE)
        image[index * kat.CHUNK_SIZE:(index + 1) * kat.CHUNK_SIZE] = layout.materialize(
            source, base, kat.CHUNK_SIZE)
    assert image.hex() == kat.IMAGE_HEX
