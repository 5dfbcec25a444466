"""Issue 11, end to end: the channel from nginx to the worker, attacked as someone on the same host would.

Real nginx (rendered by ``nginx-config``), gunicorn and uWSGI, tokens from the
real oidc-provider. The attacker holds alice's stolen token and her *public*
certificate and connects to the worker directly from another loopback address
(127.0.0.2): over HTTP to gunicorn, and to uWSGI with a uwsgi packet of his own
making, in which he writes every variable (``SSL_CLIENT_CERT``, ``REMOTE_ADDR``).
Each attack has a control that differs only in what the attacker cannot have
(the proxy secret), so that a refusal is the channel's doing.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certbound_wsgi.binding import CERT_MISSING, THUMBPRINT_MISMATCH
from certbound_wsgi.dev.pki import Issued
from tests.support import idp_fixtures
from tests.support.idp import OidcProvider, x5t_s256
from tests.support.procs import require_binary
from tests.support.servers import (
    PROXY_SECRET,
    SERVER_NAME,
    UWSGI,
    Gunicorn,
    Nginx,
    start_gunicorn,
    start_nginx,
    start_uwsgi,
)

from .conftest import StackFactory, app_env

ATTACKER = "127.0.0.2"
UPSTREAMS = [pytest.param("gunicorn", id="gunicorn"), pytest.param("uwsgi", id="uwsgi")]


@pytest.fixture(scope="module")
def alice_token(idp: OidcProvider) -> str:
    return idp.token("bound")


# -- the attacker's tools ---------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _answer(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1."), raw[:200]
    return Answer(int(status_line.split()[1]), body)


def uwsgi_packet(variables: dict[str, str]) -> bytes:
    """The uwsgi protocol (modifier1 0, WSGI): a 4-byte header, then each variable as
    little-endian 16-bit lengths and bytes (https://uwsgi-docs.readthedocs.io/en/latest/Protocol.html)."""
    body = b""
    for key, value in variables.items():
        k, v = key.encode("latin-1"), value.encode("latin-1")
        body += struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v
    return struct.pack("<BHB", 0, len(body), 0) + body


def send_uwsgi(target: tuple[str, int] | str, token: str, cert_pem: str, **extra: str) -> Answer:
    """A request to uWSGI made by hand, as nginx would make it, with alice's certificate and token."""
    variables = {
        "REQUEST_METHOD": "GET", "REQUEST_URI": "/anything", "PATH_INFO": "/anything", "QUERY_STRING": "",
        "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": SERVER_NAME, "SERVER_PORT": "443", "HTTPS": "on",
        "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": SERVER_NAME, "HTTP_AUTHORIZATION": f"Bearer {token}",
        "SSL_CLIENT_CERT": quote(cert_pem, safe=""), "SSL_CLIENT_VERIFY": "SUCCESS", **extra,
    }
    if isinstance(target, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(target)
    else:
        sock = socket.create_connection(target, timeout=10, source_address=(ATTACKER, 0))
    with sock:
        sock.sendall(uwsgi_packet(variables))
        return _answer(_read_all(sock))


def send_http(port: int, token: str, cert_pem: str, *, source: str = ATTACKER, **headers: str) -> Answer:
    """Straight to gunicorn over HTTP from ``source``, alice's certificate in nginx's header."""
    lines = ["GET /anything HTTP/1.1", f"Host: {SERVER_NAME}", "Connection: close", f"Authorization: Bearer {token}",
             f"X-SSL-Client-Cert: {quote(cert_pem, safe='')}", "X-SSL-Client-Verify: SUCCESS"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return _answer(_read_all(sock))


def _refused(answer: Answer | requests.Response, description: str = CERT_MISSING) -> None:
    status = answer.status if isinstance(answer, Answer) else answer.status_code
    body = answer.body if isinstance(answer, Answer) else answer.content
    assert status == 401, (status, body[:300])
    assert description.encode() in body, body[:300]


def _owner_ok(stack_url: str, ca_file: str, token: str, cert: Issued | None) -> requests.Response:
    with requests.Session() as session:
        session.trust_env = False
        return session.get(stack_url + "/anything", headers={"Authorization": f"Bearer {token}"},
                           cert=cert.pair if cert else None, verify=ca_file, timeout=15)


# -- gunicorn over TCP ------------------------------------------------------------------------------------------


def test_gunicorn_with_the_secret(stacks: StackFactory, idp: OidcProvider, pki: idp_fixtures.Pki,
                                  alice_token: str) -> None:
    stack = stacks(idp, "gunicorn")
    assert stack.call(alice_token, pki.alice).status_code == 200
    port = stack.app_server.port
    # Issue 11 item 2 (no secret), from another loopback address and from nginx's own.
    _refused(send_http(port, alice_token, pki.alice.cert_pem))
    _refused(send_http(port, alice_token, pki.alice.cert_pem, source="127.0.0.1"))
    _refused(send_http(port, alice_token, pki.alice.cert_pem, X_Certbound_Proxy_Secret=PROXY_SECRET[:-1] + "!"))
    _refused(send_http(port, alice_token, pki.alice.cert_pem, X_Certbound_Proxy_Secret=""))
    # The control: the same request with the secret, which only nginx has, is believed.
    assert send_http(port, alice_token, pki.alice.cert_pem, X_Certbound_Proxy_Secret=PROXY_SECRET).status == 200


def test_gunicorn_with_address_only_trust(stacks: StackFactory, idp: OidcProvider, pki: idp_fixtures.Pki,
                                          alice_token: str) -> None:
    stack = stacks(idp, "gunicorn", proxy_secret="", trusted_proxies="127.0.0.1/32")
    assert stack.call(alice_token, pki.alice).status_code == 200
    for _ in range(3):
        _refused(send_http(stack.app_server.port, alice_token, pki.alice.cert_pem))
    log = stack.app_server.output()
    assert "trusts by address only" in log, "the opt-in is warned about at start-up"
    # One line per worker at most, however many attempts (2 workers; rate-limited per reason).
    assert 1 <= log.count("forwarded by an untrusted channel") <= 2, log
    # The control: from the trusted address itself, the header is believed (that is what address-only means).
    assert send_http(stack.app_server.port, alice_token, pki.alice.cert_pem, source="127.0.0.1").status == 200


# -- uWSGI over TCP ---------------------------------------------------------------------------------------------


def test_uwsgi_with_the_secret(stacks: StackFactory, idp: OidcProvider, pki: idp_fixtures.Pki,
                               alice_token: str) -> None:
    stack = stacks(idp, "uwsgi")
    assert stack.call(alice_token, pki.alice).status_code == 200
    target = ("127.0.0.1", stack.app_server.port)
    # Issue 11 item 1: the packet names SSL_CLIENT_CERT and REMOTE_ADDR itself.
    _refused(send_uwsgi(target, alice_token, pki.alice.cert_pem))
    _refused(send_uwsgi(target, alice_token, pki.alice.cert_pem, REMOTE_ADDR="", CERTBOUND_PROXY_SECRET="guess"))
    _refused(send_uwsgi(target, alice_token, pki.alice.cert_pem, HTTP_X_CERTBOUND_PROXY_SECRET="guess"))
    _refused(send_uwsgi(target, alice_token, pki.alice.cert_pem, **{"certbound.proxy": "trusted"}))
    # The control: the same packet with the secret is believed, so the packets above were well formed.
    answer = send_uwsgi(target, alice_token, pki.alice.cert_pem, CERTBOUND_PROXY_SECRET=PROXY_SECRET)
    assert answer.status == 200, answer.body[:300]


def test_uwsgi_on_tcp_without_the_secret_does_not_start(idp: OidcProvider, tmp_path: Path) -> None:
    """Strict mode with only an address (or the unix keyword) while uWSGI listens on TCP: no
    certificate could ever be believed, so the app refuses to load, naming the fix."""
    for trusted in ("127.0.0.1/32", "unix"):
        with pytest.raises(RuntimeError) as raised:
            start_uwsgi(app_env(idp, proxy_secret="", trusted_proxies=trusted), processes=1,
                        log_dir=tmp_path / trusted.replace("/", "_"))
        assert "no client certificate will be believed" in str(raised.value)
        assert "set proxy_secret" in str(raised.value)


def test_uwsgi_on_tcp_without_the_secret_in_optional_mode(idp: OidcProvider, pki: idp_fixtures.Pki,
                                                          tmp_path: Path, alice_token: str) -> None:
    """Optional mode starts (unbound tokens work) with a warning, and believes no certificate."""
    env = app_env(idp, proxy_secret="", proof_of_possession_mtls="optional", trusted_proxies="127.0.0.1/32")
    server = start_uwsgi(env, processes=1, log_dir=tmp_path)
    try:
        assert "CIDRs are ignored under uWSGI" in server.output()
        assert "no client certificate will be believed" in server.output()
        _refused(send_uwsgi(("127.0.0.1", server.port), alice_token, pki.alice.cert_pem, REMOTE_ADDR="127.0.0.1"))
        answer = send_uwsgi(("127.0.0.1", server.port), idp.token("unbound"), pki.alice.cert_pem)
        assert answer.status == 200, answer.body[:300]
    finally:
        server.stop()


# -- Unix sockets, the documented default ---------------------------------------------------------------------


@dataclass
class UnixStack:
    nginx: Nginx
    server: Gunicorn | UWSGI
    socket: Path


@pytest.fixture(scope="module", params=UPSTREAMS)
def unix_stack(request: pytest.FixtureRequest, idp: OidcProvider, pki: idp_fixtures.Pki,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[UnixStack]:
    """As docs/deploying.md deploys it: a Unix socket of mode 0660, trusted_proxies=unix, no secret."""
    upstream = request.param
    require_binary("nginx", "/usr/sbin/nginx")
    directory = tmp_path_factory.mktemp(f"unix-{upstream}")
    path = directory / "app.sock"
    env = app_env(idp, proxy_secret="", trusted_proxies="unix")
    server: Gunicorn | UWSGI
    if upstream == "gunicorn":
        server = start_gunicorn(env, workers=2, log_dir=directory, unix_socket=path)
    else:
        server = start_uwsgi(env, processes=2, log_dir=directory, unix_socket=path)
    try:
        nginx = start_nginx(directory / "nginx", upstream, server.backend, pki.server)
        try:
            yield UnixStack(nginx, server, path)
        finally:
            nginx.stop()
    finally:
        server.stop()


def test_unix_socket_deployment(unix_stack: UnixStack, pki: idp_fixtures.Pki, alice_token: str) -> None:
    url, ca = unix_stack.nginx.url, pki.ca_file
    response = _owner_ok(url, ca, alice_token, pki.alice)
    assert response.status_code == 200, response.text
    assert response.json()["thumbprint"] == x5t_s256(pki.alice)
    _refused(_owner_ok(url, ca, alice_token, pki.mallory), THUMBPRINT_MISMATCH)
    _refused(_owner_ok(url, ca, alice_token, None))
    # The socket only nginx's group may open: rw for owner and group, nothing for others.
    assert stat.S_IMODE(unix_stack.socket.stat().st_mode) & 0o777 in (0o660, 0o770)
    assert "no client certificate will be believed" not in unix_stack.server.output()


# -- nothing the worker sees reveals the secret ----------------------------------------------------------------


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_the_secret_never_reaches_the_app_nor_the_client(stacks: StackFactory, idp: OidcProvider,
                                                          pki: idp_fixtures.Pki, alice_token: str,
                                                          upstream: str) -> None:
    stack = stacks(idp, upstream)
    response = stack.call(alice_token, pki.alice, headers={"X-Certbound-Proxy-Secret": "client-copy"})
    assert response.status_code == 200
    assert PROXY_SECRET not in response.text
    headers = response.json()["headers"]
    assert not [name for name in headers if "Secret" in name], headers
    assert PROXY_SECRET not in stack.app_server.output()
    assert PROXY_SECRET not in stack.nginx.output()


# -- sizes (issue 11 item 7) ------------------------------------------------------------------------------------


def _huge_certificate(directory: Path) -> Issued:
    """A self-signed client certificate of about 7 KB DER (an unrecognised extension of padding):
    optional_no_ca lets a client present it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "huge")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x04" * 7000),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "huge.pem", directory / "huge.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Issued(cert_path, key_path, cert_path.read_text())


SIZES = [
    # (id, headers, expected by upstream): what nginx accepts must fit the worker; what it cannot, nginx refuses.
    pytest.param({"X-Big": "a" * 8000}, {"gunicorn": 200, "uwsgi": 200}, id="1x8000-bytes"),
    pytest.param({f"X-Big-{i}": "a" * 8000 for i in range(2)}, {"gunicorn": 200, "uwsgi": 400}, id="2x8000-bytes"),
    pytest.param({f"X-Big-{i}": "a" * 8000 for i in range(4)}, {"gunicorn": 400, "uwsgi": 400}, id="4x8000-bytes"),
    # gunicorn's own limit_request_fields (100) answers 431 past nginx.
    pytest.param({f"X-H{i}": "v" for i in range(120)}, {"gunicorn": 431, "uwsgi": 200}, id="120-headers"),
    pytest.param({f"X-H{i}": "v" for i in range(990)}, {"gunicorn": 431, "uwsgi": 200}, id="990-headers"),
    pytest.param({f"X-H{i}": "v" for i in range(1200)}, {"gunicorn": 400, "uwsgi": 400}, id="1200-headers"),
    pytest.param({"X-Big": "a" * 9000}, {"gunicorn": 400, "uwsgi": 400}, id="one-9000-byte-header"),
]


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize(("headers", "expected"), SIZES)
def test_oversized_requests_are_4xx_never_502(stacks: StackFactory, idp: OidcProvider, pki: idp_fixtures.Pki,
                                              alice_token: str, upstream: str, headers: dict[str, str],
                                              expected: dict[str, int]) -> None:
    stack = stacks(idp, upstream)
    response = stack.call(alice_token, pki.alice, headers=headers)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    assert response.status_code == expected[upstream], (response.status_code, response.text[:300])
    if response.status_code == 200:
        assert response.json()["thumbprint"] == x5t_s256(pki.alice)


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("headers", [pytest.param(990, id="990-tiny-headers"), pytest.param(0, id="no-headers")])
def test_the_largest_uwsgi_packet_nginx_can_build_fits(stacks: StackFactory, idp: OidcProvider,
                                                       pki: idp_fixtures.Pki, alice_token: str, upstream: str,
                                                       headers: int) -> None:
    """A long URI (it travels three times: REQUEST_URI, PATH_INFO, QUERY_STRING) beside the most header
    lines nginx accepts: what nginx forwards must fit the worker, else 4xx from nginx, never 5xx."""
    stack = stacks(idp, upstream)
    path = "/anything/" + "p" * 3000 + "?" + "q=" + "v" * 3000
    response = stack.call(alice_token, pki.alice, path=path, headers={f"a{i}": "" for i in range(headers)})
    assert response.status_code in (200, 400, 414, 431), (response.status_code, response.text[:300])
    if not headers:
        # uWSGI takes it; gunicorn answers 414 itself to a request line over its limit_request_line (4094).
        assert response.status_code == {"uwsgi": 200, "gunicorn": 414}[upstream]


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_a_huge_client_certificate_is_refused_by_nginx(stacks: StackFactory, idp: OidcProvider, upstream: str,
                                                       alice_token: str, tmp_path: Path) -> None:
    stack = stacks(idp, upstream)
    response = stack.call(alice_token, _huge_certificate(tmp_path))
    assert response.status_code == 400, response.text[:300]


# -- the default server (item 4's nginx part) ------------------------------------------------------------------


def _handshake(port: int, ca_file: str, server_hostname: str | None) -> bytes:
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(f"GET /anything HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: close\r\n\r\n".encode())
            return _read_all(tls)


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_unknown_names_are_refused(stacks: StackFactory, idp: OidcProvider, pki: idp_fixtures.Pki,
                                   upstream: str, alice_token: str) -> None:
    stack = stacks(idp, upstream)
    port = stack.nginx.port
    # No SNI (an IP address) and a foreign SNI: the handshake itself is rejected.
    for name in ("127.0.0.1", "other-rs.example"):
        with pytest.raises(ssl.SSLError, match=r"UNRECOGNIZED_NAME|unrecognized name"):
            _handshake(port, pki.ca_file, name)
    # Our name in SNI, another in Host: 421 from nginx, never the app.
    response = stack.call(alice_token, pki.alice, headers={"Host": "other-rs.example"})
    assert response.status_code == 421
    assert _answer(_handshake(port, pki.ca_file, SERVER_NAME)).status == 401

