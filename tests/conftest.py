"""Shared fixtures. Server fixtures live in their own modules and are registered here:

- tests/served.py: `served` (a real `cloudnbd open` on a file-backend volume, Unix
  socket), `memory_server` (the NBD layer alone over a MemoryDevice), `password_file`.
"""

from tests.served import memory_server, password_file, served

__all__ = ["memory_server", "password_file", "served"]
