"""Shared fixtures. Server fixtures live in their own modules and are registered here.

tests/servers.py -- real object stores on loopback, started once per session:
- `seaweedfs`: SeaweedFS `weed mini` with S3 auth on; `.endpoint` is its S3 URL.
- `fake_gcs`: fake-gcs-server; `.endpoint` is the value for STORAGE_EMULATOR_HOST.
- `backend_env`: runs the test once per backend (file, s3, gs); narrow it with
  `@pytest.mark.parametrize("backend_env", ["s3", "gs"], indirect=True)`. It sets this
  process's environment through monkeypatch (S3 keys, STORAGE_EMULATOR_HOST) and offers:
    backend_env.name            "file" | "s3" | "gs", the CLI's BACKEND argument
    backend_env.new_location()  a fresh, empty location (a unique prefix in an existing
                                bucket, or a new directory whose parent exists)
    backend_env.new_bucket()    the root of a new, empty bucket (file: a new directory)
    backend_env.env             environment for a `cloudnbd` subprocess
    backend_env.cli_args        extra CLI arguments, e.g. ['--endpoint-url', URL]
    backend_env.options         StoreOptions for open_store() in the test process
    backend_env.store(loc)      an ObjectStore at loc, to look behind the CLI's back
  e.g. subprocess.run(["cloudnbd", "init", env.name, env.new_location(), "1GiB",
  *env.cli_args], env=env.env).
- testbed/stores.py starts the stores (tests and bench/ share testbed/, issue 17) and
  holds `FaultProxy` (a class, not a fixture): an HTTP relay that fails first
  connections with 503, a reset, a lost answer or a truncated body.

tests/machines.py: `other_machine`, a second machine on this one (its own machine id, pid
namespace and runtime directory): run a command there with `other_machine.prefix`.

tests/served.py: `served` (a real `cloudnbd open` on a file-backend volume, Unix
socket), `memory_server` (the NBD layer alone over a MemoryDevice), `password_file`;
testbed/served.py runs `cloudnbd` commands and servers as a user would.

Tests marked `unit` run in the test process alone (`make test-unit`): a unit test that
starts a subprocess, and so any server, fails (`_unit_tests_start_no_process`).
"""

import subprocess
from collections.abc import Iterator

import pytest

from tests.machines import other_machine
from tests.served import memory_server, password_file, served
from tests.servers import backend_env, fake_gcs, seaweedfs


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request: pytest.FixtureRequest,
                                 monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the `unit` marker honest: such a test may not start a process."""
    if request.node.get_closest_marker("unit") is not None:
        def refuse(*args: object, **kwargs: object) -> None:
            raise AssertionError("a test marked unit started a process: drop the marker")
        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    yield


__all__ = ["backend_env", "fake_gcs", "memory_server", "other_machine", "password_file",
           "seaweedfs", "served"]
