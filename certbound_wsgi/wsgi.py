"""Entry point for gunicorn and uWSGI, configured only from the environment.

``gunicorn certbound_wsgi.wsgi:application`` wraps the app named by
``CERTBOUND_APP=package.module:attribute`` (the development echo app,
:func:`certbound_wsgi.dev.echo.echo_app`, when unset) in
:class:`~certbound_wsgi.CertBoundMiddleware` configured from
``CERTBOUND_*`` variables. A bad setting stops the worker at start-up with a
message naming the option.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

from .errors import ConfigurationError
from .middleware import CertBoundMiddleware
from .settings import Settings
from .types import WSGIApplication

__all__ = ["application", "create_application", "load_app"]


def load_app(target: str) -> WSGIApplication:
    """Import ``package.module:attribute`` and return the WSGI callable it names."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError("app", f"{target!r} is not of the form package.module:attribute")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise ConfigurationError("app", f"cannot load {target!r}: {exc}") from None
    if not callable(obj):
        raise ConfigurationError("app", f"{target!r} is not callable")
    return obj


def create_application(environ: Mapping[str, str] | None = None) -> CertBoundMiddleware:
    """The protected application described by ``environ`` (default: :data:`os.environ`)."""
    environ = os.environ if environ is None else environ
    settings = Settings.from_env(environ)
    target = environ.get("CERTBOUND_APP", "").strip()
    if target:
        return CertBoundMiddleware(load_app(target), settings)
    # Imported only when no app is named, so that a real deployment never loads the dev package.
    from .dev.echo import echo_app

    return CertBoundMiddleware(echo_app, settings)


application = create_application()
