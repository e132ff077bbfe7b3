"""The local-file operations that decide what the journal and the clean cache leave on disk.

Every open, write, fsync, rename, unlink and mkdir that the journal, the clean cache and
the workers do goes through this module, so that a test can put a file layer that forgets
what was never fsync'd underneath them (tests/faultfs.py: power loss). Reads do not: they
never change what a power loss keeps.

By default the names below are the os functions themselves, so the indirection costs one
module attribute lookup, the same as calling `os.pwritev`. Callers must look them up at
call time (`localfs.pwritev(...)`, never `from localfs import pwritev`), or install()
would not reach them. A layer installed here applies to this process only: worker
processes keep the defaults, which is why the power-loss tests run workers in-process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

StrPath = str | Path
Buffer = bytes | bytearray | memoryview


class FileLayer(Protocol):
    """What a substitute must provide: the os calls below, with their semantics."""

    def open(self, path: StrPath, flags: int, mode: int = 0o777) -> int: ...
    def close(self, fd: int) -> None: ...
    def pwritev(self, fd: int, buffers: Sequence[Buffer], offset: int) -> int: ...
    def fsync(self, fd: int) -> None: ...
    def unlink(self, path: StrPath) -> None: ...
    def replace(self, src: StrPath, dst: StrPath) -> None: ...
    def mkdir(self, path: StrPath, mode: int = 0o777) -> None: ...
    def fsync_dir(self, path: StrPath) -> None: ...


def _mkdir(path: StrPath, mode: int = 0o777) -> None:
    """mkdir -p: parents too, and an existing directory is fine."""
    Path(path).mkdir(mode=mode, parents=True, exist_ok=True)


def _fsync_dir(path: StrPath) -> None:
    """Make the directory's entries (creates, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OsLayer:
    """The default: the real calls."""

    open = staticmethod(os.open)
    close = staticmethod(os.close)
    pwritev = staticmethod(os.pwritev)
    fsync = staticmethod(os.fsync)
    unlink = staticmethod(os.unlink)
    replace = staticmethod(os.replace)
    mkdir = staticmethod(_mkdir)
    fsync_dir = staticmethod(_fsync_dir)


_NAMES = ("open", "close", "pwritev", "fsync", "unlink", "replace", "mkdir", "fsync_dir")

open: Callable[..., int] = os.open
close: Callable[[int], None] = os.close
pwritev: Callable[[int, Sequence[Buffer], int], int] = os.pwritev
fsync: Callable[[int], None] = os.fsync
unlink: Callable[[StrPath], None] = os.unlink
replace: Callable[[StrPath, StrPath], None] = os.replace
mkdir: Callable[..., None] = _mkdir
fsync_dir: Callable[[StrPath], None] = _fsync_dir

_installed: FileLayer = OsLayer()


def install(layer: FileLayer) -> FileLayer:
    """Route this process's journal and cache file operations through layer; returns the
    layer that was installed before."""
    global _installed
    previous, _installed = _installed, layer
    for name in _NAMES:
        globals()[name] = getattr(layer, name)
    return previous


@contextmanager
def installed(layer: FileLayer) -> Iterator[FileLayer]:
    """install(layer) for the duration of a with block."""
    previous = install(layer)
    try:
        yield layer
    finally:
        install(previous)


def write_file(path: StrPath, data: Buffer, mode: int = 0o600, sync: bool = False) -> None:
    """Create or truncate path and write data to it; fsync'd only with sync."""
    fd = open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view, done = memoryview(data), 0
        while done < len(view):
            done += pwritev(fd, [view[done:]], done)
        if sync:
            fsync(fd)
    finally:
        close(fd)
