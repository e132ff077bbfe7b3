"""The volume commands, once per backend (file, s3 on SeaweedFS, gs on fake-gcs-server),
run as a user runs them: the real command in a subprocess.

Every failure must be one line on stderr, a non-zero exit, and no change in the bucket.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from cloudnbd import volume
from testbed.served import CLI, KDF, cloudnbd, on_terminal
from testbed.stores import free_port
from tests.servers import BackendEnv


class Cli:
    def __init__(self, env: BackendEnv, tmp_path: Path) -> None:
        self.env = env
        self.password = tmp_path / "pw"
        self.password.write_text("first password\n")
        self.password.chmod(0o600)
        self.new_password = tmp_path / "pw2"
        self.new_password.write_text("second password\n")
        self.new_password.chmod(0o600)

    def __call__(self, command: str, location: str, *args: str, check: bool = True
                 ) -> tuple[int, str, str]:
        result = cloudnbd(command, self.env.name, location, *self.env.cli_args, *args,
                          env=self.env.env, check=check)
        return result.returncode, result.stdout, result.stderr

    def snapshot(self, location: str) -> dict[str, bytes]:
        store = self.env.store(location)
        return {info.key: store.get(info.key) for info in store.list()}


@pytest.fixture
def cli(backend_env: BackendEnv, tmp_path: Path) -> Cli:
    return Cli(backend_env, tmp_path)


def assert_one_line_error(result: tuple[int, str, str], code: int, text: str) -> None:
    status, _, stderr = result
    assert status == code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cloudnbd: error: "), stderr
    assert text in lines[0]


def test_init_info_reports_rounding_and_stores_nothing(cli: Cli) -> None:
    location = cli.env.new_location()
    _, out, _ = cli("init", location, "20GB", "--password-file", str(cli.password), *KDF)
    assert "20000002048 bytes" in out and "rounded up from 20000000000" in out
    _, out, _ = cli("info", location, "--password-file", str(cli.password), "--json")
    info = json.loads(out)
    assert info["size"] == 20000002048 and info["chunk_size"] == 4 * 2**20
    assert info["format_version"] == 3 and info["stored_chunks"] == 0
    assert info["head"]["generation"] == 1 and info["stored_bytes"] == 0
    assert [s["slot"] for s in info["key_slots"]] == [0]
    assert sorted(cli.snapshot(location)) == [info["head"]["key"], "volume.json"]


def test_passwd_rewrites_only_key_slots(cli: Cli, tmp_path: Path) -> None:
    location = cli.env.new_location()
    cli("init", location, "64MiB", "--password-file", str(cli.password), *KDF)
    image = tmp_path / "image"
    image.write_bytes(bytes(range(256)) * 4096 * 30)
    cloudnbd("import", str(image), cli.env.name, location, *cli.env.cli_args,
             "--password-file", str(cli.password), "--yes", env=cli.env.env)
    before = cli.snapshot(location)
    assert len([k for k in before if k.startswith("chunks/")]) == 8
    cli("passwd", location, "--password-file", str(cli.password), "--new-password-file",
        str(cli.new_password), *KDF)
    after = cli.snapshot(location)
    assert {k: v for k, v in after.items() if k != "volume.json"} == \
        {k: v for k, v in before.items() if k != "volume.json"}
    assert after["volume.json"] != before["volume.json"]
    assert_one_line_error(cli("info", location, "--password-file", str(cli.password),
                              check=False), 6, "wrong password")
    cli("info", location, "--password-file", str(cli.new_password))
    cli("passwd", location, "--password-file", str(cli.new_password), "--add",
        "--new-password-file", str(cli.password), *KDF)
    _, out, _ = cli("info", location, "--password-file", str(cli.password), "--json")
    assert [s["slot"] for s in json.loads(out)["key_slots"]] == [0, 1]


def test_resize_grow_and_shrink(cli: Cli, tmp_path: Path) -> None:
    location = cli.env.new_location()
    cli("init", location, "16MiB", "--password-file", str(cli.password), *KDF)
    image = tmp_path / "image"
    image.write_bytes(b"\x07" * 16 * 2**20)
    cloudnbd("import", str(image), cli.env.name, location, *cli.env.cli_args,
             "--password-file", str(cli.password), "--yes", env=cli.env.env)
    _, out, _ = cli("resize", location, "32MiB", "--password-file", str(cli.password))
    assert "to 32 MiB" in out
    before = cli.snapshot(location)
    assert_one_line_error(cli("resize", location, "6MiB", "--password-file",
                              str(cli.password), check=False), 2, "--shrink")
    assert cli.snapshot(location) == before
    cli("resize", location, "6MiB", "--shrink", "--yes", "--password-file",
        str(cli.password))
    stored = sorted(k[:23] for k in cli.snapshot(location) if k.startswith("chunks/"))
    assert stored == ["chunks/0000000000000000", "chunks/0000000000000001"]
    export = tmp_path / "export"
    cloudnbd("export", cli.env.name, location, str(export), *cli.env.cli_args,
             "--password-file", str(cli.password), env=cli.env.env)
    assert export.read_bytes() == b"\x07" * 6 * 2**20


def test_list_and_delete(cli: Cli) -> None:
    base = cli.env.new_location()
    if cli.env.name == "file":
        Path(base).mkdir()
    for name in ("photos", "music"):
        cli("init", f"{base}/{name}", "1GiB", "--password-file", str(cli.password), *KDF)
    out = cloudnbd("list", cli.env.name, base, *cli.env.cli_args, env=cli.env.env).stdout
    assert f"{base}/music\t1 GiB" in out and f"{base}/photos\t1 GiB" in out
    assert_one_line_error(cli("delete", f"{base}/music", check=False), 2, "--yes")
    cli("delete", f"{base}/music", "--yes")
    assert cli.snapshot(f"{base}/music") == {}
    assert "volume.json" in cli.snapshot(f"{base}/photos")


def test_errors_are_one_line_and_change_nothing(cli: Cli) -> None:
    location = cli.env.new_location()
    cli("init", location, "1GiB", "--password-file", str(cli.password), *KDF)
    before = cli.snapshot(location)
    pw = ["--password-file", str(cli.password)]
    assert_one_line_error(cli("init", location, "1GiB", *pw, *KDF, check=False), 5,
                          "already exists")
    assert_one_line_error(cli("init", cli.env.new_location(), "12XB", *pw, check=False), 2,
                          "malformed size")
    assert_one_line_error(cli("info", location, "--password-file", str(cli.new_password),
                              check=False), 6, "wrong password")
    assert_one_line_error(cli("info", cli.env.new_location(), *pw, check=False), 4,
                          "no cloudnbd volume")
    assert_one_line_error(cli("init", cli.env.missing_bucket_location(), "1GiB", *pw, *KDF,
                              check=False), 3, "does not exist")
    assert cli.snapshot(location) == before
    # a volume written by a newer cloudnbd is refused before any password is asked
    doc = json.loads(before["volume.json"])
    written, doc["version"] = doc["version"], volume.FORMAT_VERSION + 1
    cli.env.store(location).put("volume.json", json.dumps(doc).encode())
    assert_one_line_error(cli("info", location, *pw, check=False), 8, "newer")
    # a tampered size is refused
    doc["version"], doc["size"] = written, 2 * doc["size"]
    cli.env.store(location).put("volume.json", json.dumps(doc).encode())
    assert_one_line_error(cli("info", location, *pw, check=False), 7, "modified")


def test_unreachable_endpoint_is_one_line(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text("x\n")
    password.chmod(0o600)
    env = {"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
           "HOME": str(tmp_path)}
    env["PATH"] = os.path.dirname(sys.executable) + ":" + env["PATH"]
    result = cloudnbd("init", "s3", "somebucket/vol", "1GiB", "--endpoint-url",
                      "http://127.0.0.1:9", "--timeout", "1", "--password-file",
                      str(password), env=env, check=False)
    assert_one_line_error((result.returncode, result.stdout, result.stderr), 3,
                          "Could not connect")


def test_an_unreachable_endpoint_says_it_is_retrying_on_a_terminal(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text("x\n")
    password.chmod(0o600)
    env = {"PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin",
           "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "HOME": str(tmp_path)}
    code, _, terminal = on_terminal(
        [*CLI, "info", "s3", "somebucket/vol", "--endpoint-url", f"http://127.0.0.1:{free_port()}",
         "--timeout", "4", "--password-file", str(password)], env=env)
    assert code == 3, terminal
    notice, error = terminal.strip().splitlines()
    assert notice.startswith("cloudnbd: s3://somebucket/vol: HEAD failed (") and \
        notice.endswith("); retrying for up to 4s"), terminal
    assert error.startswith("cloudnbd: error: ") and "Could not connect" in error


@pytest.mark.parametrize("backend_env", ["s3"], indirect=True)
def test_debug_is_cloudnbds_own_unless_all_is_asked_for(cli: Cli) -> None:
    """botocore at DEBUG logs every request and its signature computation: megabytes of
    a server's log. --debug leaves it at INFO; CLOUDNBD_DEBUG=all lets it through."""
    location = cli.env.new_location()
    cli("init", location, "1GiB", "--password-file", str(cli.password), *KDF)
    args = ["--debug", "info", cli.env.name, location, *cli.env.cli_args, "--password-file",
            str(cli.password)]
    own = cloudnbd(*args, env=cli.env.env).stderr
    assert "StringToSign" not in own and "Sending http request" not in own, own[-2000:]
    everything = cloudnbd(*args, env={**cli.env.env, "CLOUDNBD_DEBUG": "all"}).stderr
    assert "StringToSign" in everything and "Sending http request" in everything
