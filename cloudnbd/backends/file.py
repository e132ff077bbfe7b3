"""A local directory playing the bucket: for trying cloudnbd without an account, and tests.

Keys map to files under the root directory ('/' in a key becomes a subdirectory). Writes go
to a temporary file that is fsync'd and renamed over the target, and the directory is
fsync'd, so put() is atomic and durable like a cloud PUT.

A version token is the file's inode number, modification time and size: each write
renames a new file into place. Writes and deletes take an exclusive flock on the
object's directory, so a conditional one compares and acts atomically against every
other writer, in any process. (A local write cannot arrive late the way a network
request can, so the rare reuse of an inode number at the same nanosecond cannot let a
stale write through: there is none.)
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cloudnbd.backends import StoreOptions
from cloudnbd.backends.base import ObjectInfo, ObjectStore, RetryPolicy
from cloudnbd.errors import BackendError, ObjectNotFound, PreconditionFailed

_TMP_SUFFIX = ".cloudnbd-tmp"


class FileStore(ObjectStore):
    """Objects as files under a directory."""

    def __init__(self, root: str | os.PathLike[str], retry: RetryPolicy | None = None) -> None:
        super().__init__(retry)
        self.root = Path(root)
        self.description = f"file {self.root}"

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
            raise BackendError(f"{self.description}: invalid object key {key!r}")
        return self.root / key

    def _fail(self, what: str, exc: OSError) -> BackendError:
        return BackendError(f"{self.description}: {what}: {exc.strerror or exc}")

    def get_with_version(self, key: str) -> tuple[bytes, str]:
        self._answered("GET")
        # A write renames a complete new file into place, so the inode opened here never
        # changes: its stat is the version of exactly the bytes read from it.
        try:
            with self._path(key).open("rb") as f:
                return f.read(), _version(os.fstat(f.fileno()))
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.description}: no object {key}") from None
        except OSError as exc:
            raise self._fail(f"reading {key}", exc) from exc

    def _write_tmp(self, path: Path, data: bytes) -> Path:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}")
        for _ in range(100):  # a concurrent delete() may remove the emptied directory
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileNotFoundError:
                continue
        else:
            raise OSError(f"cannot create {tmp}: its directory keeps disappearing")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def _sync_dir(self, path: Path) -> None:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        """Hold an exclusive flock on path's directory (see the module docstring)."""
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _current(self, path: Path) -> str | None:
        try:
            return _version(path.stat())
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        self._answered("PUT")
        path = self._path(key)
        try:
            tmp = self._write_tmp(path, data)
            with self._locked(path):
                os.replace(tmp, path)
                self._sync_dir(path)
        except OSError as exc:
            raise self._fail(f"writing {key}", exc) from exc

    def _put_if(self, key: str, data: bytes, expected: str | None) -> str:
        self._answered("PUT")
        path = self._path(key)
        try:
            tmp = self._write_tmp(path, data)
            try:
                with self._locked(path):
                    if self._current(path) != expected:
                        raise PreconditionFailed(f"{self.description}: {key} exists or "
                                                 f"changed since it was last seen")
                    os.replace(tmp, path)
                    self._sync_dir(path)
                    return _version(path.stat())
            finally:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass  # renamed into place
        except OSError as exc:
            raise self._fail(f"writing {key}", exc) from exc

    def delete(self, key: str) -> None:
        self._delete(key, None)

    def _delete_if(self, key: str, expected: str) -> None:
        self._delete(key, expected)

    def _delete(self, key: str, expected: str | None) -> None:
        """Remove key (if at version expected, when given); a missing key is fine."""
        self._answered("DELETE")
        path = self._path(key)
        try:
            with self._locked(path):
                current = self._current(path)
                if current is None:
                    return
                if expected is not None and current != expected:
                    raise PreconditionFailed(f"{self.description}: {key} changed since it "
                                             f"was last seen")
                path.unlink()
        except FileNotFoundError:
            return  # no directory: no object
        except OSError as exc:
            raise self._fail(f"deleting {key}", exc) from exc
        # Directories play no part in the namespace: remove the ones left empty, up to
        # the root, as a bucket has no empty "directories" either.
        parent = path.parent
        while parent != self.root.parent and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def parent(self) -> FileStore | None:
        root = Path(os.path.abspath(self.root))
        return None if root.parent == root else FileStore(root.parent, self.retry_policy)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._answered("LIST")
        if not self.root.is_dir():
            return
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in filenames:
                if name.endswith(_TMP_SUFFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                if key.startswith(prefix):
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue
                    found.append(ObjectInfo(key, st.st_size, _version(st)))
        yield from sorted(found, key=lambda info: info.key)

    def stat(self, key: str) -> ObjectInfo | None:
        self._answered("HEAD")
        try:
            st = self._path(key).stat()
            return ObjectInfo(key, st.st_size, _version(st))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._fail(f"stat {key}", exc) from exc

    def check(self) -> None:
        # The volume's parent directory plays the bucket: like a bucket, it must exist
        # already; the volume's own directory is created on first write.
        parent = self.root.absolute().parent
        if not parent.is_dir():
            raise BackendError(f"{self.description}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise BackendError(f"{self.description}: permission denied on {parent}")


def _version(st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def open_store(location: str, options: StoreOptions) -> FileStore:
    """The backend registry's entry point (cloudnbd.backends)."""
    return FileStore(location, options.retry)


def warm() -> None:
    """Nothing to load: no SDK."""
