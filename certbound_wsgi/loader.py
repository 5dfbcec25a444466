"""``package.module:attribute``: the one way an application is named (``CERTBOUND_APP``, ``check-config --app``)."""

from __future__ import annotations

import importlib

from .errors import ConfigurationError
from .types import WSGIApplication

__all__ = ["load_app"]


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
