"""The client certificate: where it is read from, and its RFC 8705 thumbprint.

nginx terminates mutual TLS and forwards the certificate either as the uWSGI
variable ``SSL_CLIENT_CERT`` or as a request header. Anyone who reaches the
worker without nginx can write either (any header over HTTP; every variable of
a uwsgi packet), so both are believed only when the request came through the
authenticated channel (:mod:`certbound_wsgi.channel`): the proxy secret, or a
trusted Unix socket or address. The header's shape is the configured
``client_cert_format`` (:mod:`certbound_wsgi.cert_headers`); the uWSGI
variable is always nginx's escaped PEM.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
from urllib.parse import unquote

from cryptography import x509

from .cert_headers import CertificateFormat
from .cert_headers import thumbprint as header_thumbprint
from .channel import ProxyChannel, environ_key
from .errors import InvalidToken
from .types import WSGIEnvironment

__all__ = ["CertificateReader", "thumbprint_from_der", "thumbprint_from_pem"]

#: The uWSGI variables set by ``uwsgi_param``. No header becomes them, but a uwsgi packet sent
#: straight to the worker can carry them: believed only through the channel, like the header.
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


def _parse(cert_format: CertificateFormat, value: str, xfcc_hops: int) -> str | None:
    """Thumbprint of ``value`` written in ``cert_format``, or ``None`` when it is not exactly that
    (memoized by the reader). Strict, unlike :func:`thumbprint_from_pem`: no format is guessed."""
    try:
        return header_thumbprint(cert_format, value, xfcc_hops=xfcc_hops)
    except (ValueError, UnicodeError):
        return None


class CertificateReader:
    """Finds the client certificate of a request and returns its thumbprint.

    Like werkzeug's ``ProxyFix``, it states in its constructor what it believes: the
    uWSGI variable or the header, and either only through ``channel``.

    :param client_cert_header: the request header the proxy forwards the certificate in.
    :param client_cert_verify_header: a header that must say ``SUCCESS`` for the certificate to
        count (nginx's ``$ssl_client_verify``); empty: not checked.
    :param channel: decides whether a request came through the authenticated channel from the proxy.
    :param cert_format: ``client_cert_format``, the shape the proxy writes the header in; the
        uWSGI variable is always ``escaped_pem``.
    :param xfcc_hops: ``client_cert_xfcc_hops``, the XFCC element to read, counted from the last.
    :param cache_size: parsed certificates remembered, keyed by the forwarded value.
    """

    def __init__(
        self,
        *,
        client_cert_header: str,
        client_cert_verify_header: str,
        channel: ProxyChannel,
        cert_format: CertificateFormat = "escaped_pem",
        xfcc_hops: int = 1,
        cache_size: int,
    ) -> None:
        self._format: CertificateFormat = cert_format
        self._xfcc_hops = xfcc_hops
        self._header_var = environ_key(client_cert_header)
        self._verify_header_var = environ_key(client_cert_verify_header) if client_cert_verify_header else None
        self.channel = channel
        # Every request from a client carries the same certificate: parse it once.
        self._thumbprint = functools.lru_cache(maxsize=cache_size)(_parse)

    def _believed(self, environ: WSGIEnvironment) -> tuple[str, CertificateFormat] | None:
        """The certificate value as forwarded and the shape it is written in, or ``None``."""
        if UWSGI_CERT_VAR in environ:
            # Set by uwsgi_param: it is the certificate, even when empty (no certificate), always
            # nginx's escaped PEM.
            value = environ[UWSGI_CERT_VAR]
            verified = environ.get(UWSGI_VERIFY_VAR)
            cert_format: CertificateFormat = "escaped_pem"
        else:
            value = environ.get(self._header_var)
            verified = environ.get(self._verify_header_var) if self._verify_header_var else None
            cert_format = self._format
        if not value:
            return None
        verdict = self.channel.verdict(environ)
        if verdict.reason is not None:
            self.channel.refused(environ, verdict.reason)
            return None
        if self._verify_header_var is not None and verified != "SUCCESS":
            return None
        return (value if type(value) is str else str(value)), cert_format

    def thumbprint(self, environ: WSGIEnvironment) -> str | None:
        """The presented certificate's x5t#S256, or ``None`` when no certificate was presented.

        :raises InvalidToken: a certificate value was forwarded but cannot be parsed.
        """
        believed = self._believed(environ)
        if believed is None:
            return None
        value, cert_format = believed
        if len(value) > MAX_CERT_VALUE:
            raise InvalidToken(_MALFORMED)
        # Each parser refuses two header values joined (a forged one ahead of the proxy's) by its
        # own grammar: a comma is never in PEM, but separates XFCC elements and Traefik's chain.
        thumbprint = self._thumbprint(cert_format, value, self._xfcc_hops)
        if thumbprint is None:
            raise InvalidToken(_MALFORMED)
        return thumbprint

