"""Throwaway certificates for the demo and the test-suite.

Development only: the keys are written unencrypted and the CA is not meant to
outlive the process that made it.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Issued", "DevCA"]


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, written as PEM files."""

    cert_path: Path
    key_path: Path
    cert_pem: str

    @property
    def pair(self) -> tuple[str, str]:
        """``(cert, key)`` paths, the form ``requests``' ``cert=`` takes."""
        return (str(self.cert_path), str(self.key_path))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


class DevCA:
    """A self-signed P-256 CA that issues server and client certificates into ``directory``."""

    def __init__(self, directory: Path | str, name: str = "certbound-wsgi development CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = self.directory / "ca.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self.key_path = self.directory / "ca.key"
        _write_key(self._key, self.key_path)

    def _issue(self, name: str, *, server: bool, hosts: tuple[str, ...] = ()) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        cert_path = self.directory / f"{name}.pem"
        key_path = self.directory / f"{name}.key"
        cert_path.write_text(cert_pem)
        _write_key(key, key_path)
        return Issued(cert_path, key_path, cert_pem)

    def server(self, name: str = "localhost", hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")) -> Issued:
        """A TLS server certificate for ``hosts``."""
        return self._issue(name, server=True, hosts=hosts)

    def client(self, name: str) -> Issued:
        """A TLS client certificate with subject ``CN=name``."""
        return self._issue(name, server=False)


def self_signed_client(directory: Path | str, name: str) -> Issued:
    """A self-signed client certificate, as RFC 8705 section 2.2 allows."""
    return DevCA(Path(directory) / f"{name}-selfsigned-ca", name=name).client(name)
