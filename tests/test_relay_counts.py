"""The relay's request counts (tests.servers.FaultProxy.requests), which bench/ turns into
request costs: every S3 request a real client sends through it is counted once, by
kind, with listings as LIST (priced like PUT) rather than GET."""

from __future__ import annotations

import pytest

from testbed.stores import S3_BUCKET, FaultProxy, Server, request_kind, s3_client


@pytest.mark.unit
def test_request_kinds() -> None:
    assert request_kind(b"GET /bucket?list-type=2&prefix=vol%2F HTTP/1.1") == "LIST"
    assert request_kind(b"GET /bucket/?prefix=blocks&marker=00ff HTTP/1.1") == "LIST"
    assert request_kind(b"GET /bucket/vol/chunks/0001 HTTP/1.1") == "GET"
    assert request_kind(b"GET /bucket/prefix=x?partNumber=1 HTTP/1.1") == "GET"
    assert request_kind(b"PUT /bucket/vol/lease HTTP/1.1") == "PUT"


def test_a_real_client_is_counted_by_kind(seaweedfs: Server) -> None:
    with FaultProxy(seaweedfs.endpoint, []) as proxy:
        client = s3_client(proxy.url)
        for i in range(3):
            client.put_object(Bucket=S3_BUCKET, Key=f"relay-counts/{i}", Body=b"x" * 1000)
        client.get_object(Bucket=S3_BUCKET, Key="relay-counts/1")["Body"].read()
        client.head_object(Bucket=S3_BUCKET, Key="relay-counts/2")
        listed = client.list_objects_v2(Bucket=S3_BUCKET, Prefix="relay-counts/")
        client.delete_object(Bucket=S3_BUCKET, Key="relay-counts/0")
    assert listed["KeyCount"] == 3
    assert proxy.requests == {"PUT": 3, "GET": 1, "HEAD": 1, "LIST": 1, "DELETE": 1}
