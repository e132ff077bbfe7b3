"""The local write-ahead journal: every acknowledged write, until the cloud has it.

Every WRITE, TRIM and WRITE_ZEROES is appended to the journal before it is acknowledged;
the journal is the only place new data enters the local state (clean cache files are only
ever copies of cloud objects). The journal is a sequence of segment files
`journal/<segment number, 16 hex>.log`, each a sequence of records:

    offset size field
    0      4    magic b"CNBJ"
    4      1    kind: 1 = WRITE (data follows), 2 = ZERO (no data)
    5      3    reserved, zero
    8      8    seq: strictly increasing over the journal's life
    16     8    volume offset
    24     4    length in bytes
    28     4    CRC-32 (zlib's) of bytes 0..27 and the data
    32     n    data (WRITE only; n = length)

Invariants (relied on by the engine and by recovery):
- J1 A record is acknowledged only after it is fully written to its segment (page cache);
  a FUA write or an upload (chunk or journal object) that includes a record, a ZERO
  record too, first fsyncs its segment, so whatever the cloud holds is durable in the
  journal until its segment is deleted.
- J2 Segments are deleted oldest first, and only when none of their records is still
  needed (live bytes zero, no reader pinned). The surviving segments are therefore always
  a suffix of the journal, and replaying that suffix in seq order over the cloud contents
  yields, for every byte, either what the cloud has or something written later.
  Creating and deleting segments is durable before anything relies on it: the journal
  directory's own name (and that of any parent made with it) is fsync'd when it is
  made, a new segment's name is fsync'd into the directory before its first record is
  written (else a power loss could drop a segment whose records were uploaded while an
  older segment survives, and replaying the older one would roll the cloud back, or,
  with the directory, every record the store's journal objects hold), and each deletion
  is fsync'd before the next (a resurrected older segment next to a deleted newer one
  would do the same). This holds whatever order the file system keeps metadata in.
- J4 A segment is deleted only once all its records are below the floor the engine sets:
  the store holds every write below it folded into chunk objects (no journal object the
  head names reaches below it). A record that a newer, not yet committed, write has
  replaced is not needed while the newer one lives, but if a power loss takes the newer
  one, the older one is the flushed data; an open that trusts this journal (it does,
  after a crash of this machine) must still find it here.
- J3 Recovery reads each segment until its first record that is torn or fails its CRC and
  ignores the rest of that segment: an fsync covers a whole file, so nothing after a bad
  record was ever fsynced, hence never uploaded or flushed.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from cloudnbd.engine import localfs
from cloudnbd.engine.localfs import Buffer

try:  # zlib's CRC-32, computed about four times faster (carry-less multiplication): every
    # byte written is checksummed on the request path
    from zlib_ng.zlib_ng import crc32
except ImportError:  # the same values, from the standard library
    from zlib import crc32

log = logging.getLogger(__name__)

MAGIC = b"CNBJ"
RECORD = struct.Struct("<4sB3xQQII")
_CRC_PART = struct.Struct("<4sB3xQQI")
_CRC = struct.Struct("<I")
HEADER_BYTES = RECORD.size
DEFAULT_SEGMENT_BYTES = 64 * 2**20
#: records one pwritev writes at most: three buffers each, within IOV_MAX (1024)
BATCH_RECORDS = 256


class Kind(IntEnum):
    WRITE = 1
    ZERO = 2


_WRITE = int(Kind.WRITE)  # a plain int where every write packs it


@dataclass(frozen=True)
class Record:
    """A record found by recovery; data is at (segment, data_pos) for WRITE records."""

    kind: Kind
    seq: int
    offset: int
    length: int
    segment: int
    data_pos: int


def _header(kind: int, seq: int, offset: int, length: int, data: Buffer
            ) -> tuple[bytes, bytes]:
    """A record's header, as the two buffers pwritev takes (its CRC covers data too)."""
    part = _CRC_PART.pack(MAGIC, kind, seq, offset, length)
    return part, _CRC.pack(crc32(data, crc32(part)))


def _segment_name(number: int) -> str:
    return f"{number:016x}.log"


def segment_path(directory: Path, number: int) -> Path:
    """Journal segment number in directory (workers open segments by it)."""
    return directory / _segment_name(number)


class Journal:
    """Append-only segment files with live-byte accounting and oldest-first deletion.

    Thread-safe: the engine appends from many NBD threads and releases from its result
    thread. Callers that need several journal operations to be atomic with their own
    state hold their own lock around them.
    """

    def __init__(self, directory: Path, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        made = [d for d in (directory, *directory.parents) if not d.exists()]
        localfs.mkdir(directory, 0o700)
        for made_dir in made:
            # J2: a segment fsync'd into a directory whose own name is not durable is
            # lost with it (with records the store's journal objects name: FLUSHed)
            localfs.fsync_dir(made_dir.parent)
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}
        self._live: dict[int, int] = {}  # segment -> logical bytes still needed
        self._live_total = 0  # their sum: every write asks for it (backpressure)
        self._pins: dict[int, int] = {}
        self._sizes: dict[int, int] = {}  # segment -> bytes written
        self._active = -1
        self._active_pos = 0
        self.next_seq = 1
        self._deletion_failed = False
        self._rolled = False
        self._recovering = False
        self._segment_seq: dict[int, int] = {}  # segment -> its highest record seq
        self.floor: int | None = None  # J4; None: no floor (the journal alone, in tests)

    # -- recovery -------------------------------------------------------------------------
    def segments_on_disk(self) -> list[int]:
        found = []
        for path in self.directory.glob("*.log"):
            try:
                found.append(int(path.stem, 16))
            except ValueError:
                continue
        return sorted(found)

    def recover(self) -> Iterator[Record]:
        """Yield every valid record of the segments on disk, oldest first (J3).

        Afterwards new records go to a fresh segment, so appends never follow a torn tail.
        """
        # segments that fall out of use go afterwards, once the engine has set the floor
        # (J4: set_floor), not with none
        self._recovering = True
        try:
            yield from self._recover_segments()
        finally:
            self._recovering = False

    def _recover_segments(self) -> Iterator[Record]:
        last_segment = 0
        for number in self.segments_on_disk():
            last_segment = number
            fd = self._open(number)
            size = os.fstat(fd).st_size
            self._sizes[number] = size
            self._live.setdefault(number, 0)
            pos = 0
            while pos + HEADER_BYTES <= size:
                header = os.pread(fd, HEADER_BYTES, pos)
                magic, kind, seq, offset, length, crc = RECORD.unpack(header)
                if magic != MAGIC or kind not in (Kind.WRITE, Kind.ZERO):
                    break
                data_len = length if kind == Kind.WRITE else 0
                if pos + HEADER_BYTES + data_len > size:
                    break
                check = crc32(header[: _CRC_PART.size])
                if data_len:
                    check = crc32(os.pread(fd, data_len, pos + HEADER_BYTES), check)
                if check != crc:
                    break
                yield Record(Kind(kind), seq, offset, length, number, pos + HEADER_BYTES)
                self.next_seq = max(self.next_seq, seq + 1)
                self._segment_seq[number] = max(self._segment_seq.get(number, 0), seq)
                pos += HEADER_BYTES + data_len
            if pos < size:
                log.warning("journal segment %s: ignoring %d bytes after the last valid "
                            "record (torn or never synced)", _segment_name(number),
                            size - pos)
        self._active = last_segment  # the next append rolls to a new segment
        self._active_pos = self.segment_bytes

    # -- appending ------------------------------------------------------------------------
    def _open(self, number: int) -> int:
        fd = self._fds.get(number)
        if fd is None:
            fd = localfs.open(self.directory / _segment_name(number), os.O_RDWR | os.O_CREAT,
                              0o600)
            self._fds[number] = fd
        return fd

    def _roll_if_needed(self, nbytes: int) -> None:
        if self._active < 0 or (self._active_pos + nbytes > self.segment_bytes
                                and self._active_pos > 0):
            number = self._active + 1
            self._open(number)  # first: if it fails, the journal is still what it was
            localfs.fsync_dir(self.directory)  # J2: the name is durable before any record
            self._active, self._active_pos = number, 0
            self._live.setdefault(number, 0)
            self._sizes[number] = 0
            self._rolled = True  # the segment it left may go at the next account()

    def set_floor(self, floor: int) -> None:
        """J4: the store holds every write below floor folded into chunk objects; segments
        wholly below it may go once no record of theirs is needed."""
        with self._lock:
            self.floor = floor
            self._delete_dead_locked()

    def skip_to(self, seq: int) -> None:
        """Number the next record seq or later: the volume's sequence numbers go on from
        where the store's head left them, whoever wrote it."""
        with self._lock:
            self.next_seq = max(self.next_seq, seq)

    def append(self, kind: Kind, offset: int, length: int,
               data: memoryview | bytes | None = None,
               seq: int | None = None) -> tuple[int, int, int]:
        """Write one record; returns (seq, segment, data position). Not yet fsync'd.
        seq is given only for records imported from the store's journal, in their order
        (it must not go below the last one)."""
        data_len = length if kind == Kind.WRITE else 0
        with self._lock:
            self._roll_if_needed(HEADER_BYTES + data_len)
            if seq is None:
                seq = self.next_seq
            elif seq < self.next_seq - 1:
                raise ValueError(f"journal: record {seq} imported after {self.next_seq - 1}")
            self.next_seq = seq + 1
            if data_len:
                assert data is not None and len(data) == length
                buffers = [*_header(kind, seq, offset, length, data), data]
            else:
                buffers = list(_header(kind, seq, offset, length, b""))
            pos = self._active_pos
            self._write_locked(buffers, pos + HEADER_BYTES + data_len, seq)
            return seq, self._active, pos + HEADER_BYTES

    def append_writes(self, writes: Sequence[tuple[Buffer, int]]
                      ) -> list[tuple[int, int, int]]:
        """Write WRITE records of a run of (data, volume offset) in one pwritev: the first
        and as many after it as the active segment holds, at most BATCH_RECORDS. Returns
        their (seq, segment, data position), in order; the caller passes the rest
        again. Not yet fsync'd. One system call and one lock for many small writes
        instead of one each: a 4 KiB append costs 2 to 3 us so, 5 to 11 alone."""
        with self._lock:
            self._roll_if_needed(HEADER_BYTES + len(writes[0][0]))
            segment = self._active
            pos = self._active_pos
            limit = self.segment_bytes
            seq = self.next_seq
            buffers: list[Buffer] = []
            placed = []
            for data, offset in writes[:BATCH_RECORDS]:
                length = len(data)
                if placed and pos + HEADER_BYTES + length > limit:
                    break
                buffers += (*_header(_WRITE, seq, offset, length, data), data)
                pos += HEADER_BYTES
                placed.append((seq, segment, pos))
                pos += length
                seq += 1
            self.next_seq = seq  # numbers of a failed write are skipped, never reused
            self._write_locked(buffers, pos, seq - 1)
            return placed

    def _write_locked(self, buffers: list[Buffer], end: int, last_seq: int) -> None:
        """Write buffers at the active segment's end, which becomes end; last_seq is the
        newest record among them."""
        segment, pos = self._active, self._active_pos
        written = localfs.pwritev(self._fds[segment], buffers, pos)
        if written != end - pos:  # short write: disk full or I/O error
            raise OSError(f"journal: short write ({written} bytes)")
        self._active_pos = end
        self._sizes[segment] = end
        self._segment_seq[segment] = last_seq  # the highest: seq never goes down

    # -- durability -----------------------------------------------------------------------
    def sync(self, segments: set[int] | None = None) -> None:
        """fsync the given segments (default: all)."""
        with self._lock:
            fds = [fd for number, fd in self._fds.items()
                   if segments is None or number in segments]
        for fd in fds:
            localfs.fsync(fd)

    def path(self, segment: int) -> Path:
        return segment_path(self.directory, segment)

    def fd(self, segment: int) -> int:
        return self._fds[segment]

    # -- reclaiming -----------------------------------------------------------------------
    def pin(self, segments: Iterable[int]) -> None:
        with self._lock:
            for number in segments:
                self._pins[number] = self._pins.get(number, 0) + 1

    def unpin(self, segments: Iterable[int]) -> None:
        with self._lock:
            for number in segments:
                self._pins[number] -= 1
                if not self._pins[number]:
                    del self._pins[number]
            self._delete_dead_locked()

    def account(self, added: dict[int, int], released: dict[int, int]) -> None:
        """Bytes of records that became needed (added) or no longer are (overwritten, or
        uploaded: released), per segment; deletes segments that fell out of use (J2)."""
        with self._lock:
            live = self._live
            for number, nbytes in added.items():
                live[number] = live.get(number, 0) + nbytes
                self._live_total += nbytes
            emptied = False
            for number, nbytes in released.items():
                left = live[number] - nbytes
                assert left >= 0, "journal live accounting went negative"
                live[number] = left
                self._live_total -= nbytes
                emptied = emptied or not left
            if emptied or self._rolled:  # else no segment can have fallen out of use
                self._rolled = False
                self._delete_dead_locked()

    def _delete_dead_locked(self) -> None:
        # J2: oldest first, never the active segment, never a pinned one, and never again
        # this run once a deletion failed (see _delete_segment_locked); not during
        # recovery either: a segment whose records the replay skips (the store's chunk
        # objects hold them) is still being read.
        if self._recovering:
            return
        for number in sorted(self._live):
            if (self._deletion_failed or number == self._active or self._live[number]
                    or number in self._pins
                    or (self.floor is not None
                        and self._segment_seq.get(number, 0) >= self.floor)):
                return
            try:
                self._delete_segment_locked(number)
            except OSError as exc:
                log.error("journal: cannot delete segment %s (%s); no newer segment will "
                          "be deleted until the next open", _segment_name(number), exc)
                return

    def _delete_segment_locked(self, number: int) -> None:
        """Forget segment number, then remove it durably (J2). If removing fails, the
        segment may still be on disk: deleting a newer one after it could leave an older
        segment next to a deleted newer one, and replaying it would roll flushed data
        back, so every later deletion of this run is refused."""
        self._live.pop(number, None)
        self._sizes.pop(number, None)
        fd = self._fds.pop(number, None)
        try:
            if fd is not None:
                localfs.close(fd)
            try:
                localfs.unlink(self.directory / _segment_name(number))
            except FileNotFoundError:
                pass
            localfs.fsync_dir(self.directory)  # J2: gone before a newer one goes
        except OSError:
            self._deletion_failed = True
            raise

    def reset(self) -> None:
        """Delete every segment: only when nothing is live (after a full drain)."""
        with self._lock:
            assert not any(self._live.values()), "journal reset with live records"
            for number in sorted(set(self._live) | set(self._fds)):
                self._delete_segment_locked(number)
            self._active_pos = self.segment_bytes  # next append starts a new segment

    @property
    def bytes_on_disk(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    @property
    def live_bytes(self) -> int:
        return self._live_total  # one int: no lock needed to read it

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                localfs.close(fd)
            self._fds.clear()
