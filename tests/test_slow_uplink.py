"""A PUT whose body takes longer to send than the connect timeout still succeeds.

urllib3 sends a request, body included, under the connect timeout; a body handed over
in one piece had to leave entirely within it, so on a slow uplink every upload of a
chunk failed, was retried for ever, and FLUSH never returned (bench/run found it: 16 MiB
chunks behind 20 Mbit/s). The connect timeout is cut to 1 s here so that a body of a
few seconds shows it, through a relay whose link caps the upload rate; the real S3
(SeaweedFS) and GCS (fake-gcs-server) servers sit behind it.
"""

from __future__ import annotations

import os

import pytest

from cloudnbd.backends import StoreOptions, open_store
from cloudnbd.backends.base import RetryPolicy
from testbed.link import Link
from testbed.stores import GCS_BUCKET, S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, FaultProxy, Server

BODY = 24 * 2**20  # at 8 MB/s: 3 s, of which socket buffers hide at most about 1.5 s
RATE = 8e6


@pytest.mark.parametrize("backend", ["s3", "gs"])
def test_a_put_slower_than_the_connect_timeout_succeeds(
        backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    server: Server = request.getfixturevalue("seaweedfs" if backend == "s3" else "fake_gcs")
    data = bytearray(os.urandom(BODY))  # what uploaders hand over: a bytearray
    with FaultProxy(server.endpoint, [], link=Link(up=RATE)) as proxy:
        retry = RetryPolicy(deadline=1)  # one attempt, in effect
        if backend == "s3":
            from cloudnbd.backends import s3

            monkeypatch.setattr(s3, "CONNECT_TIMEOUT", 1)
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
            options = StoreOptions(endpoint_url=proxy.url, retry=retry)
            location = f"{S3_BUCKET}/slow-uplink"
        else:
            from cloudnbd.backends import gs

            monkeypatch.setattr(gs, "CONNECT_TIMEOUT", 1)
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
            options = StoreOptions(retry=retry)
            location = f"{GCS_BUCKET}/slow-uplink"
        store = open_store(backend, location, options)
        store.put("big", data)
        assert proxy.link is not None and proxy.link.up.sent > BODY  # it went the slow way
        assert store.get("big") == data
