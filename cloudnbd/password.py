"""Where passwords come from: --password-file, a systemd credential, CLOUDNBD_PASSWORD,
or the terminal, in that order.

Passwords never come from the command line (they would show in ps and shell history) and
never reach a log. CLOUDNBD_PASSWORD is taken out of the environment when the command
starts (scrub_environment), before any child exists, so no child inherits it and
/proc/PID/environ does not show it. Under systemd, `LoadCredential=password:FILE` is
the better way: the unit's credential directory is private to the service and never
enters an environment.
"""

from __future__ import annotations

import getpass
import os
import stat
import sys
from pathlib import Path

from cloudnbd.errors import CloudnbdError, UsageError
from cloudnbd.hardening import wipe_initial_environment

ENV_VAR = "CLOUDNBD_PASSWORD"
#: the name of the systemd credential holding the password (LoadCredential=password:FILE)
CREDENTIAL = "password"

_from_environment: list[str] = []  # CLOUDNBD_PASSWORD, once taken out of the environment
_credential_used: list[bool] = []


def scrub_environment() -> None:
    """Take CLOUDNBD_PASSWORD out of the environment, keeping it for get_password()."""
    value = wipe_initial_environment(ENV_VAR)
    if value is not None:
        _from_environment[:] = [value]


def _credential() -> Path | None:
    """The password systemd handed over as a credential, if any (systemd.exec(5)). Like
    the variable it answers the first request only: passwd's new password must come
    from elsewhere."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory or _credential_used:
        return None
    path = Path(directory) / CREDENTIAL
    if not path.exists():
        return None
    _credential_used.append(True)
    return path


def check_private_file(path: Path, what: str) -> None:
    """Refuse a secret-holding file that others can read or that another user owns."""
    try:
        st = path.stat()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CloudnbdError(f"{what} {path} is accessible by others (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
    if st.st_uid != os.getuid():
        raise CloudnbdError(f"{what} {path} is owned by another user")


def read_password_file(path: Path) -> str:
    check_private_file(path, "password file")
    text = path.read_text(encoding="utf-8")
    # One trailing newline is what editors and `echo` add; it is not part of the password.
    return text[:-1] if text.endswith("\n") else text


def get_password(password_file: Path | None, *, confirm: bool = False,
                 prompt: str = "Password: ") -> str:
    """The password for this command, from the first source that has one."""
    if password_file is not None:
        return read_password_file(password_file)
    credential = _credential()
    if credential is not None:
        return read_password_file(credential)
    scrub_environment()
    if _from_environment:
        return _from_environment.pop()
    if not sys.stdin.isatty():
        raise UsageError(f"a password is needed: use --password-file FILE or set {ENV_VAR} "
                         f"(no terminal to ask on)")
    password = getpass.getpass(prompt)
    if confirm:
        if not password:
            raise UsageError("the password must not be empty")
        if getpass.getpass("Repeat password: ") != password:
            raise UsageError("the passwords do not match")
    return password
