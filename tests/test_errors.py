"""certbound_wsgi.errors: challenges (RFC 6750 section 3) and how each error is answered."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.test import Client

from certbound_wsgi.errors import (
    AuthError,
    Challenges,
    ConfigurationError,
    DPoPError,
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    MissingToken,
    NonceRequired,
    TemporarilyUnavailable,
    challenge,
)
from tests.support.refusals import ALGS
from tests.support.refusals import challenge as expected_challenge

NQSCHAR = {chr(c) for c in range(0x20, 0x7F)} - {'"', "\\"}


@pytest.mark.parametrize(
    ("scheme", "realm", "params", "expected"),
    [
        pytest.param("Bearer", "api", [], 'Bearer realm="api"', id="realm-only"),
        pytest.param("DPoP", "api", [], 'DPoP realm="api"', id="other-scheme"),
        pytest.param("Bearer", 'a"b', [], r'Bearer realm="a\"b"', id="realm-quote-escaped"),
        pytest.param("Bearer", "a\\b", [], r'Bearer realm="a\\b"', id="realm-backslash-escaped"),
        pytest.param("Bearer", '\\"', [], r'Bearer realm="\\\""', id="realm-backslash-then-quote"),
        pytest.param(
            "Bearer", "api", [("error", "invalid_token"), ("error_description", "expired")],
            'Bearer realm="api", error="invalid_token", error_description="expired"', id="params-in-order",
        ),
        pytest.param("Bearer", "api", [("error_description", 'say "hi"')],
                     'Bearer realm="api", error_description="say ?hi?"', id="description-quote-replaced"),
        pytest.param("Bearer", "api", [("error_description", "a\\b")],
                     'Bearer realm="api", error_description="a?b"', id="description-backslash-replaced"),
        pytest.param("Bearer", "api", [("error_description", "a\r\nSet-Cookie: x=1")],
                     'Bearer realm="api", error_description="a??Set-Cookie: x=1"', id="description-crlf-replaced"),
        pytest.param("Bearer", "api", [("error_description", "café\t\x00\x7f")],
                     'Bearer realm="api", error_description="caf????"', id="description-non-ascii-and-controls"),
        pytest.param("Bearer", "api", [("error_description", "!#[]~ {}$%")],
                     'Bearer realm="api", error_description="!#[]~ {}$%"', id="description-nqschar-kept"),
        pytest.param("Bearer", "api", [("scope", "read write")],
                     'Bearer realm="api", scope="read write"', id="scope"),
    ],
)
def test_challenge(scheme: str, realm: str, params: list[tuple[str, str]], expected: str) -> None:
    assert challenge(scheme, realm, params) == expected


@settings(max_examples=200, deadline=None)
@given(
    realm=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)),
    description=st.text(),
)
def test_challenge_round_trips_through_a_parser(realm: str, description: str) -> None:
    value = challenge("Bearer", realm, [("error", "invalid_token"), ("error_description", description)])
    assert "\r" not in value and "\n" not in value
    parsed = WWWAuthenticate.from_header(value)
    assert parsed is not None
    assert parsed.type == "bearer"
    assert parsed.parameters["realm"] == realm
    assert parsed.parameters["error"] == "invalid_token"
    expected = "".join(c if c in NQSCHAR else "?" for c in description)
    assert parsed.parameters["error_description"] == expected


def _respond(error: AuthError) -> tuple[str, dict[str, str], dict[str, Any]]:
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
        captured["status"] = status
        captured["headers"] = headers
        return lambda data: None

    body = b"".join(error.respond(start_response, [challenge("Bearer", "api", error.challenge_params())]))
    headers = dict(captured["headers"])
    assert len(captured["headers"]) == len(headers), "no header may repeat"
    assert headers["Content-Length"] == str(len(body))
    return captured["status"], headers, json.loads(body)


@pytest.mark.parametrize(
    ("error", "status", "body", "www_authenticate", "extra"),
    [
        pytest.param(
            MissingToken("an access token is required"), "401 Unauthorized",
            {"error": "unauthorized", "error_description": "an access token is required"},
            'Bearer realm="api"', {}, id="missing-token-has-no-error-param",
        ),
        pytest.param(
            InvalidRequest("two tokens"), "400 Bad Request",
            {"error": "invalid_request", "error_description": "two tokens"},
            'Bearer realm="api", error="invalid_request", error_description="two tokens"', {}, id="invalid-request",
        ),
        pytest.param(
            InvalidToken("the token has expired"), "401 Unauthorized",
            {"error": "invalid_token", "error_description": "the token has expired"},
            'Bearer realm="api", error="invalid_token", error_description="the token has expired"', {},
            id="invalid-token",
        ),
        pytest.param(
            InvalidToken(), "401 Unauthorized", {"error": "invalid_token"},
            'Bearer realm="api", error="invalid_token"', {}, id="invalid-token-no-description",
        ),
        pytest.param(
            InsufficientScope("needs more", scope="read write"), "403 Forbidden",
            {"error": "insufficient_scope", "error_description": "needs more", "scope": "read write"},
            'Bearer realm="api", error="insufficient_scope", error_description="needs more", scope="read write"',
            {}, id="insufficient-scope",
        ),
        pytest.param(
            TemporarilyUnavailable("issuer down", retry_after=7), "503 Service Unavailable",
            {"error": "temporarily_unavailable", "error_description": "issuer down"},
            'Bearer realm="api"', {"Retry-After": "7"}, id="temporarily-unavailable",
        ),
        pytest.param(
            TemporarilyUnavailable("issuer down", retry_after=0), "503 Service Unavailable",
            {"error": "temporarily_unavailable", "error_description": "issuer down"},
            'Bearer realm="api"', {"Retry-After": "1"}, id="retry-after-at-least-one",
        ),
        pytest.param(
            TemporarilyUnavailable("issuer down", retry_after=-30), "503 Service Unavailable",
            {"error": "temporarily_unavailable", "error_description": "issuer down"},
            'Bearer realm="api"', {"Retry-After": "1"}, id="retry-after-never-negative",
        ),
        pytest.param(
            AuthError("internal error", error="server_error", status=500), "500 Internal Server Error",
            {"error": "server_error", "error_description": "internal error"},
            'Bearer realm="api", error="server_error", error_description="internal error"', {}, id="server-error",
        ),
        pytest.param(
            InvalidToken('a "quoted" \\ value'), "401 Unauthorized",
            {"error": "invalid_token", "error_description": 'a "quoted" \\ value'},
            'Bearer realm="api", error="invalid_token", error_description="a ?quoted? ? value"', {},
            id="body-keeps-text-header-sanitised",
        ),
    ],
)
def test_each_error_is_answered(
    error: AuthError, status: str, body: dict[str, str], www_authenticate: str, extra: dict[str, str]
) -> None:
    got_status, headers, got_body = _respond(error)
    assert got_status == status
    assert int(status[:3]) == error.status
    assert got_body == body
    assert headers["WWW-Authenticate"] == www_authenticate
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    for name, value in extra.items():
        assert headers[name] == value
    if not extra:
        assert "Retry-After" not in headers


@pytest.mark.parametrize(
    ("cls", "base"),
    [
        pytest.param(MissingToken, AuthError, id="missing"),
        pytest.param(InvalidRequest, AuthError, id="invalid-request"),
        pytest.param(InvalidToken, AuthError, id="invalid-token"),
        pytest.param(InsufficientScope, AuthError, id="insufficient-scope"),
        pytest.param(TemporarilyUnavailable, AuthError, id="unavailable"),
        pytest.param(DPoPError, AuthError, id="dpop"),
        pytest.param(NonceRequired, AuthError, id="nonce"),
        pytest.param(ConfigurationError, ValueError, id="configuration-is-a-value-error"),
    ],
)
def test_hierarchy(cls: type[Exception], base: type[Exception]) -> None:
    assert issubclass(cls, base)


def test_configuration_error_names_the_option() -> None:
    error = ConfigurationError("leeway", "must not be negative")
    assert error.option == "leeway"
    assert str(error) == "leeway: must not be negative"


def test_error_class_attribute_not_shared() -> None:
    overridden = InvalidToken("x", error="other", status=400)
    assert (overridden.error, overridden.status) == ("other", 400)
    assert (InvalidToken("y").error, InvalidToken("y").status) == ("invalid_token", 401)


# -- Challenges: which challenge carries the error, decided in one place (RFC 9449 section 7.1) -----------------

OPTIONAL = Challenges("api", dpop_algs=ALGS)
STRICT = Challenges("api", bearer=False, dpop_algs=ALGS)
BEARER_ONLY = Challenges("api")
EXPIRED = InvalidToken("the token has expired")
PROOF = DPoPError("a DPoP proof is required")
NONCE = NonceRequired("n0nce")


@pytest.mark.parametrize(
    ("challenges", "error", "scheme", "target"),
    [
        pytest.param(OPTIONAL, EXPIRED, "Bearer", "Bearer", id="bearer-request-bearer-challenge"),
        pytest.param(OPTIONAL, EXPIRED, "DPoP", "DPoP", id="dpop-request-dpop-challenge"),
        pytest.param(OPTIONAL, EXPIRED, None, "Bearer", id="no-credential-first-offered"),
        pytest.param(OPTIONAL, PROOF, "Bearer", "DPoP", id="proof-error-on-dpop-whatever-the-scheme"),
        pytest.param(OPTIONAL, PROOF, None, "DPoP", id="proof-error-without-credential"),
        pytest.param(OPTIONAL, NONCE, "DPoP", "DPoP", id="nonce-on-dpop"),
        pytest.param(STRICT, EXPIRED, "Bearer", "DPoP", id="strict-bearer-not-offered"),
        pytest.param(STRICT, EXPIRED, None, "DPoP", id="strict-no-credential"),
        pytest.param(BEARER_ONLY, EXPIRED, "DPoP", "Bearer", id="dpop-off-falls-back"),
        pytest.param(BEARER_ONLY, PROOF, None, "Bearer", id="dpop-off-proof-error-falls-back"),
    ],
)
def test_challenge_target(challenges: Challenges, error: AuthError, scheme: str | None, target: str) -> None:
    assert challenges.target(error, scheme) == target
    rendered = challenges.render(error, scheme)
    carrying = [value.split(" ", 1)[0] for value in rendered if "error=" in value]
    assert carrying == [target]
    assert [value.split(" ", 1)[0] for value in rendered] == list(challenges.offered)


def test_challenges_offer_at_least_one_scheme() -> None:
    with pytest.raises(ValueError, match="at least one scheme"):
        Challenges("api", bearer=False)


@pytest.mark.parametrize(
    ("error", "scheme", "expected"),
    [
        pytest.param(MissingToken("an access token is required"), "Bearer",
                     [expected_challenge("Bearer"), expected_challenge("DPoP")], id="bare"),
        pytest.param(TemporarilyUnavailable("issuer down"), "DPoP",
                     [expected_challenge("Bearer"), expected_challenge("DPoP")], id="unavailable-realm-only"),
        pytest.param(EXPIRED, "DPoP",
                     [expected_challenge("Bearer"),
                      expected_challenge("DPoP", "invalid_token", "the token has expired")],
                     id="dpop-request"),
        pytest.param(InsufficientScope("needs more", scope="a b"), "Bearer",
                     [expected_challenge("Bearer", "insufficient_scope", "needs more", scope="a b"),
                      expected_challenge("DPoP")],
                     id="scope"),
    ],
)
def test_error_is_a_wsgi_app(error: AuthError, scheme: str, expected: list[str]) -> None:
    """Bound to the challenges, the error answers a request by itself (werkzeug's HTTPException)."""
    response = Client(OPTIONAL.bind(error, scheme)).get("/")
    assert response.status_code == error.status
    assert response.headers.getlist("WWW-Authenticate") == expected
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.json == json.loads(error.body())
