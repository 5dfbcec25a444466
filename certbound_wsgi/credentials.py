"""Finding the access token in a request (RFC 6750 section 2).

A token may arrive in the ``Authorization`` header (section 2.1), a form body
(section 2.2), the query string (section 2.3) or a cookie, as far as
``bearer_token_param_type`` allows. More than one is a malformed request.
"""

from __future__ import annotations

import io
import string
from collections.abc import Collection
from typing import NamedTuple
from urllib.parse import parse_qsl

from werkzeug.http import parse_cookie

from .errors import InvalidRequest
from .types import WSGIEnvironment

__all__ = ["Credential", "CredentialReader"]

_B64CHARS = (string.ascii_letters + string.digits + "-._~+/").encode("ascii")
MAX_TOKEN_LENGTH = 16 * 1024
MAX_FORM_BODY = 1024 * 1024
_FORM_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Credential(NamedTuple):
    """An access token and where it came from.

    :param token: the token text.
    :param scheme: the ``Authorization`` scheme, lower-cased (``bearer`` or ``dpop``);
        ``bearer`` for the other places.
    :param source: ``header``, ``query``, ``body`` or ``cookie``.
    """

    token: str
    scheme: str
    source: str


def read_cookie(header: str, name: str) -> str | None:
    """The value of cookie ``name``.

    :raises InvalidRequest: the Cookie header is not UTF-8 (WSGI hands it over as latin-1).
    """
    try:
        return parse_cookie(header).get(name)
    except (UnicodeError, ValueError):
        raise InvalidRequest("the Cookie header cannot be parsed") from None


def _check(token: str, source: str) -> str:
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidRequest(f"the access token in the {source} is too long")
    # RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=".
    # bytes.translate deletes the allowed characters at C speed: this runs on every request.
    body = token.rstrip("=")
    if not body or not body.isascii() or body.encode("ascii").translate(None, _B64CHARS):
        raise InvalidRequest(f"the access token in the {source} is malformed")
    return token


class CredentialReader:
    """Extracts the one access token of a request.

    :param places: where a token is looked for: ``header``, ``query``, ``body``, ``cookie``
        (``bearer_token_param_type``).
    :param cookie_name: the cookie that carries a token, with ``cookie`` (``bearer_token_cookie_name``).
    :param dpop: whether the ``DPoP`` scheme is read besides ``Bearer`` (``proof_of_possession_dpop`` not off).
    """

    def __init__(self, places: Collection[str], *, cookie_name: str = "", dpop: bool = False) -> None:
        self._schemes = frozenset({"bearer", "dpop"}) if dpop else frozenset({"bearer"})
        self._header = "header" in places
        self._query = "query" in places
        self._body = "body" in places
        self._cookie = cookie_name if "cookie" in places else ""
        # The usual configuration: nowhere but the header, so at most one token and nothing to tally.
        self._header_only = self._header and not (self._query or self._body or self._cookie)

    def read(self, environ: WSGIEnvironment, *, checked: bool = True) -> Credential | None:
        """The request's credential, or ``None`` when it carries no access token.

        :param checked: whether the token's syntax (RFC 6750 section 2.1) is checked now. A caller that
            validates it as a JWT before anything else may leave it to :meth:`check` on a refusal: a
            JWT that verifies is a well-formed ``b64token``, so only a refused one needs the check.
            Only the ``Authorization`` header's token can be left unchecked.
        :raises InvalidRequest: a malformed header, or a token in more than one place.
        """
        if self._header_only:
            authorization = environ.get("HTTP_AUTHORIZATION")
            if not authorization:
                return None
            return self._from_header(authorization, self._schemes, checked)
        found: list[Credential] = []
        if self._header:
            authorization = environ.get("HTTP_AUTHORIZATION")
            if authorization:
                credential = self._from_header(authorization, self._schemes)
                if credential is not None:
                    found.append(credential)
        found.extend(self._outside_the_header(environ))
        if not found:
            return None
        if len(found) > 1:
            raise InvalidRequest("more than one access token in the request (RFC 6750 section 2)")
        return found[0]

    def _outside_the_header(self, environ: WSGIEnvironment) -> list[Credential]:
        """Tokens in the query, the form body or the cookie, where this reader looks for them (RFC 6750 section 2)."""
        found: list[Credential] = []
        if self._query:
            query = environ.get("QUERY_STRING", "")
            if "access_token" in query:
                found.extend(self._from_form(query, "query"))
        if self._body and self._is_form(environ):
            found.extend(self._from_form(self._read_body(environ), "body"))
        if self._cookie:
            cookie = environ.get("HTTP_COOKIE")
            if cookie and self._cookie in cookie:
                value = read_cookie(cookie, self._cookie)
                if value:
                    found.append(Credential(_check(value, "cookie"), "bearer", "cookie"))
        return found

    def check(self, credential: Credential) -> None:
        """RFC 6750 section 2.1 for a token :meth:`read` left unchecked.

        :raises InvalidRequest: the token is malformed.
        """
        _check(credential.token, "Authorization header")

    @staticmethod
    def _from_header(value: str, schemes: frozenset[str], checked: bool = True) -> Credential | None:
        scheme, _, rest = value.strip().partition(" ")
        scheme = scheme.lower()
        if scheme not in schemes:
            # Another scheme (Basic, ...) is not ours: as if no token was sent.
            return None
        token = rest.strip()
        if not token:
            raise InvalidRequest("the Authorization header has no token")
        return Credential(_check(token, "Authorization header") if checked else token, scheme, "header")

    @staticmethod
    def _from_form(data: str, source: str) -> list[Credential]:
        try:
            pairs = parse_qsl(data, keep_blank_values=True, errors="strict", max_num_fields=1000)
        except (ValueError, UnicodeError):
            raise InvalidRequest(f"the {source} cannot be parsed") from None
        return [Credential(_check(value, source), "bearer", source) for key, value in pairs if key == "access_token"]

    @staticmethod
    def _is_form(environ: WSGIEnvironment) -> bool:
        # RFC 6750 section 2.2: only a form-encoded, single-part body, and not with GET.
        content_type = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        return content_type == "application/x-www-form-urlencoded" and environ.get("REQUEST_METHOD") in _FORM_METHODS

    @staticmethod
    def _read_body(environ: WSGIEnvironment) -> str:
        """Read the form body and put it back, so that the wrapped app still sees it."""
        declared = environ.get("CONTENT_LENGTH")
        try:
            length = int(declared) if declared else None
        except ValueError:
            raise InvalidRequest("invalid Content-Length") from None
        if length is not None and (length < 0 or length > MAX_FORM_BODY):
            raise InvalidRequest("the form body is too large to search for an access token")
        if length is None and environ.get("wsgi.input_terminated"):
            # Chunked: the server marks the stream as ending by itself (gunicorn, uWSGI).
            body = environ["wsgi.input"].read(MAX_FORM_BODY + 1)
            if len(body) > MAX_FORM_BODY:
                raise InvalidRequest("the form body is too large to search for an access token")
        else:
            body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        if length is None:
            environ["CONTENT_LENGTH"] = str(len(body))
        try:
            return str(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidRequest("the form body is not UTF-8") from None
