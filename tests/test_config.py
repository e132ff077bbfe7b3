"""Config-file volumes: precedence (command line > volume file > global file > default),
where each value came from, and errors that name the file and line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cloudnbd import config
from cloudnbd.errors import ConfigError
from testbed.served import cloudnbd


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    (tmp_path / "volumes.d").mkdir()
    (tmp_path / "cloudnbd.conf").write_text(
        "# defaults\n[defaults]\ncache_size = 512MiB\nuploaders = 3\n")
    (tmp_path / "volumes.d" / "photos.conf").write_text(
        "[volume]\nbackend = file\nlocation = /srv/photos\nuploaders = 6\nport = 10999\n")
    return tmp_path


@pytest.mark.unit
def test_precedence_and_sources(etc: Path) -> None:
    settings = config.effective("photos", {"port": 12345}, etc)
    assert settings["port"] == config.Value(12345, "command line")
    assert settings["uploaders"] == config.Value(6, f"{etc}/volumes.d/photos.conf:4")
    assert settings["cache_size"] == config.Value("512MiB", f"{etc}/cloudnbd.conf:3")
    assert settings["fetchers"] == config.Value(config.SETTINGS["fetchers"].default, "default")
    assert settings["location"].value == "/srv/photos"


@pytest.mark.unit
@pytest.mark.parametrize("line,message", [
    ("bogus = 1", "photos.conf:6: unknown key 'bogus'"),
    ("fetchers = zero", "photos.conf:6: bad value for fetchers"),
    ("writeback_delay = -1", "photos.conf:6: bad value for writeback_delay"),
    ("uploaders = 2", "photos.conf:6: uploaders is set twice"),
    ("just words", "photos.conf:6: expected `key = value`"),
])
def test_bad_lines_name_file_and_line(etc: Path, line: str, message: str) -> None:
    with open(etc / "volumes.d" / "photos.conf", "a") as f:
        f.write(line + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.effective("photos", {}, etc)


@pytest.mark.unit
def test_volume_only_keys_are_refused_in_the_global_file(etc: Path) -> None:
    with open(etc / "cloudnbd.conf", "a") as f:
        f.write("location = /x\n")
    expected = re.escape("cloudnbd.conf:5: unknown key 'location'")
    with pytest.raises(ConfigError, match=expected):
        config.effective(None, {}, etc)


def test_unknown_volume_name_is_one_line(etc: Path) -> None:
    result = cloudnbd("--config-dir", str(etc), "info", "music", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"cloudnbd: error: no volume named 'music': {etc}/volumes.d/music.conf does not "
        f"exist"]


def test_config_command_prints_values_and_sources(etc: Path) -> None:
    out = cloudnbd("--config-dir", str(etc), "config", "photos").stdout
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert lines["uploaders"].split()[1:] == ["6", f"{etc}/volumes.d/photos.conf:4"]
    assert lines["fetchers"].split()[1:] == [str(config.SETTINGS["fetchers"].default),
                                             "default"]
