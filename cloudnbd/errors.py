"""The one exception hierarchy of cloudnbd: every error a user can meet is defined here.

Every error a user can cause or meet carries a message written for that user; the CLI
prints it as a single line and exits with the class's exit code. Internal bugs are not
CloudnbdError and surface as tracebacks (with --debug) so they are never mistaken for
ordinary failures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloudnbd.lease import Holder


class CloudnbdError(Exception):
    """An error with a message meant for the user."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(CloudnbdError):
    """Bad command-line input: malformed size, unknown backend, missing argument."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file is malformed: the message names the file and line."""


class BackendError(CloudnbdError):
    """The object store failed: unreachable, permission denied, missing bucket."""

    exit_code = 3


class CloudUnreachable(BackendError):
    """Uploads stopped making progress (close, or a FLUSH with a deadline)."""


class ObjectNotFound(BackendError):
    """A requested object does not exist."""


class PreconditionFailed(BackendError):
    """A conditional write lost: the object already exists or changed."""


class VolumeNotFound(CloudnbdError):
    """No volume at the given location."""

    exit_code = 4


class VolumeExists(CloudnbdError):
    """init refused because a volume is already there."""

    exit_code = 5


class LocationInUse(VolumeExists):
    """init refused because the location holds other objects, or lies inside or above
    another volume: a volume owns only its own keys, and shares its location with
    nothing."""


class WrongPassword(CloudnbdError):
    """No key slot opens with the given password."""

    exit_code = 6


class IntegrityError(CloudnbdError):
    """Authenticated data failed verification: corruption, tampering or a foreign object."""

    exit_code = 7


class DamagedVolume(IntegrityError):
    """verify found chunks that do not authenticate."""


class UnsupportedFormat(CloudnbdError):
    """The volume was written by a newer cloudnbd (or is not a cloudnbd volume)."""

    exit_code = 8


class NotOpen(CloudnbdError):
    """close or status of a volume that no server of this machine is running."""

    exit_code = 10


class NeedsRecovery(CloudnbdError):
    """A server of this machine stopped with writes not yet uploaded: open, then close."""

    exit_code = 11


class VolumeBusy(CloudnbdError):
    """Another server (here or on another machine) holds the volume's lease; holder says
    who, when known (lease.Holder)."""

    exit_code = 9

    def __init__(self, message: str, holder: Holder | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class CacheLocked(VolumeBusy):
    """A server of this machine holds the volume's cache directory."""


class Displaced(VolumeBusy):
    """Another server took the volume's lease: this one must stop writing (E5)."""


def local_error(exc: OSError) -> CloudnbdError:
    """A failed local file or socket operation (a read-only or full disk, a missing or
    forbidden directory) as the one line its user needs: the path and the reason."""
    where = f"{exc.filename}: " if exc.filename else ""
    return CloudnbdError(f"{where}{exc.strerror or exc}")
