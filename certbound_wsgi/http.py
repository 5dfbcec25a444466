"""HTTP, both ways: the path a request addressed, and one size-capped JSON client for talking to the issuer.

Discovery, introspection and the login's token exchange all fetch small JSON
documents from the issuer. Each answer is read while streaming and at most
``max_body`` bytes of it, so that a hostile or broken issuer cannot make a
worker buffer an endless body; TLS verification is passed on every call.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import Any

import requests
import urllib3

from .jose import JSONError, json_object
from .types import WSGIEnvironment

__all__ = ["JSONClient", "JSONResponse", "TooLarge", "Unreachable", "request_path"]


def request_path(environ: WSGIEnvironment) -> str:
    """The path the client addressed: ``SCRIPT_NAME + PATH_INFO`` (PEP 3333), still latin-1-decoded bytes."""
    return str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))


class Unreachable(Exception):
    """No answer at all: connection refused, timeout, TLS failure, an unparseable URL.

    The message says which and why, for logs and ``check-config``; :attr:`kind` is only the
    exception's class (``SSLError``), for what a client may be told.
    """

    def __init__(self, detail: str, kind: str) -> None:
        super().__init__(detail)
        self.kind = kind


class TooLarge(Exception):
    """The answer was larger than the client's ``max_body``."""


@dataclass(frozen=True, slots=True)
class JSONResponse:
    """An answer from the issuer.

    :param status: the HTTP status code.
    :param document: the body as a strict JSON object (see :func:`~certbound_wsgi.jose.json_object`), or ``None``.
    :param problem: why ``document`` is ``None``: ``not JSON``, ``not a JSON object`` or ``nested too deeply``.
    :param cache_control: a GET's ``Cache-Control`` header, if any (the JWKS's says how long its keys may be kept).
    """

    status: int
    document: dict[str, Any] | None
    problem: str = ""
    cache_control: str = ""


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


def describe_failure(exc: BaseException) -> str:
    """``SSLError: certificate verify failed: self-signed certificate in certificate chain``: the
    exception's kind and, in the words of its deepest cause, why; never a URL's query or a body."""
    cause = exc
    for _ in range(8):  # requests wraps urllib3, which wraps the socket's or ssl's error
        inner = getattr(cause, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((arg for arg in cause.args if isinstance(arg, BaseException)), None)
        if inner is None:
            break
        cause = inner
    if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
        detail = f"certificate verify failed: {cause.verify_message}"
    elif isinstance(cause, ssl.SSLError) and cause.reason:
        detail = str(cause.reason).lower().replace("_", " ")
    else:
        text = str(cause)
        found = _ERRNO.search(text)
        detail = found.group(1) if found else ("timed out" if "timed out" in text else text or type(cause).__name__)
    return f"{type(exc).__name__}: {detail.strip()}"[:200]


class JSONClient:
    """GET and POST small JSON documents, never following redirects.

    :param verify: ``requests``' ``verify`` (a CA file or ``True``), passed on every call: requests lets
        ``REQUESTS_CA_BUNDLE`` override ``Session.verify``, but not a ``verify=`` passed on the call.
    :param timeout: seconds for connecting and for each read.
    :param max_body: the largest body read, in bytes.
    :param session: a :class:`requests.Session` to reuse (one is made otherwise).
    """

    def __init__(self, *, verify: str | bool, timeout: float, max_body: int,
                 session: requests.Session | None = None) -> None:
        self._verify = verify
        self._timeout = timeout
        self._max_body = max_body
        self._session = session or requests.Session()

    def get(self, url: str) -> JSONResponse:
        """:raises Unreachable: no answer. :raises TooLarge: the body exceeds ``max_body``."""
        return self._send("GET", url)

    def post(self, url: str, data: dict[str, str], *, auth: tuple[str, str] | None = None,
             cert: tuple[str, str] | None = None) -> JSONResponse:
        """POST a form (``application/x-www-form-urlencoded``).

        :raises Unreachable: no answer. :raises TooLarge: the body exceeds ``max_body``.
        """
        return self._send("POST", url, data=data, auth=auth, cert=cert)

    def _send(self, method: str, url: str, **options: Any) -> JSONResponse:
        try:
            response = self._session.request(
                method, url, verify=self._verify, timeout=self._timeout, allow_redirects=False, stream=True,
                headers={"Accept": "application/json"}, **options,
            )
            with response:
                # Read at most one byte more than allowed, decoded, straight from the stream.
                body = response.raw.read(self._max_body + 1, decode_content=True)
        except (requests.RequestException, urllib3.exceptions.HTTPError, ValueError) as exc:
            # urllib3's errors: a read that fails mid-stream; ValueError: a URL it cannot parse.
            raise Unreachable(describe_failure(exc), type(exc).__name__) from None
        if len(body) > self._max_body:
            raise TooLarge(url)
        # Only a GET's answer may be kept (RFC 9111 section 4): a POST's Cache-Control means nothing to us.
        cache_control = response.headers.get("Cache-Control", "") if method == "GET" else ""
        try:
            return JSONResponse(response.status_code, json_object(body), cache_control=cache_control)
        except JSONError as exc:
            return JSONResponse(response.status_code, None, exc.phrase, cache_control)
