"""Amazon S3 and S3-compatible stores (SeaweedFS, Ceph RGW, MinIO) through boto3.

Credentials come from the SDK's standard chain unless given explicitly; the endpoint from
--endpoint-url or AWS_ENDPOINT_URL (boto3 reads the variable itself). botocore's own
retries are off: ObjectStore.retrying retries instead, so every retry is counted and the
overall deadline is ours.

Conditional writes are `PUT If-None-Match: *` (create) and `PUT If-Match: <ETag>`
(replace the version last seen), and `DELETE If-Match: <ETag>` (AWS since 2024,
SeaweedFS, MinIO): 412 means the object exists or changed. 409 ConditionalRequestConflict
means a concurrent conditional write to the same key is in flight; AWS asks to retry,
and the retry then learns the outcome. The version token is the ETag as S3 returns it,
quotes included.

Every PUT carries Content-MD5, so the store refuses a body that is not the one we sent.
Without it SeaweedFS answers 200 to a PUT whose connection ends right after the headers
and stores an empty object in place of the old one: a worker killed between sending the
headers and the body destroyed a chunk that was already safely stored.
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.handlers

from cloudnbd import credentials
from cloudnbd.backends import StoreOptions, split_bucket
from cloudnbd.backends.base import BucketStore, ObjectInfo, RetryPolicy, short_reason
from cloudnbd.errors import BackendError, ObjectNotFound, PreconditionFailed

T = TypeVar("T")

_TEMPORARY_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "ConditionalRequestConflict", "OperationAborted",
    "RequestLimitExceeded", "BadDigest", "IncompleteBody",
})
_PERMISSION_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "InvalidToken", "ExpiredToken", "AccountProblem", "403",
})
# Failures of the connection or of a response in transit: worth another attempt.
# botocore's SSLError is a ConnectionError too, but a bad certificate does not heal.
_TRANSIENT_TRANSPORT = (botocore.exceptions.ConnectionError,  # refused, connect timeout
                        botocore.exceptions.HTTPClientError,  # reset, read timeout, stream
                        botocore.exceptions.IncompleteReadError, ConnectionError)


CONNECT_TIMEOUT = 10  # seconds; urllib3 applies it to sending each block of a request too

_session_lock = threading.Lock()
_shared_session: boto3.session.Session | None = None


def _session() -> boto3.session.Session:
    """The process's one boto3 session. Its loader caches the parsed S3 model, so every
    client made from it shares one copy, and so does every process forked from the
    zygote after warm(). Credentials are given per client, never to the session."""
    global _shared_session
    if _shared_session is None:
        _shared_session = boto3.session.Session()
    return _shared_session


def _client(**kwargs: Any) -> Any:
    with _session_lock:  # creating clients from one session is not thread-safe
        session = _session()
        return session.client("s3", region_name=session.region_name or "us-east-1",
                              **kwargs)


def warm() -> None:
    """Parse the S3 model now (see cloudnbd.zygote); no request is made."""
    _client(aws_access_key_id="unused", aws_secret_access_key="unused").close()


@dataclass(frozen=True)
class S3Credentials:
    """A static S3 key pair; its repr shows neither half."""

    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)


def _sdk_has_credentials() -> bool:
    # A session of its own: the shared one would keep what it found for the process's life.
    return boto3.session.Session().get_credentials() is not None


CREDENTIALS = credentials.Wanted(
    section="s3", what="S3 credentials",
    hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, configure ~/.aws, or give "
         "--credentials FILE with an [s3] section",
    questions=(credentials.Question("aws_access_key_id", "S3 access key id: "),
               credentials.Question("aws_secret_access_key", "S3 secret access key: ",
                                    secret=True)),
    sdk_has_credentials=_sdk_has_credentials)


def find_credentials(explicit: Path | None, interactive: bool) -> S3Credentials | None:
    """Credentials to pass to boto3, or None to let its own chain decide."""
    found = credentials.lookup(CREDENTIALS, explicit, interactive)
    if found is None:
        return None
    return S3Credentials(found["aws_access_key_id"], found["aws_secret_access_key"])


def open_store(location: str, options: StoreOptions) -> S3Store:
    """The backend registry's entry point (cloudnbd.backends)."""
    bucket, prefix = split_bucket("s3", location)
    return S3Store(bucket, prefix, endpoint_url=options.endpoint_url,
                   credentials=find_credentials(options.credentials_file, options.interactive),
                   retry=options.retry)


def _body(data: bytes | bytearray) -> io.BytesIO:
    """A PUT body as a stream, fresh for every attempt.

    urllib3 sends a request under the connect timeout, and a body given as bytes (or a
    bytearray, which botocore leaves as it is) in one sendall, so the whole body had to
    leave within CONNECT_TIMEOUT: on an uplink slower than about a chunk per 10 s every
    upload failed and was retried for ever, and FLUSH never returned. A stream is sent
    in blocks, each with the timeout to itself: it now bounds a stall, not the upload.
    """
    return io.BytesIO(data)


def content_md5(data: bytes) -> str:
    """The Content-MD5 header for a PUT body (see the module docstring for why)."""
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Store(BucketStore):
    """Objects under s3://bucket/prefix/."""

    scheme = "s3"

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None,
                 credentials: S3Credentials | None = None,
                 retry: RetryPolicy | None = None) -> None:
        super().__init__(bucket, prefix, retry)
        self.bucket = bucket
        config = botocore.config.Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT, read_timeout=60, max_pool_connections=32,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # Without explicit credentials the client uses the SDK chain (environment,
        # ~/.aws, instance roles).
        self.client: Any = _client(
            endpoint_url=endpoint_url, config=config,
            aws_access_key_id=credentials.access_key if credentials else None,
            aws_secret_access_key=credentials.secret_key if credentials else None)
        self.endpoint = self.client.meta.endpoint_url
        # botocore asks every PutObject to wait for `100 Continue` before its body: a
        # round trip more per PUT, for bodies of at most a chunk (a small FLUSH is two
        # PUTs in a row: on an 80 ms link, 0.35 s instead of about 0.2 s).
        self.client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)

    # -- errors ----------------------------------------------------------------------------
    def is_temp_failure(self, exc: BaseException) -> bool:
        if isinstance(exc, botocore.exceptions.ClientError):
            status = _status(exc)
            return status >= 500 or status == 429 or _code(exc) in _TEMPORARY_CODES
        if isinstance(exc, botocore.exceptions.SSLError):
            return False
        return isinstance(exc, _TRANSIENT_TRANSPORT)

    def _call(self, what: str, key: str | None, fn: Callable[[], T]) -> T:
        try:
            answer = self.retrying(what, fn)
        except BackendError as exc:
            # retrying gave up on a transient failure; name the usual cause plainly
            if isinstance(exc.__cause__, botocore.exceptions.EndpointConnectionError
                          | botocore.exceptions.ConnectTimeoutError):
                raise BackendError(f"{self.description}: cannot reach {self.endpoint} "
                                   f"({exc.message.partition(': ')[2]})") from None
            raise
        except botocore.exceptions.ClientError as exc:
            self._answered(what)
            code, status = _code(exc), _status(exc)
            where = f"{self.description}: {what}" + (f" {key}" if key else "")
            if code in ("NoSuchKey", "NotFound") or (status == 404 and key is not None
                                                     and code != "NoSuchBucket"):
                raise ObjectNotFound(f"{where}: no such object") from None
            if code == "NoSuchBucket" or (status == 404 and key is None):
                raise BackendError(f"{self.description}: bucket {self.bucket!r} does not "
                                   f"exist") from None
            if code in _PERMISSION_CODES or status == 403:
                raise BackendError(f"{where}: permission denied ({code or status}); check "
                                   f"the credentials and the bucket policy") from None
            if code == "PreconditionFailed" or status == 412:
                raise PreconditionFailed(f"{where}: the object exists or changed since it "
                                         f"was last seen") from None
            raise BackendError(f"{where}: {code or status}: "
                               f"{exc.response.get('Error', {}).get('Message', '')}") from None
        except botocore.exceptions.NoCredentialsError:
            raise BackendError(f"{self.description}: no AWS credentials found (environment, "
                               f"~/.aws, or the cloudnbd credentials file)") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise BackendError(f"{self.description}: {what}: {short_reason(exc)}") from None
        self._answered(what)
        return answer

    # -- the interface ---------------------------------------------------------------------
    def get_with_version(self, key: str) -> tuple[bytes, str]:
        def fetch() -> tuple[bytes, str]:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            body = response["Body"]
            data: bytes = body.read()
            if len(data) != response.get("ContentLength", len(data)):
                raise botocore.exceptions.IncompleteReadError(
                    actual_bytes=len(data), expected_bytes=response["ContentLength"])
            return data, str(response.get("ETag", ""))
        return self._call("GET", key, fetch)

    def put(self, key: str, data: bytes) -> None:
        md5 = content_md5(data)
        self._call("PUT", key, lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=_body(data), ContentMD5=md5))

    def _put_if(self, key: str, data: bytes, expected: str | None) -> str:
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        md5 = content_md5(data)
        response = self._call("conditional PUT", key, lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=_body(data), ContentMD5=md5, **condition))
        return str(response["ETag"])

    def delete(self, key: str) -> None:
        self._call("DELETE", key, lambda: self.client.delete_object(
            Bucket=self.bucket, Key=self._key(key)))

    def _delete_if(self, key: str, expected: str) -> None:
        self._call("conditional DELETE", key, lambda: self.client.delete_object(
            Bucket=self.bucket, Key=self._key(key), IfMatch=expected))

    def delete_many(self, keys: Iterable[str]) -> None:
        batch: list[str] = []
        for key in keys:
            batch.append(key)
            if len(batch) == 1000:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, keys: list[str]) -> None:
        response = self._call("DELETE (batch)", None, lambda: self.client.delete_objects(
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": self._key(k)} for k in keys], "Quiet": True}))
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            raise BackendError(f"{self.description}: deleting {len(errors)} objects failed, "
                               f"e.g. {first.get('Key')}: {first.get('Code')}")

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Pages by hand rather than with a boto3 paginator so each page is retried on
        # its own. S3 lists in UTF-8 byte order, which is str order for our ASCII keys.
        root = f"{self.prefix}/" if self.prefix else ""
        token: str | None = None
        while True:
            args = {"Bucket": self.bucket, "Prefix": root + prefix}
            if token:
                args["ContinuationToken"] = token
            page = self._call("LIST", None, lambda a=args: self.client.list_objects_v2(**a))
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"][len(root):], int(item["Size"]),
                                 str(item.get("ETag", "")))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            head = self._call("HEAD", key, lambda: self.client.head_object(
                Bucket=self.bucket, Key=self._key(key)))
        except ObjectNotFound:
            return None
        return ObjectInfo(key, int(head["ContentLength"]), str(head.get("ETag", "")))

    def check(self) -> None:
        self._call("HEAD bucket", None, lambda: self.client.head_bucket(Bucket=self.bucket))

    def close(self) -> None:
        self.client.close()
