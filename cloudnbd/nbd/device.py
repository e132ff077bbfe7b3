"""The block-device interface the NBD server calls, in the manner of nbdkit's plugins.

The server knows nothing about where bytes live. It asks the device what it can do (the
can_* answers decide which transmission flags are advertised) and calls blocking,
thread-safe methods; the engine implements them over the cloud, MemoryDevice in memory
for tests of the protocol alone.
"""

from __future__ import annotations

import errno
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

from cloudnbd.nbd.protocol import BlockState

#: the flags of a range that was never written (or was discarded): a hole reading as
#: zeros; a plain int, as devices compute extents in loops
UNALLOCATED = int(BlockState.HOLE | BlockState.ZERO)


class DeviceError(Exception):
    """A failed device operation, with the errno to send to the client."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code


class BlockDevice(ABC):
    """What the NBD server needs from a device. Offsets and lengths are checked by the
    server before any call: 0 <= offset, offset + length <= size."""

    size: int
    read_only: bool = False
    can_flush = True
    can_fua = True
    can_trim = True
    can_zero = True
    can_fast_zero = True
    can_cache = True
    can_multi_conn = False
    can_extents = True
    #: (minimum, preferred, maximum) request sizes advertised with NBD_INFO_BLOCK_SIZE
    block_size = (512, 4096, 32 * 1024 * 1024)

    @abstractmethod
    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill buf with the bytes at offset."""

    def pread_now(self, buf: memoryview, offset: int) -> bool:
        """Fill buf if that needs no waiting (no fetch from the cloud); False otherwise,
        and the server calls pread_into on a pool thread. Lets the connection's reader
        answer cache hits itself, without the hand-off to a pool thread."""
        return False

    @abstractmethod
    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        """Write buf at offset; with fua, durable before returning."""

    def pwrite_now(self, buf: memoryview, offset: int) -> bool:
        """Write buf at offset (without FUA) if that needs no waiting (no backpressure);
        False otherwise, having written nothing, and the server calls pwrite on a pool
        thread. Lets the connection's reader append writes itself. buf is only lent for
        the call: it may be the server's receive buffer."""
        return False

    def pwrite_many_now(self, writes: Sequence[tuple[memoryview, int]]) -> int:
        """pwrite_now for a run of WRITEs of (buf, offset) the reader parsed from one
        receive: writes the first of them that need no waiting and returns how many (the
        server hands the rest to pwrite on a pool thread, which waits or reports the
        error). It raises only if it wrote none. A device that can take a run at once
        (the engine: one lock, one journal append) does better than this loop."""
        done = 0
        for buf, offset in writes:
            try:
                if not self.pwrite_now(buf, offset):
                    break
            except Exception:
                if not done:
                    raise
                break
            done += 1
        return done

    @abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    @abstractmethod
    def zero(self, offset: int, length: int, fua: bool, may_trim: bool = True,
             fast: bool = False) -> None:
        """Make the range read as zeros. With fast, raise DeviceError(ENOTSUP) rather
        than doing it slowly."""

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Discard the range (it may read back as anything; here: zeros)."""
        self.zero(offset, length, fua, may_trim=True)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, BlockState flags) runs covering [offset, offset+length): 0 for data,
        UNALLOCATED for what reads as zeros without being stored."""
        return [(length, 0)]

    def cache(self, offset: int, length: int) -> None:  # noqa: B027 - a hint, may be ignored
        """Prefetch the range; a hint."""


class MemoryDevice(BlockDevice):
    """A sparse in-memory device: pages that were never written read as zeros."""

    PAGE = 4096
    can_multi_conn = True

    def __init__(self, size: int, read_only: bool = False) -> None:
        self.size = size
        self.read_only = read_only
        self._pages: dict[int, bytearray] = {}
        self._lock = threading.Lock()
        self.flushes = 0

    def _span(self, offset: int, length: int):  # type: ignore[no-untyped-def]
        position, end = offset, offset + length
        while position < end:
            page, within = divmod(position, self.PAGE)
            n = min(self.PAGE - within, end - position)
            yield page, within, n, position - offset
            position += n

    def pread_into(self, buf: memoryview, offset: int) -> None:
        with self._lock:
            for page, within, n, at in self._span(offset, len(buf)):
                data = self._pages.get(page)
                buf[at:at + n] = data[within:within + n] if data else bytes(n)

    def pread_now(self, buf: memoryview, offset: int) -> bool:
        self.pread_into(buf, offset)
        return True

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        with self._lock:
            for page, within, n, at in self._span(offset, len(buf)):
                data = self._pages.setdefault(page, bytearray(self.PAGE))
                data[within:within + n] = buf[at:at + n]

    def pwrite_now(self, buf: memoryview, offset: int) -> bool:
        self.pwrite(buf, offset, False)
        return True

    def flush(self) -> None:
        self.flushes += 1

    def zero(self, offset: int, length: int, fua: bool, may_trim: bool = True,
             fast: bool = False) -> None:
        with self._lock:
            for page, within, n, _ in self._span(offset, length):
                if n == self.PAGE:
                    self._pages.pop(page, None)
                elif page in self._pages:
                    self._pages[page][within:within + n] = bytes(n)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        with self._lock:
            for page, _, n, _ in self._span(offset, length):
                flags = 0 if page in self._pages else UNALLOCATED
                if runs and runs[-1][1] == flags:
                    runs[-1] = (runs[-1][0] + n, flags)
                else:
                    runs.append((n, flags))
        return runs
