"""How the resource server authenticates to the introspection endpoint, against the real IdP.

Each of the four ``introspection_endpoint_auth_method`` values is used by its own
resource-server client of oidc-provider (see :mod:`tests.support.idp`):
``rs-client`` (``client_secret_basic`` and ``client_secret_post``), ``rs-jwt``
(``private_key_jwt``, an ES256 key made by the tests) and ``rs-mtls``
(``tls_client_auth``, subject ``CN=rs-mtls`` from the test CA). For each: a real
opaque token introspects as active with its ``cnf``; the wrong secret, key or
certificate is refused; and the middleware lets alice's token through with her
certificate and refuses it with mallory's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import ECKey
from werkzeug.test import Client

from certbound_wsgi.binding import THUMBPRINT_MISMATCH
from certbound_wsgi.dev.echo import echo_app
from certbound_wsgi.dev.pki import self_signed_client
from certbound_wsgi.errors import ConfigurationError
from certbound_wsgi.introspection import IntrospectionClient, IntrospectionError
from certbound_wsgi.middleware import CertBoundMiddleware
from certbound_wsgi.settings import Settings
from tests.conftest import TEST_PROXY_SECRET, ViaProxy
from tests.support import idp_fixtures
from tests.support.idp import OPAQUE_RESOURCE, RS_JWT_CLIENT, RS_MTLS_CLIENT, SECRETS, OidcProvider, x5t_s256

# The real IdP and its PKI (tests/conftest.py's ``pki`` is a bare DevCA).
pki = idp_fixtures.pki
idp = idp_fixtures.idp

METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth"]


def auth_options(provider: OidcProvider, method: str) -> dict[str, Any]:
    """The client options of ``method``, for the IdP client registered with it."""
    if method in ("client_secret_basic", "client_secret_post"):
        return {"client_id": "rs-client", "client_secret": SECRETS["rs-client"]}
    if method == "private_key_jwt":
        return {"client_id": RS_JWT_CLIENT, "client_jwk": str(provider.rs_jwt_key_path)}
    cert = provider.rs_mtls_cert
    return {"client_id": RS_MTLS_CLIENT, "tls_client_auth_cert_file": str(cert.cert_path),
            "tls_client_auth_key_file": str(cert.key_path)}


def settings_for(provider: OidcProvider, method: str, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "issuer": provider.issuer,
        "audience": (OPAQUE_RESOURCE,),
        "auth_methods": ("introspection",),
        "ca_file": provider.ca_file,
        "introspection_endpoint": provider.introspection_endpoint,
        "introspection_endpoint_auth_method": method,
        "http_timeout": 5.0,
        # The channel from nginx: the proxy secret, which ViaProxy adds to each request.
        "proxy_secret": TEST_PROXY_SECRET,
        **auth_options(provider, method),
    }
    options.update(overrides)
    return Settings(**options)


def write_private_jwk(path: Path, key: ECKey) -> str:
    path.write_text(json.dumps(key.as_dict(private=True)))
    return str(path)


@pytest.fixture(scope="module")
def opaque_token(idp: OidcProvider) -> str:
    """alice's opaque token for https://opaque.test, bound to her certificate."""
    token = idp.token("bound", resource=OPAQUE_RESOURCE)
    assert token.count(".") != 2, "expected an opaque token"
    return token


# -- the client --------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_introspects_a_real_token(idp: OidcProvider, pki: idp_fixtures.Pki, opaque_token: str, method: str) -> None:
    client = IntrospectionClient(settings_for(idp, method), None)
    idp.reset_stats()
    answer = client.introspect(opaque_token)
    assert answer["active"] is True
    assert answer["aud"] == OPAQUE_RESOURCE
    assert answer["iss"] == idp.issuer
    assert answer["cnf"] == {"x5t#S256": x5t_s256(pki.alice)}
    # A second call: a private_key_jwt assertion is never reused (the IdP refuses replayed jtis).
    assert client.introspect("no-such-token") == {"active": False}
    assert idp.stats()["introspections"] == 2


def test_private_key_jwt_from_a_pem_file(idp: OidcProvider, opaque_token: str, tmp_path: Path) -> None:
    """``client_jwk`` may also be the key in PEM (PKCS#8)."""
    key = ECKey.import_key(json.loads(idp.rs_jwt_key_path.read_text()))
    pem = tmp_path / "rs-jwt.pem"
    pem.write_bytes(key.as_pem(private=True))
    client = IntrospectionClient(settings_for(idp, "private_key_jwt", client_jwk=str(pem)), None)
    assert client.introspect(opaque_token)["active"] is True


def test_private_key_jwt_with_a_discovered_endpoint(idp: OidcProvider, opaque_token: str) -> None:
    """The assertion's ``aud`` is the endpoint found in the metadata."""
    from certbound_wsgi.discovery import Discovery

    settings = settings_for(idp, "private_key_jwt", introspection_endpoint="")
    client = IntrospectionClient(settings, Discovery(settings))
    assert client.introspect(opaque_token)["active"] is True


def _wrong_credentials(provider: OidcProvider, pki: idp_fixtures.Pki, tmp_path: Path, case: str) -> dict[str, Any]:
    if case == "basic-wrong-secret":
        return {"introspection_endpoint_auth_method": "client_secret_basic",
                "client_secret": "wrong-secret-0123456789abcdef"}
    if case == "post-wrong-secret":
        return {"introspection_endpoint_auth_method": "client_secret_post",
                "client_secret": "wrong-secret-0123456789abcdef"}
    if case == "jwt-other-key":
        other = ECKey.generate_key("P-256", private=True)
        return {"introspection_endpoint_auth_method": "private_key_jwt",
                "client_jwk": write_private_jwk(tmp_path / "other.jwk.json", other)}
    if case == "jwt-right-key-other-client":
        # rs-client has no registered key: the right key under another name is no use either.
        return {"introspection_endpoint_auth_method": "private_key_jwt", "client_id": "rs-client"}
    if case == "mtls-other-subject":
        # Issued by the trusted CA, but CN=mallory is not rs-mtls's subject DN.
        return {"introspection_endpoint_auth_method": "tls_client_auth",
                "tls_client_auth_cert_file": str(pki.mallory.cert_path),
                "tls_client_auth_key_file": str(pki.mallory.key_path)}
    if case == "mtls-untrusted-ca":
        # The right subject DN, CN=rs-mtls, but self-signed: the IdP's TLS server does not verify it.
        forged = self_signed_client(tmp_path, RS_MTLS_CLIENT)
        return {"introspection_endpoint_auth_method": "tls_client_auth",
                "tls_client_auth_cert_file": str(forged.cert_path),
                "tls_client_auth_key_file": str(forged.key_path)}
    raise AssertionError(case)


WRONG = {
    "basic-wrong-secret": "client_secret_basic",
    "post-wrong-secret": "client_secret_post",
    "jwt-other-key": "private_key_jwt",
    "jwt-right-key-other-client": "private_key_jwt",
    "mtls-other-subject": "tls_client_auth",
    "mtls-untrusted-ca": "tls_client_auth",
}


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_credentials_are_refused(idp: OidcProvider, pki: idp_fixtures.Pki, opaque_token: str,
                                       tmp_path: Path, case: str) -> None:
    settings = settings_for(idp, WRONG[case], **_wrong_credentials(idp, pki, tmp_path, case))
    with pytest.raises(IntrospectionError, match="401"):
        IntrospectionClient(settings, None).introspect(opaque_token)


# -- through the middleware -----------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_middleware_end_to_end(idp: OidcProvider, pki: idp_fixtures.Pki, method: str) -> None:
    """alice's opaque token with alice's certificate: 200; the same token with mallory's: 401."""
    token = idp.token("bound", resource=OPAQUE_RESOURCE)
    # No introspection_endpoint: the middleware finds it in the issuer's metadata.
    settings = settings_for(idp, method, introspection_endpoint="")
    client = Client(ViaProxy(CertBoundMiddleware(echo_app, settings)))
    headers = {"Authorization": f"Bearer {token}"}
    idp.reset_stats()

    response = client.get("/", headers=headers, environ_overrides={"SSL_CLIENT_CERT": pki.alice.cert_pem})
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["auth_method"] == "introspection"
    assert body["thumbprint"] == x5t_s256(pki.alice)
    assert body["claims"]["aud"] == OPAQUE_RESOURCE

    stolen = client.get("/", headers=headers, environ_overrides={"SSL_CLIENT_CERT": pki.mallory.cert_pem})
    assert stolen.status_code == 401
    assert THUMBPRINT_MISMATCH in stolen.headers["WWW-Authenticate"]
    assert idp.stats()["introspections"] == 1, "the stolen use was answered from the cache"


@pytest.mark.parametrize("method", ["private_key_jwt", "tls_client_auth"])
def test_middleware_with_refused_credentials_is_503(idp: OidcProvider, pki: idp_fixtures.Pki, tmp_path: Path,
                                                     method: str) -> None:
    """The IdP refusing the resource server is the issuer being unusable, never a pass."""
    token = idp.token("bound", resource=OPAQUE_RESOURCE)
    case = "jwt-other-key" if method == "private_key_jwt" else "mtls-other-subject"
    settings = settings_for(idp, method, **_wrong_credentials(idp, pki, tmp_path, case))
    client = Client(ViaProxy(CertBoundMiddleware(echo_app, settings)))
    response = client.get("/", headers={"Authorization": f"Bearer {token}"},
                          environ_overrides={"SSL_CLIENT_CERT": pki.alice.cert_pem})
    assert response.status_code == 503


# -- configuration ---------------------------------------------------------------------


def _bad_config(tmp_path: Path, case: str) -> tuple[dict[str, Any], str]:
    """Settings overrides and the option the ConfigurationError must name."""
    public = tmp_path / "public.jwk.json"
    public.write_text(json.dumps(ECKey.generate_key("P-256", private=True).as_dict(private=False)))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [ECKey.generate_key("P-256", private=True).as_dict(private=True)]}))
    cert = tmp_path / "cert.pem"
    cert.write_text("placeholder")
    jwt = {"introspection_endpoint_auth_method": "private_key_jwt"}
    mtls = {"introspection_endpoint_auth_method": "tls_client_auth"}
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "jwt-no-client_jwk": ({**jwt, "client_jwk": ""}, "client_jwk"),
        "jwt-missing-file": ({**jwt, "client_jwk": str(tmp_path / "missing.json")}, "client_jwk"),
        "jwt-directory": ({**jwt, "client_jwk": str(tmp_path)}, "client_jwk"),
        "jwt-public-key-only": ({**jwt, "client_jwk": str(public)}, "client_jwk"),
        "jwt-not-a-key": ({**jwt, "client_jwk": str(garbage)}, "client_jwk"),
        "jwt-a-jwks-not-a-jwk": ({**jwt, "client_jwk": str(jwks)}, "client_jwk"),
        "jwt-no-client_id": ({**jwt, "client_jwk": str(public), "client_id": ""}, "client_id"),
        "mtls-no-cert": ({**mtls, "tls_client_auth_cert_file": "", "tls_client_auth_key_file": str(cert)},
                         "tls_client_auth_cert_file"),
        "mtls-no-key": ({**mtls, "tls_client_auth_cert_file": str(cert), "tls_client_auth_key_file": ""},
                        "tls_client_auth_key_file"),
        "mtls-neither": ({**mtls}, "tls_client_auth_cert_file"),
        "mtls-missing-cert": ({**mtls, "tls_client_auth_cert_file": str(tmp_path / "missing.pem"),
                               "tls_client_auth_key_file": str(cert)}, "tls_client_auth_cert_file"),
        "mtls-missing-key": ({**mtls, "tls_client_auth_cert_file": str(cert),
                              "tls_client_auth_key_file": str(tmp_path / "missing.key")}, "tls_client_auth_key_file"),
        "basic-no-secret": ({"introspection_endpoint_auth_method": "client_secret_basic", "client_secret": ""},
                            "client_secret"),
        "post-no-secret": ({"introspection_endpoint_auth_method": "client_secret_post", "client_secret": ""},
                           "client_secret"),
        "unknown-method": ({"introspection_endpoint_auth_method": "client_secret_jwt"},
                           "introspection_endpoint_auth_method"),
    }
    return cases[case]


CONFIG_CASES = [
    "jwt-no-client_jwk", "jwt-missing-file", "jwt-directory", "jwt-public-key-only", "jwt-not-a-key",
    "jwt-a-jwks-not-a-jwk", "jwt-no-client_id", "mtls-no-cert", "mtls-no-key", "mtls-neither", "mtls-missing-cert",
    "mtls-missing-key", "basic-no-secret", "post-no-secret", "unknown-method",
]


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_configuration_errors(tmp_path: Path, case: str) -> None:
    overrides, option = _bad_config(tmp_path, case)
    options: dict[str, Any] = {
        "issuer": "https://issuer.test",
        "audience": ("https://api.test",),
        "auth_methods": ("introspection",),
        "client_id": "rs",
        "client_secret": "rs-secret-0123456789abcdef",
        **overrides,
    }
    with pytest.raises(ConfigurationError) as info:
        # Either at Settings (missing or unreadable) or when the client loads the key (unusable).
        CertBoundMiddleware(echo_app, Settings(**options))
    assert info.value.option == option


def test_client_alg_that_cannot_sign_with_the_key_is_a_configuration_error(tmp_path: Path) -> None:
    key = rsa.generate_private_key(65537, 2048)
    pem = tmp_path / "rsa.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    settings = Settings(issuer="https://issuer.test", audience=("https://api.test",), auth_methods=("introspection",),
                        client_id="rs", introspection_endpoint_auth_method="private_key_jwt", client_jwk=str(pem))
    assert settings.client_alg == "ES256"
    with pytest.raises(ConfigurationError) as info:
        CertBoundMiddleware(echo_app, settings)
    assert info.value.option in ("client_alg", "client_jwk")
