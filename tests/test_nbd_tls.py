"""STARTTLS with X.509 certificates or pre-shared keys, by real clients (libnbd, qemu),
over a Unix socket and over TCP: a client with the right credentials gets through, one
without them is refused, and so is one without TLS when TLS is required."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloudnbd.nbd.device import MemoryDevice
from cloudnbd.nbd.server import (
    PSK_SUPPORTED,
    NbdServer,
    ServerSettings,
    TlsSettings,
    read_psk_file,
)
from testbed.served import KDF, cloudnbd
from tests import nbdclient as raw

ROOT = Path(__file__).resolve().parent.parent


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
                 issuer_key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(_name(issuer)).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None,
           key: ec.EllipticCurvePrivateKey | None = None) -> None:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        assert key is not None
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate and a client certificate directory for libnbd."""
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1())
                                      for _ in range(3))
    ca = _certificate("cloudnbd test CA", ca_key, "cloudnbd test CA", ca_key, ca=True)
    pki = tmp_path / "pki"
    pki.mkdir()
    _write(pki / "ca-cert.pem", ca)
    _write(pki / "server-cert.pem", _certificate("localhost", server_key,
                                                 "cloudnbd test CA", ca_key, ca=False))
    _write(pki / "server-key.pem", key=server_key)
    _write(pki / "client-cert.pem", _certificate("client", client_key,
                                                 "cloudnbd test CA", ca_key, ca=False))
    _write(pki / "client-key.pem", key=client_key)
    return pki


@pytest.fixture
def tls_server(tmp_path: Path, pki: Path) -> Iterator[NbdServer]:
    tls = TlsSettings("require", cert=pki / "server-cert.pem", key=pki / "server-key.pem",
                      ca=pki / "ca-cert.pem")
    server = NbdServer(MemoryDevice(16 * 2**20),
                       ServerSettings(unix_path=tmp_path / "tls.sock", tls=tls))
    server.start()
    yield server
    server.shutdown(timeout=10)


def test_tls_client_with_certificates_gets_through(tls_server: NbdServer, pki: Path) -> None:
    uri = (f"nbds+unix:///?socket={tls_server.unix_path}&tls-certificates={pki}"
           f"&tls-verify-peer=false")
    result = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "with TLS" in result.stdout
    assert "export-size: 16777216" in result.stdout


def test_plain_client_is_refused_when_tls_is_required(tls_server: NbdServer) -> None:
    result = subprocess.run(["nbdinfo", f"nbd+unix:///?socket={tls_server.unix_path}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    # and what it was told, on the wire: NBD_REP_ERR_TLS_REQD
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(tls_server.unix_path))
    raw._recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", 3))
    sock.sendall(struct.pack(">QII", raw.IHAVEOPT, raw.OPT_GO, 6) + bytes(6))
    _, _, reply, _ = struct.unpack(">QIII", raw._recv_exact(sock, 20))
    assert reply == 0x80000005
    sock.close()


# -- over TCP, as a remote client would come -------------------------------------------------

SIZE = 16 * 2**20


def _round_trip(uri: str, tmp_path: Path, *options: str) -> None:
    """Write 16 MiB of random data through uri with nbdcopy, read it back, compare."""
    source, back = tmp_path / "source.img", tmp_path / "back.img"
    source.write_bytes(os.urandom(SIZE))
    for args in (["--flush", str(source), uri], [uri, str(back)]):
        copied = subprocess.run(["nbdcopy", *options, *args], capture_output=True,
                                text=True, timeout=120)
        assert copied.returncode == 0, copied.stderr
    assert back.read_bytes() == source.read_bytes()


@pytest.fixture
def tls_tcp_server(pki: Path) -> Iterator[NbdServer]:
    tls = TlsSettings("require", cert=pki / "server-cert.pem", key=pki / "server-key.pem",
                      ca=pki / "ca-cert.pem")
    server = NbdServer(MemoryDevice(SIZE), ServerSettings(host="127.0.0.1", port=0, tls=tls))
    server.start()
    yield server
    server.shutdown(timeout=10)


def test_certificates_over_tcp_both_sides_verified(tls_tcp_server: NbdServer, pki: Path,
                                                   tmp_path: Path) -> None:
    # the client checks the server's certificate (issued to localhost) against the CA,
    # and the server checks the client's
    uri = f"nbds://localhost:{tls_tcp_server.port}/?tls-certificates={pki}"
    info = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert "with TLS" in info.stdout and f"export-size: {SIZE}" in info.stdout
    _round_trip(uri, tmp_path)


def test_certificates_over_tcp_a_client_without_one_is_refused(
        tls_tcp_server: NbdServer, pki: Path, tmp_path: Path) -> None:
    anonymous = tmp_path / "anonymous"  # trusts the CA, has no certificate of its own
    anonymous.mkdir()
    (anonymous / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
    refused = subprocess.run(
        ["nbdinfo", f"nbds://localhost:{tls_tcp_server.port}/?tls-certificates={anonymous}"],
        capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "export-size" not in refused.stdout


# -- pre-shared keys (TLS 1.3 PSK, the key file format of nbdkit, qemu and psktool) ----------

def _psk_python() -> str:
    """An interpreter whose ssl module serves TLS-PSK: this one, or another installed
    Python 3.13 or later (the NBD layer needs the standard library only)."""
    probe = "import ssl, sys; sys.exit(not hasattr(ssl.SSLContext, 'set_psk_server_callback'))"
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [sys.executable, *(shutil.which(f"python3.{minor}") for minor in range(13, 20)),
                  *sorted(str(p) for p in pyenv.glob("3.*/bin/python3"))]
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-c", probe], capture_output=True,
                                        timeout=60).returncode == 0:
            return candidate
    pytest.fail("TLS-PSK needs Python 3.13 or later to serve it: install one (pyenv "
                "install 3.13) so that this test can run")


@contextlib.contextmanager
def _served_elsewhere(python: str, **settings: object) -> Iterator[int]:
    """tests/nbd_serve.py under python; yields its TCP port."""
    server = subprocess.Popen([python, "-m", "tests.nbd_serve",
                               json.dumps({"size": SIZE, **settings})],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert server.stdout is not None and server.stdin is not None
    try:
        port = server.stdout.readline().strip()
        assert port.isdigit(), f"the server did not start: {port!r}"
        yield int(port)
    finally:
        server.stdin.close()
        server.wait(timeout=60)


def _psk_file(path: Path, **keys: bytes) -> Path:
    path.write_text("".join(f"{name}:{key.hex()}\n" for name, key in keys.items()))
    path.chmod(0o600)
    return path


def test_pre_shared_keys_over_tcp(tmp_path: Path) -> None:
    alice, carol = os.urandom(32), os.urandom(32)
    keys = _psk_file(tmp_path / "keys.psk", alice=alice, carol=carol)
    with _served_elsewhere(_psk_python(), host="127.0.0.1", port=0,
                           tls={"mode": "require", "psk": str(keys)}) as port:
        def nbdinfo(user: str, psk_file: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["nbdinfo", f"nbds://{user}@127.0.0.1:{port}/"
                                   f"?tls-psk-file={psk_file}"],
                                  capture_output=True, text=True, timeout=60)

        good = nbdinfo("alice", keys)
        assert good.returncode == 0, good.stderr
        assert "with TLS" in good.stdout and f"export-size: {SIZE}" in good.stdout
        _round_trip(f"nbds://carol@127.0.0.1:{port}/?tls-psk-file={keys}", tmp_path)
        # qemu speaks it too: its key file is DIR/keys.psk
        qemu = subprocess.run(
            ["qemu-img", "info", "--object", f"tls-creds-psk,id=tls0,endpoint=client,"
             f"dir={tmp_path},username=alice", "--image-opts",
             f"driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"],
            capture_output=True, text=True, timeout=60)
        assert qemu.returncode == 0 and f"({SIZE} bytes)" in qemu.stdout, qemu.stderr
        # a wrong key, a user the server does not know, and no TLS at all are refused
        wrong = _psk_file(tmp_path / "wrong.psk", alice=os.urandom(32))
        stranger = _psk_file(tmp_path / "stranger.psk", mallory=os.urandom(32))
        for refused in (nbdinfo("alice", wrong), nbdinfo("mallory", stranger)):
            assert refused.returncode != 0 and "export-size" not in refused.stdout
        plain = subprocess.run(["nbdinfo", f"nbd://127.0.0.1:{port}/"], capture_output=True,
                               text=True, timeout=60)
        assert plain.returncode != 0 and "export-size" not in plain.stdout


@pytest.mark.parametrize("text,problem", [
    ("alice\n", "expected username:hexkey"),
    ("alice:zz\n", "expected username:hexkey"),
    (f"alice:{'ab' * 8}\n", "the key of alice is 8 bytes, fewer than 16"),
    ("\n", "holds no keys"),
])
def test_malformed_psk_files_are_refused_naming_the_line(tmp_path: Path, text: str,
                                                         problem: str) -> None:
    path = tmp_path / "keys.psk"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        read_psk_file(path)


# -- `cloudnbd open`: TLS settings checked before the server starts -------------------------

def _open(tmp_path: Path, password_file: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "bucket").mkdir(exist_ok=True)
    location = str(tmp_path / "bucket" / "vol")
    if not Path(location).exists():
        cloudnbd("init", "file", location, "64MiB", "--password-file", str(password_file),
                 *KDF)
    return cloudnbd("open", "file", location, "--socket", str(tmp_path / "nbd.sock"),
                    "--cache", str(tmp_path / "cache"), "--password-file",
                    str(password_file), *tls, check=False)


def _close(tmp_path: Path) -> None:
    cloudnbd("close", "file", str(tmp_path / "bucket" / "vol"), "--cache",
             str(tmp_path / "cache"))


def test_open_with_pre_shared_keys_serves_or_says_which_python_it_needs(
        tmp_path: Path, password_file: Path) -> None:
    keys = _psk_file(tmp_path / "keys.psk", alice=os.urandom(32))
    result = _open(tmp_path, password_file, "--tls", "require", "--tls-psk", str(keys))
    if PSK_SUPPORTED:
        assert result.returncode == 0, result.stderr
        _close(tmp_path)
    else:
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            "cloudnbd: error: TLS: --tls-psk needs Python 3.13 or later (this is Python "
            f"{'.'.join(map(str, sys.version_info[:3]))}); use --tls-cert and --tls-key, "
            "or run cloudnbd with a newer Python"]


def test_open_refuses_a_psk_file_others_can_read(tmp_path: Path, password_file: Path
                                                 ) -> None:
    keys = _psk_file(tmp_path / "keys.psk", alice=os.urandom(32))
    keys.chmod(0o644)
    result = _open(tmp_path, password_file, "--tls", "require", "--tls-psk", str(keys))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"cloudnbd: error: PSK file {keys} is accessible by others (mode 0644); "
        f"run: chmod 600 {keys}"]


def test_open_warns_when_required_tls_authenticates_no_client(
        tmp_path: Path, password_file: Path, pki: Path) -> None:
    certificate = ("--tls", "require", "--tls-cert", str(pki / "server-cert.pem"),
                   "--tls-key", str(pki / "server-key.pem"))
    result = _open(tmp_path, password_file, *certificate)
    assert result.returncode == 0, result.stderr
    _close(tmp_path)
    assert "TLS is required but clients are not authenticated (no --tls-ca or " \
           "--tls-psk)" in result.stderr
    with_ca = _open(tmp_path, password_file, *certificate, "--tls-ca",
                    str(pki / "ca-cert.pem"))
    assert with_ca.returncode == 0, with_ca.stderr
    _close(tmp_path)
    assert "not authenticated" not in with_ca.stderr


def test_open_refuses_tls_files_when_tls_is_off(tmp_path: Path, password_file: Path,
                                                pki: Path) -> None:
    result = _open(tmp_path, password_file, "--tls-cert", str(pki / "server-cert.pem"),
                   "--tls-key", str(pki / "server-key.pem"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "cloudnbd: error: TLS: TLS files are given but --tls is off"]
