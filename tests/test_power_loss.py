"""Power loss under the journal and the clean cache, on SeaweedFS: everything not fsync'd
may be lost, in any order; nothing flushed is lost, nothing torn or foreign appears.

The default tier runs 24 power-loss points; `make test-slow` runs 500 (pytest -m slow).
tests/powerloss_harness.py says how a point goes, tests/faultfs.py what a power loss
keeps.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cloudnbd import volume
from cloudnbd.codec import ScryptParams
from tests.powerloss_harness import PowerLossCampaign, Target
from tests.servers import backend_env_for

CHUNK = 64 * 1024
SIZE = 32 * CHUNK


def _campaign(tmp_path: Path, request: pytest.FixtureRequest, seed: int
              ) -> PowerLossCampaign:
    env = backend_env_for("s3", tmp_path, request)
    location = env.new_location()
    vol = volume.create(env.store(location), SIZE, CHUNK, "pw", ScryptParams(n=2**10))
    return PowerLossCampaign(tmp_path / "cache", Target(vol, "s3", location, env.options),
                             seed=seed)


def test_power_loss_campaign_fast_tier(tmp_path: Path, request: pytest.FixtureRequest
                                       ) -> None:
    started = time.monotonic()
    report = _campaign(tmp_path, request, seed=int(os.environ.get("POWERLOSS_SEED", 5))
                       ).run(points=24)
    print(f"{report.summary()} in {time.monotonic() - started:.0f}s")
    assert report.points == 24 and report.writes > 300 and report.flushes > 20
    assert report.where["workload"] >= 5 and report.records_replayed > 0
    assert report.checkpoints > 0 and report.garbage_deleted > 0
    assert report.violations == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_power_loss_campaign_long_tier(tmp_path: Path, request: pytest.FixtureRequest,
                                       seed: int) -> None:
    started = time.monotonic()
    report = _campaign(tmp_path, request, seed=1000 + seed).run(points=50)
    print(f"{report.summary()} in {time.monotonic() - started:.0f}s")
    assert report.violations == []
