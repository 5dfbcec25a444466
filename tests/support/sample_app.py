"""A tiny WSGI app for the CERTBOUND_APP tests of certbound_wsgi.wsgi."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"sample app for " + str(environ.get("REMOTE_USER")).encode()]


class _Holder:
    app = staticmethod(app)


#: For ``tests.support.sample_app:holder.app`` (a dotted attribute path).
holder = _Holder()

#: For the "not callable" refusal.
not_callable = 42
