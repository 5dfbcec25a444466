"""The test identity provider (oidc-provider via tests/idp/launcher.mjs) does what the suite relies on."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError
from joserfc.jwk import ECKey, KeySet

from certbound_wsgi.devpki import self_signed_client
from tests.support import idp_fixtures
from tests.support.idp import API_RESOURCE, OPAQUE_RESOURCE, OidcProvider, decode_jwt, x5t_s256
from tests.support.idp_fixtures import Pki

pytestmark = pytest.mark.e2e

# The fixtures a conftest would import; bound here by assignment, which keeps
# ruff from reading every test argument as a redefined import.
pki = idp_fixtures.pki
idp = idp_fixtures.idp


def verified_claims(provider: OidcProvider, token: str) -> dict[str, Any]:
    """The claims of ``token`` once its signature checks out against the provider's JWKS."""
    keys = KeySet.import_key_set(provider.jwks())  # type: ignore[arg-type]
    return dict(jwt.decode(token, keys, algorithms=["ES256"]).claims)


def dpop_proof(key: ECKey, url: str, method: str = "POST") -> str:
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)}
    claims = {"htm": method, "htu": url, "iat": int(time.time()), "jti": uuid.uuid4().hex}
    return jwt.encode(header, claims, key, algorithms=["ES256"])


# ----- tokens --------------------------------------------------------------


def test_bound_token_is_an_es256_at_jwt_bound_to_the_client_certificate(idp: OidcProvider, pki: Pki) -> None:
    token = idp.token("bound", cert=pki.alice)
    header, _ = decode_jwt(token)
    assert header["alg"] == "ES256"
    assert header["typ"] == "at+jwt"
    assert header["kid"] == idp.kid
    claims = verified_claims(idp, token)
    assert claims["cnf"] == {"x5t#S256": x5t_s256(pki.alice)}
    assert claims["aud"] == API_RESOURCE
    assert claims["iss"] == idp.issuer
    assert claims["client_id"] == "bound"
    assert claims["sub"] == "bound"
    assert isinstance(claims["exp"], int) and claims["exp"] - claims["iat"] == 600


def test_second_bound_client_gets_tokens_bound_to_its_own_certificate(idp: OidcProvider, pki: Pki) -> None:
    _, claims = decode_jwt(idp.token("bound2", cert=pki.mallory))
    assert claims["cnf"]["x5t#S256"] == x5t_s256(pki.mallory)
    assert claims["cnf"]["x5t#S256"] != x5t_s256(pki.alice)
    assert claims["client_id"] == "bound2"


@pytest.mark.parametrize("who", ["nobody", "mallory"])
def test_bound_client_needs_its_registered_certificate(idp: OidcProvider, pki: Pki, who: str) -> None:
    response = idp.token_response("bound", cert=pki.mallory if who == "mallory" else None)
    if who == "nobody":
        # token_response defaults to the registered certificate; send none at all.
        response = idp._post("/token", data={"grant_type": "client_credentials", "client_id": "bound"})
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_unbound_token_has_no_cnf_even_when_a_certificate_is_presented(idp: OidcProvider, pki: Pki) -> None:
    for cert in (None, pki.alice):
        claims = verified_claims(idp, idp.token("unbound", cert=cert))
        assert "cnf" not in claims
        assert claims["client_id"] == "unbound"
        assert claims["aud"] == API_RESOURCE


def test_resource_defaults_to_api_test_and_any_https_api_resource_is_its_own_audience(idp: OidcProvider) -> None:
    assert decode_jwt(idp.token("unbound", resource=None))[1]["aud"] == "https://api.test"
    assert (
        decode_jwt(idp.token("unbound", resource="https://api.other.test/v1"))[1]["aud"] == "https://api.other.test/v1"
    )
    response = idp.token_response("unbound", resource="https://elsewhere.test")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_target"


def test_scope_is_limited_to_what_the_resource_server_offers(idp: OidcProvider) -> None:
    response = idp.token_response("unbound", scope="read")
    assert response.json()["scope"] == "read"
    assert decode_jwt(response.json()["access_token"])[1]["scope"] == "read"
    assert "scope" not in decode_jwt(idp.token("unbound"))[1]


def test_dpop_proof_gives_a_dpop_bound_token(idp: OidcProvider) -> None:
    key = ECKey.generate_key("P-256", private=True)
    response = idp.token_response("unbound", dpop=dpop_proof(key, idp.token_endpoint))
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "DPoP"
    assert decode_jwt(response.json()["access_token"])[1]["cnf"] == {"jkt": key.thumbprint()}


def test_discovery_advertises_mtls_bound_tokens_and_the_rfc8414_alias(idp: OidcProvider) -> None:
    metadata = idp.discovery()
    assert metadata["issuer"] == idp.issuer
    assert metadata["tls_client_certificate_bound_access_tokens"] is True
    assert metadata["token_endpoint"] == idp.token_endpoint
    assert metadata["introspection_endpoint"] == idp.introspection_endpoint
    assert metadata["jwks_uri"] == idp.jwks_uri
    assert "self_signed_tls_client_auth" in metadata["token_endpoint_auth_methods_supported"]
    assert "ES256" in metadata["dpop_signing_alg_values_supported"]
    assert idp._get("/.well-known/oauth-authorization-server").json() == metadata


# ----- introspection, revocation, counters -----------------------------------


def test_jwt_introspects_as_active_with_its_binding(idp: OidcProvider, pki: Pki) -> None:
    token = idp.token("bound", cert=pki.alice)
    _, claims = decode_jwt(token)
    result = idp.introspect(token)
    assert result["active"] is True
    assert result["client_id"] == "bound"
    assert result["aud"] == API_RESOURCE
    assert result["jti"] == claims["jti"]
    assert result["exp"] == claims["exp"]
    assert result["cnf"] == {"x5t#S256": x5t_s256(pki.alice)}
    assert result["token_type"] == "Bearer"


def test_altered_jwt_and_unknown_tokens_introspect_as_inactive(idp: OidcProvider, pki: Pki) -> None:
    token = idp.token("bound", cert=pki.alice)
    header, payload, signature = token.split(".")
    tampered = f"{header}.{payload}.{signature[:-4]}AAAA"
    assert idp.introspect(tampered) == {"active": False}
    assert idp.introspect("not-a-token") == {"active": False}


def test_only_the_resource_server_or_the_token_owner_may_introspect(idp: OidcProvider, pki: Pki) -> None:
    token = idp.token("bound", cert=pki.alice)
    assert idp.introspect(token, client="unbound") == {"active": False}
    own = idp.token("unbound")
    assert idp.introspect(own, client="unbound")["active"] is True


def test_opaque_token_introspects_as_active(idp: OidcProvider, pki: Pki) -> None:
    token = idp.token("unbound", resource=OPAQUE_RESOURCE)
    assert token.count(".") == 0  # not a JWT
    result = idp.introspect(token)
    assert result["active"] is True
    assert result["aud"] == OPAQUE_RESOURCE
    assert result["client_id"] == "unbound"
    bound = idp.introspect(idp.token("bound", cert=pki.alice, resource=OPAQUE_RESOURCE))
    assert bound["active"] is True
    assert bound["cnf"] == {"x5t#S256": x5t_s256(pki.alice)}


@pytest.mark.parametrize("resource", [API_RESOURCE, OPAQUE_RESOURCE])
def test_revoked_token_introspects_as_inactive(idp: OidcProvider, resource: str) -> None:
    token = idp.token("unbound", resource=resource)
    assert idp.introspect(token)["active"] is True
    idp.revoke(token)
    assert idp.introspect(token) == {"active": False}


def test_counters_count_token_and_introspection_requests(idp: OidcProvider, pki: Pki) -> None:
    idp.reset_stats()
    assert idp.stats() == {"tokens": 0, "introspections": 0, "revocations": 0}
    token = idp.token("bound", cert=pki.alice)
    opaque = idp.token("unbound", resource=OPAQUE_RESOURCE)
    idp.introspect(token)
    idp.introspect(opaque)
    idp.introspect(opaque)
    assert idp.stats() == {"tokens": 2, "introspections": 3, "revocations": 0}
    idp.reset_stats()
    assert idp.stats()["introspections"] == 0


# ----- a provider of its own: restarts, rotation, tls_client_auth ---------------


@pytest.fixture(scope="module")
def own_idp(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    provider = OidcProvider(
        tmp_path_factory.mktemp("own-idp"),
        ca=pki.ca,
        bound={"bound": pki.alice},
        extra_clients=[{"client_id": "bound-dn", "auth": "tls_client_auth", "subject_dn": "CN=alice", "bound": True}],
        access_token_ttl=120,
    )
    with provider:
        yield provider


def test_tls_client_auth_needs_a_certificate_from_the_ca_with_the_registered_subject(
    own_idp: OidcProvider, pki: Pki, tmp_path: Path
) -> None:
    claims = decode_jwt(own_idp.token("bound-dn", cert=pki.alice))[1]
    assert claims["cnf"] == {"x5t#S256": x5t_s256(pki.alice)}
    assert claims["exp"] - claims["iat"] == 120
    for cert in (pki.mallory, self_signed_client(tmp_path, "alice")):
        response = own_idp.token_response("bound-dn", cert=cert)
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"


def test_restart_with_a_new_key_rotates_the_signing_key_on_the_same_issuer(own_idp: OidcProvider, pki: Pki) -> None:
    issuer = own_idp.issuer
    before = own_idp.token("bound", cert=pki.alice)
    old_kid = decode_jwt(before)[0]["kid"]
    assert [k["kid"] for k in own_idp.jwks()["keys"]] == [old_kid]

    own_idp.restart(new_key=True)
    assert own_idp.issuer == issuer
    after = own_idp.token("bound", cert=pki.alice)
    new_kid = decode_jwt(after)[0]["kid"]
    assert new_kid != old_kid
    assert [k["kid"] for k in own_idp.jwks()["keys"]] == [new_kid]
    assert verified_claims(own_idp, after)["iss"] == issuer
    with pytest.raises(InvalidKeyIdError):  # the old token no longer verifies: its key is gone
        verified_claims(own_idp, before)
    assert own_idp.introspect(before) == {"active": False}  # the provider forgot it, too

    own_idp.restart(new_key=True, keep_old_key=True)
    newest = decode_jwt(own_idp.token("bound", cert=pki.alice))[0]["kid"]
    assert newest not in (old_kid, new_kid)
    assert [k["kid"] for k in own_idp.jwks()["keys"]] == [newest, new_kid]

    own_idp.restart()
    assert decode_jwt(own_idp.token("bound", cert=pki.alice))[0]["kid"] == newest


def test_launcher_is_quiet_and_stops_promptly_on_sigterm(own_idp: OidcProvider) -> None:
    own_idp.token("unbound")
    port = own_idp.port
    started = time.monotonic()
    own_idp.stop()
    assert time.monotonic() - started < 2.0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    lines = own_idp.log.read_text().splitlines()
    assert lines and all(line.startswith("READY ") for line in lines), lines
    own_idp.start()
    assert own_idp.port == port
    assert own_idp.stats()["tokens"] == 0
