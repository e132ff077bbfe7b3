"""What a newcomer meets in the first hour: every mistake is one line with the documented
exit status, and what the commands print means what it says (issue 16).

Tests marked unit run the CLI in this process (cloudnbd.cli.main); the others run the real
command in a subprocess, as a user does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cloudnbd import volume
from cloudnbd.backends.file import FileStore
from cloudnbd.cli import main
from cloudnbd.runtime import default_cache_root
from testbed.served import CLI, KDF, cloudnbd, start
from tests.test_cli import assert_one_line_error

ROOT = Path(__file__).resolve().parent.parent


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """cloudnbd argv in this process: (exit status, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own exit
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def location(tmp_path: Path) -> str:
    (tmp_path / "bucket").mkdir()
    return str(tmp_path / "bucket" / "vol")


@pytest.fixture
def made(location: str, password_file: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """A 64 MiB file-backend volume at location."""
    code, _, err = run(capsys, "init", "file", location, "64MiB", "--password-file",
                       str(password_file), *KDF)
    assert code == 0, err
    return location


# -- sizes and the KDF ---------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("command", ["init", "resize"])
def test_a_negative_size_is_a_one_line_size_error(
        made: str, password_file: Path, capsys: pytest.CaptureFixture[str],
        command: str) -> None:
    target = made if command == "resize" else made + "-new"
    result = run(capsys, command, "file", target, "-5GB", "--password-file",
                 str(password_file))
    assert_one_line_error(result, 2, "malformed size '-5GB'")
    assert "usage:" not in result[2]


@pytest.mark.unit
@pytest.mark.parametrize("cost", ["23", "24", "9"])
def test_a_kdf_cost_out_of_range_is_one_line(
        location: str, password_file: Path, capsys: pytest.CaptureFixture[str],
        cost: str) -> None:
    result = run(capsys, "init", "file", location, "64MiB", "--password-file",
                 str(password_file), "--kdf-cost", cost)
    assert_one_line_error(result, 2, "--kdf-cost")
    assert "10 to 22" in result[2]
    assert not Path(location).exists()


@pytest.mark.unit
def test_the_largest_kdf_cost_offered_works() -> None:
    from cloudnbd.codec import ScryptParams

    assert len(ScryptParams(n=2**20).derive("pw", b"s" * 16)) == 32


@pytest.mark.unit
def test_a_volume_open_could_not_hold_in_memory_is_refused_with_the_rule(
        location: str, password_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "init", "file", location, "100PB", "--password-file",
                 str(password_file), *KDF)
    assert_one_line_error(result, 2, "1 PiB")
    assert "byte per chunk" in result[2] and "--chunk-size" in result[2]
    assert not Path(location).exists()
    # the same rule scales with the chunk size: 64 MiB chunks hold 16 PiB
    code, _, err = run(capsys, "init", "file", location, "10PB", "--chunk-size",
                         "64MiB", "--password-file", str(password_file), *KDF)
    assert code == 0, err


@pytest.mark.unit
def test_resize_past_the_chunk_limit_is_refused(
        made: str, password_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "resize", "file", made, "2PiB", "--password-file",
                 str(password_file))
    assert_one_line_error(result, 2, "1 PiB")
    assert volume.read_metadata(FileStore(Path(made)))[0].size == 64 * 2**20


def test_growing_an_open_volume_past_the_chunk_limit_is_refused(
        location: str, password_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The same rule when the running server grows the volume: 64 KiB chunks hold at
    most 16 TiB, and the server must not grow its per-chunk state past MAX_CHUNKS."""
    code, _, err = run(capsys, "init", "file", location, "64MiB", "--chunk-size", "64KiB",
                       "--password-file", str(password_file), *KDF)
    assert code == 0, err
    served = start(tmp_path, "file", location, password_file)
    try:
        result = served.cli("resize", "17TiB", "--cache", str(served.cache),
                            "--password-file", str(password_file), check=False)
        assert_one_line_error((result.returncode, result.stdout, result.stderr), 2,
                              "16 TiB")
        assert volume.read_metadata(FileStore(Path(location)))[0].size == 64 * 2**20
    finally:
        served.close()


# -- what the commands print ---------------------------------------------------------------

@pytest.mark.unit
def test_info_counts_key_slots_and_names_each(
        made: str, password_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "info", "file", made, "--password-file", str(password_file))
    assert code == 0, err
    assert "key slots:       1 (slot 0: Argon2id 1 MiB, 3 passes, 4 lanes)\n" in out
    second = password_file.parent / "second"
    second.write_text("another one\n")
    second.chmod(0o600)
    run(capsys, "passwd", "file", made, "--add", "--password-file", str(password_file),
        "--new-password-file", str(second), *KDF)
    _, out, _ = run(capsys, "info", "file", made, "--password-file", str(password_file))
    assert "key slots:       2 (slot 0: Argon2id 1 MiB, 3 passes, 4 lanes; slot 1: Argon2id" in out


@pytest.mark.unit
def test_config_shows_the_default_cache_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--config-dir", str(tmp_path), "config")
    assert code == 0, err
    [line] = [line for line in out.splitlines() if line.startswith("cache ")]
    assert line.split() == ["cache", str(default_cache_root()), "default"]


@pytest.mark.unit
def test_list_json_gives_locations_the_other_commands_take(
        made: str, tmp_path: Path, password_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    base = str(tmp_path / "bucket")
    code, out, err = run(capsys, "list", "file", base, "--json")
    assert code == 0, err
    [found] = json.loads(out)
    assert found["location"] == made
    code, _, err = run(capsys, "info", "file", found["location"], "--password-file",
                       str(password_file))
    assert code == 0, err


# -- local files the user gave -------------------------------------------------------------

@pytest.mark.unit
def test_a_config_file_that_is_not_utf8_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cloudnbd.conf").write_bytes(b"[defaults]\ncache_size = 1GiB \xff\n")
    result = run(capsys, "--config-dir", str(tmp_path), "config")
    assert_one_line_error(result, 2, f"{tmp_path / 'cloudnbd.conf'}: not UTF-8 text")


def _read_only(directory: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """command run where directory is a read-only mount (a private mount namespace)."""
    script = ('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"')
    return subprocess.run(["unshare", "-m", "sh", "-c", script, str(directory), *command],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_a_read_only_cache_is_one_line(made: str, password_file: Path, tmp_path: Path,
                                       foreground: bool) -> None:
    readonly = tmp_path / "ro"
    readonly.mkdir()
    extra = ["--foreground", "--socket", str(tmp_path / "s.sock")] if foreground else \
        ["--socket", str(tmp_path / "s.sock")]
    result = _read_only(readonly, *CLI, "open", "file", made, "--cache",
                        str(readonly / "cache"), "--password-file", str(password_file),
                        *extra)
    assert_one_line_error((result.returncode, result.stdout, result.stderr), 1,
                          "Read-only file system")
    assert str(readonly / "cache") in result.stderr


def test_a_socket_path_longer_than_unix_allows_is_one_line(
        made: str, password_file: Path, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    result = cloudnbd("open", "file", made, "--socket", str(deep / "nbd.sock"),
                      "--cache", str(tmp_path / "cache"), "--password-file",
                      str(password_file), check=False)
    assert_one_line_error((result.returncode, result.stdout, result.stderr), 2,
                          "at most 107 bytes")


def test_a_cache_deeper_than_a_socket_path_still_opens_and_closes(
        made: str, password_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / ("c" * 90) / "cache"
    served = start(tmp_path, "file", made, password_file, cache=cache)
    assert len(os.fsencode(next(cache.iterdir()) / "control.sock")) > 108
    assert served.status()["connections"] == 0
    closed = served.close()
    assert "everything is uploaded" in closed.stdout


def test_a_port_in_use_says_so(made: str, password_file: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cloudnbd("open", "file", made, "-p", str(port), "--cache",
                          str(tmp_path / "cache"), "--password-file", str(password_file),
                          check=False)
    assert_one_line_error((result.returncode, result.stdout, result.stderr), 1,
                          f"port {port} on 127.0.0.1 is in use")


# -- the manual ----------------------------------------------------------------------------

def test_help_says_where_the_manual_is() -> None:
    out = cloudnbd("--help").stdout
    [page] = re.findall(r"man (/\S+/cloudnbd\.1)", out)
    assert Path(page).is_file(), out


def test_man_finds_the_page_where_pip_installs_it(tmp_path: Path) -> None:
    """`pip install .` (what `make demo` does in .venv) puts the page under the prefix's
    share/man, where `man` looks once the prefix's bin/ is on PATH (man-db derives a man
    path from PATH), and `cloudnbd --help` names it."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".*", "build", "demo", "tests", "bench", "__pycache__", "*.egg-info"))
    prefix = tmp_path / "prefix"
    # --ignore-installed: without it pip uninstalls the cloudnbd the tests run (the
    # editable install in .venv) before installing into the prefix
    built = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "--ignore-installed", "--no-build-isolation", "--no-index",
                            "--prefix", str(prefix),
                            str(source)], capture_output=True, text=True, timeout=600,
                           cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    page = prefix / "share/man/man1/cloudnbd.1"
    env = {**os.environ, "PATH": f"{prefix / 'bin'}:/usr/bin:/bin", "MANPATH": "",
           "PYTHONPATH": next(str(p) for p in prefix.glob("lib/python3*/site-packages"))}
    where = subprocess.run(["man", "-w", "cloudnbd"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert where.stdout.strip() == str(page), where
    helped = subprocess.run([str(prefix / "bin" / "cloudnbd"), "--help"], env=env,
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert f"man {page}" in helped.stdout, helped
