"""Shared fixtures. Server fixtures live in their own modules and are registered here:

- tests/servers.py: `seaweedfs` and `fake_gcs` (real object stores on loopback, one per
  session), and `backend_env`, which runs a test once per backend (file, s3, gs).
- tests/served.py: `served` (a real `cloudnbd open` on a file-backend volume, Unix
  socket), `memory_server` (the NBD layer alone over a MemoryDevice), `password_file`.
"""

from tests.served import memory_server, password_file, served
from tests.servers import backend_env, fake_gcs, seaweedfs

__all__ = ["backend_env", "fake_gcs", "memory_server", "password_file", "seaweedfs",
           "served"]
