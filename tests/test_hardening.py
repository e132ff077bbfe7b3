"""What a local attacker (another user, or a process of the same user) can get at: core
dumps and /proc of the server's processes, the password in the environment, the NBD
socket, the cache directory, and the systemd unit that puts these together."""

from __future__ import annotations

import os
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.served import CLI, KDF, Served, cloudnbd, start
from tests.nbdclient import NbdClient

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "etc" / "systemd" / "cloudnbd@.service"
#: root without any capability: like another process of the same user, it may read
#: /proc/PID/environ and mem of a dumpable process only (no CAP_SYS_PTRACE)
NO_CAPS = ("setpriv", "--bounding-set=-all", "--inh-caps=-all", "--")
OTHER_UID = 65534


def _volume(tmp_path: Path, password_file: Path, size: str = "64MiB") -> str:
    (tmp_path / "bucket").mkdir(exist_ok=True)
    location = str(tmp_path / "bucket" / "vol")
    cloudnbd("init", "file", location, size, "--password-file", str(password_file), *KDF)
    return location


def _tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_line = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat_line.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _peekable(pid: int) -> bool:
    """Whether a process of the same user without CAP_SYS_PTRACE can read pid's
    environment (the kernel allows it exactly when pid is dumpable)."""
    return subprocess.run([*NO_CAPS, "cat", f"/proc/{pid}/environ"],
                          capture_output=True, timeout=60).returncode == 0


def _stop(server: Served) -> None:
    if server.process.poll() is None:
        server.close(check=False)
    if server.process.poll() is None:
        server.kill()


# -- core dumps and /proc -----------------------------------------------------------------

def test_no_process_of_a_running_server_can_dump_core_or_be_peeked_at(
        tmp_path: Path, password_file: Path) -> None:
    location = _volume(tmp_path, password_file)
    # the server runs as a capability-less root, so the peeker's uid and capabilities
    # match it: only PR_SET_DUMPABLE stands in the way
    server = start(tmp_path, "file", location, password_file, "--uploaders", "2",
                   prefix=NO_CAPS)
    control = subprocess.Popen([*NO_CAPS, sys.executable, "-c",
                                "print('ready', flush=True); input()"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert control.stdout is not None and control.stdout.readline() == "ready\n"
        assert _peekable(control.pid)  # the probe can tell a dumpable process
        client = NbdClient.unix(str(server.socket))
        client.pwrite(os.urandom(2**20), 0)
        client.flush()
        status = server.status()
        workers = [p for pids in status["worker_pids"].values() for p in pids]  # type: ignore[union-attr]
        processes = _tree(server.process.pid)
        assert set(workers) <= set(processes) and len(workers) == 3
        # the zygote: the parent of the workers, a child of the front
        assert len(processes) >= len(workers) + 2
        for pid in processes:
            if "multiprocessing.resource_tracker" in _cmdline(pid):
                continue  # holds names of semaphores only, never a key (design.md)
            assert not _peekable(pid), (pid, _cmdline(pid))
        client.close()
    finally:
        control.kill()
        control.wait()
        _stop(server)


def test_the_environment_password_is_gone_from_every_process(
        tmp_path: Path, password_file: Path) -> None:
    """Under systemd (--foreground) and with a password file given as well."""
    location = _volume(tmp_path, password_file)
    marker = password_file.read_text().strip()
    env = {**os.environ, "CLOUDNBD_PASSWORD": marker}
    for password in (None, password_file):
        server = start(tmp_path, "file", location, password, env=env,
                       cache=tmp_path / f"cache-{password is None}")
        try:
            for pid in _tree(server.process.pid):
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                assert marker.encode() not in environ, (pid, _cmdline(pid))
                assert b"CLOUDNBD_PASSWORD" not in environ, (pid, _cmdline(pid))
        finally:
            _stop(server)


def test_daemon_never_sees_the_environment_password(tmp_path: Path,
                                                     password_file: Path) -> None:
    location = _volume(tmp_path, password_file)
    marker = password_file.read_text().strip()
    sock = tmp_path / "nbd.sock"
    cache = tmp_path / "cache"
    cloudnbd("open", "file", location, "--socket", str(sock), "--cache", str(cache),
             env={**os.environ, "CLOUDNBD_PASSWORD": marker})
    status = cloudnbd("status", "file", location, "--cache", str(cache), "--json").stdout
    front = int(status.split('"pid": ')[1].split(",")[0])
    try:
        for pid in _tree(front):
            assert marker.encode() not in Path(f"/proc/{pid}/environ").read_bytes(), pid
    finally:
        cloudnbd("close", "file", location, "--cache", str(cache))


def test_password_comes_from_a_systemd_credential(tmp_path: Path,
                                                  password_file: Path) -> None:
    location = _volume(tmp_path, password_file)
    credentials = tmp_path / "credentials"  # what systemd sets up for LoadCredential=
    credentials.mkdir(mode=0o500)
    (credentials / "password").write_text(password_file.read_text())
    (credentials / "password").chmod(0o400)
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)}
    env.pop("CLOUDNBD_PASSWORD", None)
    info = cloudnbd("info", "file", location, env=env)
    assert "volume id" in info.stdout
    # it answers for the current password only, never also as passwd's new one
    same = cloudnbd("passwd", "file", location, env=env, check=False, input_text="")
    assert same.returncode == 2 and "a password is needed" in same.stderr
    (credentials / "password").chmod(0o600)
    (credentials / "password").write_text("not the password\n")
    wrong = cloudnbd("info", "file", location, env=env, check=False)
    assert wrong.returncode == 6 and "wrong password" in wrong.stderr


# -- the NBD socket -------------------------------------------------------------------------

def test_the_nbd_socket_is_private(served: Served) -> None:
    assert stat.S_IMODE(served.socket.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(served.socket.stat().st_mode)


def test_socket_option_replaces_a_stale_socket_but_never_a_file(
        tmp_path: Path, password_file: Path) -> None:
    location = _volume(tmp_path, password_file)
    target = tmp_path / "precious.img"
    target.write_bytes(b"data that must survive")
    refused = cloudnbd("open", "file", location, "--socket", str(target), "--cache",
                       str(tmp_path / "cache"), "--password-file", str(password_file),
                       check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"cloudnbd: error: refusing to listen on {target}: it exists and is not a socket"]
    assert target.read_bytes() == b"data that must survive"
    # a socket left behind by a killed server is replaced
    stale = tmp_path / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale))
    leftover.close()
    cache = tmp_path / "cache"
    cloudnbd("open", "file", location, "--socket", str(stale), "--cache", str(cache),
             "--password-file", str(password_file))
    try:
        client = NbdClient.unix(str(stale))
        assert client.size == 64 * 2**20
        client.close()
    finally:
        cloudnbd("close", "file", location, "--cache", str(cache))


# -- the cache directory --------------------------------------------------------------------

def _open(tmp_path: Path, location: str, password_file: Path, cache: Path
          ) -> subprocess.CompletedProcess[str]:
    return cloudnbd("open", "file", location, "--socket", str(tmp_path / "c.sock"),
                    "--cache", str(cache), "--password-file", str(password_file),
                    check=False)


def _volume_dir(cache: Path, location: str) -> Path:
    from cloudnbd.runtime import volume_cache_dir

    return volume_cache_dir(cache, "file", location)


@pytest.mark.parametrize("case", ["root-owned-by-other", "root-writable", "dir-owned-by-other",
                                  "dir-writable", "dir-is-symlink"])
def test_a_cache_directory_in_other_hands_is_refused(tmp_path: Path, password_file: Path,
                                                     case: str) -> None:
    location = _volume(tmp_path, password_file)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    mine = _volume_dir(cache, location)
    if case == "root-owned-by-other":
        os.chown(cache, OTHER_UID, OTHER_UID)
        expected = f"cache directory {cache} is owned by another user (uid {OTHER_UID})"
    elif case == "root-writable":
        cache.chmod(0o777)
        expected = f"cache directory {cache} is writable by others (mode 0777)"
    elif case == "dir-owned-by-other":
        mine.mkdir(mode=0o700)
        os.chown(mine, OTHER_UID, OTHER_UID)
        expected = f"volume cache directory {mine} is owned by another user"
    elif case == "dir-writable":
        mine.mkdir()
        mine.chmod(0o757)
        expected = f"volume cache directory {mine} is writable by others (mode 0757)"
    else:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        mine.symlink_to(elsewhere)
        expected = f"volume cache directory {mine} is not a directory"
    result = _open(tmp_path, location, password_file, cache)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"cloudnbd: error: {expected}"), line


def test_a_shared_sticky_cache_root_is_accepted(tmp_path: Path, password_file: Path) -> None:
    """Like /tmp: others may create entries there but not rename or remove ours."""
    location = _volume(tmp_path, password_file)
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o1777)
    assert _open(tmp_path, location, password_file, cache).returncode == 0
    assert stat.S_IMODE(_volume_dir(cache, location).stat().st_mode) == 0o700
    cloudnbd("close", "file", location, "--cache", str(cache))


# -- the systemd unit -------------------------------------------------------------------------

def _unit() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_keeps_secrets_in_and_serves_on_a_private_socket(
        tmp_path: Path, password_file: Path) -> None:
    unit = _unit()
    assert unit["LimitCORE"] == ["0"]
    assert unit["LoadCredential"] == ["password:/etc/cloudnbd/%i.password"]
    assert "CLOUDNBD_PASSWORD" not in UNIT.read_text().replace("# ", "")
    # Play systemd: run ExecStart as written for instance `vol`, with the runtime
    # directory and the credential where systemd would put them.
    location = _volume(tmp_path, password_file)
    etc = tmp_path / "etc"
    (etc / "volumes.d").mkdir(parents=True)
    (etc / "volumes.d" / "vol.conf").write_text(
        f"[volume]\nbackend = file\nlocation = {location}\ncache = {tmp_path / 'cache'}\n")
    run = tmp_path / "run"
    [runtime] = unit["RuntimeDirectory"]
    (run / runtime.replace("%i", "vol")).mkdir(parents=True, mode=0o700)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "password").write_text(password_file.read_text())
    (credentials / "password").chmod(0o400)
    [exec_start] = unit["ExecStart"]
    argv = shlex.split(exec_start.replace("%i", "vol").replace("/run/", f"{run}/"))
    assert argv[0] == "/usr/bin/cloudnbd"
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)}
    read_end, write_end = os.pipe()
    main = subprocess.Popen([*CLI, "--config-dir", str(etc), *argv[1:], "--ready-fd",
                             str(write_end)], pass_fds=(write_end,), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(write_end)
    try:
        with os.fdopen(read_end) as ready:
            assert ready.readline().strip() == "ready"
        sockets = list(run.rglob("*.sock"))
        assert len(sockets) == 1, sockets
        assert stat.S_IMODE(sockets[0].stat().st_mode) == 0o600
        client = NbdClient.unix(str(sockets[0]))
        assert client.size == 64 * 2**20
        client.close()
    finally:
        cloudnbd("--config-dir", str(etc), "close", "vol", env=env)
        main.wait(timeout=60)
