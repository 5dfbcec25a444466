"""The browser login: OpenID Connect authorization code flow with PKCE (``authorization_code``).

A browser without a session is redirected to the issuer with ``state``,
``nonce`` and a PKCE S256 challenge (RFC 7636). The issuer sends it back to
``redirect_uri``, which this module handles: it checks ``state`` against a
cookie bound to the browser, exchanges the code with the verifier, validates
the ID token (OpenID Connect Core section 3.1.3.7) and creates a session.
Sessions made here carry no proof-of-possession binding.

Nothing is stored before the issuer has authenticated the user: the login's
nonce, PKCE verifier, return path and end travel sealed in the state cookie,
and the callback takes the state atomically (a used-state marker) before it
exchanges the code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from . import http
from .cache.seal import Sealer
from .client_keys import ClientKeys
from .credentials import read_cookie
from .discovery import Discovery, DiscoveryError
from .errors import InvalidRequest, InvalidToken, TemporarilyUnavailable
from .jose import (
    TimeClaimError,
    audiences,
    b64url_decode,
    b64url_encode,
    check_time_claims,
    equal_ascii,
    issued_by,
    number,
)
from .jwt_tokens import JWTValidator
from .sessions import Session, Sessions, cookie_name
from .settings import Settings
from .types import Claims, WSGIEnvironment

__all__ = ["BrowserLogin", "return_path", "wants_html"]

log = logging.getLogger("certbound_wsgi")

LOGIN_TTL = 600
#: The longest state cookie read: the sealed login with a return path of at most MAX_RETURN_PATH.
MAX_STATE_COOKIE = 3072
#: The longest page path kept to return to; a longer one returns to its path alone, or to "/".
MAX_RETURN_PATH = 1024
# RFC 3986 section 3.3: pchar = unreserved / pct-encoded / sub-delims / ":" / "@".
_PCHAR_SAFE = "!$&'()*+,;=:@"
_ID_TOKEN_TYP = frozenset({"jwt"})
#: The largest token response read: an ID token and a few tokens, with room to spare.
MAX_TOKEN_RESPONSE = 256 * 1024
_ID_TOKEN_TIME_ERRORS = {"exp": "the ID token has expired", "iat": "the ID token's iat is invalid"}


def wants_html(environ: WSGIEnvironment) -> bool:
    """A browser navigation (a GET or HEAD accepting HTML), not an API call."""
    return environ.get("REQUEST_METHOD") in ("GET", "HEAD") and "text/html" in environ.get("HTTP_ACCEPT", "")


def _raw(value: str) -> bytes:
    """The bytes a WSGI server received: PEP 3333 hands them over decoded as latin-1."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:  # a server that decoded as UTF-8 after all
        return value.encode("utf-8", "surrogateescape")


def return_path(environ: WSGIEnvironment) -> str:
    """The page that started a login, as a local path on this origin.

    Percent-encoded once from the raw bytes (so UTF-8 survives: no double encoding),
    dot segments removed (RFC 3986 section 5.2.4) and empty segments dropped, so that
    it can never become ``//host`` or ``/\\host`` (another origin to a browser).
    """
    segments: list[str] = []
    raw = _raw(http.request_path(environ))
    for segment in raw.split(b"/"):
        if segment == b"..":
            if segments:
                segments.pop()
        elif segment not in (b"", b"."):
            segments.append(quote(segment, safe=_PCHAR_SAFE))
    path = "/" + "/".join(segments)
    if segments and raw.endswith((b"/", b"/.", b"/..")):
        path += "/"
    query = quote(_raw(environ.get("QUERY_STRING", "")), safe=_PCHAR_SAFE + "/?%")
    if query and len(path) + 1 + len(query) <= MAX_RETURN_PATH:
        return f"{path}?{query}"
    return path if len(path) <= MAX_RETURN_PATH else "/"


class BrowserLogin:
    """Starts logins and handles the issuer's redirect back.

    :param settings: ``redirect_uri``, ``login_redirect_uri``, ``scopes``, ``client_id``, ``client_secret``,
        ``token_endpoint_auth_method`` (with ``private_key_jwt``: ``client_jwk``, ``client_alg``),
        ``session_cookie_name`` and ``session_cookie_secure`` (the login cookie is named after them),
        ``session_secret`` (its sealing key); ``issuer``, ``leeway`` and ``token_signing_algs`` for the ID
        token; ``ssl_verify``, ``ca_file`` and ``http_timeout`` for the token endpoint.
    :param discovery: the issuer's endpoints and keys.
    :param sessions: where the login's session is opened and its state marked used.
    """

    def __init__(self, settings: Settings, discovery: Discovery, sessions: Sessions,
                 clock: Callable[[], float] = time.time, *, client_keys: ClientKeys | None = None) -> None:
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
        self._state_cookie = cookie_name(settings.session_cookie_name + "_login",
                                         secure=settings.session_cookie_secure, host_only=True, path="/")
        # Seals the login state cookie; keyed from session_secret, apart from every other use.
        self._sealer = Sealer(settings.session_secret, "login")
        private_key_jwt = settings.token_endpoint_auth_method == "private_key_jwt"  # noqa: S105 - a method name
        self._keys = (client_keys or ClientKeys.from_settings(settings)) if private_key_jwt else None

    def _endpoint(self, name: str) -> str:
        try:
            value = self._discovery.metadata(needs=name).get(name)
        except DiscoveryError:
            raise TemporarilyUnavailable("the issuer cannot be reached to log in", retry_after=5) from None
        if not isinstance(value, str):
            raise TemporarilyUnavailable(f"the issuer's metadata has no {name}", retry_after=60)
        return value

    def start(self, environ: WSGIEnvironment) -> tuple[str, list[tuple[str, str]]]:
        """Redirect to the issuer: the status line and headers of the answer.

        Nothing is stored: the nonce, the PKCE verifier, the page to return to and the login's
        end travel sealed in the state cookie, bound to ``state``, so that an unauthenticated
        client can start any number of logins without costing the store anything.
        """
        s = self._settings
        state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
        login = {"n": nonce, "v": verifier, "r": return_path(environ), "e": int(self._clock()) + LOGIN_TTL}
        sealed = b64url_encode(self._sealer.seal(state, json.dumps(login, separators=(",", ":")).encode()))
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
        # Lax: the issuer's redirect back is a cross-site top-level GET. Host-only with Path=/, so
        # that it takes the __Host- prefix and no sibling host can plant a login state.
        state_cookie = self._sessions.cookie(f"{state}.{sealed}", max_age=LOGIN_TTL, name=self._state_cookie,
                                             same_site="Lax", host_only=True)
        return "302 Found", [("Location", location), ("Set-Cookie", state_cookie), ("Cache-Control", "no-store")]

    def _login_of(self, environ: WSGIEnvironment, state: str) -> dict[str, Any]:
        """The login this browser started for ``state``, opened from its state cookie."""
        header = environ.get("HTTP_COOKIE")
        raw = read_cookie(header, self._state_cookie) if header and self._state_cookie in header else None
        cookie_state, _, sealed = (raw or "").rpartition(".")
        # The state must be the one this browser was given (CSRF, OAuth 2.0 Security BCP section 4.7).
        if not raw or len(raw) > MAX_STATE_COOKIE or not equal_ascii(state, cookie_state):
            raise InvalidRequest("the login state does not match this browser")
        try:
            opened = self._sealer.open(state, b64url_decode(sealed))
            login: Any = json.loads(opened) if opened is not None else None
        except (ValueError, RecursionError):
            login = None
        if (not isinstance(login, dict) or not all(isinstance(login.get(k), str) for k in "nvr")
                or not isinstance(login.get("e"), int)):
            raise InvalidRequest("the login state does not match this browser")
        return login

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
        login = self._login_of(environ, state)
        left = login["e"] - self._clock()
        # Taken atomically before the exchange: of simultaneous callbacks, exactly one goes on.
        if left <= 0 or not self._sessions.first_use(state, left):
            raise InvalidRequest("the login has expired or was already used")
        tokens = self._exchange(code, login["v"])
        claims = self._id_token_claims(tokens.get("id_token"), login["n"])
        # RFC 6749 section 5.1: the granted scope; absent, it is the scope requested (section 3.3).
        # Kept beside the claims, not among them: the ID token never had a scope claim.
        granted = tokens.get("scope")
        scope = granted if isinstance(granted, str) else " ".join(self._settings.scopes)
        expires_in = number(tokens.get("expires_in"))
        token_exp = self._clock() + expires_in if expires_in else number(claims.get("exp"))
        session = self._sessions.create("authorization_code", claims, x5t=None, jkt=None, pop=False,
                                        token_exp=token_exp, scope=scope)
        return session, self._settings.login_redirect_uri or login["r"]

    @property
    def clear_state_cookie(self) -> str:
        return self._sessions.cookie("", max_age=0, name=self._state_cookie, same_site="Lax", host_only=True)

    def _exchange(self, code: str, verifier: str) -> dict[str, Any]:
        """RFC 6749 section 4.1.3, with the PKCE verifier (RFC 7636 section 4.5)."""
        s = self._settings
        data = {"grant_type": "authorization_code", "code": code, "redirect_uri": s.redirect_uri,
                "code_verifier": verifier}
        endpoint = self._endpoint("token_endpoint")
        auth = None
        if self._keys is not None:
            data.update(self._keys.form(endpoint))  # RFC 7523 section 2.2
        elif s.token_endpoint_auth_method == "client_secret_post":  # noqa: S105 - a method name
            data.update(client_id=s.client_id, client_secret=s.client_secret)
        else:
            # RFC 6749 section 2.3.1: both are form-urlencoded before Basic encoding.
            auth = (quote(s.client_id, safe=""), quote(s.client_secret, safe=""))
        try:
            answer = self._http.post(endpoint, data, auth=auth)
        except http.Unreachable as exc:
            raise TemporarilyUnavailable(f"the token endpoint cannot be reached ({exc.kind})") from None
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
