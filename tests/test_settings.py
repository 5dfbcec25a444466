"""certbound_wsgi.settings: defaults, the environment, typed mappings and every refusal."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import typing
from typing import Any

import pytest

from certbound_wsgi.cli import check_config_command
from certbound_wsgi.dev.pki import DevCA
from certbound_wsgi.errors import ConfigurationError
from certbound_wsgi.settings import ASYMMETRIC_ALGS, Rules, Settings, env_name, rules_of
from tests.support.tokens import AUDIENCE, ISSUER

BASE_ENV = {"CERTBOUND_ISSUER": ISSUER, "CERTBOUND_AUDIENCE": AUDIENCE}
A_FILE = os.path.abspath(__file__)
A_CA_FILE = str(DevCA(tempfile.mkdtemp(prefix="certbound-settings-")).cert_path)

DEFAULTS = Settings(issuer=ISSUER, audience=(AUDIENCE,))
HINTS = typing.get_type_hints(Settings)

# Options whose sample needs a particular shape (a URL, a file, a network) or companions to be valid:
# (environment value, what it must become, other variables it needs).
SPECIAL_SAMPLES: dict[str, tuple[str, Any, dict[str, str]]] = {
    "issuer": ("https://login.example.com/realms/x", "https://login.example.com/realms/x", {}),
    "audience": ("https://a.test, https://b.test", ("https://a.test", "https://b.test"), {}),
    "auth_methods": ("bearer,introspection", ("bearer", "introspection"),
                     {"CERTBOUND_CLIENT_ID": "rs", "CERTBOUND_CLIENT_SECRET": "s"}),
    "trusted_proxies": ("unix, 10.0.0.0/8, fd00::/8", ("unix", "10.0.0.0/8", "fd00::/8"), {}),
    "proxy_secret": ("0123456789abcdefghijklmnopqrstuvwxyz", "0123456789abcdefghijklmnopqrstuvwxyz", {}),
    "ca_file": (A_CA_FILE, A_CA_FILE, {}),
    "client_jwk": (A_FILE, A_FILE, {}),
    "client_jwk_next": (A_FILE, A_FILE, {"CERTBOUND_CLIENT_JWK": A_FILE}),
    "client_jwks_path": ("/.well-known/jwks.json", "/.well-known/jwks.json", {"CERTBOUND_CLIENT_JWK": A_FILE}),
    "issuers_allowed": ("https://b.test, https://c.test", ("https://b.test", "https://c.test"), {}),
    "issuer_audiences": ("https://b.test=https://api-b.test", ("https://b.test=https://api-b.test",),
                         {"CERTBOUND_ISSUERS_ALLOWED": "https://b.test"}),
    "tls_client_auth_cert_file": (A_FILE, A_FILE, {}),
    "tls_client_auth_key_file": (A_FILE, A_FILE, {}),
    "introspection_endpoint": ("https://issuer.test/introspect", "https://issuer.test/introspect", {}),
    "redis_url": ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", {"CERTBOUND_CACHE_SECRET": "s" * 16}),
    "redis_sentinel_master": ("mymaster", "mymaster", {"CERTBOUND_REDIS_SENTINEL_NODES": "127.0.0.1:26379",
                                                       "CERTBOUND_CACHE_SECRET": "s" * 16}),
    "dpop_use_nonce": ("true", True, {"CERTBOUND_CACHE_SECRET": "s" * 16}),
    "public_base_url": ("https://api.example.com", "https://api.example.com", {}),
    "proof_of_possession_dpop": ("optional", "optional", {"CERTBOUND_PUBLIC_BASE_URL": "https://api.example.com"}),
    "dpop_replay_redis_url": ("redis://127.0.0.1:6380/0", "redis://127.0.0.1:6380/0", {}),
    "session_cookie_path": ("/app", "/app", {}),
    "logout_path": ("/logout", "/logout", {}),
    "logout_redirect_uri": ("/bye", "/bye", {}),
    "login_redirect_uri": ("https://app.example.com/home", "https://app.example.com/home", {}),
    "redirect_uri": ("https://app.example.com/cb", "https://app.example.com/cb", {}),
    "session_cookie_same_site": ("Strict", "Strict", {}),
    "public_paths": ("/healthz, /static/", ("/healthz", "/static/"), {}),
    "readiness_path": ("/readyz", "/readyz", {}),
    "liveness_path": ("/livez", "/livez", {}),
    "client_cert_xfcc_hops": ("2", 2, {"CERTBOUND_CLIENT_CERT_FORMAT": "xfcc"}),
}


def sample(field: dataclasses.Field[Any]) -> tuple[str, Any, dict[str, str]]:
    """An environment value for ``field`` that differs from its default, and what it must become."""
    if field.name in SPECIAL_SAMPLES:
        return SPECIAL_SAMPLES[field.name]
    hint = HINTS[field.name]
    default = getattr(DEFAULTS, field.name)
    choices = rules_of(field).choices
    if typing.get_origin(hint) is tuple:
        items = choices[:2] if choices else ("sample-a", "sample-b")
        return " , ".join(items), tuple(items), {}
    if hint is bool:
        return str(not default).upper(), not default, {}
    if hint is int:
        return f" {default + 7} ", default + 7, {}
    if hint is float:
        return str(default / 2), default / 2, {}
    if choices:
        choice = next(c for c in choices if c != default)
        return choice, choice, {}
    if field.name.endswith(("_url", "_endpoint")):
        return "https://sample.test/x", "https://sample.test/x", {}
    return " Sample-Value ", "Sample-Value", {}


FIELDS = dataclasses.fields(Settings)
FIELD_NAMES = [f.name for f in FIELDS]


@pytest.mark.parametrize("field", [pytest.param(f, id=f.name) for f in FIELDS])
def test_from_env_reads_every_option(field: dataclasses.Field[Any]) -> None:
    raw, expected, companions = sample(field)
    assert expected != getattr(DEFAULTS, field.name), "the sample must differ from the default"
    name = env_name(field.name)
    assert name == "CERTBOUND_" + field.name.upper()
    settings = Settings.from_env({**BASE_ENV, **companions, name: raw})
    assert getattr(settings, field.name) == expected
    assert Settings.from_env({**BASE_ENV, **companions}) != settings


@pytest.mark.parametrize(
    ("name", "default"),
    [
        pytest.param("auth_methods", ("bearer",), id="auth_methods"),
        pytest.param("proof_of_possession_mtls", "strict", id="mtls-strict"),
        pytest.param("scopes_required", (), id="scopes_required"),
        pytest.param("scopes_claim", "scope", id="scopes_claim"),
        pytest.param("leeway", 0, id="leeway"),
        pytest.param("rediscovery_lifetime", 30, id="rediscovery_lifetime"),
        pytest.param("token_signing_algs", ASYMMETRIC_ALGS, id="token_signing_algs"),
        pytest.param("bearer_token_param_type", ("header",), id="param-type-header-only"),
        pytest.param("bearer_token_cookie_name", "", id="cookie-name"),
        # Issue 11: no address is trusted by default (loopback is shared by sidecars and local users).
        pytest.param("trusted_proxies", (), id="trusted-proxies-none"),
        pytest.param("proxy_secret", "", id="proxy-secret-none"),
        pytest.param("proxy_secret_header", "X-Certbound-Proxy-Secret", id="proxy-secret-header"),
        pytest.param("client_cert_header", "X-SSL-Client-Cert", id="client_cert_header"),
        pytest.param("client_cert_verify_header", "", id="verify-header-off"),
        pytest.param("ca_file", "", id="ca_file"),
        pytest.param("http_timeout", 5.0, id="http_timeout"),
        pytest.param("realm", "api", id="realm"),
        pytest.param("token_cache_size", 10000, id="token_cache_size"),
        pytest.param("cert_cache_size", 1024, id="cert_cache_size"),
    ],
)
def test_defaults(name: str, default: Any) -> None:
    assert getattr(Settings(issuer=ISSUER, audience=(AUDIENCE,)), name) == default


def test_no_hmac_or_none_algorithm_by_default() -> None:
    algs = Settings(issuer=ISSUER, audience=(AUDIENCE,)).token_signing_algs
    assert not {a for a in algs if a.upper().startswith("HS") or a.lower() == "none"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("a,b", ("a", "b"), id="plain"),
        pytest.param(" a , b ", ("a", "b"), id="spaces-stripped"),
        pytest.param("a,,b,", ("a", "b"), id="empty-items-dropped"),
        pytest.param("a", ("a",), id="single"),
        pytest.param("", (), id="empty"),
        pytest.param(" , ", (), id="only-separators"),
    ],
)
def test_comma_lists(raw: str, expected: tuple[str, ...]) -> None:
    settings = Settings.from_env({**BASE_ENV, "CERTBOUND_SCOPES_REQUIRED": raw})
    assert settings.scopes_required == expected


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        pytest.param({"CERTBOUND_PROOF_OF_POSSESSION_MTLS": "lax"}, "proof_of_possession_mtls", id="bad-mode"),
        pytest.param({"CERTBOUND_PROOF_OF_POSSESSION_MTLS": "STRICT"}, "proof_of_possession_mtls", id="mode-case"),
        pytest.param({"CERTBOUND_LEEWAY": "-1"}, "leeway", id="negative-leeway"),
        pytest.param({"CERTBOUND_LEEWAY": "301"}, "leeway", id="huge-leeway"),
        pytest.param({"CERTBOUND_REDISCOVERY_LIFETIME": "-5"}, "rediscovery_lifetime", id="negative-lifetime"),
        pytest.param({"CERTBOUND_ISSUER": "http://issuer.test"}, "issuer", id="http-issuer-not-loopback"),
        pytest.param({"CERTBOUND_ISSUER": "http://localhost.evil.test"}, "issuer", id="http-issuer-fake-localhost"),
        pytest.param({"CERTBOUND_ISSUER": "ftp://issuer.test"}, "issuer", id="ftp-issuer"),
        pytest.param({"CERTBOUND_ISSUER": "https://issuer.test/?a=1"}, "issuer", id="issuer-with-query"),
        pytest.param({"CERTBOUND_ISSUER": "https://issuer.test/#f"}, "issuer", id="issuer-with-fragment"),
        pytest.param({"CERTBOUND_ISSUER": "https:///path"}, "issuer", id="issuer-without-host"),
        pytest.param({"CERTBOUND_AUTH_METHODS": "bearer,magic"}, "auth_methods", id="unknown-auth-method"),
        pytest.param({"CERTBOUND_AUTH_METHODS": ""}, "auth_methods", id="no-auth-method"),
        pytest.param({"CERTBOUND_TOKEN_SIGNING_ALGS": "ES256,HS256"}, "token_signing_algs", id="hs256"),
        pytest.param({"CERTBOUND_TOKEN_SIGNING_ALGS": "none"}, "token_signing_algs", id="alg-none"),
        pytest.param({"CERTBOUND_TOKEN_SIGNING_ALGS": ""}, "token_signing_algs", id="no-alg"),
        pytest.param({"CERTBOUND_TRUSTED_PROXIES": "10.0.0.0/33"}, "trusted_proxies", id="bad-cidr-prefix"),
        pytest.param({"CERTBOUND_TRUSTED_PROXIES": "nginx"}, "trusted_proxies", id="cidr-hostname"),
        pytest.param({"CERTBOUND_LEEWAYY": "5"}, "leewayy", id="unknown-variable-typo"),
        pytest.param({"CERTBOUND_BEARER_TOKEN_PARAM_TYPE": "header,cookie"}, "bearer_token_cookie_name",
                     id="cookie-without-name"),
        pytest.param({"CERTBOUND_BEARER_TOKEN_PARAM_TYPE": "header,fragment"}, "bearer_token_param_type",
                     id="unknown-param-type"),
        pytest.param({"CERTBOUND_BEARER_TOKEN_PARAM_TYPE": ""}, "bearer_token_param_type", id="no-param-type"),
        pytest.param({"CERTBOUND_ISSUER": ""}, "issuer", id="missing-issuer"),
        pytest.param({"CERTBOUND_AUDIENCE": ""}, "audience", id="missing-audience"),
        pytest.param({"CERTBOUND_AUDIENCE": " , "}, "audience", id="blank-audience"),
        pytest.param({"CERTBOUND_CA_FILE": "/nonexistent/ca.pem"}, "ca_file", id="ca-file-missing"),
        pytest.param({"CERTBOUND_CA_FILE": "/"}, "ca_file", id="ca-file-directory"),
        pytest.param({"CERTBOUND_CLIENT_CERT_HEADER": "X_SSL_Client_Cert"}, "client_cert_header",
                     id="header-underscore"),
        pytest.param({"CERTBOUND_CLIENT_CERT_HEADER": "X-Cert: x"}, "client_cert_header", id="header-colon"),
        pytest.param({"CERTBOUND_CLIENT_CERT_HEADER": ""}, "client_cert_header", id="header-empty"),
        pytest.param({"CERTBOUND_CLIENT_CERT_VERIFY_HEADER": "X_Verify"}, "client_cert_verify_header",
                     id="verify-header-underscore"),
        pytest.param({"CERTBOUND_LEEWAY": "ten"}, "leeway", id="int-not-numeric"),
        pytest.param({"CERTBOUND_LEEWAY": "1.5"}, "leeway", id="int-fraction"),
        pytest.param({"CERTBOUND_LEEWAY": "nan"}, "leeway", id="int-nan"),
        pytest.param({"CERTBOUND_HTTP_TIMEOUT": "nan"}, "http_timeout", id="float-nan"),
        pytest.param({"CERTBOUND_HTTP_TIMEOUT": "inf"}, "http_timeout", id="float-inf"),
        pytest.param({"CERTBOUND_HTTP_TIMEOUT": "-inf"}, "http_timeout", id="float-minus-inf"),
        pytest.param({"CERTBOUND_HTTP_TIMEOUT": "0"}, "http_timeout", id="timeout-zero"),
        pytest.param({"CERTBOUND_HTTP_TIMEOUT": "121"}, "http_timeout", id="timeout-too-long"),
        pytest.param({"CERTBOUND_TOKEN_CACHE_SIZE": "0"}, "token_cache_size", id="token-cache-zero"),
        pytest.param({"CERTBOUND_CERT_CACHE_SIZE": "0"}, "cert_cache_size", id="cert-cache-zero"),
        pytest.param({"CERTBOUND_REALM": 'a"b'}, "realm", id="realm-quote"),
        pytest.param({"CERTBOUND_REALM": "a\\b"}, "realm", id="realm-backslash"),
        pytest.param({"CERTBOUND_ISSUER": "https://a.test/x\r\nSet-Cookie: y"}, "issuer", id="issuer-crlf"),
        pytest.param({"CERTBOUND_LOGOUT_REDIRECT_URI": "/bye\r\nX: y"}, "logout_redirect_uri",
                     id="logout-redirect-crlf"),
        pytest.param({"CERTBOUND_SESSION_COOKIE_DOMAIN": "a.test; Path=/"}, "session_cookie_domain",
                     id="cookie-domain-attribute-injection"),
        pytest.param({"CERTBOUND_SESSION_COOKIE_NAME": "s\u00e9"}, "session_cookie_name", id="cookie-name-non-ascii"),
        pytest.param({"CERTBOUND_SESSION_COOKIE_PATH": "/a\tb"}, "session_cookie_path", id="cookie-path-tab"),
        pytest.param({"CERTBOUND_INTROSPECT_JWT_TOKENS": "maybe"}, "introspect_jwt_tokens", id="bool-not-boolean"),
        pytest.param({"CERTBOUND_AUTH_METHODS": "introspection"}, "client_id", id="introspection-no-client-id"),
        pytest.param({"CERTBOUND_AUTH_METHODS": "introspection", "CERTBOUND_CLIENT_ID": "rs"}, "client_secret",
                     id="introspection-no-secret"),
        pytest.param({"CERTBOUND_AUTH_METHODS": "introspection", "CERTBOUND_CLIENT_ID": "rs",
                      "CERTBOUND_CLIENT_SECRET": "s", "CERTBOUND_INTROSPECTION_ENDPOINT": "http://idp.test/i"},
                     "introspection_endpoint", id="introspection-endpoint-http"),
        pytest.param({"CERTBOUND_CACHE_TTL_MIN": "60", "CERTBOUND_CACHE_TTL_MAX": "30"}, "cache_ttl_min",
                     id="cache-ttl-min-over-max"),
        pytest.param({"CERTBOUND_CACHE_TTL_NEG": "-1"}, "cache_ttl_neg", id="cache-ttl-negative"),
        pytest.param({"CERTBOUND_REDIS_TIMEOUT": "0"}, "redis_timeout", id="redis-timeout-zero"),
        pytest.param({"CERTBOUND_REDIS_URL": "http://redis.test"}, "redis_url", id="redis-url-scheme"),
        pytest.param({"CERTBOUND_REDIS_URL": "redis://redis.test"}, "cache_secret", id="redis-without-secret"),
        pytest.param({"CERTBOUND_REDIS_URL": "redis://redis.test", "CERTBOUND_CACHE_SECRET": "short"},
                     "cache_secret", id="redis-short-secret"),
        pytest.param({"CERTBOUND_REDIS_SENTINEL_MASTER": "m", "CERTBOUND_CACHE_SECRET": "s" * 16},
                     "redis_sentinel_nodes", id="sentinel-without-nodes"),
        pytest.param({"CERTBOUND_TOKEN_CACHE_SIZE": "1" + "0" * 400}, "token_cache_size",
                     id="int-too-large-for-a-float"),
        pytest.param({"CERTBOUND_TOKEN_CACHE_SIZE": "-" + "9" * 400}, "token_cache_size",
                     id="negative-int-too-large-for-a-float"),
    ],
)
def test_bad_values_name_the_option(overrides: dict[str, str], option: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({**BASE_ENV, **overrides})
    assert info.value.option == option
    assert str(info.value).startswith(option + ": ")


@pytest.mark.parametrize(
    ("name", "accepted", "refused", "message"),
    [
        pytest.param("leeway", (0, 300), (-1, 301), "must be from 0 to 300", id="leeway"),
        pytest.param("rediscovery_lifetime", (0,), (-1,), "must be at least 0", id="rediscovery_lifetime"),
        pytest.param("http_timeout", (0.01, 120), (0, -1, 120.5), "must be more than 0, at most 120",
                     id="http_timeout"),
        pytest.param("redis_timeout", (0.001, 10), (0, 10.01), "must be more than 0, at most 10", id="redis_timeout"),
        pytest.param("dpop_proof_lifetime", (1, 3600), (0, 3601), "must be from 1 to 3600",
                     id="dpop_proof_lifetime"),
        pytest.param("token_cache_size", (1,), (0, -1), "must be at least 1", id="token_cache_size"),
        pytest.param("cert_cache_size", (1,), (0,), "must be at least 1", id="cert_cache_size"),
        pytest.param("cache_l1_size", (1,), (0,), "must be at least 1", id="cache_l1_size"),
        pytest.param("session_idling_timeout", (0,), (-1,), "must be at least 0", id="session_idling_timeout"),
        pytest.param("cache_ttl_resurrect", (0,), (-1,), "must be at least 0", id="cache_ttl_resurrect"),
        pytest.param("cache_l1_ttl", (0,), (-1,), "must be at least 0", id="cache_l1_ttl"),
    ],
)
def test_ranges_are_enforced_at_their_bounds(
    name: str, accepted: tuple[float, ...], refused: tuple[float, ...], message: str
) -> None:
    for value in accepted:
        assert getattr(Settings.from_mapping({**BASE_ENV, env_name(name): value}), name) == value
    for value in refused:
        with pytest.raises(ConfigurationError) as info:
            Settings.from_mapping({**BASE_ENV, env_name(name): value})
        assert str(info.value) == f"{name}: {message}"


@pytest.mark.parametrize("field", [pytest.param(f, id=f.name) for f in FIELDS if HINTS[f.name] in (int, float)])
def test_every_number_declares_its_lower_bound(field: dataclasses.Field[Any]) -> None:
    """No option takes a negative number: each says how low it may go, and the docs table shows it."""
    rules = rules_of(field)
    assert rules.min is not None or rules.above is not None
    assert rules.range()
    assert rules.min is None or rules.min >= 0
    with pytest.raises(ConfigurationError) as info:
        Settings.from_mapping({**BASE_ENV, env_name(field.name): -1})
    assert info.value.option == field.name


@pytest.mark.parametrize(
    ("rules", "text"),
    [
        pytest.param(Rules("d", min=0, max=300), "from 0 to 300", id="both"),
        pytest.param(Rules("d", min=1), "at least 1", id="min"),
        pytest.param(Rules("d", max=5), "at most 5", id="max"),
        pytest.param(Rules("d", above=0, max=0.5), "more than 0, at most 0.5", id="above-and-max"),
        pytest.param(Rules("d"), "", id="unbounded"),
    ],
)
def test_range_in_words(rules: Rules, text: str) -> None:
    assert rules.range() == text


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        pytest.param("auth_methods", "", "needs at least one value", id="empty-list"),
        pytest.param("client_cert_header", "", "must not be empty", id="empty-string"),
        pytest.param("session_cookie_name", " ", "must not be empty", id="blank-string"),
        pytest.param("token_signing_algs", ",", "needs at least one value", id="only-separator"),
    ],
)
def test_required_options_refuse_empty_values(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({**BASE_ENV, env_name(name): value})
    assert str(info.value) == f"{name}: {message}"


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        pytest.param({"auth_methods": ("bearer",), "audience": ()}, "audience", id="bearer"),
        pytest.param({"auth_methods": ("introspection",), "audience": (), "client_id": "rs", "client_secret": "s"},
                     "audience", id="introspection"),
    ],
)
def test_audience_is_required_by_every_token_method(overrides: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(**{"issuer": ISSUER, **overrides})
    assert str(info.value) == "audience: required: the token's aud must contain one of these"


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({**BASE_ENV, "CERTBOUND_APP": "pkg.mod:app"}, id="certbound-app"),
        pytest.param({**BASE_ENV, "OTHER_THING": "x", "PATH": "/bin"}, id="unprefixed-ignored"),
        pytest.param({**BASE_ENV, "certbound_leewayy": "x"}, id="lower-case-prefix-ignored"),
    ],
)
def test_variables_that_are_not_options_are_allowed(environ: dict[str, str]) -> None:
    settings = Settings.from_env(environ)
    assert settings.issuer == ISSUER
    assert settings.audience == (AUDIENCE,)


@pytest.mark.parametrize(
    ("issuer"),
    [
        pytest.param("http://localhost:8080", id="localhost"),
        pytest.param("http://127.0.0.1:8443/realms/x", id="ipv4-loopback"),
        pytest.param("http://[::1]:8443", id="ipv6-loopback"),
        pytest.param("https://issuer.test/tenant", id="https-with-path"),
    ],
)
def test_issuers_accepted(issuer: str) -> None:
    assert Settings(issuer=issuer, audience=(AUDIENCE,)).issuer == issuer


def test_from_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("CERTBOUND_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CERTBOUND_ISSUER", ISSUER)
    monkeypatch.setenv("CERTBOUND_AUDIENCE", AUDIENCE)
    monkeypatch.setenv("CERTBOUND_LEEWAY", "7")
    assert Settings.from_env().leeway == 7


def test_custom_prefix() -> None:
    settings = Settings.from_env({"API_ISSUER": ISSUER, "API_AUDIENCE": AUDIENCE, "API_REALM": "x"}, prefix="API_")
    assert settings.realm == "x"


@pytest.mark.parametrize(
    ("mapping", "name", "expected"),
    [
        pytest.param({"CERTBOUND_LEEWAY": 5}, "leeway", 5, id="int"),
        pytest.param({"CERTBOUND_LEEWAY": 5.0}, "leeway", 5, id="integral-float-for-int"),
        pytest.param({"CERTBOUND_HTTP_TIMEOUT": 2}, "http_timeout", 2.0, id="int-for-float"),
        pytest.param({"CERTBOUND_AUDIENCE": ["a", "b"]}, "audience", ("a", "b"), id="list"),
        pytest.param({"CERTBOUND_AUDIENCE": ("a",)}, "audience", ("a",), id="tuple"),
        pytest.param({"CERTBOUND_SCOPES_REQUIRED": frozenset({"read"})}, "scopes_required", ("read",),
                     id="frozenset"),
        pytest.param({"CERTBOUND_AUDIENCE": "a, b"}, "audience", ("a", "b"), id="string-list"),
        pytest.param({"CERTBOUND_REALM": "  orders "}, "realm", "orders", id="string-stripped"),
        pytest.param({"CERTBOUND_TRUSTED_PROXIES": []}, "trusted_proxies", (), id="no-trusted-proxy"),
        pytest.param({"SECRET_KEY": "x", "DEBUG": True}, "issuer", ISSUER, id="flask-keys-ignored"),
    ],
)
def test_from_mapping_typed_values(mapping: dict[str, Any], name: str, expected: Any) -> None:
    settings = Settings.from_mapping({"CERTBOUND_ISSUER": ISSUER, "CERTBOUND_AUDIENCE": [AUDIENCE], **mapping})
    value = getattr(settings, name)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("mapping", "option"),
    [
        pytest.param({"CERTBOUND_LEEWAY": True}, "leeway", id="bool-for-int"),
        pytest.param({"CERTBOUND_LEEWAY": 5.5}, "leeway", id="fraction-for-int"),
        pytest.param({"CERTBOUND_LEEWAY": None}, "leeway", id="none-for-int"),
        pytest.param({"CERTBOUND_LEEWAY": [5]}, "leeway", id="list-for-int"),
        pytest.param({"CERTBOUND_HTTP_TIMEOUT": float("nan")}, "http_timeout", id="nan"),
        pytest.param({"CERTBOUND_HTTP_TIMEOUT": float("inf")}, "http_timeout", id="inf"),
        pytest.param({"CERTBOUND_AUDIENCE": [AUDIENCE, 1]}, "audience", id="list-with-number"),
        pytest.param({"CERTBOUND_AUDIENCE": 1}, "audience", id="number-for-list"),
        pytest.param({"CERTBOUND_AUDIENCE": {"a": "b"}}, "audience", id="dict-for-list"),
        pytest.param({"CERTBOUND_ISSUER": 5}, "issuer", id="number-for-string"),
        pytest.param({"CERTBOUND_PROOF_OF_POSSESSION_MTLS": True}, "proof_of_possession_mtls", id="bool-for-mode"),
        pytest.param({"CERTBOUND_TYPO": 1}, "typo", id="unknown-key"),
    ],
)
def test_from_mapping_bad_typed_values(mapping: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_mapping({"CERTBOUND_ISSUER": ISSUER, "CERTBOUND_AUDIENCE": [AUDIENCE], **mapping})
    assert info.value.option == option


def test_settings_are_frozen() -> None:
    settings = Settings(issuer=ISSUER, audience=(AUDIENCE,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.leeway = 5  # type: ignore[misc]


def test_masked_lists_every_option_as_json() -> None:
    settings = Settings(issuer=ISSUER, audience=(AUDIENCE,), scopes_required=("read",))
    masked = settings.masked()
    assert list(masked) == FIELD_NAMES
    assert masked["audience"] == [AUDIENCE]
    assert masked["scopes_required"] == ["read"]
    assert masked["leeway"] == 0
    assert json.loads(json.dumps(masked)) == masked
    masked["audience"].append("x")
    assert settings.audience == (AUDIENCE,)


@pytest.mark.parametrize(
    ("option", "secret", "shown"),
    [
        pytest.param("client_secret", "hunter2-hunter2!", "********", id="client-secret-masked"),
        pytest.param("cache_secret", "hunter2-hunter2!", "********", id="cache-secret-masked"),
        pytest.param("client_secret", "", "", id="empty-secret-shown-empty"),
    ],
)
def test_masked_hides_secrets(option: str, secret: str, shown: str) -> None:
    secrets: dict[str, Any] = {option: secret}
    masked = Settings(issuer=ISSUER, audience=(AUDIENCE,), **secrets).masked()
    assert masked[option] == shown
    assert "hunter2" not in json.dumps(masked)


def test_check_config_reports_the_option(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for key in list(os.environ):
        if key.startswith("CERTBOUND_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CERTBOUND_AUDIENCE", AUDIENCE)
    assert check_config_command() == 2
    err = capsys.readouterr().err
    assert "configuration error: issuer:" in err
    assert "Traceback" not in err
