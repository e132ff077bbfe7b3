"""Day-to-day operation of a configured volume: systemd's readiness protocol, the password
file rule, `cloudnbd status`, and progress that shows on a terminal and nowhere else.

No systemd runs in the test machine, so the test plays its part: a datagram socket in
NOTIFY_SOCKET, `open NAME --foreground` as ExecStart, `close NAME` as ExecStop.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from testbed.served import CLI, KDF, cloudnbd, on_terminal
from testbed.stores import free_port
from tests.nbdclient import NbdClient

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
CHUNK = 4 * MiB


def configured_volume(tmp_path: Path, name: str = "vol", **extra: object) -> Path:
    """A config directory defining volume `name` on the file backend; returns etc/."""
    etc = tmp_path / "etc"
    (etc / "volumes.d").mkdir(parents=True)
    (tmp_path / "bucket").mkdir()
    password = etc / f"{name}.password"
    password.write_text("a password\n")
    password.chmod(0o600)
    settings = {"backend": "file", "location": tmp_path / "bucket" / name,
                "password_file": password, "cache": tmp_path / "cache", **extra}
    (etc / "volumes.d" / f"{name}.conf").write_text(
        "[volume]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    cloudnbd("--config-dir", str(etc), "init", name, "64MiB", *KDF)
    return etc


def test_readiness_is_notified_once_the_server_accepts_and_close_stops_it(
        tmp_path: Path) -> None:
    unit = (ROOT / "etc" / "systemd" / "cloudnbd@.service").read_text()
    for line in ("Type=notify",
                 "ExecStart=/usr/bin/cloudnbd open %i --foreground --socket "
                 "/run/cloudnbd/%i/nbd.sock",
                 "ExecStop=/usr/bin/cloudnbd close %i", "Restart=on-failure"):
        assert line in unit.splitlines(), line
    port = free_port()
    etc = configured_volume(tmp_path, port=port)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(120)
    log = open(tmp_path / "unit.log", "wb")  # noqa: SIM115 - closed below
    main = subprocess.Popen([*CLI, "--config-dir", str(etc), "open", "vol", "--foreground"],
                            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        message = notify.recv(4096)  # the first message systemd hears
        assert message == b"READY=1", message
        # Ready means ready: the very first connection attempt is served.
        client = NbdClient.tcp("127.0.0.1", port)
        client.pwrite(b"r" * 4096, 0)
        client.flush()
        assert client.pread(0, 4096) == b"r" * 4096
        status = json.loads(cloudnbd("--config-dir", str(etc), "status", "vol",
                                     "--json").stdout)
        assert status["pid"] == main.pid
        for pid in [p for pids in status["worker_pids"].values() for p in pids]:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not any(v.startswith(b"NOTIFY_SOCKET=") for v in environ), pid
        client.close()
        stopped = cloudnbd("--config-dir", str(etc), "close", "vol")  # ExecStop
        assert "everything is uploaded" in stopped.stdout
        assert notify.recv(4096) == b"STOPPING=1"
        assert main.wait(timeout=60) == 0  # a clean stop: Restart=on-failure stays idle
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()
        log.close()
        notify.close()


def test_password_file_must_be_private_and_owned_by_the_user(tmp_path: Path) -> None:
    etc = configured_volume(tmp_path, socket=tmp_path / "vol.sock")
    password = etc / "vol.password"
    password.chmod(0o640)
    for extra in ([], ["--foreground"]):
        result = cloudnbd("--config-dir", str(etc), "open", "vol", *extra, check=False)
        assert result.returncode != 0
        assert result.stderr.splitlines() == [
            f"cloudnbd: error: password file {password} is accessible by others (mode "
            f"0640); run: chmod 600 {password}"]
        assert not (tmp_path / "vol.sock").exists()
    password.chmod(0o600)
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(password, 65534, 65534)
        result = cloudnbd("--config-dir", str(etc), "open", "vol", check=False)
        assert result.returncode != 0
        assert result.stderr.splitlines() == [
            f"cloudnbd: error: password file {password} is owned by another user"]
        os.chown(password, 0, 0)
    assert "Serving" in cloudnbd("--config-dir", str(etc), "open", "vol").stdout
    cloudnbd("--config-dir", str(etc), "close", "vol")


def test_status_shows_connections_backlog_rates_and_cache(tmp_path: Path) -> None:
    etc = configured_volume(tmp_path, socket=tmp_path / "vol.sock", writeback_delay=3600)
    cloudnbd("--config-dir", str(etc), "open", "vol")
    try:
        client = NbdClient.unix(str(tmp_path / "vol.sock"))
        client.pwrite(os.urandom(MiB), 0)
        client.pwrite(os.urandom(MiB), CHUNK)
        client.pread(8 * CHUNK, 4096)  # never written: no fetch, no cache
        status = json.loads(cloudnbd("--config-dir", str(etc), "status", "vol",
                                     "--json").stdout)
        assert status["connections"] == 1
        assert status["dirty_chunks"] == 2 and status["dirty_bytes"] >= 2 * MiB
        assert status["oldest_dirty_seconds"] > 0
        assert status["upload_rate"] == 0 and status["cache_bytes"] == 0
        client.flush()  # now the two chunks go up
        text = cloudnbd("--config-dir", str(etc), "status", "vol").stdout
        client.close()
    finally:
        cloudnbd("--config-dir", str(etc), "close", "vol")
    lines = dict(line.split(":", 1) for line in text.splitlines())
    assert lines["connections"].strip() == "1"
    assert lines["backlog"].strip().startswith("0 B in 0 chunks")
    assert re.match(r"[1-9][\d.]* [KM]i?B/s sent", lines["upload rate"].strip()), text
    # the FLUSH put both writes in one journal object: durable, not yet folded
    assert lines["store journal"].strip().startswith("2 MiB in 1 object "), text
    assert lines["cache"].strip().startswith("0 B of 2 GiB"), text


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, list[str]]:
    """A configured volume with three chunks of data; (config dir, CLI prefix)."""
    etc = configured_volume(tmp_path, socket=tmp_path / "vol.sock", writeback_delay=3600)
    image = tmp_path / "seed.img"
    image.write_bytes(os.urandom(3 * CHUNK))
    cloudnbd("--config-dir", str(etc), "import", str(image), "vol", "--yes")
    return etc, [*CLI, "--config-dir", str(etc)]


@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "pipe"])
@pytest.mark.parametrize("operation,label", [
    (["export", "vol", "{tmp}/out.img"], "Exporting"),
    (["import", "{tmp}/seed.img", "vol", "--yes"], "Importing"),
    (["verify", "vol"], "Verifying"),
    (["resize", "vol", "4MiB", "--shrink", "--yes"], "Shrinking"),
], ids=["export", "import", "verify", "shrink"])
def test_long_operations_show_progress_on_a_terminal_only(
        tmp_path: Path, filled: tuple[Path, list[str]], operation: list[str],
        label: str, tty: bool) -> None:
    _, prefix = filled
    args = [*prefix, *(a.format(tmp=tmp_path) for a in operation)]
    if tty:
        code, out, terminal = on_terminal(args)
        assert code == 0, terminal
        assert re.search(rf"\r{label}: [\d.]+ [KMG]?i?B of [\d.]+ [KMG]?i?B, .* ETA ",
                         terminal), terminal
        assert terminal.endswith("\r\033[K")  # the line is wiped when done
    else:
        quiet = subprocess.run(args, capture_output=True, text=True, timeout=120,
                               stdin=subprocess.DEVNULL)
        assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
        out = quiet.stdout
        assert label not in out and "\r" not in out
    assert out.count("\n") == 1, out  # just the summary line


def test_close_shows_the_upload_on_a_terminal_and_keeps_the_log_clean(
        tmp_path: Path, filled: tuple[Path, list[str]]) -> None:
    etc, prefix = filled
    for attempt in ("terminal", "pipe"):
        cloudnbd("--config-dir", str(etc), "open", "vol")
        client = NbdClient.unix(str(tmp_path / "vol.sock"))
        for index in range(4):  # 16 MiB waiting for the upload (writeback delay 1 h)
            client.pwrite(os.urandom(CHUNK), index * CHUNK)
        client.close()
        if attempt == "terminal":
            code, out, terminal = on_terminal([*prefix, "close", "vol"])
            assert code == 0 and "everything is uploaded" in out, terminal
            assert re.search(r"\rUploading: [\d.]+ [KM]i?B of 16 MiB", terminal), terminal
        else:
            quiet = cloudnbd("--config-dir", str(etc), "close", "vol")
            assert quiet.stderr == "" and "\r" not in quiet.stdout
    [log] = (tmp_path / "cache").glob("*/cloudnbd.log")
    assert "Uploading" not in log.read_text() and "\r" not in log.read_text()
