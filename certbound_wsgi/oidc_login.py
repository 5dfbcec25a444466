"""The browser login: OpenID Connect authorization code flow with PKCE (``authorization_code``).

A browser without a session is redirected to the issuer with ``state``,
``nonce`` and a PKCE S256 challenge (RFC 7636). The issuer sends it back to
``redirect_uri``, which this module handles: it checks ``state`` against a
cookie bound to the browser, exchanges the code with the verifier, validates
the ID token (OpenID Connect Core section 3.1.3.7) and creates a session.
Sessions made here carry no proof-of-possession binding.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from . import http
from .discovery import Discovery, DiscoveryError
from .errors import InvalidRequest, InvalidToken, TemporarilyUnavailable
from .jose import TimeClaimError, audiences, b64url_encode, check_time_claims, equal_ascii, issued_by, number
from .jwt_tokens import JWTValidator
from .sessions import Session, Sessions
from .settings import Settings
from .types import Claims, WSGIEnvironment

__all__ = ["BrowserLogin", "wants_html"]

log = logging.getLogger("certbound_wsgi")

LOGIN_TTL = 600
_ID_TOKEN_TYP = frozenset({"jwt"})
#: The largest token response read: an ID token and a few tokens, with room to spare.
MAX_TOKEN_RESPONSE = 256 * 1024
_ID_TOKEN_TIME_ERRORS = {"exp": "the ID token has expired", "iat": "the ID token's iat is invalid"}


def wants_html(environ: WSGIEnvironment) -> bool:
    """A browser navigation (a GET or HEAD accepting HTML), not an API call."""
    return environ.get("REQUEST_METHOD") in ("GET", "HEAD") and "text/html" in environ.get("HTTP_ACCEPT", "")


class BrowserLogin:
    """Starts logins and handles the issuer's redirect back.

    :param settings: ``redirect_uri``, ``login_redirect_uri``, ``scopes``, ``client_id``, ``client_secret``,
        ``session_cookie_name`` (the login cookie is named after it); ``issuer``, ``leeway`` and
        ``token_signing_algs`` for the ID token; ``ssl_verify``, ``ca_file`` and ``http_timeout`` for the
        token endpoint.
    :param discovery: the issuer's endpoints and keys.
    :param sessions: where logins and sessions are kept.
    """

    def __init__(self, settings: Settings, discovery: Discovery, sessions: Sessions,
                 clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._discovery = discovery
        self._sessions = sessions
        # For the ID token's signature only: its claims are an ID token's, checked below.
        self._tokens = JWTValidator(discovery, issuer=settings.issuer, audience=(), leeway=settings.leeway,
                                    signing_algs=settings.token_signing_algs, memo_size=1, clock=clock)
        self._clock = clock
        self._http = http.JSONClient(verify=settings.tls_verify, timeout=settings.http_timeout,
                                     max_body=MAX_TOKEN_RESPONSE)
        self.callback_path = urlsplit(settings.redirect_uri).path or "/"
        self._state_cookie = settings.session_cookie_name + "_login"

    def _endpoint(self, name: str) -> str:
        try:
            value = self._discovery.metadata(needs=name).get(name)
        except DiscoveryError:
            raise TemporarilyUnavailable("the issuer cannot be reached to log in", retry_after=5) from None
        if not isinstance(value, str):
            raise TemporarilyUnavailable(f"the issuer's metadata has no {name}", retry_after=60)
        return value

    def start(self, environ: WSGIEnvironment) -> tuple[str, list[tuple[str, str]]]:
        """Redirect to the issuer: the status line and headers of the answer."""
        s = self._settings
        state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
        # One leading slash: "//evil.example" would be an open redirect after the login.
        path = "/" + quote(http.request_path(environ)).lstrip("/")
        query = environ.get("QUERY_STRING", "")
        self._sessions.put_once(
            state, {"nonce": nonce, "verifier": verifier, "return_to": path + (f"?{query}" if query else "")},
            LOGIN_TTL,
        )
        params = {
            "response_type": "code",
            "client_id": s.client_id,
            "redirect_uri": s.redirect_uri,
            "scope": " ".join(s.scopes),
            "state": state,
            "nonce": nonce,
            # RFC 7636 section 4.2: S256.
            "code_challenge": b64url_encode(hashlib.sha256(verifier.encode()).digest()),
            "code_challenge_method": "S256",
        }
        location = self._endpoint("authorization_endpoint")
        location += ("&" if "?" in location else "?") + urlencode(params)
        # Lax, and scoped to the callback: the issuer's redirect back is a cross-site top-level GET.
        state_cookie = self._sessions.cookie(self._sessions.signed(state), max_age=LOGIN_TTL, name=self._state_cookie,
                                             path=self.callback_path, same_site="Lax")
        return "302 Found", [("Location", location), ("Set-Cookie", state_cookie), ("Cache-Control", "no-store")]

    def callback(self, environ: WSGIEnvironment) -> tuple[Session, str]:
        """Finish a login: the new session and where to send the browser.

        :raises AuthError: the login failed (the browser gets 401 with the reason).
        """
        try:
            params = dict(parse_qsl(environ.get("QUERY_STRING", ""), max_num_fields=20))
        except ValueError:
            raise InvalidRequest("the login callback has too many parameters") from None
        if "error" in params:
            raise InvalidToken(f"the login failed at the issuer: {params['error'][:64]}", error="access_denied")
        code, state = params.get("code"), params.get("state")
        if not code or not state:
            raise InvalidRequest("the login callback lacks code or state")
        # The state must be the one this browser was given (CSRF, OAuth 2.0 Security BCP section 4.7).
        expected = self._sessions.verified(environ, self._state_cookie)
        if expected is None or not equal_ascii(state, expected):
            raise InvalidRequest("the login state does not match this browser")
        login = self._sessions.take_once(expected)
        if login is None:
            raise InvalidRequest("the login has expired or was already used")
        tokens = self._exchange(code, str(login["verifier"]))
        claims = self._id_token_claims(tokens.get("id_token"), str(login["nonce"]))
        if "scope" not in claims and isinstance(tokens.get("scope"), str):
            # ID tokens rarely say what was granted; the token response does (RFC 6749 section 5.1).
            claims["scope"] = tokens["scope"]
        expires_in = number(tokens.get("expires_in"))
        token_exp = self._clock() + expires_in if expires_in else number(claims.get("exp"))
        session = self._sessions.create("authorization_code", claims, x5t=None, jkt=None, pop=False,
                                        token_exp=token_exp)
        return session, self._settings.login_redirect_uri or str(login["return_to"])

    @property
    def clear_state_cookie(self) -> str:
        return self._sessions.clear_cookie(self._state_cookie, path=self.callback_path)

    def _exchange(self, code: str, verifier: str) -> dict[str, Any]:
        """RFC 6749 section 4.1.3, with the PKCE verifier (RFC 7636 section 4.5)."""
        s = self._settings
        data = {"grant_type": "authorization_code", "code": code, "redirect_uri": s.redirect_uri,
                "code_verifier": verifier}
        # RFC 6749 section 2.3.1: both are form-urlencoded before Basic encoding.
        auth = (quote(s.client_id, safe=""), quote(s.client_secret, safe=""))
        try:
            answer = self._http.post(self._endpoint("token_endpoint"), data, auth=auth)
        except http.Unreachable as exc:
            raise TemporarilyUnavailable(f"the token endpoint cannot be reached ({exc})") from None
        except http.TooLarge:
            raise TemporarilyUnavailable("the token endpoint's answer is too large") from None
        if answer.status >= 500:
            raise TemporarilyUnavailable("the token endpoint failed")
        body = answer.document
        if answer.status != 200 or body is None:
            # RFC 6749 section 5.2: the error code, if the issuer sent one.
            error = body.get("error") if body is not None else None
            raise InvalidToken(f"the code exchange failed: {str(error)[:64] if error else answer.status}")
        return body

    def _id_token_claims(self, id_token: object, nonce: str) -> Claims:
        """OpenID Connect Core section 3.1.3.7."""
        if not isinstance(id_token, str):
            raise InvalidToken("the issuer sent no ID token")
        claims = self._tokens.signed_claims(id_token, _ID_TOKEN_TYP)
        s = self._settings
        if not issued_by(claims, s.issuer):
            raise InvalidToken("the ID token was issued by another issuer")
        aud = audiences(claims)
        if s.client_id not in aud or (len(aud) > 1 and claims.get("azp") != s.client_id):
            raise InvalidToken("the ID token is not meant for this client")
        try:
            # Steps 9 and 10: exp and iat are REQUIRED in an ID token (Core section 2).
            check_time_claims(claims, self._clock(), s.leeway, required=("exp", "iat"))
        except TimeClaimError as exc:
            raise InvalidToken(_ID_TOKEN_TIME_ERRORS.get(exc.claim) or exc.describe("the ID token")) from None
        if not equal_ascii(claims.get("nonce"), nonce):
            raise InvalidToken("the ID token's nonce does not match the login")
        if not isinstance(claims.get("sub"), str):
            raise InvalidToken("the ID token has no subject")
        return claims
