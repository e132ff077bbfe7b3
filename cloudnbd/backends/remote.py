"""A store whose requests run in a helper process forked from the zygote.

The front process makes only a handful of cloud requests of its own (the metadata at
open, the lease, one chunk listing, the lease release at close); everything else goes
through the uploaders and fetchers. Loading a cloud SDK for those few would cost the
front ~30 MiB for its whole life, so it asks an agent instead: a child of the zygote
that shares the SDK already loaded there. The agent starts on the first request and
exits on idle() or close(); the next request starts another, which takes milliseconds.

Errors cross the pipe as the CloudnbdError the real store raised, so callers see the
same exceptions (ObjectNotFound, PreconditionFailed, ...) as with a local store.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing.connection
import os
import threading
import traceback
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn

from cloudnbd import zygote
from cloudnbd.backends import StoreOptions, open_store
from cloudnbd.backends.base import ObjectInfo, ObjectStore
from cloudnbd.errors import BackendError, CloudnbdError

log = logging.getLogger(__name__)

_LIST_PAGE = 1000


def _agent_main(conn: multiprocessing.connection.Connection, backend: str, location: str,
                options: StoreOptions, front_pid: int) -> None:
    """Serve (method, args) requests with a real store until the pipe closes."""
    zygote.bind_to_front(front_pid)
    try:
        store = open_store(backend, location, options)
    except CloudnbdError as exc:
        conn.send(("error", exc, (0, {})))
        return
    conn.send(("ok", store.description, (0, {})))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            store.close()
            return
        method, args = request
        with store.counting() as counts:
            def tally() -> tuple[int, dict[str, int]]:
                """The retries so far and the requests since the last reply."""
                sent = dict(counts)
                counts.clear()
                return store.retries, sent

            try:
                if method == "list":  # streamed in pages: a listing can be 100k's of keys
                    page: list[ObjectInfo] = []
                    for info in store.list(*args):
                        page.append(info)
                        if len(page) == _LIST_PAGE:
                            conn.send(("page", page, tally()))
                            page = []
                    result: Any = page
                else:
                    result = getattr(store, method)(*args)
                reply = ("ok", result, tally())
            except CloudnbdError as exc:
                reply = ("error", exc, tally())
            except Exception as exc:  # a bug: report it as a failed request, keep serving
                log.error("store agent: %s", traceback.format_exc())
                reply = ("error", BackendError(f"{store.description}: {method}: {exc}"),
                         tally())
        conn.send(reply)


class RemoteStore(ObjectStore):
    """The ObjectStore interface, served by an agent process (see the module docstring).

    Retries happen in the agent, under the same RetryPolicy; `retries` mirrors its count,
    and the requests the agent made for a call count in the caller's `counting` block.
    """

    def __init__(self, backend: str, location: str, options: StoreOptions) -> None:
        super().__init__(options.retry)
        self._args = (backend, location, dataclasses.replace(options, interactive=False))
        self._lock = threading.Lock()
        self._conn: multiprocessing.connection.Connection | None = None
        self._process: Any = None
        self._retries_base = 0
        with self._lock:
            self.description = self._start()

    def _start(self) -> str:
        ctx = zygote.context(self._args[0])
        parent, child = multiprocessing.Pipe(duplex=True)
        self._process = ctx.Process(target=_agent_main, args=(child, *self._args, os.getpid()),
                                    name="cloudnbd-store-agent", daemon=True)
        self._process.start()
        child.close()
        self._conn = parent
        self._retries_base = self.retries
        try:
            return str(self._result())
        except BaseException:
            self._stop()
            raise

    def _send(self, request: tuple[str, tuple[Any, ...]]) -> None:
        """Send the agent a request, starting one if none runs."""
        if self._conn is None:
            self._start()
        assert self._conn is not None
        try:
            self._conn.send(request)
        except OSError:  # the agent is gone and its end of the pipe closed
            self._died()

    def _died(self) -> NoReturn:
        self._stop()
        raise BackendError(f"the {self._args[0]} store agent died") from None

    def _receive(self) -> tuple[str, Any]:
        """The agent's next message: ("ok" | "page" | "error", value)."""
        assert self._conn is not None
        try:
            status, value, (retries, requests) = self._conn.recv()
        except (EOFError, OSError):
            self._died()
        self.retries = self._retries_base + retries
        for kind, count in requests.items():
            self._answered(kind, count)
        return status, value

    def _result(self) -> Any:
        status, value = self._receive()
        if status == "error":
            raise value
        return value

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            self._send((method, args))
            return self._result()

    def _stop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process = None

    # -- the interface ---------------------------------------------------------------------
    def get_with_version(self, key: str) -> tuple[bytes, str]:
        data, version = self._call("get_with_version", key)
        return bytes(data), str(version)

    def put(self, key: str, data: bytes) -> None:
        self._call("put", key, data)

    def put_if(self, key: str, data: bytes, expected: str | None) -> str:
        return str(self._call("put_if", key, data, expected))

    def _put_if(self, key: str, data: bytes, expected: str | None) -> str:
        return str(self._call("_put_if", key, data, expected))

    def delete(self, key: str) -> None:
        self._call("delete", key)

    def delete_if(self, key: str, expected: str) -> None:
        self._call("delete_if", key, expected)

    def _delete_if(self, key: str, expected: str) -> None:
        self._call("_delete_if", key, expected)

    def delete_many(self, keys: Iterable[str]) -> None:
        self._call("delete_many", list(keys))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            self._send(("list", (prefix,)))
            status = "page"
            try:
                while status == "page":
                    status, value = self._receive()
                    if status == "error":
                        raise value
                    yield from value
            finally:
                while status == "page" and self._conn is not None:  # abandoned: drain
                    status, _ = self._receive()

    def stat(self, key: str) -> ObjectInfo | None:
        result: ObjectInfo | None = self._call("stat", key)
        return result

    def check(self) -> None:
        self._call("check")

    def close(self) -> None:
        """Stop the agent; a later request starts a new one."""
        with self._lock:
            self._stop()

    idle = close
