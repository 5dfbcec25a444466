"""The client certificate as the proxies in front write it into a request header.

A proxy that terminates mutual TLS forwards the client certificate in a
header whose shape depends on the proxy. The shape is *configured*, never
guessed from the value: a value that does not have exactly the configured
shape is refused, so that an attacker cannot pick the parser that suits a
forgery.

========================  =====================================================
format                    written by
========================  =====================================================
``escaped_pem``           nginx ``$ssl_client_escaped_cert``, ingress-nginx
                          ``ssl-client-cert``, AWS ALB
                          ``X-Amzn-Mtls-Clientcert[-Leaf]``
``pem``                   a proxy that sends the PEM unescaped on one line
``rfc9440``               RFC 9440 ``Client-Cert`` (Caddy, Cloudflare, ...)
``base64_der``            HAProxy ``ssl_c_der,base64``, Traefik
                          ``passTLSClientCert`` (``pem: true``)
``xfcc``                  Envoy / Istio ``x-forwarded-client-cert``
========================  =====================================================

Every parser returns a :class:`Leaf` (the leaf certificate's DER and SHA-256,
or for an XFCC element with only ``Hash`` the SHA-256 alone) or raises
:class:`ValueError` with a short reason that is safe to log: it never quotes
the value. :func:`thumbprint` maps (format, header value) to the RFC 8705
``x5t#S256``.

Where a format carries a chain (ALB passthrough, Traefik), the leaf comes
first, and every further certificate must have signed the one before it. A
forger who puts a victim's certificate in front of the proxy's value cannot
satisfy that: the TLS handshake proved the client holds the key of the
certificate the proxy saw, and that key did not sign the victim's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, get_args
from urllib.parse import unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from .errors import ConfigurationError

__all__ = [
    "FORMATS",
    "MAX_CHAIN",
    "MAX_VALUE",
    "MAX_XFCC_ELEMENTS",
    "CertificateFormat",
    "Leaf",
    "leaf",
    "parse_base64_der",
    "parse_escaped_pem",
    "parse_pem",
    "parse_rfc9440",
    "parse_rfc9440_chain",
    "parse_xfcc",
    "thumbprint",
    "xfcc_elements",
]

CertificateFormat = Literal["escaped_pem", "pem", "rfc9440", "base64_der", "xfcc"]

#: The format names, in the order the documentation lists them.
FORMATS: Final[tuple[CertificateFormat, ...]] = get_args(CertificateFormat)

#: The longest header value looked at. A chain of a few certificates is a few
#: kilobytes; percent-encoding at most triples that.
MAX_VALUE: Final = 64 * 1024
#: The most certificates a chain may hold (leaf included).
MAX_CHAIN: Final = 8
#: The most elements an XFCC value may hold (one per proxy hop).
MAX_XFCC_ELEMENTS: Final = 16

_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]*?)-----END CERTIFICATE-----")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# RFC 8941 section 3.3.5: sf-binary = ":" *(base64) ":"
_SF_BINARY = re.compile(r":([A-Za-z0-9+/=]*):")
_XFCC_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
# Runs of ordinary characters inside a quoted value, and of a bare value.
_XFCC_QUOTED_RUN = re.compile(r'[^"\\]*')
_XFCC_BARE_RUN = re.compile(r'[^,;"=]*')
_BLANKS = re.compile(r"[ \t]*")
_SHA256_HEX = re.compile(r"[0-9A-Fa-f]{64}")
# Traefik before 2.9.4 passed its base64 through url.QueryEscape; these are the
# only three characters of the base64 alphabet that escaping changes.
_ESCAPED_BASE64 = re.compile(r"%(2[BbFf]|3[Dd])")


@dataclass(frozen=True)
class Leaf:
    """The client's leaf certificate as a header described it.

    :ivar sha256: SHA-256 of the certificate's DER encoding.
    :ivar der: the DER encoding; ``None`` when the header carried only the hash
        (an XFCC element with ``Hash`` and no ``Cert``).
    """

    sha256: bytes
    der: bytes | None = None

    @classmethod
    def from_der(cls, der: bytes) -> Leaf:
        return cls(hashlib.sha256(der).digest(), der)

    @property
    def thumbprint(self) -> str:
        """RFC 8705 section 3.1: base64url(SHA-256(DER)) without padding."""
        return base64.urlsafe_b64encode(self.sha256).rstrip(b"=").decode("ascii")


def _checked(value: str) -> str:
    if len(value) > MAX_VALUE:
        raise ValueError("the certificate header is too long")
    if not value.isascii():
        raise ValueError("the certificate header is not ASCII")
    return value


def _certificate(der: bytes) -> x509.Certificate:
    """Parse ``der``, so that garbage which happens to be base64 is not "a certificate"."""
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion):
        raise ValueError("not a DER certificate") from None


def _leaf_of_chain(ders: list[bytes]) -> Leaf:
    """The first certificate, after checking that each later one signed the one before it."""
    if not ders:
        raise ValueError("no certificate")
    if len(ders) > MAX_CHAIN:
        raise ValueError("the certificate chain is too long")
    certificates = [_certificate(der) for der in ders]
    for subject, issuer in itertools.pairwise(certificates):
        try:
            subject.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise ValueError("the certificates do not form a chain") from None
    return Leaf.from_der(ders[0])


def _strict_base64(text: str) -> bytes:
    """RFC 4648 section 4 exactly: the alphabet, and padding to a multiple of four, no more."""
    # strict_mode still reads "QUJD=" as "ABC": the length check refuses the stray "=".
    if len(text) % 4 or not _BASE64.fullmatch(text):
        raise ValueError("invalid base64")
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        raise ValueError("invalid base64") from None


def _pem_ders(text: str) -> list[bytes]:
    """The DER of every CERTIFICATE block in ``text``, which may hold nothing else but whitespace."""
    ders: list[bytes] = []
    position = 0
    for match in _PEM_BLOCK.finditer(text):
        if text[position:match.start()].strip():
            raise ValueError("text outside the PEM blocks")
        position = match.end()
        # nginx's escaped PEM has newlines; the old $ssl_client_cert tabs; others spaces.
        ders.append(_strict_base64("".join(match.group(1).split())))
    if not ders:
        raise ValueError("no PEM certificate block")
    if text[position:].strip():
        raise ValueError("text outside the PEM blocks")
    return ders


def parse_pem(value: str) -> Leaf:
    """``pem``: one PEM certificate (or a chain, leaf first) sent as is.

    :raises ValueError: anything else, including a percent-encoded value (that is ``escaped_pem``).
    """
    _checked(value)
    if "%" in value:
        raise ValueError("the PEM is percent-encoded")
    if "," in value:
        # Never in PEM: two header values joined, e.g. a client's ahead of the proxy's.
        raise ValueError("more than one header value")
    return _leaf_of_chain(_pem_ders(value))


def parse_escaped_pem(value: str) -> Leaf:
    """``escaped_pem``: the PEM percent-encoded (RFC 3986 section 2.1), leaf first.

    nginx's ``$ssl_client_escaped_cert`` escapes ``+``, ``/`` and ``=`` too; AWS ALB
    leaves them as they are. Both decode the same way, because ``+`` is not
    turned into a space (this is not form encoding).

    :raises ValueError: not exactly that.
    """
    _checked(value)
    if "," in value:
        # A comma is never written by the encoders: two header values joined.
        raise ValueError("more than one header value")
    # errors="strict": a %-escape that is not UTF-8 is refused, not replaced.
    return _leaf_of_chain(_pem_ders(unquote(value, errors="strict")))


def parse_base64_der(value: str) -> Leaf:
    """``base64_der``: the DER in standard base64 (RFC 4648 section 4), padded.

    HAProxy's ``ssl_c_der,base64`` and Caddy's ``certificate_der_base64`` hold
    the leaf alone. Traefik's ``passTLSClientCert`` with ``pem: true`` strips
    the PEM armour and newlines from each certificate the client sent (leaf
    first) and joins them with ``,``; before Traefik 2.9.4 it also escaped
    ``+``, ``/`` and ``=`` as ``%2B``, ``%2F`` and ``%3D``, which are undone.

    :raises ValueError: not exactly that.
    """
    _checked(value)
    value = _ESCAPED_BASE64.sub(lambda m: unquote(m.group(0)), value)
    parts = [part.strip(" \t") for part in value.split(",")]
    if len(parts) > MAX_CHAIN:
        raise ValueError("the certificate chain is too long")
    return _leaf_of_chain([_strict_base64(part) for part in parts])


def _sf_binary(text: str) -> bytes:
    """RFC 8941 section 4.2.7: a Byte Sequence. Parameters are not accepted (RFC 9440 defines none)."""
    match = _SF_BINARY.fullmatch(text)
    if match is None:
        raise ValueError("not a structured-field byte sequence")
    body = match.group(1)
    if not body:
        raise ValueError("an empty byte sequence")
    # Section 4.2.7: parsers SHOULD NOT fail when "=" padding is missing.
    body = body.rstrip("=")
    try:
        # strict_mode: an "=" inside the body is refused, not read as the end of the data.
        return binascii.a2b_base64(body + "=" * (-len(body) % 4), strict_mode=True)
    except binascii.Error:
        raise ValueError("invalid base64 in the byte sequence") from None


def parse_rfc9440(value: str) -> Leaf:
    """``rfc9440``: RFC 9440 section 2.2 ``Client-Cert``, one Byte Sequence of the leaf's DER.

    Section 2.2: the field "MUST NOT have a list of values or occur multiple
    times in a request", so a comma (two values joined) is refused.

    :raises ValueError: not exactly that.
    """
    # RFC 8941 section 4.2: leading and trailing spaces are discarded.
    text = _checked(value).strip(" ")
    if "," in text:
        raise ValueError("more than one header value")
    der = _sf_binary(text)
    _certificate(der)
    return Leaf.from_der(der)


def parse_rfc9440_chain(value: str) -> list[bytes]:
    """RFC 9440 section 2.3 ``Client-Cert-Chain``: a List of Byte Sequences, each a DER certificate.

    The chain does not include the leaf (that is ``Client-Cert``); it is not
    needed for the binding and is parsed here for callers that want it.

    :raises ValueError: not exactly that.
    """
    text = _checked(value).strip(" ")
    if not text:
        return []
    # RFC 8941 section 4.2.1: members are separated by "," with optional whitespace.
    members = [member.strip(" \t") for member in text.split(",")]
    if len(members) > MAX_CHAIN:
        raise ValueError("the certificate chain is too long")
    ders = [_sf_binary(member) for member in members]
    for der in ders:
        _certificate(der)
    return ders


def _run_end(pattern: re.Pattern[str], value: str, start: int) -> int:
    """Where the run of ``pattern``'s characters from ``start`` ends."""
    match = pattern.match(value, start)
    return match.end() if match else start


def _xfcc_quoted(value: str, start: int) -> tuple[str, int]:
    """The quoted value whose opening quote is at ``start``, unescaped, and where it ends."""
    chars: list[str] = []
    j, n = start + 1, len(value)
    while True:
        end = _run_end(_XFCC_QUOTED_RUN, value, j)
        chars.append(value[j:end])
        j = end
        if j >= n or (value[j] == "\\" and j + 1 >= n):
            raise ValueError("an unterminated quoted XFCC value")
        if value[j] == '"':
            return "".join(chars), j + 1
        chars.append(value[j + 1])  # after a backslash: the character itself
        j += 2


def _xfcc_bare(value: str, start: int) -> tuple[str, int]:
    """The unquoted value from ``start``, and where it ends."""
    end = _run_end(_XFCC_BARE_RUN, value, start)
    if end < len(value) and value[end] in '"=':
        raise ValueError("an unquoted XFCC value with a quote or '='")
    # Whitespace before a separator is not part of a bare value.
    return value[start:end].rstrip(" \t"), end


def _xfcc_pair(value: str, start: int) -> tuple[tuple[str, str], int]:
    """The ``key=value`` pair from ``start`` (key in lower case), and where the separator after it is."""
    equals = value.find("=", start)
    key = value[start:equals].strip(" \t") if equals >= 0 else ""
    if not _XFCC_KEY.fullmatch(key):
        raise ValueError("an XFCC pair without a valid key")
    quoted = equals + 1 < len(value) and value[equals + 1] == '"'
    text, end = (_xfcc_quoted if quoted else _xfcc_bare)(value, equals + 1)
    end = _run_end(_BLANKS, value, end)
    return (key.lower(), text), end


def xfcc_elements(value: str) -> list[list[tuple[str, str]]]:
    """Envoy's ``x-forwarded-client-cert`` by its grammar: elements of ``(key, value)`` pairs.

    Elements are separated by ``,``, pairs by ``;``, key from value by ``=``.
    A value holding ``,``, ``;`` or ``=`` is double-quoted, with ``\\"`` for a
    quote inside it (so a ``Subject`` may contain commas). Keys are
    case-insensitive and returned in lower case; values are returned unquoted.

    :raises ValueError: the value does not follow the grammar.
    """
    _checked(value)
    elements: list[list[tuple[str, str]]] = [[]]
    i = 0
    while True:
        pair, j = _xfcc_pair(value, i)
        elements[-1].append(pair)
        if j >= len(value):
            return elements
        if value[j] == ",":
            if len(elements) >= MAX_XFCC_ELEMENTS:
                raise ValueError("too many XFCC elements")
            elements.append([])
        elif value[j] != ";":
            raise ValueError("an unexpected character after an XFCC value")
        i = j + 1


def _only(pairs: list[tuple[str, str]], key: str) -> str | None:
    """The value of ``key`` in an element, ``None`` without one; a repeated key is refused."""
    found = [text for name, text in pairs if name == key]
    if len(found) > 1:
        raise ValueError("a repeated Cert or Hash in the XFCC element")
    return found[0] if found else None


def _xfcc_hash(text: str | None) -> bytes | None:
    if text is None:
        return None
    if not _SHA256_HEX.fullmatch(text):
        raise ValueError("the XFCC Hash is not a hex SHA-256")
    return bytes.fromhex(text)


def _xfcc_cert(text: str) -> Leaf:
    ders = _pem_ders(unquote(text, errors="strict"))
    if len(ders) != 1:
        raise ValueError("the XFCC Cert holds more than one certificate")
    _certificate(ders[0])
    return Leaf.from_der(ders[0])


def parse_xfcc(value: str, *, hops: int = 1) -> Leaf:
    """``xfcc``: the client certificate from the XFCC element added ``hops`` proxies from here.

    A proxy *appends* its element (Envoy's ``APPEND_FORWARD``), so the last
    element is the one the nearest proxy added, and anything before it came
    from further away, including from the client. With ``hops=1`` (the
    default) the last element is used; ``hops=2`` reads the element before
    it, e.g. an ingress gateway's behind a mesh sidecar.

    From that element, ``Cert`` (the URL-encoded PEM) gives the leaf. When
    ``Hash`` (hex SHA-256 of the DER) is present too, it must agree. When only
    ``Hash`` is present, it *is* the SHA-256 the thumbprint is made of, so the
    result has ``sha256`` and no ``der``. A key that occurs twice in the
    element, or an element with neither key, is refused.

    :raises ValueError: not exactly that.
    :raises ConfigurationError: ``hops`` is below 1.
    """
    if hops < 1:
        raise ConfigurationError("client_cert_xfcc_hops", "must be at least 1")
    elements = xfcc_elements(value)
    if len(elements) < hops:
        raise ValueError("fewer XFCC elements than trusted hops")
    pairs = elements[-hops]
    cert, digest = _only(pairs, "cert"), _xfcc_hash(_only(pairs, "hash"))
    if cert is None:
        if digest is None:
            raise ValueError("the XFCC element has neither Cert nor Hash")
        return Leaf(digest)
    found = _xfcc_cert(cert)
    if digest is not None and not hmac.compare_digest(digest, found.sha256):
        raise ValueError("the XFCC Hash does not match its Cert")
    return found


_PARSERS: Final[dict[str, Callable[[str], Leaf]]] = {
    "escaped_pem": parse_escaped_pem,
    "pem": parse_pem,
    "rfc9440": parse_rfc9440,
    "base64_der": parse_base64_der,
    "xfcc": parse_xfcc,
}


def leaf(format: CertificateFormat, value: str, *, xfcc_hops: int = 1) -> Leaf:
    """The leaf certificate in ``value``, a header written in ``format``.

    :param xfcc_hops: for ``xfcc``, which element to read (see :func:`parse_xfcc`); ignored otherwise.
    :raises ValueError: ``value`` is not exactly of that format (a 401 to the client).
    :raises ConfigurationError: ``format`` is not one of :data:`FORMATS`.
    """
    if format == "xfcc":
        return parse_xfcc(value, hops=xfcc_hops)
    parser = _PARSERS.get(format)
    if parser is None:
        raise ConfigurationError("client_cert_format", f"must be one of {', '.join(FORMATS)}")
    return parser(value)


def thumbprint(format: CertificateFormat, value: str, *, xfcc_hops: int = 1) -> str:
    """The RFC 8705 ``x5t#S256`` of the leaf certificate in ``value``, a header written in ``format``.

    :param xfcc_hops: for ``xfcc``, which element to read (see :func:`parse_xfcc`); ignored otherwise.
    :raises ValueError: ``value`` is not exactly of that format.
    :raises ConfigurationError: ``format`` is not one of :data:`FORMATS`.
    """
    return leaf(format, value, xfcc_hops=xfcc_hops).thumbprint
