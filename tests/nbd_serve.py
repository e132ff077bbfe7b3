"""Serve a MemoryDevice over NBD in a process of its own, possibly under another Python.

TLS with pre-shared keys needs Python 3.13's ssl module; the NBD layer uses the standard
library only, so tests run it under such an interpreter even when they run under an
older one. Usage: python -m tests.nbd_serve '{"size": N, <NbdServer keyword>: ...}'.
It prints the TCP port it listens on, then serves until its standard input closes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cloudnbd.nbd.device import MemoryDevice
from cloudnbd.nbd.server import NbdServer

_PATHS = ("unix_path", "tls_cert", "tls_key", "tls_ca", "tls_psk")


def main() -> None:
    settings = json.loads(sys.argv[1])
    size = settings.pop("size")
    for key in _PATHS:
        if settings.get(key) is not None:
            settings[key] = Path(settings[key])
    server = NbdServer(MemoryDevice(size), **settings)
    server.start()
    print(server.port, flush=True)
    sys.stdin.read()
    server.shutdown(timeout=10)


if __name__ == "__main__":
    main()
