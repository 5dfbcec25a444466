"""Configuration: one frozen, typed object.

Every option has a default, a docstring and an environment variable named
``CERTBOUND_<OPTION>``. Names follow Kong Gateway's OpenID Connect plugin so
that users moving from Kong recognise them. The table in
``docs/configuration`` is generated from this module.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import ConfigurationError

__all__ = ["ENV_PREFIX", "Settings", "check_config_command"]

ENV_PREFIX = "CERTBOUND_"

#: Environment variables with the prefix that are not options.
_NOT_OPTIONS = frozenset({"APP"})

PopMode = Literal["strict", "optional", "off"]

AUTH_METHODS = ("bearer",)
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
        ("bearer",), "Enabled authentication methods. ``bearer``: JWT access tokens validated locally.",
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
    http_timeout: float = _option(5.0, "Seconds before a request to the issuer is abandoned.")
    realm: str = _option("api", "The ``realm`` in ``WWW-Authenticate`` challenges.")
    token_cache_size: int = _option(
        10000, "Verified JWTs remembered (until their ``exp``) so their signatures are not checked again."
    )
    cert_cache_size: int = _option(1024, "Parsed client certificates remembered, keyed by the raw value.")

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
            parts = urlsplit(self.issuer)
            loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
            if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
                raise ConfigurationError("issuer", "must be an https:// URL (http:// only for loopback)")
            if not parts.hostname or parts.query or parts.fragment:
                raise ConfigurationError("issuer", "must be an absolute URL without query or fragment")
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
            if header and not all(c.isalnum() or c == "-" for c in header):
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
        if '"' in self.realm or "\\" in self.realm:
            raise ConfigurationError("realm", "must not contain quotes or backslashes")

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
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigurationError(name, "expected a finite number")
        if hint is int:
            if not float(value).is_integer():
                raise ConfigurationError(name, "expected an integer")
            return int(value)
        return float(value)
    raise ConfigurationError(name, f"unsupported type {hint!r}")  # pragma: no cover


def check_config_command() -> int:
    """``certbound-wsgi check-config``: validate, discover and print the effective settings."""
    from .discovery import Discovery, DiscoveryError

    try:
        settings = Settings.from_env()
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(settings.masked(), indent=2))
    if "bearer" not in settings.auth_methods:
        return 0
    try:
        metadata, keys = Discovery(settings).check()
    except DiscoveryError as exc:
        print(f"discovery failed: {exc}", file=sys.stderr)
        return 1
    print(f"issuer metadata: {metadata.get('issuer')} (jwks_uri {metadata.get('jwks_uri')})")
    print(f"signing keys: {', '.join(keys) or 'none'}")
    return 0
