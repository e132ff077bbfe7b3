"""Serve a MemoryDevice over NBD in a process of its own, possibly under another Python.

TLS with pre-shared keys needs Python 3.13's ssl module; the NBD layer uses the standard
library only, so tests run it under such an interpreter even when they run under an
older one. Usage: python -m tests.nbd_serve '{"size": N, <ServerSettings field>: ...,
"tls": {<TlsSettings field>: ...}}'. It prints the TCP port it listens on, then serves
until its standard input closes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cloudnbd.nbd.device import MemoryDevice
from cloudnbd.nbd.server import NbdServer, ServerSettings, TlsSettings

_PATHS = ("unix_path", "cert", "key", "ca", "psk")


def _paths(fields: dict[str, object]) -> dict[str, object]:
    return {key: Path(str(value)) if key in _PATHS and value is not None else value
            for key, value in fields.items()}


def main() -> None:
    fields = json.loads(sys.argv[1])
    size = fields.pop("size")
    tls = TlsSettings(**_paths(fields.pop("tls", {})))  # type: ignore[arg-type]
    server = NbdServer(MemoryDevice(size), ServerSettings(**_paths(fields), tls=tls))  # type: ignore[arg-type]
    server.start()
    print(server.port, flush=True)
    sys.stdin.read()
    server.shutdown(timeout=10)


if __name__ == "__main__":
    main()
