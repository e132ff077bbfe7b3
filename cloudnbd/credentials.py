"""Cloud credentials when the SDKs' own chains find none: a cloudnbd credentials file,
or the terminal.

Order, the same for every backend: an explicit --credentials FILE; the SDK's standard
chain (environment, ~/.aws, application default credentials); the default file
~/.config/cloudnbd/credentials; and, on a terminal, asking, with an offer to save the
answer to that file (created 0600). The file must not be readable by others. Each
backend says what it wants (a `Wanted`: its section of the file, the questions, how its
SDK's chain is asked) and calls lookup(); this module knows no backend. Secrets never
reach a log line or a repr.
"""

from __future__ import annotations

import configparser
import getpass
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cloudnbd.errors import BackendError
from cloudnbd.password import check_private_file

DEFAULT_FILE = Path("~/.config/cloudnbd/credentials")


@dataclass(frozen=True)
class Question:
    """One value of a backend's credentials: its key in the file, and how it is asked."""

    option: str
    prompt: str
    secret: bool = False  # asked without echo
    # checks an answer typed on the terminal and returns what to keep (BackendError if bad)
    accept: Callable[[str], str] | None = None


@dataclass(frozen=True)
class Wanted:
    """What one backend's credentials are and where else they may come from."""

    section: str  # of the credentials file: the backend's name
    what: str  # for messages: "S3 credentials"
    hint: str  # how to provide them, when none are found and none can be asked
    questions: tuple[Question, ...]
    sdk_has_credentials: Callable[[], bool]  # whether the SDK's own chain finds some


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


def _values(parser: configparser.ConfigParser, path: Path, wanted: Wanted) -> dict[str, str]:
    found = {}
    for question in wanted.questions:
        value = parser.get(wanted.section, question.option, fallback="").strip()
        if not value:
            raise BackendError(f"credentials file {path}: [{wanted.section}] has no "
                               f"{question.option}")
        found[question.option] = value
    return found


def _can_ask(interactive: bool) -> bool:
    return interactive and sys.stdin.isatty()


def _ask(wanted: Wanted) -> dict[str, str]:
    answers = {}
    for question in wanted.questions:
        answer = (getpass.getpass if question.secret else input)(question.prompt).strip()
        if not answer:
            raise BackendError(f"no {wanted.what} given")
        answers[question.option] = question.accept(answer) if question.accept else answer
    return answers


def _offer_to_save(path: Path, section: str, values: dict[str, str]) -> None:
    answer = input(f"Keep these in {path} (mode 0600)? [y/N] ").strip().lower()
    if answer in ("y", "yes"):
        save(path, section, values)
        print(f"Saved to {path}.", file=sys.stderr)


def lookup(wanted: Wanted, explicit: Path | None, interactive: bool
           ) -> dict[str, str] | None:
    """The backend's credentials as option -> value, or None to let its SDK's chain
    decide (see the module docstring for the order)."""
    if explicit is not None:
        parser = _read(explicit)
        if not parser.has_section(wanted.section):
            raise BackendError(f"credentials file {explicit} has no [{wanted.section}] "
                               f"section")
        return _values(parser, explicit, wanted)
    if wanted.sdk_has_credentials():
        return None
    path = default_file()
    if path.exists():
        parser = _read(path)
        if parser.has_section(wanted.section):
            return _values(parser, path, wanted)
    if not _can_ask(interactive):
        raise BackendError(f"no {wanted.what} found: {wanted.hint}")
    answers = _ask(wanted)
    _offer_to_save(path, wanted.section, answers)
    return answers
