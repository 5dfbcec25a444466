"""nginx ``auth_request``: the same checks in front of any upstream, in any language.

nginx (``nginx/auth_request.conf``, rendered by ``certbound-wsgi nginx-config
--mode auth_request``) sends a subrequest here before each request it would
pass to the protected upstream. The subrequest carries the client's headers
(``Authorization``, ``DPoP``), the client certificate of the TLS connection in
``client_cert_header`` and the proxy secret (as any request nginx forwards to
the application), and two headers only nginx sets: :data:`ORIGINAL_METHOD` and :data:`ORIGINAL_URI`, the request
being authorized. A DPoP proof's ``htm`` and ``htu`` (RFC 9449 section 4.3,
checks 8 and 9) are compared with those, not with the subrequest's own method
and path.

The answer is what ``auth_request`` understands: 2xx (with the identity in
:data:`IDENTITY_HEADERS`, for ``auth_request_set``), 401 or 403 (with the
``WWW-Authenticate`` challenge, and the JSON body in :data:`ERROR_HEADER`,
since nginx discards a subrequest's body). A server fault is 503 with
``Retry-After``; nginx turns every status but 2xx, 401 and 403 into its own
error, which the rendered configuration answers with 503 (400 for
``invalid_request``), never with 200.

Run it with ``gunicorn 'certbound_wsgi.auth_request:create_application()'``,
configured by ``CERTBOUND_*`` variables like the middleware. Each decision is
written to the audit trail and counted in the metrics as the middleware's are,
with the method and path of the request being authorized.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final
from urllib.parse import quote, unquote_to_bytes

from . import metrics
from .audit import auditor_for
from .authenticator import Authenticator, Identity, build, token_scopes
from .channel import environ_key
from .discovery import Discovery
from .errors import AuthError, Challenges, ConfigurationError, InvalidRequest, InvalidToken
from .settings import Settings
from .types import StartResponse, WSGIEnvironment

__all__ = [
    "ERROR_HEADER",
    "IDENTITY_HEADERS",
    "MAX_IDENTITY_VALUE",
    "ORIGINAL_METHOD",
    "ORIGINAL_URI",
    "AuthRequest",
    "create_application",
    "identity_headers",
]

log = logging.getLogger("certbound_wsgi")

#: The request being authorized, set by nginx (``$request_method``, ``$request_uri``).
ORIGINAL_METHOD: Final = "X-Original-Method"
ORIGINAL_URI: Final = "X-Original-URI"
#: The identity of an accepted request, by what it is: for ``auth_request_set``.
IDENTITY_HEADERS: Final = {
    "sub": "X-Certbound-Sub",
    "client_id": "X-Certbound-Client-Id",
    "scope": "X-Certbound-Scope",
    "thumbprint": "X-Certbound-Thumbprint",
}
#: The JSON body of a refusal, as a header: nginx never reads a subrequest's body.
ERROR_HEADER: Final = "X-Certbound-Error"
#: The longest identity header value. nginx must fit the whole response head in
#: ``proxy_buffer_size`` (16k in the template); a longer claim is refused, never cut,
#: since a cut scope list or subject could name someone else.
MAX_IDENTITY_VALUE: Final = 2048
MAX_ORIGINAL_URI: Final = 8192

# RFC 9110 section 9.1: a method is a token.
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")
# What may stay as it is in an identity header: visible ASCII but "%". Everything else
# (space, CR, LF, other controls, non-ASCII as UTF-8) is percent-encoded, so that no value
# can end or add a header, and distinct values stay distinct.
_VISIBLE_NOT_PERCENT: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
# The methods that need more than nginx can hand over in a subrequest.
_UNSUPPORTED_METHODS = ("session", "authorization_code")


def _encoded(value: str) -> str:
    return quote(value, safe=_VISIBLE_NOT_PERCENT)


def identity_headers(identity: Identity, scopes_claim: str) -> list[tuple[str, str]]:
    """The response headers that carry ``identity`` to nginx's ``auth_request_set``.

    ``sub`` and ``client_id`` (RFC 9068 section 2.2) when they are strings, the granted scopes
    (each encoded, sorted, separated by one space), and the certificate thumbprint (RFC 8705
    section 3.1). Values are percent-encoded outside visible ASCII (``%`` included), so none
    holds CR, LF or a leading or trailing space, and distinct values stay distinct; a header
    whose claim is absent, empty or not a string is left out.

    :raises InvalidToken: a value would be longer than :data:`MAX_IDENTITY_VALUE`.
    """
    claims = identity.claims
    values = {
        "sub": claims.get("sub"),
        "client_id": claims.get("client_id"),
        "thumbprint": identity.thumbprint,
    }
    encoded = {name: _encoded(value) for name, value in values.items() if isinstance(value, str) and value}
    scopes = " ".join(sorted(_encoded(scope) for scope in token_scopes(claims, scopes_claim)))
    if scopes:
        encoded["scope"] = scopes
    for name, text in encoded.items():
        if len(text) > MAX_IDENTITY_VALUE:
            raise InvalidToken(f"the token's {name} is too long to pass on")
    return [(IDENTITY_HEADERS[name], encoded[name]) for name in IDENTITY_HEADERS if name in encoded]


class AuthRequest:
    """The ``auth_request`` endpoint: a WSGI application answering nginx's subrequests.

    It answers every request it receives (mount it where the template's
    ``location = /_certbound/auth`` sends them); nothing here serves content.

    :param settings: the configuration; :meth:`Settings.from_env` when omitted.
    :param discovery: the issuer's keys; made from ``settings`` when omitted.
    :param clock: wall-clock seconds for expiry decisions; injectable for tests.
    :raises ConfigurationError: ``session`` or ``authorization_code`` is enabled (a subrequest cannot
        set a cookie or redirect a browser), or tokens may come in the body (nginx does not send it).
    """

    def __init__(self, settings: Settings | None = None, *, discovery: Discovery | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        settings = settings if settings is not None else Settings.from_env()
        for method in _UNSUPPORTED_METHODS:
            if method in settings.auth_methods:
                raise ConfigurationError("auth_methods", f"{method} cannot be served through nginx auth_request")
        if "body" in settings.bearer_token_param_type:
            raise ConfigurationError("bearer_token_param_type", "body: nginx sends no body with auth_request")
        self.authenticator: Authenticator = build(settings, discovery=discovery, clock=clock)
        dpop = self.authenticator.dpop
        self.challenges = Challenges(settings.realm, bearer=settings.proof_of_possession_dpop != "strict",
                                     dpop_algs=dpop.algs_param if dpop is not None else None)
        self._scopes_claim = settings.scopes_claim
        # As the middleware's: the client address and request id only through the channel.
        self.auditor = auditor_for(settings, self.authenticator.certificates.channel)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        original = environ
        try:
            original = self.original_request(environ)
            identity = self.authenticator.decide(original)
            headers = identity_headers(identity, self._scopes_claim)
        except AuthError as error:
            return self._refused(original, error, error.scheme, started, start_response)
        except Exception:
            # A bug, not bad input: fail closed, keep the traceback in the log only.
            log.exception("certbound: internal error while answering auth_request")
            internal = AuthError("internal error", error="server_error", status=500, reason="internal_error")
            return self._refused(original, internal, None, started, start_response)
        self.auditor.accepted(original, identity)
        metrics.request("accepted", "ok", time.perf_counter() - started, 200)
        if identity.dpop_nonce is not None:
            headers.append(("DPoP-Nonce", identity.dpop_nonce))
        start_response("200 OK", [*headers, ("Content-Length", "0"), ("Cache-Control", "no-store")])
        return [b""]

    def original_request(self, environ: WSGIEnvironment) -> WSGIEnvironment:
        """The environ of the request being authorized, rebuilt from nginx's headers.

        :raises InvalidRequest: the subrequest did not come through the authenticated channel, or
            lacks the original method and URI, or they are malformed.
        """
        if not self.authenticator.certificates.channel.verdict(environ).trusted:
            # The original method and URI decide a DPoP proof's fate: believed through the
            # authenticated channel from nginx only (the proxy secret, or a trusted socket).
            raise InvalidRequest("auth_request subrequests are accepted from the proxy only")
        method = str(environ.get(environ_key(ORIGINAL_METHOD), ""))
        uri = str(environ.get(environ_key(ORIGINAL_URI), ""))
        if not _METHOD.fullmatch(method):
            raise InvalidRequest(f"the {ORIGINAL_METHOD} header is missing or invalid")
        if not uri.startswith("/") or len(uri) > MAX_ORIGINAL_URI or not uri.isprintable() or " " in uri:
            raise InvalidRequest(f"the {ORIGINAL_URI} header is missing or invalid")
        path, _, query = uri.partition("?")
        original = dict(environ)
        # PEP 3333, as a server builds them: the path percent-decoded to bytes, held as latin-1 text.
        original.update(REQUEST_METHOD=method, SCRIPT_NAME="", QUERY_STRING=query, RAW_URI=uri,
                        PATH_INFO=unquote_to_bytes(path.encode("latin-1")).decode("latin-1"))
        return original

    def _refused(self, original: WSGIEnvironment, error: AuthError, scheme: str | None, started: float,
                 start_response: StartResponse) -> list[bytes]:
        reason = self.auditor.refused(original, error, claims=error.claims, presented=error.presented)
        metrics.request("fault" if error.status >= 500 else "refused", reason, time.perf_counter() - started,
                        error.status)
        return self.refuse(error, scheme, start_response)

    def refuse(self, error: AuthError, scheme: str | None, start_response: StartResponse) -> list[bytes]:
        """Answer ``error`` for nginx: one ``WWW-Authenticate``, and the JSON body in :data:`ERROR_HEADER` too.

        nginx before 1.23 reads only the first of several headers of one name into a variable, so the
        challenges are joined into one value (RFC 9110 section 11.6.1: a list of challenges).
        """
        challenges = ", ".join(self.challenges.render(error, scheme))
        body = error.body().decode("ascii")  # json.dumps escapes every non-ASCII and control character

        def with_body_header(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, [*headers, (ERROR_HEADER, body)], exc_info)

        return error.respond(with_body_header, [challenges])


def create_application(environ: Mapping[str, str] | None = None) -> AuthRequest:
    """The endpoint configured from ``CERTBOUND_*`` variables (default: :data:`os.environ`).

    For gunicorn's application factories: ``gunicorn 'certbound_wsgi.auth_request:create_application()'``.
    """
    return AuthRequest(Settings.from_env(environ))
