"""certbound_wsgi.authenticator: build() wires what the settings enable; the policy returns what it learned."""

from __future__ import annotations

from typing import Any

import pytest

from certbound_wsgi.authenticator import Identity, build
from certbound_wsgi.dpop import NONCE_LIFETIME
from certbound_wsgi.errors import NonceRequired
from tests.conftest import make_settings
from tests.support.dpop import DPoPKey
from tests.support.refusals import Clock
from tests.support.session_options import LOGIN, SESSION
from tests.support.tokens import StaticDiscovery, TestIssuer

HTU = "http://localhost/anything"
SECRET = "authenticator-secret-0123456789abcdef"
INTROSPECTION: dict[str, Any] = {
    "auth_methods": ("introspection",), "client_id": "rs", "client_secret": "client-secret-0123456789abcdef",
}
NONCES: dict[str, Any] = {
    "proof_of_possession_dpop": "optional", "proof_of_possession_mtls": "optional", "dpop_use_nonce": True,
    "cache_secret": SECRET, "public_base_url": "http://localhost",
}


@pytest.mark.parametrize(
    ("overrides", "wired"),
    [
        pytest.param({}, {"jwt"}, id="default-bearer-only"),
        pytest.param(INTROSPECTION, {"introspection"}, id="introspection-only"),
        pytest.param({**INTROSPECTION, "auth_methods": ("bearer", "introspection")}, {"jwt", "introspection"},
                     id="both-validators"),
        pytest.param({"proof_of_possession_dpop": "optional", "public_base_url": "https://api.test"},
                     {"jwt", "dpop"}, id="dpop-optional"),
        pytest.param({"proof_of_possession_dpop": "strict", "public_base_url": "https://api.test"},
                     {"jwt", "dpop"}, id="dpop-strict"),
        pytest.param(SESSION, {"jwt", "sessions"}, id="sessions"),
        pytest.param(LOGIN, {"jwt", "sessions", "login"}, id="sessions-and-login"),
    ],
)
def test_build_wires_only_what_the_settings_enable(overrides: dict[str, Any], wired: set[str],
                                                    issuer: TestIssuer) -> None:
    settings = make_settings(**overrides)
    auth = build(settings, discovery=StaticDiscovery(settings, issuer))
    built = {name for name in ("jwt", "introspection", "dpop", "sessions", "login") if getattr(auth, name) is not None}
    assert built == wired


def test_build_shares_the_given_discovery(issuer: TestIssuer) -> None:
    settings = make_settings(**LOGIN)
    discovery = StaticDiscovery(settings, issuer)
    auth = build(settings, discovery=discovery)
    assert auth.discovery is discovery


@pytest.mark.parametrize(
    ("age", "fresh"),
    [
        pytest.param(None, False, id="nonces-off"),
        pytest.param(0.0, False, id="brand-new"),
        pytest.param(NONCE_LIFETIME * 2 / 3 - 1, False, id="two-thirds-not-yet"),
        pytest.param(NONCE_LIFETIME * 2 / 3 + 1, True, id="past-two-thirds"),
    ],
)
def test_nonce_for_response_takes_the_age(age: float | None, fresh: bool, issuer: TestIssuer) -> None:
    """RFC 9449 section 8.2: a fresh nonce once a third of the client's is left; the age is an argument."""
    settings = make_settings(**NONCES)
    auth = build(settings, discovery=StaticDiscovery(settings, issuer))
    assert auth.dpop is not None
    assert (auth.dpop.nonce_for_response(age) is not None) is fresh


def test_the_nonce_age_is_returned_not_written_into_the_environ(issuer: TestIssuer) -> None:
    clock = Clock()
    settings = make_settings(**NONCES)
    auth = build(settings, discovery=StaticDiscovery(settings, issuer), clock=clock)
    assert auth.dpop is not None
    key = DPoPKey()
    token = issuer.token(cnf={"jkt": key.jkt}, exp=int(clock.now) + 3600)

    def request(nonce: str | None) -> dict[str, Any]:
        return {"REQUEST_METHOD": "GET", "PATH_INFO": "/anything", "HTTP_HOST": "localhost",
                "wsgi.url_scheme": "http", "REMOTE_ADDR": "10.0.0.1", "HTTP_AUTHORIZATION": f"DPoP {token}",
                "HTTP_DPOP": key.proof("GET", HTU, token, nonce=nonce, iat=clock.now)}

    environ = request(None)
    with pytest.raises(NonceRequired) as info:
        auth.authenticate(environ, auth.credentials.read(environ))
    nonce = dict(info.value.headers)["DPoP-Nonce"]

    environ = request(nonce)
    before = dict(environ)
    identity = auth.authenticate(environ, auth.credentials.read(environ))
    assert identity == Identity(identity.claims, token, None, "bearer", None, None)  # a fresh nonce: none sent
    assert environ == before

    clock.advance(NONCE_LIFETIME * 2 / 3 + 5)
    environ = request(nonce)
    before = dict(environ)
    identity = auth.authenticate(environ, auth.credentials.read(environ))
    assert identity.dpop_nonce is not None and identity.dpop_nonce != nonce
    assert environ == before, "no side channel through the environ"
