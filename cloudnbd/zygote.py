"""The zygote: one server process, with the cloud SDK loaded, that forks every process
which talks to the cloud.

A cloud SDK is the largest thing cloudnbd holds in memory: boto3's parsed S3 model and
client machinery are about 30 MiB of Python objects per process, google-cloud-storage
about 25. Uploaders, fetchers and the front's store agent are forked from one warm
server (multiprocessing's forkserver) that imported the worker code and built one
client, so they share those pages with it copy-on-write instead of each building its own:
a worker costs about 15 MiB instead of 45. gc.freeze() in the server keeps the cyclic
collector of each child from writing to (and so copying) the shared objects.

The server is started once per front process, with the front's environment and nothing
else (no password, no key: those travel to each child through its own pipe), and exits
as soon as the front does; its children then get SIGKILL (bind_to_front).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import multiprocessing.forkserver
import os
from multiprocessing.context import BaseContext
from pathlib import Path

from cloudnbd.hardening import no_core_dumps

log = logging.getLogger(__name__)

# Set only while the server starts, and removed by it: tells it which backend to warm.
_WARM_ENV = "CLOUDNBD_ZYGOTE_BACKEND"


def context(backend: str) -> BaseContext:
    """The multiprocessing context whose processes fork from the zygote, started warm
    for backend on first use (later calls reuse the running server as it is)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    os.environ[_WARM_ENV] = backend
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.pop(_WARM_ENV, None)
    return ctx


_PR_SET_PDEATHSIG = 1


def bind_to_front(front_pid: int) -> None:
    """In a child, first thing: die with the front, or exit now if it is gone.

    A child must never outlive its front (an orphan finishing an old PUT could roll a
    chunk back). The kernel kills the child when its parent, the zygote, dies, and the
    zygote exits when the front does. The check after prctl closes the gap where the
    zygote died before prctl took effect: then our parent is no longer the zygote that
    the front started.
    """
    no_core_dumps()  # inherited from the zygote already; stated where each child starts
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)  # SIGKILL
    except (OSError, AttributeError):
        log.warning("cannot ask to die with the parent; relying on workers.lock")
    if _parent_of(os.getppid()) != front_pid:
        os._exit(1)


def _parent_of(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state


def _warm(backend: str) -> None:
    """In the server: load everything a child needs, then freeze it for sharing."""
    from cloudnbd.backends import find
    from cloudnbd.engine import workers  # noqa: F401 - the code every child runs
    from cloudnbd.engine.malloc import limit_malloc_retention

    no_core_dumps()  # the zygote was exec'd, which made it dumpable again
    limit_malloc_retention()  # inherited by every child
    find(backend).warm()  # its SDK, and whatever the backend has its children share
    gc.collect()
    gc.freeze()


if (_backend := os.environ.pop(_WARM_ENV, None)) is not None:
    _warm(_backend)
