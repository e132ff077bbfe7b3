"""README's section "Trying the s3 and gs backends without an account", run as written:
its shell lines, with only the fixed port numbers and /tmp directories swapped for free
ones (parallel test runs, and other stores on this machine, must not collide)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.stores import FOREIGN_ENV, _free_weed_ports, free_port

ROOT = Path(__file__).resolve().parent.parent
SECTION = "Trying the s3 and gs backends without an account"


def readme_commands(backend: str) -> list[str]:
    """The `$ ` lines of the section's block for backend ("s3" or "gs")."""
    text = (ROOT / "README").read_text()
    section = text.split(SECTION, 1)[1].split("\n\n\n", 1)[0]
    blocks = [block for block in section.split("\n\n") if block.startswith("    $ ")]
    [block] = [b for b in blocks if f"cloudnbd init {backend} " in b]
    return [line.removeprefix("    $ ") for line in block.splitlines()]


def _swap(lines: list[str], tmp: Path, backend: str) -> list[str]:
    """lines with free ports for the fixed ones, and tmp for /tmp."""
    swaps = {f"/tmp/try-{backend}": str(tmp / f"try-{backend}"),
             "12345": str(free_port()),
             ".venv/": f"{sys.prefix}/"}  # whichever venv runs the tests
    if backend == "s3":
        # every port of weed free (one store on a machine needs none of this), and its
        # extra catalog servers off, as tests/servers.py does
        ports = _free_weed_ports(("s3", "master", "volume", "filer", "webdav", "admin"))
        flags = " ".join(f"-{name}.port={port}" for name, port in ports.items())
        swaps["weed mini "] = f"weed mini {flags} -s3.port.iceberg=0 -s3.port.lance=0 "
        swaps[":8333"] = f":{ports['s3']}"
    else:
        swaps["4443"] = str(free_port())
    swapped = []
    for line in lines:
        for old, new in swaps.items():
            line = line.replace(old, new)
        swapped.append(line)
    return swapped


@pytest.mark.parametrize("backend", ["s3", "gs"])
def test_the_readme_trial_of_a_cloud_backend_works_as_written(tmp_path: Path,
                                                              backend: str) -> None:
    lines = readme_commands(backend)
    assert any(line.startswith(("weed mini ", "$gcs ")) for line in lines)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "cloudnbd"  # this checkout, as the venv's entry point would run it
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m cloudnbd "$@"\n')
    wrapper.chmod(0o755)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "cloudnbd.conf").write_text(f"[defaults]\ncache = {tmp_path / 'cache'}\n")
    env = {key: value for key, value in os.environ.items() if key not in FOREIGN_ENV}
    env.update(PATH=f"{bin_dir}:{Path(sys.executable).parent}:{env['PATH']}",
               PYTHONPATH=str(ROOT), CLOUDNBD_PASSWORD="a trial password",
               CLOUDNBD_CONFIG_DIR=str(etc))
    script = "set -euo pipefail\n" + "\n".join(_swap(lines, tmp_path, backend)) + "\n"
    process = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=300)
    finally:
        try:  # the store the script left running in the background
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    assert process.returncode == 0, script + out + err
    assert f"Serving {backend}://try/photos at nbd://127.0.0.1:" in out, out
    assert "export-size: 1073741824" in out and "everything is uploaded" in out, out
