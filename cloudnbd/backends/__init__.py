"""The backends cloudnbd knows, and the factory that turns `BACKEND LOCATION` into a store.

A backend is known by its `Backend` entry in REGISTRY, which says everything cloudnbd
needs without loading the backend: the command line's choices and help, the values a
config file accepts, how a location is checked and named on this machine, which libraries
it logs through and whether the front may open it itself. Its module (a BackendModule),
imported only when a store is opened or the zygote warms up, provides two functions:

    open_store(location: str, options: StoreOptions) -> ObjectStore
        the store, with credentials found through cloudnbd.credentials.lookup;
        location has passed Backend.check_location already
    warm() -> None
        load in the zygote what every worker should share (cloudnbd.zygote)

Nothing here imports a cloud SDK: the front process imports this module and must never
load one (docs/design.md, "Processes"; tests/test_backends.py checks).

Adding a backend (docs/design.md, "Backends"): its module, one entry in REGISTRY, its SDK
in setup.py and cloudnbd.spec, its paragraph in cloudnbd.1 and README, its test server
(testbed/stores.py starts it) and its BackendEnv in tests/servers.py' TEST_SERVERS;
tests/test_backends.py fails until each is there.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol, cast

from cloudnbd.backends.base import ObjectStore, RetryPolicy
from cloudnbd.errors import UsageError


@dataclass(frozen=True)
class StoreOptions:
    """How to reach a store; never holds secrets itself."""

    endpoint_url: str | None = None
    credentials_file: Path | None = None
    interactive: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)


class BackendModule(Protocol):
    """What a backend's module provides (see the module docstring)."""

    def open_store(self, location: str, options: StoreOptions) -> ObjectStore: ...

    def warm(self) -> None: ...


class Location(Enum):
    """What a backend's LOCATION names; the value is its help text."""

    DIRECTORY = "a directory"
    BUCKET = "BUCKET/PREFIX"


@dataclass(frozen=True)
class Backend:
    """One backend, as far as it can be known without importing it."""

    name: str  # BACKEND on the command line, `backend =` in a config file
    help: str  # what it stores in, for --help
    location: Location
    module: str  # a BackendModule, imported only when needed
    sdk: str | None = None  # the distribution it needs (setup.py), None: nothing to load
    loggers: tuple[str, ...] = ()  # its libraries' loggers, kept quiet under --debug (logs)

    @property
    def in_front(self) -> bool:
        """Whether the front process opens this store itself. A backend with an SDK is
        reached through a store agent instead (backends/remote.py), so that the
        long-lived front never carries the SDK's memory."""
        return self.sdk is None

    def check_location(self, location: str) -> None:
        """UsageError for a location this backend cannot name; needs no import."""
        if self.location is Location.DIRECTORY:
            if not location:
                raise UsageError(f"{self.name} backend needs a directory")
        else:
            split_bucket(self.name, location)

    def normalize(self, location: str) -> str:
        """The location as a stable key: absolute for directories, no outer slashes."""
        if self.location is Location.DIRECTORY:
            return str(Path(location).expanduser().absolute())
        return location.strip("/")

    def open(self, location: str, options: StoreOptions | None = None) -> ObjectStore:
        self.check_location(location)  # a typo costs no SDK import and no credential prompt
        return self._module().open_store(location, options or StoreOptions())

    def warm(self) -> None:
        self._module().warm()

    def _module(self) -> BackendModule:
        return cast(BackendModule, importlib.import_module(self.module))


REGISTRY: tuple[Backend, ...] = (
    Backend("file", "a local directory", Location.DIRECTORY, "cloudnbd.backends.file"),
    Backend("s3", "Amazon S3 or an S3-compatible store", Location.BUCKET,
            "cloudnbd.backends.s3", sdk="boto3", loggers=("botocore", "boto3", "s3transfer")),
    Backend("gs", "Google Cloud Storage", Location.BUCKET, "cloudnbd.backends.gs",
            sdk="google-cloud-storage", loggers=("google",)),
)
BACKENDS = tuple(backend.name for backend in REGISTRY)
_BY_NAME = {backend.name: backend for backend in REGISTRY}


def find(name: str) -> Backend:
    """The backend called name; UsageError naming the choices if there is none."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UsageError(f"unknown backend {name!r}: choose one of "
                         f"{', '.join(BACKENDS)}") from None


def names() -> str:
    """'file, s3 or gs', for help texts."""
    return _enumerate(BACKENDS, "or")


def describe() -> str:
    """'file (a local directory), s3 (...), gs (...)', for help texts."""
    return ", ".join(f"{b.name} ({b.help})" for b in REGISTRY)


def location_help() -> str:
    """'file: a directory; s3 and gs: BUCKET/PREFIX', for help texts."""
    groups = {kind: [b.name for b in REGISTRY if b.location is kind] for kind in Location}
    return "; ".join(f"{_enumerate(group, 'and')}: {kind.value}"
                     for kind, group in groups.items() if group)


def _enumerate(words: Sequence[str], conjunction: str) -> str:
    if len(words) == 1:
        return words[0]
    return f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


def split_bucket(backend: str, location: str) -> tuple[str, str]:
    """BUCKET/PREFIX as (bucket, prefix); UsageError if it names no valid bucket."""
    bucket, _, prefix = location.partition("/")
    if len(bucket) < 3 or any(c in bucket for c in " \\:"):
        raise UsageError(f"malformed {backend} location {location!r}: expected "
                         f"BUCKET/PREFIX with a bucket name of at least 3 characters")
    return bucket, prefix


def open_store(backend: str, location: str, options: StoreOptions | None = None
               ) -> ObjectStore:
    """The store rooted at location (a directory for file, BUCKET/PREFIX otherwise)."""
    return find(backend).open(location, options)
