"""Size parsing: SI and IEC suffixes mean what --help says."""

from __future__ import annotations

import pytest

from cloudnbd.errors import UsageError
from cloudnbd.sizes import format_size, parse_size

pytestmark = pytest.mark.unit  # in-process: no servers, no subprocesses


@pytest.mark.parametrize("text,expected", [
    ("512", 512), ("20GB", 20 * 10**9), ("20gb", 20 * 10**9), ("20GiB", 20 * 2**30),
    ("20G", 20 * 2**30), ("512M", 512 * 2**20), ("512MB", 512 * 10**6), ("1.5GiB", 3 * 2**29),
    ("4 KiB", 4096), ("1TB", 10**12), ("2T", 2 * 2**40),
])
def test_parse(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-5GB", "20XB", "1e9", "20 G B", "twenty"])
def test_malformed_sizes_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="malformed size"):
        parse_size(text)


def test_format() -> None:
    assert format_size(20 * 2**30) == "20 GiB"
    assert format_size(1536 * 1024) == "1.5 MiB"
    assert format_size(100) == "100 B"
