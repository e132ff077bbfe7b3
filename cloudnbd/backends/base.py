"""The object-store interface every backend implements, and the retry policy they share.

A store is rooted at one location (a directory, or a bucket plus prefix); keys are
relative to that root and use '/' as separator. Backends are thin translations of this
interface; compression and encryption live in cloudnbd.codec, never here.

Promises every backend keeps:
- put() is atomic: a reader sees the old object, the new one, or none, never a mix.
- put() returning means the object is durable in the store (the PUT was acknowledged).
- get_with_version() returns an object's bytes together with the version they are, from
  the one response that carried them: a local copy can then say which write it copies,
  and be dropped once the store holds another (the clean cache, engine/cache.py C6).
- put_if_absent() either creates the object or raises PreconditionFailed; it never
  overwrites.
- Every object has a version token (ObjectInfo.version: the S3 ETag, the GCS
  generation, a file's inode number, modification time and size) that changes on every
  write. put_if() writes only if the object is still at the version the caller last
  saw, delete_if() deletes only then; otherwise PreconditionFailed. Format 3 replaces
  only its head (and volume.json, the lease) with put_if, and creates every other
  object with put_if_absent: a late request of a dead process can then neither replace
  newer data nor name its own (docs/design.md, "Fencing").
- delete() of a missing key is not an error.
- Errors come out as cloudnbd.errors.BackendError (or its subclasses) with a message
  naming the store; transient failures are retried first by `retrying`.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from cloudnbd.errors import BackendError, ObjectNotFound, PreconditionFailed

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Told once, in one line, when a request that keeps failing is about to be retried past
#: NOTICE_AFTER seconds from its first attempt. The CLI points it at a terminal, so that
#: a user is not left in silence for the whole --timeout; elsewhere retries show in the
#: metrics and the log.
retry_notice: Callable[[str], None] | None = None
NOTICE_AFTER = 1.0
#: The kinds of request ObjectStore.counting counts.
REQUEST_KINDS = ("get", "put", "delete", "list", "head")


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or stat tells about one object."""

    key: str
    size: int
    version: str = ""  # the store's token for this write of the object


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff with an overall deadline.

    deadline is in seconds from the first attempt; once it passes, the last transient
    error is raised as a BackendError.
    """

    deadline: float = 30.0
    initial_delay: float = 0.05
    max_delay: float = 5.0


class ObjectStore(ABC):
    """A flat namespace of immutable-per-write objects under one root."""

    #: human-readable location, used in every error message (never holds secrets)
    description: str = "?"

    def __init__(self, retry: RetryPolicy | None = None) -> None:
        self.retry_policy = retry or RetryPolicy()
        #: how many retries were taken, for metrics and tests
        self.retries = 0
        self._counting = threading.local()  # this thread's counting() block, if any

    # -- the interface ---------------------------------------------------------------
    def get(self, key: str) -> bytes:
        """Return the object's bytes; ObjectNotFound if it does not exist."""
        return self.get_with_version(key)[0]

    @abstractmethod
    def get_with_version(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and their version (as ObjectInfo.version names it), both
        from one read, never a stat beside it ("" if the answer named none);
        ObjectNotFound if it does not exist."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store data under key, replacing any previous object, atomically and durably."""

    def put_if_absent(self, key: str, data: bytes) -> None:
        """Create key only if it does not exist; PreconditionFailed otherwise."""
        self.put_if(key, data, None)

    def put_if(self, key: str, data: bytes, expected: str | None) -> str:
        """Store data under key only if the object is at version expected (None: only if
        it does not exist); returns the new version, PreconditionFailed otherwise.

        When a retried attempt meets PreconditionFailed, an earlier attempt may have been
        applied with its answer lost: identical bytes then mean the write is ours.
        (Callers that race put distinct bytes: a lease names its holder, a chunk object
        has a fresh random salt.)
        """
        retries = self.retries
        try:
            return self._put_if(key, data, expected)
        except PreconditionFailed:
            if self.retries == retries:
                raise
            found = self.stat(key)
            if found is None or not self._holds(key, data):
                raise
            return found.version

    def _holds(self, key: str, data: bytes) -> bool:
        try:
            return self.get(key) == data
        except ObjectNotFound:
            return False

    @abstractmethod
    def _put_if(self, key: str, data: bytes, expected: str | None) -> str:
        """One conditional write (If-Match / If-None-Match, ifGenerationMatch, ...)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove key; a missing key is fine."""

    def delete_if(self, key: str, expected: str) -> None:
        """Remove key only if it is at version expected; a missing key is fine (an
        earlier attempt whose answer was lost may have removed it); PreconditionFailed
        if it holds a different version."""
        try:
            self._delete_if(key, expected)
        except PreconditionFailed:
            if self.stat(key) is not None:
                raise

    @abstractmethod
    def _delete_if(self, key: str, expected: str) -> None:
        """One conditional delete; may raise PreconditionFailed for a missing key."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object whose key starts with prefix, in key order.

        Key order is str order, except that S3-compatible stores built on a directory tree
        (SeaweedFS) walk it depth first: 'a/x' comes before 'a-b' there. Within one level
        (all of chunks/, say) the order is the same everywhere.
        """

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size and version of key, or None if it does not exist."""

    @abstractmethod
    def check(self) -> None:
        """Verify the bucket (or directory) exists and is reachable; BackendError if not."""

    def parent(self) -> ObjectStore | None:
        """The store rooted one level above this one (the prefix without its last part,
        the parent directory), or None at the top: a bucket root, the file-system root,
        or a store that reaches nothing outside its own root (RemoteStore). `init` looks
        up through these for a volume around the new one. A parent shares this store's
        connection: close this store, never its parent."""
        return None

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove many keys; backends with batch deletes override this."""
        for key in keys:
            self.delete(key)

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release connections."""

    def idle(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """No request is coming for a long while: let go of what a later request can
        take again (the agent process of a RemoteStore)."""

    # -- requests -----------------------------------------------------------------------
    @contextmanager
    def counting(self) -> Iterator[Counter[str]]:
        """Count the requests this thread makes through the store within the block, by
        kind (REQUEST_KINDS): one per request sent whose answer came (an error answer,
        such as a missing object, too; retries and requests that got no answer are not
        counted), so one per LIST page, and one per DeleteObjects of up to 1000 keys on
        S3. The file backend counts each file operation as one. Per thread, so that
        tasks running side by side on one store count only their own; a block inside
        another adds its counts to the outer one's too."""
        counts: Counter[str] = Counter()
        outer: Counter[str] | None = getattr(self._counting, "counts", None)
        self._counting.counts = counts
        try:
            yield counts
        finally:
            self._counting.counts = outer
            if outer is not None:
                outer.update(counts)

    def _answered(self, what: str, count: int = 1) -> None:
        """count requests `what` were answered (GET, conditional PUT, DELETE (batch),
        LIST, HEAD bucket...: the kind is its word among REQUEST_KINDS)."""
        counts: Counter[str] | None = getattr(self._counting, "counts", None)
        if counts is not None:
            words = what.lower().split()
            counts[next((w for w in words if w in REQUEST_KINDS), words[0])] += count

    # -- retry --------------------------------------------------------------------------
    def is_temp_failure(self, exc: BaseException) -> bool:
        """True if exc is worth retrying (throttling, 5xx, reset connection)."""
        return False

    def retrying(self, what: str, fn: Callable[[], T]) -> T:
        """Run fn, retrying transient failures with jittered exponential backoff."""
        policy = self.retry_policy
        start = time.monotonic()
        delay = policy.initial_delay
        noticed = False
        while True:
            try:
                return fn()
            except BackendError:
                raise
            except Exception as exc:
                if not self.is_temp_failure(exc):
                    raise
                elapsed = time.monotonic() - start
                if elapsed + delay > policy.deadline:
                    raise BackendError(
                        f"{self.description}: {what} failed after {elapsed:.1f}s of retries: "
                        f"{short_reason(exc)}"
                    ) from exc
                self.retries += 1
                pause = random.uniform(0, delay) + delay / 2
                # Said before the pause that would keep the user waiting in silence past
                # NOTICE_AFTER, not after it: the backoff can jump from under NOTICE_AFTER
                # straight to giving up.
                if retry_notice is not None and not noticed and elapsed + pause >= NOTICE_AFTER:
                    noticed = True
                    retry_notice(f"{self.description}: {what} failed ({short_reason(exc)}); "
                                 f"retrying for up to {policy.deadline:.0f}s")
                log.debug("%s: %s failed (%s); retrying in %.2fs", self.description, what,
                          short_reason(exc), pause)
                time.sleep(pause)
                delay = min(delay * 2, policy.max_delay)


class BucketStore(ObjectStore):
    """A store rooted at a key prefix in a bucket (S3, GCS): where keys and locations
    are made, once for both."""

    scheme = "?"  # s3, gs: how description names the location

    def __init__(self, bucket_name: str, prefix: str, retry: RetryPolicy | None = None
                 ) -> None:
        super().__init__(retry)
        self.bucket_name = bucket_name
        self._root_at(prefix)

    def _root_at(self, prefix: str) -> None:
        self.prefix = prefix.strip("/")
        self.description = f"{self.scheme}://{self.bucket_name}" + (
            f"/{self.prefix}" if self.prefix else "")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def parent(self) -> BucketStore | None:
        if not self.prefix:
            return None
        outer = copy.copy(self)  # shares the client: see ObjectStore.parent
        outer._root_at(self.prefix.rpartition("/")[0])
        return outer


def short_reason(exc: BaseException) -> str:
    """One line describing exc, for error messages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
