"""Load campaign (tests/load_harness.py): several clients at queue depth 64 with
--max-dirty 64 MiB and the uploads throttled by the relay's link.

Stated bounds (docs/reliability.md, "6. Load"):
- every request is answered within latency_bound(): twice the time to push every chunk
  of the volume (plus the 4 uploads that may be in flight) through the link, plus 10 s;
  fast tier 128 MiB at 8 MiB/s: 46 s; long tier 256 MiB at 4 MiB/s: 146 s;
- the PSS of all cloudnbd processes stays under memory_bound(): the 150 MiB budget plus
  8 MiB per connection beyond four;
- every READ returns exactly what was written, and after close the store holds exactly
  what every client wrote last.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.load_harness import LoadSettings, check, run_load


def test_load_fast_tier(tmp_path: Path, password_file: Path,
                        request: pytest.FixtureRequest) -> None:
    report = run_load(LoadSettings(clients=4, seconds=20, seed=1), tmp_path, password_file,
                      request)
    print(report.summary())
    print(report.details())
    check(report)


@pytest.mark.slow
def test_load_long_tier(tmp_path: Path, password_file: Path,
                        request: pytest.FixtureRequest) -> None:
    settings = LoadSettings(clients=6, seconds=300, volume_mib=256, up_mib_s=4.0,
                            down_mib_s=16.0, rtt=0.04, cache_size="64MiB", seed=2)
    report = run_load(settings, tmp_path, password_file, request)
    print(report.summary())
    print(report.details())
    check(report)
