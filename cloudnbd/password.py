"""Where passwords come from: --password-file, CLOUDNBD_PASSWORD, or the terminal.

Passwords never come from the command line (they would show in ps and shell history) and
never reach a log. CLOUDNBD_PASSWORD is removed from the environment once read, so no child
process inherits it.
"""

from __future__ import annotations

import getpass
import os
import stat
import sys
from pathlib import Path

from cloudnbd.errors import CloudnbdError, UsageError

ENV_VAR = "CLOUDNBD_PASSWORD"


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
    from_env = os.environ.pop(ENV_VAR, None)
    if from_env is not None:
        return from_env
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
