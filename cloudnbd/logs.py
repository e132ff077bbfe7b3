"""Logging set-up, one rule for every cloudnbd process (the CLI, the server, its workers).

--debug is cloudnbd's own detail. The libraries under it (urllib3, and each backend's
SDK as its Backend.loggers name it: botocore, boto3, s3transfer, google-*) stay at INFO
even then: at DEBUG botocore logs every request with its signature computation,
megabytes per run. CLOUDNBD_DEBUG=all lets them through too; it is
an environment variable so that the server and its worker processes inherit it.
"""

from __future__ import annotations

import logging
import os

from cloudnbd import backends

DEBUG_ALL_ENV = "CLOUDNBD_DEBUG"
THIRD_PARTY = ("urllib3", *(name for b in backends.REGISTRY for name in b.loggers))


def configure(level: int, prefix: str = "cloudnbd") -> None:
    logging.basicConfig(level=level, format=f"{prefix}: %(levelname)s: %(message)s")
    libraries = level if os.environ.get(DEBUG_ALL_ENV) == "all" else max(level, logging.INFO)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(libraries)
