"""TLS for migrations: the target's self-signed certificate (made once, kept in the workspace)
and the source's pinned connection (the certificate's SHA-256 must equal the pin before a
single request byte is sent).

    <workspace>/migrate/tls/cert.pem    self-signed certificate (ECDSA P-256, 10 years)
    <workspace>/migrate/tls/key.pem     its private key, PKCS#8 PEM, mode 0600
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import ipaddress
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from ..engine.atomic import write_atomic, write_private
from .protocol import CertificateMismatch, MigrationError, format_fingerprint

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"


@dataclass(frozen=True)
class ServerCert:
    cert_path: Path
    key_path: Path
    fingerprint: str  # 64 lowercase hex: SHA-256 of the DER certificate
    created: bool = False

    @property
    def display(self) -> str:
        return format_fingerprint(self.fingerprint)


def der_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def pem_fingerprint(pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(pem)
    return der_fingerprint(cert.public_bytes(serialization.Encoding.DER))


def ensure_server_cert(folder: Path, common_name: str = "permeant-serve") -> ServerCert:
    """Load the certificate in `folder`, creating a self-signed one (and its 0600 key) if absent."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    cert_path, key_path = folder / CERT_NAME, folder / KEY_NAME
    created = False
    if not (cert_path.exists() and key_path.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1"))]
        try:
            sans.append(x509.DNSName(socket.gethostname()))
        except (OSError, ValueError):
            pass
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        created = True
    elif stat.S_IMODE(key_path.stat().st_mode) & 0o077:
        os.chmod(key_path, 0o600)  # a private key readable by others is tightened
    return load_server_cert(cert_path, key_path, created)


def load_server_cert(cert_path: Path | str, key_path: Path | str, created: bool = False) -> ServerCert:
    cert_path, key_path = Path(cert_path), Path(key_path)
    try:
        fp = pem_fingerprint(cert_path.read_bytes())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert_path), str(key_path))  # the pair must match
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise MigrationError(f"unusable TLS certificate or key ({cert_path}, {key_path}): "
                             f"{exc}") from None
    return ServerCert(cert_path, key_path, fp, created)


def client_context() -> ssl.SSLContext:
    """No CA verification: the certificate is pinned by fingerprint instead (PinnedConnection)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class PinnedConnection(http.client.HTTPSConnection):
    """An HTTPS connection that refuses any certificate whose SHA-256 is not `pin`, right after
    the handshake and before any request byte is written."""

    def __init__(self, host: str, port: int, pin: str, timeout: float = 60.0):
        super().__init__(host, port, timeout=timeout, context=client_context())
        self.pin = pin
        self.peer_fingerprint: str | None = None

    def connect(self) -> None:
        super().connect()
        der = self.sock.getpeercert(binary_form=True) or b""
        self.peer_fingerprint = der_fingerprint(der)
        if not hmac.compare_digest(self.peer_fingerprint, self.pin):
            self.close()
            raise CertificateMismatch(
                f"the target's TLS certificate is {format_fingerprint(self.peer_fingerprint)}, "
                f"not the pinned {format_fingerprint(self.pin)}: refusing to talk to it (nothing "
                "was sent). If the target's certificate really changed, check the fingerprint "
                "`permeant serve` prints there and pass it with --pin.")


def peer_fingerprint(host: str, port: int, timeout: float = 10.0) -> str:
    """The certificate fingerprint a target presents (to show it when nothing is pinned)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                client_context().wrap_socket(raw, server_hostname=None) as s:
            return der_fingerprint(s.getpeercert(binary_form=True) or b"")
    except (OSError, ssl.SSLError) as exc:
        raise MigrationError(f"cannot reach {host}:{port} over TLS: {exc}") from None
