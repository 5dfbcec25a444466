"""certbound_wsgi.certificates: where the client certificate comes from, and its thumbprint."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certbound_wsgi.certificates import MAX_CERT_VALUE, CertificateReader, thumbprint_from_der, thumbprint_from_pem
from certbound_wsgi.channel import UWSGI_SECRET_VAR, ProxyChannel
from certbound_wsgi.cli import main as cli_main
from certbound_wsgi.dev.pki import DevCA, Issued
from certbound_wsgi.errors import InvalidToken
from certbound_wsgi.proxies import TrustedProxies
from tests.conftest import MakeClient, bearer, independent_thumbprint

HEADER_VAR = "HTTP_X_SSL_CLIENT_CERT"
VERIFY_VAR = "HTTP_X_SSL_CLIENT_VERIFY"
MALFORMED = "the client certificate could not be parsed"
SECRET = "certificates-test-secret-0123456789abcdef"
#: What nginx adds for uWSGI (uwsgi_param CERTBOUND_PROXY_SECRET), and for gunicorn (the header).
UWSGI = {UWSGI_SECRET_VAR: SECRET}
NGINX = {"HTTP_X_CERTBOUND_PROXY_SECRET": SECRET, "REMOTE_ADDR": "127.0.0.1"}


def reader(*, secret: str = SECRET, trusted_proxies: tuple[str, ...] = (),
           client_cert_header: str = "X-SSL-Client-Cert", client_cert_verify_header: str = "") -> CertificateReader:
    """A reader whose channel is the proxy secret unless told otherwise."""
    return CertificateReader(client_cert_header=client_cert_header, client_cert_verify_header=client_cert_verify_header,
                             channel=ProxyChannel(secret=secret, trusted_proxies=trusted_proxies), cache_size=64)


def test_thumbprint_matches_an_independent_computation(alice: Issued, mallory: Issued, alice_x5t: str) -> None:
    assert thumbprint_from_pem(alice.cert_pem) == alice_x5t == independent_thumbprint(alice.cert_pem)
    assert thumbprint_from_pem(mallory.cert_pem) != alice_x5t
    assert len(alice_x5t) == 43 and "=" not in alice_x5t  # base64url of 32 bytes, unpadded


def test_thumbprint_of_der() -> None:
    # RFC 8705 is SHA-256 over the DER: check against a known digest of the empty string.
    assert thumbprint_from_der(b"") == "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"


def _tabbed(pem: str) -> str:
    """nginx's deprecated ``$ssl_client_cert``: every line but the first starts with a tab."""
    return pem.rstrip("\n").replace("\n", "\n\t") + "\n"


ALICE_FORMS: list[Any] = [
    pytest.param(lambda a, ca: a, id="plain-pem"),
    pytest.param(lambda a, ca: quote(a, safe=""), id="url-escaped-nginx"),
    pytest.param(lambda a, ca: quote(a), id="url-escaped-slash-kept"),
    pytest.param(lambda a, ca: re.sub("%[0-9A-F]{2}", lambda m: m[0].lower(), quote(a, safe="")),
                 id="url-escaped-lowercase-hex"),
    pytest.param(lambda a, ca: _tabbed(a), id="tab-separated"),
    pytest.param(lambda a, ca: a.replace("\n", "\r\n"), id="crlf"),
    pytest.param(lambda a, ca: a.replace("\n", " "), id="space-separated"),
    pytest.param(lambda a, ca: "\n\n  " + a + "\n\n", id="surrounding-whitespace"),
    pytest.param(lambda a, ca: a + ca, id="chain-leaf-first"),
    pytest.param(lambda a, ca: quote(a + ca, safe=""), id="escaped-chain"),
]


@pytest.fixture(scope="module")
def ca_pem(pki: DevCA) -> str:
    return pki.cert_path.read_text()


@pytest.mark.parametrize("form", ALICE_FORMS)
@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda v: {**UWSGI, "SSL_CLIENT_CERT": v}, id="uwsgi-var"),
        pytest.param(lambda v: {**NGINX, HEADER_VAR: v}, id="trusted-header"),
    ],
)
def test_certificate_forms(
    form: Callable[[str, str], str],
    where: Callable[[str], dict[str, str]],
    alice: Issued,
    ca_pem: str,
    alice_x5t: str,
) -> None:
    assert reader().thumbprint(where(form(alice.cert_pem, ca_pem))) == alice_x5t


def test_chain_counts_the_leaf(alice: Issued, mallory: Issued, mallory_x5t: str, ca_pem: str) -> None:
    assert reader().thumbprint({**UWSGI, "SSL_CLIENT_CERT": mallory.cert_pem + ca_pem}) == mallory_x5t


def test_a_forged_leaf_ahead_of_another_certificate_is_not_a_chain(alice: Issued, mallory: Issued) -> None:
    """Issue 16: the parsers check that each later certificate signed the one before; two unrelated
    certificates are refused instead of reading the first (mallory's key did not sign alice's)."""
    with pytest.raises(InvalidToken, match="could not be parsed"):
        reader().thumbprint({**UWSGI, "SSL_CLIENT_CERT": mallory.cert_pem + alice.cert_pem})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({**UWSGI, "SSL_CLIENT_CERT": "", HEADER_VAR: "ALICE", "REMOTE_ADDR": "127.0.0.1"}, None,
                     id="empty-uwsgi-var-is-authoritative"),
        pytest.param({**UWSGI, "SSL_CLIENT_CERT": "MALLORY", HEADER_VAR: "ALICE", "REMOTE_ADDR": "127.0.0.1"},
                     "MALLORY", id="uwsgi-var-wins-over-header"),
        # Under uWSGI REMOTE_ADDR is the client's (nginx's $remote_addr), and proves nothing: the secret does.
        pytest.param({**UWSGI, "SSL_CLIENT_CERT": "ALICE", "REMOTE_ADDR": "203.0.113.9"}, "ALICE",
                     id="uwsgi-var-with-the-secret-from-any-peer"),
        # Issue 11 item 1: a uwsgi packet from anyone who reaches the socket, with alice's public PEM.
        pytest.param({"SSL_CLIENT_CERT": "ALICE", "REMOTE_ADDR": "127.0.0.1"}, None, id="uwsgi-var-without-the-secret"),
        pytest.param({UWSGI_SECRET_VAR: SECRET[:-1] + "x", "SSL_CLIENT_CERT": "ALICE"}, None,
                     id="uwsgi-var-with-a-wrong-secret"),
        # Issue 11 item 2: the header from a local process, without the secret.
        pytest.param({HEADER_VAR: "ALICE", "REMOTE_ADDR": "127.0.0.1"}, None, id="header-without-the-secret"),
        pytest.param({**NGINX, HEADER_VAR: ""}, None, id="empty-header"),
        pytest.param({"REMOTE_ADDR": "127.0.0.1"}, None, id="nothing"),
    ],
)
def test_sources(
    environ: dict[str, str], expected: str | None, alice: Issued, mallory: Issued, alice_x5t: str, mallory_x5t: str
) -> None:
    pems = {"ALICE": alice.cert_pem, "MALLORY": mallory.cert_pem}
    thumbs = {"ALICE": alice_x5t, "MALLORY": mallory_x5t}
    environ = {key: pems.get(value, value) for key, value in environ.items()}
    assert reader().thumbprint(environ) == (thumbs[expected] if expected else None)


@pytest.mark.parametrize(
    ("trusted_proxies", "remote_addr", "believed"),
    [
        pytest.param(None, "127.0.0.1", True, id="ipv4-loopback"),
        pytest.param(None, "::1", True, id="ipv6-loopback"),
        pytest.param(None, "::ffff:127.0.0.1", True, id="ipv4-mapped-loopback"),
        pytest.param(None, "127.0.0.2", False, id="other-loopback-not-in-default-32"),
        pytest.param(None, "10.0.0.1", False, id="private-untrusted"),
        pytest.param(None, "203.0.113.9", False, id="public-untrusted"),
        pytest.param(None, "::ffff:10.0.0.1", False, id="ipv4-mapped-untrusted"),
        pytest.param(None, "garbage", False, id="garbage-remote-addr"),
        pytest.param(None, "127.0.0.1 ", False, id="remote-addr-trailing-space"),
        pytest.param(None, "127.0.0.1:443", False, id="remote-addr-with-port"),
        pytest.param(None, "", False, id="empty-remote-addr"),
        pytest.param(None, None, False, id="no-remote-addr"),
        pytest.param(("10.0.0.0/8",), "10.1.2.3", True, id="custom-network"),
        pytest.param(("10.0.0.0/8",), "::ffff:10.1.2.3", True, id="custom-network-mapped"),
        pytest.param(("10.0.0.0/8",), "127.0.0.1", False, id="custom-network-excludes-loopback"),
        pytest.param(("fd00::/8",), "fd00::5", True, id="ipv6-network"),
        pytest.param((), "127.0.0.1", False, id="no-trusted-proxy"),
        # gunicorn gives a Unix-socket peer an empty REMOTE_ADDR; no TCP peer can produce it.
        pytest.param(("unix",), "", True, id="unix-keyword-trusts-the-socket-peer"),
        pytest.param(("unix",), "127.0.0.1", False, id="unix-keyword-does-not-trust-loopback"),
        pytest.param(("unix",), None, False, id="unix-keyword-needs-remote-addr-present"),
        pytest.param(("unix", "10.0.0.0/8"), "10.1.2.3", True, id="unix-and-network"),
    ],
)
def test_header_is_believed_only_from_trusted_proxies(
    trusted_proxies: tuple[str, ...] | None, remote_addr: str | None, believed: bool, alice: Issued, alice_x5t: str
) -> None:
    # None: the loopback networks that were the default before issue 11, now stated. No secret: address-only trust.
    networks = ("127.0.0.1/32", "::1/128") if trusted_proxies is None else trusted_proxies
    environ = {HEADER_VAR: alice.cert_pem}
    if remote_addr is not None:
        environ["REMOTE_ADDR"] = remote_addr
    assert reader(secret="", trusted_proxies=networks).thumbprint(environ) == (alice_x5t if believed else None)


def test_a_shared_trusted_proxies_is_used_as_given(alice: Issued, alice_x5t: str) -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    shared = CertificateReader(client_cert_header="X-SSL-Client-Cert", client_cert_verify_header="",
                               channel=ProxyChannel(secret="", trusted_proxies=proxies), cache_size=4)
    assert shared.channel.trusted_proxies is proxies
    assert shared.thumbprint({HEADER_VAR: alice.cert_pem, "REMOTE_ADDR": "10.9.9.9"}) == alice_x5t
    assert shared.thumbprint({HEADER_VAR: alice.cert_pem, "REMOTE_ADDR": "127.0.0.1"}) is None


def test_a_trusted_proxy_that_is_not_a_network_is_refused() -> None:
    with pytest.raises(ValueError, match="'nginx' is not an IP network"):
        ProxyChannel(secret="", trusted_proxies=["127.0.0.1/32", "nginx"])


def test_custom_header_name(alice: Issued, alice_x5t: str) -> None:
    custom = reader(client_cert_header="X-Client-Cert")
    assert custom.thumbprint({**NGINX, "HTTP_X_CLIENT_CERT": alice.cert_pem}) == alice_x5t
    assert custom.thumbprint({**NGINX, HEADER_VAR: alice.cert_pem}) is None


@pytest.mark.parametrize(
    ("verify_header", "environ", "counts"),
    [
        pytest.param("X-SSL-Client-Verify", {VERIFY_VAR: "SUCCESS"}, True, id="header-success"),
        pytest.param("X-SSL-Client-Verify", {VERIFY_VAR: "FAILED:certificate has expired"}, False,
                     id="header-failed"),
        pytest.param("X-SSL-Client-Verify", {VERIFY_VAR: "NONE"}, False, id="header-none"),
        pytest.param("X-SSL-Client-Verify", {VERIFY_VAR: "success"}, False, id="header-lowercase"),
        pytest.param("X-SSL-Client-Verify", {VERIFY_VAR: "SUCCESS "}, False, id="header-trailing-space"),
        pytest.param("X-SSL-Client-Verify", {}, False, id="header-missing"),
        pytest.param("X-SSL-Client-Verify", {"SSL_CLIENT_VERIFY": "SUCCESS"}, False,
                     id="header-cert-not-vouched-by-uwsgi-var"),
        pytest.param("", {VERIFY_VAR: "FAILED:x"}, True, id="off-ignores-failed"),
        pytest.param("", {}, True, id="off"),
    ],
)
def test_verify_header_via_proxy_header(
    verify_header: str, environ: dict[str, str], counts: bool, alice: Issued, alice_x5t: str
) -> None:
    environ = {**NGINX, HEADER_VAR: alice.cert_pem, "REMOTE_ADDR": "127.0.0.1", **environ}
    result = reader(client_cert_verify_header=verify_header).thumbprint(environ)
    assert result == (alice_x5t if counts else None)


@pytest.mark.parametrize(
    ("environ", "counts"),
    [
        pytest.param({"SSL_CLIENT_VERIFY": "SUCCESS"}, True, id="uwsgi-success"),
        pytest.param({"SSL_CLIENT_VERIFY": "FAILED:unable to get issuer certificate"}, False, id="uwsgi-failed"),
        pytest.param({"SSL_CLIENT_VERIFY": "NONE"}, False, id="uwsgi-none"),
        pytest.param({}, False, id="uwsgi-missing"),
        pytest.param({VERIFY_VAR: "SUCCESS", "REMOTE_ADDR": "203.0.113.9"}, False,
                     id="client-header-cannot-vouch-for-uwsgi-var"),
    ],
)
def test_verify_with_uwsgi_var(environ: dict[str, str], counts: bool, alice: Issued, alice_x5t: str) -> None:
    environ = {**UWSGI, "SSL_CLIENT_CERT": alice.cert_pem, **environ}
    assert reader(client_cert_verify_header="X-SSL-Client-Verify").thumbprint(environ) == (
        alice_x5t if counts else None
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _pem(body: str) -> str:
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"


MALFORMED_VALUES: list[Any] = [
    pytest.param(lambda pem: "garbage", id="garbage"),
    pytest.param(lambda pem: "-", id="dash"),
    pytest.param(lambda pem: _pem("not base64!!"), id="bad-base64"),
    pytest.param(lambda pem: _pem(_b64(b"\x30\x03\x02\x01\x01")), id="base64-not-a-certificate"),
    pytest.param(lambda pem: _pem(""), id="empty-body"),
    pytest.param(lambda pem: pem.split("-----END")[0], id="no-end-marker"),
    pytest.param(lambda pem: pem[:200] + "\n-----END CERTIFICATE-----\n", id="truncated-body"),
    pytest.param(lambda pem: pem.replace("CERTIFICATE", "PRIVATE KEY"), id="other-pem-type"),
    pytest.param(lambda pem: "%ZZ%2D%2D", id="escapes-without-pem"),
    pytest.param(lambda pem: quote(pem, safe="").replace("%0A", "%0", 1), id="broken-escape"),
    pytest.param(lambda pem: quote(pem, safe="") + "%FF%FE", id="non-utf8-escape"),
    pytest.param(lambda pem: pem.replace("A", "\u00c4", 1), id="non-ascii-in-body"),
    pytest.param(lambda pem: pem.replace("A", "\ud800", 1), id="lone-surrogate"),
    pytest.param(lambda pem: pem.replace("\n", "\x00"), id="nul-separators"),
]


@pytest.mark.parametrize("mutate", MALFORMED_VALUES)
@pytest.mark.parametrize("where", [pytest.param(False, id="uwsgi-var"), pytest.param(True, id="trusted-header")])
def test_malformed_values_raise_invalid_token(mutate: Callable[[str], str], where: bool, alice: Issued) -> None:
    value = mutate(alice.cert_pem)
    environ = {**NGINX, HEADER_VAR: value} if where else {**UWSGI, "SSL_CLIENT_CERT": value}
    with pytest.raises(InvalidToken) as info:
        reader().thumbprint(environ)
    assert info.value.description == MALFORMED
    with pytest.raises(ValueError):
        thumbprint_from_pem(value)


@pytest.mark.parametrize(
    ("padding", "accepted"),
    [
        pytest.param(0, True, id="at-limit-accepted"),
        pytest.param(1, False, id="one-over-limit"),
        pytest.param(MAX_CERT_VALUE, False, id="double"),
    ],
)
def test_oversize_value(padding: int, accepted: bool, alice: Issued, alice_x5t: str) -> None:
    value = alice.cert_pem + " " * (MAX_CERT_VALUE - len(alice.cert_pem) + padding)
    if accepted:
        assert reader().thumbprint({**UWSGI, "SSL_CLIENT_CERT": value}) == alice_x5t
    else:
        with pytest.raises(InvalidToken):
            reader().thumbprint({**UWSGI, "SSL_CLIENT_CERT": value})


def test_malformed_certificate_through_the_middleware(make_client: MakeClient, alice_token: str) -> None:
    response = make_client().get("/", headers=bearer(alice_token), environ_overrides={"SSL_CLIENT_CERT": "junk"})
    assert response.status_code == 401
    assert response.json == {"error": "invalid_token", "error_description": MALFORMED}


# -- the thumbprint command -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "status", "stdout", "stderr"),
    [
        pytest.param("ALICE", 0, "ALICE_X5T\n", "", id="pem"),
        pytest.param("ESCAPED", 0, "ALICE_X5T\n", "", id="url-escaped"),
        pytest.param("garbage\n", 1, "", "neither a PEM nor a DER certificate", id="garbage"),
        pytest.param(b"\xff\xfe\x00binary", 1, "", "neither a PEM nor a DER certificate", id="not-utf8"),
        pytest.param(None, 1, "", "No such file", id="missing-file"),
    ],
)
def test_thumbprint_command(
    content: str | bytes | None,
    status: int,
    stdout: str,
    stderr: str,
    tmp_path: Path,
    alice: Issued,
    alice_x5t: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "cert.pem"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text({"ALICE": alice.cert_pem, "ESCAPED": quote(alice.cert_pem, safe="")}.get(content, content))
    assert cli_main(["thumbprint", str(path)]) == status
    out, err = capsys.readouterr()
    assert out == stdout.replace("ALICE_X5T", alice_x5t)
    assert stderr in err
    assert "Traceback" not in err
    if status:
        assert str(path) in err


def test_thumbprint_command_reads_stdin(
    monkeypatch: pytest.MonkeyPatch, alice: Issued, alice_x5t: str, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(alice.cert_pem))
    assert cli_main(["thumbprint", "-"]) == 0
    assert capsys.readouterr().out == alice_x5t + "\n"


# -- hostile values -----------------------------------------------------------------------------------------------

_PEM_ISH = st.builds(
    lambda head, body, tail: head + "-----BEGIN CERTIFICATE-----" + body + "-----END CERTIFICATE-----" + tail,
    st.text(max_size=5),
    st.one_of(st.text(), st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n\t ")),
    st.text(max_size=5),
)
HOSTILE = st.one_of(
    st.text(),
    st.binary().map(lambda b: b.decode("latin-1")),
    _PEM_ISH,
    _PEM_ISH.map(lambda v: quote(v, safe="")),
    st.text(alphabet="%0123456789abcdefABCDEFXZ-\n"),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=HOSTILE, via_header=st.booleans())
def test_hostile_values_only_raise_invalid_token(value: str, via_header: bool) -> None:
    environ = {**NGINX, HEADER_VAR: value} if via_header else {**UWSGI, "SSL_CLIENT_CERT": value}
    try:
        result = _HOSTILE_READER.thumbprint(environ)
    except InvalidToken as exc:
        assert exc.description == MALFORMED
    else:
        assert result is None
        assert value == ""


_HOSTILE_READER = reader()


def _mutations(pem: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(0, len(pem)).map(lambda i: pem[:i]),
        st.tuples(st.integers(0, len(pem) - 1), st.characters()).map(lambda t: pem[: t[0]] + t[1] + pem[t[0] + 1:]),
        st.tuples(st.integers(0, len(pem)), st.text(max_size=4)).map(lambda t: pem[: t[0]] + t[1] + pem[t[0]:]),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_certificates_only_raise_invalid_token(data: st.DataObject, alice: Issued) -> None:
    value = data.draw(_mutations(alice.cert_pem))
    try:
        result = _HOSTILE_READER.thumbprint({**UWSGI, "SSL_CLIENT_CERT": value})
    except InvalidToken:
        return
    # Still a DER certificate (a flipped serial number, extra whitespace): a thumbprint, or None when empty.
    assert (result is None and value == "") or (result is not None and len(result) == 43)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.one_of(st.text(), st.binary().map(lambda b: b.decode("latin-1")), _PEM_ISH), via_header=st.booleans())
def test_hostile_values_through_the_middleware_never_500_nor_200(
    value: str, via_header: bool, make_client: MakeClient, alice_token: str
) -> None:
    client = make_client()  # ViaProxy adds the proxy secret
    environ = {HEADER_VAR: value, "REMOTE_ADDR": "127.0.0.1"} if via_header else {"SSL_CLIENT_CERT": value}
    response = client.get("/", headers=bearer(alice_token), environ_overrides=environ)
    assert response.status_code == 401, response.get_data(as_text=True)
    assert response.json is not None
    assert response.json["error"] == "invalid_token"

