"""certbound_wsgi.jwt_tokens: signature, header and claims of JWT access tokens (RFC 9068, RFC 8725)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc.jwk import ECKey, OKPKey, RSAKey

from certbound_wsgi.errors import InvalidToken, TemporarilyUnavailable
from certbound_wsgi.jwt_tokens import JWTValidator
from tests.conftest import CountingApp, MakeClient, bearer, make_settings
from tests.support.tokens import AUDIENCE, ISSUER, StaticDiscovery, TestIssuer, other_keys, sign_es256
from tests.support.tokens import b64url as b64


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs256_with_public_key(issuer: TestIssuer) -> str:
    """The algorithm-confusion attack: HMAC keyed with the issuer's public key as published."""
    header = b64({"alg": "HS256", "typ": "at+jwt", "kid": issuer.kid})
    payload = b64(claims())
    secret = issuer.key.as_pem(private=False)
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def attacker_with_embedded_jwk(issuer: TestIssuer, name: str) -> str:
    attacker = ECKey.generate_key("P-256", parameters={"kid": issuer.kid}, private=True)
    header: dict[str, Any] = {"alg": "ES256", "typ": "at+jwt", "kid": issuer.kid}
    header[name] = attacker.as_dict(private=False) if name == "jwk" else "https://attacker.test/keys"
    return sign_es256(attacker, header, claims())


NOW = lambda: int(time.time())  # noqa: E731

Token = Callable[[TestIssuer], str]

BAD_TOKENS: list[Any] = [
    # time
    pytest.param(lambda i: i.token(exp=NOW() - 10), "the token has expired", id="expired"),
    pytest.param(lambda i: i.token(exp=NOW()), "the token has expired", id="expires-now"),
    pytest.param(lambda i: i.token(nbf=NOW() + 60), "the token is not valid yet", id="nbf-future"),
    pytest.param(lambda i: i.token(iat=NOW() + 60), "the token was issued in the future", id="iat-future"),
    # issuer and audience
    pytest.param(lambda i: i.token(iss="https://evil.test"), "the token was issued by another issuer", id="wrong-iss"),
    pytest.param(lambda i: i.token(iss=ISSUER + "/"), "the token was issued by another issuer",
                 id="iss-trailing-slash"),
    pytest.param(lambda i: i.token(iss=None), "the token was issued by another issuer", id="no-iss"),
    pytest.param(lambda i: i.token(aud="https://other.test"), "the token is not meant for this audience",
                 id="wrong-aud-string"),
    pytest.param(lambda i: i.token(aud=["https://a.test", "https://b.test"]),
                 "the token is not meant for this audience", id="wrong-aud-list"),
    pytest.param(lambda i: i.token(aud=[]), "the token is not meant for this audience", id="empty-aud-list"),
    pytest.param(lambda i: i.token(aud=None), "the token is not meant for this audience", id="no-aud"),
    pytest.param(lambda i: i.token(aud={"x": AUDIENCE}), "the token is not meant for this audience", id="aud-object"),
    pytest.param(lambda i: i.token(aud=AUDIENCE + "/"), "the token is not meant for this audience",
                 id="aud-trailing-slash"),
    # exp and friends
    pytest.param(lambda i: i.token(exp=None), "the token has no exp claim", id="missing-exp"),
    pytest.param(lambda i: i.token(exp=str(NOW() + 300)), "the exp claim is not a number", id="exp-string"),
    pytest.param(lambda i: i.token(exp=True), "the exp claim is not a number", id="exp-bool"),
    pytest.param(lambda i: i.token(exp=[NOW() + 300]), "the exp claim is not a number", id="exp-list"),
    pytest.param(lambda i: i.token(nbf="0"), "the nbf claim is not a number", id="nbf-string"),
    pytest.param(lambda i: i.token(iat=False), "the iat claim is not a number", id="iat-bool"),
    pytest.param(lambda i: sign_es256(i.key, {"alg": "ES256", "kid": i.kid}, '{"exp": Infinity}'),
                 "the token's claims are not JSON", id="exp-infinity"),
    pytest.param(lambda i: i.token(sub=42), "the sub claim is not a string", id="sub-number"),
    # the signature algorithm
    pytest.param(lambda i: f"{b64({'alg': 'none', 'typ': 'at+jwt', 'kid': i.kid})}.{b64(claims())}.",
                 "the token's signature algorithm is not accepted", id="alg-none"),
    pytest.param(lambda i: f"{b64({'alg': 'None', 'kid': i.kid})}.{b64(claims())}.",
                 "the token's signature algorithm is not accepted", id="alg-None"),
    pytest.param(lambda i: f"{b64({'kid': i.kid})}.{b64(claims())}.", "the token's signature algorithm is not accepted",
                 id="no-alg"),
    pytest.param(lambda i: f"{b64({'alg': ['ES256'], 'kid': i.kid})}.{b64(claims())}.x",
                 "the token's signature algorithm is not accepted", id="alg-list"),
    pytest.param(hs256_with_public_key, "the token's signature algorithm is not accepted", id="hs256-alg-confusion"),
    pytest.param(lambda i: i.token(header={"alg": "PS256"}, key=other_keys()["rsa"]),
                 "the token's signature algorithm is not accepted", id="not-advertised-alg"),
    # the signature
    pytest.param(lambda i: i.token(header={"alg": "RS256"}, key=other_keys()["rsa"]),
                 "the token's signature is invalid", id="rs256-other-key-same-kid"),
    pytest.param(lambda i: i.token(key=other_keys()["ec"]), "the token's signature is invalid",
                 id="es256-other-key-same-kid"),
    pytest.param(lambda i: (lambda t: t[:-4] + ("BBBB" if t.endswith("AAAA") else "AAAA"))(i.token()),
                 "the token's signature is invalid", id="signature-altered"),
    pytest.param(lambda i: i.token().rsplit(".", 1)[0] + ".", "the token's signature is invalid",
                 id="signature-stripped"),
    pytest.param(lambda i: (lambda t: t[0] + "." + b64(claims(sub="mallory")) + "." + t[2])(i.token().split(".")),
                 "the token's signature is invalid", id="payload-swapped"),
    # the key
    pytest.param(lambda i: i.token(header={"kid": "unknown"}), "the token is signed with an unknown key",
                 id="unknown-kid"),
    pytest.param(lambda i: sign_es256(i.key, {"alg": "ES256"}, claims()), "the token is signed with an unknown key",
                 id="no-kid"),
    pytest.param(lambda i: sign_es256(i.key, {"alg": "ES256", "kid": 1}, claims()), "the token's kid is malformed",
                 id="kid-number"),
    pytest.param(lambda i: sign_es256(i.key, {"alg": "ES256", "kid": "k" * 257}, claims()),
                 "the token's kid is malformed", id="kid-too-long"),
    pytest.param(lambda i: attacker_with_embedded_jwk(i, "jwk"), "the token's signature is invalid",
                 id="embedded-jwk-ignored"),
    pytest.param(lambda i: attacker_with_embedded_jwk(i, "jku"), "the token's signature is invalid",
                 id="jku-ignored"),
    pytest.param(lambda i: attacker_with_embedded_jwk(i, "x5u"), "the token's signature is invalid",
                 id="x5u-ignored"),
    # typ and crit
    pytest.param(lambda i: i.token(header={"typ": "dpop+jwt"}), "the token's typ is not an access token's",
                 id="typ-dpop"),
    pytest.param(lambda i: i.token(header={"typ": "logout+jwt"}), "the token's typ is not an access token's",
                 id="typ-logout"),
    pytest.param(lambda i: sign_es256(i.key, {"alg": "ES256", "kid": i.kid, "typ": 1}, claims()),
                 "the token's typ is not an access token's", id="typ-number"),
    pytest.param(lambda i: sign_es256(i.key, {"alg": "ES256", "kid": i.kid, "crit": ["exp"], "exp": 1}, claims()),
                 "the token has critical header parameters this server does not understand", id="crit"),
    pytest.param(lambda i: sign_es256(i.key, {"alg": "ES256", "kid": i.kid, "crit": []}, claims()),
                 "the token has critical header parameters this server does not understand", id="crit-empty"),
    # structure
    pytest.param(lambda i: "garbage.garbage.garbage", "the token's header is not valid base64url JSON",
                 id="three-segments-of-garbage"),
    pytest.param(lambda i: "a.b.c", "the token's header is not valid base64url JSON", id="one-char-segments"),
    pytest.param(lambda i: f"{b64('not json')}.{b64(claims())}.c2ln", "the token's header is not valid base64url JSON",
                 id="header-not-json"),
    pytest.param(lambda i: b64(b'{"alg": NaN}') + ".e30.c2ln", "the token's header is not valid base64url JSON",
                 id="header-nan"),
    pytest.param(lambda i: b64(b"\xff\xfe") + ".e30.c2ln", "the token's header is not valid base64url JSON",
                 id="header-not-utf8"),
    pytest.param(lambda i: f"{b64(['ES256'])}.{b64(claims())}.c2ln", "the token's header is not a JSON object",
                 id="header-json-list"),
    pytest.param(lambda i: b64('"ES256"') + ".e30.c2ln", "the token's header is not a JSON object",
                 id="header-json-string"),
    pytest.param(lambda i: sign_es256(i.key, {"alg": "ES256", "kid": i.kid}, "not json"),
                 "the token's claims are not JSON", id="signed-payload-not-json"),
    pytest.param(lambda i: sign_es256(i.key, {"alg": "ES256", "kid": i.kid}, [claims()]),
                 "the token's claims are not a JSON object", id="signed-payload-list"),
    pytest.param(lambda i: i.token() + ".x", "the access token is not a JWT", id="four-segments"),
    pytest.param(lambda i: i.token().rsplit(".", 1)[0], "the access token is not a JWT", id="two-segments"),
    pytest.param(lambda i: "opaque-token", "the access token is not a JWT", id="opaque"),
]


@pytest.mark.parametrize(("make_token", "description"), BAD_TOKENS)
def test_bad_tokens_are_401_invalid_token(
    make_token: Token, description: str, issuer: TestIssuer, make_client: MakeClient
) -> None:
    app = CountingApp()
    response = make_client(app, proof_of_possession_mtls="off").get("/", headers=bearer(make_token(issuer)))
    assert response.status_code == 401, response.get_data(as_text=True)
    assert response.json == {"error": "invalid_token", "error_description": description}
    assert response.headers["WWW-Authenticate"] == (
        f'Bearer realm="api", error="invalid_token", error_description="{description}"'
    )
    assert app.calls == []


GOOD_TOKENS: list[Any] = [
    pytest.param(lambda i: i.token(), id="at+jwt"),
    pytest.param(lambda i: i.token(header={"typ": "JWT"}), id="typ-JWT"),
    pytest.param(lambda i: i.token(header={"typ": "jwt"}), id="typ-jwt-lower"),
    pytest.param(lambda i: i.token(header={"typ": "application/at+jwt"}), id="typ-media-type"),
    pytest.param(lambda i: i.token(header={"typ": "AT+JWT"}), id="typ-upper"),
    pytest.param(lambda i: sign_es256(i.key, {"alg": "ES256", "kid": i.kid}, claims()), id="no-typ"),
    pytest.param(lambda i: i.token(aud=["https://other.test", AUDIENCE]), id="aud-list-containing-ours"),
    pytest.param(lambda i: i.token(aud=[5, AUDIENCE]), id="aud-list-with-junk"),
    pytest.param(lambda i: i.token(exp=1e308), id="exp-huge-float"),
    pytest.param(lambda i: i.token(exp=NOW() + 300.5, nbf=NOW() - 1.5, iat=NOW() + 0.0), id="float-times"),
    pytest.param(lambda i: i.token(nbf=NOW()), id="nbf-now"),
    pytest.param(lambda i: i.token(iat=None), id="no-iat"),
    pytest.param(lambda i: i.token(sub=None), id="no-sub"),
    pytest.param(lambda i: i.token(header={"jku": "https://attacker.test/keys"}), id="jku-from-issuer-ignored"),
    pytest.param(lambda i: i.token(header={"x5u": "https://attacker.test/cert"}), id="x5u-from-issuer-ignored"),
    pytest.param(lambda i: i.token(header={"jwk": other_keys()["ec"].as_dict(private=False)}),
                 id="jwk-from-issuer-ignored"),
]


@pytest.mark.parametrize("make_token", GOOD_TOKENS)
def test_good_tokens(make_token: Token, issuer: TestIssuer, make_client: MakeClient) -> None:
    response = make_client(proof_of_possession_mtls="off").get("/", headers=bearer(make_token(issuer)))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json is not None
    assert response.json["claims"]["iss"] == ISSUER


@pytest.mark.parametrize(
    "claim",
    [pytest.param("exp", id="exp"), pytest.param("nbf", id="nbf"), pytest.param("iat", id="iat")],
)
def test_integer_too_large_for_a_float(claim: str, issuer: TestIssuer, make_client: MakeClient) -> None:
    huge: dict[str, Any] = {claim: 10**400}
    response = make_client(proof_of_possession_mtls="off").get("/", headers=bearer(issuer.token(**huge)))
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("leeway", "overrides", "status"),
    [
        pytest.param(0, {"exp": -10}, 401, id="no-leeway-expired"),
        pytest.param(30, {"exp": -10}, 200, id="expired-inside-leeway"),
        pytest.param(30, {"exp": -40}, 401, id="expired-beyond-leeway"),
        pytest.param(30, {"nbf": 10}, 200, id="nbf-inside-leeway"),
        pytest.param(30, {"nbf": 60}, 401, id="nbf-beyond-leeway"),
        pytest.param(30, {"iat": 10}, 200, id="iat-inside-leeway"),
        pytest.param(30, {"iat": 60}, 401, id="iat-beyond-leeway"),
        pytest.param(0, {"nbf": 10}, 401, id="no-leeway-nbf"),
    ],
)
def test_leeway(
    leeway: int, overrides: dict[str, int], status: int, issuer: TestIssuer, make_client: MakeClient
) -> None:
    now = NOW()
    times: dict[str, Any] = {name: now + delta for name, delta in overrides.items()}
    token = issuer.token(**times)
    response = make_client(proof_of_possession_mtls="off", leeway=leeway).get("/", headers=bearer(token))
    assert response.status_code == status


# -- every algorithm, and the JWK's limits on its key ------------------------------------------------------------------


def _ec(crv: str) -> Callable[[], Any]:
    return lambda: ECKey.generate_key(crv, private=True)


def _rsa() -> Any:
    return RSAKey.generate_key(2048, private=True)


def _okp(crv: str) -> Callable[[], Any]:
    return lambda: OKPKey.generate_key(crv, private=True)


def _raw_signed(token: str, key: Any) -> str:
    """The token's header and claims signed by ``key`` as the header's algorithm never would: ECDSA with SHA-256
    on whatever curve ``key`` is (R || S at that curve's size), or Ed448 where Ed25519 is named."""
    head = token.rpartition(".")[0].encode()
    private = key.private_key
    if isinstance(private, ec.EllipticCurvePrivateKey):
        size = (private.curve.key_size + 7) // 8
        r, s = decode_dss_signature(private.sign(head, ec.ECDSA(hashes.SHA256())))
        return f"{head.decode()}.{b64(r.to_bytes(size) + s.to_bytes(size))}"
    return f"{head.decode()}.{b64(private.sign(head))}"


def _der_signature(token: str) -> str:
    """The token with its raw R || S signature re-encoded as DER, as cryptography writes it (RFC 7518 section 3.4
    wants R || S: a DER signature is refused, whatever it says)."""
    head, _, raw = token.rpartition(".")
    signature = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    half = len(signature) // 2
    der = encode_dss_signature(int.from_bytes(signature[:half]), int.from_bytes(signature[half:]))
    return f"{head}.{b64(der)}"


SIGNED: list[Any] = [
    # RFC 7518 section 3.4: ECDSA on each curve; section 3.3: PKCS #1 v1.5; section 3.5: PSS; RFC 8037: EdDSA.
    pytest.param(_ec("P-256"), "ES256", {}, None, None, id="ES256"),
    pytest.param(_ec("P-384"), "ES384", {}, None, None, id="ES384"),
    pytest.param(_ec("P-521"), "ES512", {}, None, None, id="ES512"),
    pytest.param(_rsa, "RS256", {}, None, None, id="RS256"),
    pytest.param(_rsa, "RS384", {}, None, None, id="RS384"),
    pytest.param(_rsa, "RS512", {}, None, None, id="RS512"),
    pytest.param(_rsa, "PS256", {}, None, None, id="PS256"),
    pytest.param(_rsa, "PS384", {}, None, None, id="PS384"),
    pytest.param(_rsa, "PS512", {}, None, None, id="PS512"),
    pytest.param(_okp("Ed25519"), "EdDSA", {}, None, None, id="EdDSA-Ed25519"),
    pytest.param(_okp("Ed448"), "EdDSA", {}, None, None, id="EdDSA-Ed448"),
    pytest.param(_okp("Ed25519"), "Ed25519", {}, None, None, id="Ed25519"),
    # The JWK's own limits (RFC 7517 sections 4.2 to 4.4) and the algorithm's key type and curve.
    pytest.param(_rsa, "PS256", {"alg": "RS256"}, None, "the token's signature is invalid", id="jwk-alg-other"),
    pytest.param(_ec("P-256"), "ES256", {"alg": "ES256"}, None, None, id="jwk-alg-same"),
    pytest.param(_ec("P-256"), "ES256", {"key_ops": ["verify"]}, None, None, id="key-ops-verify"),
    pytest.param(_ec("P-256"), "ES256", {"key_ops": ["sign"]}, None, "the token's signature is invalid",
                 id="key-ops-without-verify"),
    pytest.param(_ec("P-256"), "ES256", {"use": "sig"}, None, None, id="use-sig"),
    pytest.param(_ec("P-384"), "ES256", {}, _raw_signed, "the token's signature is invalid", id="ES256-with-P-384-key"),
    pytest.param(_okp("Ed448"), "Ed25519", {}, _raw_signed, "the token's signature is invalid",
                 id="Ed25519-with-Ed448-key"),
    pytest.param(_okp("X25519"), "EdDSA", {}, str, "the token's signature is invalid", id="EdDSA-with-X25519-key"),
    pytest.param(_ec("P-256"), "ES256", {}, _der_signature, "the token's signature is invalid", id="ES256-DER"),
]


@pytest.mark.parametrize(("make_key", "alg", "jwk_members", "alter", "refusal"), SIGNED)
def test_every_algorithm_verifies_with_its_key_only(
    make_key: Callable[[], Any], alg: str, jwk_members: dict[str, Any], alter: Callable[..., str] | None,
    refusal: str | None, issuer: TestIssuer,
) -> None:
    key = make_key()
    issuer.metadata["id_token_signing_alg_values_supported"] = [alg]
    public = {**key.as_dict(private=False), "kid": issuer.kid, **jwk_members}
    issuer.jwks = lambda: {"keys": [public]}  # type: ignore[method-assign]
    # joserfc signs only with a key that fits the algorithm: a misfit signs with a fitting key, then is re-signed.
    signing = {"P-384": ECKey.generate_key("P-256", private=True), "X25519": OKPKey.generate_key("Ed25519"),
               "Ed448": OKPKey.generate_key("Ed25519")}.get(getattr(key, "curve_name", ""), key) if alter else key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joserfc: "EdDSA is deprecated via RFC 9864"
        token = issuer.token(header={"alg": alg}, key=signing)
    if alter is _raw_signed:
        token = _raw_signed(token, key)
    elif alter is not None:
        token = alter(token)
    v, _ = validator(issuer)
    if refusal is None:
        assert v.validate(token)["sub"] == "alice"
        return
    with pytest.raises(InvalidToken) as info:
        v.validate(token)
    assert info.value.description == refusal
    assert v.memo_size() == 0


def test_a_header_is_parsed_once_and_checked_again_each_time(issuer: TestIssuer) -> None:
    """A remembered header still meets the allow-list as it is now, not as it was."""
    v, discovery = validator(issuer, rediscovery_lifetime=0)
    v.validate(issuer.token(jti="1"))
    jwk = {name: value for name, value in issuer.key.as_dict(private=False).items() if name != "alg"}
    issuer.jwks = lambda: {"keys": [jwk]}  # type: ignore[method-assign]
    issuer.metadata["id_token_signing_alg_values_supported"] = ["RS256"]
    discovery.refresh(force=True)
    with pytest.raises(InvalidToken) as info:
        v.validate(issuer.token(jti="2"))
    assert info.value.description == "the token's signature algorithm is not accepted"


# -- the memo ---------------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def validator(issuer: TestIssuer, clock: Clock | None = None, **overrides: Any) -> tuple[JWTValidator, StaticDiscovery]:
    s = make_settings(**overrides)
    discovery = StaticDiscovery(s, issuer)
    return JWTValidator(discovery, issuer=s.issuer, audience=s.audience, leeway=s.leeway,
                        signing_algs=s.token_signing_algs, memo_size=s.token_cache_size,
                        clock=clock or time.time), discovery


def test_second_validation_does_not_verify_again(issuer: TestIssuer) -> None:
    v, discovery = validator(issuer, rediscovery_lifetime=0)
    token = issuer.token()
    first = v.validate(token)
    assert v.memo_size() == 1
    # Rotate: the token's key is gone from the JWKS, so verifying it again would fail.
    issuer.rotate("k2")
    discovery.refresh(force=True)
    with pytest.raises(InvalidToken):
        validator(issuer)[0].validate(token)
    assert v.validate(token) == first
    assert discovery.fetches == 2


def test_expired_memo_entry_is_dropped(issuer: TestIssuer) -> None:
    clock = Clock()
    v, _ = validator(issuer, clock)
    token = issuer.token(exp=int(clock.now) + 60)
    v.validate(token)
    assert v.memo_size() == 1
    clock.now += 61
    with pytest.raises(InvalidToken, match="expired"):
        v.validate(token)
    assert v.memo_size() == 0


def test_memo_honours_leeway(issuer: TestIssuer) -> None:
    clock = Clock()
    v, _ = validator(issuer, clock, leeway=30)
    token = issuer.token(exp=int(clock.now) + 60)
    v.validate(token)
    clock.now += 80
    assert v.validate(token)["sub"] == "alice"
    clock.now += 20
    with pytest.raises(InvalidToken):
        v.validate(token)


@pytest.mark.parametrize(
    ("size", "tokens", "kept"),
    [
        pytest.param(1, 3, 1, id="size-1"),
        pytest.param(3, 5, 3, id="size-3"),
        pytest.param(10, 4, 4, id="not-full"),
    ],
)
def test_memo_is_bounded(size: int, tokens: int, kept: int, issuer: TestIssuer) -> None:
    v, discovery = validator(issuer, token_cache_size=size, rediscovery_lifetime=0)
    minted = [issuer.token(jti=str(n)) for n in range(tokens)]
    for token in minted:
        v.validate(token)
    assert v.memo_size() == kept
    # The newest are the ones remembered: they still validate once their key is gone, the oldest do not.
    issuer.rotate("k2")
    discovery.refresh(force=True)
    assert v.validate(minted[-1])["jti"] == str(tokens - 1)
    if tokens > size:
        with pytest.raises(InvalidToken):
            v.validate(minted[0])


def test_invalid_tokens_are_not_remembered(issuer: TestIssuer) -> None:
    v, _ = validator(issuer)
    with pytest.raises(InvalidToken):
        v.validate(issuer.token(aud="https://other.test"))
    assert v.memo_size() == 0


# -- the issuer down --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fetched_before", "kid"),
    [
        pytest.param(False, "k1", id="never-fetched"),
        pytest.param(True, "k2", id="unknown-kid-after-fetch"),
    ],
)
def test_issuer_down_is_503_with_retry_after(
    fetched_before: bool, kid: str, issuer: TestIssuer, make_client: MakeClient
) -> None:
    app = CountingApp()
    # The keys are fetched as the middleware starts: "never fetched" means the issuer was down then.
    issuer.down = not fetched_before
    client = make_client(app, proof_of_possession_mtls="off", rediscovery_lifetime=0)
    if fetched_before:
        assert client.get("/", headers=bearer(issuer.token())).status_code == 200
    issuer.down = True
    response = client.get("/", headers=bearer(issuer.token(header={"kid": kid})))
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert response.json == {"error": "temporarily_unavailable",
                             "error_description": "the issuer's signing keys cannot be fetched"}
    assert len(app.calls) == (1 if fetched_before else 0)


def test_issuer_down_but_key_cached_still_validates(issuer: TestIssuer) -> None:
    v, discovery = validator(issuer, rediscovery_lifetime=0)
    v.validate(issuer.token(jti="1"))
    issuer.down = True
    discovery.refresh(force=True)
    assert v.validate(issuer.token(jti="2"))["jti"] == "2"
    with pytest.raises(TemporarilyUnavailable):
        v.validate(issuer.token(header={"kid": "k9"}))


# -- hostile tokens ---------------------------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
_CLAIM_VALUE = st.one_of(
    _JSON,
    st.sampled_from([ISSUER, AUDIENCE, [AUDIENCE], 0, -1, 2**63, -(2**63), 1e308, -1e308, 1e-308]),
    st.integers(min_value=int(time.time()) - 1000, max_value=int(time.time()) + 1000),
)
_HEADER = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["ES256", "RS256", "HS256", "none", "", "es256"]) | _JSON,
        "kid": st.sampled_from(["k1", "k2", ""]) | _JSON,
        "typ": st.sampled_from(["at+jwt", "JWT", "dpop+jwt"]) | _JSON,
        "crit": _JSON,
        "jwk": _JSON,
    },
)
_CLAIMS = st.fixed_dictionaries(
    {},
    optional={name: _CLAIM_VALUE for name in ("iss", "aud", "exp", "nbf", "iat", "sub", "cnf", "scope")},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_HEADER, payload=_CLAIMS)
def test_signed_hostile_tokens_are_valid_or_invalid_token(
    header: dict[str, Any], payload: dict[str, Any], issuer: TestIssuer
) -> None:
    v, _ = validator(issuer)
    token = sign_es256(issuer.key, header, payload)
    try:
        result = v.validate(token)
    except InvalidToken:
        return
    assert header.get("alg") == "ES256" and header.get("kid") == "k1"
    assert result["iss"] == ISSUER


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    token=st.one_of(
        st.text(),
        st.lists(st.text(alphabet="ABCDEFabcdef0123456789-_=+/", max_size=20), min_size=3, max_size=3).map(".".join),
        st.tuples(_JSON, _JSON).map(lambda t: f"{b64(json.dumps(t[0]))}.{b64(json.dumps(t[1]))}.c2ln"),
    )
)
def test_unsigned_hostile_tokens_are_invalid(token: str, issuer: TestIssuer) -> None:
    v, _ = validator(issuer)
    with pytest.raises(InvalidToken):
        v.validate(token)


def test_rsa_key_in_jwks_with_rs256(
    issuer: TestIssuer, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    rsa = RSAKey.generate_key(2048, parameters={"kid": "r1", "alg": "RS256", "use": "sig"}, private=True)
    monkeypatch.setattr(issuer, "jwks", lambda: {"keys": [issuer.key.as_dict(private=False),
                                                            rsa.as_dict(private=False)]})
    client = make_client(proof_of_possession_mtls="off")
    rs256 = issuer.token(header={"alg": "RS256", "kid": "r1"}, key=rsa)
    assert client.get("/", headers=bearer(rs256)).status_code == 200
    # The RSA key cannot vouch for an ES256 token that names it.
    forged = issuer.token(header={"kid": "r1"})
    response = client.get("/", headers=bearer(forged))
    assert response.status_code == 401
    assert response.json == {"error": "invalid_token", "error_description": "the token's signature is invalid"}
