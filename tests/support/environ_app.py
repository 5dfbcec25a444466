"""A WSGI application that answers with its environ as JSON.

The end-to-end tests of the nginx configurations run it behind nginx to see
exactly which variables and headers the application server receives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Echo every string-valued environ entry (``wsgi.input`` and friends are left out)."""
    body = json.dumps({key: value for key, value in environ.items() if isinstance(value, str)}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
