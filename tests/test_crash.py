"""kill -9 of the front process, an uploader or a fetcher during a random workload on
SeaweedFS, then reopen: nothing flushed is lost, nothing torn or foreign appears.

The default tier runs 20 crash points; `make test-slow` runs 500 (pytest -m slow).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.crash_harness import Campaign
from tests.served import KDF, cloudnbd
from tests.servers import BackendEnv, backend_env_for

SIZE = 32 * 2**20


def _campaign(tmp_path: Path, env: BackendEnv, password_file: Path, seed: int) -> Campaign:
    location = env.new_location()
    cloudnbd("init", env.name, location, str(SIZE), "--chunk-size", "256KiB",
             *env.cli_args, "--password-file", str(password_file), *KDF, env=env.env)
    return Campaign(tmp_path, env.name, location, password_file, env.cli_args, env.env,
                    SIZE, seed)


def test_crash_campaign_fast_tier(tmp_path: Path, password_file: Path,
                                  request: pytest.FixtureRequest) -> None:
    env = backend_env_for("s3", tmp_path, request)
    report = _campaign(tmp_path, env, password_file, seed=20261125).run(crash_points=20)
    print(report.summary())
    assert report.crash_points == 20 and report.front_kills >= 5
    assert report.machine_losses >= 2
    assert report.violations == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_crash_campaign_long_tier(tmp_path: Path, password_file: Path,
                                  request: pytest.FixtureRequest, seed: int) -> None:
    env = backend_env_for("s3", tmp_path, request)
    report = _campaign(tmp_path, env, password_file, seed=seed).run(crash_points=50)
    print(report.summary())
    assert report.violations == []
