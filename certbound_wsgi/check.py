"""``certbound-wsgi check-config``: validate the environment's settings and warn about unsafe ones."""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import sys
from urllib.parse import urlsplit

from .errors import ConfigurationError
from .settings import Settings

__all__ = ["check_config_command", "unsafe_settings"]


def _gunicorn_bind(environ: dict[str, str] | None = None) -> list[str]:
    args = shlex.split((environ if environ is not None else os.environ).get("GUNICORN_CMD_ARGS", ""))
    binds = []
    for i, arg in enumerate(args):
        if arg in ("-b", "--bind") and i + 1 < len(args):
            binds.append(args[i + 1])
        elif arg.startswith("--bind="):
            binds.append(arg.split("=", 1)[1])
    return binds


def _bind_host(bind: str) -> str | None:
    """The host of a gunicorn bind (``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH``); ``None`` for a socket file."""
    if bind.startswith(("unix:", "fd://")):
        return None
    host = bind.rsplit(":", 1)[0] if bind.count(":") == 1 or bind.startswith("[") else bind
    return host.strip("[]") or "0.0.0.0"  # noqa: S104 - describing, not binding


def unsafe_settings(settings: Settings, binds: list[str]) -> list[str]:
    """Warnings about settings that weaken the protection.

    :param settings: the effective settings.
    :param binds: the addresses gunicorn binds to, if known.
    """
    warnings = []
    networks = [ipaddress.ip_network(cidr, strict=False) for cidr in settings.trusted_proxies]
    for bind in binds:
        host = _bind_host(bind)
        if host is None:
            continue
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        exposed = address is None or address.is_unspecified or not address.is_loopback
        trusted = address is not None and not address.is_unspecified and any(address in n for n in networks)
        if exposed and not trusted:
            warnings.append(
                f"gunicorn binds to {bind}, which is not loopback and not in trusted_proxies: anyone who can "
                f"reach it directly can send a forged {settings.client_cert_header} header. Bind to 127.0.0.1 "
                "behind nginx (a unix socket has no peer address, so the header would never be believed)."
            )
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
    if settings.proof_of_possession_dpop != "off" and not settings.uses_redis:
        warnings.append("DPoP replay protection is per process without redis_url: a proof can be replayed to "
                        "another worker or host.")
    if settings.dpop_replay_fail_open:
        warnings.append("dpop_replay_fail_open=true: while Redis is down, a DPoP proof can be replayed across workers.")
    if settings.cache_ttl_max == 0 and "introspection" in settings.auth_methods:
        warnings.append("cache_ttl_max=0: a revoked token keeps working until its exp while cached.")
    return warnings


def check_config_command(bind: str | None = None, discover: bool = True) -> int:
    """Validate, warn, discover; exit 0 (fine), 1 (discovery failed), 2 (invalid), 3 (valid with warnings)."""
    from .discovery import Discovery, DiscoveryError

    try:
        settings = Settings.from_env()
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(settings.masked(), indent=2))
    warnings = unsafe_settings(settings, [bind] if bind else _gunicorn_bind())
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if discover and settings.issuer:
        try:
            metadata, keys = Discovery(settings).check()
        except DiscoveryError as exc:
            print(f"discovery failed: {exc}", file=sys.stderr)
            return 1
        print(f"issuer metadata: {metadata.get('issuer')} (jwks_uri {metadata.get('jwks_uri')})")
        print(f"signing keys: {', '.join(keys) or 'none'}")
    return 3 if warnings else 0
