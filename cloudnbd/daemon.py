"""The life of a serving process: started in the background by `open`, or run in the
foreground (under systemd, or as that background process), and how it tells whoever
started it that it is ready.

`cloudnbd open` without --foreground starts `cloudnbd ... open ... --foreground
--ready-fd N` in a session of its own, its output going to the volume's log, and reads
the pipe N until the server says how its start went (`start_background`). The server
side (`serve`) writes lines:

    note TEXT            something the user should hear (a taken-over lease, a journal
                         set aside); any number, before one of the two below
    ready                the NBD listener and the control socket are up
    error CODE MESSAGE   the start failed: a CloudnbdError's exit code and message

End of file without either means the server died starting; its log says why.

Under systemd (Type=notify) the serving process tells systemd READY=1 when it is ready
and STOPPING=1 once close has finished. Only it speaks to systemd (NotifyAccess=main): it
takes NOTIFY_SOCKET out of its environment before anything starts, so that no worker
inherits it.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from cloudnbd.errors import CloudnbdError, local_error

if TYPE_CHECKING:
    from cloudnbd.service import Service

log = logging.getLogger(__name__)

LOG_FILE = "cloudnbd.log"  # in the volume's cache directory


def log_path(cache_dir: Path) -> Path:
    """Where a background server of the volume writes its output."""
    return cache_dir / LOG_FILE


def start_background(argv: list[str], cache_dir: Path, password: str | None,
                     on_note: Callable[[str], None]) -> None:
    """Start `cloudnbd ARGV --foreground` in the background and return once it serves.
    The password, if given, reaches it on its standard input (never argv or the
    environment). Notes it sends go to on_note; a failed start raises its CloudnbdError
    (with its exit code), or one naming the log's last line if it died."""
    path = log_path(cache_dir)
    try:
        log_file = open(path, "ab")  # noqa: SIM115 - closed once the child has it
        os.chmod(path, 0o600)
    except OSError as exc:
        raise local_error(exc) from exc
    log_start = log_file.tell()
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "cloudnbd", *argv, "--foreground",
               "--ready-fd", str(write_end)]
    if password is not None:
        command.append("--password-stdin")
    with log_file:
        child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log_file,
                                 stderr=log_file, pass_fds=(write_end,),
                                 start_new_session=True, close_fds=True)
    os.close(write_end)
    assert child.stdin is not None
    if password is not None:
        child.stdin.write(password.encode() + b"\n")
    child.stdin.close()
    with os.fdopen(read_end) as ready:
        answer = ready.readline().strip()
        while answer.startswith("note "):
            on_note(answer[5:])
            answer = ready.readline().strip()
    if answer == "ready":
        return
    child.wait()
    if answer.startswith("error "):
        _, code, message = answer.split(" ", 2)
        error = CloudnbdError(message)
        error.exit_code = int(code)
        raise error
    raise CloudnbdError(f"the server failed to start (exit {child.returncode})"
                        f"{_last_words(path, log_start)}; see {path}")


def _last_words(path: Path, start: int) -> str:
    """': ' and the last line the server wrote to its log (a traceback's last line names
    the error), or nothing."""
    try:
        with open(path, "rb") as log_file:
            log_file.seek(start)
            lines = log_file.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return f": {lines[-1].strip()}" if lines else ""


class _Announcer:
    """The serving process's side: the ready pipe of `open` and systemd, either absent."""

    def __init__(self, ready_fd: int | None) -> None:
        self.pipe: TextIO | None = os.fdopen(ready_fd, "w") if ready_fd is not None else None
        self.notify_socket = os.environ.pop("NOTIFY_SOCKET", None)

    def _line(self, line: str, last: bool = False) -> None:
        if self.pipe is not None:
            self.pipe.write(line + "\n")
            if last:
                self.pipe.close()
                self.pipe = None

    def failed(self, exc: CloudnbdError) -> None:
        self._line(f"error {exc.exit_code} {exc.message}", last=True)

    def note(self, text: str) -> None:
        self._line(f"note {text}")

    def ready(self) -> None:
        self._line("ready", last=True)
        self.systemd(b"READY=1")

    def systemd(self, message: bytes) -> None:
        """sd_notify: one datagram to systemd's socket (Type=notify units)."""
        address = self.notify_socket
        if not address:
            return
        if address.startswith("@"):
            address = "\0" + address[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)


def serve(start: Callable[[], Service], ready_fd: int | None) -> int:
    """Run a volume's server in this process until it is closed: start() builds and
    starts the Service; its notes and readiness (or its failure) go to the ready pipe
    and systemd. Returns the service's exit code."""
    announce = _Announcer(ready_fd)  # before start(): no worker may inherit NOTIFY_SOCKET
    try:
        service = start()
    except CloudnbdError as exc:
        announce.failed(exc)
        raise
    for note in service.notes:
        log.warning("%s", note)
        announce.note(note)
    announce.ready()
    log.info("serving %s", service.volume.store.description)
    code = service.run_until_closed()
    announce.systemd(b"STOPPING=1")
    return code
