"""Shipping: every command's --help, the man page against the parser, and the RPM.

The RPM is built the way README says (`setup.py sdist --formats=bztar`, `rpmbuild -ta`),
installed with rpm into an empty root, and what an administrator meets there is checked:
`man cloudnbd`, the config files in /etc/cloudnbd (which must parse), the systemd units
(`systemd-analyze verify` against the installed tree), and a package that imports whole.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from cloudnbd import __version__
from cloudnbd.cli import build_parser
from testbed.stores import free_port
from tests.nbdclient import NbdClient

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "cloudnbd"]


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and action.help != argparse.SUPPRESS}


def _man_text(page: Path) -> str:
    """The page as man renders it, without hyphenation or line breaks in the way."""
    result = subprocess.run(["man", "--warnings", "-l", "-P", "cat", str(page)],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "MANWIDTH": "1000", "MAN_KEEP_FORMATTING": ""})
    assert result.returncode == 0, result.stderr
    assert not result.stderr.strip(), f"groff warnings: {result.stderr}"
    return result.stdout


def test_every_command_has_help() -> None:
    commands = _commands()
    assert len(commands) >= 13
    runs = {name: subprocess.Popen([*CLI, name, "--help"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=ROOT)
            for name in commands}
    for name, process in runs.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"{name} --help: {err}"
        assert out.startswith(f"usage: cloudnbd {name} "), out
        assert _long_options(commands[name]) <= set(re.findall(r"--[a-z-]+", out)), out


def test_man_page_documents_every_command_and_option() -> None:
    text = _man_text(ROOT / "cloudnbd.1")
    commands_section = text.split("\nCOMMANDS\n", 1)[1].split("\nOPTIONS\n", 1)[0]
    documented = set(re.findall(r"^ {7}([a-z]+) ", commands_section, re.MULTILINE))
    commands = _commands()
    assert documented == set(commands), (f"undocumented: {set(commands) - documented}, "
                                         f"not commands: {documented - set(commands)}")
    for name, parser in commands.items():
        missing = {opt for opt in _long_options(parser) if opt not in text}
        assert not missing, f"the man page lacks {name} {sorted(missing)}"


def test_rpm_builds_and_installs_man_page_config_and_systemd_unit(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                    "sdist", "--formats=bztar", "--dist-dir", str(dist)], cwd=ROOT,
                   check=True, capture_output=True, timeout=300)
    tarball = dist / f"cloudnbd-{__version__}.tar.bz2"
    # --nodeps: Debian's rpm has an empty package database to check BuildRequires against.
    build = subprocess.run(["rpmbuild", "-ta", "--nodeps", "--define",
                            f"_topdir {tmp_path / 'rpmbuild'}", str(tarball)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    [rpm] = (tmp_path / "rpmbuild" / "RPMS" / "noarch").glob("cloudnbd-*.noarch.rpm")

    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["rpm", "--root", str(root), "-i", "--nodeps", str(rpm)], check=True,
                   capture_output=True, timeout=120)
    listed = subprocess.run(["rpm", "--root", str(root), "-ql", "cloudnbd"], check=True,
                            capture_output=True, text=True, timeout=60).stdout.split()
    for path in ("/usr/bin/cloudnbd", "/etc/cloudnbd/cloudnbd.conf",
                 "/etc/cloudnbd/volumes.d/example.conf.sample",
                 "/usr/lib/systemd/system/cloudnbd@.service",
                 "/usr/lib/systemd/system/cloudnbd-snapshot@.service",
                 "/usr/lib/systemd/system/cloudnbd-snapshot@.timer", "/var/cache/cloudnbd"):
        assert path in listed and (root / path.lstrip("/")).exists(), path
    assert any(p.startswith("/usr/share/man/man1/cloudnbd.1") for p in listed)
    config = subprocess.run(["rpm", "--root", str(root), "-qc", "cloudnbd"], check=True,
                            capture_output=True, text=True, timeout=60).stdout.split()
    assert "/etc/cloudnbd/cloudnbd.conf" in config  # an upgrade keeps the admin's edits

    # `man cloudnbd` finds and renders the installed page.
    man_env = {**os.environ, "MANPATH": str(root / "usr/share/man"), "MANWIDTH": "1000"}
    where = subprocess.run(["man", "-w", "cloudnbd"], env=man_env, capture_output=True,
                           text=True, timeout=60)
    assert where.stdout.startswith(str(root / "usr/share/man/man1/cloudnbd.1")), where
    page = subprocess.run(["man", "-P", "cat", "cloudnbd"], env=man_env, capture_output=True,
                          text=True, timeout=60)
    assert page.returncode == 0 and "cloudnbd - a network block device" in page.stdout

    # The installed program runs from the installed tree, with every module present, and
    # the shipped config files parse.
    [init] = [p for p in listed if p.endswith("/cloudnbd/__init__.py")]
    run_env = {**os.environ, "PYTHONPATH": str(root / Path(init).parent.parent.relative_to("/"))}
    imported = subprocess.run(
        [sys.executable, "-c", "import importlib, pkgutil, cloudnbd; print(cloudnbd.__file__);"
         "[importlib.import_module(m.name) for m in "
         "pkgutil.walk_packages(cloudnbd.__path__, 'cloudnbd.') if m.name != "
         "'cloudnbd.__main__']"],
        env=run_env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith(str(root)), imported.stdout
    etc = root / "etc" / "cloudnbd"
    shutil.copy(etc / "volumes.d" / "example.conf.sample", etc / "volumes.d" / "example.conf")
    installed = [sys.executable, str(root / "usr/bin/cloudnbd"), "--config-dir", str(etc)]
    shown = subprocess.run([*installed, "config", "example"], env=run_env,
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^backend\s+s3\s+\S+example.conf:\d+$", shown.stdout, re.MULTILINE)

    # The unit, checked by systemd's own parser against the installed tree (no systemd
    # runs here: verify works offline). The host's units supply sysinit.target and co.
    units = root / "usr/lib/systemd/system"
    for unit in Path("/lib/systemd/system").iterdir():
        if unit.is_file() and not (units / unit.name).exists():
            shutil.copy(unit, units / unit.name)
    verify = subprocess.run(["systemd-analyze", "verify", f"--root={root}",
                             "cloudnbd@photos.service", "cloudnbd-snapshot@photos.service",
                             "cloudnbd-snapshot@photos.timer"], env=man_env,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), \
        verify.stdout + verify.stderr


def test_make_demo_script_serves_a_volume(tmp_path: Path) -> None:
    """README's first command: contrib/demo.sh (what `make demo` runs after installing)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "cloudnbd"  # this checkout, as `pip install -e .` would put it
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m cloudnbd "$@"\n')
    wrapper.chmod(0o755)
    port = free_port()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "DEMO_DIR": str(tmp_path / "demo"), "DEMO_PORT": str(port)}
    demo = subprocess.run(["bash", str(ROOT / "contrib" / "demo.sh")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    [close_line] = [line.strip() for line in demo.stdout.splitlines()
                    if line.strip().startswith(f"{wrapper} close ")]
    try:
        client = NbdClient.tcp("127.0.0.1", port)
        assert client.size == 2**30
        client.pwrite(b"demo" * 1024, 0)
        client.flush()
        client.close()
    finally:
        closed = subprocess.run(close_line.split(), env=env, capture_output=True, text=True,
                                timeout=300)
    assert closed.returncode == 0 and "everything is uploaded" in closed.stdout, closed
