"""certbound_wsgi.http: the request path, and the one JSON client for the issuer, against a real loopback server."""

from __future__ import annotations

import gzip
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from certbound_wsgi.http import JSONClient, TooLarge, Unreachable, request_path
from tests.support.raw_http import RawServer

LIMIT = 8 * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[RawServer]:
    raw = RawServer(path="/doc")
    try:
        yield raw
    finally:
        raw.close()


def client(max_body: int = LIMIT) -> JSONClient:
    return JSONClient(verify=True, timeout=2.0, max_body=max_body)


@pytest.mark.parametrize(("environ", "expected"), [
    pytest.param({"SCRIPT_NAME": "/app", "PATH_INFO": "/orders"}, "/app/orders", id="mounted"),
    pytest.param({"PATH_INFO": "/orders"}, "/orders", id="no-script-name"),
    pytest.param({"SCRIPT_NAME": "/app"}, "/app", id="no-path-info"),
    pytest.param({}, "", id="neither"),
    pytest.param({"PATH_INFO": "/caf\xc3\xa9"}, "/caf\xc3\xa9", id="latin1-decoded-bytes-kept"),
])
def test_request_path(environ: dict[str, Any], expected: str) -> None:
    assert request_path(environ) == expected


@pytest.mark.parametrize(("body", "status", "document", "problem"), [
    pytest.param(b'{"a": 1}', 200, {"a": 1}, "", id="object"),
    pytest.param(b'{"error": "invalid_grant"}', 400, {"error": "invalid_grant"}, "", id="error-object-kept"),
    pytest.param(b"[1]", 200, None, "not a JSON object", id="list"),
    pytest.param(b"not json", 200, None, "not JSON", id="not-json"),
    pytest.param(b'{"exp": NaN}', 200, None, "not JSON", id="nan"),
    pytest.param(b'{"exp": -Infinity}', 200, None, "not JSON", id="infinity"),
    pytest.param(b"", 502, None, "not JSON", id="empty"),
    pytest.param(b'{"a":' * 40 + b"1" + b"}" * 40, 200, None, "nested too deeply", id="deep"),
    pytest.param(b"[" * 2000 + b"]" * 2000, 200, None, "not JSON", id="deeper-than-json-loads"),
    pytest.param(b'{"a": ' + b"[" * 400 + b"]" * 400 + b"}", 200, None, "nested too deeply", id="deep-member"),
])
def test_answers(server: RawServer, body: bytes, status: int, document: dict[str, Any] | None, problem: str) -> None:
    server.body, server.status, server.gzip = body, status, False
    for answer in (client().get(server.url), client().post(server.url, {"token": "t"})):
        assert answer.status == status
        assert answer.document == document
        assert answer.problem == problem


@pytest.mark.parametrize(("size", "compressed"), [
    pytest.param(LIMIT + 1, False, id="one-byte-over"),
    pytest.param(64 * 1024 * 1024, True, id="gzip-bomb"),
])
def test_the_cap_counts_decoded_bytes(server: RawServer, size: int, compressed: bool) -> None:
    payload = b'{"pad": "' + b" " * size + b'"}'
    server.body, server.status, server.gzip = (gzip.compress(payload) if compressed else payload), 200, compressed
    try:
        with pytest.raises(TooLarge):
            client().get(server.url)
        # The same body under a cap that fits it is read whole.
        if not compressed:
            assert client(len(payload)).get(server.url).document == {"pad": " " * size}
    finally:
        server.gzip = False


def test_a_closed_port_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(Unreachable, match="ConnectionError"):
        client().get(f"http://127.0.0.1:{port}/doc")


def test_an_unparseable_url_is_unreachable() -> None:
    with pytest.raises(Unreachable):
        client().get("http://[::1/doc")
