"""Keep the volume's secrets inside the processes that hold them.

Every cloudnbd process may hold the master key or plaintext chunks. Promises:
- no_core_dumps(): a crash writes no core file, and processes of the same user without
  CAP_SYS_PTRACE can neither attach to it nor read its /proc/PID/mem or environ
  (PR_SET_DUMPABLE 0). The flag survives fork and is reset by exec, so each program
  entry point calls it: the command (cli.main), the zygote (zygote._warm) and each of
  its children (zygote.bind_to_front).
- wipe_initial_environment(NAME): the variable is gone from os.environ, from the C
  environment (so no child inherits it), and from the memory /proc/PID/environ shows.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def no_core_dumps() -> None:
    """Make this process non-dumpable (no core file, no same-user ptrace or /proc peeking)."""
    try:
        if _libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
    except (OSError, AttributeError) as exc:
        log.warning("cannot disable core dumps (%s): a crash could write keys and data "
                    "to disk", exc)


def dumpable() -> bool:
    """Whether this process could dump core (for tests and diagnostics)."""
    return bool(_libc().prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))


def wipe_initial_environment(name: str) -> str | None:
    """Remove variable name from this process's environment everywhere it lives; its value.

    os.environ.pop() also unsets it in the C environment, so children do not inherit it,
    but /proc/PID/environ shows the block the kernel set up at exec, which unsetenv never
    touches: the value is overwritten there in place.
    """
    value = os.environ.pop(name, None)
    if value is None:
        return None
    try:
        fields = Path("/proc/self/stat").read_bytes().rsplit(b")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end: fields 50, 51
    except (OSError, IndexError, ValueError):
        return value
    block = ctypes.string_at(start, end - start)
    prefix = name.encode() + b"="
    offset = 0
    for entry in block.split(b"\0"):
        if entry.startswith(prefix):
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1
    return value
