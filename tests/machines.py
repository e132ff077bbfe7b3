"""Other machines, on this one: namespaces in which processes run as another machine.

cloudnbd tells machines apart by /etc/machine-id and processes by pid and start time
(cloudnbd/identity.py). A `Machine` is a pid namespace and a mount namespace, made once
and kept by a placeholder process, with its own /etc/machine-id and runtime directory
(where servers register); every command given its `prefix` runs inside them, as on one
other host. It keeps this host's name, network and files: a clone or a container of
this machine, or simply a second machine that shares the store. Needs root (unshare,
nsenter, mount), as the test machines have.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

_SETUP = ("mkdir -p /run/cloudnbd && mount -t tmpfs -o mode=0700 tmpfs /run/cloudnbd && "
          "mount --bind {machine_id} /etc/machine-id && echo ready && exec sleep infinity")


class Machine:
    """Another machine: run a command on it by putting `prefix` in front of it."""

    def __init__(self, tmp: Path, name: str = "other") -> None:
        machine_id = tmp / f"{name}.machine-id"
        machine_id.write_text(uuid.uuid4().hex + "\n")
        self.placeholder = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
             "sh", "-c", _SETUP.format(machine_id=machine_id)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.placeholder.stdout is not None
        if self.placeholder.stdout.readline() != b"ready\n":  # its namespaces are set up
            raise RuntimeError(f"could not make machine {name} (unshare failed)")
        inside = Path(f"/proc/{self.placeholder.pid}/task/{self.placeholder.pid}/children")
        self.init_pid = int(inside.read_text().split()[0])  # pid 1 of its namespace
        self.prefix = ["nsenter", "-t", str(self.init_pid), "--mount", "--pid", "--"]

    def stop(self) -> None:
        """Power off: every process of the machine dies with its pid 1."""
        self.placeholder.kill()
        self.placeholder.wait()


@pytest.fixture
def other_machine(tmp_path: Path) -> Iterator[Machine]:
    machine = Machine(tmp_path)
    yield machine
    machine.stop()
