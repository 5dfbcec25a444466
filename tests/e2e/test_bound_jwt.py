"""Certificate-bound JWTs end to end: client -> nginx (mTLS) -> gunicorn/uWSGI -> middleware -> echo app.

Tokens come from a real oidc-provider over mutual TLS; requests are real HTTPS
requests with real client certificates.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import quote

import pytest

from certbound_wsgi.binding import CERT_MISSING, CLAIM_MISSING, THUMBPRINT_MISMATCH
from tests.support.idp import OidcProvider, x5t_s256

from .conftest import Stack, StackFactory, foreign_key, mint

UPSTREAMS = [pytest.param("gunicorn", id="gunicorn"), pytest.param("uwsgi", id="uwsgi")]


def assert_refused(response, description: str, status: int = 401, error: str = "invalid_token") -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="api"'), challenge
    assert f'error="{error}"' in challenge
    assert response.json() == {"error": error, "error_description": description}


@pytest.fixture(params=UPSTREAMS)
def strict(request: pytest.FixtureRequest, stacks: StackFactory, idp: OidcProvider) -> Stack:
    return stacks(idp, request.param)


@pytest.fixture
def optional(stacks: StackFactory, idp: OidcProvider) -> Stack:
    return stacks(idp, "gunicorn", proof_of_possession_mtls="optional")


@pytest.fixture(scope="module")
def alice_token(idp: OidcProvider) -> str:
    return idp.token("bound")


# -- strict mode (the default) -------------------------------------------------

def test_legit_request_passes(strict: Stack, idp: OidcProvider, pki, alice_token: str) -> None:  # type: ignore[no-untyped-def]
    response = strict.call(alice_token, pki.alice)
    assert response.status_code == 200, response.text
    echoed = response.json()
    assert echoed["thumbprint"] == x5t_s256(pki.alice)
    assert echoed["claims"]["cnf"]["x5t#S256"] == x5t_s256(pki.alice)
    assert echoed["claims"]["iss"] == idp.issuer
    assert echoed["remote_user"] == echoed["claims"]["sub"]
    assert "Authorization" not in echoed["headers"]


def test_stolen_token_with_another_certificate(strict: Stack, pki, alice_token: str) -> None:  # type: ignore[no-untyped-def]
    assert_refused(strict.call(alice_token, pki.mallory), THUMBPRINT_MISMATCH)


def test_stolen_token_without_certificate(strict: Stack, alice_token: str) -> None:
    assert_refused(strict.call(alice_token), CERT_MISSING)


def test_missing_token_gets_bare_challenge(strict: Stack, pki) -> None:  # type: ignore[no-untyped-def]
    response = strict.call(None, pki.alice)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert response.json()["error"] == "unauthorized"


@pytest.mark.parametrize(
    ("header", "use_mallory", "description"),
    [
        pytest.param("X-SSL-Client-Cert", False, CERT_MISSING, id="header-without-tls-cert"),
        pytest.param("X-SSL-Client-Cert", True, THUMBPRINT_MISMATCH, id="header-over-mallory-cert"),
        pytest.param("X-SSL_Client_Cert", False, CERT_MISSING, id="underscore-variant"),
        pytest.param("SSL-Client-Cert", False, CERT_MISSING, id="uwsgi-var-lookalike"),
    ],
)
def test_forged_certificate_header_is_ignored(strict: Stack, pki, alice_token: str, header: str,  # type: ignore[no-untyped-def]
                                              use_mallory: bool, description: str) -> None:
    # Mallory stole alice's token and her (public) certificate, and sends the
    # certificate in the header nginx forwards. nginx overwrites or drops it.
    forged = {header: quote(pki.alice.cert_pem, safe="")}
    response = strict.call(alice_token, pki.mallory if use_mallory else None, headers=forged)
    assert_refused(response, description)


def test_unbound_token_refused_in_strict_mode(strict: Stack, idp: OidcProvider, pki) -> None:  # type: ignore[no-untyped-def]
    token = idp.token("unbound")
    assert_refused(strict.call(token, pki.alice), CLAIM_MISSING)


@pytest.mark.parametrize(
    ("claims", "header", "description"),
    [
        pytest.param({"exp": 1_000_000_000, "iat": 999_999_000}, {}, "the token has expired", id="expired"),
        pytest.param({"aud": "https://elsewhere.test"}, {}, "the token is not meant for this audience", id="wrong-aud"),
        pytest.param({"iss": "https://evil.test"}, {}, "the token was issued by another issuer", id="wrong-iss"),
        pytest.param({"nbf": 4_000_000_000}, {}, "the token is not valid yet", id="not-yet-valid"),
        pytest.param({}, {"typ": "dpop+jwt"}, "the token's typ is not an access token's", id="wrong-typ"),
    ],
)
def test_invalid_claims_refused(strict: Stack, idp: OidcProvider, pki, claims, header, description) -> None:  # type: ignore[no-untyped-def]
    token = mint(idp, header=header, cnf={"x5t#S256": x5t_s256(pki.alice)}, **claims)
    assert_refused(strict.call(token, pki.alice), description)


def test_alg_none_refused(strict: Stack, idp: OidcProvider, pki, alice_token: str) -> None:  # type: ignore[no-untyped-def]
    _, payload, _ = alice_token.split(".")
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "at+jwt"}).encode()).rstrip(b"=").decode()
    assert_refused(strict.call(f"{header}.{payload}.", pki.alice), "the token's signature algorithm is not accepted")


def test_token_signed_by_unknown_key_refused(strict: Stack, idp: OidcProvider, pki) -> None:  # type: ignore[no-untyped-def]
    token = mint(idp, key=foreign_key(), cnf={"x5t#S256": x5t_s256(pki.alice)})
    assert_refused(strict.call(token, pki.alice), "the token is signed with an unknown key")


def test_token_signed_by_other_key_with_the_idps_kid_refused(strict: Stack, idp: OidcProvider, pki) -> None:  # type: ignore[no-untyped-def]
    token = mint(idp, key=foreign_key(idp.kid), cnf={"x5t#S256": x5t_s256(pki.alice)})
    assert_refused(strict.call(token, pki.alice), "the token's signature is invalid")


# -- optional mode --------------------------------------------------------------

def test_optional_mode_lets_unbound_token_through(optional: Stack, idp: OidcProvider) -> None:
    response = optional.call(idp.token("unbound"))
    assert response.status_code == 200, response.text
    assert "cnf" not in response.json()["claims"]


def test_optional_mode_still_checks_bound_token_without_certificate(optional: Stack, alice_token: str) -> None:
    # Stricter than Kong: a bound token is always checked.
    assert_refused(optional.call(alice_token), CERT_MISSING)


def test_optional_mode_checks_bound_token_against_certificate(optional: Stack, pki, alice_token: str) -> None:  # type: ignore[no-untyped-def]
    assert optional.call(alice_token, pki.alice).status_code == 200
    assert_refused(optional.call(alice_token, pki.mallory), THUMBPRINT_MISMATCH)


# -- the header path, bypassing nginx -------------------------------------------

def test_garbage_certificate_value_is_401_not_500(stacks: StackFactory, idp: OidcProvider, alice_token: str) -> None:
    stack = stacks(idp, "gunicorn")
    for garbage in ("garbage", "%ZZ%", quote("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----")):
        # With the proxy secret, as nginx sends it: the value is believed, then refused as unparseable.
        response = stack.direct(alice_token, {"X-SSL-Client-Cert": garbage}, secret=True)
        assert_refused(response, "the client certificate could not be parsed")


def test_header_from_untrusted_peer_is_ignored(stacks: StackFactory, idp: OidcProvider, pki, alice_token: str) -> None:  # type: ignore[no-untyped-def]
    # Loopback is not a trusted proxy here, so alice's certificate in the header counts for nothing,
    # even with the secret: with both configured, both must hold.
    stack = stacks(idp, "gunicorn", trusted_proxies="10.0.0.0/8")
    response = stack.direct(alice_token, {"X-SSL-Client-Cert": quote(pki.alice.cert_pem, safe="")}, secret=True)
    assert_refused(response, CERT_MISSING)
    trusted = stacks(idp, "gunicorn").direct(alice_token, {"X-SSL-Client-Cert": quote(pki.alice.cert_pem, safe="")},
                                             secret=True)
    assert trusted.status_code == 200
