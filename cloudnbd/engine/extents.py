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

from array import array
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
    kept up to date (the write-back scheduler asks for both of every dirty chunk).

    Kept as a dict by start and a sorted array of the starts: a write over exactly one
    earlier write of the same range (random writes to a warm chunk, mostly) replaces
    it through the dict alone, and finding a place is a bisection of machine integers,
    not of int objects scattered over the heap (2 us a write, measured, of 1024)."""

    __slots__ = ("_at", "_starts", "max_seq", "written")

    def __init__(self) -> None:
        self._at: dict[int, Extent] = {}
        self._starts = array("q")
        self.max_seq = 0  # the newest extent's record
        self.written = 0  # bytes the extents cover

    def __len__(self) -> int:
        return len(self._at)

    @property
    def extents(self) -> list[Extent]:
        """The extents, in order."""
        at = self._at
        return [at[start] for start in self._starts]

    @property
    def min_seq(self) -> int:
        return min((e.seq for e in self._at.values()), default=0)

    def covers(self, size: int) -> bool:
        """True if the extents cover [0, size) without gaps (no base chunk is needed)."""
        position = 0
        for e in self.extents:
            if e.start != position:
                return False
            position = e.end
        return position >= size

    def _first_reaching(self, start: int) -> int:
        """The index in _starts of the first extent that ends after start."""
        starts = self._starts
        i = bisect_right(starts, start) - 1
        if i < 0 or self._at[starts[i]].end <= start:
            i += 1
        return i

    def add(self, new: Extent, released: dict[int, int]) -> None:
        """Insert new, trimming what it overlaps; credit overlapped bytes to released.

        Records are added in seq order under the engine lock, so new always wins. This
        runs for every WRITE: the usual cases take no loop.
        """
        at, starts = self._at, self._starts
        start, end = new.start, new.end
        if new.seq > self.max_seq:
            self.max_seq = new.seq
        old = at.get(start)
        if old is not None and old.end == end:  # replaces one extent exactly
            at[start] = new
            released[old.segment] = released.get(old.segment, 0) + end - start
            return
        i = self._first_reaching(start)
        count = len(starts)
        if i == count or starts[i] >= end:  # overlaps nothing
            starts.insert(i, start)
            at[start] = new
            self.written += end - start
            return
        j = i
        replacement = []  # only the first and last overlapped extents can stick out
        overlapped = 0
        while j < count and starts[j] < end:
            old = at.pop(starts[j])
            if old.start < start:
                replacement.append(old.cut(old.start, start))
            nbytes = min(old.end, end) - max(old.start, start)
            _credit(released, old.segment, nbytes)
            overlapped += nbytes
            j += 1
        replacement.append(new)
        if old.end > end:
            replacement.append(old.cut(end, old.end))
        starts[i:j] = array("q", [e.start for e in replacement])
        for e in replacement:
            at[e.start] = e
        self.written += end - start - overlapped

    def drop_through(self, seq: int, released: dict[int, int]) -> None:
        """Forget extents whose record is <= seq (the cloud now holds them)."""
        kept = []
        for e in self.extents:
            if e.seq <= seq:
                _credit(released, e.segment, e.end - e.start)
            else:
                kept.append(e)
        self._at = {e.start: e for e in kept}
        self._starts = array("q", [e.start for e in kept])
        self.written = sum(e.end - e.start for e in kept)
        self.max_seq = max((e.seq for e in kept), default=0)

    def overlapping(self, start: int, end: int) -> list[Extent]:
        """Extents clipped to [start, end), in order."""
        at, starts = self._at, self._starts
        i = self._first_reaching(start)
        found = []
        while i < len(starts) and starts[i] < end:
            e = at[starts[i]]
            found.append(e if e.start >= start and e.end <= end
                         else e.cut(max(e.start, start), min(e.end, end)))
            i += 1
        return found

    def segments(self) -> set[int]:
        return {e.segment for e in self._at.values()}
