"""What ``certbound-wsgi check-config`` finds: the effective settings, and the ones that weaken the protection.

Nothing here prints; :mod:`certbound_wsgi.cli` reports what these functions return.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .cache.redis import replay_store_warning
from .channel import ProxyChannel, UwsgiListeners
from .errors import ConfigurationError
from .http import describe_failure
from .proxies import UNIX, TrustedProxies
from .settings import Settings

__all__ = ["bind_host", "channel_errors", "check_config", "discovery_fix", "gunicorn_binds", "issuer_keys",
           "redis_problems", "settings_of_app", "unsafe_settings"]


def gunicorn_binds(environ: Mapping[str, str] | None = None) -> list[str]:
    """The addresses in ``--bind``/``-b`` of ``GUNICORN_CMD_ARGS`` (gunicorn reads its options there too).

    :param environ: defaults to :data:`os.environ`.
    """
    args = shlex.split((os.environ if environ is None else environ).get("GUNICORN_CMD_ARGS", ""))
    binds = []
    for i, arg in enumerate(args):
        if arg in ("-b", "--bind") and i + 1 < len(args):
            binds.append(args[i + 1])
        elif arg.startswith("--bind="):
            binds.append(arg.split("=", 1)[1])
    return binds


def _is_unix(bind: str) -> bool:
    """A Unix socket: gunicorn's ``unix:PATH``, or uWSGI's ``--socket /PATH`` (``@NAME``: abstract)."""
    return bind.startswith(("unix:", "/", "@"))


def bind_host(bind: str) -> str | None:
    """The host of a gunicorn bind (``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH``); ``None`` for a socket file."""
    if _is_unix(bind) or bind.startswith("fd://"):
        return None
    host = bind.rsplit(":", 1)[0] if bind.count(":") == 1 or bind.startswith("[") else bind
    return host.strip("[]") or "0.0.0.0"  # noqa: S104 - describing, not binding


def check_config(
    environ: Mapping[str, str] | None = None, bind: str | None = None, server: str = "gunicorn",
    app: str | None = None,
) -> tuple[Settings, list[str], list[str]]:
    """The settings of ``environ`` (or of the app ``app`` names), the errors that stop a deployment,
    and the warnings about them.

    :param environ: the ``CERTBOUND_*`` variables (and ``GUNICORN_CMD_ARGS``); defaults to :data:`os.environ`.
    :param bind: the address the application server listens on; by default the ``--bind`` options of
        ``GUNICORN_CMD_ARGS``.
    :param server: ``gunicorn`` or ``uwsgi``.
    :param app: ``package.module:attribute`` of a Flask app or a middleware, whose effective settings to check.
    :raises ConfigurationError: a setting is invalid.
    """
    settings = settings_of_app(app, environ) if app else Settings.from_env(environ)
    binds = [bind] if bind else gunicorn_binds(environ)
    errors = channel_errors(settings, binds, server)
    warnings = [] if errors else unsafe_settings(settings, binds, server)
    # RFC 9449 section 11.1 needs a replay store that never forgets early: an evicting one is an error.
    try:
        replay = replay_store_warning(settings)
    except ConfigurationError as exc:
        errors.append(str(exc))
    else:
        if replay is not None:
            warnings.append(replay)
    return settings, errors, warnings


def _channel(settings: Settings, binds: list[str], server: str) -> ProxyChannel:
    """The channel as the worker will see it; under uWSGI, with the listeners ``binds`` describes."""
    tcp = [bind for bind in binds if not _is_unix(bind)]
    listeners = UwsgiListeners(unix_only=not tcp, paths=()) if server == "uwsgi" else None
    return ProxyChannel(secret=settings.proxy_secret, secret_header=settings.proxy_secret_header,
                        trusted_proxies=settings.trusted_proxies, uwsgi=listeners)


def channel_errors(settings: Settings, binds: list[str], server: str = "gunicorn") -> list[str]:
    """Deployments in which no forwarded certificate could be believed (issue 11), one line each,
    naming the fix: errors in ``strict`` mode, where every bound token would be refused.

    :param settings: the effective settings.
    :param binds: the addresses the application server listens on, if known.
    :param server: ``gunicorn`` or ``uwsgi``.
    """
    if settings.proof_of_possession_mtls != "strict":
        return []
    channel = _channel(settings, binds, server)
    if not channel.usable:
        return [channel.problems()[0].replace("set proxy_secret", "set CERTBOUND_PROXY_SECRET")]
    if settings.proxy_secret or server != "gunicorn":
        return []
    errors = []
    networks = [cidr for cidr in settings.trusted_proxies if cidr != UNIX]
    for bind in binds:
        if _is_unix(bind) and UNIX not in settings.trusted_proxies:
            errors.append(
                f"gunicorn binds to {bind}, whose peer has no address, so no certificate will be believed: add "
                "unix to CERTBOUND_TRUSTED_PROXIES (or set CERTBOUND_PROXY_SECRET)"
            )
        elif not _is_unix(bind) and not bind.startswith("fd://") and not networks:
            errors.append(
                f"gunicorn binds to {bind} (TCP), where only proxy_secret or a trusted_proxies network is believed: "
                "set CERTBOUND_PROXY_SECRET (and nginx-config --proxy-secret-file)"
            )
    return errors


def settings_of_app(target: str, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings an application runs with: a :class:`~certbound_wsgi.CertBoundMiddleware`'s, a Flask app's
    ``CertBound`` extension's, or those ``CertBound(app)`` would read (``app.config``, then the environment).

    :raises ConfigurationError: the app cannot be loaded, is neither, or its settings are invalid.
    """
    from .loader import load_app
    from .middleware import CertBoundMiddleware

    app: object = load_app(target)
    for candidate in (app, getattr(app, "wsgi_app", None)):
        if isinstance(candidate, CertBoundMiddleware):
            return candidate.settings
    extension = getattr(app, "extensions", {}).get("certbound") if isinstance(getattr(app, "extensions", None),
                                                                              dict) else None
    middleware = getattr(extension, "middleware", None)
    if isinstance(middleware, CertBoundMiddleware):
        return middleware.settings
    config = getattr(app, "config", None)
    if isinstance(config, Mapping):
        from .flask import effective_config

        return Settings.from_mapping(effective_config(config, environ))
    raise ConfigurationError("app", f"{target!r} is neither a Flask app nor a CertBoundMiddleware")


def discovery_fix(message: str, settings: Settings, issuer: str | None = None) -> str:
    """What to do about a failed discovery, from its message; empty when there is nothing to suggest.

    :param issuer: the issuer whose discovery failed (default: ``issuer``).
    """
    issuer = issuer or settings.issuer
    variable = "CERTBOUND_ISSUER" if issuer == settings.issuer else "CERTBOUND_ISSUERS_ALLOWED"
    if "certificate verify failed" in message or "SSLError" in message:
        if settings.ca_file:
            return (f"CERTBOUND_CA_FILE ({settings.ca_file}) does not hold the CA that signed the issuer's TLS "
                    "certificate: point it at that CA")
        return "set CERTBOUND_CA_FILE to the CA certificate that signed the issuer's TLS certificate"
    if "names issuer" in message:
        return f"set {variable} to exactly the issuer its metadata names (a trailing slash counts)"
    if "Error:" in message or "timed out" in message:
        return f"check that the issuer is running and that {variable} ({issuer}) is its URL"
    if "answered 404" in message:
        return f"{variable} has no discovery document there: check the URL (a realm or tenant path counts)"
    return ""


def redis_problems(settings: Settings) -> list[str]:
    """Ask each configured Redis (the cache's, and the DPoP replay store's own) for a ``PING``;
    what is wrong with each, with the fix. Empty when every one answers."""
    from .cache.redis import make_client, make_replay_client

    problems = []
    if settings.uses_redis:
        url = settings.redis_url
        where = _without_password(url) if url else f"sentinel {settings.redis_sentinel_master}"
        variable = "CERTBOUND_REDIS_URL" if url else "CERTBOUND_REDIS_SENTINEL_NODES"
        problems.append(_ping(make_client(settings), where, variable))
    if settings.proof_of_possession_dpop != "off" and settings.dpop_replay_redis_url:
        problems.append(_ping(make_replay_client(settings), _without_password(settings.dpop_replay_redis_url),
                              "CERTBOUND_DPOP_REPLAY_REDIS_URL"))
    return [problem for problem in problems if problem is not None]


def _ping(client: Any, where: str, variable: str) -> str | None:
    try:
        if client.ping():
            return None
        failure = "no PONG"
    except Exception as exc:  # any failure of the probe is what we report
        failure = describe_failure(exc)
    finally:
        client.close()
    return f"Redis at {where} does not answer ({failure}): start it, or fix {variable}"


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":****@", 1)
    return parts._replace(netloc=netloc).geturl()


def unsafe_settings(settings: Settings, binds: list[str], server: str = "gunicorn") -> list[str]:
    """Warnings about settings that weaken the protection.

    :param settings: the effective settings.
    :param binds: the addresses the application server listens on, if known.
    :param server: ``gunicorn`` or ``uwsgi``.
    """
    channel = _channel(settings, binds, server)
    weakened_channel = channel.problems() if channel.usable or settings.proof_of_possession_mtls != "strict" else []
    return (weakened_channel + _exposed_binds(settings, binds, server) + _weakened_binding(settings)
            + _weakened_cache(settings))


def _exposed_binds(settings: Settings, binds: list[str], server: str = "gunicorn") -> list[str]:
    """Binds that a client can reach without nginx."""
    proxies = TrustedProxies(settings.trusted_proxies)
    warnings = []
    for bind in binds:
        host = bind_host(bind)
        if host is None:
            continue
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        exposed = address is None or address.is_unspecified or not address.is_loopback
        trusted = address is not None and not address.is_unspecified and proxies.contains(address)
        if exposed and not trusted:
            believed = "is ignored without proxy_secret" if settings.proxy_secret else "may be believed"
            warnings.append(
                f"{server} binds to {bind}, which is not loopback and not in trusted_proxies: anyone who can "
                f"reach it directly bypasses nginx, and a forged {settings.client_cert_header} header {believed}. "
                "Bind to a Unix socket only nginx can open (trusted_proxies=unix), or to loopback with proxy_secret."
            )
    return warnings


def _weakened_binding(settings: Settings) -> list[str]:
    """Settings under which a stolen token, or a forged issuer, gets further."""
    warnings = []
    if settings.proof_of_possession_mtls == "off":
        warnings.append("proof_of_possession_mtls=off: certificate-bound tokens are not checked; a stolen one works.")
    if settings.proof_of_possession_mtls == "off" and settings.proof_of_possession_dpop == "off":
        warnings.append("no proof of possession is on: every token is a bearer token.")
    if not settings.ssl_verify:
        warnings.append("ssl_verify=false: TLS to the issuer is not verified; anyone on the path can forge its keys.")
    if urlsplit(settings.issuer).scheme == "http":
        warnings.append("the issuer is plain http: acceptable on loopback for development only.")
    if "session" in settings.auth_methods and not settings.session_cookie_secure:
        warnings.append("session_cookie_secure=false: the session cookie may travel over plain HTTP.")
    if (
        "session" in settings.auth_methods
        and not settings.proof_of_possession_auth_methods_validation
        and "authorization_code" in settings.auth_methods
    ):
        warnings.append("authorization_code sessions are not bound to any proof of possession (by your choice).")
    return warnings


def _weakened_cache(settings: Settings) -> list[str]:
    """Settings under which a replayed proof or a revoked token is accepted for longer."""
    warnings = []
    if settings.proof_of_possession_dpop != "off" and not settings.uses_redis:
        warnings.append("DPoP replay protection is per process without redis_url: a proof can be replayed to "
                        "another worker or host.")
    if settings.dpop_replay_fail_open:
        warnings.append("dpop_replay_fail_open=true: while Redis is down, a DPoP proof can be replayed across workers.")
    if settings.cache_ttl_max == 0 and "introspection" in settings.auth_methods:
        warnings.append("cache_ttl_max=0: a revoked token keeps working until its exp while cached.")
    return warnings


def issuer_keys(settings: Settings) -> list[dict[str, Any]]:
    """The keys found now at each accepted issuer (``issuer``, ``issuers_allowed``), and their ages.

    Each item is :meth:`Discovery.report` (``issuer``, ``jwks_uri``, ``kids``, ``key_ages``: seconds since
    each key was first fetched, ``age``, ``period``), or ``{"issuer": ..., "error": ...}`` when that
    issuer's keys cannot be fetched. With Redis, the ages are those of the copy every worker shares
    (read, never written, here); without it, every key is new to this process.
    """
    from .cache.redis import make_client
    from .discovery import Discovery, DiscoveryError
    from .issuers import shared_keys
    from .stats import Stats

    shared = shared_keys(settings, make_client(settings), Stats()) if settings.uses_redis else None
    reports: list[dict[str, Any]] = []
    for issuer in settings.issuers:
        discovery = Discovery(settings, shared=shared(issuer) if shared is not None else None, issuer_url=issuer)
        try:
            discovery.check()
        except DiscoveryError as exc:
            reports.append({"issuer": issuer, "error": str(exc)})
            continue
        reports.append(discovery.report())
    return reports
