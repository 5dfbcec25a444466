"""The shipped entry point with the audit and metrics hooks of issue 15, until the middleware calls them.

``certbound_wsgi.wsgi:application`` configured from ``CERTBOUND_*`` variables, wrapped so that every
decision goes through :class:`certbound_wsgi.audit.Auditor` and :mod:`certbound_wsgi.metrics` at the
points the refactored middleware will call them; ``/metrics`` is served beside it. Nothing here
configures logging: what reaches the server's stderr is what a user sees. ``TEST_AUDIT_*`` stand in
for the settings options the lead adds (``audit_log_format``, ``audit_log_stderr``); ``Settings``
rejects unknown ``CERTBOUND_*`` names.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from certbound_wsgi import audit, metrics
from certbound_wsgi.errors import AuthError
from certbound_wsgi.types import StartResponse, WSGIEnvironment
from certbound_wsgi.wsgi import create_application

middleware = create_application()
if os.environ.get("TEST_AUDIT_STDERR", "on") == "on":
    audit.install_stderr_fallback()
auditor = audit.Auditor(
    fmt="json" if os.environ.get("TEST_AUDIT_LOG_FORMAT") == "json" else "text",
    is_trusted_peer=middleware.certificates.is_trusted_peer,
)


def _claims_of(environ: WSGIEnvironment) -> Any:
    """The token's claims when it validates (a binding failure comes after validation)."""
    try:
        credential = middleware.credentials.read(environ)
        return None if credential is None else middleware.authenticator._validate(credential.token)[0]
    except Exception:
        return None


def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/metrics":
        return metrics.metrics_app(environ, start_response)
    started = time.perf_counter()
    try:
        identity = middleware.authenticate(environ)
    except AuthError as error:
        try:
            presented = middleware.certificates.thumbprint(environ)
        except AuthError:
            presented = None
        reason = auditor.refused(environ, error, claims=_claims_of(environ), presented=presented)
        metrics.request("fault" if error.status >= 500 else "refused", reason, time.perf_counter() - started,
                        error.status)
        return middleware.refuse(environ, error)(environ, start_response)
    auditor.accepted(environ, identity)
    metrics.request("accepted", "ok", time.perf_counter() - started, 200)
    return middleware.app(environ, start_response)
