"""Which bytes of a dirty chunk live in the journal, and where.

A ChunkExtents holds, for one chunk, non-overlapping extents sorted by start. Each says:
bytes [start, end) of the chunk are, as of journal record `seq` (kept in journal segment
`segment`), either zeros (`zero`) or the data at `pos` in that segment. A newer write
replaces the parts of older extents it covers; the bytes that are no longer referenced
are reported back per segment so the journal can tell when a segment is no longer needed
(see journal.Journal.account). Zero extents count too: their record must survive while
they are live, or a crash could bring back data that was zeroed.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass


@dataclass(slots=True)
class Extent:
    start: int
    end: int
    seq: int
    segment: int
    pos: int  # journal file position of byte `start`; 0 for zero extents
    zero: bool = False

    def cut(self, start: int, end: int) -> Extent:
        """The part [start, end) of this extent."""
        pos = 0 if self.zero else self.pos + (start - self.start)
        return Extent(start, end, self.seq, self.segment, pos, self.zero)


def _credit(released: dict[int, int], segment: int, nbytes: int) -> None:
    if nbytes:
        released[segment] = released.get(segment, 0) + nbytes


class ChunkExtents:
    """The journal extents of one chunk, with their newest seq and the bytes they cover
    kept up to date (the write-back scheduler asks for both of every dirty chunk)."""

    __slots__ = ("_starts", "extents", "max_seq", "written")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self.extents: list[Extent] = []
        self.max_seq = 0  # the newest extent's record
        self.written = 0  # bytes the extents cover

    def __len__(self) -> int:
        return len(self.extents)

    @property
    def min_seq(self) -> int:
        return min((e.seq for e in self.extents), default=0)

    def covers(self, size: int) -> bool:
        """True if the extents cover [0, size) without gaps (no base chunk is needed)."""
        position = 0
        for e in self.extents:
            if e.start != position:
                return False
            position = e.end
        return position >= size

    def add(self, new: Extent, released: dict[int, int]) -> None:
        """Insert new, trimming what it overlaps; credit overlapped bytes to released.

        Records are added in seq order under the engine lock, so new always wins.
        """
        starts, extents = self._starts, self.extents
        i = bisect_right(starts, new.start) - 1
        if i < 0 or extents[i].end <= new.start:
            i += 1
        j = i
        count = len(extents)
        if j == count or extents[j].start >= new.end:  # overlaps nothing (the usual case)
            extents.insert(i, new)
            starts.insert(i, new.start)
            self.written += new.end - new.start
            self.max_seq = max(self.max_seq, new.seq)
            return
        left = right = None  # only the first and last overlapped extents can stick out
        overlapped = 0
        while j < count and extents[j].start < new.end:
            old = extents[j]
            if old.start < new.start:
                left = old.cut(old.start, new.start)
            if old.end > new.end:
                right = old.cut(new.end, old.end)
            nbytes = min(old.end, new.end) - max(old.start, new.start)
            _credit(released, old.segment, nbytes)
            overlapped += nbytes
            j += 1
        replacement = [e for e in (left, new, right) if e is not None]
        extents[i:j] = replacement
        starts[i:j] = [e.start for e in replacement]
        self.written += new.end - new.start - overlapped
        self.max_seq = max(self.max_seq, new.seq)

    def drop_through(self, seq: int, released: dict[int, int]) -> None:
        """Forget extents whose record is <= seq (the cloud now holds them)."""
        kept = []
        for e in self.extents:
            if e.seq <= seq:
                _credit(released, e.segment, e.end - e.start)
            else:
                kept.append(e)
        self.extents = kept
        self._starts = [e.start for e in kept]
        self.written = sum(e.end - e.start for e in kept)
        self.max_seq = max((e.seq for e in kept), default=0)

    def overlapping(self, start: int, end: int) -> list[Extent]:
        """Extents clipped to [start, end), in order."""
        starts, extents = self._starts, self.extents
        i = bisect_right(starts, start) - 1
        if i < 0 or extents[i].end <= start:
            i += 1
        found = []
        while i < len(extents) and extents[i].start < end:
            e = extents[i]
            found.append(e.cut(max(e.start, start), min(e.end, end)))
            i += 1
        return found

    def segments(self) -> set[int]:
        return {e.segment for e in self.extents}
