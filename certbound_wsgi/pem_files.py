"""Certificate and key files an operator names, read and recognised once.

The ``ca_file`` option, ``certbound-wsgi thumbprint`` and the inputs of ``nginx-config`` all take
a path. A file may hold PEM (one certificate, a bundle, a key), DER, or nginx's URL-escaped PEM;
each function here says in one sentence what a file holds when it is not what was asked for
(a private key given as a CA file, a certificate and a key swapped), so that a command can
print one line that names the fix. Nothing here is on the request path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["MAX_FILE", "certificates_in", "check_key_pair", "describe", "read_certificates", "read_private_key"]

# A CA bundle of the whole public web is about 250 KiB; anything far larger is not a certificate file.
MAX_FILE = 4 * 1024 * 1024

_PRIVATE_MARKERS = (b"PRIVATE KEY-----",)


def _read(path: str | Path) -> bytes:
    """The bytes of ``path``. :raises ValueError: saying why it cannot be read."""
    target = Path(path)
    try:
        with target.open("rb") as handle:
            data = handle.read(MAX_FILE + 1)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE:
        raise ValueError(f"{path}: larger than {MAX_FILE // (1024 * 1024)} MiB, not a certificate file")
    return data


def _unescaped(data: bytes) -> bytes:
    """nginx's ``$ssl_client_escaped_cert`` (URL-escaped PEM), as PEM; other data unchanged."""
    upper = data.upper()
    if b"-----BEGIN CERTIFICATE-----" not in data and (b"BEGIN%20CERTIFICATE" in upper or b"%2DBEGIN" in upper):
        return unquote_to_bytes(data.strip())
    return data


def _is_private_key(data: bytes) -> bool:
    if any(marker in data for marker in _PRIVATE_MARKERS):
        return True
    try:
        serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError):
        return False
    return True


def certificates_in(data: bytes) -> list[x509.Certificate]:
    """The certificates in ``data``: PEM (one or a bundle, in order), URL-escaped PEM, or DER.

    :raises ValueError: it holds none; the message says what it holds instead (``a private key``).
    """
    data = _unescaped(data)
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError:
            raise ValueError("holds a PEM certificate block that does not parse") from None
    if _is_private_key(data):
        raise ValueError("holds a private key, not a certificate")
    if b"-----BEGIN" in data:
        raise ValueError("holds PEM, but no certificate")
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise ValueError("is neither a PEM nor a DER certificate") from None


def read_certificates(path: str | Path) -> list[x509.Certificate]:
    """The certificates in the file ``path`` (see :func:`certificates_in`).

    :raises ValueError: ``"<path>: <what is wrong>"``.
    """
    data = _read(path)
    try:
        return certificates_in(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def read_private_key(path: str | Path) -> Any:
    """The private key in the file ``path`` (PEM or DER, unencrypted).

    :raises ValueError: ``"<path>: <what is wrong>"``, e.g. that it holds a certificate.
    """
    data = _read(path)
    loaders = (serialization.load_pem_private_key,) if b"-----BEGIN" in data else (
        serialization.load_der_private_key,)
    for load in loaders:
        try:
            return load(data, password=None)
        except TypeError:
            raise ValueError(f"{path}: is an encrypted private key; give nginx an unencrypted one or "
                             "ssl_password_file, and check it by hand") from None
        except ValueError:
            pass
    if b"-----BEGIN CERTIFICATE-----" in data:
        raise ValueError(f"{path}: holds a certificate, not a private key")
    raise ValueError(f"{path}: holds no private key")


def check_key_pair(certificate: x509.Certificate, key: Any, cert_path: str, key_path: str) -> None:
    """:raises ValueError: ``key`` is not the private key of ``certificate``."""
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ValueError(f"{key_path} is not the private key of the certificate in {cert_path}")


def describe(certificate: x509.Certificate) -> str:
    """``subject CN=..., issued by CN=...``: which certificate, in words an operator recognises."""
    return f"subject {certificate.subject.rfc4514_string() or '(empty)'}, " \
           f"issued by {certificate.issuer.rfc4514_string() or '(empty)'}"
