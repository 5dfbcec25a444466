"""Flask integration: ``CertBound(app)``, ``current_claims`` and ``require_scope``."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from flask import Flask, current_app, request
from werkzeug.local import LocalProxy

from .authenticator import token_scopes
from .discovery import Discovery
from .errors import Challenges, InsufficientScope
from .middleware import CertBoundMiddleware
from .settings import ENV_PREFIX, Settings
from .types import Claims

__all__ = ["CertBound", "current_claims", "require_scope"]

F = TypeVar("F", bound=Callable[..., Any])


class CertBound:
    """Protect a Flask app: every request needs a valid, bound access token.

    Settings come from ``app.config`` keys ``CERTBOUND_<OPTION>`` and, for an option
    ``app.config`` does not set, from the ``CERTBOUND_<OPTION>`` environment variable
    (``app.config`` wins), unless ``settings`` is given.

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
        settings = self._settings or Settings.from_mapping(effective_config(app.config))
        self.middleware = CertBoundMiddleware(app.wsgi_app, settings, discovery=self._discovery)
        app.wsgi_app = self.middleware  # type: ignore[method-assign]
        app.extensions["certbound"] = self


def effective_config(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``CERTBOUND_*`` keys :class:`CertBound` reads: the environment's, overridden by ``config``'s.

    Flask's own ``app.config.from_prefixed_env("CERTBOUND")`` strips the prefix, so the variables
    would never reach ``CERTBOUND_*`` keys; this reads them as they are named.

    :param environ: defaults to :data:`os.environ`.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {key: value for key, value in environ.items() if key.startswith(ENV_PREFIX)}
    merged.update((key, value) for key, value in config.items() if key.startswith(ENV_PREFIX))
    return merged


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
            if middleware is None:
                return challenges.bind(error, scheme)  # the error is a WSGI app; Flask runs it as the response
            environ = request.environ
            error.claims, error.presented = _claims(), environ.get("certbound.thumbprint")
            # Through the middleware's refuse: the refusal is audited and counted as any other.
            return middleware.refuse(environ, error, scheme)

        return cast(F, wrapper)

    return decorator
