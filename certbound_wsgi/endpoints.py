"""The middleware's own endpoints: logout, and the browser login's start and callback.

Each is a WSGI application. A refusal is answered through ``refuse`` (the
middleware's, so that its challenges and ``on_error`` apply here too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .authenticator import Authenticator
from .errors import AuthError, InvalidToken
from .http import request_path
from .oidc_login import BrowserLogin, wants_html
from .sessions import Sessions
from .types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["Endpoints", "Login"]

Refuse = Callable[[WSGIEnvironment, AuthError], WSGIApplication]


class Endpoints:
    """Routes the session endpoints.

    :param authenticator: the session proofs a logout demands, and the login (if any).
    :param sessions: the session store (the endpoints exist only with ``session`` in ``auth_methods``).
    :param refuse: turns an error into the response (the middleware's :meth:`refuse`).
    :param logout_path: ``logout_path``; ``logout_methods``: the methods that log out there.
    :param logout_redirect_uri: where a logout sends the browser; 204 when empty.
    """

    def __init__(self, authenticator: Authenticator, sessions: Sessions, refuse: Refuse, *, logout_path: str,
                 logout_methods: Iterable[str], logout_redirect_uri: str) -> None:
        self._authenticator = authenticator
        self._sessions = sessions
        self._refuse = refuse
        self._logout_path = logout_path
        self._logout_methods = frozenset(logout_methods)
        self._logout_redirect = logout_redirect_uri
        self.login = Login(authenticator.login, refuse) if authenticator.login is not None else None

    def match(self, environ: WSGIEnvironment) -> WSGIApplication | None:
        """The endpoint this request is for, or ``None`` for the protected app."""
        path = request_path(environ)
        if path == self._logout_path and environ.get("REQUEST_METHOD") in self._logout_methods:
            return self.logout
        if self.login is not None and path == self.login.callback_path:
            return self.login.callback
        return None

    def login_page(self, environ: WSGIEnvironment) -> WSGIApplication | None:
        """For a browser without a token or session: the login start, when logins are on."""
        return self.login.start if self.login is not None and wants_html(environ) else None

    def logout(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        sessions = self._sessions
        try:
            try:
                session = sessions.load(environ)
            except InvalidToken:
                session = None  # already ended (and deleted): only the cookie is left to clear
            if session is not None:
                # Only the owner may end a live session: the same proofs as for using it.
                thumbprint = self._authenticator.certificates.thumbprint(environ)
                self._authenticator.check_session_proofs(environ, session, thumbprint)
                sessions.end(session)
        except AuthError as error:
            return self._refuse(environ, error)(environ, start_response)
        headers = [("Set-Cookie", sessions.clear_cookie()), ("Cache-Control", "no-store")]
        if self._logout_redirect:
            start_response("302 Found", [("Location", self._logout_redirect), *headers])
        else:
            start_response("204 No Content", headers)
        return [b""]


class Login:
    """The browser login's two endpoints (OpenID Connect authorization code flow, :mod:`.oidc_login`).

    :param login: starts logins and checks the issuer's redirect back.
    :param refuse: turns an error into the response.
    """

    def __init__(self, login: BrowserLogin, refuse: Refuse) -> None:
        self._login = login
        self._refuse = refuse
        self.callback_path = login.callback_path

    def start(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Redirect the browser to the issuer."""
        try:
            status, headers = self._login.start(environ)
        except AuthError as error:
            return self._refuse(environ, error)(environ, start_response)
        start_response(status, headers)
        return [b""]

    def callback(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Finish the login: a session, and back to where the browser was going."""
        login = self._login
        try:
            session, location = login.callback(environ)
        except AuthError as error:
            if error.status < 500:
                error.reason = "login_failed"  # whatever the issuer or the state got wrong, for the audit event
            error.headers.append(("Set-Cookie", login.clear_state_cookie))
            return self._refuse(environ, error)(environ, start_response)
        headers = [("Location", location), ("Set-Cookie", login.clear_state_cookie), ("Cache-Control", "no-store")]
        if session.set_cookie:
            headers.append(("Set-Cookie", session.set_cookie))
        start_response("302 Found", headers)
        return [b""]
