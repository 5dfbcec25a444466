"""Flask integration: ``CertBound(app)``, ``current_claims`` and ``require_scope``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import Flask, current_app, request
from werkzeug.local import LocalProxy

from .discovery import Discovery
from .errors import InsufficientScope, challenge
from .middleware import CertBoundMiddleware, token_scopes
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


def require_scope(*scopes: str) -> Callable[[F], F]:
    """Answer 403 ``insufficient_scope`` unless the token carries all ``scopes`` (RFC 6750 section 3.1)."""
    needed = frozenset(scopes)

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            extension: CertBound | None = current_app.extensions.get("certbound")
            settings = extension.middleware.settings if extension and extension.middleware else None
            claim = settings.scopes_claim if settings else "scope"
            if needed <= token_scopes(_claims(), claim):
                return view(*args, **kwargs)
            error = InsufficientScope("the token lacks a required scope", scope=" ".join(sorted(needed)))
            realm = settings.realm if settings else "api"
            return current_app.response_class(
                error.body(),
                status=error.status,
                headers={"WWW-Authenticate": challenge("Bearer", realm, error.challenge_params()),
                         "Cache-Control": "no-store"},
                mimetype="application/json",
            )

        return cast(F, wrapper)

    return decorator
