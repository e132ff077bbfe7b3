"""Google Cloud Storage through google-cloud-storage.

Application default credentials, or a service-account key file. With
STORAGE_EMULATOR_HOST set (fake-gcs-server, the official emulator) the client talks to
the emulator without credentials. The library's own retries are off (retry=None on every
call); ObjectStore.retrying retries instead.

Conditional writes and deletes are `ifGenerationMatch=<generation>` (0: create); 412 means
the object exists or changed. The version token is the generation, in decimal.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import google.api_core.exceptions as gexc
import google.auth
import google.auth.exceptions
import requests.exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.resumable_media import DataCorruption

from cloudnbd import credentials
from cloudnbd.backends import StoreOptions, split_bucket
from cloudnbd.backends.base import BucketStore, ObjectInfo, RetryPolicy
from cloudnbd.errors import BackendError, ObjectNotFound, PreconditionFailed

T = TypeVar("T")
CONNECT_TIMEOUT = 10.0  # seconds
READ_TIMEOUT = 60.0
# urllib3 sends a request, body included, under the connect timeout, and the library
# hands it the body in one piece: the whole body must leave within the connect timeout.
# With 10 s, every upload of a chunk failed on an uplink slower than a chunk per 10 s,
# for ever (tests/test_slow_uplink.py). Uploads get time for the body at this rate.
MIN_UPLOAD_RATE = 16 * 1024  # bytes per second
_TIMEOUT = (CONNECT_TIMEOUT, READ_TIMEOUT)


def _upload_timeout(size: int) -> tuple[float, float]:
    return max(CONNECT_TIMEOUT, size / MIN_UPLOAD_RATE), READ_TIMEOUT


_TEMPORARY = (gexc.TooManyRequests, gexc.InternalServerError, gexc.BadGateway,
              gexc.ServiceUnavailable, gexc.GatewayTimeout, requests.exceptions.ConnectionError,
              requests.exceptions.ChunkedEncodingError, requests.exceptions.Timeout,
              google.auth.exceptions.TransportError, DataCorruption, ConnectionError)
# Refused or unroutable: after the deadline, reported as "cannot reach".
_UNREACHABLE = (requests.exceptions.ConnectionError, google.auth.exceptions.TransportError)


class GCSStore(BucketStore):
    """Objects under gs://bucket/prefix/."""

    scheme = "gs"

    def __init__(self, bucket: str, prefix: str, credentials_file: Path | None = None,
                 retry: RetryPolicy | None = None) -> None:
        super().__init__(bucket, prefix, retry)
        try:
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                self.client = storage.Client(project="cloudnbd",
                                             credentials=AnonymousCredentials())
            elif credentials_file is not None:
                self.client = storage.Client.from_service_account_json(str(credentials_file))
            else:
                self.client = storage.Client()
        except google.auth.exceptions.DefaultCredentialsError:
            raise BackendError("no Google Cloud credentials found: set up application "
                               "default credentials (gcloud auth application-default "
                               "login) or give a service-account key file") from None
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot load Google Cloud credentials: {exc}") from None
        # google-cloud-storage 3.x looks every bucket up once in a background thread, with
        # its own retries, to label tracing spans (even with tracing off). That request is
        # not ours to make: it doubles first-call traffic and hides faults from `retrying`.
        if getattr(self.client, "_bucket_metadata_cache", None) is not None:
            self.client._bucket_metadata_cache = None
        self.bucket: Any = self.client.bucket(bucket)
        self._bucket_seen = False

    def is_temp_failure(self, exc: BaseException) -> bool:
        return isinstance(exc, _TEMPORARY)

    def _call(self, what: str, key: str | None, fn: Callable[[], T]) -> T:
        where = f"{self.description}: {what}" + (f" {key}" if key else "")
        try:
            answer = self.retrying(what, fn)
        except BackendError as exc:
            # retrying gave up on a transient failure; name the usual cause plainly
            cause = exc.__cause__
            if isinstance(cause, _UNREACHABLE) and not isinstance(
                    cause, requests.exceptions.ChunkedEncodingError):
                raise BackendError(f"{self.description}: cannot reach "
                                   f"{self.client.api_endpoint} "
                                   f"({exc.message.partition(': ')[2]})") from None
            raise
        except gexc.NotFound as exc:
            self._answered(what)
            # Only reads and deletes can miss an object; an upload's 404 is the bucket.
            if key is None or what not in ("GET", "DELETE") or not self._bucket_exists(exc):
                raise BackendError(f"{self.description}: bucket {self.bucket_name!r} does "
                                   f"not exist") from None
            raise ObjectNotFound(f"{where}: no such object") from None
        except gexc.PreconditionFailed:
            self._answered(what)
            raise PreconditionFailed(f"{where}: the object exists or changed since it was "
                                     f"last seen") from None
        except (gexc.Forbidden, gexc.Unauthorized) as exc:
            self._answered(what)
            raise BackendError(f"{where}: permission denied: {exc.message}") from None
        except gexc.GoogleAPICallError as exc:
            self._answered(what)
            raise BackendError(f"{where}: {exc.code}: {exc.message}") from None
        except google.auth.exceptions.GoogleAuthError as exc:
            raise BackendError(f"{where}: authentication failed: {exc}") from None
        self._answered(what)
        return answer

    def _bucket_exists(self, exc: gexc.NotFound) -> bool:
        """Whether the bucket exists, after a 404 on one of its objects.

        A 404 alone does not say which is missing (the emulator answers both with a bare
        "Not Found"), so the bucket is looked up once per store and the answer kept.
        """
        if "bucket does not exist" in str(exc).lower():
            return False
        if not self._bucket_seen:
            try:
                self.retrying("HEAD bucket", lambda: self.client.get_bucket(
                    self.bucket_name, retry=None, timeout=_TIMEOUT))
            except gexc.NotFound:
                return False
            self._bucket_seen = True
        return True

    def get_with_version(self, key: str) -> tuple[bytes, str]:
        blob = self.bucket.blob(self._key(key))
        data = self._call("GET", key, lambda: blob.download_as_bytes(
            retry=None, timeout=_TIMEOUT, checksum="crc32c"))
        return data, str(blob.generation or "")  # the download's x-goog-generation

    def put(self, key: str, data: bytes) -> None:
        blob = self.bucket.blob(self._key(key))
        data = bytes(data)  # the library takes bytes only, not a bytearray
        self._call("PUT", key, lambda: blob.upload_from_string(
            data, content_type="application/octet-stream", retry=None,
            timeout=_upload_timeout(len(data)), checksum="crc32c"))

    def _put_if(self, key: str, data: bytes, expected: str | None) -> str:
        blob = self.bucket.blob(self._key(key))
        data = bytes(data)
        generation = 0 if expected is None else int(expected)
        self._call("conditional PUT", key, lambda: blob.upload_from_string(
            data, content_type="application/octet-stream", if_generation_match=generation,
            retry=None, timeout=_upload_timeout(len(data)), checksum="crc32c"))
        return str(blob.generation)

    def delete(self, key: str) -> None:
        blob = self.bucket.blob(self._key(key))
        try:
            self._call("DELETE", key, lambda: blob.delete(retry=None, timeout=_TIMEOUT))
        except ObjectNotFound:
            pass

    def _delete_if(self, key: str, expected: str) -> None:
        blob = self.bucket.blob(self._key(key))
        try:
            self._call("DELETE", key, lambda: blob.delete(
                if_generation_match=int(expected), retry=None, timeout=_TIMEOUT))
        except ObjectNotFound:
            pass

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""
        token: str | None = None
        while True:
            def page(token: str | None = token) -> tuple[list[ObjectInfo], str | None]:
                blobs = self.client.list_blobs(self.bucket_name, prefix=root + prefix,
                                               page_token=token, retry=None,
                                               timeout=_TIMEOUT, max_results=1000)
                found = [ObjectInfo(b.name[len(root):], int(b.size or 0), str(b.generation))
                         for b in next(blobs.pages, [])]
                return found, blobs.next_page_token
            found, token = self._call("LIST", None, page)
            yield from sorted(found, key=lambda info: info.key)
            if not token:
                return

    def stat(self, key: str) -> ObjectInfo | None:
        blob = self._call("HEAD", key, lambda: self.bucket.get_blob(
            self._key(key), retry=None, timeout=_TIMEOUT))
        return None if blob is None else ObjectInfo(key, int(blob.size or 0),
                                                    str(blob.generation))

    def check(self) -> None:
        self._call("HEAD bucket", None, lambda: self.client.get_bucket(
            self.bucket_name, retry=None, timeout=_TIMEOUT))

    def close(self) -> None:
        self.client.close()


def warm() -> None:
    """Nothing beyond importing this module, which loads the library (cloudnbd.zygote)."""


def _sdk_has_credentials() -> bool:
    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        return False
    return True


def _key_file(answer: str) -> str:
    path = Path(answer).expanduser()
    if not path.is_file():
        raise BackendError(f"{path} is not a file")
    return str(path.absolute())


CREDENTIALS = credentials.Wanted(
    section="gs", what="Google Cloud credentials",
    hint="run `gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, "
         "or give --credentials FILE with a [gs] section",
    questions=(credentials.Question("service_account_file",
                                    "Path to a service-account key file (JSON): ",
                                    accept=_key_file),),
    sdk_has_credentials=_sdk_has_credentials)


def find_key_file(explicit: Path | None, interactive: bool) -> Path | None:
    """A service-account key file to use, or None for application default credentials
    (or the emulator, which needs none)."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return None
    found = credentials.lookup(CREDENTIALS, explicit, interactive)
    return None if found is None else Path(found["service_account_file"]).expanduser()


def open_store(location: str, options: StoreOptions) -> GCSStore:
    """The backend registry's entry point (cloudnbd.backends)."""
    bucket, prefix = split_bucket("gs", location)
    return GCSStore(bucket, prefix,
                    credentials_file=find_key_file(options.credentials_file,
                                                   options.interactive),
                    retry=options.retry)
