"""A scripted web browser for the login tests: cookies, manual redirects, HTML forms.

:class:`Browser` wraps a :class:`requests.Session` that keeps cookies (Secure
ones included: everything is HTTPS) and follows no redirect by itself: every
hop is one request, recorded in :attr:`Browser.history` as
``(method, url, status)``, so that a test can assert the path a login took.
Every request verifies the server against the CA file given (passed on each
call: the machine's ``REQUESTS_CA_BUNDLE`` must not win; the session ignores
the environment, proxies included) and, when the browser has one, presents its
client certificate to whichever server asks.

:meth:`Browser.login` walks a relying party's login end to end::

    browser = Browser(pki.ca_file, cert=pki.alice)
    final = browser.login(stack.url + "/private")      # app -> IdP -> login -> consent -> callback -> app
    assert final.status_code == 200

Like a real browser it sends every cookie for a host to every port of that
host: the IdP (oidc-provider's ``_session``, ``_interaction``,
``_interaction_resume`` cookies) and an app on 127.0.0.1 see each other's
cookies. A second login from the same browser finds the IdP session (and the
grant) and skips the login and consent pages unless the relying party sends
``prompt=login``/``prompt=consent``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from certbound_wsgi.dev.pki import Issued

__all__ = ["Browser", "Form", "LoginError", "parse_forms"]

REDIRECTS = frozenset({301, 302, 303, 307, 308})


class LoginError(AssertionError):
    """The login went somewhere a login does not go (a loop, too many forms or hops)."""


@dataclass
class Form:
    """One HTML form: where it goes, how, and the values it would send as it stands."""

    action: str  # absolute
    method: str  # "GET" or "POST"
    #: ``(name, type, value)`` of each named input, textarea and select, in document order.
    inputs: list[tuple[str, str, str]] = field(default_factory=list)

    def values(self) -> dict[str, str]:
        """What submitting the form unchanged sends (checkboxes and radios only when checked)."""
        return {name: value for name, kind, value in self.inputs if kind not in ("submit", "button", "image")}

    def names(self, *kinds: str) -> list[str]:
        return [name for name, kind, _ in self.inputs if kind in kinds]


class _FormParser(HTMLParser):
    def __init__(self, base_url: str) -> None:
        super().__init__(convert_charrefs=True)
        self.base_url = base_url
        self.forms: list[Form] = []
        self._form: Form | None = None
        self._textarea: list[str] | None = None
        self._textarea_name = ""
        self._select: str | None = None
        self._select_value: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {name: (value or "") for name, value in attrs}
        if tag == "form":
            self._form = Form(
                urljoin(self.base_url, attr.get("action") or self.base_url),
                (attr.get("method") or "get").upper(),
            )
            self.forms.append(self._form)
            return
        if self._form is None:
            return
        name = attr.get("name")
        if tag == "input" and name and "disabled" not in attr:
            kind = (attr.get("type") or "text").lower()
            if kind in ("checkbox", "radio") and "checked" not in attr:
                return
            value = attr.get("value", "on" if kind in ("checkbox", "radio") else "")
            self._form.inputs.append((name, kind, value))
        elif tag == "button" and name and (attr.get("type") or "submit").lower() == "submit":
            self._form.inputs.append((name, "submit", attr.get("value", "")))
        elif tag == "textarea" and name:
            self._textarea, self._textarea_name = [], name
        elif tag == "select" and name:
            self._select, self._select_value = name, None
        elif tag == "option" and self._select is not None:
            if self._select_value is None or "selected" in attr:
                self._select_value = attr.get("value", "")

    def handle_data(self, data: str) -> None:
        if self._textarea is not None:
            self._textarea.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None
        elif tag == "textarea" and self._textarea is not None:
            if self._form is not None:
                self._form.inputs.append((self._textarea_name, "textarea", "".join(self._textarea)))
            self._textarea = None
        elif tag == "select" and self._select is not None:
            if self._form is not None and self._select_value is not None:
                self._form.inputs.append((self._select, "select", self._select_value))
            self._select = None


def parse_forms(response: requests.Response) -> list[Form]:
    """The forms of an HTML response, actions made absolute against its URL."""
    if "html" not in response.headers.get("content-type", ""):
        return []
    parser = _FormParser(response.url)
    parser.feed(response.text)
    parser.close()
    return parser.forms


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    return parts.scheme, (parts.hostname or ""), port


class Browser:
    """A cookie-keeping HTTPS client that follows redirects one hop at a time (see the module)."""

    def __init__(
        self,
        ca_file: str,
        cert: Issued | tuple[str, str] | None = None,
        *,
        timeout: float = 15.0,
        max_hops: int = 20,
    ) -> None:
        self.ca_file = ca_file
        self.cert = cert.pair if isinstance(cert, Issued) else cert
        self.timeout = timeout
        self.max_hops = max_hops
        self.session = requests.Session()
        self.session.trust_env = False  # no REQUESTS_CA_BUNDLE, no proxies, no .netrc
        self.session.headers["User-Agent"] = "certbound-wsgi-tests-browser"
        #: Every request made: ``(method, url, status)``.
        self.history: list[tuple[str, str, int]] = []

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    @property
    def cookies(self) -> requests.cookies.RequestsCookieJar:
        return self.session.cookies

    # ----- one hop -------------------------------------------------------------

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One request, no redirect followed, recorded in :attr:`history`."""
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("cert", self.cert)
        response = self.session.request(method, url, verify=self.ca_file, allow_redirects=False, **kwargs)
        self.history.append((method.upper(), url, response.status_code))
        return response

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, data: Mapping[str, str] | None = None, **kwargs: Any) -> requests.Response:
        return self.request("POST", url, data=data, **kwargs)

    @staticmethod
    def location(response: requests.Response) -> str | None:
        """Where a redirect points, made absolute; ``None`` when ``response`` is no redirect."""
        if response.status_code not in REDIRECTS or "location" not in response.headers:
            return None
        return urljoin(response.url, response.headers["location"])

    def next_hop(self, response: requests.Response) -> requests.Response:
        """Follow the redirect ``response`` is, as a browser does (303 and 301/302 after POST: GET)."""
        target = self.location(response)
        if target is None:
            raise ValueError(f"{response.status_code} from {response.url} is no redirect")
        method = (response.request.method or "GET").upper()
        if response.status_code in (307, 308):
            content_type = response.request.headers.get("content-type")
            headers = {"Content-Type": content_type} if content_type else {}
            return self.request(method, target, data=response.request.body, headers=headers)
        return self.get(target)

    def follow(self, response: requests.Response, stop_at: str | None = None) -> requests.Response:
        """Follow redirects from ``response`` until one that is none, or whose target starts with ``stop_at``."""
        for _ in range(self.max_hops):
            target = self.location(response)
            if target is None or (stop_at is not None and target.startswith(stop_at)):
                return response
            response = self.next_hop(response)
        raise LoginError(f"more than {self.max_hops} redirects; last: {self.history[-3:]}")

    def open(self, url: str, stop_at: str | None = None) -> requests.Response:
        """GET ``url`` and follow its redirects (see :meth:`follow`)."""
        return self.follow(self.get(url), stop_at)

    def submit(self, form: Form, fields: Mapping[str, str] | None = None) -> requests.Response:
        """Submit ``form`` with ``fields`` over its values; no redirect followed."""
        values = {**form.values(), **(fields or {})}
        if form.method == "POST":
            return self.post(form.action, data=values)
        return self.get(form.action, params=values)

    # ----- the login -----------------------------------------------------------

    def login(
        self,
        start_url: str,
        username: str = "alice",
        password: str = "x",
        *,
        stop_at: str | None = None,
        max_forms: int = 4,
    ) -> requests.Response:
        """Log in the way a person at a browser does; return the last response.

        GET ``start_url`` (a protected page of the app, which sends the browser
        to the IdP), follow every redirect, and on each HTML page with a form
        that is not on the app's origin (the IdP's login and consent pages)
        fill every text/email input with ``username`` and every password input
        with ``password`` and submit it; and so on back to the app's callback
        and past it. The app's origin is that of ``stop_at`` if given, else of
        ``start_url``.

        ``stop_at``: stop before following a redirect whose target starts with
        it (the redirect to a relying party's redirect_uri: read ``code`` and
        ``state`` from ``Browser.location(response)``).
        """
        app = _origin(stop_at or start_url)
        forms = 0
        response = self.follow(self.get(start_url), stop_at)
        while self.location(response) is None:
            if _origin(response.url) == app or response.status_code != 200:
                return response
            form = next((f for f in parse_forms(response) if f.method == "POST"), None)
            if form is None:
                return response
            forms += 1
            if forms > max_forms:
                raise LoginError(f"more than {max_forms} forms at {response.url}; history: {self.history}")
            fields = dict.fromkeys(form.names("text", "email"), username)
            fields.update(dict.fromkeys(form.names("password"), password))
            response = self.follow(self.submit(form, fields), stop_at)
        return response
