"""certbound_wsgi.dpop through the middleware: RFC 9449 proofs, schemes, modes, nonces and replay.

Requests go through werkzeug's test client (``http://localhost``) into
:class:`CertBoundMiddleware` fed by :class:`StaticDiscovery`. Proofs come from
:class:`tests.support.dpop.DPoPKey`, or are signed by hand for what joserfc
refuses to write. The replay cache is tested in memory and against a real
redis-server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jws
from joserfc.jwk import ECKey, OKPKey
from werkzeug.test import Client, TestResponse

from certbound_wsgi.binding import CERT_MISSING, CLAIM_MISSING, THUMBPRINT_MISMATCH
from certbound_wsgi.cache.redis import RedisCache
from certbound_wsgi.cache.redis import make_client as make_redis_client
from certbound_wsgi.cache.seal import Sealer
from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.dpop import NONCE_LIFETIME, DPoPVerifier, ReplayCache
from certbound_wsgi.errors import ConfigurationError, TemporarilyUnavailable
from certbound_wsgi.middleware import CertBoundMiddleware
from certbound_wsgi.settings import Settings
from certbound_wsgi.stats import Stats
from certbound_wsgi.types import WSGIEnvironment
from tests.conftest import CountingApp, MakeClient, ViaProxy, cert_env, make_settings, middleware_of
from tests.support.dpop import DPoPKey, ath
from tests.support.redis_server import RedisServer
from tests.support.tokens import StaticDiscovery, TestIssuer, b64url, sign_es256

HTU = "http://localhost/anything"
ALGS = "ES256 ES384 ES512 RS256 RS384 RS512 PS256 PS384 PS512 EdDSA"
#: DPoP on beside mTLS, which governs x5t#S256 only (tokens here are mostly DPoP-bound only). The test
#: client's Host is localhost; htu is rebuilt from it because the hosts are listed (issue 11 item 4).
HOSTS = ["localhost", "localhost:8080"]
ON: dict[str, Any] = {"proof_of_possession_dpop": "optional", "proof_of_possession_mtls": "optional",
                      "dpop_allowed_hosts": HOSTS}
SECRET = "dpop-secret-0123456789abcdef"
OTHER_SECRET = "another-secret-fedcba9876543210"
NONCES: dict[str, Any] = {**ON, "dpop_use_nonce": True, "cache_secret": SECRET}

P = "the DPoP proof's "
NOT_A_JWT = "the DPoP proof is not a well-formed JWT"
NO_JWK = "the DPoP proof has no jwk header"
REPLAYED = "the DPoP proof has already been used"
AS_BEARER = "a DPoP-bound token must be sent with the DPoP scheme"
NOT_BOUND = "the token is not DPoP-bound"
PROOF_REQUIRED = "a DPoP proof is required"
STRICT_REQUIRED = "a DPoP-bound token and proof are required"
NONCE_REQUIRED = "a fresh DPoP nonce is required"
REDIS_DOWN = "DPoP replay protection is unavailable; try again shortly"


# -- helpers -------------------------------------------------------------------------


def challenge(scheme: str, error: str | None = None, description: str | None = None, algs: str = ALGS) -> str:
    """The exact WWW-Authenticate value the middleware sends for ``scheme``."""
    value = f'{scheme} realm="api"' + (f', algs="{algs}"' if scheme == "DPoP" else "")
    if error:
        value += f', error="{error}"'
        if description:
            value += f', error_description="{description}"'
    return value


def offered(mode: str) -> list[str]:
    return {"off": ["Bearer"], "optional": ["Bearer", "DPoP"], "strict": ["DPoP"]}[mode]


def assert_refused(response: TestResponse, description: str, *, error: str = "invalid_dpop_proof",
                   status: int = 401, scheme: str = "DPoP", mode: str = "optional", algs: str = ALGS) -> None:
    """``status`` with the error on ``scheme``'s challenge only, every offered scheme challenged, a JSON body."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.json == {"error": error, "error_description": description}
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    expected = [challenge(s, error, description, algs) if s == scheme else challenge(s, algs=algs)
                for s in offered(mode)]
    assert response.headers.getlist("WWW-Authenticate") == expected


def assert_unavailable(response: TestResponse, mode: str = "optional") -> None:
    """503 + Retry-After for a replay store that cannot be asked: a server fault, never 401 (issue 11 item 6)."""
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.json == {"error": "temporarily_unavailable", "error_description": REDIS_DOWN}
    assert response.headers["Retry-After"] == "2"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers.getlist("WWW-Authenticate") == [challenge(s) for s in offered(mode)]


def assert_passed(response: TestResponse, jkt: str | None) -> dict[str, Any]:
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.json
    assert body is not None
    assert body["auth_method"] == "bearer"
    assert body["remote_user"] == "alice"
    assert "Dpop" not in body["headers"] and "Authorization" not in body["headers"]
    if jkt is not None:
        assert body["claims"]["cnf"]["jkt"] == jkt
    return dict(body)


def send(client: Client, token: str | None, proof: str | None, *, scheme: str = "DPoP", path: str = "/anything",
         method: str = "GET", headers: dict[str, str] | None = None, **kwargs: Any) -> TestResponse:
    sent: dict[str, str] = {}
    if token is not None:
        sent["Authorization"] = f"{scheme} {token}"
    if proof is not None:
        sent["DPoP"] = proof
    sent.update(headers or {})
    return client.open(path, method=method, headers=sent, **kwargs)


@dataclass
class Ctx:
    """What a table row builds its request from."""

    key: DPoPKey
    other: DPoPKey
    token: str
    issuer: TestIssuer

    def proof(self, htm: str = "GET", htu: str = HTU, **kwargs: Any) -> str:
        return self.key.proof(htm, htu, self.token, **kwargs)

    def hand(self, header: Any = None, claims: Any = None, *, signer: DPoPKey | None = None) -> str:
        """Signed by hand (ES256 with ``signer``, default the token's key); dict overrides, None removes."""
        hdr: Any = {"typ": "dpop+jwt", "alg": "ES256", "jwk": self.key.key.as_dict(private=False)}
        body: Any = {"jti": uuid.uuid4().hex, "htm": "GET", "htu": HTU, "iat": int(time.time()),
                     "ath": ath(self.token)}
        if isinstance(header, dict):
            hdr = {k: v for k, v in {**hdr, **header}.items() if v is not None}
        elif header is not None:
            hdr = header
        if isinstance(claims, dict):
            body = {k: v for k, v in {**body, **claims}.items() if v is not None}
        elif claims is not None:
            body = claims
        return sign_es256((signer or self.key).key, hdr, body)  # type: ignore[arg-type]

    def unsigned(self, header: dict[str, Any], signature: str = "") -> str:
        claims = {"jti": uuid.uuid4().hex, "htm": "GET", "htu": HTU, "iat": int(time.time()), "ath": ath(self.token)}
        hdr = {"typ": "dpop+jwt", "jwk": self.key.key.as_dict(private=False), **header}
        return f"{b64url(hdr)}.{b64url(claims)}.{signature}"


@pytest.fixture()
def key() -> DPoPKey:
    return DPoPKey()


@pytest.fixture()
def token(issuer: TestIssuer, key: DPoPKey) -> str:
    """A valid token bound to ``key`` (``cnf.jkt``)."""
    return issuer.token(cnf={"jkt": key.jkt})


@pytest.fixture()
def ctx(key: DPoPKey, token: str, issuer: TestIssuer) -> Ctx:
    return Ctx(key, DPoPKey(), token, issuer)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def install_clock(client: Client, clock: Callable[[], float]) -> None:
    """Replace the middleware's verifier by one reading ``clock`` (same settings, same nonce secret)."""
    middleware = middleware_of(client)
    secret = middleware.settings.shared_secret or None
    channel = middleware.certificates.channel
    middleware.authenticator.dpop = dpop_verifier(
        middleware.settings, ReplayCache(None), lambda environ: channel.verdict(environ).trusted, secret, clock)


def dpop_verifier(s: Settings, replay: ReplayCache, is_trusted_peer: Callable[[WSGIEnvironment], bool],
                  secret: str | None,
                  clock: Callable[[], float]) -> DPoPVerifier:
    """A verifier with the options of ``s``, as the middleware builds it."""
    return DPoPVerifier(replay, is_trusted_peer, Sealer(secret, "dpop").key_name,
                        algs=s.dpop_signing_alg_values_supported, proof_lifetime=s.dpop_proof_lifetime,
                        leeway=s.leeway, use_nonce=s.dpop_use_nonce, public_base_url=s.public_base_url,
                        allowed_hosts=s.dpop_allowed_hosts, secret=secret, clock=clock)


def verifier(secret: str, clock: Callable[[], float]) -> DPoPVerifier:
    """A verifier of another "worker": only its nonces are used."""
    return dpop_verifier(make_settings(**{**NONCES, "cache_secret": secret}), ReplayCache(None), lambda _: False,
                         secret, clock)


def nonce_with_stamp(stamp: int, secret: str = SECRET) -> str:
    return verifier(secret, lambda: float(stamp)).new_nonce()


# -- the legitimate request, and what counts as the same URI ---------------------------


def test_legit_request_reaches_the_app(make_client: MakeClient, ctx: Ctx) -> None:
    app = CountingApp()
    response = send(make_client(app, **ON), ctx.token, ctx.proof())
    body = assert_passed(response, ctx.key.jkt)
    assert body["thumbprint"] is None
    assert "DPoP-Nonce" not in response.headers
    (environ,) = app.calls
    assert environ["certbound.token"] == ctx.token
    assert environ["certbound.claims"]["cnf"] == {"jkt": ctx.key.jkt}


ACCEPTED: list[Any] = [
    pytest.param({}, lambda c: {"proof": c.proof()}, id="legit"),
    pytest.param({}, lambda c: {"proof": c.proof(htu="http://localhost:80/anything")}, id="htu-default-port-80"),
    pytest.param({}, lambda c: {"proof": c.proof(htu="https://localhost:443/anything"),
                                "base_url": "https://localhost/"}, id="htu-default-port-443"),
    pytest.param({}, lambda c: {"proof": c.proof(htu="https://localhost/anything"),
                                "base_url": "https://localhost:443/"}, id="host-header-with-default-port"),
    pytest.param({}, lambda c: {"proof": c.proof(htu="http://LOCALHOST/anything")}, id="htu-upper-case-host"),
    pytest.param({}, lambda c: {"proof": c.proof(htu="HTTP://LocalHost/anything")}, id="htu-upper-case-scheme"),
    pytest.param({}, lambda c: {"proof": c.proof(), "base_url": "http://LOCALHOST/"}, id="request-upper-case-host"),
    pytest.param({}, lambda c: {"proof": c.proof(htu=HTU + "?a=1&b=2")}, id="htu-query-ignored"),
    pytest.param({}, lambda c: {"proof": c.proof(htu=HTU + "#fragment")}, id="htu-fragment-ignored"),
    pytest.param({}, lambda c: {"proof": c.proof(htu=HTU + "?x=1#f"), "path": "/anything?y=2"},
                 id="both-queries-ignored"),
    pytest.param({}, lambda c: {"proof": c.proof(), "path": "/anything?y=2"}, id="request-query-ignored"),
    pytest.param({}, lambda c: {"proof": c.proof(htu="http://localhost:8080/anything"),
                                "base_url": "http://localhost:8080/"}, id="non-default-port"),
    pytest.param({}, lambda c: {"proof": c.proof(htu="http://localhost/app/anything"),
                                "base_url": "http://localhost/app/"}, id="script-name"),
    pytest.param({}, lambda c: {"proof": c.proof(htu="http://localhost/a%20b"), "path": "/a%20b"},
                 id="percent-encoded-space"),
    pytest.param({}, lambda c: {"proof": c.proof(htu="https://localhost/anything"),
                                "headers": {"X-Forwarded-Proto": "https"},
                                "environ_overrides": {"REMOTE_ADDR": "127.0.0.1"}},
                 id="forwarded-proto-from-trusted-proxy"),
    pytest.param({}, lambda c: {"proof": c.proof("POST"), "method": "POST"}, id="post"),
    pytest.param({}, lambda c: {"proof": c.proof("DELETE"), "method": "DELETE"}, id="delete"),
    pytest.param({}, lambda c: {"proof": c.proof(iat=time.time() - 290)}, id="iat-old-within-lifetime"),
    pytest.param({"leeway": 30}, lambda c: {"proof": c.proof(iat=time.time() + 20)}, id="iat-future-within-leeway"),
    pytest.param({}, lambda c: {"proof": c.proof(nonce="anything")}, id="nonce-claim-ignored-when-nonces-off"),
    pytest.param({}, lambda c: {"proof": c.proof(claims={"extra": [1, {"a": None}]}, header={"kid": "k"})},
                 id="extra-members-ignored"),
    pytest.param({}, lambda c: {"proof": f"  {c.proof()}  "}, id="surrounding-whitespace"),
    pytest.param({"dpop_signing_alg_values_supported": ["ES256"]}, lambda c: {"proof": c.proof()},
                 id="only-es256-configured"),
    pytest.param({"proof_of_possession_dpop": "strict"}, lambda c: {"proof": c.proof()}, id="strict-mode"),
]


@pytest.mark.parametrize(("overrides", "build"), ACCEPTED)
def test_accepted(overrides: dict[str, Any], build: Callable[[Ctx], dict[str, Any]], make_client: MakeClient,
                  ctx: Ctx) -> None:
    app = CountingApp()
    request = build(ctx)
    token = request.pop("token", ctx.token)
    jkt = request.pop("jkt", ctx.key.jkt)
    response = send(make_client(app, **{**ON, **overrides}), token, request.pop("proof"), **request)
    assert_passed(response, jkt)
    assert len(app.calls) == 1


@pytest.mark.parametrize("alg", [pytest.param("PS256", id="ps256"), pytest.param("RS256", id="rs256")])
def test_rsa_key(alg: str, make_client: MakeClient, issuer: TestIssuer) -> None:
    rsa = DPoPKey("RSA")
    token = issuer.token(cnf={"jkt": rsa.jkt})
    proof = rsa.proof("GET", HTU, token, header={"alg": alg})
    assert_passed(send(make_client(**ON), token, proof), rsa.jkt)


@pytest.mark.parametrize(
    ("alg", "make_key"),
    [
        pytest.param("ES384", lambda: ECKey.generate_key("P-384", private=True), id="es384-p384"),
        pytest.param("ES512", lambda: ECKey.generate_key("P-521", private=True), id="es512-p521"),
        pytest.param("EdDSA", lambda: OKPKey.generate_key("Ed25519", private=True), id="eddsa-ed25519"),
    ],
)
@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
def test_other_key_types(alg: str, make_key: Callable[[], Any], make_client: MakeClient, issuer: TestIssuer) -> None:
    private = make_key()
    token = issuer.token(cnf={"jkt": private.thumbprint()})
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": private.as_dict(private=False)}
    claims = {"jti": uuid.uuid4().hex, "htm": "GET", "htu": HTU, "iat": int(time.time()), "ath": ath(token)}
    proof = jws.serialize_compact(header, json.dumps(claims).encode(), private, algorithms=[alg])
    client = make_client(**ON)
    assert_passed(send(client, token, proof), private.thumbprint())
    assert_refused(send(client, token, proof), REPLAYED)


# -- every check of RFC 9449 section 4.3 -------------------------------------------------


def _hs256(c: Ctx, jwk: dict[str, Any]) -> str:
    header = b64url({"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk})
    claims = b64url({"jti": uuid.uuid4().hex, "htm": "GET", "htu": HTU, "iat": int(time.time()),
                     "ath": ath(c.token)})
    secret = json.dumps(jwk).encode()
    signature = hmac.new(secret, f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64url(signature)}"


REFUSED: list[Any] = [
    # (1)-(2): present, one, a JWT
    pytest.param({}, lambda c: None, PROOF_REQUIRED, id="no-dpop-header"),
    pytest.param({}, lambda c: "not-a-jwt", NOT_A_JWT, id="not-a-jwt"),
    pytest.param({}, lambda c: "a.b", NOT_A_JWT, id="two-segments"),
    pytest.param({}, lambda c: c.proof() + ".x", NOT_A_JWT, id="four-segments"),
    pytest.param({}, lambda c: "!!!!.e30.e30", NOT_A_JWT, id="header-not-base64"),
    pytest.param({}, lambda c: b64url("{not json") + ".e30.e30", NOT_A_JWT, id="header-not-json"),
    pytest.param({}, lambda c: b64url([1, 2]) + ".e30.e30", NOT_A_JWT, id="header-json-array"),
    pytest.param({}, lambda c: b64url('{"alg": NaN}') + ".e30.e30", NOT_A_JWT, id="header-json-nan"),
    pytest.param({}, lambda c: "..", NOT_A_JWT, id="empty-segments"),
    pytest.param({}, lambda c: c.hand(claims={"pad": "x" * 9000}), NOT_A_JWT, id="longer-than-8k"),
    # (4): typ
    pytest.param({}, lambda c: c.hand({"typ": None}), P + "typ is not dpop+jwt", id="typ-missing"),
    pytest.param({}, lambda c: c.hand({"typ": "JWT"}), P + "typ is not dpop+jwt", id="typ-jwt"),
    pytest.param({}, lambda c: c.hand({"typ": "at+jwt"}), P + "typ is not dpop+jwt", id="typ-at-jwt"),
    pytest.param({}, lambda c: c.hand({"typ": ["dpop+jwt"]}), P + "typ is not dpop+jwt", id="typ-list"),
    # (5): an asymmetric algorithm this server accepts
    pytest.param({}, lambda c: c.unsigned({"alg": "none"}), P + "algorithm is not accepted", id="alg-none"),
    pytest.param({}, lambda c: c.unsigned({"alg": "none"}, b64url(b"\0" * 64)), P + "algorithm is not accepted",
                 id="alg-none-with-signature"),
    pytest.param({}, lambda c: c.hand({"alg": "none"}), P + "algorithm is not accepted", id="alg-none-es256-signed"),
    pytest.param({}, lambda c: _hs256(c, c.key.key.as_dict(private=False)), P + "algorithm is not accepted",
                 id="alg-hs256-with-the-public-jwk"),
    pytest.param({}, lambda c: _hs256(c, {"kty": "oct", "k": b64url(b"secret")}), P + "algorithm is not accepted",
                 id="alg-hs256-oct-jwk"),
    pytest.param({}, lambda c: c.hand({"alg": None}), P + "algorithm is not accepted", id="alg-missing"),
    pytest.param({}, lambda c: c.hand({"alg": "es256"}), P + "algorithm is not accepted", id="alg-lower-case"),
    pytest.param({"dpop_signing_alg_values_supported": ["PS256"]}, lambda c: c.proof(), P + "algorithm is not accepted",
                 id="alg-not-configured"),
    pytest.param({}, lambda c: c.hand({"crit": ["exp"], "exp": 1}),
                 "the DPoP proof has critical header parameters this server does not understand", id="crit"),
    # (7): a public key
    pytest.param({}, lambda c: c.proof(private_jwk=True), P + "jwk contains a private key", id="private-key-in-jwk"),
    pytest.param({}, lambda c: c.hand({"jwk": None}), NO_JWK, id="jwk-missing"),
    pytest.param({}, lambda c: c.hand({"jwk": "garbage"}), NO_JWK, id="jwk-string"),
    pytest.param({}, lambda c: c.hand({"jwk": [c.key.key.as_dict(private=False)]}), NO_JWK,
                 id="jwk-list"),
    pytest.param({}, lambda c: c.hand({"jwk": {"kty": "oct", "k": b64url(b"secret")}}),
                 P + "jwk contains a private key", id="jwk-oct"),
    pytest.param({}, lambda c: c.hand({"jwk": {"kty": "oct"}}), P + "jwk is not an asymmetric key",
                 id="jwk-oct-without-k"),
    pytest.param({}, lambda c: c.hand({"jwk": {"crv": "P-256", "x": "AAAA", "y": "AAAA"}}),
                 P + "jwk is not an asymmetric key", id="jwk-without-kty"),
    pytest.param({}, lambda c: c.hand({"jwk": {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}}),
                 P + "jwk is not a valid key", id="jwk-garbage-ec"),
    pytest.param({}, lambda c: c.hand({"jwk": {"kty": "EC", "crv": "P-256", "x": 1, "y": 2}}),
                 P + "jwk is not a valid key", id="jwk-numbers"),
    pytest.param({}, lambda c: c.hand({"jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}),
                 P + "jwk is not a valid key", id="jwk-garbage-rsa"),
    # (6): the signature, by the embedded key
    pytest.param({}, lambda c: c.proof(key=c.other.key), P + "signature is invalid", id="signed-by-another-key"),
    pytest.param({}, lambda c: c.proof().rsplit(".", 1)[0] + "." + b64url(b"\1" * 64), P + "signature is invalid",
                 id="garbage-signature"),
    pytest.param({}, lambda c: c.proof().rsplit(".", 1)[0] + ".", P + "signature is invalid", id="no-signature"),
    pytest.param({}, lambda c: c.hand({"alg": "RS256"}), P + "signature is invalid", id="alg-does-not-fit-key"),
    pytest.param({}, lambda c: c.hand({"alg": "ES384"}), P + "signature is invalid", id="alg-es384-p256-key"),
    pytest.param({}, lambda c: c.hand(claims="not json"), P + "claims are not JSON", id="claims-not-json"),
    pytest.param({}, lambda c: c.hand(claims='{"iat": Infinity}'), P + "claims are not JSON", id="claims-infinity"),
    pytest.param({}, lambda c: c.hand(claims=[1, 2]), P + "claims are not a JSON object", id="claims-array"),
    # (3): the required claims
    pytest.param({}, lambda c: c.key.proof("GET", HTU), P + "ath claim is missing or invalid", id="ath-missing"),
    pytest.param({}, lambda c: c.proof(claims={"jti": None}), P + "jti claim is missing or invalid", id="jti-missing"),
    pytest.param({}, lambda c: c.hand(claims={"jti": ""}), P + "jti claim is missing or invalid", id="jti-empty"),
    pytest.param({}, lambda c: c.hand(claims={"jti": 42}), P + "jti claim is missing or invalid", id="jti-number"),
    pytest.param({}, lambda c: c.hand(claims={"jti": "j" * 2049}), P + "jti claim is missing or invalid",
                 id="jti-too-long"),
    pytest.param({}, lambda c: c.proof(claims={"htm": None}), P + "htm claim is missing or invalid", id="htm-missing"),
    pytest.param({}, lambda c: c.proof(claims={"htu": None}), P + "htu claim is missing or invalid", id="htu-missing"),
    pytest.param({}, lambda c: c.hand(claims={"htu": ["x"]}), P + "htu claim is missing or invalid", id="htu-list"),
    pytest.param({}, lambda c: c.proof(claims={"iat": None}), P + "iat claim is missing or invalid", id="iat-missing"),
    pytest.param({}, lambda c: c.hand(claims={"iat": str(int(time.time()))}), P + "iat claim is missing or invalid",
                 id="iat-string"),
    pytest.param({}, lambda c: c.hand(claims={"iat": True}), P + "iat claim is missing or invalid", id="iat-true"),
    pytest.param({}, lambda c: c.hand(claims={"iat": 10**400}), P + "iat claim is missing or invalid",
                 id="iat-too-large-for-a-float"),
    # (8): htm
    pytest.param({}, lambda c: c.proof("POST"), P + "htm does not match the request method", id="htm-post-for-get"),
    pytest.param({}, lambda c: c.proof("get"), P + "htm does not match the request method", id="htm-lower-case"),
    pytest.param({}, lambda c: c.proof("HEAD"), P + "htm does not match the request method", id="htm-head-for-get"),
    # (9): htu
    pytest.param({}, lambda c: c.proof(htu="http://localhost/other"), P + "htu does not match the request URI",
                 id="htu-other-path"),
    pytest.param({}, lambda c: c.proof(htu="http://localhost/any"), P + "htu does not match the request URI",
                 id="htu-path-prefix"),
    pytest.param({}, lambda c: c.proof(htu="http://localhost/Anything"), P + "htu does not match the request URI",
                 id="htu-path-case"),
    pytest.param({}, lambda c: c.proof(htu=HTU + "/"), P + "htu does not match the request URI",
                 id="htu-trailing-slash"),
    pytest.param({}, lambda c: c.proof(htu="http://evil.example/anything"), P + "htu does not match the request URI",
                 id="htu-other-host"),
    pytest.param({}, lambda c: c.proof(htu="http://localhost.evil.example/anything"),
                 P + "htu does not match the request URI", id="htu-host-suffix"),
    pytest.param({}, lambda c: c.proof(htu="https://localhost/anything"), P + "htu does not match the request URI",
                 id="htu-other-scheme"),
    pytest.param({}, lambda c: c.proof(htu="http://localhost:443/anything"), P + "htu does not match the request URI",
                 id="htu-https-port-on-http"),
    pytest.param({}, lambda c: c.proof(htu="http://localhost:8080/anything"),
                 P + "htu does not match the request URI", id="htu-other-port"),
    pytest.param({}, lambda c: c.proof(htu="/anything"), P + "htu does not match the request URI", id="htu-relative"),
    pytest.param({}, lambda c: c.proof(htu="ftp://localhost/anything"), P + "htu does not match the request URI",
                 id="htu-ftp"),
    pytest.param({}, lambda c: c.proof(htu="http://localhost:99999/anything"),
                 P + "htu does not match the request URI", id="htu-bad-port"),
    # (11): iat
    pytest.param({}, lambda c: c.proof(iat=time.time() - 301), P + "iat is outside the accepted window",
                 id="iat-expired"),
    pytest.param({"dpop_proof_lifetime": 10}, lambda c: c.proof(iat=time.time() - 20),
                 P + "iat is outside the accepted window", id="iat-expired-short-lifetime"),
    pytest.param({}, lambda c: c.proof(iat=time.time() + 30), P + "iat is outside the accepted window",
                 id="iat-future"),
    pytest.param({"leeway": 10}, lambda c: c.proof(iat=time.time() + 30), P + "iat is outside the accepted window",
                 id="iat-future-beyond-leeway"),
    pytest.param({}, lambda c: c.hand(claims={"iat": 1e300}), P + "iat is outside the accepted window",
                 id="iat-far-future"),
    # (12) / 7.1: ath, and the key the token is bound to
    pytest.param({}, lambda c: c.proof(claims={"ath": ath(c.issuer.token(cnf={"jkt": c.key.jkt}))}),
                 P + "ath does not match the access token", id="ath-of-another-token"),
    pytest.param({}, lambda c: c.proof(claims={"ath": ath(c.token) + "="}), P + "ath does not match the access token",
                 id="ath-padded"),
    pytest.param({}, lambda c: c.proof(claims={"ath": hashlib.sha256(c.token.encode()).hexdigest()}),
                 P + "ath does not match the access token", id="ath-hex"),
    pytest.param({}, lambda c: c.hand(claims={"ath": "\ud800"}), P + "ath does not match the access token",
                 id="ath-lone-surrogate"),
    pytest.param({}, lambda c: c.other.proof("GET", HTU, c.token), P + "key does not match the token's cnf.jkt",
                 id="valid-proof-by-another-key"),
]


@pytest.mark.parametrize(("overrides", "build", "description"), REFUSED)
def test_refused(overrides: dict[str, Any], build: Callable[[Ctx], str | None], description: str,
                 make_client: MakeClient, ctx: Ctx) -> None:
    app = CountingApp()
    response = send(make_client(app, **{**ON, **overrides}), ctx.token, build(ctx))
    assert_refused(response, description, algs=" ".join(overrides.get("dpop_signing_alg_values_supported", [ALGS])))
    assert app.calls == []


@pytest.mark.parametrize(
    ("headers", "environ"),
    [
        pytest.param(lambda c: [("DPoP", c.proof()), ("DPoP", c.proof())], {}, id="two-headers"),
        pytest.param(lambda c: [], lambda c: {"HTTP_DPOP": f"{c.proof()}, {c.proof()}"}, id="comma-joined"),
        pytest.param(lambda c: [], lambda c: {"HTTP_DPOP": f"{c.proof()},"}, id="trailing-comma"),
    ],
)
def test_more_than_one_dpop_header_is_invalid_request(
    headers: Callable[[Ctx], list[tuple[str, str]]], environ: Any, make_client: MakeClient, ctx: Ctx
) -> None:
    app = CountingApp()
    overrides = environ(ctx) if callable(environ) else environ
    response = make_client(app, **ON).get("/anything", headers=[("Authorization", f"DPoP {ctx.token}"),
                                                                *headers(ctx)], environ_overrides=overrides)
    assert_refused(response, "more than one DPoP header", error="invalid_request", status=400)
    assert app.calls == []


def test_untrusted_peer_cannot_claim_https(make_client: MakeClient, ctx: Ctx) -> None:
    # The secret and an address, both required: the peer 10.1.2.3 is not the trusted proxy.
    client = make_client(**ON, trusted_proxies=("127.0.0.1/32",))
    proof = ctx.proof(htu="https://localhost/anything")
    response = send(client, ctx.token, proof, headers={"X-Forwarded-Proto": "https"},
                    environ_overrides={"REMOTE_ADDR": "10.1.2.3"})
    assert_refused(response, P + "htu does not match the request URI")
    # The same proof from the trusted proxy: accepted (it was not used up by the refusal).
    response = send(client, ctx.token, proof, headers={"X-Forwarded-Proto": "https"},
                    environ_overrides={"REMOTE_ADDR": "127.0.0.1"})
    assert_passed(response, ctx.key.jkt)


@pytest.mark.parametrize(
    ("base", "htu", "request_base", "status"),
    [
        pytest.param("https://api.example.com", "https://api.example.com/anything", "http://localhost/", 200,
                     id="public-url-wins-over-host"),
        pytest.param("https://api.example.com/", "https://api.example.com:443/anything", "http://localhost/", 200,
                     id="public-url-trailing-slash-default-port"),
        pytest.param("https://api.example.com/v1", "https://api.example.com/v1/anything", "http://localhost/", 200,
                     id="public-url-with-path"),
        pytest.param("https://api.example.com", HTU, "http://localhost/", 401, id="request-url-refused"),
        pytest.param("https://api.example.com", "http://evil.example/anything", "http://evil.example/", 401,
                     id="spoofed-host-ignored"),
        pytest.param("https://api.example.com", "http://api.example.com/anything", "http://api.example.com/", 401,
                     id="scheme-of-public-url"),
    ],
)
def test_public_base_url_governs_htu(base: str, htu: str, request_base: str, status: int, make_client: MakeClient,
                                     ctx: Ctx) -> None:
    response = send(make_client(public_base_url=base, **{**ON, "dpop_allowed_hosts": []}), ctx.token,
                    ctx.proof(htu=htu), base_url=request_base)
    if status == 200:
        assert_passed(response, ctx.key.jkt)
    else:
        assert_refused(response, P + "htu does not match the request URI")


def test_non_ascii_path_htu(make_client: MakeClient, ctx: Ctx) -> None:
    response = send(make_client(**ON), ctx.token, ctx.proof(htu="http://localhost/caf%C3%A9"), path="/caf%C3%A9")
    assert_passed(response, ctx.key.jkt)


def test_percent_encoded_unreserved_htu(make_client: MakeClient, ctx: Ctx) -> None:
    response = send(make_client(**ON), ctx.token, ctx.proof(htu="http://localhost/%7Euser"), path="/%7Euser")
    assert_passed(response, ctx.key.jkt)


# -- replay ----------------------------------------------------------------------------


def test_a_proof_is_accepted_once(make_client: MakeClient, ctx: Ctx) -> None:
    app = CountingApp()
    client = make_client(app, **ON)
    proof = ctx.proof()
    assert_passed(send(client, ctx.token, proof), ctx.key.jkt)
    assert_refused(send(client, ctx.token, proof), REPLAYED)
    assert_refused(send(client, ctx.token, f" {proof} "), REPLAYED)
    assert len(app.calls) == 1
    # A new proof with a new jti is fine.
    assert_passed(send(client, ctx.token, ctx.proof()), ctx.key.jkt)


def test_a_new_proof_reusing_a_jti_is_refused(make_client: MakeClient, ctx: Ctx) -> None:
    client = make_client(**ON)
    assert_passed(send(client, ctx.token, ctx.proof(jti="fixed")), ctx.key.jkt)
    assert_refused(send(client, ctx.token, ctx.proof(jti="fixed", claims={"extra": 1})), REPLAYED)


def test_a_refused_proof_is_not_used_up(make_client: MakeClient, ctx: Ctx) -> None:
    client = make_client(**ON)
    # Refused before its jti is recorded: the signature does not match the token's jkt.
    other_token = ctx.issuer.token(cnf={"jkt": ctx.other.jkt})
    proof = ctx.key.proof("GET", HTU, other_token, jti="shared")
    assert_refused(send(client, other_token, proof), P + "key does not match the token's cnf.jkt")
    assert_passed(send(client, ctx.token, ctx.proof(jti="shared")), ctx.key.jkt)


# -- schemes and modes ---------------------------------------------------------------


@pytest.mark.parametrize("scheme", [pytest.param(s, id=s) for s in ("DPoP", "dPoP", "DPOP", "dpop")])
def test_scheme_is_case_insensitive(scheme: str, make_client: MakeClient, ctx: Ctx) -> None:
    assert_passed(send(make_client(**ON), ctx.token, ctx.proof(), scheme=scheme), ctx.key.jkt)


def test_dpop_bound_token_as_bearer_is_refused(make_client: MakeClient, ctx: Ctx) -> None:
    app = CountingApp()
    client = make_client(app, **ON)
    # Even with a perfectly good proof alongside (RFC 9449 section 7.2).
    response = send(client, ctx.token, ctx.proof(), scheme="Bearer")
    assert_refused(response, AS_BEARER, error="invalid_token", scheme="Bearer")
    assert_refused(send(client, ctx.token, None, scheme="Bearer"), AS_BEARER, error="invalid_token", scheme="Bearer")
    assert app.calls == []


@pytest.mark.parametrize(
    "cnf",
    [
        pytest.param(None, id="no-cnf"),
        pytest.param({"x5t#S256": "abc"}, id="certificate-bound-only"),
        pytest.param({}, id="empty-cnf"),
        pytest.param("jkt", id="cnf-not-an-object"),
    ],
)
def test_dpop_scheme_with_a_token_not_dpop_bound(cnf: Any, make_client: MakeClient, ctx: Ctx) -> None:
    token = ctx.issuer.token(cnf=cnf)
    response = send(make_client(**{**ON, "proof_of_possession_mtls": "off"}), token,
                    ctx.key.proof("GET", HTU, token))
    assert_refused(response, NOT_BOUND, error="invalid_token")


def test_dpop_scheme_with_an_invalid_token_is_challenged_on_dpop(make_client: MakeClient, ctx: Ctx) -> None:
    token = ctx.issuer.token(cnf={"jkt": ctx.key.jkt}, exp=int(time.time()) - 100)
    response = send(make_client(**ON), token, ctx.key.proof("GET", HTU, token))
    assert_refused(response, "the token has expired", error="invalid_token")


def test_dpop_scheme_plus_another_credential_is_invalid_request(make_client: MakeClient, ctx: Ctx) -> None:
    app = CountingApp()
    client = make_client(app, bearer_token_param_type=["header", "query"], **ON)
    response = send(client, ctx.token, ctx.proof(), query_string={"access_token": ctx.token})
    assert_refused(response, "more than one access token in the request (RFC 6750 section 2)",
                   error="invalid_request", status=400, scheme="Bearer")
    assert app.calls == []


def test_other_schemes_are_not_ours(make_client: MakeClient, ctx: Ctx) -> None:
    response = send(make_client(**ON), ctx.token, ctx.proof(), scheme="Basic")
    assert response.status_code == 401
    assert response.headers.getlist("WWW-Authenticate") == [challenge("Bearer"), challenge("DPoP")]
    assert response.json == {"error": "unauthorized", "error_description": "an access token is required"}


MISSING = "an access token is required"

MODES: list[Any] = [
    # mode, token, scheme, proof?, status, error, description, scheme of the error
    pytest.param("off", "bound", "DPoP", True, 401, None, MISSING, None, id="off-dpop-scheme-ignored"),
    pytest.param("off", "bound", "Bearer", False, 401, "invalid_token", AS_BEARER, "Bearer",
                 id="off-bound-token-refused"),
    pytest.param("off", "bound", "Bearer", True, 401, "invalid_token", AS_BEARER, "Bearer",
                 id="off-bound-token-with-proof-refused"),
    pytest.param("off", "unbound", "Bearer", False, 200, None, None, None, id="off-unbound-bearer"),
    pytest.param("off", "unbound", "DPoP", True, 401, None, MISSING, None, id="off-unbound-dpop-scheme-ignored"),
    pytest.param("optional", "bound", "DPoP", True, 200, None, None, None, id="optional-bound-with-proof"),
    pytest.param("optional", "bound", "DPoP", False, 401, "invalid_dpop_proof", PROOF_REQUIRED, "DPoP",
                 id="optional-bound-without-proof"),
    pytest.param("optional", "bound", "Bearer", False, 401, "invalid_token", AS_BEARER, "Bearer",
                 id="optional-bound-as-bearer"),
    pytest.param("optional", "unbound", "Bearer", False, 200, None, None, None, id="optional-unbound-bearer"),
    pytest.param("optional", "unbound", "Bearer", True, 200, None, None, None,
                 id="optional-unbound-bearer-with-stray-proof"),
    pytest.param("optional", "unbound", "DPoP", True, 401, "invalid_token", NOT_BOUND, "DPoP",
                 id="optional-unbound-dpop-scheme"),
    pytest.param("optional", None, None, False, 401, None, MISSING, None, id="optional-no-token"),
    pytest.param("strict", "bound", "DPoP", True, 200, None, None, None, id="strict-bound-with-proof"),
    pytest.param("strict", "bound", "DPoP", False, 401, "invalid_dpop_proof", PROOF_REQUIRED, "DPoP",
                 id="strict-bound-without-proof"),
    pytest.param("strict", "unbound", "Bearer", False, 401, "invalid_dpop_proof", STRICT_REQUIRED, "DPoP",
                 id="strict-unbound-bearer"),
    pytest.param("strict", "bound", "Bearer", True, 401, "invalid_token", AS_BEARER, "DPoP",
                 id="strict-bound-as-bearer"),
    pytest.param("strict", "unbound", "DPoP", True, 401, "invalid_token", NOT_BOUND, "DPoP",
                 id="strict-unbound-dpop-scheme"),
    pytest.param("strict", None, None, False, 401, None, MISSING, None, id="strict-no-token"),
]


@pytest.mark.parametrize(("mode", "kind", "scheme", "with_proof", "status", "error", "description", "on"), MODES)
def test_modes(mode: str, kind: str | None, scheme: str | None, with_proof: bool, status: int, error: str | None,
               description: str | None, on: str | None, make_client: MakeClient, ctx: Ctx) -> None:
    app = CountingApp()
    client = make_client(app, proof_of_possession_dpop=mode, proof_of_possession_mtls="optional",
                         dpop_allowed_hosts=HOSTS)
    token = {"bound": ctx.token, "unbound": ctx.issuer.token(), None: None}[kind]
    proof = ctx.key.proof("GET", HTU, token) if with_proof else None
    response = send(client, token, proof, scheme=scheme or "Bearer")
    assert response.status_code == status, response.get_data(as_text=True)
    if status == 200:
        assert_passed(response, ctx.key.jkt if kind == "bound" else None)
        assert len(app.calls) == 1
        return
    assert app.calls == []
    if error is None:  # no token found: bare challenges (RFC 6750 section 3.1)
        assert response.json == {"error": "unauthorized", "error_description": description}
        assert response.headers.getlist("WWW-Authenticate") == [challenge(s) for s in offered(mode)]
    else:
        assert description is not None and on is not None
        assert_refused(response, description, error=error, scheme=on, mode=mode)


BOTH: list[Any] = [
    # mTLS mode, certificate, scheme, proof?, which token, status, description
    pytest.param("optional", "alice", "DPoP", True, "both", 200, None, id="cert-and-proof"),
    pytest.param("strict", "alice", "DPoP", True, "both", 200, None, id="strict-mtls-cert-and-proof"),
    pytest.param("optional", None, "DPoP", True, "both", 401, CERT_MISSING, id="proof-without-cert"),
    pytest.param("optional", "mallory", "DPoP", True, "both", 401, THUMBPRINT_MISMATCH, id="proof-with-other-cert"),
    pytest.param("optional", "alice", "DPoP", False, "both", 401, PROOF_REQUIRED, id="cert-without-proof"),
    pytest.param("optional", "alice", "Bearer", False, "both", 401, AS_BEARER, id="cert-and-bearer"),
    pytest.param("off", None, "DPoP", True, "both", 200, None, id="mtls-off-proof-suffices"),
    pytest.param("strict", "alice", "DPoP", True, "jkt", 401, CLAIM_MISSING, id="strict-mtls-dpop-only-token"),
    pytest.param("optional", "alice", "DPoP", True, "jkt", 200, None, id="dpop-only-token-cert-ignored"),
]


@pytest.mark.parametrize(("mtls", "cert", "scheme", "with_proof", "which", "status", "description"), BOTH)
def test_both_bindings(mtls: str, cert: str | None, scheme: str, with_proof: bool, which: str, status: int,
                       description: str | None, make_client: MakeClient, ctx: Ctx, alice: Issued, mallory: Issued,
                       alice_x5t: str) -> None:
    cnf = {"x5t#S256": alice_x5t, "jkt": ctx.key.jkt} if which == "both" else {"jkt": ctx.key.jkt}
    token = ctx.issuer.token(cnf=cnf)
    pem = {"alice": alice.cert_pem, "mallory": mallory.cert_pem, None: None}[cert]
    client = make_client(proof_of_possession_dpop="optional", proof_of_possession_mtls=mtls, dpop_allowed_hosts=HOSTS)
    response = send(client, token, ctx.key.proof("GET", HTU, token) if with_proof else None, scheme=scheme,
                    environ_overrides=cert_env(pem))
    if status == 200:
        body = assert_passed(response, ctx.key.jkt)
        assert body["thumbprint"] == (alice_x5t if cert == "alice" else None)
        return
    assert description is not None
    if description == PROOF_REQUIRED:
        assert_refused(response, description)
    else:
        assert_refused(response, description, error="invalid_token", scheme=scheme)


# -- nonces (section 8) ----------------------------------------------------------------


def test_nonce_flow(make_client: MakeClient, ctx: Ctx) -> None:
    app = CountingApp()
    client = make_client(app, **NONCES)
    first = send(client, ctx.token, ctx.proof())
    assert_refused(first, NONCE_REQUIRED, error="use_dpop_nonce")
    nonce = first.headers["DPoP-Nonce"]
    assert len(nonce) == 32
    assert app.calls == []
    retry = send(client, ctx.token, ctx.proof(nonce=nonce))
    assert_passed(retry, ctx.key.jkt)
    assert "DPoP-Nonce" not in retry.headers  # fresh: no new one yet
    # The nonce serves several proofs; each proof still only once.
    proof = ctx.proof(nonce=nonce)
    assert_passed(send(client, ctx.token, proof), ctx.key.jkt)
    assert_refused(send(client, ctx.token, proof), REPLAYED)
    assert len(app.calls) == 2


def test_nonce_is_checked_after_the_proof_itself(make_client: MakeClient, ctx: Ctx) -> None:
    # A bad proof gets its own error, not a nonce that would not help.
    response = send(make_client(**NONCES), ctx.token, ctx.proof("POST"))
    assert_refused(response, P + "htm does not match the request method")
    assert "DPoP-Nonce" not in response.headers


def _flip(nonce: str) -> str:
    return nonce[:10] + ("A" if nonce[10] != "A" else "B") + nonce[11:]


BAD_NONCES: list[Any] = [
    pytest.param(_flip, id="garbled"),
    pytest.param(lambda n: n[:-1], id="truncated"),
    pytest.param(lambda n: n + "A", id="lengthened"),
    pytest.param(lambda n: "A" * 32, id="all-a"),
    pytest.param(lambda n: "!" * 32, id="not-base64"),
    pytest.param(lambda n: "é" * 32, id="non-ascii"),
    pytest.param(lambda n: "", id="empty"),
    pytest.param(lambda n: 12345, id="number"),
    pytest.param(lambda n: [n], id="list"),
    pytest.param(lambda n: b64url(struct.pack(">Q", int(time.time())) + b"\0" * 16), id="forged-mac"),
    pytest.param(lambda n: nonce_with_stamp(int(time.time()), OTHER_SECRET), id="other-secret"),
    pytest.param(lambda n: nonce_with_stamp(int(time.time()) - NONCE_LIFETIME - 1), id="expired"),
    pytest.param(lambda n: nonce_with_stamp(int(time.time()) + 60), id="from-the-future"),
]


@pytest.mark.parametrize("make_nonce", BAD_NONCES)
def test_bad_nonce_gets_a_new_one(make_nonce: Callable[[str], Any], make_client: MakeClient, ctx: Ctx) -> None:
    client = make_client(**NONCES)
    good = send(client, ctx.token, ctx.proof()).headers["DPoP-Nonce"]
    response = send(client, ctx.token, ctx.hand(claims={"nonce": make_nonce(good)}))
    assert_refused(response, NONCE_REQUIRED, error="use_dpop_nonce")
    fresh = response.headers["DPoP-Nonce"]
    assert_passed(send(client, ctx.token, ctx.proof(nonce=fresh)), ctx.key.jkt)


def test_nonce_missing_claim(make_client: MakeClient, ctx: Ctx) -> None:
    response = send(make_client(**NONCES), ctx.token, ctx.proof(claims={"nonce": None}))
    assert_refused(response, NONCE_REQUIRED, error="use_dpop_nonce")
    assert response.headers["DPoP-Nonce"]


@pytest.mark.parametrize(
    ("secret", "accepted"),
    [pytest.param(SECRET, True, id="same-secret"), pytest.param(OTHER_SECRET, False, id="other-secret")],
)
def test_nonce_from_another_worker(secret: str, accepted: bool, make_client: MakeClient, ctx: Ctx) -> None:
    worker_a = make_client(**NONCES)
    worker_b = make_client(**{**NONCES, "cache_secret": secret})
    nonce = send(worker_a, ctx.token, ctx.proof()).headers["DPoP-Nonce"]
    response = send(worker_b, ctx.token, ctx.proof(nonce=nonce))
    if accepted:
        assert_passed(response, ctx.key.jkt)
    else:
        assert_refused(response, NONCE_REQUIRED, error="use_dpop_nonce")


def test_nonce_within_leeway_from_the_future_is_accepted(make_client: MakeClient, ctx: Ctx) -> None:
    client = make_client(**{**NONCES, "leeway": 30})
    nonce = nonce_with_stamp(int(time.time()) + 20)
    assert_passed(send(client, ctx.token, ctx.proof(nonce=nonce)), ctx.key.jkt)


@pytest.mark.parametrize(
    ("age", "refreshed"),
    [
        pytest.param(0, False, id="fresh"),
        pytest.param(100, False, id="a-third-old"),
        pytest.param(NONCE_LIFETIME * 2 // 3, False, id="exactly-two-thirds"),
        pytest.param(NONCE_LIFETIME * 2 // 3 + 1, True, id="past-two-thirds"),
        pytest.param(NONCE_LIFETIME - 1, True, id="about-to-expire"),
    ],
)
def test_success_carries_a_fresh_nonce_when_the_old_is_ageing(age: int, refreshed: bool, make_client: MakeClient,
                                                              ctx: Ctx) -> None:
    client = make_client(**NONCES)
    start = int(time.time())
    clock = Clock(float(start))
    install_clock(client, clock)
    nonce = send(client, ctx.token, ctx.proof(iat=start)).headers["DPoP-Nonce"]
    clock.now = float(start + age)
    response = send(client, ctx.token, ctx.proof(iat=start + age, nonce=nonce))
    assert_passed(response, ctx.key.jkt)
    if not refreshed:
        assert "DPoP-Nonce" not in response.headers
        return
    fresh = response.headers["DPoP-Nonce"]
    assert fresh != nonce
    # Later, the old nonce has expired and the fresh one still works.
    clock.now = float(start + NONCE_LIFETIME + 10)
    later = int(clock.now)
    assert_refused(send(client, ctx.token, ctx.proof(iat=later, nonce=nonce)), NONCE_REQUIRED, error="use_dpop_nonce")
    assert_passed(send(client, ctx.token, ctx.proof(iat=later, nonce=fresh)), ctx.key.jkt)


def test_nonce_expires_after_its_lifetime(make_client: MakeClient, ctx: Ctx) -> None:
    client = make_client(**NONCES)
    start = int(time.time())
    clock = Clock(float(start))
    install_clock(client, clock)
    nonce = send(client, ctx.token, ctx.proof(iat=start)).headers["DPoP-Nonce"]
    clock.now = float(start + NONCE_LIFETIME - 1)
    assert_passed(send(client, ctx.token, ctx.proof(iat=int(clock.now), nonce=nonce)), ctx.key.jkt)
    clock.now = float(start + NONCE_LIFETIME)
    response = send(client, ctx.token, ctx.proof(iat=int(clock.now), nonce=nonce))
    assert_refused(response, NONCE_REQUIRED, error="use_dpop_nonce")
    assert response.headers["DPoP-Nonce"] != nonce


@pytest.mark.parametrize(
    "secrets",
    [
        pytest.param({}, id="no-secret"),
        pytest.param({"cache_secret": "short"}, id="short-cache-secret"),
        pytest.param({"client_secret": "short"}, id="short-client-secret"),
    ],
)
def test_nonces_need_a_shared_secret(secrets: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError, match="cache_secret"):
        make_settings(**ON, dpop_use_nonce=True, **secrets)


# -- ReplayCache -----------------------------------------------------------------------


def test_memory_replay_cache_first_use_and_expiry() -> None:
    clock = Clock(1000.0)
    cache = ReplayCache(None, clock=clock)
    assert cache.first_use("a", 10) is True
    assert cache.first_use("a", 10) is False
    assert cache.first_use("b", 10) is True
    clock.now = 1009.999
    assert cache.first_use("a", 10) is False
    clock.now = 1010.0
    assert cache.first_use("a", 10) is True
    assert cache.first_use("a", 10) is False


def test_memory_replay_cache_is_bounded() -> None:
    clock = Clock(0.0)
    cache = ReplayCache(None, size=3, clock=clock)
    for name in "abcd":
        assert cache.first_use(name, 100) is True
    # The oldest entry made room; the newer ones are remembered.
    assert cache.first_use("b", 100) is False
    assert cache.first_use("c", 100) is False
    assert cache.first_use("d", 100) is False
    assert cache.first_use("a", 100) is True


def test_memory_replay_cache_drops_expired_entries_first() -> None:
    clock = Clock(0.0)
    cache = ReplayCache(None, size=2, clock=clock)
    assert cache.first_use("short", 1) is True
    assert cache.first_use("long", 100) is True
    clock.now = 5.0
    assert cache.first_use("new", 100) is True
    assert cache.first_use("long", 100) is False
    assert cache.first_use("new", 100) is False


class FlakyRedis:
    """``add_once`` as RedisCache has it, over a dict, with an outage switch."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.down = False

    def add_once(self, key: str, ttl: float) -> bool | None:
        if self.down:
            return None
        if key in self.keys:
            return False
        self.keys.add(key)
        return True


def test_fail_open_falls_back_to_memory() -> None:
    redis = FlakyRedis()
    redis.down = True
    closed = ReplayCache(redis)
    # A server fault, not a bad proof: 503 with Retry-After (issue 11 item 6).
    with pytest.raises(TemporarilyUnavailable, match="replay protection is unavailable") as raised:
        closed.first_use("k", 10)
    assert raised.value.status == 503 and raised.value.headers == [("Retry-After", "2")]
    opened = ReplayCache(redis, fail_open=True)
    assert opened.first_use("k", 10) is True
    assert opened.first_use("k", 10) is False


def test_fail_open_remembers_across_the_outage() -> None:
    redis = FlakyRedis()
    cache = ReplayCache(redis, fail_open=True)
    redis.down = True
    assert cache.first_use("k", 10) is True
    redis.down = False
    assert cache.first_use("k", 10) is False


def redis_replay(server: RedisServer, fail_open: bool = False) -> ReplayCache:
    """A "worker": its own connection, breaker and memory, sharing ``server``."""
    settings = make_settings(redis_url=server.url, cache_secret=SECRET, redis_timeout=0.5)
    return ReplayCache(RedisCache(make_redis_client(settings), Sealer(SECRET, "dpop"), Stats()), fail_open=fail_open)


def test_redis_replay_cache_is_shared_between_workers(redis_server: RedisServer) -> None:
    worker_a, worker_b = redis_replay(redis_server), redis_replay(redis_server)
    key = f"certbound:test:{uuid.uuid4().hex}"
    assert worker_a.first_use(key, 10) is True
    assert worker_b.first_use(key, 10) is False
    assert worker_a.first_use(key, 10) is False
    client = redis_server.client()
    try:
        assert client.get(key) == b"1"
        assert 0 < client.pttl(key) <= 10_000
    finally:
        client.close()


def test_redis_replay_entries_expire(redis_server: RedisServer) -> None:
    worker_a, worker_b = redis_replay(redis_server), redis_replay(redis_server)
    key = f"certbound:test:{uuid.uuid4().hex}"
    assert worker_a.first_use(key, 0.2) is True
    assert worker_b.first_use(key, 0.2) is False
    time.sleep(0.35)
    assert worker_b.first_use(key, 0.2) is True


def test_redis_set_nx_under_concurrency(redis_server: RedisServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    workers = [redis_replay(redis_server) for _ in range(8)]
    key = f"certbound:test:{uuid.uuid4().hex}"
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda w: w.first_use(key, 10), workers))
    assert results.count(True) == 1 and results.count(False) == 7


def test_redis_down_fails_closed_or_open(redis_server: RedisServer) -> None:
    closed, opened = redis_replay(redis_server), redis_replay(redis_server, fail_open=True)
    key = f"certbound:test:{uuid.uuid4().hex}"
    redis_server.kill()
    try:
        with pytest.raises(TemporarilyUnavailable, match="replay protection is unavailable") as raised:
            closed.first_use(key, 10)
        assert raised.value.status == 503 and raised.value.error == "temporarily_unavailable"
        assert raised.value.headers == [("Retry-After", "2")]
        # While the breaker is open, still refused (Redis is not even asked).
        with pytest.raises(TemporarilyUnavailable):
            closed.first_use(key + "2", 10)
        assert opened.first_use(key, 10) is True
        assert opened.first_use(key, 10) is False
    finally:
        redis_server.start()
    time.sleep(1.1)  # the breaker
    assert closed.first_use(key, 10) is True
    assert closed.first_use(key, 10) is False


def test_middlewares_sharing_redis_accept_a_proof_once(make_client: MakeClient, ctx: Ctx,
                                                       redis_server: RedisServer) -> None:
    options = {**ON, "redis_url": redis_server.url, "cache_secret": SECRET}
    worker_a, worker_b = make_client(**options), make_client(**options)
    proof = ctx.proof()
    assert_passed(send(worker_a, ctx.token, proof), ctx.key.jkt)
    assert_refused(send(worker_b, ctx.token, proof), REPLAYED)
    assert_refused(send(worker_a, ctx.token, proof), REPLAYED)


@pytest.mark.parametrize(
    ("fail_open", "passes"),
    [pytest.param(False, False, id="fail-closed"), pytest.param(True, True, id="fail-open")],
)
def test_middleware_with_redis_down(fail_open: bool, passes: bool, make_client: MakeClient, ctx: Ctx,
                                    redis_server: RedisServer) -> None:
    client = make_client(**ON, redis_url=redis_server.url, cache_secret=SECRET, redis_timeout=0.5,
                         dpop_replay_fail_open=fail_open)
    proof = ctx.proof()
    redis_server.kill()
    try:
        response = send(client, ctx.token, proof)
        if passes:
            assert_passed(response, ctx.key.jkt)
            assert_refused(send(client, ctx.token, proof), REPLAYED)
        else:
            assert_unavailable(response)
    finally:
        redis_server.start()


def test_middleware_fail_open_replay_after_redis_returns(make_client: MakeClient, ctx: Ctx,
                                                         redis_server: RedisServer) -> None:
    client = make_client(**ON, redis_url=redis_server.url, cache_secret=SECRET, redis_timeout=0.5,
                         dpop_replay_fail_open=True)
    proof = ctx.proof()
    redis_server.kill()
    try:
        assert_passed(send(client, ctx.token, proof), ctx.key.jkt)
    finally:
        redis_server.start()
    time.sleep(1.1)  # the breaker
    assert_refused(send(client, ctx.token, proof), REPLAYED)


# -- fuzzing: a DPoP-bound token, so that any 200 would be a bypass ------------------------

FUZZ_JTI = "fuzz-consumed-jti"


@dataclass
class Fuzz:
    client: Client
    app: CountingApp
    key: DPoPKey
    token: str
    proof: str


@pytest.fixture(scope="module")
def fuzz() -> Fuzz:
    issuer = TestIssuer()
    key = DPoPKey()
    token = issuer.token(cnf={"jkt": key.jkt}, exp=int(time.time()) + 3600)
    settings_ = make_settings(**ON)
    app = CountingApp()
    client = Client(ViaProxy(CertBoundMiddleware(app, settings_, discovery=StaticDiscovery(settings_, issuer))),
                    use_cookies=False)
    # The one valid proof, used up here: every proof the fuzzer derives from it is at best a replay.
    proof = key.proof("GET", HTU, token, jti=FUZZ_JTI)
    assert_passed(send(client, token, proof), key.jkt)
    return Fuzz(client, app, key, token, proof)


def assert_proper_refusal(fuzz: Fuzz, response: TestResponse) -> None:
    assert response.status_code in (400, 401), response.get_data(as_text=True)
    body = response.json
    assert body is not None and set(body) == {"error", "error_description"}
    assert body["error"] in ("invalid_dpop_proof", "invalid_request")
    assert response.headers.getlist("WWW-Authenticate") == [
        challenge("Bearer"), challenge("DPoP", body["error"], body["error_description"])
    ]
    assert len(fuzz.app.calls) == 1  # only the set-up request ever reached the app


def fuzz_send(fuzz: Fuzz, value: str) -> TestResponse:
    return fuzz.client.get("/anything", headers={"Authorization": f"DPoP {fuzz.token}"},
                           environ_overrides={"HTTP_DPOP": value})


_OTHER_KEY = DPoPKey()
_B64ISH = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ ,"


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(
    st.text(),
    st.binary().map(lambda b: b.decode("latin-1")),
    st.text(alphabet=_B64ISH),
    st.lists(st.text(alphabet=_B64ISH, max_size=40), min_size=3, max_size=3).map(".".join),
))
def test_fuzz_dpop_header_text(fuzz: Fuzz, value: str) -> None:
    assert_proper_refusal(fuzz, fuzz_send(fuzz, value))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)



@st.composite
def mutated(draw: st.DrawFn, proof: str) -> str:
    segments = proof.split(".")
    op = draw(st.sampled_from(["flip", "truncate", "delete", "insert", "swap", "drop", "duplicate", "replace"]))
    if op == "flip":
        chars = list(proof)
        for index in draw(st.lists(st.integers(0, len(proof) - 1), min_size=1, max_size=4)):
            chars[index] = draw(st.sampled_from(_B64ISH).filter(lambda c, i=index: c != chars[i]))
        return "".join(chars)
    if op == "truncate":
        which = draw(st.integers(0, 2))
        segments[which] = segments[which][: draw(st.integers(0, max(0, len(segments[which]) - 1)))]
        return ".".join(segments)
    if op == "delete":
        start = draw(st.integers(0, len(proof) - 1))
        return proof[:start] + proof[start + draw(st.integers(1, 8)):]
    if op == "insert":
        at = draw(st.integers(0, len(proof)))
        return proof[:at] + draw(st.text(alphabet=_B64ISH, min_size=1, max_size=8)) + proof[at:]
    if op == "swap":
        i, j = draw(st.permutations([0, 1, 2]))[:2]
        segments[i], segments[j] = segments[j], segments[i]
        return ".".join(segments)
    if op == "drop":
        del segments[draw(st.integers(0, 2))]
        return ".".join(segments)
    if op == "duplicate":
        which = draw(st.integers(0, 2))
        segments.insert(which, segments[which])
        return ".".join(segments)
    which = draw(st.integers(0, 2))
    segments[which] = b64url(json.dumps(draw(_JSON)) if which < 2 else draw(st.binary(max_size=80)))
    return ".".join(segments)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_proof(fuzz: Fuzz, data: st.DataObject) -> None:
    value = data.draw(mutated(fuzz.proof))
    assert_proper_refusal(fuzz, fuzz_send(fuzz, value))


_DELETE = object()
_ANY = st.one_of(st.just(_DELETE), _JSON)
# jti and htu stay those of the consumed proof unless replaced by something that can never be valid: so a proof
# the server accepts would be a replay, and any 200 a bug.
_BAD_JTI = st.one_of(st.just(_DELETE), st.just(""), st.integers(), st.booleans(), st.lists(st.text(max_size=3)))
_BAD_HTU = st.one_of(st.just(_DELETE), _JSON.filter(lambda v: not (isinstance(v, str) and "localhost" in v.lower())))
_HEADER = st.fixed_dictionaries(
    {},
    optional={
        "typ": st.sampled_from(["dpop+jwt", "JWT", "DPOP+JWT"]) | _ANY,
        "alg": st.sampled_from(["ES256", "none", "HS256", "RS256", "EdDSA"]) | _ANY,
        "jwk": st.sampled_from(["own", "other", "private"]) | _ANY,
        "crit": _ANY,
        "kid": _ANY,
        "x5c": _ANY,
    },
)
_CLAIMS = st.fixed_dictionaries(
    {},
    optional={
        "jti": _BAD_JTI,
        "htu": _BAD_HTU,
        "htm": st.sampled_from(["GET", "POST", "get"]) | _ANY,
        "iat": st.sampled_from(["now", "old", "future"]) | _ANY,
        "ath": st.sampled_from(["good", "other"]) | _ANY,
        "nonce": _ANY,
        "extra": _ANY,
    },
)


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
@settings(max_examples=300, deadline=None)
@given(header=_HEADER, claims=_CLAIMS, signer=st.sampled_from(["own", "other"]))
def test_fuzz_signed_random_header_and_claims(fuzz: Fuzz, header: dict[str, Any], claims: dict[str, Any],
                                              signer: str) -> None:
    other = _OTHER_KEY
    hdr: dict[str, Any] = {"typ": "dpop+jwt", "alg": "ES256", "jwk": fuzz.key.key.as_dict(private=False)}
    jwks = {"own": fuzz.key.key.as_dict(private=False), "other": other.key.as_dict(private=False),
            "private": fuzz.key.key.as_dict(private=True)}
    for name, value in header.items():
        hdr[name] = jwks[value] if name == "jwk" and isinstance(value, str) and value in jwks else value
    now = int(time.time())
    body: dict[str, Any] = {"jti": FUZZ_JTI, "htm": "GET", "htu": HTU, "iat": now, "ath": ath(fuzz.token)}
    presets = {"iat": {"now": now, "old": now - 1000, "future": now + 1000},
               "ath": {"good": ath(fuzz.token), "other": ath(fuzz.token + "x")}}
    for name, value in claims.items():
        body[name] = presets[name].get(value, value) if name in presets and isinstance(value, str) else value
    hdr = {k: v for k, v in hdr.items() if v is not _DELETE}
    body = {k: v for k, v in body.items() if v is not _DELETE}
    proof = sign_es256((fuzz.key if signer == "own" else other).key, hdr, body)  # type: ignore[arg-type]
    assert_proper_refusal(fuzz, fuzz_send(fuzz, proof))



# -- issue 11 item 4: htu is never built from a Host the operator did not list ---------------------------------


@pytest.mark.parametrize("mode", ["optional", "strict"])
def test_dpop_needs_public_base_url_or_allowed_hosts(mode: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^public_base_url: required with proof_of_possession_dpop"):
        make_settings(proof_of_possession_dpop=mode)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        pytest.param({"public_base_url": "https://api.example.com", "dpop_allowed_hosts": ["api.example.com"]},
                     "dpop_allowed_hosts", id="both"),
        pytest.param({"dpop_allowed_hosts": ["api.example.com:99999"]}, "dpop_allowed_hosts", id="port-out-of-range"),
        pytest.param({"dpop_allowed_hosts": ["https://api.example.com"]}, "dpop_allowed_hosts", id="a-url"),
        pytest.param({"dpop_allowed_hosts": ["user@api.example.com"]}, "dpop_allowed_hosts", id="userinfo"),
        pytest.param({"dpop_allowed_hosts": ["api.example.com/x"]}, "dpop_allowed_hosts", id="a-path"),
        pytest.param({"dpop_allowed_hosts": [":8080"]}, "dpop_allowed_hosts", id="no-host"),
        pytest.param({"public_base_url": "https://api.example.com", "dpop_replay_redis_url": "http://r:6379"},
                     "dpop_replay_redis_url", id="replay-url-scheme"),
        pytest.param({"public_base_url": "https://api.example.com", "dpop_replay_redis_url": "redis://r:6379"},
                     "cache_secret", id="replay-url-without-secret"),
    ],
)
def test_dpop_host_options_are_checked(options: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        make_settings(proof_of_possession_dpop="optional", **options)
    assert raised.value.option == option


def test_dpop_off_needs_neither() -> None:
    assert make_settings().proof_of_possession_dpop == "off"


OTHER_RS = "other-rs.example"


@pytest.mark.parametrize(
    ("options", "request_host", "htu", "description"),
    [
        # The attack of issue 11 item 4: a proof made for another resource server, sent with its Host.
        pytest.param({"public_base_url": "https://api.example.com"}, OTHER_RS, f"http://{OTHER_RS}/anything",
                     P + "htu does not match the request URI", id="public-url-other-host"),
        pytest.param({"dpop_allowed_hosts": HOSTS}, OTHER_RS, f"http://{OTHER_RS}/anything",
                     "the request's Host is not one this server accepts DPoP proofs for", id="unlisted-host"),
        pytest.param({"dpop_allowed_hosts": HOSTS}, "localhost:8081", "http://localhost:8081/anything",
                     "the request's Host is not one this server accepts DPoP proofs for", id="unlisted-port"),
        pytest.param({"dpop_allowed_hosts": HOSTS}, "localhost.", "http://localhost./anything",
                     "the request's Host is not one this server accepts DPoP proofs for", id="trailing-dot"),
        pytest.param({"dpop_allowed_hosts": HOSTS}, "localhost@evil", "http://localhost@evil/anything",
                     "the request's Host is not one this server accepts DPoP proofs for", id="userinfo-host"),
        pytest.param({"dpop_allowed_hosts": HOSTS}, "evil@localhost", "http://evil@localhost/anything",
                     "the request's Host is not one this server accepts DPoP proofs for", id="userinfo-listed-host"),
        pytest.param({"dpop_allowed_hosts": HOSTS}, "localhost/x", "http://localhost/x/anything",
                     "the request's Host is not one this server accepts DPoP proofs for", id="path-in-host"),
    ],
)
def test_host_trick_is_refused(options: dict[str, Any], request_host: str, htu: str, description: str,
                               make_client: MakeClient, ctx: Ctx) -> None:
    app = CountingApp()
    client = make_client(app, **{**ON, "dpop_allowed_hosts": [], **options})
    response = send(client, ctx.token, ctx.proof(htu=htu), headers={"Host": request_host})
    assert_refused(response, description)
    assert app.calls == []


@pytest.mark.parametrize(
    ("hosts", "request_host", "htu"),
    [
        pytest.param(["API.example.com"], "api.example.com", "http://api.example.com/anything", id="host-case"),
        pytest.param(["api.example.com"], "API.EXAMPLE.COM:80", "http://api.example.com/anything",
                     id="default-port"),
        pytest.param(["api.example.com", "api.example.org"], "api.example.org", "http://api.example.org/anything",
                     id="second-host"),
        pytest.param(["[::1]:8443"], "[::1]:8443", "http://[::1]:8443/anything", id="ipv6"),
    ],
)
def test_listed_hosts_pass(hosts: list[str], request_host: str, htu: str, make_client: MakeClient,
                           ctx: Ctx) -> None:
    client = make_client(**{**ON, "dpop_allowed_hosts": hosts})
    assert_passed(send(client, ctx.token, ctx.proof(htu=htu), headers={"Host": request_host}), ctx.key.jkt)


# -- issue 11 item 5: the thumbprint first, and only keys an honest client uses -------------------------------


def _rsa_jwk(bits: int = 2048, e: int = 65537) -> dict[str, str]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    n = rsa.generate_private_key(65537, bits).public_key().public_numbers().n
    return {"kty": "RSA", "n": b64url(n.to_bytes((n.bit_length() + 7) // 8)),
            "e": b64url(e.to_bytes((e.bit_length() + 7) // 8))}


def _jkt(jwk: dict[str, Any]) -> str:
    members = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


ECKEY_P256K = {"kty": "EC", "crv": "secp256k1", "x": "A" * 43, "y": "A" * 43}
HUGE_E = "the DPoP proof's RSA key is not accepted: it needs e = 65537 and at most 4096 bits"
CURVE = "the DPoP proof's key is on a curve this server does not accept"
INVALID_KEY = P + "jwk is not a valid key"


@pytest.mark.parametrize(
    ("alg", "make_jwk", "description"),
    [
        pytest.param("RS256", lambda: _rsa_jwk(2048, 3), HUGE_E, id="rsa-e-3"),
        pytest.param("RS256", lambda: _rsa_jwk(2048, 2**1000 + 1), HUGE_E, id="rsa-huge-e"),
        pytest.param("RS256", lambda: {**_rsa_jwk(2048), "e": "AAEAAQ"}, HUGE_E, id="rsa-e-65537-leading-zero"),
        pytest.param("RS256", lambda: _rsa_jwk(1024), INVALID_KEY, id="rsa-1024"),
        pytest.param("PS256", lambda: {**_rsa_jwk(2048), "n": "A" * 700}, HUGE_E, id="rsa-over-4096-bits"),
        pytest.param("RS256", lambda: {**_rsa_jwk(2048), "n": "AA" + _rsa_jwk(2048)["n"][2:]}, INVALID_KEY,
                     id="rsa-leading-zero-octet"),
        pytest.param("ES256", lambda: ECKEY_P256K, CURVE, id="ec-secp256k1"),
        pytest.param("ES256", lambda: {**ECKEY_P256K, "crv": "P-192"}, CURVE, id="ec-p192"),
        pytest.param("ES256", lambda: {**ECKEY_P256K, "crv": "P-256", "x": "A" * 42}, INVALID_KEY,
                     id="ec-short-x"),
        pytest.param("ES256", lambda: {**ECKEY_P256K, "crv": "P-256", "y": "A" * 44}, INVALID_KEY, id="ec-long-y"),
        pytest.param("ES256", lambda: {**ECKEY_P256K, "crv": "P-256", "x": "A+" + "A" * 41}, INVALID_KEY,
                     id="ec-not-base64url"),
        pytest.param("ES256", lambda: {**ECKEY_P256K, "crv": ["P-256"]}, INVALID_KEY, id="ec-crv-list"),
        pytest.param("ES256", lambda: {**ECKEY_P256K, "crv": "P-256"}, INVALID_KEY, id="ec-not-on-curve"),
        pytest.param("ES256", lambda: ECKey.generate_key("P-384", private=True).as_dict(private=False),
                     P + "signature is invalid", id="ec-p384-key-for-es256"),
        pytest.param("EdDSA", lambda: {"kty": "OKP", "crv": "Ed448", "x": "A" * 76}, CURVE, id="okp-ed448"),
        pytest.param("EdDSA", lambda: {"kty": "OKP", "crv": "X25519", "x": "A" * 43}, CURVE, id="okp-x25519"),
        pytest.param("ES256", lambda: OKPKey.generate_key("Ed25519", private=True).as_dict(private=False),
                     P + "signature is invalid", id="okp-key-for-es256"),
        pytest.param("RS256", lambda: ECKey.generate_key("P-256", private=True).as_dict(private=False),
                     P + "signature is invalid", id="ec-key-for-rs256"),
    ],
)
def test_key_policy(alg: str, make_jwk: Callable[[], dict[str, Any]], description: str, make_client: MakeClient,
                    ctx: Ctx) -> None:
    """Refused whether or not the token is bound to the key: a token bound to it is used here."""
    jwk = make_jwk()
    token = ctx.issuer.token(cnf={"jkt": _jkt(jwk)})
    app = CountingApp()
    proof = ctx.unsigned({"alg": alg, "jwk": jwk}, b64url(b"\1" * 64))
    proof = proof.split(".")[0] + "." + b64url({"jti": uuid.uuid4().hex, "htm": "GET", "htu": HTU,
                                                "iat": int(time.time()), "ath": ath(token)}) + "." + b64url(b"\1" * 64)
    assert_refused(send(make_client(app, **ON), token, proof), description)
    assert app.calls == []


class ImportCounter:
    """Counts key imports and signature verifications done by certbound_wsgi.proof_keys."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from certbound_wsgi import proof_keys

        self.imports = 0
        self.verifications = 0
        prepare, verify = proof_keys._prepare, proof_keys.ProofKey.verify

        def counting_prepare(*args: Any) -> Any:
            self.imports += 1
            return prepare(*args)

        def counting_verify(key: Any, *args: Any) -> bool:
            self.verifications += 1
            return verify(key, *args)

        monkeypatch.setattr(proof_keys, "_prepare", counting_prepare)
        monkeypatch.setattr(proof_keys.ProofKey, "verify", counting_verify)


@pytest.mark.parametrize(
    "make_jwk",
    [
        pytest.param(lambda: _rsa_jwk(3072, 2**3000 + 1), id="rsa-3072-huge-e"),
        pytest.param(lambda: _rsa_jwk(3072), id="rsa-3072"),
        pytest.param(lambda: DPoPKey().key.as_dict(private=False), id="another-ec-key"),
    ],
)
def test_another_key_costs_no_import_and_no_verification(make_jwk: Callable[[], dict[str, Any]],
                                                         make_client: MakeClient, ctx: Ctx,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A stolen token with a proof made with the thief's key: refused on the thumbprint (or the policy) alone."""
    counter = ImportCounter(monkeypatch)
    jwk = make_jwk()
    alg = "RS256" if jwk["kty"] == "RSA" else "ES256"
    proof = ctx.unsigned({"alg": alg, "jwk": jwk}, b64url(b"\1" * 384))
    response = send(make_client(**ON), ctx.token, proof)
    assert response.status_code == 401
    assert response.json is not None
    assert response.json["error_description"] in (P + "key does not match the token's cnf.jkt", HUGE_E)
    assert (counter.imports, counter.verifications) == (0, 0)


def test_a_key_is_imported_once_for_many_proofs(make_client: MakeClient, ctx: Ctx,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    counter = ImportCounter(monkeypatch)
    client = make_client(**ON)
    for _ in range(5):
        assert_passed(send(client, ctx.token, ctx.proof()), ctx.key.jkt)
    # The same key in another header spelling (a kid added): the header is checked anew, the key is not imported.
    assert_passed(send(client, ctx.token, ctx.proof(header={"kid": "k1"})), ctx.key.jkt)
    assert (counter.imports, counter.verifications) == (1, 6)


def test_a_remembered_header_still_needs_the_tokens_jkt(make_client: MakeClient, ctx: Ctx) -> None:
    """The header memo maps a header to its key; each token's cnf.jkt is still compared with it."""
    client = make_client(**ON)
    assert_passed(send(client, ctx.token, ctx.proof()), ctx.key.jkt)
    other_token = ctx.issuer.token(cnf={"jkt": ctx.other.jkt})
    response = send(client, other_token, ctx.key.proof("GET", HTU, other_token))
    assert_refused(response, P + "key does not match the token's cnf.jkt")
    # And a non-string jkt never matches.
    odd = ctx.issuer.token(cnf={"jkt": [ctx.key.jkt]})
    assert_refused(send(client, odd, ctx.key.proof("GET", HTU, odd)), P + "key does not match the token's cnf.jkt")


def test_the_memos_are_bounded(monkeypatch: pytest.MonkeyPatch, make_client: MakeClient, issuer: TestIssuer) -> None:
    from certbound_wsgi import dpop as dpop_module

    monkeypatch.setattr(dpop_module, "HEADER_MEMO_SIZE", 3)
    client = make_client(**ON)
    verifier = middleware_of(client).dpop
    assert verifier is not None
    verifier._keys._size = 3
    keys = [DPoPKey() for _ in range(5)]
    tokens = [issuer.token(cnf={"jkt": k.jkt}) for k in keys]
    for key, token in zip(keys, tokens, strict=True):
        assert_passed(send(client, token, key.proof("GET", HTU, token)), key.jkt)
    assert len(verifier._keys) == 3 and len(verifier._headers) == 3
    # An evicted key works again (imported anew).
    assert_passed(send(client, tokens[0], keys[0].proof("GET", HTU, tokens[0])), keys[0].jkt)


def test_rfc7638_example_thumbprint() -> None:
    """RFC 7638 section 3.1: the example key's thumbprint, from the canonical JSON written here."""
    from certbound_wsgi.proof_keys import thumbprint_input, thumbprint_of

    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCi"
             "FV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d"
             "0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-"
             "csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert thumbprint_of(thumbprint_input(jwk, "RS256")) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
@pytest.mark.parametrize(
    ("alg", "make_key"),
    [
        pytest.param("ES256", lambda: ECKey.generate_key("P-256", private=True), id="p256"),
        pytest.param("ES384", lambda: ECKey.generate_key("P-384", private=True), id="p384"),
        pytest.param("ES512", lambda: ECKey.generate_key("P-521", private=True), id="p521"),
        pytest.param("EdDSA", lambda: OKPKey.generate_key("Ed25519", private=True), id="ed25519"),
        pytest.param("PS256", lambda: DPoPKey("RSA").key, id="rsa-2048"),
    ],
)
def test_thumbprint_agrees_with_joserfc(alg: str, make_key: Callable[[], Any]) -> None:
    from certbound_wsgi.proof_keys import thumbprint_input, thumbprint_of

    key = make_key()
    assert thumbprint_of(thumbprint_input(key.as_dict(private=False), alg)) == key.thumbprint()


_MEMBER = st.one_of(st.text(max_size=8), st.text(alphabet=_B64ISH[:64], min_size=40, max_size=700), st.integers(),
                    st.none(), st.lists(st.none(), max_size=1))


@settings(max_examples=300, deadline=None)
@given(jwk=st.fixed_dictionaries({}, optional={
    "kty": st.sampled_from(["EC", "RSA", "OKP", "oct", "ec"]) | _MEMBER,
    "crv": st.sampled_from(["P-256", "P-384", "P-521", "Ed25519", "Ed448", "secp256k1"]) | _MEMBER,
    "x": _MEMBER, "y": _MEMBER, "n": _MEMBER, "e": st.sampled_from(["AQAB", "Aw", "AQAAAQ"]) | _MEMBER,
}), alg=st.sampled_from(["ES256", "ES384", "ES512", "RS256", "PS512", "EdDSA"]))
def test_fuzz_proof_keys(fuzz: Fuzz, jwk: dict[str, Any], alg: str) -> None:
    """Any jwk, bound or not to the token: a proper 401, never a 500, never the app."""
    hdr = {"typ": "dpop+jwt", "alg": alg, "jwk": jwk}
    claims = {"jti": FUZZ_JTI, "htm": "GET", "htu": HTU, "iat": int(time.time()), "ath": ath(fuzz.token)}
    signature = b64url(bytes(64))
    assert_proper_refusal(fuzz, fuzz_send(fuzz, f"{b64url(hdr)}.{b64url(claims)}.{signature}"))


# -- issue 11 item 6: a replay store that never forgets early ---------------------------------------------------


@pytest.fixture()
def own_redis(tmp_path: Any) -> Any:
    """Start a redis-server of the test's own with ``*args``; every one started is stopped after the test."""
    servers: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        servers.append(RedisServer(tmp_path / f"redis{len(servers)}", *args))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


REPLAY: dict[str, Any] = {**ON, "cache_secret": SECRET, "redis_timeout": 0.5}


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu",
                                    "volatile-random", "volatile-ttl"])
@pytest.mark.parametrize("option", ["redis_url", "dpop_replay_redis_url"])
def test_an_evicting_replay_store_is_refused_at_start_up(policy: str, option: str, own_redis: Any,
                                                         make_client: MakeClient) -> None:
    server = own_redis("--maxmemory-policy", policy)
    with pytest.raises(ConfigurationError, match=f"maxmemory-policy {policy}") as raised:
        make_client(**REPLAY, **{option: server.url})
    assert raised.value.option == "dpop_replay_redis_url"


def test_an_evicting_cache_is_fine_beside_a_separate_replay_store(own_redis: Any, make_client: MakeClient,
                                                                  ctx: Ctx) -> None:
    """The documented layout: an evicting cache, and a noeviction Redis of its own for the proofs."""
    cache, replay = own_redis("--maxmemory-policy", "allkeys-lru"), own_redis()
    client = make_client(**REPLAY, redis_url=cache.url, dpop_replay_redis_url=replay.url)
    proof = ctx.proof()
    assert_passed(send(client, ctx.token, proof), ctx.key.jkt)
    assert_refused(send(client, ctx.token, proof), REPLAYED)
    cache_client, replay_client = cache.client(), replay.client()
    try:
        assert replay_client.dbsize() == 1 and cache_client.dbsize() == 0
        # A second "worker" with the same options shares the replay store.
        assert_refused(send(make_client(**REPLAY, redis_url=cache.url, dpop_replay_redis_url=replay.url), ctx.token,
                            proof), REPLAYED)
    finally:
        cache_client.close()
        replay_client.close()


@pytest.mark.parametrize(
    ("args", "down"),
    [
        pytest.param(("--rename-command", "CONFIG", ""), False, id="config-disabled"),
        pytest.param((), True, id="redis-down"),
    ],
)
def test_an_unverifiable_replay_store_is_warned_about(args: tuple[str, ...], down: bool, own_redis: Any,
                                                      make_client: MakeClient, ctx: Ctx,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    server = own_redis(*args)
    if down:
        server.kill()
    with caplog.at_level("WARNING", logger="certbound_wsgi"):
        client = make_client(**REPLAY, redis_url=server.url)
    warnings = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert warnings == ["certbound: cannot verify the DPoP replay store's maxmemory-policy (CONFIG GET refused or "
                        "Redis unreachable): it must be noeviction, or replayed proofs pass once Redis evicts their "
                        "jti"]
    if down:
        assert_unavailable(send(client, ctx.token, ctx.proof()))
    else:
        proof = ctx.proof()
        assert_passed(send(client, ctx.token, proof), ctx.key.jkt)
        assert_refused(send(client, ctx.token, proof), REPLAYED)


def test_a_full_noeviction_store_answers_503_and_forgets_nothing(own_redis: Any, make_client: MakeClient,
                                                                  ctx: Ctx) -> None:
    server = own_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    client = make_client(**REPLAY, redis_url=server.url)
    proof = ctx.proof()
    assert_passed(send(client, ctx.token, proof), ctx.key.jkt)
    assert server.fill() > 100
    admin = server.client()
    try:
        # Pinned full (a Redis at the limit lets a small write through now and then, as memory moves).
        admin.config_set("maxmemory", 1)
        # Full: writes are refused (OOM), so nothing can be remembered: 503, never 200, never 401.
        assert_unavailable(send(client, ctx.token, ctx.proof()))
        assert_unavailable(send(make_client(**REPLAY, redis_url=server.url), ctx.token, proof))
        admin.config_set("maxmemory", "2mb")
        admin.delete(*[f"junk:{i}" for i in range(500)])
    finally:
        admin.close()
    time.sleep(1.1)  # the breaker
    # Nothing was evicted: the first proof is still remembered.
    assert_refused(send(client, ctx.token, proof), REPLAYED)
    assert_passed(send(client, ctx.token, ctx.proof()), ctx.key.jkt)


def test_a_replay_store_outage_leaves_the_cache_alone(own_redis: Any, make_client: MakeClient, ctx: Ctx) -> None:
    """Separate clients and breakers: the replay store's OOM does not switch the introspection cache off."""
    middleware = middleware_of(make_client(**REPLAY, redis_url=own_redis().url,
                                           auth_methods=("bearer", "introspection"), client_id="rs",
                                           client_secret="rs-secret-0123456789"))
    dpop, introspection = middleware.authenticator.dpop, middleware.authenticator.introspection
    assert dpop is not None and introspection is not None
    store, cache = dpop._replay._redis, introspection._l2
    assert store is not None and cache is not None and store is not cache
    assert store._client is not cache._client


class _ConfigClient:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def config_get(self, name: str) -> Any:
        assert name == "maxmemory-policy"
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize(
    ("answer", "policy"),
    [
        pytest.param({"maxmemory-policy": "noeviction"}, "noeviction", id="plain"),
        pytest.param({b"maxmemory-policy": b"allkeys-lru"}, None, id="bytes-keys-unknown"),
        pytest.param({"maxmemory-policy": b"volatile-ttl"}, "volatile-ttl", id="bytes-value"),
        pytest.param({}, None, id="empty"),
        pytest.param({"n1:6379": {"maxmemory-policy": "noeviction"}, "n2:6379": {"maxmemory-policy": "allkeys-lru"}},
                     "allkeys-lru", id="cluster-weakest-node"),
        pytest.param({"n1:6379": {"maxmemory-policy": "noeviction"}}, "noeviction", id="cluster-all-noeviction"),
        pytest.param(__import__("redis").ResponseError("unknown command 'CONFIG'"), None, id="config-renamed"),
        pytest.param(__import__("redis").ResponseError("NOPERM"), None, id="acl"),
        pytest.param(ConnectionRefusedError(), None, id="down"),
    ],
)
def test_eviction_policy(answer: Any, policy: str | None) -> None:
    from certbound_wsgi.cache.redis import eviction_policy

    assert eviction_policy(_ConfigClient(answer)) == policy


def test_replay_store_warning_for_check_config(own_redis: Any) -> None:
    from certbound_wsgi.cache.redis import replay_store_warning

    fine, evicting = own_redis(), own_redis("--maxmemory-policy", "allkeys-lru")
    assert replay_store_warning(make_settings(**REPLAY, redis_url=fine.url)) is None
    assert replay_store_warning(make_settings(**REPLAY)) is None  # no Redis: check-config warns otherwise
    assert replay_store_warning(make_settings(redis_url=evicting.url, cache_secret=SECRET)) is None  # DPoP off
    with pytest.raises(ConfigurationError, match="maxmemory-policy allkeys-lru"):
        replay_store_warning(make_settings(**REPLAY, redis_url=evicting.url))
    with pytest.raises(ConfigurationError, match="maxmemory-policy allkeys-lru"):
        replay_store_warning(make_settings(**REPLAY, redis_url=fine.url, dpop_replay_redis_url=evicting.url))
    fine.kill()
    warning = replay_store_warning(make_settings(**REPLAY, redis_url=fine.url))
    assert warning is not None and warning.startswith("cannot verify")


def test_an_oversized_header_is_refused(make_client: MakeClient, ctx: Ctx) -> None:
    """Headers are remembered, so they are bounded: 4096 bytes, room for a 4096-bit RSA key."""
    response = send(make_client(**ON), ctx.token, ctx.hand({"pad": "x" * 4100}))
    assert_refused(response, NOT_A_JWT)
    rsa4096 = _rsa_jwk(4096)
    token = ctx.issuer.token(cnf={"jkt": _jkt(rsa4096)})
    proof = ctx.unsigned({"alg": "RS256", "jwk": rsa4096}, b64url(bytes(512)))
    # A 4096-bit key fits: refused only on its (garbage) signature.
    assert_refused(send(make_client(**ON), token, proof), P + "signature is invalid")


@settings(max_examples=200, deadline=None)
@given(host=st.one_of(st.text(max_size=30), st.sampled_from(["localhost:80", "LOCALHOST", "localhost:8080",
                                                            "localhost:8081", "evil.example", "localhost.evil",
                                                            "localhost:0080", "[::1]", "localhost:"])))
def test_fuzz_host_header(fuzz: Fuzz, host: str) -> None:
    """A proof made for whatever Host is sent passes only when that Host is listed (localhost, localhost:8080)."""
    proof = fuzz.key.proof("GET", f"http://{host}/anything", fuzz.token)
    before = len(fuzz.app.calls)
    response = fuzz.client.get("/anything", headers={"Authorization": f"DPoP {fuzz.token}", "DPoP": proof},
                               environ_overrides={"HTTP_HOST": host})
    try:
        parts = urlsplit(f"http://{host}/")
        listed = (re.fullmatch(r"[A-Za-z0-9._~!$&'()*+,;=%:\[\]-]+", host) is not None
                  and parts.hostname == "localhost" and parts.port in (None, 80, 8080))
    except ValueError:
        listed = False
    if listed:
        assert response.status_code == 200, (host, response.get_data(as_text=True))
        assert len(fuzz.app.calls) == before + 1
        return
    assert response.status_code in (400, 401), (host, response.get_data(as_text=True))
    assert len(fuzz.app.calls) == before
