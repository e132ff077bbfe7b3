"""Config-file volumes: settings, their defaults, and where each value came from.

Precedence, highest first: command line, the volume's file (volumes.d/NAME.conf), the
global file (cloudnbd.conf), built-in defaults. Every setting is defined once in
SETTINGS, which the command-line parser uses too, so the three places cannot drift.

Files are INI-like: `[section]`, `key = value`, comments starting with # or ;. The
global file has one section `[defaults]`; a volume file has `[volume]`. Unknown
sections, unknown keys and bad values are errors naming the file and line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudnbd import backends
from cloudnbd.errors import ConfigError, UsageError
from cloudnbd.sizes import parse_size

DEFAULT_CONFIG_DIR = Path("/etc/cloudnbd")
CONFIG_DIR_ENV = "CLOUDNBD_CONFIG_DIR"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _size(text: str) -> str:
    parse_size(text)  # validate; keep the text so --help and `config` show it as written
    return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("not a TCP port")
    return value


def _float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ValueError("expected yes or no")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text
    return parse


@dataclass(frozen=True)
class Setting:
    parse: Callable[[str], Any]
    default: Any
    help: str
    volume_only: bool = False  # meaningless as a global default


SETTINGS: dict[str, Setting] = {
    "backend": Setting(_choice(*backends.BACKENDS), None, backends.names(), True),
    "location": Setting(str, None, backends.location_help(), True),
    "endpoint_url": Setting(str, None, "S3-compatible endpoint URL"),
    "credentials": Setting(Path, None, "cloudnbd credentials file"),
    "password_file": Setting(Path, None, "file holding the password (mode 0600)", True),
    "port": Setting(_port, 10809, "TCP port", True),
    "bind": Setting(str, "127.0.0.1", "address to listen on"),
    "socket": Setting(Path, None, "Unix socket to listen on instead of TCP", True),
    "export_name": Setting(str, "", "NBD export name", True),
    "read_only": Setting(_bool, False, "refuse writes"),
    "tls": Setting(_choice("off", "on", "require"), "off", "STARTTLS"),
    "tls_cert": Setting(Path, None, "TLS certificate"),
    "tls_key": Setting(Path, None, "TLS private key"),
    "tls_ca": Setting(Path, None, "CA for client certificates"),
    "tls_psk": Setting(Path, None, "pre-shared keys instead of certificates (lines "
                       "username:hexkey, mode 0600; Python 3.13 or later)"),
    "cache": Setting(Path, None, "cache and journal directory"),
    "cache_size": Setting(_size, "2GiB", "bound on clean cached chunks"),
    "max_dirty": Setting(_size, "1GiB", "bound on data not yet uploaded"),
    "uploaders": Setting(_positive_int, 1, "uploader processes"),
    "fetchers": Setting(_positive_int, 1, "fetcher processes"),
    "worker_threads": Setting(_positive_int, 2, "transfers at once in each uploader and "
                              "fetcher"),
    "upload_limit": Setting(_size, None, "upload bandwidth cap per second"),
    "writeback_delay": Setting(_float, 0.5, "seconds a chunk rests before upload"),
    "flush_timeout": Setting(_float, 0.0, "seconds before FLUSH fails with EIO (0: never)"),
    "checkpoint_size": Setting(_size, "128MiB", "the store's journal is folded into chunks "
                               "past this size (a new machine reads at most this much "
                               "at open)"),
    "checkpoint_age": Setting(_float, 3600.0, "or when its oldest object is this many "
                              "seconds old"),
    "gc_grace": Setting(_float, 900.0, "seconds an object no head names is kept before it "
                        "is deleted (readers of an older head still need it)"),
    "timeout": Setting(_float, 60.0, "seconds of retrying before a cloud request fails"),
    "metrics": Setting(str, None, "Prometheus endpoint ADDR:PORT (off when unset)"),
}


@dataclass(frozen=True)
class Value:
    value: Any
    source: str


def config_dir(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return explicit
    return Path(os.environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR)


def _read(path: Path, section: str, volume_file: bool) -> dict[str, Value]:
    found: dict[str, Value] = {}
    current = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} on "
                          f"line {line})") from None
    for number, raw in enumerate(lines, start=1):
        where = f"{path}:{number}"
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError(f"{where}: malformed section header {line!r}")
            current = line[1:-1].strip()
            if current != section:
                raise ConfigError(f"{where}: unknown section [{current}]; this file takes "
                                  f"[{section}]")
            continue
        key, sep, text = line.partition("=")
        key, text = key.strip().replace("-", "_"), text.strip()
        if not sep or not key:
            raise ConfigError(f"{where}: expected `key = value`, got {line!r}")
        if current is None:
            raise ConfigError(f"{where}: {key} is outside a [{section}] section")
        setting = SETTINGS.get(key)
        if setting is None or (setting.volume_only and not volume_file):
            raise ConfigError(f"{where}: unknown key {key!r}")
        if key in found:
            raise ConfigError(f"{where}: {key} is set twice (first at {found[key].source})")
        if text == "":
            found[key] = Value(None, where)
            continue
        try:
            found[key] = Value(setting.parse(text), where)
        except (ValueError, UsageError) as exc:
            reason = exc.message if isinstance(exc, UsageError) else str(exc)
            raise ConfigError(f"{where}: bad value for {key}: {text!r} ({reason})") from None
    return found


def effective(name: str | None, cli: dict[str, Any], directory: Path | None = None
              ) -> dict[str, Value]:
    """Every setting with its value and source; name None means no volume file."""
    base = config_dir(directory)
    layers: list[dict[str, Value]] = []
    global_file = base / "cloudnbd.conf"
    if global_file.exists():
        layers.append(_read(global_file, "defaults", volume_file=False))
    if name is not None:
        if not _NAME_RE.match(name):
            raise UsageError(f"malformed volume name {name!r}")
        volume_file = base / "volumes.d" / f"{name}.conf"
        if not volume_file.exists():
            raise UsageError(f"no volume named {name!r}: {volume_file} does not exist")
        layers.append(_read(volume_file, "volume", volume_file=True))
    result = {key: Value(s.default, "default") for key, s in SETTINGS.items()}
    for layer in layers:
        result.update(layer)
    for key, value in cli.items():
        if value is not None and key in result:
            result[key] = Value(value, "command line")
    if name is not None:
        for key in ("backend", "location"):
            if result[key].value is None:
                raise ConfigError(f"{base / 'volumes.d' / (name + '.conf')}: "
                                  f"{key} is required")
    return result
