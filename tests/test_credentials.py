"""certbound_wsgi.credentials: finding the one access token of a request (RFC 6750 section 2)."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from certbound_wsgi.credentials import MAX_FORM_BODY, MAX_TOKEN_LENGTH, Credential, CredentialReader
from certbound_wsgi.errors import InvalidRequest
from certbound_wsgi.types import StartResponse, WSGIEnvironment
from tests.conftest import CountingApp, MakeClient, bearer, make_settings

TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"
FORM = "application/x-www-form-urlencoded"
ALL_PLACES: dict[str, Any] = {
    "bearer_token_param_type": ("header", "query", "body", "cookie"),
    "bearer_token_cookie_name": "at",
}


def reader(**overrides: Any) -> CredentialReader:
    """A reader with the options of ``make_settings(**overrides)``, as the middleware builds it."""
    s = make_settings(**overrides)
    return CredentialReader(s.bearer_token_param_type, cookie_name=s.bearer_token_cookie_name,
                            dpop=s.proof_of_possession_dpop != "off")


def read(environ: WSGIEnvironment, **overrides: Any) -> Credential | None:
    return reader(**overrides).read(environ)


def env(**kwargs: Any) -> WSGIEnvironment:
    return EnvironBuilder(**kwargs).get_environ()


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        pytest.param(f"Bearer {TOKEN}", TOKEN, id="bearer"),
        pytest.param(f"bearer {TOKEN}", TOKEN, id="lower-case-scheme"),
        pytest.param(f"BEARER {TOKEN}", TOKEN, id="upper-case-scheme"),
        pytest.param(f"bEaReR {TOKEN}", TOKEN, id="mixed-case-scheme"),
        pytest.param(f"Bearer    {TOKEN}   ", TOKEN, id="extra-spaces"),
        pytest.param(f"   Bearer {TOKEN}", TOKEN, id="leading-spaces"),
        pytest.param("Bearer abc==", "abc==", id="b64token-padding"),
        pytest.param("Bearer a-._~+/Z9", "a-._~+/Z9", id="b64token-alphabet"),
        pytest.param("Bearer " + "a" * MAX_TOKEN_LENGTH, "a" * MAX_TOKEN_LENGTH, id="at-length-limit"),
        pytest.param("Basic dXNlcjpwYXNz", None, id="basic-is-missing"),
        pytest.param(f"Digest {TOKEN}", None, id="digest-is-missing"),
        pytest.param(f"DPoP {TOKEN}", None, id="dpop-not-enabled-is-missing"),
        pytest.param(f"Bearer\t{TOKEN}", None, id="tab-is-not-a-separator"),
        pytest.param(f"Bearer{TOKEN}", None, id="no-separator"),
        pytest.param("", None, id="empty-header"),
        pytest.param("Bearer", InvalidRequest, id="scheme-only"),
        pytest.param("Bearer    ", InvalidRequest, id="scheme-and-spaces"),
        pytest.param("Bearer tok en", InvalidRequest, id="space-inside"),
        pytest.param("Bearer a=b", InvalidRequest, id="equals-inside"),
        pytest.param('Bearer a"b', InvalidRequest, id="quote"),
        pytest.param("Bearer a,b", InvalidRequest, id="comma"),
        pytest.param("Bearer t\u00f8ken", InvalidRequest, id="latin1"),
        pytest.param("Bearer tok\x00en", InvalidRequest, id="nul"),
        pytest.param("Bearer ==", InvalidRequest, id="padding-only"),
        pytest.param("Bearer " + "a" * (MAX_TOKEN_LENGTH + 1), InvalidRequest, id="too-long"),
    ],
)
def test_authorization_header(authorization: str, expected: str | type[Exception] | None) -> None:
    environ = {"HTTP_AUTHORIZATION": authorization}
    if expected is InvalidRequest:
        with pytest.raises(InvalidRequest) as info:
            read(environ)
        assert info.value.status == 400
        assert "Authorization header" in info.value.description
    elif expected is None:
        assert read(environ) is None
    else:
        assert read(environ) == Credential(str(expected), "bearer", "header")


@pytest.mark.parametrize(
    ("settings", "request_kwargs", "expected"),
    [
        # header only (the default)
        pytest.param({}, {"query_string": f"access_token={TOKEN}"}, None, id="query-not-enabled"),
        pytest.param({}, {"method": "POST", "data": {"access_token": TOKEN}}, None, id="body-not-enabled"),
        pytest.param({}, {"headers": {"Cookie": f"at={TOKEN}"}}, None, id="cookie-not-enabled"),
        pytest.param({}, {"headers": bearer(TOKEN), "query_string": "access_token=x"}, "header",
                     id="disabled-query-is-not-a-second-token"),
        # query
        pytest.param({"bearer_token_param_type": ["query"]}, {"query_string": f"access_token={TOKEN}"}, "query",
                     id="query"),
        pytest.param({"bearer_token_param_type": ["query"]}, {"query_string": f"a=1&access_token={TOKEN}&b=2"},
                     "query", id="query-among-others"),
        pytest.param({"bearer_token_param_type": ["query"]}, {"query_string": f"x_access_token={TOKEN}"}, None,
                     id="query-similar-name"),
        pytest.param({"bearer_token_param_type": ["query"]}, {"headers": bearer(TOKEN)}, None,
                     id="header-not-enabled"),
        pytest.param({"bearer_token_param_type": ["query"]}, {"query_string": "access_token="}, 400,
                     id="query-empty-token"),
        pytest.param({"bearer_token_param_type": ["query"]}, {"query_string": "access_token=a%20b"}, 400,
                     id="query-illegal-character"),
        pytest.param({"bearer_token_param_type": ["query"]}, {"query_string": "access_token=%FF"}, 400,
                     id="query-not-utf8"),
        pytest.param({"bearer_token_param_type": ["query"]}, {"query_string": "access_token=a&access_token=b"}, 400,
                     id="query-twice"),
        pytest.param({"bearer_token_param_type": ["query"]},
                     {"query_string": "access_token=a&" + "&".join(f"k{i}=v" for i in range(1001))}, 400,
                     id="query-too-many-fields"),
        # body
        pytest.param({"bearer_token_param_type": ["body"]}, {"method": "POST", "data": {"access_token": TOKEN}},
                     "body", id="body-post"),
        pytest.param({"bearer_token_param_type": ["body"]},
                     {"method": "PUT", "data": f"access_token={TOKEN}", "content_type": f"{FORM}; charset=UTF-8"},
                     "body", id="body-put-with-charset"),
        pytest.param({"bearer_token_param_type": ["body"]},
                     {"method": "GET", "data": f"access_token={TOKEN}", "content_type": FORM}, None,
                     id="body-with-get-not-searched"),
        pytest.param({"bearer_token_param_type": ["body"]},
                     {"method": "POST", "json": {"access_token": TOKEN}}, None, id="body-json-not-searched"),
        pytest.param({"bearer_token_param_type": ["body"]},
                     {"method": "POST", "data": {"access_token": TOKEN, "f": (io.BytesIO(b"x"), "f.txt")}}, None,
                     id="body-multipart-not-searched"),
        pytest.param({"bearer_token_param_type": ["body"]},
                     {"method": "POST", "data": b"access_token=\xff", "content_type": FORM}, 400,
                     id="body-not-utf8"),
        pytest.param({"bearer_token_param_type": ["body"]},
                     {"method": "POST", "data": "x=1", "content_type": FORM, "environ_overrides":
                      {"CONTENT_LENGTH": "abc"}}, 400, id="body-bad-content-length"),
        pytest.param({"bearer_token_param_type": ["body"]},
                     {"method": "POST", "data": "x=1", "content_type": FORM, "environ_overrides":
                      {"CONTENT_LENGTH": str(MAX_FORM_BODY + 1)}}, 400, id="body-too-large"),
        pytest.param({"bearer_token_param_type": ["body"]},
                     {"method": "POST", "data": "x=1", "content_type": FORM, "environ_overrides":
                      {"CONTENT_LENGTH": "-1"}}, 400, id="body-negative-length"),
        # cookie
        pytest.param(ALL_PLACES, {"headers": {"Cookie": f"at={TOKEN}"}}, "cookie", id="cookie"),
        pytest.param(ALL_PLACES, {"headers": {"Cookie": f"other=1; at={TOKEN}"}}, "cookie", id="cookie-among-others"),
        pytest.param(ALL_PLACES, {"headers": {"Cookie": f"that={TOKEN}"}}, None, id="cookie-similar-name"),
        pytest.param(ALL_PLACES, {"headers": {"Cookie": "at="}}, None, id="cookie-empty"),
        pytest.param(ALL_PLACES, {"headers": {"Cookie": 'at="a b"'}}, 400, id="cookie-illegal-character"),
        # more than one place
        pytest.param(ALL_PLACES, {"headers": bearer(TOKEN), "query_string": f"access_token={TOKEN}"}, 400,
                     id="header-and-query"),
        pytest.param(ALL_PLACES, {"headers": {**bearer(TOKEN), "Cookie": f"at={TOKEN}"}}, 400,
                     id="header-and-cookie"),
        pytest.param(ALL_PLACES, {"method": "POST", "headers": bearer(TOKEN), "data": {"access_token": TOKEN}}, 400,
                     id="header-and-body"),
        pytest.param(ALL_PLACES, {"method": "POST", "query_string": f"access_token={TOKEN}",
                                  "data": {"access_token": TOKEN}}, 400, id="query-and-body"),
        pytest.param(ALL_PLACES, {"headers": {"Authorization": "Basic dXNlcjpwYXNz", "Cookie": f"at={TOKEN}"}},
                     "cookie", id="basic-header-and-cookie"),
    ],
)
def test_places(settings: dict[str, Any], request_kwargs: dict[str, Any], expected: str | int | None) -> None:
    environ = env(**request_kwargs)
    if expected == 400:
        with pytest.raises(InvalidRequest) as info:
            read(environ, **settings)
        assert info.value.status == 400
        assert info.value.error == "invalid_request"
    elif expected is None:
        assert read(environ, **settings) is None
    else:
        assert read(environ, **settings) == Credential(TOKEN, "bearer", str(expected))


@pytest.mark.parametrize(
    ("request_kwargs", "status", "www_authenticate"),
    [
        pytest.param({"headers": bearer(TOKEN), "query_string": f"access_token={TOKEN}"}, 400,
                     'Bearer realm="api", error="invalid_request", '
                     'error_description="more than one access token in the request (RFC 6750 section 2)"',
                     id="two-places-400"),
        pytest.param({"headers": {"Authorization": "Bearer a b"}}, 400,
                     'Bearer realm="api", error="invalid_request", '
                     'error_description="the access token in the Authorization header is malformed"',
                     id="malformed-400"),
        pytest.param({"method": "GET", "data": f"access_token={TOKEN}", "content_type": FORM}, 401,
                     'Bearer realm="api"', id="get-form-body-is-missing-token"),
        pytest.param({"headers": {"Authorization": "Basic dXNlcjpwYXNz"}}, 401, 'Bearer realm="api"',
                     id="basic-is-missing-token"),
    ],
)
def test_through_the_middleware(
    request_kwargs: dict[str, Any], status: int, www_authenticate: str, make_client: MakeClient
) -> None:
    app = CountingApp()
    response = make_client(app, **ALL_PLACES).open(**request_kwargs)
    assert response.status_code == status
    assert response.headers["WWW-Authenticate"] == www_authenticate
    assert app.calls == []


def _body_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    request = Request(environ)
    raw = request.get_data(cache=True)
    answer = raw + b"|" + ",".join(f"{k}={v}" for k, v in sorted(request.form.items())).encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [answer]


@pytest.mark.parametrize(
    ("data", "token_in"),
    [
        pytest.param("access_token=TOKEN&x=1&y=%C3%A9", "body", id="token-in-body"),
        pytest.param("x=1&y=%C3%A9", "header", id="token-in-header"),
    ],
)
def test_form_body_still_readable_by_the_app(
    data: str, token_in: str, make_client: MakeClient, alice_token: str, alice_x5t: str, alice: Any
) -> None:
    data = data.replace("TOKEN", alice_token)
    client = make_client(_body_app, bearer_token_param_type=["header", "body"])
    response = client.post(
        "/", data=data, content_type=FORM, headers=bearer(alice_token) if token_in == "header" else {},
        environ_overrides={"SSL_CLIENT_CERT": alice.cert_pem},
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    raw, _, form = response.get_data(as_text=True).partition("|")
    assert raw == data
    expected = {"x": "1", "y": "é"} | ({"access_token": alice_token} if token_in == "body" else {})
    assert form == ",".join(f"{k}={v}" for k, v in sorted(expected.items()))


def test_chunked_form_body_still_readable_by_the_app(make_client: MakeClient, alice_token: str, alice: Any) -> None:
    data = b"x=1&y=2"
    client = make_client(_body_app, bearer_token_param_type=["header", "body"])
    environ = env(method="POST", data=data, content_type=FORM, headers=bearer(alice_token))
    del environ["CONTENT_LENGTH"]
    environ.update({"wsgi.input_terminated": True, "wsgi.input": io.BytesIO(data),
                    "SSL_CLIENT_CERT": alice.cert_pem})
    response = client.run_wsgi_app(environ, buffered=True)
    body = b"".join(response[0]).decode()
    assert response[1].startswith("200")
    assert body == "x=1&y=2|x=1,y=2"


# -- hostile input -------------------------------------------------------------------------------------------------

_LATIN1 = st.binary(max_size=64).map(lambda b: b.decode("latin-1"))
_AUTHORIZATION = st.one_of(
    st.text(),
    _LATIN1,
    st.builds(lambda scheme, sep, rest: scheme + sep + rest,
              st.sampled_from(["Bearer", "bearer", "bEaReR", "DPoP", "Basic", ""]),
              st.sampled_from([" ", "  ", "\t", ""]),
              st.one_of(st.text(), _LATIN1, st.text(alphabet="ab=-._~+/ \"'"))),
)
_QUERY = st.one_of(
    st.text(),
    _LATIN1,
    st.builds(lambda a, b: a + "access_token=" + b, st.text(max_size=8), st.one_of(st.text(), _LATIN1)),
    st.lists(st.sampled_from(["access_token=", "access_token=ab", "&", "=", "%", "%FF", "%C3%A9", "a", ";"]))
    .map("".join),
)
_READER = reader(**ALL_PLACES)


# What a server puts in the environ for UTF-8 bytes. Arbitrary bytes in the cookie are a known bug (below).
_UTF8_AS_LATIN1 = st.text().map(lambda t: t.encode("utf-8", "surrogatepass").decode("latin-1"))


@settings(max_examples=300, deadline=None)
@given(authorization=_AUTHORIZATION, query=_QUERY, cookie=st.one_of(st.none(), _UTF8_AS_LATIN1))
def test_hostile_requests_give_credential_none_or_invalid_request(
    authorization: str, query: str, cookie: str | None
) -> None:
    environ: dict[str, Any] = {"HTTP_AUTHORIZATION": authorization, "QUERY_STRING": query, "REQUEST_METHOD": "GET"}
    if cookie is not None:
        environ["HTTP_COOKIE"] = "at=" + cookie
    try:
        result = _READER.read(environ)
    except InvalidRequest as exc:
        assert exc.status == 400
        return
    assert result is None or isinstance(result, Credential)
    if result is not None:
        assert result.token and result.token.isascii() and " " not in result.token
        assert result.source in ("header", "query", "cookie")


@pytest.mark.parametrize(
    "cookie",
    [
        pytest.param("at=\x80", id="token-not-utf8"),
        pytest.param("theme=caf\xe9; at=abc", id="another-cookie-not-utf8"),
    ],
)
def test_non_utf8_cookie_is_a_bad_request(cookie: str, make_client: MakeClient) -> None:
    app = CountingApp()
    response = make_client(app, **ALL_PLACES).get("/", headers={"Cookie": cookie})
    assert app.calls == []
    # RFC 6750 section 3.1: a malformed request is 400 invalid_request, whichever cookie is not UTF-8.
    assert response.status_code == 400, response.json
    assert response.json == {"error": "invalid_request", "error_description": "the Cookie header cannot be parsed"}
