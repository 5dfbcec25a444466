"""Configuration: one frozen, typed object.

Every option has a default, a description, its :class:`Rules` (allowed values,
range, a check of its shape) and an environment variable named
``CERTBOUND_<OPTION>``, all declared in one place. Names follow Kong Gateway's
OpenID Connect plugin so that users moving from Kong recognise them. The table
in ``docs/configuration`` is generated from this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from . import pem_files
from .cert_headers import FORMATS, MAX_XFCC_ELEMENTS, CertificateFormat
from .channel import DEFAULT_SECRET_HEADER, check_secret
from .errors import ConfigurationError
from .proxies import parse_networks
from .public_paths import PublicPaths

__all__ = ["ENV_PREFIX", "Rules", "Settings", "env_name", "rules_of"]

ENV_PREFIX = "CERTBOUND_"

#: Environment variables with the prefix that are not options.
_NOT_OPTIONS = frozenset({"APP"})

#: Names a Kong user types, and the option they mean here. Kong's own ``audience`` is the
#: audience *requested* from the issuer; the one it validates is ``audience_required``.
ALIASES = {"audience_required": "audience"}

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
_SECRET_OPTIONS = frozenset({"session_secret", "client_secret", "cache_secret", "proxy_secret"})


Check = Callable[[Any], object]


@dataclass(frozen=True)
class Rules:
    """What one option accepts beyond its type, declared beside it.

    :meth:`Settings.__post_init__` enforces them and the options table in the docs
    shows them, so the limit a user reads is the limit the code applies.

    :param doc: the option's description.
    :param choices: the only values allowed (each item, for a list).
    :param min: the smallest number allowed.
    :param max: the largest number allowed.
    :param above: a number the value must exceed (a timeout of 0 would be no timeout).
    :param required: an empty string or list is refused.
    :param check: called with a non-empty value; raises :class:`ValueError` saying what is wrong.
    """

    doc: str
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    above: float | None = None
    required: bool = False
    check: Check | None = None

    def range(self) -> str:
        """The numbers allowed, in words (``from 0 to 300``); empty when any number is."""
        if self.min is not None and self.max is not None:
            return f"from {_number(self.min)} to {_number(self.max)}"
        bounds = (("more than", self.above), ("at least", self.min), ("at most", self.max))
        return ", ".join(f"{words} {_number(bound)}" for words, bound in bounds if bound is not None)

    def validate(self, name: str, value: Any) -> None:
        """Refuse ``value`` for the option ``name`` unless it keeps these rules.

        :raises ConfigurationError: naming the option.
        """
        if value == "" or value == ():
            if self.required:
                raise ConfigurationError(name, "needs at least one value" if value == () else "must not be empty")
            return
        for item in value if isinstance(value, tuple) else (value,):
            if self.choices and item not in self.choices:
                raise ConfigurationError(name, f"{item!r} is not one of {', '.join(self.choices)}")
        if not self._in_range(value):
            raise ConfigurationError(name, f"must be {self.range()}")
        if self.check is not None:
            try:
                self.check(value)
            except ValueError as exc:
                raise ConfigurationError(name, str(exc)) from None

    def _in_range(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True
        return (
            (self.min is None or value >= self.min)
            and (self.max is None or value <= self.max)
            and (self.above is None or value > self.above)
        )


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _option(
    default: Any,
    doc: str,
    *,
    choices: tuple[str, ...] = (),
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    required: bool = False,
    check: Check | None = None,
) -> Any:
    """A :class:`Settings` field: its default, and the :class:`Rules` that validation and the docs read."""
    rules = Rules(doc, choices, min, max, above, required, check)
    metadata = {"rules": rules}
    if isinstance(default, (list, tuple)):
        value = tuple(default)
        return field(default_factory=lambda: value, metadata=metadata)
    return field(default=default, metadata=metadata)


def rules_of(option: dataclasses.Field[Any]) -> Rules:
    """The :class:`Rules` declared with a :class:`Settings` field."""
    rules: Rules = option.metadata["rules"]
    return rules


# -- checks of one value: each raises ValueError saying what is wrong ----------------


def _visible(value: str, forbidden: str = "") -> bool:
    """Visible ASCII only (no space, no control character) and none of ``forbidden``: safe in a header."""
    return all("!" <= c <= "~" and c not in forbidden for c in value)


def _https_url(url: str) -> None:
    # urlsplit silently drops CR, LF and tab, so check the raw text first: these values
    # reach response headers (Location) and outgoing requests.
    if not _visible(url, '"<>\\'):
        raise ValueError("a URL of visible ASCII characters only")
    parts = urlsplit(url)
    loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ValueError("must be an https:// URL (http:// only for loopback)")
    if not parts.hostname or parts.query or parts.fragment:
        raise ValueError("must be an absolute URL without query or fragment")


def _local_path_or_https_url(value: str) -> None:
    """Where a browser is sent: a path on this site (not ``//host``, another site) or an https URL."""
    if not (value.startswith("/") and not value.startswith("//")):
        _https_url(value)
    elif not _visible(value, '"<>\\'):
        raise ValueError("a path of visible ASCII characters only")


def _absolute_path(path: str) -> None:
    if not path.startswith("/") or not _visible(path, ';,"'):
        raise ValueError("an absolute path without ';', ',', quotes or spaces")


def _header_name(header: str) -> None:
    # nginx drops headers with underscores by default; anything else is not a header name.
    if not all(c.isascii() and (c.isalnum() or c == "-") for c in header):
        raise ValueError("a header name of letters, digits and '-' only")


def _readable_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a readable file")


def _ca_bundle(path: str) -> None:
    _readable_file(path)
    try:
        pem_files.read_certificates(path)
    except ValueError as exc:
        raise ValueError(f"{exc}; give the CA certificate(s) that signed the issuer's TLS certificate") from None


def _quotable(realm: str) -> None:
    # RFC 7235 section 2.2: the realm is a quoted-string; quotes and backslashes would need escaping.
    if not all(" " <= c <= "~" for c in realm) or '"' in realm or "\\" in realm:
        raise ValueError("printable ASCII without quotes or backslashes")


def _cookie_name(name: str) -> None:
    if not all(c.isascii() and (c.isalnum() or c in "-_") for c in name):
        raise ValueError("ASCII letters, digits, '-' and '_' only")


def _cookie_domain(domain: str) -> None:
    if not _visible(domain, ';,"='):
        raise ValueError("a domain name: visible ASCII without ';', ',' or quotes")


def _https_urls(urls: tuple[str, ...]) -> None:
    for url in urls:
        _https_url(url)


def _issuer_audiences(items: tuple[str, ...]) -> None:
    for item in items:
        issuer, sep, audience = item.partition("=")
        if not sep or not audience:
            raise ValueError(f"{item!r} is not ISSUER=AUDIENCE")
        _https_url(issuer)


def _redis_url(url: str) -> None:
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must start with redis://, rediss:// or unix://")


def _hosts(hosts: tuple[str, ...]) -> None:
    """``Host`` header values: ``host`` or ``host:port`` (RFC 9110 section 7.2)."""
    for host in hosts:
        parts = urlsplit(f"http://{host}/")
        try:
            parts.port  # noqa: B018 - a port out of range raises here
        except ValueError:
            raise ValueError(f"{host!r} has an invalid port") from None
        if not _visible(host, '/?#@"\\') or not parts.hostname:
            raise ValueError(f"{host!r} is not a host or host:port")


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
        check=_https_url,
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
        required=True,
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
    leeway: int = _option(
        0,
        "Seconds of clock skew tolerated when checking ``exp``, ``nbf`` and ``iat``; more than five minutes "
        "would defeat expiry checks.",
        min=0,
        max=300,
    )
    rediscovery_lifetime: int = _option(
        30,
        "Seconds between refreshes of each issuer's metadata and JWKS (shorter when the JWKS's "
        "``Cache-Control: max-age`` says so, but not under 1 second). A key removed at the issuer is refused "
        "by every worker from its first request after this period (plus ``http_timeout``). A token with an "
        "unknown ``kid`` triggers an immediate refresh (at most one a second), so that key rotation needs no "
        "restart. 0: every second, and before each validation of a token not seen before (for tests).",
        min=0,
    )
    discovery_max_staleness: int = _option(
        21600,
        "Seconds the last successfully fetched metadata and keys may still be used while the issuer cannot be "
        "reached (with Redis, also by a worker started after the issuer went down: the copy is shared, "
        "sealed). Past this, tokens of that issuer are answered 503 until it is back.",
        min=1,
    )
    issuers_allowed: tuple[str, ...] = _option(
        (),
        "Further issuers (as in Kong) whose JWT access tokens are accepted besides ``issuer``. A token is routed "
        "by its ``iss`` to that issuer's own discovery and keys: a token naming one issuer and signed with "
        "another's key is refused.",
        check=_https_urls,
    )
    issuer_audiences: tuple[str, ...] = _option(
        (),
        "Audiences per issuer, as ``ISSUER=AUDIENCE`` items (repeat an issuer for several audiences). An "
        "issuer without an item here accepts ``audience``.",
        check=_issuer_audiences,
    )
    token_signing_algs: tuple[str, ...] = _option(
        ASYMMETRIC_ALGS,
        "Signature algorithms accepted for access tokens, further limited to those the issuer advertises. "
        "Asymmetric algorithms only.",
        choices=ASYMMETRIC_ALGS,
        required=True,
    )
    bearer_token_param_type: tuple[str, ...] = _option(
        ("header",),
        "Where an access token may be sent (RFC 6750 section 2): ``header``, ``query``, ``body``, ``cookie``.",
        choices=TOKEN_PARAM_TYPES,
        required=True,
    )
    bearer_token_cookie_name: str = _option(
        "", "The cookie holding the access token, when ``bearer_token_param_type`` includes ``cookie``."
    )
    proxy_secret: str = _option(
        "",
        "A per-deployment secret that nginx adds to every request (``certbound-wsgi nginx-config`` renders "
        "it): a forwarded certificate is believed only from a request that carries it, compared in constant "
        "time. The one proof that works over TCP; removed from the environ before the app runs, masked in "
        "``check-config``. 32 to 512 characters of ``A-Za-z0-9._~+/=-``.",
        check=check_secret,
    )
    proxy_secret_header: str = _option(
        DEFAULT_SECRET_HEADER,
        "The header in which nginx sends ``proxy_secret`` to gunicorn. Under uWSGI it is always the uwsgi "
        "variable ``CERTBOUND_PROXY_SECRET``, which no client header can produce.",
        required=True,
        check=_header_name,
    )
    trusted_proxies: tuple[str, ...] = _option(
        (),
        "Peers whose forwarded certificate is believed without ``proxy_secret``: the keyword ``unix`` (the "
        "worker's Unix socket, which only nginx can open; under uWSGI, only when every socket is a Unix "
        "socket) and networks (CIDRs: address-only trust, warned at start-up, and ignored under uWSGI, where "
        "the sender of a uwsgi packet writes ``REMOTE_ADDR``). With ``proxy_secret`` as well, both must hold. "
        "Empty: only the secret is believed.",
        check=parse_networks,
    )
    forwarded_for_hops: int = _option(
        1,
        "How many trusted proxies append to ``X-Forwarded-For`` (1: nginx alone). The audit trail's client "
        "address is the entry this many places from the right, read only from a peer in ``trusted_proxies``.",
        min=1,
        max=10,
    )
    client_cert_header: str = _option(
        "X-SSL-Client-Cert",
        "The request header in which a trusted proxy forwards the client certificate (nginx's "
        "``$ssl_client_escaped_cert``). The uWSGI variable ``SSL_CLIENT_CERT`` always takes precedence. "
        "Letters, digits and ``-`` only: nginx drops headers with underscores.",
        required=True,
        check=_header_name,
    )
    client_cert_format: CertificateFormat = _option(
        "escaped_pem",
        "The shape in which the proxy writes ``client_cert_header``; configured, never guessed from the value, "
        "and a value not exactly of this shape is refused (401). ``escaped_pem``: nginx's "
        "``$ssl_client_escaped_cert``, ingress-nginx ``ssl-client-cert``, AWS ALB. ``pem``: PEM on one line. "
        "``rfc9440``: RFC 9440 ``Client-Cert`` (Caddy). ``base64_der``: HAProxy ``ssl_c_der,base64``, Traefik. "
        "``xfcc``: Envoy/Istio ``x-forwarded-client-cert``. The uWSGI variable ``SSL_CLIENT_CERT`` is always "
        "``escaped_pem``, whatever this says. See the proxies page.",
        choices=FORMATS,
    )
    client_cert_xfcc_hops: int = _option(
        1,
        "With ``client_cert_format=xfcc``: which element of ``x-forwarded-client-cert`` to read, counted from the "
        "last (1: the element the nearest proxy appended; 2: the one before it, e.g. an ingress gateway's behind "
        "a mesh sidecar). Elements further away may have been written by the client.",
        min=1,
        max=MAX_XFCC_ELEMENTS,
    )
    client_cert_verify_header: str = _option(
        "",
        "Off when empty. When set (e.g. ``X-SSL-Client-Verify``, nginx's ``$ssl_client_verify``), a certificate "
        "counts only if this header (or the uWSGI variable ``SSL_CLIENT_VERIFY``) is ``SUCCESS``. Leave it off "
        "with ``ssl_verify_client optional_no_ca``.",
        check=_header_name,
    )
    ca_file: str = _option(
        "",
        "CA bundle for verifying the issuer's TLS certificate. Always wins over ``REQUESTS_CA_BUNDLE`` and the "
        "like; empty means the system trust store. Must hold certificates (PEM, or DER), not a key.",
        check=_ca_bundle,
    )
    ssl_verify: bool = _option(
        True,
        "Verify the issuer's TLS certificate (against ``ca_file`` or the system store). Turning this off "
        "lets anyone on the network path impersonate the issuer; ``check-config`` warns about it.",
    )
    http_timeout: float = _option(5.0, "Seconds before a request to the issuer is abandoned.", above=0, max=120)
    realm: str = _option(
        "api", "The ``realm`` in ``WWW-Authenticate`` challenges: printable ASCII without quotes or backslashes.",
        check=_quotable,
    )
    token_cache_size: int = _option(
        10000, "Verified JWTs remembered (until their ``exp``) so their signatures are not checked again; as many "
        "accepted decisions (the header and the certificate's thumbprint) are remembered beside them.", min=1
    )
    cert_cache_size: int = _option(1024, "Parsed client certificates remembered, keyed by the raw value.", min=1)

    # -- operations: the audit trail, public paths, health -------------------------
    audit_log_format: str = _option(
        "text",
        "The audit events' format on the ``certbound_wsgi.audit`` logger: ``text`` (one ``key=value`` line) "
        "or ``json`` (one object a line).",
        choices=("text", "json"),
    )
    audit_log_stderr: bool = _option(
        True,
        "Write the audit events to stderr while nothing else configures logging (as under a bare gunicorn or "
        "uWSGI); once the application configures logging, its handlers get them instead.",
    )
    audit_trust_request_id: bool = _option(
        False,
        "Take the request id from a trusted proxy's ``X-Request-Id``. Turn it on only when the proxy overwrites "
        "the header (nginx: ``proxy_set_header X-Request-Id $request_id``); otherwise one is generated.",
    )
    public_paths: tuple[str, ...] = _option(
        (),
        "Paths that pass without a token: ``/healthz`` matches exactly that path, ``/static/`` every path under "
        "it. Literal paths, never patterns; a path with another spelling (``//``, ``..``, ``%``) is not public.",
        check=PublicPaths,
    )
    readiness_path: str = _option(
        "",
        "A path answering 200 when tokens can be validated (keys loaded, issuer reachable, Redis up when it "
        "is needed) and 503 with ``Retry-After`` when not, with a JSON body naming each check. Empty: none.",
        check=_absolute_path,
    )
    liveness_path: str = _option(
        "", "A path answering 200 ``{\"status\":\"ok\"}`` while the process serves requests. Empty: none.",
        check=_absolute_path,
    )

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
    session_cookie_name: str = _option(
        "session",
        "The session cookie's name: ASCII letters, digits, ``-`` and ``_``. It is sent with the strongest "
        "prefix its attributes allow (RFC 6265bis section 4.1.3): ``__Host-`` when Secure, host-only and "
        "``Path=/`` (the defaults), ``__Secure-`` when Secure, none otherwise. The browser login's state "
        "cookie is ``__Host-<name>_login`` (``<name>_login`` when not Secure).",
        required=True,
        check=_cookie_name,
    )
    session_cookie_secure: bool = _option(True, "Send the session cookie over HTTPS only.")
    session_cookie_http_only: bool = _option(True, "Hide the session cookie from scripts.")
    session_cookie_same_site: str = _option(
        "Lax", "The cookie's SameSite attribute.", choices=("Strict", "Lax", "None")
    )
    session_cookie_path: str = _option("/", "The cookie's Path attribute.", check=_absolute_path)
    session_cookie_domain: str = _option(
        "", "The cookie's Domain attribute (empty: host-only).", check=_cookie_domain
    )
    session_idling_timeout: int = _option(900, "Seconds a session may go unused. 0: no limit.", min=0)
    session_rolling_timeout: int = _option(
        3600,
        "Seconds a session may be used before it must be renewed; it is renewed (a new id) automatically when "
        "used after half of this. 0: no limit.",
        min=0,
    )
    session_absolute_timeout: int = _option(
        86400,
        "Seconds a session may exist at all; never beyond its token's ``exp``. 0: only the token's ``exp``.",
        min=0,
    )
    logout_path: str = _option(
        "", "A path that ends the session (server side and cookie). Empty: none.", check=_absolute_path
    )
    logout_methods: tuple[str, ...] = _option(
        ("POST", "DELETE"),
        "The methods that log out at ``logout_path``; others pass on to the app. Not GET by default, so "
        "that a cross-site link cannot end a session.",
        choices=("GET", "POST", "DELETE"),
    )
    logout_redirect_uri: str = _option(
        "",
        "Where to send the browser after logout (empty: 204 No Content): a path on this site or an https URL.",
        check=_local_path_or_https_url,
    )

    # -- the browser login (authorization_code) --------------------------------------
    redirect_uri: str = _option(
        "",
        "The absolute callback URL of the ``authorization_code`` login, registered at the issuer; the "
        "middleware handles requests to its path.",
        check=_https_url,
    )
    login_redirect_uri: str = _option(
        "",
        "Where to send the browser after login (a path on this site or an https URL); empty: back to the page "
        "that started the login.",
        check=_local_path_or_https_url,
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
    dpop_proof_lifetime: int = _option(300, "Seconds a DPoP proof is accepted after its ``iat``.", min=1, max=3600)
    dpop_use_nonce: bool = _option(
        False,
        "Require server-provided nonces in DPoP proofs (RFC 9449 section 8). Nonces are stateless (an HMAC "
        "over a timestamp, keyed from ``cache_secret`` or ``client_secret``), so any worker checks any other's.",
    )
    dpop_signing_alg_values_supported: tuple[str, ...] = _option(
        ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"),
        "Algorithms accepted for DPoP proofs; asymmetric only.",
        choices=ASYMMETRIC_ALGS,
        required=True,
    )
    dpop_replay_fail_open: bool = _option(
        False,
        "When the replay store (Redis) cannot be asked, accept DPoP proofs with only this process's replay "
        "protection instead of refusing them (503).",
    )
    dpop_replay_redis_url: str = _option(
        "",
        "A Redis of its own for the DPoP replay store (``redis://``, ``rediss://`` or ``unix://``); its "
        "``maxmemory-policy`` must be ``noeviction``. Empty: the cache's Redis (``redis_url``, Sentinel or "
        "Cluster), which must then be ``noeviction`` too.",
        check=_redis_url,
    )
    public_base_url: str = _option(
        "",
        "The public URL of this app (e.g. ``https://api.example.com``), against which a DPoP proof's ``htu`` is "
        "checked. DPoP needs it, or ``dpop_allowed_hosts``.",
        check=_https_url,
    )
    dpop_allowed_hosts: tuple[str, ...] = _option(
        (),
        "Instead of ``public_base_url``, for an app served under several host names: the ``Host`` values "
        "(``host`` or ``host:port``) for which a DPoP proof's ``htu`` is rebuilt from the request "
        "(``X-Forwarded-Proto`` from trusted proxies, ``Host``). A request for any other host is refused.",
        check=_hosts,
    )

    # -- introspection (RFC 7662) ---------------------------------------------
    introspection_endpoint: str = _option(
        "", "The introspection endpoint; taken from the issuer's metadata when empty.", check=_https_url
    )
    introspection_endpoint_auth_method: str = _option(
        "client_secret_basic",
        "How this resource server authenticates to the introspection endpoint: ``client_secret_basic``, "
        "``client_secret_post``, ``private_key_jwt`` (``client_jwk``) or ``tls_client_auth`` (mutual TLS with "
        "``tls_client_auth_cert_file`` and ``tls_client_auth_key_file``).",
        choices=INTROSPECTION_AUTH_METHODS,
    )
    token_endpoint_auth_method: str = _option(
        "client_secret_basic",
        "How the ``authorization_code`` login authenticates its code exchange at the token endpoint: "
        "``client_secret_basic``, ``client_secret_post`` or ``private_key_jwt`` (``client_jwk``).",
        choices=("client_secret_basic", "client_secret_post", "private_key_jwt"),
    )
    client_id: str = _option("", "This resource server's client id at the issuer, for introspection.")
    client_secret: str = _option("", "The client secret for ``client_secret_basic`` / ``client_secret_post``.")
    client_jwk: str = _option(
        "", "Path to this resource server's private key (a JWK in JSON, or PEM) for ``private_key_jwt``.",
        check=_readable_file,
    )
    client_jwk_next: str = _option(
        "",
        "Path to the next private key (JWK or PEM): published at ``client_jwks_path`` but not used to sign, "
        "so that the issuer has it before it signs. To rotate: set it, wait until the issuer has refetched "
        "the JWKS, then make it ``client_jwk``.",
        check=_readable_file,
    )
    client_jwks_path: str = _option(
        "",
        "Where this resource server publishes the public part of ``client_jwk`` and ``client_jwk_next`` as a "
        "JWKS, for an issuer that authenticates ``private_key_jwt`` with a ``jwks_uri`` (e.g. "
        "``/.well-known/jwks.json``). Unauthenticated and cacheable. Empty: not published.",
        check=_absolute_path,
    )
    client_alg: str = _option("ES256", "The signing algorithm of the ``private_key_jwt`` client assertion.",
                              choices=ASYMMETRIC_ALGS)
    tls_client_auth_cert_file: str = _option(
        "", "Client certificate (PEM) for ``tls_client_auth``.", check=_readable_file
    )
    tls_client_auth_key_file: str = _option(
        "", "Private key (PEM) of ``tls_client_auth_cert_file``.", check=_readable_file
    )
    introspection_hint: str = _option(
        "access_token", "The ``token_type_hint`` sent with each introspection request (empty: none)."
    )
    introspection_check_active: bool = _option(
        True, "Refuse a token unless the introspection response says ``active: true``."
    )
    introspection_token_type_required: bool = _option(
        True,
        "Refuse an introspection answer without ``token_type`` (RFC 7662 section 2.2). oidc-provider omits it for "
        "refresh tokens only, so without it a refresh token could pass as an access token; turn off only for an "
        "issuer that never sends it. An answer whose ``token_type`` is not ``Bearer`` or ``DPoP`` is always "
        "refused.",
    )
    introspect_jwt_tokens: bool = _option(
        False,
        "Also introspect JWTs (after validating them locally), so that revoked JWTs are caught within "
        "``cache_ttl_max``.",
    )

    # -- the cache -------------------------------------------------------------
    cache_introspection: bool = _option(True, "Cache introspection answers (in process, and in Redis when set).")
    cache_ttl: int = _option(300, "Seconds to cache an answer that has no ``exp``.", min=0)
    cache_ttl_max: int = _option(
        300,
        "Upper bound, in seconds, on how long any answer is cached: the worst-case delay before a revoked "
        "token stops working. 0 means no bound beyond the token's ``exp``.",
        min=0,
    )
    cache_ttl_min: int = _option(
        0, "Lower bound, in seconds, for caching; never beyond the token's ``exp`` nor ``cache_ttl_max``.", min=0
    )
    cache_ttl_neg: int = _option(10, "Seconds to cache an inactive (negative) answer.", min=0)
    cache_ttl_resurrect: int = _option(
        0,
        "Seconds a stale positive answer may still be used while the issuer is unreachable; never beyond the "
        "token's ``exp``. 0: never.",
        min=0,
    )
    cache_secret: str = _option(
        "",
        "Secret from which the cache's sealing key and key namespace are derived. Falls back to "
        "``client_secret``; required with Redis when there is no client secret.",
    )
    cache_l1_size: int = _option(
        10000,
        "Entries in the in-process (L1) cache. Each kind kept in process (introspection answers, sessions, "
        "used login states, the sessions a process knows) has its own bound of this size.",
        min=1,
    )
    cache_l1_ttl: int = _option(
        5,
        "With Redis, seconds an entry may live in the in-process cache before Redis is asked again; also how "
        "long a process trusts, without asking Redis, that a token's session exists.",
        min=0,
    )
    redis_url: str = _option(
        "",
        "Redis for the shared (L2) cache: ``redis://``, ``rediss://`` or ``unix://``. Empty: in-process only.",
        check=_redis_url,
    )
    redis_cluster: bool = _option(False, "Treat ``redis_url`` as a Redis Cluster node.")
    redis_sentinel_master: str = _option("", "With Redis Sentinel: the master's service name.")
    redis_sentinel_nodes: tuple[str, ...] = _option((), "With Redis Sentinel: ``host:port`` of each sentinel.")
    redis_timeout: float = _option(
        0.05,
        "Seconds before a Redis command is abandoned; Redis trouble never holds a request for long.",
        above=0,
        max=10,
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(f.name, hints[f.name], value)
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
            rules_of(f).validate(f.name, coerced)
        self._validate()

    @property
    def tls_verify(self) -> str | bool:
        """The ``verify=`` for every request to the issuer: ``ca_file`` always wins over the environment."""
        return (self.ca_file or True) if self.ssl_verify else False

    @property
    def pop_enabled(self) -> bool:
        """Whether any proof of possession (mTLS or DPoP) is on."""
        return self.proof_of_possession_mtls != "off" or self.proof_of_possession_dpop != "off"

    @property
    def shared_secret(self) -> str:
        """The secret shared by every worker and host for sealing, key names and nonces:
        ``cache_secret``, or ``client_secret`` when that is unset; empty when neither is."""
        return self.cache_secret or self.client_secret

    @property
    def uses_redis(self) -> bool:
        """Whether a shared Redis cache is configured."""
        return bool(self.redis_url or self.redis_sentinel_master)

    def _validate(self) -> None:
        """The rules that relate options to one another. Each option's own rules (type, choices,
        range, shape) are declared with it and were checked by :meth:`__post_init__`."""
        self._validate_methods()
        if "introspection" in self.auth_methods:
            self._validate_introspection()
        if "session" in self.auth_methods:
            self._validate_sessions()
        if "authorization_code" in self.auth_methods:
            self._validate_login()
        self._validate_cert_header()
        if self.session_cookie_same_site == "None" and not self.session_cookie_secure:
            raise ConfigurationError("session_cookie_same_site", "None requires session_cookie_secure")
        if "cookie" in self.bearer_token_param_type and not self.bearer_token_cookie_name:
            raise ConfigurationError("bearer_token_cookie_name", "required when bearer_token_param_type has cookie")
        if self.dpop_use_nonce and len(self.shared_secret) < 16:
            raise ConfigurationError(
                "cache_secret",
                "dpop_use_nonce needs a shared secret of 16+ characters so that every worker checks every nonce",
            )
        if self.proof_of_possession_dpop != "off":
            self._validate_dpop()
        self._validate_cache()
        self._validate_keys()
        paths = [path for path in (self.readiness_path, self.liveness_path, self.logout_path,
                                   self.client_jwks_path) if path]
        if len(set(paths)) < len(paths):
            raise ConfigurationError("readiness_path", "readiness_path, liveness_path, logout_path and "
                                     "client_jwks_path must differ")

    def _validate_keys(self) -> None:
        for item in self.issuer_audiences:
            if item.partition("=")[0] not in self.issuers:
                raise ConfigurationError("issuer_audiences", f"{item.partition('=')[0]!r} is not an accepted issuer")
        if self.token_endpoint_auth_method == "private_key_jwt" and not self.client_jwk:  # noqa: S105
            raise ConfigurationError("client_jwk", "required with private_key_jwt")
        for name in ("client_jwk_next", "client_jwks_path"):
            if getattr(self, name) and not self.client_jwk:
                raise ConfigurationError(name, "needs client_jwk")

    @property
    def issuers(self) -> tuple[str, ...]:
        """Every accepted issuer: ``issuer`` first, then ``issuers_allowed``."""
        return tuple(dict.fromkeys(i for i in (self.issuer, *self.issuers_allowed) if i))

    def audiences_of(self, issuer: str) -> tuple[str, ...]:
        """The audiences accepted in tokens of ``issuer``: its ``issuer_audiences``, else ``audience``."""
        own = tuple(a for i, _, a in (item.partition("=") for item in self.issuer_audiences) if i == issuer)
        return own or self.audience

    def _validate_dpop(self) -> None:
        # RFC 9449 section 4.3 (9): htu is the URI the client addressed. Rebuilt from the request
        # alone, it is whatever Host the client sends: a proof made for another server would pass.
        if not self.public_base_url and not self.dpop_allowed_hosts:
            raise ConfigurationError(
                "public_base_url",
                "required with proof_of_possession_dpop: a DPoP proof's htu is checked against it (or list the "
                "host names in dpop_allowed_hosts)",
            )
        if self.public_base_url and self.dpop_allowed_hosts:
            raise ConfigurationError("dpop_allowed_hosts", "set public_base_url or dpop_allowed_hosts, not both")
        if self.dpop_replay_redis_url and len(self.shared_secret) < 16:
            raise ConfigurationError("cache_secret", "at least 16 characters with dpop_replay_redis_url "
                                                     "(it names the replay store's keys)")

    def _validate_cert_header(self) -> None:
        # Elements before the nearest proxy's may be the client's: reading further back is an XFCC choice only.
        if self.client_cert_xfcc_hops != 1 and self.client_cert_format != "xfcc":
            raise ConfigurationError("client_cert_xfcc_hops", "applies only with client_cert_format=xfcc")

    def _validate_methods(self) -> None:
        methods = self.auth_methods
        if "bearer" in methods and not self.issuer:
            raise ConfigurationError("issuer", "required (the URL of your identity provider)")
        if ("bearer" in methods or "introspection" in methods) and not self.audience:
            raise ConfigurationError("audience", "required: the token's aud must contain one of these")
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

    def _validate_introspection(self) -> None:
        if not self.issuer and not self.introspection_endpoint:
            raise ConfigurationError("introspection_endpoint", "required when there is no issuer to discover it")
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

    def _validate_sessions(self) -> None:
        if len(self.session_secret) < 32:
            raise ConfigurationError("session_secret", "required with session: 32 or more characters")
        if not any(m in self.auth_methods for m in ("bearer", "introspection", "authorization_code")):
            raise ConfigurationError("auth_methods", "session needs another method to create sessions")

    def _validate_login(self) -> None:
        if not self.redirect_uri:
            raise ConfigurationError("redirect_uri", "required with authorization_code")
        secret_needed = self.token_endpoint_auth_method != "private_key_jwt"  # noqa: S105 - a method name
        if not self.client_id or (secret_needed and not self.client_secret):
            raise ConfigurationError("client_id", "client_id and client_secret are needed for authorization_code")
        if "openid" not in self.scopes:
            raise ConfigurationError("scopes", "must include openid")

    def _validate_cache(self) -> None:
        if self.cache_ttl_max and self.cache_ttl_min > self.cache_ttl_max:
            raise ConfigurationError("cache_ttl_min", "must not exceed cache_ttl_max")
        if self.redis_sentinel_master and not self.redis_sentinel_nodes:
            raise ConfigurationError("redis_sentinel_nodes", "required with redis_sentinel_master")
        if self.uses_redis and not self.shared_secret:
            raise ConfigurationError("cache_secret", "required with Redis when there is no client_secret")
        if self.uses_redis and len(self.shared_secret) < 16:
            raise ConfigurationError("cache_secret", "at least 16 characters (it keys the sealed Redis entries)")

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
            name = ALIASES.get(name, name)
            if name in names:
                if name in kwargs and kwargs[name] != value:
                    raise ConfigurationError(name, f"{key} and {env_name(name, prefix)} disagree; set one")
                kwargs[name] = value
            elif key[len(prefix):] not in _NOT_OPTIONS:
                raise ConfigurationError(name, unknown_option(key, prefix))
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


def unknown_option(key: str, prefix: str = ENV_PREFIX) -> str:
    """The message for a ``PREFIX*`` key that names no option, with the nearest option's name if one is close."""
    known = [f.name for f in dataclasses.fields(Settings)] + list(ALIASES)
    close = difflib.get_close_matches(key[len(prefix):].lower(), known, n=1, cutoff=0.75)
    hint = f"; did you mean {env_name(close[0], prefix)}?" if close else ""
    return f"{key} is not a known option{hint}"


def env_name(option: str, prefix: str = ENV_PREFIX) -> str:
    """The environment variable of ``option``: ``CERTBOUND_LEEWAY`` for ``leeway``."""
    return prefix + option.upper()


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """``value`` as the option's type: from the environment's strings, or already typed (``app.config``)."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        return _coerce_list(name, value)
    if origin is Literal or hint is str:
        if not isinstance(value, str):
            raise ConfigurationError(name, "expected a string")
        return value.strip() if value != value.strip() else value
    if hint is bool:
        return _coerce_bool(name, value)
    if hint is int or hint is float:
        return _coerce_number(name, hint, value)
    raise ConfigurationError(name, f"unsupported type {hint!r}")  # pragma: no cover


def _coerce_list(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
        return tuple(item for item in items if item)
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return value if isinstance(value, tuple) else tuple(value)
    raise ConfigurationError(name, "expected a list of strings (comma separated in the environment)")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ConfigurationError(name, "expected true or false")


def _coerce_number(name: str, hint: type[int] | type[float], value: Any) -> int | float:
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
