"""Flask integration: ``CertBound(app)``, ``current_claims`` and ``require_scope``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import Flask, current_app, request
from werkzeug.local import LocalProxy

from .authenticator import token_scopes
from .discovery import Discovery
from .errors import Challenges, InsufficientScope
from .middleware import CertBoundMiddleware
from .settings import Settings
from .types import Claims

__all__ = ["CertBound", "current_claims", "require_scope"]

F = TypeVar("F", bound=Callable[..., Any])


class CertBound:
    """Protect a Flask app: every request needs a valid, bound access token.

    Settings come from ``app.config`` keys ``CERTBOUND_<OPTION>`` unless given.

    :param app: the Flask app, or ``None`` to call :meth:`init_app` later.
    :param settings: explicit settings instead of ``app.config``.
    :param discovery: the issuer's metadata and keys (made from the settings when omitted).
    """

    def __init__(
        self, app: Flask | None = None, settings: Settings | None = None, *, discovery: Discovery | None = None
    ) -> None:
        self._settings = settings
        self._discovery = discovery
        self.middleware: CertBoundMiddleware | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Wrap ``app.wsgi_app`` in the middleware and register the extension."""
        settings = self._settings or Settings.from_mapping(app.config)
        self.middleware = CertBoundMiddleware(app.wsgi_app, settings, discovery=self._discovery)
        app.wsgi_app = self.middleware  # type: ignore[method-assign]
        app.extensions["certbound"] = self


def _claims() -> Claims:
    return cast(Claims, request.environ.get("certbound.claims") or {})


#: The validated claims of the current request (empty outside a protected request).
current_claims: Claims = cast(Claims, LocalProxy(_claims))


_DEFAULT_CHALLENGES = Challenges("api")


def require_scope(*scopes: str) -> Callable[[F], F]:
    """Answer 403 ``insufficient_scope`` unless the token carries all ``scopes`` (RFC 6750 section 3.1)."""
    needed = frozenset(scopes)

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            extension: CertBound | None = current_app.extensions.get("certbound")
            middleware = extension.middleware if extension else None
            claim = middleware.settings.scopes_claim if middleware else "scope"
            if needed <= token_scopes(_claims(), claim):
                return view(*args, **kwargs)
            challenges = middleware.challenges if middleware else _DEFAULT_CHALLENGES
            # The request got through, so a DPoP Authorization header was its credential (RFC 9449 section 7.1).
            scheme = "DPoP" if request.headers.get("Authorization", "")[:5].lower() == "dpop " else "Bearer"
            error = InsufficientScope("the token lacks a required scope", scope=" ".join(sorted(needed)))
            # The error is a WSGI app; Flask runs it as the response.
            return challenges.bind(error, scheme)

        return cast(F, wrapper)

    return decorator
