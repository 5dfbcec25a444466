"""The client certificate: where it is read from, and its RFC 8705 thumbprint.

nginx terminates mutual TLS and forwards the certificate either as the uWSGI
variable ``SSL_CLIENT_CERT`` (which no client can set) or as a request header
(which any client can send, so it is believed only from ``trusted_proxies``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import ipaddress
import re
import sys
from urllib.parse import unquote

from cryptography import x509

from .errors import InvalidToken
from .settings import Settings
from .types import WSGIEnvironment

__all__ = ["CertificateReader", "thumbprint_from_der", "thumbprint_from_pem", "thumbprint_command"]

#: The uWSGI variables set by ``uwsgi_param``; a client cannot forge them.
UWSGI_CERT_VAR = "SSL_CLIENT_CERT"
UWSGI_VERIFY_VAR = "SSL_CLIENT_VERIFY"

# A certificate chain of a few certificates is a few kilobytes; URL-escaping
# at most triples that.
MAX_CERT_VALUE = 64 * 1024

_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)
_MALFORMED = "the client certificate could not be parsed"


def thumbprint_from_der(der: bytes) -> str:
    """RFC 8705 section 3.1: base64url(SHA-256(DER)) without padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def _leaf_der(value: str) -> bytes:
    """The DER bytes of the first (leaf) certificate in a PEM or URL-escaped PEM value.

    :raises ValueError: the value holds no parseable certificate.
    """
    if "%" in value:
        # nginx's $ssl_client_escaped_cert; errors="strict" rejects non-UTF-8 escapes.
        value = unquote(value, errors="strict")
    match = _PEM_BLOCK.search(value)
    if match is None:
        raise ValueError("no PEM certificate block")
    # The body may use newlines, tabs (nginx's old $ssl_client_cert) or spaces.
    body = "".join(match.group(1).split())
    try:
        der = base64.b64decode(body, validate=True)
    except binascii.Error:
        raise ValueError("invalid base64 in the PEM body") from None
    # Parse it, so that garbage which happens to be base64 is not "a certificate".
    try:
        x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion):
        raise ValueError("not a DER certificate") from None
    return der


def thumbprint_from_pem(pem: str) -> str:
    """The x5t#S256 thumbprint of the first certificate in ``pem`` (plain or URL-escaped).

    :raises ValueError: ``pem`` holds no parseable certificate.
    """
    return thumbprint_from_der(_leaf_der(pem))


def _parse(value: str) -> str | None:
    """Thumbprint of ``value``, or ``None`` when it is malformed (memoized by the reader)."""
    try:
        return thumbprint_from_pem(value)
    except (ValueError, UnicodeError):
        return None


class CertificateReader:
    """Finds the client certificate of a request and returns its thumbprint.

    :param settings: supplies ``client_cert_header``, ``client_cert_verify_header``,
        ``trusted_proxies`` and ``cert_cache_size``.
    """

    def __init__(self, settings: Settings) -> None:
        self._header_var = "HTTP_" + settings.client_cert_header.upper().replace("-", "_")
        verify = settings.client_cert_verify_header
        self._verify_header_var = "HTTP_" + verify.upper().replace("-", "_") if verify else None
        self._networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in settings.trusted_proxies)
        # Every request from a client carries the same certificate: parse it once.
        self._thumbprint = functools.lru_cache(maxsize=settings.cert_cache_size)(_parse)
        self.is_trusted_peer = functools.lru_cache(maxsize=256)(self._is_trusted)

    def _is_trusted(self, remote_addr: str) -> bool:
        try:
            address = ipaddress.ip_address(remote_addr)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def raw(self, environ: WSGIEnvironment) -> str | None:
        """The certificate value as forwarded, or ``None`` when there is none to believe."""
        if UWSGI_CERT_VAR in environ:
            # Set by uwsgi_param: authoritative, even when empty (no certificate).
            value = environ[UWSGI_CERT_VAR]
            verified = environ.get(UWSGI_VERIFY_VAR) if self._verify_header_var else None
        else:
            value = environ.get(self._header_var)
            if not value or not self.is_trusted_peer(environ.get("REMOTE_ADDR", "")):
                return None
            verified = environ.get(self._verify_header_var) if self._verify_header_var else None
        if not value:
            return None
        if self._verify_header_var is not None and verified != "SUCCESS":
            return None
        return str(value)

    def thumbprint(self, environ: WSGIEnvironment) -> str | None:
        """The presented certificate's x5t#S256, or ``None`` when no certificate was presented.

        :raises InvalidToken: a certificate value was forwarded but cannot be parsed.
        """
        value = self.raw(environ)
        if value is None:
            return None
        if len(value) > MAX_CERT_VALUE or "," in value:
            # A comma never occurs in a (URL-escaped) PEM: it means two header values joined,
            # e.g. a forged one ahead of the proxy's. Refuse rather than pick one.
            raise InvalidToken(_MALFORMED)
        thumbprint = self._thumbprint(value)
        if thumbprint is None:
            raise InvalidToken(_MALFORMED)
        return thumbprint


def thumbprint_command(path: str) -> int:
    """``certbound-wsgi thumbprint CERT.pem``."""
    try:
        if path == "-":
            pem = sys.stdin.read()
        else:
            with open(path, encoding="utf-8", errors="strict") as fh:
                pem = fh.read()
        print(thumbprint_from_pem(pem))
    except (OSError, ValueError, UnicodeError) as exc:
        print(f"certbound-wsgi thumbprint: {path}: {exc}", file=sys.stderr)
        return 1
    return 0
