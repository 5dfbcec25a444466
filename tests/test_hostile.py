"""The issue's hostile requests, as one table, end to end through the real middleware.

Every row goes through :class:`werkzeug.test.Client` and :class:`CertBoundMiddleware` (keys from
:class:`StaticDiscovery`; introspection against a tiny local HTTP server, so that the real
:class:`IntrospectionClient` reads and parses the raw body). Values are put straight into the WSGI
environ as a server would (PEP 3333: latin-1-decoded bytes), so that nothing in the test client
cleans them first.

The invariant: 400, 401, 403 (or 503 when the issuer's answer is unusable) with a proper
``WWW-Authenticate`` challenge and a JSON body; never a 500, never a hang, never a call of the
wrapped app, never an outbound connection but to the configured introspection endpoint. The few
legitimate rows (a chain whose leaf is alice's, a mixed-case scheme, ...) answer 200 and call the
app once.
"""

from __future__ import annotations

import contextlib
import json
import socket
import string
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from joserfc.jwk import ECKey
from werkzeug.test import Client, TestResponse

from certbound_wsgi.dev.pki import DevCA, Issued
from certbound_wsgi.middleware import CertBoundMiddleware
from tests.conftest import CountingApp, ViaProxy, independent_thumbprint, make_settings
from tests.support.dpop import DPoPKey
from tests.support.raw_http import RawServer
from tests.support.refusals import ALGS, challenge, parse_challenges
from tests.support.tokens import AUDIENCE, ISSUER, StaticDiscovery, TestIssuer, sign_es256

MB = 1024 * 1024
HTU = "http://localhost/anything"
#: Seconds after which a request counts as hung.
HANG = 10.0
#: Placeholder for the tiny server's URL in a row's settings.
TINY = "http://127.0.0.1:1/introspect"
OPAQUE = "opaque-token-0123456789"

# -- settings of the rows -------------------------------------------------------------------------------------

MTLS: dict[str, Any] = {}  # bearer JWTs, header only, proof_of_possession_mtls strict: the defaults
DPOP: dict[str, Any] = {"proof_of_possession_dpop": "optional", "proof_of_possession_mtls": "optional",
                        "dpop_allowed_hosts": ("localhost",)}
PLACES: dict[str, Any] = {"bearer_token_param_type": ("header", "query", "body", "cookie"),
                          "bearer_token_cookie_name": "at"}
SESSION: dict[str, Any] = {"auth_methods": ("bearer", "session"), "session_secret": "s" * 40}
INTRO: dict[str, Any] = {"auth_methods": ("introspection",), "introspection_endpoint": TINY,
                         "client_id": "rs-client", "client_secret": "rs-secret-0123456789abcdef"}

# -- the descriptions the middleware answers with -------------------------------------------------------------

MISSING = "an access token is required"
AUTH_TOO_LONG = "the access token in the Authorization header is too long"
AUTH_MALFORMED = "the access token in the Authorization header is malformed"
COOKIE_TOO_LONG = "the access token in the cookie is too long"
COOKIE_UNPARSEABLE = "the Cookie header cannot be parsed"
QUERY_MALFORMED = "the access token in the query is malformed"
QUERY_UNPARSEABLE = "the query cannot be parsed"
CERT_UNPARSEABLE = "the client certificate could not be parsed"
TWO_PLACES = "more than one access token in the request (RFC 6750 section 2)"
TWO_PROOFS = "more than one DPoP header"
PROOF_NOT_JWT = "the DPoP proof is not a well-formed JWT"
HTU_MISMATCH = "the DPoP proof's htu does not match the request URI"
BAD_SIGNATURE = "the token's signature is invalid"
UNKNOWN_KEY = "the token is signed with an unknown key"
BAD_KID = "the token's kid is malformed"
CRIT = "the token has critical header parameters this server does not understand"
EXP_NOT_NUMBER = "the exp claim is not a number"
CLAIMS_NOT_JSON = "the token's claims are not JSON"
NOT_INTROSPECTABLE = "the token cannot be introspected now"
NOT_OUR_AUDIENCE = "the token is not meant for this audience"


# -- the world the rows are built from ------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class World:
    alice_pem: str
    mallory_pem: str
    ca_pem: str
    alice_x5t: str
    issuer: TestIssuer
    tiny: RawServer
    port: int
    dpop_key: DPoPKey = field(default_factory=DPoPKey)
    attacker: ECKey = field(default_factory=lambda: ECKey.generate_key("P-256", private=True))
    #: A valid token bound to alice's certificate; ``dpop_token``: bound to ``dpop_key`` (``cnf.jkt``) only.
    token: str = field(init=False)
    dpop_token: str = field(init=False)

    def __post_init__(self) -> None:
        self.token = self.issuer.token(cnf={"x5t#S256": self.alice_x5t})
        self.dpop_token = self.issuer.token(cnf={"jkt": self.dpop_key.jkt})

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Valid claims of a token bound to alice's certificate."""
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300,
                  "scope": "read", "cnf": {"x5t#S256": self.alice_x5t}}
        claims.update(overrides)
        return claims

    def signed(self, header: dict[str, Any] | None = None, payload: Any = None, *, key: ECKey | None = None) -> str:
        """A JWS signed by hand (the issuer's key unless ``key``), with the usual header plus ``header``."""
        hdr: dict[str, Any] = {"alg": "ES256", "typ": "at+jwt", "kid": self.issuer.kid}
        hdr.update(header or {})
        return sign_es256(key or self.issuer.key, hdr, self.claims() if payload is None else payload)

    def with_exp(self, literal: str) -> str:
        """Alice's bound claims, as JSON text whose ``exp`` is ``literal`` verbatim."""
        text = json.dumps(self.claims(exp="@EXP@"))
        return self.signed(payload=text.replace('"@EXP@"', literal))

    def attacker_token(self, name: str, kid: str | None = None) -> str:
        """Signed by the attacker, whose key the header points at (``jku``/``x5u``) or embeds (``jwk``)."""
        where: Any = (self.attacker.as_dict(private=False) if name == "jwk"
                      else f"https://127.0.0.1:{self.port}/attacker-keys")
        return self.signed({name: where, "kid": kid or self.issuer.kid}, key=self.attacker)

    def proof(self, htu: str = HTU, token: str | None = None) -> str:
        return self.dpop_key.proof("GET", htu, token or self.dpop_token)

    def escaped_with(self, junk: str) -> str:
        """Alice's certificate as nginx escapes it, with ``junk`` at the start of the base64 body."""
        escaped = quote(self.alice_pem, safe="")
        head = escaped.index("%0A") + 3
        return escaped[:head] + junk + escaped[head:]

    def introspect_answer(self, body: bytes) -> dict[str, Any]:
        self.tiny.body = body
        return {"HTTP_AUTHORIZATION": f"Bearer {OPAQUE}"}


@pytest.fixture(scope="module")
def world(pki: DevCA, alice: Issued, mallory: Issued) -> Iterator[World]:
    tiny = RawServer()
    try:
        yield World(alice.cert_pem, mallory.cert_pem, pki.cert_path.read_text(), independent_thumbprint(alice.cert_pem),
                    TestIssuer(), tiny, closed_port())
    finally:
        tiny.close()


def client_for(world: World, overrides: dict[str, Any], app: CountingApp) -> Client:
    overrides = dict(overrides)
    if overrides.get("introspection_endpoint") == TINY:
        overrides["introspection_endpoint"] = world.tiny.url
    settings_ = make_settings(**overrides)
    middleware = CertBoundMiddleware(app, settings_, discovery=StaticDiscovery(settings_, world.issuer))
    return Client(ViaProxy(middleware), use_cookies=False)  # type: ignore[arg-type]  # wsgiref vs werkzeug WSGI types


# -- running a request: bounded in time, with outbound connections recorded --------------------------------------


@contextlib.contextmanager
def outbound_connections() -> Iterator[list[Any]]:
    """Every address a socket connects to while the block runs."""
    seen: list[Any] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def connect(self: socket.socket, address: Any) -> None:
        seen.append(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        seen.append(address)
        return real_connect_ex(self, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket.socket, "connect_ex", connect_ex)
        yield seen


def run(client: Client, environ: dict[str, Any], *, method: str = "GET", data: str | None = None,
        content_type: str | None = None) -> tuple[TestResponse, list[Any], float]:
    """The response, the outbound connections made meanwhile, and the seconds it took; fails after HANG."""
    outcome: dict[str, Any] = {}

    def request() -> None:
        try:
            outcome["response"] = client.open("/anything", method=method, data=data, content_type=content_type,
                                              environ_overrides=environ)
        except BaseException as exc:  # re-raised below, in the test's thread
            outcome["error"] = exc

    with outbound_connections() as seen:
        start = time.monotonic()
        thread = threading.Thread(target=request, daemon=True)
        thread.start()
        thread.join(HANG)
        elapsed = time.monotonic() - start
    assert not thread.is_alive(), f"the request hung for more than {HANG} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["response"], seen, elapsed


@dataclass(frozen=True)
class Expect:
    status: int
    error: str | None = None  # None with a refusal: no credentials at all (RFC 6750 section 3.1)
    description: str | None = None  # None: any description
    scheme: str = "Bearer"  # the challenge that carries the error


OK = Expect(200)


def refused(status: int, error: str | None, description: str | None, scheme: str = "Bearer") -> Expect:
    return Expect(status, error, description, scheme)


def invalid_request(description: str, scheme: str = "Bearer") -> Expect:
    return refused(400, "invalid_request", description, scheme)


def invalid_token(description: str | None, scheme: str = "Bearer") -> Expect:
    return refused(401, "invalid_token", description, scheme)


def invalid_proof(description: str) -> Expect:
    return refused(401, "invalid_dpop_proof", description, "DPoP")


UNAVAILABLE = refused(503, "temporarily_unavailable", NOT_INTROSPECTABLE)
NO_TOKEN = refused(401, None, MISSING)


def assert_answer(response: TestResponse, app: CountingApp, expect: Expect, offered: list[str]) -> None:
    body_text = response.get_data(as_text=True)
    assert response.status_code == expect.status, body_text[:500]
    if expect.status == 200:
        assert len(app.calls) == 1
        assert response.json is not None and response.json["remote_user"] == "alice"
        return
    assert app.calls == [], "a refused request reached the app"
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json
    assert isinstance(body, dict)
    assert body["error"] == (expect.error or "unauthorized")
    if expect.description is not None:
        assert body == {"error": expect.error or "unauthorized", "error_description": expect.description}
    else:
        assert set(body) == {"error", "error_description"} and isinstance(body["error_description"], str)
    carried = expect.error if expect.status != 503 else None  # RFC 6750 has no code for 503: realm only
    wanted = [challenge(s, carried, expect.description) if s == expect.scheme else challenge(s) for s in offered]
    if expect.description is None:
        got = response.headers.getlist("WWW-Authenticate")
        assert [g.split(", error_description=")[0] for g in got] == wanted
    else:
        assert response.headers.getlist("WWW-Authenticate") == wanted
    if expect.status == 503:
        assert response.headers["Retry-After"] == "5"


# -- the table ---------------------------------------------------------------------------------------------------

Build = Callable[[World], dict[str, Any]]


def bearer(w: World, token: str | None = None, scheme: str = "Bearer") -> dict[str, Any]:
    return {"HTTP_AUTHORIZATION": f"{scheme} {token or w.token}"}


def dpop(w: World, proof: str, scheme: str = "DPoP") -> dict[str, Any]:
    return {"HTTP_AUTHORIZATION": f"{scheme} {w.dpop_token}", "HTTP_DPOP": proof, "SSL_CLIENT_CERT": None}


def cert_header(value: str) -> dict[str, Any]:
    """The certificate in the proxy's header (believed from 127.0.0.1), not the uWSGI variable."""
    return {"SSL_CLIENT_CERT": None, "HTTP_X_SSL_CLIENT_CERT": value}


#: Nested deep, but shallow enough for json.loads (which counts one level per frame).
PARSEABLE = 700


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


CASES: list[Any] = [
    # -- oversize headers (1 MB) --
    pytest.param(MTLS, lambda w: {"HTTP_AUTHORIZATION": "Bearer " + "A" * MB}, invalid_request(AUTH_TOO_LONG),
                 id="oversize-authorization"),
    pytest.param(MTLS, lambda w: {**bearer(w), "SSL_CLIENT_CERT": w.alice_pem + " " * MB},
                 invalid_token(CERT_UNPARSEABLE), id="oversize-cert-variable"),
    pytest.param(MTLS, lambda w: {**bearer(w), **cert_header(quote(w.alice_pem, safe="") + "%20" * (MB // 3))},
                 invalid_token(CERT_UNPARSEABLE), id="oversize-cert-header"),
    pytest.param(DPOP, lambda w: dpop(w, "A" * MB), invalid_proof(PROOF_NOT_JWT), id="oversize-dpop"),
    pytest.param(PLACES, lambda w: {"HTTP_COOKIE": "at=" + "A" * MB}, invalid_request(COOKIE_TOO_LONG),
                 id="oversize-cookie-token"),
    pytest.param(SESSION, lambda w: {"HTTP_COOKIE": "__Host-session=" + "A" * MB}, NO_TOKEN,
                 id="oversize-cookie-session"),
    # -- invalid percent-encoding --
    pytest.param(MTLS, lambda w: {**bearer(w), "SSL_CLIENT_CERT": w.escaped_with("%ZZ")},
                 invalid_token(CERT_UNPARSEABLE), id="percent-cert-ZZ"),
    pytest.param(MTLS, lambda w: {**bearer(w), "SSL_CLIENT_CERT": w.escaped_with("%")},
                 invalid_token(CERT_UNPARSEABLE), id="percent-cert-lone"),
    pytest.param(MTLS, lambda w: {**bearer(w), "SSL_CLIENT_CERT": w.escaped_with("%C3%28")},
                 invalid_token(CERT_UNPARSEABLE), id="percent-cert-not-utf8"),
    pytest.param(MTLS, lambda w: {**bearer(w), **cert_header(w.escaped_with("%C3%28"))},
                 invalid_token(CERT_UNPARSEABLE), id="percent-cert-header-not-utf8"),
    pytest.param(PLACES, lambda w: {"QUERY_STRING": "access_token=%ZZ"}, invalid_request(QUERY_MALFORMED),
                 id="percent-query-ZZ"),
    pytest.param(PLACES, lambda w: {"QUERY_STRING": "access_token=%"}, invalid_request(QUERY_MALFORMED),
                 id="percent-query-lone"),
    pytest.param(PLACES, lambda w: {"QUERY_STRING": "access_token=%C3%28"}, invalid_request(QUERY_UNPARSEABLE),
                 id="percent-query-not-utf8"),
    # -- PEM chains: the leaf counts --
    pytest.param(MTLS, lambda w: {**bearer(w), "SSL_CLIENT_CERT": w.alice_pem + w.ca_pem}, OK,
                 id="chain-alice-leaf-then-ca"),
    pytest.param(MTLS, lambda w: {**bearer(w), "SSL_CLIENT_CERT": quote(w.alice_pem + w.ca_pem, safe="")}, OK,
                 id="chain-escaped-alice-leaf-then-ca"),
    # Not a chain (alice's certificate is not mallory's issuer): refused as a whole (issue 16).
    pytest.param(MTLS, lambda w: {**bearer(w), "SSL_CLIENT_CERT": w.mallory_pem + w.alice_pem},
                 invalid_token(CERT_UNPARSEABLE), id="chain-mallory-leaf-then-alice"),
    # -- non-UTF-8 bytes (latin-1-decoded, as PEP 3333 hands them over) --
    pytest.param(MTLS, lambda w: {"HTTP_AUTHORIZATION": "Bearer \xc3\x28\xff\xfe"}, invalid_request(AUTH_MALFORMED),
                 id="latin1-authorization-token"),
    pytest.param(MTLS, lambda w: {"HTTP_AUTHORIZATION": f"B\xe9arer {w.token}"}, NO_TOKEN,
                 id="latin1-authorization-scheme"),
    pytest.param(MTLS, lambda w: {**bearer(w), **cert_header(w.alice_pem.replace("\n", "\n\xe9\xff", 2))},
                 invalid_token(CERT_UNPARSEABLE), id="latin1-cert-header"),
    pytest.param(MTLS, lambda w: {**bearer(w), "SSL_CLIENT_CERT": w.alice_pem.replace("\n", "\n\x80", 2)},
                 invalid_token(CERT_UNPARSEABLE), id="latin1-cert-variable"),
    pytest.param(PLACES, lambda w: {"HTTP_COOKIE": "at=\xff\xfe"}, invalid_request(COOKIE_UNPARSEABLE),
                 id="latin1-cookie-token"),
    pytest.param(PLACES, lambda w: {**bearer(w), "HTTP_COOKIE": "theme=caf\xe9; at=x"},
                 invalid_request(COOKIE_UNPARSEABLE), id="latin1-cookie-beside-token"),
    pytest.param(SESSION, lambda w: {"HTTP_COOKIE": "__Host-session=\xff\xfe.\x80"},
                 invalid_request(COOKIE_UNPARSEABLE), id="latin1-cookie-session"),
    pytest.param(PLACES, lambda w: {"QUERY_STRING": "access_token=\xff\xfe"}, invalid_request(QUERY_MALFORMED),
                 id="latin1-query"),
    pytest.param(DPOP, lambda w: dpop(w, "\xff\xfe.\xe9.\x80"), invalid_proof(PROOF_NOT_JWT), id="latin1-dpop"),
    pytest.param(DPOP, lambda w: {**dpop(w, w.proof("http://localhost/caf%E9")), "PATH_INFO": "/caf\xe9"}, OK,
                 id="latin1-path-htu-same-bytes"),
    pytest.param(DPOP, lambda w: {**dpop(w, w.proof("http://localhost/caf%C3%A9")), "PATH_INFO": "/caf\xe9"},
                 invalid_proof(HTU_MISMATCH), id="latin1-path-htu-utf8-of-other-bytes"),
    pytest.param(DPOP, lambda w: {**dpop(w, w.proof("http://localhost/\xff")), "PATH_INFO": "/\xff"},
                 invalid_proof(HTU_MISMATCH), id="latin1-path-htu-raw-char"),
    # -- duplicated headers, joined as servers join them --
    pytest.param(MTLS, lambda w: {"HTTP_AUTHORIZATION": f"Bearer {w.token}, Bearer {w.token}"},
                 invalid_request(AUTH_MALFORMED), id="duplicate-authorization"),
    pytest.param(DPOP, lambda w: dpop(w, w.proof() + ", " + w.proof()), invalid_request(TWO_PROOFS, "DPoP"),
                 id="duplicate-dpop"),
    pytest.param(MTLS, lambda w: {**bearer(w), **cert_header(quote(w.mallory_pem, safe="") + ","
                                                           + quote(w.alice_pem, safe=""))},
                 invalid_token(CERT_UNPARSEABLE), id="duplicate-cert-header-mallory-first"),
    pytest.param(MTLS, lambda w: {**bearer(w), **cert_header(quote(w.alice_pem, safe="") + ","
                                                           + quote(w.mallory_pem, safe=""))},
                 invalid_token(None), id="duplicate-cert-header-alice-first"),
    # -- mixed-case schemes --
    pytest.param(MTLS, lambda w: bearer(w, scheme="bearer"), OK, id="scheme-bearer"),
    pytest.param(MTLS, lambda w: bearer(w, scheme="BEARER"), OK, id="scheme-BEARER"),
    pytest.param(MTLS, lambda w: bearer(w, scheme="bEaReR"), OK, id="scheme-bEaReR"),
    pytest.param(DPOP, lambda w: dpop(w, w.proof(), scheme="DpOp"), OK, id="scheme-DpOp-dpop-on"),
    pytest.param(MTLS, lambda w: {**dpop(w, w.proof(), scheme="DpOp"), "SSL_CLIENT_CERT": w.alice_pem}, NO_TOKEN,
                 id="scheme-DpOp-dpop-off"),
    # -- one token in two places --
    pytest.param(PLACES, lambda w: {**bearer(w), "QUERY_STRING": f"access_token={w.token}"},
                 invalid_request(TWO_PLACES), id="two-places-header-query"),
    pytest.param(PLACES, lambda w: {**bearer(w), "@method": "POST", "@data": f"access_token={w.token}"},
                 invalid_request(TWO_PLACES), id="two-places-header-body"),
    pytest.param(PLACES, lambda w: {"QUERY_STRING": f"access_token={w.token}", "HTTP_COOKIE": f"at={w.token}"},
                 invalid_request(TWO_PLACES), id="two-places-query-cookie"),
    # -- keys named by the token itself: ignored, never fetched --
    pytest.param(MTLS, lambda w: bearer(w, w.attacker_token("jku")), invalid_token(BAD_SIGNATURE), id="jku"),
    pytest.param(MTLS, lambda w: bearer(w, w.attacker_token("x5u")), invalid_token(BAD_SIGNATURE), id="x5u"),
    pytest.param(MTLS, lambda w: bearer(w, w.attacker_token("jwk")), invalid_token(BAD_SIGNATURE), id="jwk-embedded"),
    pytest.param(MTLS, lambda w: bearer(w, w.attacker_token("jku", kid="attacker")), invalid_token(UNKNOWN_KEY),
                 id="jku-own-kid"),
    # -- kid values (the token otherwise signed by the issuer's real key) --
    pytest.param(MTLS, lambda w: bearer(w, w.signed({"kid": "../../etc/passwd"})), invalid_token(UNKNOWN_KEY),
                 id="kid-path"),
    pytest.param(MTLS, lambda w: bearer(w, w.signed({"kid": "' OR 1=1 --"})), invalid_token(UNKNOWN_KEY),
                 id="kid-sql"),
    pytest.param(MTLS, lambda w: bearer(w, w.signed({"kid": "k" * 300})), invalid_token(BAD_KID), id="kid-300-chars"),
    pytest.param(MTLS, lambda w: bearer(w, w.signed({"kid": 1})), invalid_token(BAD_KID), id="kid-number"),
    pytest.param(MTLS, lambda w: bearer(w, w.signed({"kid": ["k1"]})), invalid_token(BAD_KID), id="kid-list"),
    pytest.param(MTLS, lambda w: bearer(w, w.signed({"kid": {"$ne": None}})), invalid_token(BAD_KID),
                 id="kid-object"),
    pytest.param(MTLS, lambda w: bearer(w, w.signed({"kid": None})), invalid_token(UNKNOWN_KEY), id="kid-null"),
    # -- crit --
    pytest.param(MTLS, lambda w: bearer(w, w.signed({"crit": ["exp"], "exp": 1})), invalid_token(CRIT),
                 id="crit-exp"),
    pytest.param(MTLS, lambda w: bearer(w, w.signed({"crit": ["b64"], "b64": False})), invalid_token(CRIT),
                 id="crit-b64"),
    pytest.param(MTLS, lambda w: bearer(w, w.signed({"crit": []})), invalid_token(CRIT), id="crit-empty"),
    # -- huge exp: a finite one is a valid (far) future expiry; anything not a finite number is refused --
    pytest.param(MTLS, lambda w: bearer(w, w.with_exp("1e308")), OK, id="exp-1e308"),
    pytest.param(MTLS, lambda w: bearer(w, w.with_exp(str(10**400))), invalid_token(EXP_NOT_NUMBER),
                 id="exp-10-pow-400"),
    pytest.param(MTLS, lambda w: bearer(w, w.with_exp("1e400")), invalid_token(EXP_NOT_NUMBER),
                 id="exp-1e400-parses-as-inf"),
    pytest.param(MTLS, lambda w: bearer(w, w.with_exp("NaN")), invalid_token(CLAIMS_NOT_JSON), id="exp-NaN"),
    pytest.param(MTLS, lambda w: bearer(w, w.with_exp("Infinity")), invalid_token(CLAIMS_NOT_JSON),
                 id="exp-Infinity"),
    pytest.param(MTLS, lambda w: bearer(w, w.with_exp('"Infinity"')), invalid_token(EXP_NOT_NUMBER),
                 id="exp-Infinity-string"),
    # -- JSON bombs in the introspection response (the real IntrospectionClient parses the raw body) --
    pytest.param(INTRO, lambda w: w.introspect_answer(json.dumps(
        {"active": True, "aud": AUDIENCE, "sub": "alice", "exp": int(time.time()) + 300, "token_type": "Bearer",
         "cnf": {"x5t#S256": w.alice_x5t}}).encode()), OK, id="introspection-usable-control"),
    pytest.param(INTRO, lambda w: w.introspect_answer(deep(100_000)), UNAVAILABLE, id="bomb-depth-100000"),
    pytest.param(INTRO, lambda w: w.introspect_answer(
        b'{"active": true, "aud": "' + AUDIENCE.encode() + b'", "pad": "' + b"x" * (300 * 1024) + b'"}'),
        UNAVAILABLE, id="bomb-300kb-body"),
    pytest.param(INTRO, lambda w: w.introspect_answer(b'{"active": true, "aud": ' + deep(100_000) + b"}"),
                 UNAVAILABLE, id="bomb-aud-depth-100000"),
    pytest.param(INTRO, lambda w: w.introspect_answer(b'{"active": true, "aud": ' + deep(PARSEABLE) + b"}"),
                 UNAVAILABLE, id="bomb-aud-depth-700-parses"),
    pytest.param(INTRO, lambda w: w.introspect_answer(json.dumps(
        {"active": True, "aud": AUDIENCE, "sub": "alice", "cnf": {"x5t#S256": w.alice_x5t}}).encode()[:-1]
        + b', "groups": ' + deep(PARSEABLE) + b"}"), UNAVAILABLE, id="bomb-member-depth-700-parses"),
    # The same bomb through the other door: a JWT signed by the issuer whose claims nest deep.
    pytest.param(MTLS, lambda w: bearer(w, w.signed(payload=w.claims(groups=json.loads(deep(PARSEABLE))))),
                 invalid_token(None), id="bomb-jwt-claim-depth-700-parses"),
]


@pytest.mark.parametrize(("overrides", "build", "expect"), CASES)
def test_hostile(overrides: dict[str, Any], build: Build, expect: Expect, world: World) -> None:
    app = CountingApp()
    client = client_for(world, overrides, app)
    environ: dict[str, Any] = {"SSL_CLIENT_CERT": world.alice_pem, "REMOTE_ADDR": "127.0.0.1"}
    environ.update(build(world))
    method = environ.pop("@method", "GET")
    data = environ.pop("@data", None)
    environ = {key: value for key, value in environ.items() if value is not None}
    requests_before = len(world.tiny.requests)
    response, connections, elapsed = run(client, environ, method=method, data=data,
                                         content_type="application/x-www-form-urlencoded" if data else None)
    offered = ["Bearer", "DPoP"] if overrides.get("proof_of_possession_dpop", "off") != "off" else ["Bearer"]
    assert_answer(response, app, expect, offered)
    # No outbound connection but to the configured introspection endpoint (jku, x5u: never fetched).
    tiny_address = ("127.0.0.1", world.tiny.server.server_port)
    assert all(address == tiny_address for address in connections), connections
    if "introspection_endpoint" in overrides:
        # ... which was asked exactly once (and so the recording above does see connections).
        assert connections and len(world.tiny.requests) == requests_before + 1
    else:
        assert connections == [] and len(world.tiny.requests) == requests_before
    assert elapsed < HANG / 2


# -- the same invariant for random values in every place at once ----------------------------------------------------

_LATIN1_TEXT = st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=80)
_LATIN1_BYTES = st.binary(max_size=80).map(lambda b: b.decode("latin-1"))
_RANDOM = st.one_of(_LATIN1_TEXT, _LATIN1_BYTES)
_BASE64 = string.ascii_letters + string.digits + "+/"
_NOT_BASE64 = "!#*?,;\"'\x00\x7f\x80\xe9\xff-_"


@dataclass
class Fuzz:
    """One client for every example, and the values a random request is made of."""

    world: World
    app: CountingApp
    client: Client
    legit_auth: list[str]
    legit_certs: list[str]
    other_certs: list[str]


@pytest.fixture(scope="module")
def fuzz(world: World) -> Fuzz:
    app = CountingApp()
    client = client_for(world, {**PLACES, "bearer_token_param_type": ("header", "cookie"),
                                "proof_of_possession_dpop": "optional", "dpop_allowed_hosts": ("localhost",)}, app)
    t = world.token
    return Fuzz(
        world, app, client,
        legit_auth=[f"Bearer {t}", f"bearer {t}", f"BEARER {t}", f"bEaReR {t}", f"  Bearer   {t}  "],
        legit_certs=[world.alice_pem, quote(world.alice_pem, safe=""), world.alice_pem + world.ca_pem],
        other_certs=["", world.mallory_pem, world.mallory_pem + world.alice_pem, quote(world.mallory_pem, safe="")],
    )


@st.composite
def mutated_cert(draw: st.DrawFn, pem: str) -> str:
    """Alice's PEM with one base64 character of its body replaced (another certificate, or none) or junk
    inserted into the body (never base64, never whitespace, so never alice's certificate)."""
    start = pem.index("\n") + 1
    end = pem.rindex("\n", 0, pem.index("-----END") - 1)  # not the last line: its padding bits are ignored
    body_positions = [i for i in range(start, end) if pem[i] != "\n"]
    i = draw(st.sampled_from(body_positions))
    if draw(st.booleans()):
        replacement = draw(st.sampled_from([c for c in _BASE64 if c != pem[i]]))
        return pem[:i] + replacement + pem[i + 1:]
    return pem[:i] + draw(st.text(alphabet=_NOT_BASE64, min_size=1, max_size=4)) + pem[i:]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_values_everywhere_at_once(fuzz: Fuzz, data: st.DataObject) -> None:
    w = fuzz.world
    t = w.token
    # Each value is the legitimate one about half of the time, so that many requests are one value away from legit.
    legit = data.draw(st.fixed_dictionaries({name: st.booleans() for name in ("auth", "cert", "cookie")}))
    auth = data.draw(st.sampled_from(fuzz.legit_auth) if legit["auth"] else st.one_of(
        st.none(), _RANDOM,
        st.builds(lambda s, r: s + " " + r, st.sampled_from(["Bearer", "bearer", "DPoP", "Basic"]), _RANDOM),
        st.sampled_from([f"Bearer {t}, Bearer {t}", f"DPoP {t}", f"Bearer {t}x", f"Bearer {t[:-1]}"]),
    ), label="authorization")
    cert = data.draw(st.sampled_from(fuzz.legit_certs) if legit["cert"] else st.one_of(
        st.none(), st.sampled_from(fuzz.other_certs), _RANDOM, mutated_cert(w.alice_pem),
    ), label="certificate")
    cookie = data.draw(st.sampled_from([None, "theme=dark", "session=x", "at="]) if legit["cookie"] else st.one_of(
        st.sampled_from([f"at={t}", f"at={t}; at={t}", "at=\xff"]), _RANDOM, _RANDOM.map(lambda r: "at=" + r),
    ), label="cookie")
    proof = data.draw(st.one_of(st.none(), _RANDOM, st.just(w.proof())), label="dpop")
    via_header = data.draw(st.booleans(), label="certificate via header")

    environ: dict[str, Any] = {"REMOTE_ADDR": "127.0.0.1"}
    for key, value in (("HTTP_AUTHORIZATION", auth), ("HTTP_COOKIE", cookie), ("HTTP_DPOP", proof),
                       ("HTTP_X_SSL_CLIENT_CERT" if via_header else "SSL_CLIENT_CERT", cert)):
        if value is not None:
            environ[key] = value
    calls_before = len(fuzz.app.calls)
    response, connections, _ = run(fuzz.client, environ)
    called = len(fuzz.app.calls) - calls_before

    event(f"status {response.status_code}")
    assert response.status_code in (200, 400, 401, 403), response.get_data(as_text=True)[:500]
    assert connections == []
    cert_ok = cert in fuzz.legit_certs
    # Exactly the legitimate request: alice's certificate and alice's token in one place only.
    exactly_legit = cert_ok and (
        (auth in fuzz.legit_auth and cookie in (None, "theme=dark", "session=x", "at="))
        or (auth is None and cookie == f"at={t}")
    )
    if response.status_code == 200:
        assert called == 1
        # Whatever else came along, it carried alice's certificate and alice's token as such.
        assert cert_ok and (auth in fuzz.legit_auth or f"at={t}" in (cookie or "")), "let through"
        return
    assert called == 0
    assert not exactly_legit, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == "application/json"
    body = response.json
    assert isinstance(body, dict) and isinstance(body.get("error"), str)
    challenges = parse_challenges(response.headers.getlist("WWW-Authenticate"))
    assert [c.scheme for c in challenges] == ["Bearer", "DPoP"]
    assert all(c.params["realm"] == "api" for c in challenges)
    assert challenges[1].params["algs"] == ALGS
