"""The extent map against a byte-by-byte model, over random write/zero/drop sequences."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudnbd.engine.extents import ChunkExtents, Extent

pytestmark = pytest.mark.unit  # in-process: no servers, no subprocesses

SIZE = 64
Op = tuple[int, int, int, int, bool, int | None]  # start, length, segment, pos, zero, drop

ops = st.lists(
    st.tuples(st.integers(0, SIZE - 1), st.integers(1, SIZE), st.sampled_from([1, 2, 3]),
              st.integers(0, 1000), st.booleans(), st.none() | st.integers(0, 40)),
    min_size=1, max_size=40)


Byte = tuple[int, int, int] | None  # seq, segment, journal position (-1 for zeros)


def _byte_view(extents: list[Extent]) -> list[Byte]:
    view: list[Byte] = [None] * SIZE
    for e in extents:
        for k in range(e.start, e.end):
            view[k] = (e.seq, e.segment, -1 if e.zero else e.pos + k - e.start)
    return view


@settings(max_examples=300, deadline=None)
@given(ops)
def test_extents_match_a_byte_model(operations: list[Op]) -> None:
    chunk = ChunkExtents()
    model: list[Byte] = [None] * SIZE
    live: dict[int, int] = {}
    for seq, (start, length, segment, pos, zero, drop) in enumerate(operations, start=1):
        end = min(SIZE, start + length)
        released: dict[int, int] = {}
        chunk.add(Extent(start, end, seq, segment, 0 if zero else pos, zero), released)
        live[segment] = live.get(segment, 0) + end - start
        for k in range(start, end):
            model[k] = (seq, segment, -1 if zero else pos + k - start)
        if drop is not None:
            chunk.drop_through(drop, released)
            model = [m if m and m[0] > drop else None for m in model]
        for seg, nbytes in released.items():
            live[seg] -= nbytes

        starts = [e.start for e in chunk.extents]
        assert starts == sorted(starts)
        assert all(a.end <= b.start for a, b in itertools.pairwise(chunk.extents))
        assert _byte_view(chunk.extents) == model
        for seg, nbytes in live.items():  # released bytes add up exactly
            assert nbytes == sum(1 for m in model if m and m[1] == seg)
        assert chunk.covers(SIZE) == all(m is not None for m in model)
        assert chunk.written == sum(1 for m in model if m is not None)
        assert chunk.max_seq == max((m[0] for m in model if m is not None), default=0)
        low, high = start // 2, max(start // 2 + 1, end)
        assert _byte_view(chunk.overlapping(low, high))[low:high] == model[low:high]
