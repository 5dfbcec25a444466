"""Bare WSGI apps to measure against; light to import, so that gunicorn can serve them too."""

from __future__ import annotations

from collections.abc import Iterable

from certbound_wsgi.types import StartResponse, WSGIEnvironment

__all__ = ["hello_app"]


def hello_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The cheapest WSGI app there is, so that no app cost hides the middleware's."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]
