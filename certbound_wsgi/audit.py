"""The audit trail: one structured event per access decision.

Every request the middleware decides on produces exactly one event on the
``certbound_wsgi.audit`` logger: ``accepted`` at DEBUG, ``refused`` at INFO and
``fault`` (a 5xx: the issuer, Redis or a bug) at WARNING. An event names a
stable :data:`REASONS` code, so that alerts and dashboards do not parse English.

An event never carries a token, a secret, a query string or a certificate:
only the claims that identify who asked (``sub``, ``client_id``, ``jti``) and
the two thumbprints (RFC 8705 section 3.1 ``x5t#S256``, RFC 9449 section 6.1
``jkt``), which are hashes. Every value is made printable ASCII and capped in
length, so a client cannot forge a line or flood the log (CWE-117).

Nobody has to configure logging to see refusals: :func:`install_stderr_fallback`
writes to stderr only while neither the ``certbound_wsgi`` logger nor the root
logger has a handler of its own, which is the case under a bare gunicorn or
uWSGI. Once the application configures logging, the fallback steps aside.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import secrets
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from .http import request_path
from .types import WSGIEnvironment

if TYPE_CHECKING:
    from .channel import ProxyChannel
    from .settings import Settings

__all__ = [
    "LOGGER_NAME",
    "REASONS",
    "Auditor",
    "AuditIdentity",
    "auditor_for",
    "event_line",
    "install_stderr_fallback",
    "reason_for",
    "sanitize",
]

LOGGER_NAME: Final = "certbound_wsgi.audit"

#: The reason codes, stable across releases: a code is added, never renamed.
REASONS: Final[Mapping[str, str]] = {
    "ok": "the request was let through",
    "token_missing": "no access token and no session (RFC 6750 section 3.1)",
    "request_invalid": "the request is malformed: two tokens, an unparseable header or body (RFC 6750 section 2)",
    "token_invalid": "the token is malformed, badly signed or of the wrong type",
    "token_expired": "the token's exp has passed",
    "token_not_yet_valid": "the token's nbf or iat lies in the future",
    "token_inactive": "introspection says the token is not active (RFC 7662 section 2.2)",
    "issuer_mismatch": "the token was issued by another issuer",
    "audience_mismatch": "the token is not meant for this audience",
    "key_unknown": "the token is signed with a key the issuer does not publish",
    "claim_missing": "the token has no cnf x5t#S256 claim although mTLS binding is required (RFC 8705 section 3)",
    "cert_missing": "the token is certificate-bound but no client certificate came through the proxy",
    "cert_mismatch": "the client certificate is not the one the token is bound to (RFC 8705 section 3)",
    "dpop_invalid": "the DPoP proof is missing, malformed or does not match the request (RFC 9449 section 4.3)",
    "dpop_replay": "the DPoP proof was already used (RFC 9449 section 11.1)",
    "dpop_nonce": "a DPoP nonce is required or the one sent is stale (RFC 9449 section 8)",
    "session_invalid": "the session cookie is expired, unknown or used without its bindings",
    "login_failed": "the browser login was refused by the issuer or lost its state",
    "scope_insufficient": "the token lacks a required scope (RFC 6750 section 3.1)",
    "issuer_unavailable": "the issuer's keys or introspection endpoint cannot be reached",
    "store_unavailable": "Redis (the session or replay store) cannot be reached",
    "internal_error": "a bug: the traceback is logged separately",
}

Outcome = Literal["accepted", "refused", "fault"]
Format = Literal["text", "json"]

_LEVELS: Final[Mapping[str, int]] = {"accepted": logging.DEBUG, "refused": logging.INFO, "fault": logging.WARNING}

# The order of the fields in a text line: stable, so that grep and cut keep working.
FIELDS: Final = (
    "outcome", "reason", "status", "method", "path", "sub", "client_id", "jti",
    "bound", "presented", "client", "request_id", "detail",
)

# A value longer than this is cut: an event must stay one readable line, and a
# client must not be able to fill the disk through a long path or claim.
MAX_VALUE: Final = 200
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
_UNSAFE = re.compile(r"[^\x20-\x7e]")
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')

class AuditIdentity(Protocol):
    """What :meth:`Auditor.accepted` reads from the middleware's ``Identity``."""

    @property
    def claims(self) -> Mapping[str, Any]: ...

    @property
    def thumbprint(self) -> str | None: ...


def sanitize(value: object, limit: int = MAX_VALUE) -> str | None:
    """``value`` as printable ASCII of at most ``limit`` characters, or ``None``.

    Control characters (a forged newline) and non-ASCII become ``\\xNN``
    / ``\\uNNNN`` escapes, so what a client sent can be read back exactly but can
    never start a new log line or hide in an invisible character.
    """
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    text = _UNSAFE.sub(_escape, text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def event_line(event: Mapping[str, str | int | None], fmt: Format = "text") -> str:
    """One event as one line: ``key=value`` pairs (quoted where needed) or a JSON object.

    :param event: sanitized values, in :data:`FIELDS` order; ``None`` is absent.
    :param fmt: ``"text"`` or ``"json"``.
    """
    if fmt == "json":
        return json.dumps({k: v for k, v in event.items() if v is not None}, separators=(",", ":"), ensure_ascii=True)
    parts = ["certbound"]
    for key, value in event.items():
        if value is None:
            continue
        text = str(value)
        if not text or _NEEDS_QUOTES.search(text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def reason_for(error: BaseException) -> str:
    """The :data:`REASONS` code for a refusal: the error's own ``reason``.

    Every :class:`~certbound_wsgi.errors.AuthError` carries one (its class's, or the one
    given where it was raised), so no description text is ever matched. A 500, anything
    that is not an ``AuthError`` and an unknown code are ``internal_error``.
    """
    reason = getattr(error, "reason", None)
    if getattr(error, "status", 500) == 500 or not isinstance(reason, str) or reason not in REASONS:
        return "internal_error"
    return reason


def _bound_thumbprint(claims: Mapping[str, Any]) -> str | None:
    """The binding the token claims: RFC 8705 section 3.1 ``x5t#S256`` or RFC 9449 section 6.1 ``jkt``."""
    cnf = claims.get("cnf")
    if not isinstance(cnf, Mapping):
        return None
    for member in ("x5t#S256", "jkt"):
        value = cnf.get(member)
        if isinstance(value, str):
            return value
    return None


def _never_trusted(_address: str) -> bool:
    return False


class Auditor:
    """Writes the audit events of one middleware.

    :param fmt: ``"text"`` (one ``key=value`` line, the default) or ``"json"`` (one object a line).
    :param is_trusted_peer: whether the TCP peer (``REMOTE_ADDR``) is a proxy whose
        ``X-Forwarded-For`` and ``X-Request-Id`` are believed; by default no peer is trusted, so
        the client address is the peer's and a request id is always generated here.
    :param trusted_channel: instead of ``is_trusted_peer``: whether the request came through the
        authenticated channel from the proxy (the middleware passes its
        :class:`~certbound_wsgi.channel.ProxyChannel`'s verdict, the same that decides whether
        the forwarded certificate is believed: the proxy secret, or ``trusted_proxies``).
    :param forwarded_hops: how many trusted proxies append to ``X-Forwarded-For`` (1: nginx alone).
    :param trust_request_id: believe a trusted proxy's ``X-Request-Id``. Off by default: nginx passes
        a client's ``X-Request-Id`` through unless told ``proxy_set_header X-Request-Id $request_id``,
        so a header from a trusted peer is not yet a header the proxy wrote.
    :param logger: where events go (default: :data:`LOGGER_NAME`).
    """

    def __init__(
        self,
        *,
        fmt: Format = "text",
        is_trusted_peer: Callable[[str], bool] = _never_trusted,
        trusted_channel: Callable[[WSGIEnvironment], bool] | None = None,
        forwarded_hops: int = 1,
        trust_request_id: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        if forwarded_hops < 1:
            raise ValueError("forwarded_hops must be at least 1")
        self._hops = forwarded_hops
        self._trust_request_id = trust_request_id
        if fmt not in ("text", "json"):
            raise ValueError(f"audit format must be 'text' or 'json', not {fmt!r}")
        self.fmt: Format = fmt
        self._trusted_peer = is_trusted_peer
        self._trusted_channel = trusted_channel
        self.logger = logger if logger is not None else logging.getLogger(LOGGER_NAME)

    def _from_proxy(self, environ: WSGIEnvironment) -> bool:
        """Whether what the proxy adds to this request (``X-Forwarded-For``, the request id) is believed."""
        if self._trusted_channel is not None:
            return self._trusted_channel(environ)
        peer = environ.get("REMOTE_ADDR")
        return isinstance(peer, str) and self._trusted_peer(peer)

    def request_id(self, environ: WSGIEnvironment) -> str:
        """The request's id, when ``trust_request_id`` is on, the request came from the proxy and the
        id is well-formed: uWSGI's ``REQUEST_ID`` variable (``uwsgi_param REQUEST_ID $request_id``)
        or the proxy's ``X-Request-Id`` (nginx's ``$request_id``); else a new random one. Kept in
        ``environ["certbound.request_id"]`` so that the application can log it too."""
        known = environ.get("certbound.request_id")
        if isinstance(known, str):
            return known
        offered = environ.get("REQUEST_ID", environ.get("HTTP_X_REQUEST_ID"))
        if (self._trust_request_id and isinstance(offered, str) and _REQUEST_ID.match(offered)
                and self._from_proxy(environ)):
            request_id = offered
        else:
            request_id = secrets.token_hex(8)
        environ["certbound.request_id"] = request_id
        return request_id

    def client_address(self, environ: WSGIEnvironment) -> str | None:
        """The client's address: ``REMOTE_ADDR``, or, when the request came from the proxy, the
        ``X-Forwarded-For`` entry ``forwarded_hops`` from the right. As in werkzeug's ProxyFix,
        a fixed count, not "the first untrusted entry": each proxy appends its peer (nginx's
        ``$proxy_add_x_forwarded_for``), so everything further left was written by the client."""
        # Behind a Unix socket the peer has no address ("" under gunicorn): the proxy's word is all there is.
        peer = environ.get("REMOTE_ADDR") or None
        if not isinstance(peer, str):
            peer = None
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        if not isinstance(forwarded, str) or not self._from_proxy(environ):
            return peer
        hops = forwarded.split(",")
        if len(hops) < self._hops:
            return peer
        hop = hops[-self._hops].strip()
        try:
            return str(ipaddress.ip_address(hop))
        except ValueError:
            return peer  # a malformed entry proves nothing: believe only the socket

    def _event(
        self,
        environ: WSGIEnvironment,
        outcome: Outcome,
        reason: str,
        status: int,
        claims: Mapping[str, Any] | None,
        presented: str | None,
        detail: str | None,
    ) -> dict[str, str | int | None]:
        claims = claims or {}
        client_id = claims.get("client_id", claims.get("azp"))
        return {
            "outcome": outcome,
            "reason": reason,
            "status": status,
            "method": sanitize(environ.get("REQUEST_METHOD"), 16),
            # Never the query string: RFC 6750 section 2.3 allows the token there.
            "path": sanitize(request_path(environ)),
            "sub": sanitize(claims.get("sub")),
            "client_id": sanitize(client_id),
            "jti": sanitize(claims.get("jti"), 128),
            "bound": sanitize(_bound_thumbprint(claims), 64),
            "presented": sanitize(presented, 64),
            "client": sanitize(self.client_address(environ), 64),
            "request_id": self.request_id(environ),
            "detail": sanitize(detail),
        }

    def _emit(self, event: dict[str, str | int | None]) -> None:
        level = _LEVELS[str(event["outcome"])]
        if self.logger.isEnabledFor(level):
            self.logger.log(level, "%s", event_line(event, self.fmt), extra={"certbound_audit": event})

    def accepted(self, environ: WSGIEnvironment, identity: AuditIdentity, status: int = 200) -> None:
        """Record a request let through (DEBUG).

        :param identity: what authentication established: its ``claims`` and the presented ``thumbprint``.
        :param status: not the application's status (unknown yet), only that the middleware passed it on.
        """
        if self.logger.isEnabledFor(logging.DEBUG):
            self._emit(self._event(environ, "accepted", "ok", status, identity.claims, identity.thumbprint, None))

    def refused(
        self,
        environ: WSGIEnvironment,
        error: BaseException,
        *,
        claims: Mapping[str, Any] | None = None,
        presented: str | None = None,
    ) -> str:
        """Record a refusal: INFO for a 4xx, WARNING for a 5xx. Returns the reason code.

        :param error: the ``AuthError`` being answered (its ``status``, ``description`` and,
            when it has one, ``reason``), or any other exception, which counts as ``internal_error``.
        :param claims: the token's claims when validation got that far (e.g. a binding mismatch).
        :param presented: the thumbprint of the certificate or DPoP key that came with the request.
        """
        status = getattr(error, "status", 500)
        status = status if isinstance(status, int) else 500
        reason = reason_for(error)
        outcome: Outcome = "fault" if status >= 500 else "refused"
        # A bug's message may hold anything; its traceback is logged apart, not here.
        detail = None
        if reason != "internal_error":
            detail = getattr(error, "description", None) or getattr(error, "error", None)
        self._emit(self._event(environ, outcome, reason, status, claims, presented, detail))
        return reason


class _StderrFallback(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, but only while nobody has configured logging.

    Checked per record rather than once: a Flask or Django app configures logging
    after importing us, and from then on its handlers get the events (through
    propagation) and this one stays quiet, so no line is written twice.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(message)s"))

    def _configured_elsewhere(self, name: str) -> bool:
        logger: logging.Logger | None = logging.getLogger(name)
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return True
            if not logger.propagate:
                return False
            logger = logger.parent
        return False

    def emit(self, record: logging.LogRecord) -> None:
        if not self._configured_elsewhere(record.name):
            super().emit(record)


def install_stderr_fallback(logger_name: str = "certbound_wsgi", level: int = logging.INFO) -> logging.Handler | None:
    """Make ``logger_name``'s records reach stderr when logging is not configured.

    Under gunicorn and uWSGI a library's INFO records are otherwise dropped: the root
    logger has no handler and Python's last resort prints WARNING and above only. Call
    once at start-up; calling again adds nothing. Opt out by not calling it (the
    ``audit_stderr`` option), or by configuring logging, which it then defers to.

    :param level: set on the logger only if it has none, so that INFO refusals pass.
    :returns: the handler, or ``None`` when one was already installed.
    """
    logger = logging.getLogger(logger_name)
    if any(isinstance(handler, _StderrFallback) for handler in logger.handlers):
        return None
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
    handler = _StderrFallback()
    logger.addHandler(handler)
    return handler


def auditor_for(settings: Settings, channel: ProxyChannel) -> Auditor:
    """The auditor of a protected app (the middleware, the ``auth_request`` endpoint), as ``settings``
    describe it, with the stderr fallback installed when ``audit_log_stderr`` asks for it.

    :param channel: the certificate's channel: the client address and the request id are believed
        through it, as the certificate is.
    """
    auditor = Auditor(fmt="json" if settings.audit_log_format == "json" else "text",
                      trusted_channel=lambda environ: channel.verdict(environ).trusted,
                      forwarded_hops=settings.forwarded_for_hops,
                      trust_request_id=settings.audit_trust_request_id)
    if settings.audit_log_stderr:
        install_stderr_fallback()
    return auditor
