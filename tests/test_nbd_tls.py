"""STARTTLS with X.509: a client with certificates gets through; without TLS it is refused
when TLS is required."""

from __future__ import annotations

import datetime
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloudnbd.nbd.device import MemoryDevice
from cloudnbd.nbd.server import NbdServer
from tests import nbdclient as raw


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
    server = NbdServer(MemoryDevice(16 * 2**20), unix_path=tmp_path / "tls.sock",
                       tls="require", tls_cert=pki / "server-cert.pem",
                       tls_key=pki / "server-key.pem", tls_ca=pki / "ca-cert.pem")
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
