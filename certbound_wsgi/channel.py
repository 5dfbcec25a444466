"""The authenticated channel from the TLS-terminating proxy to this worker.

nginx ends mutual TLS and forwards the client certificate, as a request header
(gunicorn) or as the uwsgi variable ``SSL_CLIENT_CERT`` (uWSGI). Both can be
written by anyone who reaches the worker without nginx: any header over HTTP,
and every variable of a uwsgi packet, ``REMOTE_ADDR`` included. So a forwarded
value is believed only when the request proves it came through the proxy:

``proxy_secret``
    nginx adds a per-deployment secret to every request (``proxy_set_header``
    for gunicorn; for uWSGI the variable :data:`UWSGI_SECRET_VAR`, which no
    client header can produce since headers all become ``HTTP_*``). It is
    compared in constant time, and removed from the environ before the app
    runs, so that no app (nor its logs) can echo it.
``trusted_proxies = unix``
    The worker listens on a Unix socket that only nginx can open (mode 0660,
    nginx's group). Under gunicorn a Unix-socket peer has an empty
    ``REMOTE_ADDR``, which no TCP peer can produce. Under uWSGI ``REMOTE_ADDR``
    is whatever the packet says, so the keyword counts only when every socket
    uWSGI serves is a Unix socket, checked once at start-up.
``trusted_proxies = CIDRs``
    Address-only trust, an explicit opt-in that is warned about: anything
    that shares the address (a pod's sidecars, other users of a host) is
    trusted too. Under uWSGI addresses prove nothing and are ignored.

With a secret *and* ``trusted_proxies``, both must hold.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from .errors import ConfigurationError
from .proxies import UNIX, TrustedProxies
from .types import WSGIEnvironment

__all__ = [
    "ENVIRON_KEY",
    "DEFAULT_SECRET_HEADER",
    "Verdict",
    "UNIX",
    "UWSGI_SECRET_VAR",
    "ProxyChannel",
    "UwsgiListeners",
    "check_at_start_up",
    "check_secret",
    "environ_key",
    "uwsgi_listeners",
]

log = logging.getLogger("certbound_wsgi")

#: The header nginx sets for gunicorn (``proxy_set_header``).
DEFAULT_SECRET_HEADER: Final = "X-Certbound-Proxy-Secret"  # noqa: S105 - a name, not a secret
#: The uwsgi variable nginx sets for uWSGI (``uwsgi_param``); not ``HTTP_*``, so no header becomes it.
UWSGI_SECRET_VAR: Final = "CERTBOUND_PROXY_SECRET"  # noqa: S105 - a name, not a secret
#: Characters of a proxy secret: safe unquoted in a header and inside nginx's double quotes
#: (no ``$``, ``\\``, quotes, ``;``, braces, spaces or commas, which would join two header copies).
_SECRET = re.compile(r"[A-Za-z0-9._~+/=-]{32,512}")

# Why a certificate was not believed; each is logged at most once a minute.
UNTRUSTED_PEER: Final = "untrusted-peer"
WRONG_SECRET: Final = "missing-or-wrong-secret"  # noqa: S105 - a reason, not a secret
NO_CHANNEL: Final = "no-channel"
_WARN_INTERVAL = 60.0

#: Where a request's :class:`Verdict` is kept once its secret was taken (see :meth:`ProxyChannel.verdict`).
ENVIRON_KEY: Final = "certbound.proxy"

_REASONS: Final = {
    UNTRUSTED_PEER: "the peer is not in trusted_proxies",
    WRONG_SECRET: "the request did not carry the proxy secret",
    NO_CHANNEL: "neither proxy_secret nor a usable trusted_proxies entry is configured",
}


def check_secret(secret: str) -> None:
    """Refuse a proxy secret that is short or would need quoting in nginx or a header.

    :raises ValueError: saying what is wrong (never quoting the secret).
    """
    if not _SECRET.fullmatch(secret):
        raise ValueError(
            "32 to 512 characters of A-Z a-z 0-9 . _ ~ + / = - "
            "(e.g. the output of: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )


def environ_key(header: str) -> str:
    """The WSGI environ key of a request header (PEP 3333: ``HTTP_`` + upper case, ``-`` as ``_``)."""
    return "HTTP_" + header.upper().replace("-", "_")


@dataclass(frozen=True)
class UwsgiListeners:
    """What a uWSGI worker serves, read from ``uwsgi.sockets`` at start-up.

    :param unix_only: every socket is a Unix socket (no TCP socket, no ``--http`` router).
    :param paths: the Unix socket paths.
    """

    unix_only: bool
    paths: tuple[str, ...]


def uwsgi_listeners() -> UwsgiListeners | None:
    """The listeners of this uWSGI worker, or ``None`` when not running under uWSGI.

    The ``uwsgi`` module exists only inside uWSGI, so a request cannot fake it.
    """
    try:
        import uwsgi  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return None
    unix_only, paths = True, []
    fds = list(getattr(uwsgi, "sockets", None) or [])
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            unix_only = False
            continue
        try:
            if sock.family == socket.AF_UNIX:
                name = sock.getsockname()
                paths.append(name if isinstance(name, str) else name.decode(errors="replace"))
            else:
                unix_only = False
        finally:
            sock.detach()  # the fd is uWSGI's: never close it
    return UwsgiListeners(unix_only and bool(fds), tuple(paths))


@dataclass(frozen=True)
class Verdict:
    """Whether one request came through the authenticated channel.

    An instance, never a string: a uwsgi packet can carry a variable of any name, but only
    strings, so a forged ``certbound.proxy`` is never mistaken for a verdict.

    :param reason: ``None`` when it did, else why not (a short constant).
    """

    reason: str | None

    @property
    def trusted(self) -> bool:
        return self.reason is None


_TRUSTED = Verdict(None)


class _Limiter:
    """At most one log line per reason and interval, so that an attacker cannot flood the log."""

    def __init__(self, clock: Callable[[], float], interval: float = _WARN_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def allow(self, reason: str) -> bool:
        now = self._clock()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self._interval:
                return False
            self._last[reason] = now
            return True


class ProxyChannel:
    """Decides whether a request came through the authenticated channel from the proxy.

    :param secret: ``proxy_secret``; empty: no secret.
    :param secret_header: ``proxy_secret_header``, the header nginx sets for gunicorn.
    :param trusted_proxies: CIDRs and the keyword ``unix``, or a
        :class:`~certbound_wsgi.proxies.TrustedProxies` of them.
    :param uwsgi: the uWSGI listeners (:func:`uwsgi_listeners`); ``None`` when not under uWSGI.
    :param clock: monotonic seconds, for rate-limiting the warnings; injectable for tests.
    """

    def __init__(
        self,
        *,
        secret: str,
        secret_header: str = DEFAULT_SECRET_HEADER,
        trusted_proxies: TrustedProxies | Iterable[str] = (),
        uwsgi: UwsgiListeners | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._secret = secret.encode("ascii") if secret else None
        self._header_var = environ_key(secret_header)
        if not isinstance(trusted_proxies, TrustedProxies):
            trusted_proxies = TrustedProxies(trusted_proxies)
        #: The ``trusted_proxies`` (addresses and ``unix``).
        self.trusted_proxies = trusted_proxies
        self._unix, self._networks = trusted_proxies.unix, trusted_proxies.networks
        self._uwsgi = uwsgi
        self._limiter = _Limiter(clock)
        # Fixed by the arguments above: decided once, not on every request.
        self._usable = self.usable
        #: Whether a request's peer address must also be trusted (not under uWSGI, where ``usable``
        #: already checked the listeners, nor with the secret alone).
        self._check_peer = uwsgi is None and bool(self._unix or self._networks)

    @property
    def usable(self) -> bool:
        """Whether any request could ever be believed (else every certificate is ignored)."""
        if self._uwsgi is not None:
            # CIDRs prove nothing here; "unix" must hold for the listeners, the secret for each request.
            return self._uwsgi.unix_only if self._unix else self._secret is not None
        return self._secret is not None or self._unix or bool(self._networks)

    def problems(self) -> list[str]:
        """What weakens or disables the channel in this process, one sentence each, for start-up warnings."""
        found = []
        if not self.usable:
            found.append(
                "no client certificate will be believed: set proxy_secret (and render nginx with it), or "
                "trusted_proxies=unix behind a Unix socket only nginx can open"
                + (" (uWSGI must then listen on Unix sockets only; it does not)" if self._uwsgi is not None else "")
            )
        if self._uwsgi is not None and self._networks:
            found.append(
                "trusted_proxies CIDRs are ignored under uWSGI: every uwsgi variable, REMOTE_ADDR included, "
                "is written by whoever sends the packet"
            )
        elif self._networks and self._secret is None:
            found.append(
                "trusted_proxies trusts by address only: any process that can use a trusted address can forge "
                "the certificate header; set proxy_secret"
            )
        if self._uwsgi is not None and self._unix and self._secret is None:
            for path in self._uwsgi.paths:
                if _world_writable(path):
                    found.append(f"the uWSGI socket {path} is writable by every local user: use --chmod-socket=660")
        return found

    def take_secret(self, environ: WSGIEnvironment) -> bytes | None:
        """Remove the proxy secret from ``environ`` (so that the app never sees it) and return it."""
        offered = environ.pop(UWSGI_SECRET_VAR, None)
        header = environ.pop(self._header_var, None)
        if offered is None:
            offered = header
        if offered is None:
            return None
        # A WSGI server gives str (PEP 3333 latin-1); never fail on what a hostile sender put here.
        return offered if isinstance(offered, bytes) else str(offered).encode("utf-8", "replace")

    def verdict(self, environ: WSGIEnvironment) -> Verdict:
        """The request's verdict. The secret is removed from ``environ`` the first time, so that no app
        sees it; the verdict it decided is then kept in ``environ`` (:data:`ENVIRON_KEY`) for the later
        questions about the same request. Without a secret to take, nothing is written: the verdict
        follows from ``environ`` alone, every time."""
        found = environ.get(ENVIRON_KEY)
        if isinstance(found, Verdict):
            return found
        offered = self.take_secret(environ)
        reason = self.check(environ, offered)
        decided = _TRUSTED if reason is None else Verdict(reason)
        if offered is not None:
            environ[ENVIRON_KEY] = decided
        return decided

    def check(self, environ: WSGIEnvironment, offered_secret: bytes | None) -> str | None:
        """``None`` when the request came through the authenticated channel, else the reason it did not.

        :param environ: the request.
        :param offered_secret: what :meth:`take_secret` returned for it.
        """
        if not self._usable:
            return NO_CHANNEL
        # Constant time: the comparison must not reveal how much of a guess was right.
        if self._secret is not None and (
            offered_secret is None or not hmac.compare_digest(offered_secret, self._secret)
        ):
            return WRONG_SECRET
        if not self._check_peer:
            return None  # under uWSGI (usable checked the listeners once), or the secret alone
        peer = environ.get("REMOTE_ADDR")
        return None if isinstance(peer, str) and self.trusted_proxies.trusts_peer(peer) else UNTRUSTED_PEER

    def refused(self, environ: WSGIEnvironment, reason: str) -> None:
        """Log (rate-limited, per reason) that a forwarded certificate was ignored."""
        if self._limiter.allow(reason):
            peer = str(environ.get("REMOTE_ADDR", ""))[:64]
            log.warning(
                "certbound: a client certificate was forwarded by an untrusted channel and ignored (%s; peer %r). "
                "This line is logged at most once a minute per reason.",
                _REASONS.get(reason, reason), peer,
            )


def check_at_start_up(channel: ProxyChannel, mtls: str) -> None:
    """Refuse to start when the channel makes every certificate-bound request fail (``strict`` mode
    and no certificate could ever be believed), naming the fix; log a warning for each weakness.

    :raises ConfigurationError: on ``proxy_secret``.
    """
    problems = channel.problems()
    if not channel.usable and mtls == "strict":
        raise ConfigurationError("proxy_secret", problems[0])
    for problem in problems:
        log.warning("certbound: %s", problem)


def _world_writable(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IWOTH)
    except OSError:
        return False
