"""Backend factory: turn `BACKEND LOCATION` from the command line into an ObjectStore."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cloudnbd.backends.base import ObjectStore, RetryPolicy
from cloudnbd.errors import UsageError

BACKENDS = ("file", "s3", "gs")


@dataclass(frozen=True)
class StoreOptions:
    """How to reach a store; never holds secrets itself."""

    endpoint_url: str | None = None
    credentials_file: Path | None = None
    interactive: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)


def open_store(backend: str, location: str, options: StoreOptions | None = None
               ) -> ObjectStore:
    """The store rooted at location (a directory for file, BUCKET/PREFIX otherwise)."""
    options = options or StoreOptions()
    if backend == "file":
        from cloudnbd.backends.file import FileStore

        if not location:
            raise UsageError("file backend needs a directory")
        return FileStore(location, options.retry)
    raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
