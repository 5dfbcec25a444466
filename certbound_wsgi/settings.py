"""Configuration: one frozen, typed object.

Every option has a default, a docstring and an environment variable named
``CERTBOUND_<OPTION>``. Names follow Kong Gateway's OpenID Connect plugin so
that users moving from Kong recognise them. The table in
``docs/configuration`` is generated from this module.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import ConfigurationError

__all__ = ["ENV_PREFIX", "Settings"]

ENV_PREFIX = "CERTBOUND_"

#: Environment variables with the prefix that are not options.
_NOT_OPTIONS = frozenset({"APP"})

PopMode = Literal["strict", "optional", "off"]

AUTH_METHODS = ("bearer", "introspection", "session", "authorization_code")
#: Methods whose credentials can carry a proof-of-possession binding (Kong's classification).
POP_COMPATIBLE_METHODS = frozenset({"bearer", "introspection", "session"})
INTROSPECTION_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth")
TOKEN_PARAM_TYPES = ("header", "query", "body", "cookie")
# RFC 7518 section 3.1 and RFC 8037: asymmetric signatures only. "none" and the
# HS* family are never accepted, whatever the configuration says.
ASYMMETRIC_ALGS = (
    "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA", "Ed25519",
)
_SECRET_OPTIONS = frozenset({"session_secret", "client_secret", "cache_secret"})


def _option(default: Any, doc: str, *, choices: tuple[str, ...] = ()) -> Any:
    if isinstance(default, (list, tuple)):
        value = tuple(default)
        return field(default_factory=lambda: value, metadata={"doc": doc, "choices": choices})
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the middleware needs to know, validated once at start-up.

    Build it directly (``Settings(issuer=..., audience=[...])``), from the
    environment (:meth:`from_env`) or from a mapping such as Flask's
    ``app.config`` (:meth:`from_mapping`). An invalid value raises
    :class:`~certbound_wsgi.ConfigurationError` naming the option.
    """

    issuer: str = _option(
        "",
        "The issuer URL. Its metadata is discovered at ``/.well-known/openid-configuration``, then at "
        "RFC 8414's ``/.well-known/oauth-authorization-server``; the token's ``iss`` must equal it exactly. "
        "Must be ``https`` (plain ``http`` is accepted for loopback addresses only).",
    )
    audience: tuple[str, ...] = _option(
        (), "Accepted audiences; the token's ``aud`` must contain at least one. Required."
    )
    auth_methods: tuple[str, ...] = _option(
        ("bearer",),
        "Enabled authentication methods. ``bearer``: JWT access tokens validated locally against the issuer's "
        "JWKS. ``introspection``: tokens checked with the issuer's RFC 7662 introspection endpoint. With both, a "
        "JWT-shaped token is validated locally and an opaque one is introspected. ``session``: a server-side "
        "session, created after another method succeeded, that remembers how it was made. "
        "``authorization_code``: an OpenID Connect browser login (PKCE) that creates a session.",
        choices=AUTH_METHODS,
    )
    proof_of_possession_mtls: PopMode = _option(
        "strict",
        "Certificate binding (RFC 8705 section 3). ``strict``: every token must carry ``cnf.x5t#S256`` "
        "matching the presented client certificate. ``optional``: unbound tokens pass, but a bound token is "
        "always checked, with or without a certificate. ``off``: no check.",
        choices=("strict", "optional", "off"),
    )
    scopes_required: tuple[str, ...] = _option((), "Scopes the token must all carry.")
    scopes_claim: str = _option(
        "scope", "The claim holding the token's scopes: a space-separated string or a list."
    )
    leeway: int = _option(0, "Seconds of clock skew tolerated when checking ``exp``, ``nbf`` and ``iat``.")
    rediscovery_lifetime: int = _option(
        30,
        "Seconds between fetches of the issuer's JWKS. A token with an unknown ``kid`` triggers a refetch "
        "at most this often, so that key rotation needs no restart.",
    )
    token_signing_algs: tuple[str, ...] = _option(
        ASYMMETRIC_ALGS,
        "Signature algorithms accepted for access tokens, further limited to those the issuer advertises. "
        "Asymmetric algorithms only.",
        choices=ASYMMETRIC_ALGS,
    )
    bearer_token_param_type: tuple[str, ...] = _option(
        ("header",),
        "Where an access token may be sent (RFC 6750 section 2): ``header``, ``query``, ``body``, ``cookie``.",
        choices=TOKEN_PARAM_TYPES,
    )
    bearer_token_cookie_name: str = _option(
        "", "The cookie holding the access token, when ``bearer_token_param_type`` includes ``cookie``."
    )
    trusted_proxies: tuple[str, ...] = _option(
        ("127.0.0.1/32", "::1/128"),
        "Networks (CIDRs) whose ``client_cert_header`` is believed. From any other peer the header is ignored.",
    )
    client_cert_header: str = _option(
        "X-SSL-Client-Cert",
        "The request header in which a trusted proxy forwards the client certificate (nginx's "
        "``$ssl_client_escaped_cert``). The uWSGI variable ``SSL_CLIENT_CERT`` always takes precedence.",
    )
    client_cert_verify_header: str = _option(
        "",
        "Off when empty. When set (e.g. ``X-SSL-Client-Verify``, nginx's ``$ssl_client_verify``), a certificate "
        "counts only if this header (or the uWSGI variable ``SSL_CLIENT_VERIFY``) is ``SUCCESS``. Leave it off "
        "with ``ssl_verify_client optional_no_ca``.",
    )
    ca_file: str = _option(
        "",
        "CA bundle for verifying the issuer's TLS certificate. Always wins over ``REQUESTS_CA_BUNDLE`` and the "
        "like; empty means the system trust store.",
    )
    ssl_verify: bool = _option(
        True,
        "Verify the issuer's TLS certificate (against ``ca_file`` or the system store). Turning this off "
        "lets anyone on the network path impersonate the issuer; ``check-config`` warns about it.",
    )
    http_timeout: float = _option(5.0, "Seconds before a request to the issuer is abandoned.")
    realm: str = _option("api", "The ``realm`` in ``WWW-Authenticate`` challenges.")
    token_cache_size: int = _option(
        10000, "Verified JWTs remembered (until their ``exp``) so their signatures are not checked again."
    )
    cert_cache_size: int = _option(1024, "Parsed client certificates remembered, keyed by the raw value.")

    proof_of_possession_auth_methods_validation: bool = _option(
        True,
        "With proof of possession on, refuse at start-up any auth method that cannot carry a binding "
        "(``authorization_code``). With ``false`` such methods are allowed and the sessions they create are not "
        "PoP-validated, while sessions created by ``bearer`` or ``introspection`` still are.",
    )

    # -- sessions ------------------------------------------------------------------
    session_secret: str = _option(
        "",
        "Secret keying the session cookie's MAC, the sealing of stored sessions and their key namespace. "
        "Required (32+ characters) with ``session``.",
    )
    session_cookie_name: str = _option("session", "The session cookie's name.")
    session_cookie_secure: bool = _option(True, "Send the session cookie over HTTPS only.")
    session_cookie_http_only: bool = _option(True, "Hide the session cookie from scripts.")
    session_cookie_same_site: str = _option(
        "Lax", "The cookie's SameSite attribute.", choices=("Strict", "Lax", "None")
    )
    session_cookie_path: str = _option("/", "The cookie's Path attribute.")
    session_cookie_domain: str = _option("", "The cookie's Domain attribute (empty: host-only).")
    session_idling_timeout: int = _option(900, "Seconds a session may go unused. 0: no limit.")
    session_rolling_timeout: int = _option(
        3600,
        "Seconds a session may be used before it must be renewed; it is renewed (a new id) automatically when "
        "used after half of this. 0: no limit.",
    )
    session_absolute_timeout: int = _option(
        86400, "Seconds a session may exist at all; never beyond its token's ``exp``. 0: only the token's ``exp``."
    )
    logout_path: str = _option("", "A path that ends the session (server side and cookie). Empty: none.")
    logout_methods: tuple[str, ...] = _option(
        ("POST", "DELETE"),
        "The methods that log out at ``logout_path``; others pass on to the app. Not GET by default, so "
        "that a cross-site link cannot end a session.",
        choices=("GET", "POST", "DELETE"),
    )
    logout_redirect_uri: str = _option("", "Where to send the browser after logout (empty: 204 No Content).")

    # -- the browser login (authorization_code) --------------------------------------
    redirect_uri: str = _option(
        "",
        "The absolute callback URL of the ``authorization_code`` login, registered at the issuer; the "
        "middleware handles requests to its path.",
    )
    login_redirect_uri: str = _option(
        "", "Where to send the browser after login; empty: back to the page that started the login."
    )
    scopes: tuple[str, ...] = _option(("openid",), "Scopes requested by the ``authorization_code`` login.")

    # -- DPoP (RFC 9449) ----------------------------------------------------------
    proof_of_possession_dpop: PopMode = _option(
        "off",
        "DPoP binding (RFC 9449). ``strict``: every token must be DPoP-bound (``cnf.jkt``) and come with a valid "
        "proof. ``optional``: tokens bound with ``cnf.jkt`` need a valid proof, others pass. ``off``: the DPoP "
        "scheme is not accepted, and a DPoP-bound token is refused (it cannot be checked).",
        choices=("strict", "optional", "off"),
    )
    dpop_proof_lifetime: int = _option(300, "Seconds a DPoP proof is accepted after its ``iat``.")
    dpop_use_nonce: bool = _option(
        False,
        "Require server-provided nonces in DPoP proofs (RFC 9449 section 8). Nonces are stateless (an HMAC "
        "over a timestamp, keyed from ``cache_secret`` or ``client_secret``), so any worker checks any other's.",
    )
    dpop_signing_alg_values_supported: tuple[str, ...] = _option(
        ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"),
        "Algorithms accepted for DPoP proofs; asymmetric only.",
        choices=ASYMMETRIC_ALGS,
    )
    dpop_replay_fail_open: bool = _option(
        False,
        "When Redis is configured but unreachable, accept DPoP proofs with only this process's replay "
        "protection instead of refusing them (401).",
    )
    public_base_url: str = _option(
        "",
        "The public URL of this app (e.g. ``https://api.example.com``), against which a DPoP proof's ``htu`` is "
        "checked. Empty: rebuilt from the request (``X-Forwarded-Proto`` from trusted proxies, ``Host``).",
    )

    # -- introspection (RFC 7662) ---------------------------------------------
    introspection_endpoint: str = _option(
        "", "The introspection endpoint; taken from the issuer's metadata when empty."
    )
    introspection_endpoint_auth_method: str = _option(
        "client_secret_basic",
        "How this resource server authenticates to the introspection endpoint: ``client_secret_basic``, "
        "``client_secret_post``, ``private_key_jwt`` (``client_jwk``) or ``tls_client_auth`` (mutual TLS with "
        "``tls_client_auth_cert_file`` and ``tls_client_auth_key_file``).",
        choices=INTROSPECTION_AUTH_METHODS,
    )
    client_id: str = _option("", "This resource server's client id at the issuer, for introspection.")
    client_secret: str = _option("", "The client secret for ``client_secret_basic`` / ``client_secret_post``.")
    client_jwk: str = _option(
        "", "Path to this resource server's private key (a JWK in JSON, or PEM) for ``private_key_jwt``."
    )
    client_alg: str = _option("ES256", "The signing algorithm of the ``private_key_jwt`` client assertion.",
                              choices=ASYMMETRIC_ALGS)
    tls_client_auth_cert_file: str = _option("", "Client certificate (PEM) for ``tls_client_auth``.")
    tls_client_auth_key_file: str = _option("", "Private key (PEM) of ``tls_client_auth_cert_file``.")
    introspection_hint: str = _option(
        "access_token", "The ``token_type_hint`` sent with each introspection request (empty: none)."
    )
    introspection_check_active: bool = _option(
        True, "Refuse a token unless the introspection response says ``active: true``."
    )
    introspect_jwt_tokens: bool = _option(
        False,
        "Also introspect JWTs (after validating them locally), so that revoked JWTs are caught within "
        "``cache_ttl_max``.",
    )

    # -- the cache -------------------------------------------------------------
    cache_introspection: bool = _option(True, "Cache introspection answers (in process, and in Redis when set).")
    cache_ttl: int = _option(300, "Seconds to cache an answer that has no ``exp``.")
    cache_ttl_max: int = _option(
        300,
        "Upper bound, in seconds, on how long any answer is cached: the worst-case delay before a revoked "
        "token stops working. 0 means no bound beyond the token's ``exp``.",
    )
    cache_ttl_min: int = _option(0, "Lower bound, in seconds, for caching; never beyond the token's ``exp``.")
    cache_ttl_neg: int = _option(10, "Seconds to cache an inactive (negative) answer.")
    cache_ttl_resurrect: int = _option(
        0,
        "Seconds a stale positive answer may still be used while the issuer is unreachable; never beyond the "
        "token's ``exp``. 0: never.",
    )
    cache_secret: str = _option(
        "",
        "Secret from which the cache's sealing key and key namespace are derived. Falls back to "
        "``client_secret``; required with Redis when there is no client secret.",
    )
    cache_l1_size: int = _option(10000, "Entries in the in-process (L1) cache.")
    cache_l1_ttl: int = _option(
        5, "With Redis, seconds an entry may live in the in-process cache before Redis is asked again."
    )
    redis_url: str = _option(
        "",
        "Redis for the shared (L2) cache: ``redis://``, ``rediss://`` or ``unix://``. Empty: in-process only.",
    )
    redis_cluster: bool = _option(False, "Treat ``redis_url`` as a Redis Cluster node.")
    redis_sentinel_master: str = _option("", "With Redis Sentinel: the master's service name.")
    redis_sentinel_nodes: tuple[str, ...] = _option((), "With Redis Sentinel: ``host:port`` of each sentinel.")
    redis_timeout: float = _option(
        0.05, "Seconds before a Redis command is abandoned; Redis trouble never holds a request for long."
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(f.name, hints[f.name], value)
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
            choices: tuple[str, ...] = f.metadata["choices"]
            if choices:
                values = coerced if isinstance(coerced, tuple) else (coerced,)
                for item in values:
                    if item not in choices:
                        raise ConfigurationError(f.name, f"{item!r} is not one of {', '.join(choices)}")
        self._validate()

    def _validate(self) -> None:
        if not self.auth_methods:
            raise ConfigurationError("auth_methods", "at least one method must be enabled")
        if "bearer" in self.auth_methods:
            if not self.issuer:
                raise ConfigurationError("issuer", "required (the URL of your identity provider)")
            if not self.audience:
                raise ConfigurationError("audience", "required: the token's aud must contain one of these")
        if self.issuer:
            _check_https("issuer", self.issuer)
        for name in ("leeway", "rediscovery_lifetime"):
            if getattr(self, name) < 0:
                raise ConfigurationError(name, "must not be negative")
        if self.leeway > 300:
            raise ConfigurationError("leeway", "more than 300 seconds defeats expiry checks")
        for name in ("token_cache_size", "cert_cache_size"):
            if getattr(self, name) < 1:
                raise ConfigurationError(name, "must be at least 1")
        if not 0 < self.http_timeout <= 120:
            raise ConfigurationError("http_timeout", "must be between 0 and 120 seconds")
        if not self.token_signing_algs:
            raise ConfigurationError("token_signing_algs", "at least one algorithm is needed")
        if not self.bearer_token_param_type:
            raise ConfigurationError("bearer_token_param_type", "at least one location is needed")
        if "cookie" in self.bearer_token_param_type and not self.bearer_token_cookie_name:
            raise ConfigurationError("bearer_token_cookie_name", "required when bearer_token_param_type has cookie")
        for name in ("client_cert_header", "client_cert_verify_header"):
            header = getattr(self, name)
            if header and not all(c.isascii() and (c.isalnum() or c == "-") for c in header):
                # nginx drops headers with underscores by default; anything else is not a header name.
                raise ConfigurationError(name, "a header name of letters, digits and '-' only")
        if not self.client_cert_header:
            raise ConfigurationError("client_cert_header", "must not be empty")
        for cidr in self.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigurationError("trusted_proxies", f"{cidr!r} is not an IP network") from None
        if self.ca_file and not os.path.isfile(self.ca_file):
            raise ConfigurationError("ca_file", f"{self.ca_file!r} is not a readable file")
        if not all(" " <= c <= "~" for c in self.realm) or '"' in self.realm or "\\" in self.realm:
            raise ConfigurationError("realm", "printable ASCII without quotes or backslashes")
        if "introspection" in self.auth_methods:
            self._validate_introspection()
        self._validate_sessions()
        if self.public_base_url:
            _check_https("public_base_url", self.public_base_url)
        if self.dpop_proof_lifetime < 1 or self.dpop_proof_lifetime > 3600:
            raise ConfigurationError("dpop_proof_lifetime", "must be between 1 and 3600 seconds")
        if not self.dpop_signing_alg_values_supported:
            raise ConfigurationError("dpop_signing_alg_values_supported", "at least one algorithm is needed")
        if self.dpop_use_nonce and len(self.shared_secret) < 16:
            raise ConfigurationError(
                "cache_secret",
                "dpop_use_nonce needs a shared secret of 16+ characters so that every worker checks every nonce",
            )
        for name in ("cache_ttl", "cache_ttl_max", "cache_ttl_min", "cache_ttl_neg", "cache_ttl_resurrect",
                     "cache_l1_ttl"):
            if getattr(self, name) < 0:
                raise ConfigurationError(name, "must not be negative")
        if self.cache_l1_size < 1:
            raise ConfigurationError("cache_l1_size", "must be at least 1")
        if self.cache_ttl_max and self.cache_ttl_min > self.cache_ttl_max:
            raise ConfigurationError("cache_ttl_min", "must not exceed cache_ttl_max")
        if not 0 < self.redis_timeout <= 10:
            raise ConfigurationError("redis_timeout", "must be between 0 and 10 seconds")
        if self.redis_url and urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigurationError("redis_url", "must start with redis://, rediss:// or unix://")
        if self.redis_sentinel_master and not self.redis_sentinel_nodes:
            raise ConfigurationError("redis_sentinel_nodes", "required with redis_sentinel_master")
        if self.uses_redis and not self.shared_secret:
            raise ConfigurationError("cache_secret", "required with Redis when there is no client_secret")
        if self.uses_redis and len(self.shared_secret) < 16:
            raise ConfigurationError("cache_secret", "at least 16 characters (it keys the sealed Redis entries)")

    @property
    def tls_verify(self) -> str | bool:
        """The ``verify=`` for every request to the issuer: ``ca_file`` always wins over the environment."""
        return (self.ca_file or True) if self.ssl_verify else False

    @property
    def pop_enabled(self) -> bool:
        """Whether any proof of possession (mTLS or DPoP) is on."""
        return self.proof_of_possession_mtls != "off" or self.proof_of_possession_dpop != "off"

    def _validate_sessions(self) -> None:
        methods = self.auth_methods
        if "authorization_code" in methods and "session" not in methods:
            raise ConfigurationError("auth_methods", "authorization_code needs session (the login creates one)")
        if self.pop_enabled and self.proof_of_possession_auth_methods_validation:
            for method in methods:
                if method not in POP_COMPATIBLE_METHODS:
                    raise ConfigurationError(
                        "auth_methods",
                        f"{method} cannot carry a proof-of-possession binding; turn "
                        "proof_of_possession_auth_methods_validation off to allow it unbound",
                    )
        if "session" in methods:
            if len(self.session_secret) < 32:
                raise ConfigurationError("session_secret", "required with session: 32 or more characters")
            if not any(m in methods for m in ("bearer", "introspection", "authorization_code")):
                raise ConfigurationError("auth_methods", "session needs another method to create sessions")
        for name in ("session_idling_timeout", "session_rolling_timeout", "session_absolute_timeout"):
            if getattr(self, name) < 0:
                raise ConfigurationError(name, "must not be negative")
        name = self.session_cookie_name
        if not name or not all(c.isascii() and (c.isalnum() or c in "-_") for c in name):
            raise ConfigurationError("session_cookie_name", "ASCII letters, digits, '-' and '_' only")
        if self.session_cookie_domain and not _visible(self.session_cookie_domain, ";,\"="):
            raise ConfigurationError("session_cookie_domain", "a domain name: visible ASCII without ';', ',' or quotes")
        if self.session_cookie_same_site == "None" and not self.session_cookie_secure:
            raise ConfigurationError("session_cookie_same_site", "None requires session_cookie_secure")
        for name in ("logout_path", "session_cookie_path"):
            path = getattr(self, name)
            if path and (not path.startswith("/") or not _visible(path, ';,"')):
                raise ConfigurationError(name, "an absolute path without ';', ',', quotes or spaces")
        if "authorization_code" in methods:
            if not self.redirect_uri:
                raise ConfigurationError("redirect_uri", "required with authorization_code")
            _check_https("redirect_uri", self.redirect_uri)
            if not self.client_id or not self.client_secret:
                raise ConfigurationError("client_id", "client_id and client_secret are needed for authorization_code")
            if "openid" not in self.scopes:
                raise ConfigurationError("scopes", "must include openid")
        for name in ("login_redirect_uri", "logout_redirect_uri"):
            value = getattr(self, name)
            if value and not (value.startswith("/") and not value.startswith("//")):
                _check_https(name, value)
            elif value and not _visible(value, '"<>\\'):
                raise ConfigurationError(name, "a path of visible ASCII characters only")

    @property
    def shared_secret(self) -> str:
        """The secret shared by every worker and host for sealing, key names and nonces:
        ``cache_secret``, or ``client_secret`` when that is unset; empty when neither is."""
        return self.cache_secret or self.client_secret

    @property
    def uses_redis(self) -> bool:
        """Whether a shared Redis cache is configured."""
        return bool(self.redis_url or self.redis_sentinel_master)

    def _validate_introspection(self) -> None:
        if not self.issuer and not self.introspection_endpoint:
            raise ConfigurationError("introspection_endpoint", "required when there is no issuer to discover it")
        if self.introspection_endpoint:
            _check_https("introspection_endpoint", self.introspection_endpoint)
        if not self.audience:
            raise ConfigurationError("audience", "required: the token's aud must contain one of these")
        method = self.introspection_endpoint_auth_method
        if not self.client_id:
            raise ConfigurationError("client_id", "required for introspection")
        if method in ("client_secret_basic", "client_secret_post") and not self.client_secret:
            raise ConfigurationError("client_secret", f"required with {method}")
        if method == "private_key_jwt" and not self.client_jwk:
            raise ConfigurationError("client_jwk", "required with private_key_jwt")
        if method == "tls_client_auth":
            for name in ("tls_client_auth_cert_file", "tls_client_auth_key_file"):
                if not getattr(self, name):
                    raise ConfigurationError(name, "required with tls_client_auth")
        for name in ("client_jwk", "tls_client_auth_cert_file", "tls_client_auth_key_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigurationError(name, f"{path!r} is not a readable file")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], prefix: str = ENV_PREFIX) -> Settings:
        """Build settings from ``PREFIX<OPTION>`` keys of ``mapping``.

        Values may be strings (as in the environment) or already typed (as in
        Flask's ``app.config``). A key with the prefix that names no option is
        an error, so that a typo cannot silently leave a default in force.

        :param mapping: e.g. ``os.environ`` or ``app.config``.
        :param prefix: the key prefix, ``CERTBOUND_`` by default.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in mapping.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):].lower()
            if name in names:
                kwargs[name] = value
            elif key[len(prefix):] not in _NOT_OPTIONS:
                raise ConfigurationError(name, f"{key} is not a known option")
        return cls(**kwargs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, prefix: str = ENV_PREFIX) -> Settings:
        """Build settings from ``CERTBOUND_*`` environment variables.

        Lists are comma separated; booleans are ``true``/``false``, ``1``/``0``, ``yes``/``no``.

        :param environ: defaults to :data:`os.environ`.
        :param prefix: the variable prefix.
        """
        return cls.from_mapping(os.environ if environ is None else environ, prefix)

    def masked(self) -> dict[str, Any]:
        """The effective settings with secrets masked, for display."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_OPTIONS and value:
                value = "********"
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _visible(value: str, forbidden: str = "") -> bool:
    """Visible ASCII only (no space, no control character) and none of ``forbidden``: safe in a header."""
    return all("!" <= c <= "~" and c not in forbidden for c in value)


def _check_https(option: str, url: str) -> None:
    # urlsplit silently drops CR, LF and tab, so check the raw text first: these values
    # reach response headers (Location) and outgoing requests.
    if not _visible(url, '"<>\\'):
        raise ConfigurationError(option, "a URL of visible ASCII characters only")
    parts = urlsplit(url)
    loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ConfigurationError(option, "must be an https:// URL (http:// only for loopback)")
    if not parts.hostname or parts.query or parts.fragment:
        raise ConfigurationError(option, "must be an absolute URL without query or fragment")


def env_name(option: str, prefix: str = ENV_PREFIX) -> str:
    return prefix + option.upper()


def _coerce(name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            items = [item.strip() for item in value.split(",")]
            return tuple(item for item in items if item)
        if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
            return value if isinstance(value, tuple) else tuple(value)
        raise ConfigurationError(name, "expected a list of strings (comma separated in the environment)")
    if origin is Literal or hint is str:
        if not isinstance(value, str):
            raise ConfigurationError(name, "expected a string")
        return value.strip() if value != value.strip() else value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        raise ConfigurationError(name, "expected true or false")
    if hint is int or hint is float:
        if isinstance(value, bool):
            raise ConfigurationError(name, "expected a number")
        if isinstance(value, str):
            try:
                value = float(value.strip()) if hint is float else int(value.strip())
            except ValueError:
                raise ConfigurationError(name, f"expected {'an integer' if hint is int else 'a number'}") from None
        if not isinstance(value, (int, float)) or not _finite(value):
            raise ConfigurationError(name, "expected a finite number")
        if hint is int:
            if not float(value).is_integer():
                raise ConfigurationError(name, "expected an integer")
            return int(value)
        return float(value)
    raise ConfigurationError(name, f"unsupported type {hint!r}")  # pragma: no cover
