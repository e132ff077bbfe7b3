"""Cloud credentials when the SDKs' own chains find none: a cloudnbd credentials file,
or the terminal.

Order: an explicit --credentials FILE; the SDK's standard chain (environment, ~/.aws,
application default credentials); the default file ~/.config/cloudnbd/credentials; and,
on a terminal, asking, with an offer to save the answer to that file (created 0600). The
file must not be readable by others. Secrets never reach a log line or a repr.
"""

from __future__ import annotations

import configparser
import getpass
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cloudnbd.errors import BackendError
from cloudnbd.password import check_private_file

DEFAULT_FILE = Path("~/.config/cloudnbd/credentials")


@dataclass(frozen=True)
class S3Credentials:
    """A static S3 key pair; its repr shows neither half."""

    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)


def default_file() -> Path:
    return DEFAULT_FILE.expanduser()


def _read(path: Path) -> configparser.ConfigParser:
    check_private_file(path, "credentials file")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    except configparser.Error as exc:
        raise BackendError(f"credentials file {path} is malformed: {exc}") from None
    return parser


def save(path: Path, section: str, values: dict[str, str]) -> None:
    """Add or replace section in the credentials file, which is created 0600."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    parser = _read(path) if path.exists() else configparser.ConfigParser(interpolation=None)
    parser[section] = values
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        parser.write(f)


def _option(parser: configparser.ConfigParser, path: Path, section: str, name: str) -> str:
    value = parser.get(section, name, fallback="").strip()
    if not value:
        raise BackendError(f"credentials file {path}: [{section}] has no {name}")
    return value


def _s3_from(parser: configparser.ConfigParser, path: Path) -> S3Credentials:
    return S3Credentials(_option(parser, path, "s3", "aws_access_key_id"),
                         _option(parser, path, "s3", "aws_secret_access_key"))


def _can_ask(interactive: bool) -> bool:
    return interactive and sys.stdin.isatty()


def _sdk_has_s3_credentials() -> bool:
    import boto3

    return boto3.session.Session().get_credentials() is not None


def _offer_to_save(path: Path, section: str, values: dict[str, str]) -> None:
    answer = input(f"Keep these in {path} (mode 0600)? [y/N] ").strip().lower()
    if answer in ("y", "yes"):
        save(path, section, values)
        print(f"Saved to {path}.", file=sys.stderr)


def s3_credentials(explicit: Path | None, interactive: bool) -> S3Credentials | None:
    """Credentials to pass to boto3, or None to let its own chain decide."""
    if explicit is not None:
        parser = _read(explicit)
        if not parser.has_section("s3"):
            raise BackendError(f"credentials file {explicit} has no [s3] section")
        return _s3_from(parser, explicit)
    if _sdk_has_s3_credentials():
        return None
    path = default_file()
    if path.exists():
        parser = _read(path)
        if parser.has_section("s3"):
            return _s3_from(parser, path)
    if not _can_ask(interactive):
        raise BackendError("no S3 credentials found: set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY, configure ~/.aws, or give --credentials "
                           "FILE with an [s3] section")
    access_key = input("S3 access key id: ").strip()
    secret_key = getpass.getpass("S3 secret access key: ").strip()
    if not access_key or not secret_key:
        raise BackendError("no S3 credentials given")
    _offer_to_save(path, "s3", {"aws_access_key_id": access_key,
                                "aws_secret_access_key": secret_key})
    return S3Credentials(access_key, secret_key)


def _sdk_has_gcs_credentials() -> bool:
    import google.auth
    import google.auth.exceptions

    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        return False
    return True


def gcs_credentials_file(explicit: Path | None, interactive: bool) -> Path | None:
    """A service-account key file to use, or None for application default credentials."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return None
    if explicit is not None:
        parser = _read(explicit)
        if not parser.has_section("gs"):
            raise BackendError(f"credentials file {explicit} has no [gs] section")
        return Path(_option(parser, explicit, "gs", "service_account_file")).expanduser()
    if _sdk_has_gcs_credentials():
        return None
    path = default_file()
    if path.exists():
        parser = _read(path)
        if parser.has_section("gs"):
            return Path(_option(parser, path, "gs", "service_account_file")).expanduser()
    if not _can_ask(interactive):
        raise BackendError("no Google Cloud credentials found: run `gcloud auth "
                           "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, "
                           "or give --credentials FILE with a [gs] section")
    key_file = Path(input("Path to a service-account key file (JSON): ").strip()).expanduser()
    if not key_file.is_file():
        raise BackendError(f"{key_file} is not a file")
    _offer_to_save(path, "gs", {"service_account_file": str(key_file.absolute())})
    return key_file
