"""certbound_wsgi.client_keys: our JWKS for private_key_jwt (public members only, ever) and the assertions we sign."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, OKPKey, RSAKey
from werkzeug.test import Client

from certbound_wsgi.client_keys import JWKS_MAX_AGE, ClientKeys, load_private_key
from certbound_wsgi.errors import ConfigurationError
from certbound_wsgi.jose import PRIVATE_MEMBERS
from certbound_wsgi.middleware import CertBoundMiddleware
from tests.conftest import CountingApp, make_settings
from tests.support.tokens import StaticDiscovery, TestIssuer

PUBLIC_MEMBERS = {"EC": {"kty", "crv", "x", "y"}, "RSA": {"kty", "n", "e"}, "OKP": {"kty", "crv", "x"}}

KEYS = [
    pytest.param(lambda: ECKey.generate_key("P-256", private=True), "ES256", id="ec"),
    pytest.param(lambda: RSAKey.generate_key(2048, private=True), "RS256", id="rsa"),
    pytest.param(lambda: OKPKey.generate_key("Ed25519", private=True), "EdDSA", id="okp"),
]


def write_key(path: Path, key: Any, pem: bool = False) -> str:
    if pem:
        path.write_bytes(key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    else:
        path.write_text(json.dumps(key.as_dict(private=True)))
    return str(path)


@pytest.mark.parametrize(("make", "alg"), KEYS)
def test_the_jwks_holds_public_members_only(make: Any, alg: str) -> None:
    current, upcoming = make(), make()
    keys = ClientKeys("rs", current, alg, upcoming)
    published = keys.jwks["keys"]
    assert len(published) == 2
    for jwk in published:
        assert not PRIVATE_MEMBERS & set(jwk)
        assert set(jwk) == PUBLIC_MEMBERS[jwk["kty"]] | {"kid", "use", "alg"}
        assert (jwk["use"], jwk["alg"]) == ("sig", alg)
    assert [jwk["kid"] for jwk in published] == [current.thumbprint(), upcoming.thumbprint()]


@settings(max_examples=25, deadline=None)
@given(extra=st.dictionaries(st.sampled_from(sorted(PRIVATE_MEMBERS | {"kid", "use", "x5c", "ext"})),
                             st.text(max_size=8), max_size=6))
def test_no_private_member_is_published_whatever_the_key_file_holds(extra: dict[str, str], tmp_path_factory: Any
                                                                     ) -> None:
    key = ECKey.generate_key("P-256", private=True)
    path = tmp_path_factory.mktemp("k") / "key.json"
    path.write_text(json.dumps({**extra, **key.as_dict(private=True)}))
    try:
        keys = ClientKeys.from_files("rs", str(path), "ES256")
    except ConfigurationError:
        return  # refused outright is fine too
    body = b"".join(keys({"REQUEST_METHOD": "GET"}, lambda status, headers: None))
    assert not PRIVATE_MEMBERS & set(json.loads(body)["keys"][0])
    assert key.as_dict(private=True)["d"].encode() not in body


@pytest.mark.parametrize(("make", "alg"), KEYS)
def test_assertions_are_signed_by_the_current_key_and_name_it(make: Any, alg: str) -> None:
    current = make()
    keys = ClientKeys("rs", current, alg, make())
    assertion = keys.assertion("https://issuer.test/token")
    verified = jwt.decode(assertion, KeySet.import_key_set(keys.jwks), algorithms=[alg])
    assert verified.header["kid"] == current.thumbprint()
    claims = verified.claims
    assert (claims["iss"], claims["sub"], claims["aud"]) == ("rs", "rs", "https://issuer.test/token")
    assert claims["exp"] - claims["iat"] == 60
    assert keys.assertion("x") != keys.assertion("x")  # a fresh jti each time
    form = keys.form("https://issuer.test/token")
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert form["client_id"] == "rs"


def test_a_next_key_equal_to_the_current_one_is_published_once() -> None:
    key = ECKey.generate_key("P-256", private=True)
    assert len(ClientKeys("rs", key, "ES256", key).jwks["keys"]) == 1


@pytest.mark.parametrize("pem", [pytest.param(False, id="jwk"), pytest.param(True, id="pem")])
def test_keys_load_from_jwk_or_pem(pem: bool, tmp_path: Path) -> None:
    key = ECKey.generate_key("P-256", private=True)
    loaded = load_private_key(write_key(tmp_path / "k", key, pem))
    assert loaded.thumbprint() == key.thumbprint()


@pytest.mark.parametrize(
    ("content", "option"),
    [
        pytest.param(lambda: json.dumps(ECKey.generate_key("P-256", private=True).as_dict(private=False)),
                     "client_jwk_next", id="public-only"),
        pytest.param(lambda: "not a key", "client_jwk_next", id="garbage"),
    ],
)
def test_a_file_without_a_private_key_names_its_option(content: Any, option: str, tmp_path: Path) -> None:
    current = write_key(tmp_path / "current", ECKey.generate_key("P-256", private=True))
    (tmp_path / "next").write_text(content())
    with pytest.raises(ConfigurationError) as refused:
        ClientKeys.from_files("rs", current, "ES256", str(tmp_path / "next"))
    assert refused.value.option == option


def test_an_algorithm_the_key_cannot_sign_with_is_refused() -> None:
    with pytest.raises(ConfigurationError) as refused:
        ClientKeys("rs", ECKey.generate_key("P-256", private=True), "RS256")
    assert refused.value.option == "client_alg"


@pytest.mark.parametrize(
    ("method", "status", "has_body"),
    [
        pytest.param("GET", 200, True, id="get"),
        pytest.param("HEAD", 200, False, id="head"),
        pytest.param("POST", 405, False, id="post"),
    ],
)
def test_the_middleware_serves_the_jwks_unauthenticated(
    method: str, status: int, has_body: bool, tmp_path: Path, issuer: TestIssuer
) -> None:
    key = ECKey.generate_key("P-256", private=True)
    upcoming = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "next.pem").write_bytes(upcoming.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    s = make_settings(client_jwk=write_key(tmp_path / "k.json", key), client_jwk_next=str(tmp_path / "next.pem"),
                      client_jwks_path="/.well-known/jwks.json")
    app = CountingApp()
    client = Client(CertBoundMiddleware(app, s, discovery=StaticDiscovery(s, issuer)))
    response = client.open("/.well-known/jwks.json", method=method)
    assert response.status_code == status
    assert app.calls == []
    if status == 200:
        assert response.headers["Content-Type"] == "application/jwk-set+json"
        assert response.headers["Cache-Control"] == f"public, max-age={JWKS_MAX_AGE}"
    if has_body:
        kids = [jwk["kid"] for jwk in response.json["keys"]]  # type: ignore[index]
        assert kids == [key.thumbprint(), ECKey.import_key(upcoming).thumbprint()]
        assert all(not PRIVATE_MEMBERS & set(jwk) for jwk in response.json["keys"])  # type: ignore[index]
    # Anything else is still protected.
    assert client.get("/.well-known/jwks.json/x").status_code == 401
