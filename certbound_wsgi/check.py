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

from .proxies import TrustedProxies
from .settings import Settings

__all__ = ["bind_host", "check_config", "gunicorn_binds", "issuer_keys", "unsafe_settings"]


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


def bind_host(bind: str) -> str | None:
    """The host of a gunicorn bind (``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH``); ``None`` for a socket file."""
    if bind.startswith(("unix:", "fd://")):
        return None
    host = bind.rsplit(":", 1)[0] if bind.count(":") == 1 or bind.startswith("[") else bind
    return host.strip("[]") or "0.0.0.0"  # noqa: S104 - describing, not binding


def check_config(environ: Mapping[str, str] | None = None, bind: str | None = None) -> tuple[Settings, list[str]]:
    """The settings of ``environ`` and the warnings about them.

    :param environ: the ``CERTBOUND_*`` variables (and ``GUNICORN_CMD_ARGS``); defaults to :data:`os.environ`.
    :param bind: the address gunicorn binds to; by default the ``--bind`` options of ``GUNICORN_CMD_ARGS``.
    :raises ConfigurationError: a setting is invalid.
    """
    settings = Settings.from_env(environ)
    return settings, unsafe_settings(settings, [bind] if bind else gunicorn_binds(environ))


def unsafe_settings(settings: Settings, binds: list[str]) -> list[str]:
    """Warnings about settings that weaken the protection.

    :param settings: the effective settings.
    :param binds: the addresses gunicorn binds to, if known.
    """
    return _exposed_binds(settings, binds) + _weakened_binding(settings) + _weakened_cache(settings)


def _exposed_binds(settings: Settings, binds: list[str]) -> list[str]:
    """Binds that a client can reach without nginx, and from which the certificate header is believed."""
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
            warnings.append(
                f"gunicorn binds to {bind}, which is not loopback and not in trusted_proxies: anyone who can "
                f"reach it directly can send a forged {settings.client_cert_header} header. Bind to 127.0.0.1 "
                "behind nginx (a unix socket has no peer address, so the header would never be believed)."
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
