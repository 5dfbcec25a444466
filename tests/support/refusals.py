"""What a refusal looks like, written out independently of the code under test; and a settable clock.

- :func:`challenge`: the exact ``WWW-Authenticate`` value expected for one scheme (RFC 6750 section 3,
  RFC 9449 section 7.1);
- :func:`parse_challenges`: the challenges of a response, parsed by werkzeug (not by our renderer);
- :func:`assert_refused`: status, JSON body, ``Cache-Control`` and every offered challenge at once;
- :class:`Clock`: a wall clock a test sets by hand.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

from werkzeug.datastructures import WWWAuthenticate
from werkzeug.test import TestResponse

__all__ = ["ALGS", "Clock", "Parsed", "assert_refused", "challenge", "parse_challenges"]

#: The default ``dpop_signing_alg_values_supported``, as the DPoP challenge's ``algs`` carries it.
ALGS = "ES256 ES384 ES512 RS256 RS384 RS512 PS256 PS384 PS512 EdDSA"


class Clock:
    """Wall-clock seconds that move only when a test says so.

    :param now: the starting time; the real time when omitted.
    """

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def challenge(scheme: str, error: str | None = None, description: str | None = None, *, realm: str = "api",
              scope: str | None = None, algs: str = ALGS) -> str:
    """The exact ``WWW-Authenticate`` value for ``scheme``; the error's parameters only when given."""
    value = f'{scheme} realm="{realm}"' + (f', algs="{algs}"' if scheme == "DPoP" else "")
    if error:
        value += f', error="{error}"'
        if description:
            value += f', error_description="{description}"'
    if scope:
        value += f', scope="{scope}"'
    return value


class Parsed(NamedTuple):
    """One challenge: its scheme (as sent) and its auth-params."""

    scheme: str
    params: dict[str, str]


def parse_challenges(values: Sequence[str]) -> list[Parsed]:
    """Each ``WWW-Authenticate`` value parsed by werkzeug, so that quoting is checked by another parser."""
    parsed = []
    for value in values:
        header = WWWAuthenticate.from_header(value)
        assert header is not None, value
        parsed.append(Parsed(value.split(" ", 1)[0], dict(header.parameters)))
    return parsed


def assert_refused(response: TestResponse, status: int, error: str | None, description: str | None, *,
                   scheme: str = "Bearer", offered: Sequence[str] = ("Bearer",), realm: str = "api",
                   scope: str | None = None, algs: str = ALGS) -> None:
    """``status``, a JSON body with ``error`` and ``description``, and every offered challenge, the error on
    ``scheme``'s only (RFC 9449 section 7.1). ``error=None``: no credentials at all (RFC 6750 section 3.1)."""
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    body: dict[str, str] = {"error": error or "unauthorized"}
    if description:
        body["error_description"] = description
    if scope:
        body["scope"] = scope
    assert response.json == body
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    carried = error if status != 503 else None  # RFC 6750 has no code for 503: the realm only
    expected = [
        challenge(s, carried, description, realm=realm, scope=scope if carried else None, algs=algs)
        if s == scheme else challenge(s, realm=realm, algs=algs)
        for s in offered
    ]
    assert response.headers.getlist("WWW-Authenticate") == expected
