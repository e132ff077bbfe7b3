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
    if backend not in ("s3", "gs"):
        raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    bucket, _, prefix = location.partition("/")
    if len(bucket) < 3 or any(c in bucket for c in " \\:"):
        raise UsageError(f"malformed {backend} location {location!r}: expected "
                         f"BUCKET/PREFIX with a bucket name of at least 3 characters")
    from cloudnbd import credentials

    if backend == "s3":
        from cloudnbd.backends.s3 import S3Store

        found = credentials.s3_credentials(options.credentials_file, options.interactive)
        return S3Store(bucket, prefix, endpoint_url=options.endpoint_url, credentials=found,
                       retry=options.retry)
    from cloudnbd.backends.gs import GCSStore

    key_file = credentials.gcs_credentials_file(options.credentials_file, options.interactive)
    return GCSStore(bucket, prefix, credentials_file=key_file, retry=options.retry)
