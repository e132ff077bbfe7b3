"""Run cloudnbd for tests: the real `cloudnbd open --foreground` as a subprocess on a Unix
socket (no port races), or the NBD layer alone over a MemoryDevice in this process.

Readiness comes from the server itself (--ready-fd), never from sleeping.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLI = [sys.executable, "-m", "cloudnbd"]
KDF = ["--kdf-cost", "10"]


def cloudnbd(*args: str, env: dict[str, str] | None = None, check: bool = True,
             input_text: str | None = None, timeout: float = 300,
             prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run the cloudnbd command; with check, fail the test with its stderr if it fails.
    prefix runs it through a wrapper (e.g. as another machine: tests.machines)."""
    result = subprocess.run([*prefix, *CLI, *args], capture_output=True,
                            text=True, env=env, input=input_text, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"cloudnbd {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}{result.stderr}")
    return result


def on_terminal(args: list[str], env: dict[str, str] | None = None
                ) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal: (exit status, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=slave, env=env)
    os.close(slave)
    seen = bytearray()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the last writer of the terminal is gone
            break
        if not data:
            break
        seen += data
    os.close(master)
    assert process.stdout is not None
    out = process.stdout.read().decode()
    return process.wait(timeout=60), out, seen.decode(errors="replace")


@dataclass
class Served:
    """A running `cloudnbd open` and how to reach and stop it."""

    backend: str
    location: str
    socket: Path
    cache: Path
    password_file: Path | None
    process: subprocess.Popen[bytes]
    store_args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    prefix: list[str] = field(default_factory=list)  # the wrapper it runs through
    notes: list[str] = field(default_factory=list)  # warnings open gave at start

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def cli(self, command: str, *args: str, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        return cloudnbd(command, self.backend, self.location, *self.store_args, *args,
                        env=self.env, check=check, prefix=self.prefix)

    def close(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = self.cli("close", "--cache", str(self.cache), *args, check=check)
        if result.returncode == 0:
            self.process.wait(timeout=60)
        return result

    def kill(self) -> None:
        """kill -9 the front process (its workers die with it)."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)

    def status(self) -> dict[str, object]:
        import json

        return json.loads(self.cli("status", "--cache", str(self.cache), "--json").stdout)

    def garbage_rounds(self) -> int:
        return garbage_rounds(self.status())


def garbage_rounds(status: dict[str, object]) -> int:
    """Rounds of garbage collection a server's status counts, full listings and quiet
    ones (G5): a clock that ticks once a --gc-grace, idle or not."""
    return (int(status["garbage_listings"])  # type: ignore[call-overload]
            + int(status["garbage_quiet_rounds"]))  # type: ignore[call-overload]


def start(tmp: Path, backend: str, location: str, password_file: Path | None, *extra: str,
          store_args: list[str] | None = None, env: dict[str, str] | None = None,
          cache: Path | None = None, prefix: Sequence[str] = ()) -> Served:
    """`cloudnbd open --foreground` on a Unix socket; returns once it accepts. prefix
    runs it through a wrapper (setpriv, or another machine: tests.machines)."""
    socket_path = tmp / f"nbd-{os.urandom(3).hex()}.sock"
    cache = cache or tmp / "cache"
    read_end, write_end = os.pipe()
    args = [*prefix, *CLI, "open", backend, location, *(store_args or []), "--foreground",
            "--socket", str(socket_path), "--cache", str(cache),
            *(["--password-file", str(password_file)] if password_file else []),
            "--ready-fd", str(write_end), *extra]
    log = open(tmp / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(args, pass_fds=(write_end,), stdout=log, stderr=log, env=env)
    os.close(write_end)
    notes = []
    with os.fdopen(read_end) as ready:
        answer = ready.readline().strip()
        while answer.startswith("note "):
            notes.append(answer[5:])
            answer = ready.readline().strip()
    if answer != "ready":
        process.wait(timeout=60)
        raise AssertionError(f"server did not start ({answer!r}):\n"
                             f"{(tmp / 'server.log').read_text()}")
    return Served(backend, location, socket_path, cache, password_file, process,
                  store_args or [], env, list(prefix), notes)


def make_password_file(tmp: Path, text: str = "correct horse battery") -> Path:
    path = tmp / "password"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path
