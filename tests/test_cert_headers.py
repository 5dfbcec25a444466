"""certbound_wsgi.cert_headers: the certificate header of each proxy, parsed by the format it is configured as.

Each row builds the header value the way that proxy builds it from alice's
certificate (and, for chains, the development CA's), and expects alice's
thumbprint computed independently (tests.conftest.independent_thumbprint).
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certbound_wsgi import cert_headers
from certbound_wsgi.authenticator import build as build_authenticator
from certbound_wsgi.cert_headers import (
    FORMATS,
    MAX_CHAIN,
    MAX_VALUE,
    MAX_XFCC_ELEMENTS,
    CertificateFormat,
    Leaf,
    leaf,
    parse_rfc9440_chain,
    parse_xfcc,
    thumbprint,
    xfcc_elements,
)
from certbound_wsgi.certificates import CertificateReader
from certbound_wsgi.channel import UWSGI_SECRET_VAR
from certbound_wsgi.dev.pki import DevCA, Issued
from certbound_wsgi.errors import ConfigurationError, InvalidToken
from certbound_wsgi.settings import Settings
from tests.conftest import TEST_PROXY_SECRET


@dataclass(frozen=True)
class Certs:
    """PEM and DER of alice, mallory and their CA."""

    alice_pem: str
    mallory_pem: str
    ca_pem: str

    @staticmethod
    def der(pem: str) -> bytes:
        return x509.load_pem_x509_certificate(pem.encode("ascii")).public_bytes(Encoding.DER)

    def b64(self, pem: str) -> str:
        return base64.b64encode(self.der(pem)).decode("ascii")

    def sha256_hex(self, pem: str) -> str:
        return hashlib.sha256(self.der(pem)).hexdigest()


@pytest.fixture(scope="module")
def certs(pki: DevCA, alice: Issued, mallory: Issued) -> Certs:
    return Certs(alice.cert_pem, mallory.cert_pem, Path(pki.cert_path).read_text())


def _envoy_cert(pem: str) -> str:
    # Envoy's Cert: the PEM with exactly newline, space, "+", "/" and "=" percent-encoded.
    return "".join({"\n": "%0A", " ": "%20", "+": "%2B", "/": "%2F", "=": "%3D"}.get(c, c) for c in pem)


def _traefik(pem: str) -> str:
    # Traefik's sanitize(): the PEM without its armour and newlines.
    return pem.replace("-----BEGIN CERTIFICATE-----", "").replace("-----END CERTIFICATE-----", "").replace("\n", "")


# (format, build(certs) -> header value), one row per documented producer.
SHAPES: list[tuple[CertificateFormat, Callable[[Certs], str]]] = [
    ("escaped_pem", lambda c: quote(c.alice_pem, safe="")),  # nginx $ssl_client_escaped_cert
    ("escaped_pem", lambda c: quote(c.alice_pem, safe="-_.~")),  # ingress-nginx ssl-client-cert (the same variable)
    ("escaped_pem", lambda c: quote(c.alice_pem, safe="+=/")),  # ALB X-Amzn-Mtls-Clientcert-Leaf (verify mode)
    ("escaped_pem", lambda c: quote(c.alice_pem + c.ca_pem, safe="+=/")),  # ALB X-Amzn-Mtls-Clientcert (passthrough)
    ("pem", lambda c: c.alice_pem.replace("\n", " ")),  # PEM on one line, spaces for newlines
    ("pem", lambda c: c.alice_pem.replace("\n", "\t")),  # nginx's deprecated $ssl_client_cert, tabs
    ("base64_der", lambda c: c.b64(c.alice_pem)),  # HAProxy ssl_c_der,base64; Caddy certificate_der_base64
    ("base64_der", lambda c: _traefik(c.alice_pem)),  # Traefik >= 2.9.4, leaf only
    ("base64_der", lambda c: _traefik(c.alice_pem) + "," + _traefik(c.ca_pem)),  # Traefik, client sent a chain
    ("base64_der", lambda c: quote(_traefik(c.alice_pem), safe="")),  # Traefik < 2.9.4 (url.QueryEscape)
    ("rfc9440", lambda c: f":{c.b64(c.alice_pem)}:"),  # RFC 9440 Client-Cert; Caddy ":{...der_base64}:"
    ("rfc9440", lambda c: f" :{c.b64(c.alice_pem).rstrip('=')}: "),  # RFC 8941: padding optional, SP trimmed
    ("xfcc", lambda c: (  # Envoy SANITIZE_SET, set_current_client_cert_details {cert, subject, uri}
        f'By=spiffe://cluster.local/ns/api/sa/gateway;Hash={c.sha256_hex(c.alice_pem)};'
        f'Cert="{_envoy_cert(c.alice_pem)}";Subject="CN=alice,O=Example\\, \\"Inc.\\"";'
        f'URI=spiffe://cluster.local/ns/app/sa/alice'
    )),
    ("xfcc", lambda c: f"Hash={c.sha256_hex(c.alice_pem)};Cert={_envoy_cert(c.alice_pem)}"),  # Cert unquoted
    ("xfcc", lambda c: (  # APPEND_FORWARD: a client-forged element first, the proxy's last
        f'Hash={c.sha256_hex(c.mallory_pem)};Cert="{_envoy_cert(c.mallory_pem)}",'
        f'By=spiffe://x;Hash={c.sha256_hex(c.alice_pem)};Cert="{_envoy_cert(c.alice_pem)}";DNS=a.example;DNS=b.example'
    )),
]
SHAPE_IDS = [
    "nginx", "ingress-nginx", "alb-leaf", "alb-passthrough-chain", "pem-spaces", "pem-tabs", "haproxy-caddy",
    "traefik", "traefik-chain", "traefik-legacy-escaped", "rfc9440", "rfc9440-unpadded", "envoy-istio",
    "envoy-bare-cert", "envoy-append-forward",
]


@pytest.mark.parametrize(("fmt", "build"), SHAPES, ids=SHAPE_IDS)
def test_each_proxy_shape_gives_alice_s_thumbprint(certs: Certs, alice_x5t: str, fmt: CertificateFormat,
                                                   build: Callable[[Certs], str]) -> None:
    value = build(certs)
    assert thumbprint(fmt, value) == alice_x5t
    found = leaf(fmt, value)
    assert found.der == certs.der(certs.alice_pem)


def test_xfcc_hash_only_gives_the_same_thumbprint(certs: Certs, alice_x5t: str) -> None:
    """A hex SHA-256 of the DER converts to x5t#S256 exactly: base64url of the same 32 bytes."""
    value = f"By=spiffe://gw;Hash={certs.sha256_hex(certs.alice_pem).upper()};Subject=\"CN=alice\""
    found = parse_xfcc(value)
    assert found == Leaf(hashlib.sha256(certs.der(certs.alice_pem)).digest(), None)
    assert thumbprint("xfcc", value) == alice_x5t


def test_xfcc_hops_reads_the_gateway_s_element_behind_a_sidecar(certs: Certs, alice_x5t: str,
                                                                mallory_x5t: str) -> None:
    gateway = f"Hash={certs.sha256_hex(certs.alice_pem)}"
    sidecar = f"By=spiffe://app;Hash={certs.sha256_hex(certs.mallory_pem)};URI=spiffe://gateway"
    assert parse_xfcc(f"{gateway},{sidecar}").thumbprint == mallory_x5t
    assert parse_xfcc(f"{gateway},{sidecar}", hops=2).thumbprint == alice_x5t
    with pytest.raises(ValueError, match="fewer XFCC elements"):
        parse_xfcc(sidecar, hops=2)
    with pytest.raises(ConfigurationError):
        parse_xfcc(sidecar, hops=0)


def test_xfcc_grammar() -> None:
    value = 'By=a;Subject="x=1,y=\\"2\\";z";URI=u , hash=00;Cert="c"'
    assert xfcc_elements(value) == [
        [("by", "a"), ("subject", 'x=1,y="2";z'), ("uri", "u")],
        [("hash", "00"), ("cert", "c")],
    ]


def test_rfc9440_chain(certs: Certs) -> None:
    ca = certs.b64(certs.ca_pem)
    assert parse_rfc9440_chain(f":{ca}:, :{ca}:") == [certs.der(certs.ca_pem)] * 2
    assert parse_rfc9440_chain("") == []
    with pytest.raises(ValueError):
        parse_rfc9440_chain(f":{ca}:,")
    with pytest.raises(ValueError, match="too long"):
        parse_rfc9440_chain(", ".join([f":{ca}:"] * (MAX_CHAIN + 1)))


def test_unknown_format_is_a_configuration_error(certs: Certs) -> None:
    with pytest.raises(ConfigurationError, match="client_cert_format"):
        leaf("guess", certs.alice_pem)  # type: ignore[arg-type]
    assert FORMATS == ("escaped_pem", "pem", "rfc9440", "base64_der", "xfcc")


# -- hostile values --------------------------------------------------------------

def _half(text: str) -> str:
    return text[: len(text) // 2]


HOSTILE: list[tuple[CertificateFormat, Callable[[Certs], str], str]] = [
    # Two values comma-joined (a client's forged one ahead of the proxy's) where the format has no lists.
    ("escaped_pem", lambda c: quote(c.alice_pem, safe="") + "," + quote(c.mallory_pem, safe=""),
     "more than one header value"),
    ("pem", lambda c: c.alice_pem.replace("\n", " ") + "," + c.mallory_pem.replace("\n", " "),
     "more than one header value"),
    ("rfc9440", lambda c: f":{c.b64(c.alice_pem)}:, :{c.b64(c.mallory_pem)}:", "more than one header value"),
    # Where the format has lists, a forged leaf ahead of the real one does not form a chain.
    ("base64_der", lambda c: f"{c.b64(c.alice_pem)},{c.b64(c.mallory_pem)}", "do not form a chain"),
    ("escaped_pem", lambda c: quote(c.alice_pem + c.mallory_pem, safe="+=/"), "do not form a chain"),
    ("base64_der", lambda c: f"{c.b64(c.ca_pem)},{c.b64(c.alice_pem)}", "do not form a chain"),
    ("base64_der", lambda c: ",".join([c.b64(c.ca_pem)] * (MAX_CHAIN + 1)), "too long"),
    # Truncated.
    ("escaped_pem", lambda c: _half(quote(c.alice_pem, safe="")), "no PEM certificate block"),
    ("base64_der", lambda c: _half(c.b64(c.alice_pem)), "invalid base64|not a DER certificate"),
    ("rfc9440", lambda c: f":{_half(c.b64(c.alice_pem))}:", "not a DER certificate|invalid base64"),
    ("rfc9440", lambda c: f":{c.b64(c.alice_pem)}", "not a structured-field byte sequence"),
    ("xfcc", lambda c: f'Cert="{_half(_envoy_cert(c.alice_pem))}', "unterminated"),
    # Oversized.
    ("escaped_pem", lambda c: "%20" * (MAX_VALUE // 3 + 1), "too long"),
    ("base64_der", lambda c: "A" * (MAX_VALUE + 1), "too long"),
    ("xfcc", lambda c: ",".join(["Hash=" + "0" * 64] * (MAX_XFCC_ELEMENTS + 1)), "too many XFCC elements"),
    # Wrong base64 or wrong encoding.
    ("base64_der", lambda c: c.b64(c.alice_pem).replace("A", "-", 1), "invalid base64"),
    ("base64_der", lambda c: base64.urlsafe_b64encode(c.der(c.alice_pem)).decode() + "_-",
     "invalid base64"),
    ("base64_der", lambda c: c.b64(c.alice_pem) + "=", "invalid base64"),
    ("rfc9440", lambda c: f":{c.b64(c.alice_pem)[:-4]}*AA=:", "not a structured-field byte sequence"),
    ("base64_der", lambda c: base64.b64encode(b"not a certificate").decode(), "not a DER certificate"),
    ("pem", lambda c: quote(c.alice_pem, safe=""), "percent-encoded"),
    ("escaped_pem", lambda c: quote(c.alice_pem, safe="").replace("%0A", "%FF", 1), "can't decode|invalid"),
    ("escaped_pem", lambda c: "hello" + quote(c.alice_pem, safe=""), "text outside the PEM blocks"),
    ("pem", lambda c: c.alice_pem.replace("\n", " ") + " trailing", "text outside the PEM blocks"),
    ("base64_der", lambda c: "é" + c.b64(c.alice_pem), "not ASCII"),
    ("escaped_pem", lambda c: f":{c.b64(c.alice_pem)}:", "no PEM certificate block"),  # format is never guessed
    ("rfc9440", lambda c: c.b64(c.alice_pem), "not a structured-field byte sequence"),
    ("base64_der", lambda c: quote(c.alice_pem, safe=""), "invalid base64"),
    ("rfc9440", lambda c: f":{c.b64(c.alice_pem)}:;a=1", "not a structured-field byte sequence"),
    ("rfc9440", lambda c: "::", "empty"),
    # A chain where a leaf is expected.
    ("xfcc", lambda c: f'Cert="{_envoy_cert(c.alice_pem + c.ca_pem)}"', "more than one certificate"),
    ("rfc9440", lambda c: f":{c.b64(c.alice_pem)}{c.b64(c.ca_pem)}:", "invalid base64|not a DER"),
    # XFCC that breaks the grammar or contradicts itself.
    ("xfcc", lambda c: f"Hash={c.sha256_hex(c.mallory_pem)};Cert=\"{_envoy_cert(c.alice_pem)}\"", "does not match"),
    ("xfcc", lambda c: f"Hash={c.sha256_hex(c.alice_pem)};Hash={c.sha256_hex(c.mallory_pem)}", "repeated"),
    ("xfcc", lambda c: f'Cert="{_envoy_cert(c.alice_pem)}";cert="{_envoy_cert(c.mallory_pem)}"', "repeated"),
    ("xfcc", lambda c: "By=spiffe://gw;Subject=\"CN=alice\"", "neither Cert nor Hash"),
    ("xfcc", lambda c: "Hash=abc", "not a hex SHA-256"),
    ("xfcc", lambda c: f"Hash={c.sha256_hex(c.alice_pem)},", "without a valid key"),
    ("xfcc", lambda c: f"Hash={c.sha256_hex(c.alice_pem)};;", "without a valid key"),
    ("xfcc", lambda c: f'Subject="a"b;Hash={c.sha256_hex(c.alice_pem)}', "unexpected character"),
    ("xfcc", lambda c: f"Hash={c.sha256_hex(c.alice_pem)}=", "quote or '='"),
    ("xfcc", lambda c: "", "without a valid key"),
    ("rfc9440", lambda c: ":QUI=QUJD:", "invalid base64"),
    ("base64_der", lambda c: "QUI=QUJD", "invalid base64"),
]


@pytest.mark.parametrize(("fmt", "build", "reason"), HOSTILE, ids=[
    "escaped-pem-two-values", "pem-two-values", "rfc9440-two-values", "base64-der-forged-prefix",
    "alb-forged-prefix", "base64-der-ca-first", "base64-der-chain-too-long", "escaped-pem-truncated",
    "base64-der-truncated", "rfc9440-truncated", "rfc9440-no-closing-colon", "xfcc-truncated",
    "escaped-pem-oversized", "base64-der-oversized", "xfcc-too-many-elements", "base64-der-bad-char",
    "base64-der-urlsafe-alphabet", "base64-der-bad-padding", "rfc9440-bad-char", "base64-der-not-a-cert",
    "pem-percent-encoded", "escaped-pem-not-utf8", "escaped-pem-leading-text", "pem-trailing-text",
    "base64-der-non-ascii", "escaped-pem-given-rfc9440", "rfc9440-given-bare-base64", "base64-der-given-pem",
    "rfc9440-parameters", "rfc9440-empty", "xfcc-cert-is-a-chain", "rfc9440-two-ders-in-one",
    "xfcc-hash-mismatch", "xfcc-repeated-hash", "xfcc-repeated-cert", "xfcc-no-cert-no-hash",
    "xfcc-short-hash", "xfcc-empty-element", "xfcc-empty-pair", "xfcc-text-after-quote",
    "xfcc-bare-equals", "xfcc-empty", "rfc9440-padding-inside", "base64-der-padding-inside",
])
def test_hostile_values_are_refused(certs: Certs, fmt: CertificateFormat, build: Callable[[Certs], str],
                                    reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as raised:
        thumbprint(fmt, build(certs))
    assert not isinstance(raised.value, ConfigurationError)


def test_reasons_never_quote_the_value(certs: Certs) -> None:
    for fmt, build, _ in HOSTILE:
        value = build(certs)
        with pytest.raises(ValueError) as raised:
            thumbprint(fmt, value)
        assert len(str(raised.value)) < 120 and (len(value) < 8 or value[:8] not in str(raised.value)), fmt


# -- hypothesis: any input is a Leaf or a ValueError, never anything else ----------

_ALPHABET = st.sampled_from([*"AZaz09+/=:,;\"\\%-_ \t\n", "%0A", "%2B", "-----BEGIN CERTIFICATE-----",
                             "-----END CERTIFICATE-----", "Hash=", "Cert="])


def _outcome(fmt: CertificateFormat, value: str) -> Leaf | None:
    try:
        return leaf(fmt, value)
    except ValueError as exc:
        assert not isinstance(exc, ConfigurationError)
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(FORMATS), value=st.text(max_size=300) | st.lists(_ALPHABET, max_size=60).map("".join))
def test_arbitrary_text_never_raises_anything_but_value_error(fmt: CertificateFormat, value: str) -> None:
    assert _outcome(fmt, value) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_proxy_values_never_raise_anything_but_value_error(certs: Certs, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(SHAPES) - 1), label="shape")
    fmt, build = SHAPES[index]
    value = build(certs)
    position = data.draw(st.integers(0, len(value)), label="position")
    action = data.draw(st.sampled_from(["truncate", "insert", "replace", "duplicate"]), label="action")
    char = data.draw(st.sampled_from(list(",;:=\"%+/ A\\\x00é")), label="char")
    if action == "truncate":
        mutated = value[:position]
    elif action == "insert":
        mutated = value[:position] + char + value[position:]
    elif action == "replace":
        mutated = value[:position] + char + value[position + 1:]
    else:
        mutated = value + ", " + value
    found = _outcome(fmt, mutated)
    if found is not None and found.der is not None:
        # Whatever was accepted is a certificate, and the thumbprint is of exactly those bytes.
        assert found.sha256 == hashlib.sha256(found.der).digest()
        x509.load_der_x509_certificate(found.der)
    if action == "duplicate" and fmt != "xfcc":
        # Two copies joined are never one certificate, except where a chain is legitimate and
        # the copy would have to have signed itself.
        assert found is None


def test_module_has_no_other_public_parsers() -> None:
    # certificates.py will call only leaf()/thumbprint(); the parsers are public for tests and docs.
    assert set(cert_headers.__all__) >= {"leaf", "thumbprint", "FORMATS", "Leaf"}


# -- through the settings and the certificate reader (client_cert_format) ----------

# The header each producer writes: the reader is configured with it and with the row's format.
SHAPE_HEADERS = {
    "nginx": "X-SSL-Client-Cert", "ingress-nginx": "ssl-client-cert", "alb-leaf": "X-Amzn-Mtls-Clientcert-Leaf",
    "alb-passthrough-chain": "X-Amzn-Mtls-Clientcert", "pem-spaces": "X-SSL-Client-Cert",
    "pem-tabs": "X-SSL-Client-Cert", "haproxy-caddy": "X-Client-Cert", "traefik": "X-Forwarded-Tls-Client-Cert",
    "traefik-chain": "X-Forwarded-Tls-Client-Cert", "traefik-legacy-escaped": "X-Forwarded-Tls-Client-Cert",
    "rfc9440": "Client-Cert", "rfc9440-unpadded": "Client-Cert", "envoy-istio": "X-Forwarded-Client-Cert",
    "envoy-bare-cert": "X-Forwarded-Client-Cert", "envoy-append-forward": "X-Forwarded-Client-Cert",
}
PEER = "127.0.0.1"
SECRET_VAR = "HTTP_X_CERTBOUND_PROXY_SECRET"  # proxy_secret_header's default, as the WSGI server names it


def reader_for(**options: Any) -> CertificateReader:
    """The reader exactly as the middleware builds it from these settings (the channel: the proxy secret)."""
    settings = Settings(issuer="https://issuer.test", audience=("https://api.test",),
                        **{"proxy_secret": TEST_PROXY_SECRET, **options})
    return build_authenticator(settings).certificates


def from_header(header: str, value: str) -> dict[str, str]:
    """The WSGI environ of a request through the proxy (its secret) carrying ``header: value`` (PEP 3333 key)."""
    return {"HTTP_" + header.upper().replace("-", "_"): value, SECRET_VAR: TEST_PROXY_SECRET, "REMOTE_ADDR": PEER}


@pytest.mark.parametrize(("fmt", "build_value", "header"),
                         [(fmt, b, SHAPE_HEADERS[i]) for (fmt, b), i in zip(SHAPES, SHAPE_IDS, strict=True)],
                         ids=SHAPE_IDS)
def test_the_reader_reads_each_shape_in_its_configured_format(
        certs: Certs, alice_x5t: str, fmt: CertificateFormat, build_value: Callable[[Certs], str],
        header: str) -> None:
    reader = reader_for(client_cert_header=header, client_cert_format=fmt)
    assert reader.thumbprint(from_header(header, build_value(certs))) == alice_x5t


# Where one format's value is also exactly another's: percent-decoding leaves an unescaped PEM as it is,
# so a one-line PEM is a (trivially) escaped PEM. Nothing else is accepted under another format.
_SAME_SHAPE = {("pem-spaces", "escaped_pem"), ("pem-tabs", "escaped_pem")}


@pytest.mark.parametrize("configured", FORMATS)
def test_no_format_is_guessed(certs: Certs, configured: CertificateFormat) -> None:
    """Every producer's value, read under every other configured format, is refused (401), not converted."""
    reader = reader_for(client_cert_header="X-Cert", client_cert_format=configured)
    accepted = []
    for (fmt, build_value), shape in zip(SHAPES, SHAPE_IDS, strict=True):
        if fmt == configured or (shape, configured) in _SAME_SHAPE:
            continue
        try:
            reader.thumbprint(from_header("X-Cert", build_value(certs)))
        except InvalidToken as exc:
            assert exc.description == "the client certificate could not be parsed"
        else:
            accepted.append(shape)
    assert accepted == []


def test_the_uwsgi_variable_is_escaped_pem_whatever_the_header_format(certs: Certs, alice_x5t: str) -> None:
    reader = reader_for(client_cert_header="X-Client-Cert", client_cert_format="base64_der")
    uwsgi = {UWSGI_SECRET_VAR: TEST_PROXY_SECRET}  # uwsgi_param CERTBOUND_PROXY_SECRET
    assert reader.thumbprint({**uwsgi, "SSL_CLIENT_CERT": quote(certs.alice_pem, safe="")}) == alice_x5t
    with pytest.raises(InvalidToken):
        reader.thumbprint({**uwsgi, "SSL_CLIENT_CERT": certs.b64(certs.alice_pem)})
    # The same base64 text in the header is fine: the memo is keyed by the format as well as the value.
    assert reader.thumbprint(from_header("X-Client-Cert", certs.b64(certs.alice_pem))) == alice_x5t


def test_commas_are_the_parsers_business(certs: Certs, alice_x5t: str) -> None:
    """The reader no longer refuses every comma: XFCC elements and Traefik's chain have them legitimately,
    and a format without lists refuses two joined values by its own grammar."""
    chain = reader_for(client_cert_header="X-Cert", client_cert_format="base64_der")
    assert chain.thumbprint(from_header("X-Cert", f"{certs.b64(certs.alice_pem)},{certs.b64(certs.ca_pem)}")) \
        == alice_x5t
    nginx = reader_for()
    joined = quote(certs.alice_pem, safe="") + "," + quote(certs.alice_pem, safe="")
    with pytest.raises(InvalidToken):
        nginx.thumbprint(from_header("X-SSL-Client-Cert", joined))


def test_a_header_outside_the_channel_is_still_ignored(certs: Certs) -> None:
    """Whatever the format, the header is believed only through the authenticated channel (issue 11)."""
    reader = reader_for(client_cert_header="Client-Cert", client_cert_format="rfc9440")
    environ = from_header("Client-Cert", f":{certs.b64(certs.alice_pem)}:")
    assert reader.thumbprint({**environ, SECRET_VAR: "a-guess-" + TEST_PROXY_SECRET[8:]}) is None
    del environ[SECRET_VAR]
    assert reader.thumbprint(environ) is None


def test_a_parsed_value_is_memoized(certs: Certs, alice_x5t: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = cert_headers.parse_rfc9440
    monkeypatch.setitem(cert_headers._PARSERS, "rfc9440", lambda v: calls.append(v) or real(v))
    reader = reader_for(client_cert_header="Client-Cert", client_cert_format="rfc9440")
    value = f":{certs.b64(certs.alice_pem)}:"
    for _ in range(3):
        assert reader.thumbprint(from_header("Client-Cert", value)) == alice_x5t
    assert calls == [value]


@pytest.mark.parametrize(("options", "option"), [
    pytest.param({"client_cert_format": "guess"}, "client_cert_format", id="unknown-format"),
    pytest.param({"client_cert_format": "DER"}, "client_cert_format", id="wrong-case"),
    pytest.param({"client_cert_format": "xfcc", "client_cert_xfcc_hops": 0}, "client_cert_xfcc_hops", id="hops-0"),
    pytest.param({"client_cert_format": "xfcc", "client_cert_xfcc_hops": MAX_XFCC_ELEMENTS + 1},
                 "client_cert_xfcc_hops", id="hops-above-max"),
    pytest.param({"client_cert_xfcc_hops": 2}, "client_cert_xfcc_hops", id="hops-without-xfcc"),
])
def test_invalid_format_settings_are_refused(options: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{option}:"):
        Settings(issuer="https://issuer.test", audience=("https://api.test",), **options)


def test_format_settings_from_the_environment() -> None:
    settings = Settings.from_env({"CERTBOUND_ISSUER": "https://issuer.test", "CERTBOUND_AUDIENCE": "a",
                                  "CERTBOUND_CLIENT_CERT_FORMAT": "xfcc", "CERTBOUND_CLIENT_CERT_XFCC_HOPS": "2"})
    assert (settings.client_cert_format, settings.client_cert_xfcc_hops) == ("xfcc", 2)
    assert Settings(issuer="https://issuer.test", audience=("a",)).client_cert_format == "escaped_pem"


# -- Kubernetes (docs/kubernetes.md): the header shapes of its two examples ------------

def test_ingress_nginx_ssl_client_cert(certs: Certs, alice_x5t: str) -> None:
    """ingress-nginx: ``proxy_set_header ssl-client-cert $ssl_client_escaped_cert`` (its nginx.tmpl), read with
    ``client_cert_header=ssl-client-cert`` and the default format. The controller drops a client's
    ``ssl_client_cert`` (underscores, nginx's default), and PEP 3333 servers map it to the same key anyway:
    what reaches the reader under that key is the controller's value or nothing."""
    trusting = reader_for(client_cert_header="ssl-client-cert", trusted_proxies=("10.42.0.0/16",))
    escaped = quote(certs.alice_pem, safe="-_.~")  # nginx's escaping: reserved characters and %

    def environ(**changes: str) -> dict[str, str]:
        # A new dict each time: the reader takes the secret out of the environ it is given.
        return {k: v for k, v in {**from_header("ssl-client-cert", escaped), "REMOTE_ADDR": "10.42.0.7",
                                  **changes}.items() if v}

    assert trusting.thumbprint(environ()) == alice_x5t
    # The secret and the controllers' network must both hold.
    assert trusting.thumbprint(environ(REMOTE_ADDR="10.43.0.7")) is None
    assert trusting.thumbprint(environ(**{SECRET_VAR: ""})) is None
    # Hostile: a value a client could add if the controller did not overwrite it (pass-certificate off).
    for forged in (f"{escaped},{escaped}", certs.b64(certs.alice_pem), escaped[: len(escaped) // 2], "%ZZ"):
        with pytest.raises(InvalidToken):
            trusting.thumbprint(environ(HTTP_SSL_CLIENT_CERT=forged))


def test_istio_sidecar_behind_a_gateway_reads_the_gateway_s_element(certs: Certs, alice_x5t: str,
                                                                    mallory_x5t: str) -> None:
    """The sidecar appends an element describing the gateway's certificate; the end client's is the
    gateway's element before it (``client_cert_xfcc_hops=2``). The gateway must SANITIZE_SET, so that
    without a client certificate the sidecar's element is the only one, and hops=2 finds nothing."""
    reader = reader_for(client_cert_header="X-Forwarded-Client-Cert", client_cert_format="xfcc",
                        client_cert_xfcc_hops=2)
    gateway = f'Hash={certs.sha256_hex(certs.alice_pem)};Cert="{_envoy_cert(certs.alice_pem)}";Subject="CN=alice"'
    sidecar = f"By=spiffe://cluster.local/ns/api/sa/app;Hash={certs.sha256_hex(certs.mallory_pem)};" \
              "URI=spiffe://cluster.local/ns/istio-system/sa/ingressgateway"
    header = "X-Forwarded-Client-Cert"
    assert reader.thumbprint(from_header(header, f"{gateway},{sidecar}")) == alice_x5t
    forged = f"Hash={certs.sha256_hex(certs.mallory_pem)}"
    assert reader.thumbprint(from_header(header, f"{forged},{gateway},{sidecar}")) == alice_x5t
    for hostile in (sidecar, f"{gateway};{sidecar}", f"{gateway},,{sidecar}", f'{gateway[:-3]},{sidecar}'):
        with pytest.raises(InvalidToken):
            reader.thumbprint(from_header(header, hostile))
    assert reader_for(client_cert_header=header, client_cert_format="xfcc").thumbprint(
        from_header(header, f"{gateway},{sidecar}")) == mallory_x5t


@functools.cache
def _reader(fmt: CertificateFormat) -> CertificateReader:
    return reader_for(client_cert_header="X-Cert", client_cert_format=fmt)


@settings(max_examples=300, deadline=None)
@given(fmt=st.sampled_from(FORMATS), value=st.text(min_size=1, max_size=300) | st.lists(_ALPHABET, min_size=1,
                                                                                       max_size=60).map("".join))
def test_the_reader_answers_hostile_text_with_invalid_token_only(fmt: CertificateFormat, value: str) -> None:
    """Through the reader, any header value is a thumbprint or a 401 (InvalidToken), never a 500."""
    try:
        _reader(fmt).thumbprint(from_header("X-Cert", value))
    except InvalidToken as exc:
        assert exc.status == 401 and exc.description == "the client certificate could not be parsed"
