"""A file layer that forgets what was never fsync'd: power loss under the journal and cache.

Installed with cloudnbd.engine.localfs.install() (the way RocksDB's FaultInjectionTestFS
or SQLite's crash-test VFS wrap their file systems), FaultFS passes every operation
through to the real files, so the engine reads what a page cache would show, and
remembers, for everything below one root directory:
- per file (an inode, so that a rename carries it): its contents as of its last fsync,
  and the writes and truncations since;
- per directory: its entries as of its last directory fsync, and the creates, renames
  and unlinks since.

power_loss() (or the operation count set by arm()) cuts the power: it draws one state
the disk may be found in, and from then on every operation fails with EIO, as on a
machine that is off. materialize() writes that state over the root; it becomes the new
durable state, and the power is back on.

What may survive a power loss (the kernel's freedom, as modelled here):
- File data: each 512-byte sector written since the file's last fsync holds any version
  it had since then, independently of every other sector: its durable contents, the
  latest, or one in between. A sector is the unit the disk writes atomically; a 4 KiB
  page may tear. Writes reach the disk in any order.
- File size: any size the file had since its last fsync. Bytes past the durable size
  that no surviving write covers read as zeros.
- Directories: a prefix of the operations since the directory's last fsync (metadata is
  journaled in order, as ext4 and XFS do; POSIX promises less). A file whose name did not
  survive is gone, however often its data was fsync'd: fsync of a file makes its data
  and size durable, not its name.
Each file draws how it fares: nothing unsynced kept, everything kept, or a mix per
sector; tests can force one (Policy).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from cloudnbd.engine.localfs import Buffer, StrPath

SECTOR = 512


class Policy(Enum):
    """How one power loss treats unsynced data and directory operations."""

    DROP = "drop"  # nothing that was not fsync'd survives
    KEEP = "keep"  # everything survives (as if the kernel had just written it all back)
    MIX = "mix"  # per file and directory, one of the above or a random mix


@dataclass(eq=False)
class _File:
    durable: bytearray = field(default_factory=bytearray)
    # since the last fsync: (offset, data) for a write, (size, None) for a truncation
    changes: list[tuple[int, bytes | None]] = field(default_factory=list)
    size: int = 0

    def write(self, offset: int, data: bytes) -> None:
        self.changes.append((offset, data))
        self.size = max(self.size, offset + len(data))

    def truncate(self, size: int) -> None:
        self.changes.append((size, None))
        self.size = size

    def latest(self) -> bytearray:
        """The contents with every change applied (what the page cache holds)."""
        out = bytearray(self.durable)
        for offset, data in self.changes:
            if data is None:
                del out[offset:]
                out.extend(bytes(offset - len(out)))
            else:
                if offset > len(out):
                    out.extend(bytes(offset - len(out)))
                out[offset:offset + len(data)] = data
        assert len(out) == self.size
        return out

    def sync(self) -> None:
        self.durable = self.latest()
        self.changes.clear()

    def after_power_loss(self, rng: random.Random, mode: str) -> bytes:
        """One contents the file may have after a power loss now (see the module doc)."""
        if not self.changes or mode == "drop":
            return bytes(self.durable)
        if mode == "keep":
            return bytes(self.latest())
        sizes = [len(self.durable)]
        touched: list[range] = []  # the sectors each change touches
        size = len(self.durable)
        for offset, data in self.changes:
            if data is None:
                touched.append(range(offset // SECTOR, -(-size // SECTOR))
                               if offset < size else range(0))
                size = offset
            else:
                touched.append(range(offset // SECTOR, -(-(offset + len(data)) // SECTOR)))
                size = max(size, offset + len(data))
            sizes.append(size)
        versions: dict[int, int] = {}  # sector -> how many of its changes it keeps
        for sectors in touched:
            for sector in sectors:
                versions[sector] = versions.get(sector, 0) + 1
        for sector, count in versions.items():
            versions[sector] = rng.randint(0, count)
        out = bytearray(max(sizes))
        out[:len(self.durable)] = self.durable
        seen: dict[int, int] = {}
        for (offset, data), sectors in zip(self.changes, touched, strict=True):
            for sector in sectors:
                n = seen.get(sector, 0)
                seen[sector] = n + 1
                if n >= versions[sector]:
                    continue
                lo, hi = sector * SECTOR, (sector + 1) * SECTOR
                if data is None:
                    start = max(lo, offset)
                    out[start:hi] = bytes(len(out[start:hi]))
                else:
                    start, end = max(lo, offset), min(hi, offset + len(data))
                    out[start:end] = data[start - offset:end - offset]
        return bytes(out[:rng.choice(sizes)])


@dataclass(eq=False)
class _Dir:
    durable: dict[str, _File | _Dir] = field(default_factory=dict)
    current: dict[str, _File | _Dir] = field(default_factory=dict)
    # since the last directory fsync: ("link", name, node), ("unlink", name),
    # ("rename", old, new)
    ops: list[tuple] = field(default_factory=list)

    def after_power_loss(self, rng: random.Random, mode: str) -> dict[str, _File | _Dir]:
        keep = {"drop": 0, "keep": len(self.ops)}.get(mode)
        if keep is None:
            keep = rng.randint(0, len(self.ops))
        entries = dict(self.durable)
        for op in self.ops[:keep]:
            if op[0] == "link":
                entries[op[1]] = op[2]
            elif op[0] == "unlink":
                entries.pop(op[1], None)
            else:
                node = entries.pop(op[1], None)
                if node is not None:
                    entries[op[2]] = node
        return entries


class PowerIsOff(OSError):
    """Raised by every operation once the power is cut."""

    def __init__(self) -> None:
        super().__init__(errno.EIO, "power lost (fault injection)")


class FaultFS:
    """The localfs layer that remembers what is durable below root; see the module doc.

    Thread-safe: one lock orders the bookkeeping and the real operations alike.
    """

    def __init__(self, root: Path, seed: int = 0) -> None:
        self.root = Path(os.path.abspath(root))
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self._fds: dict[int, _File] = {}
        self.dead = False
        self.mutations = 0  # operations that change what a power loss may keep
        self.power_losses = 0
        self._cut_at: int | None = None
        self._image: list[tuple[str, bytes | None]] | None = None
        self.on_power_loss: Callable[[], None] | None = None
        self._tree = self._scan(self.root)

    # -- the durable state ------------------------------------------------------------------
    def _scan(self, path: Path) -> _Dir:
        """What is on disk now, all of it durable (a fresh boot)."""
        node = _Dir()
        if path.is_dir():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    entry: _File | _Dir = self._scan(child)
                else:
                    content = child.read_bytes()
                    entry = _File(bytearray(content), size=len(content))
                node.durable[child.name] = node.current[child.name] = entry
        return node

    def _locate(self, path: StrPath) -> tuple[_Dir, str] | None:
        """The directory node holding path, and its name there; None outside root."""
        full = Path(os.path.abspath(path))
        if full == self.root or self.root not in full.parents:
            return None
        node = self._tree
        walked = self.root
        for part in full.relative_to(self.root).parts[:-1]:
            walked = walked / part
            child = node.current.get(part)
            if child is None and walked.is_dir():  # made behind our back: adopt it
                child = node.durable[part] = node.current[part] = self._scan(walked)
            if not isinstance(child, _Dir):
                return None
            node = child
        name = full.name
        if name not in node.current and os.path.lexists(full):
            adopted = self._scan(full) if full.is_dir() else _File(
                bytearray(full.read_bytes()), size=full.stat().st_size)
            node.durable[name] = node.current[name] = adopted
        return node, name

    def _dir(self, path: StrPath) -> _Dir | None:
        if Path(os.path.abspath(path)) == self.root:
            return self._tree
        where = self._locate(path)
        if where is None:
            return None
        node = where[0].current.get(where[1])
        return node if isinstance(node, _Dir) else None

    def _mutation(self) -> None:
        """Count one operation; at the armed count, cut the power instead of doing it."""
        if self.dead:
            raise PowerIsOff()
        self.mutations += 1
        if self._cut_at is not None and self.mutations >= self._cut_at:
            self._cut_locked()
            raise PowerIsOff()

    def _check_power(self) -> None:
        if self.dead:
            raise PowerIsOff()

    # -- the localfs interface --------------------------------------------------------------
    def open(self, path: StrPath, flags: int, mode: int = 0o777) -> int:
        with self._lock:
            self._check_power()
            where = self._locate(path)
            if where is None:
                return os.open(path, flags, mode)
            parent, name = where
            node = parent.current.get(name)
            creating = node is None and bool(flags & os.O_CREAT)
            truncating = isinstance(node, _File) and bool(flags & os.O_TRUNC) and node.size > 0
            if creating or truncating:
                self._mutation()
            fd = os.open(path, flags, mode)
            if creating:
                node = parent.current[name] = _File()
                parent.ops.append(("link", name, node))
            if isinstance(node, _File):
                if truncating:
                    node.truncate(0)
                self._fds[fd] = node
            return fd

    def close(self, fd: int) -> None:
        with self._lock:  # allowed with the power off: it changes nothing on disk
            self._fds.pop(fd, None)
            os.close(fd)

    def pwritev(self, fd: int, buffers: Sequence[Buffer], offset: int) -> int:
        with self._lock:
            self._check_power()
            node = self._fds.get(fd)
            if node is None:
                return os.pwritev(fd, buffers, offset)
            self._mutation()
            data = b"".join(bytes(b) for b in buffers)
            written = os.pwrite(fd, data, offset)
            node.write(offset, data[:written])
            return written

    def fsync(self, fd: int) -> None:
        with self._lock:
            self._check_power()
            node = self._fds.get(fd)
            if node is None:
                os.fsync(fd)
                return
            self._mutation()
            node.sync()  # no real fsync: durability here is this bookkeeping

    def unlink(self, path: StrPath) -> None:
        with self._lock:
            self._check_power()
            where = self._locate(path)
            if where is None:
                os.unlink(path)
                return
            self._mutation()
            os.unlink(path)
            parent, name = where
            parent.current.pop(name, None)
            parent.ops.append(("unlink", name))

    def replace(self, src: StrPath, dst: StrPath) -> None:
        with self._lock:
            self._check_power()
            source, target = self._locate(src), self._locate(dst)
            if source is None and target is None:
                os.replace(src, dst)
                return
            assert source is not None and target is not None and source[0] is target[0], \
                "FaultFS models renames within one directory only"
            self._mutation()
            os.replace(src, dst)
            parent = source[0]
            node = parent.current.pop(source[1])
            parent.current[target[1]] = node
            parent.ops.append(("rename", source[1], target[1]))

    def mkdir(self, path: StrPath, mode: int = 0o777) -> None:
        full = Path(os.path.abspath(path))
        if full.is_dir():
            with self._lock:
                self._check_power()
            return
        if full.parent != full and not full.parent.is_dir():
            self.mkdir(full.parent, mode)
        with self._lock:
            self._check_power()
            where = self._locate(full)
            if where is None:
                os.mkdir(full, mode)
                return
            self._mutation()
            os.mkdir(full, mode)
            parent, name = where
            node = parent.current[name] = _Dir()
            parent.ops.append(("link", name, node))

    def fsync_dir(self, path: StrPath) -> None:
        with self._lock:
            self._check_power()
            node = self._dir(path)
            if node is None:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                return
            self._mutation()
            node.durable = dict(node.current)
            node.ops.clear()

    # -- power ------------------------------------------------------------------------------
    def arm(self, after: int) -> None:
        """Cut the power instead of doing the after-th mutation from now."""
        with self._lock:
            self._cut_at = self.mutations + after

    def power_loss(self, policy: Policy = Policy.MIX) -> None:
        """Cut the power now."""
        with self._lock:
            if not self.dead:
                self._cut_locked(policy)

    def _cut_locked(self, policy: Policy = Policy.MIX) -> None:
        self.dead = True
        self._cut_at = None
        self.power_losses += 1
        image: list[tuple[str, bytes | None]] = []

        def mode() -> str:
            if policy is not Policy.MIX:
                return policy.value
            return self.rng.choice(("drop", "keep", "mix"))

        def walk(node: _Dir, prefix: str) -> None:
            for name, child in sorted(node.after_power_loss(self.rng, mode()).items()):
                rel = f"{prefix}{name}"
                if isinstance(child, _Dir):
                    image.append((rel, None))
                    walk(child, rel + "/")
                else:
                    image.append((rel, child.after_power_loss(self.rng, mode())))

        walk(self._tree, "")
        self._image = image
        if self.on_power_loss is not None:
            self.on_power_loss()

    def image(self) -> dict[str, bytes | None]:
        """The state drawn at the power loss: relative path -> contents (None: a dir)."""
        assert self._image is not None, "the power is on"
        return dict(self._image)

    def materialize(self) -> None:
        """Replace what is below root with the state drawn at the power loss; power on.

        Everything that used the files before must have let go of them (their
        descriptors may stay open: they point at unlinked files)."""
        with self._lock:
            assert self.dead and self._image is not None, "materialize() needs a power loss"
            for child in self.root.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            for rel, content in self._image:
                path = self.root / rel
                if content is None:
                    path.mkdir(mode=0o700)
                else:
                    path.write_bytes(content)
            self._fds.clear()
            self._image = None
            self._tree = self._scan(self.root)
            self.dead = False
