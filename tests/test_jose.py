"""certbound_wsgi.jose: the decoding, key import and claim checks every validator shares."""

from __future__ import annotations

import base64
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc.jwk import ECKey, OctKey, RSAKey

from certbound_wsgi.jose import (
    MAX_DEPTH,
    JSONError,
    JWKError,
    TimeClaimError,
    b64url_decode,
    b64url_encode,
    check_time_claims,
    copy_claims,
    equal_ascii,
    json_object,
    meant_for,
    public_key,
    segment_object,
)

NOW = 1_000_000.0


@pytest.mark.parametrize("text", [
    pytest.param("eyJ9=", id="padding"),
    pytest.param("ab+c", id="plus"),
    pytest.param("ab/c", id="slash"),
    pytest.param("ab c", id="space"),
    pytest.param("ab\nc", id="newline"),
    pytest.param("abcde", id="impossible-length"),
    pytest.param("ab\u00e9c", id="non-ascii"),
])
def test_b64url_decode_is_strict(text: str) -> None:
    with pytest.raises(ValueError, match="not base64url"):
        b64url_decode(text)


@given(st.binary(max_size=200))
def test_b64url_round_trip(data: bytes) -> None:
    assert b64url_decode(b64url_encode(data)) == data


@given(st.text(max_size=40))
def test_b64url_decode_raises_only_value_error(text: str) -> None:
    try:
        b64url_decode(text)
    except ValueError:
        pass


@pytest.mark.parametrize(("data", "problem"), [
    pytest.param(b"not json", "syntax", id="not-json"),
    pytest.param(b'{"exp": NaN}', "syntax", id="nan"),
    pytest.param(b'{"exp": Infinity}', "syntax", id="infinity"),
    pytest.param(b'{"exp": -Infinity}', "syntax", id="minus-infinity"),
    pytest.param(b"\xff\xfe", "syntax", id="not-utf8"),
    pytest.param(b"[" * 5000 + b"]" * 5000, "syntax", id="deeper-than-the-parser"),
    pytest.param(b"[1]", "type", id="array"),
    pytest.param(b'"s"', "type", id="string"),
    pytest.param(b"null", "type", id="null"),
    pytest.param(b'{"a": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}", "depth", id="one-too-deep"),
])
def test_json_object_refuses(data: bytes, problem: str) -> None:
    with pytest.raises(JSONError) as info:
        json_object(data)
    assert info.value.problem == problem


def test_json_object_accepts_the_deepest_allowed() -> None:
    deepest = b'{"a": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    assert json_object(deepest)["a"] is not None


@pytest.mark.parametrize(("error", "sentence"), [
    pytest.param(JSONError("syntax"), "the token's claims are not JSON", id="syntax"),
    pytest.param(JSONError("type"), "the token's claims are not a JSON object", id="type"),
    pytest.param(JSONError("depth"), "the token's claims are nested too deeply", id="depth"),
])
def test_json_error_wording(error: JSONError, sentence: str) -> None:
    assert error.describe("the token's claims", "are") == sentence


def test_segment_object() -> None:
    assert segment_object(b64url_encode(b'{"alg": "ES256"}')) == {"alg": "ES256"}
    with pytest.raises(JSONError) as info:
        segment_object(base64.urlsafe_b64encode(b'{"alg": "ES256"}').decode())  # padded: "=" is refused
    assert info.value.problem == "syntax"


def _jwk(kind: str) -> dict[str, Any]:
    if kind == "ec":
        return ECKey.generate_key("P-256", private=False).as_dict(private=False)
    if kind == "rsa":
        return RSAKey.generate_key(2048, private=True).as_dict(private=False)
    if kind == "ec-private":
        return ECKey.generate_key("P-256", private=True).as_dict(private=True)
    return OctKey.generate_key(256).as_dict()


@pytest.mark.parametrize(("kind", "problem"), [
    pytest.param("ec", None, id="ec-public"),
    pytest.param("rsa", None, id="rsa-public"),
    pytest.param("ec-private", "private", id="ec-private"),
    pytest.param("oct", "private", id="oct-has-k"),
])
def test_public_key(kind: str, problem: str | None) -> None:
    jwk = _jwk(kind)
    if problem is None:
        assert public_key(jwk).thumbprint()
        return
    with pytest.raises(JWKError) as info:
        public_key(jwk)
    assert info.value.problem == problem


@pytest.mark.parametrize(("jwk", "problem"), [
    pytest.param({"kty": "oct"}, "kty", id="oct-without-k"),
    pytest.param({"kty": "none"}, "kty", id="unknown-kty"),
    pytest.param({}, "kty", id="no-kty"),
    pytest.param({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}, "invalid", id="not-on-curve"),
    pytest.param({"kty": "RSA", "n": 5, "e": "AQAB"}, "invalid", id="n-not-a-string"),
])
def test_public_key_refuses(jwk: dict[str, Any], problem: str) -> None:
    with pytest.raises(JWKError) as info:
        public_key(jwk)
    assert info.value.problem == problem


TIME_CASES = [
    pytest.param({"exp": NOW + 1}, {}, None, id="valid"),
    pytest.param({}, {}, ("exp", "missing"), id="exp-missing"),
    pytest.param({}, {"required": ()}, None, id="exp-optional"),
    pytest.param({"exp": NOW}, {}, ("exp", "time"), id="exp-now-is-expired"),
    pytest.param({"exp": NOW - 5}, {"leeway": 10}, None, id="exp-within-leeway"),
    pytest.param({"exp": NOW - 10}, {"leeway": 10}, ("exp", "time"), id="exp-at-leeway"),
    pytest.param({"exp": "9999999999"}, {}, ("exp", "number"), id="exp-string"),
    pytest.param({"exp": True}, {}, ("exp", "number"), id="exp-bool"),
    pytest.param({"exp": math.inf}, {}, ("exp", "number"), id="exp-inf"),
    pytest.param({"exp": NOW + 1, "nbf": NOW + 1}, {}, ("nbf", "time"), id="nbf-future"),
    pytest.param({"exp": NOW + 1, "nbf": NOW + 5}, {"leeway": 10}, None, id="nbf-within-leeway"),
    pytest.param({"exp": NOW + 1, "nbf": NOW}, {}, None, id="nbf-now"),
    pytest.param({"exp": NOW + 1, "iat": NOW + 1}, {}, ("iat", "time"), id="iat-future"),
    pytest.param({"exp": NOW + 1, "iat": NOW - 1000}, {}, None, id="iat-past"),
    pytest.param({"exp": NOW + 1}, {"required": ("exp", "iat")}, ("iat", "missing"), id="iat-required"),
    pytest.param({"exp": NOW + 1, "iat": "x"}, {"checked": ("exp", "nbf")}, None, id="iat-not-checked"),
    pytest.param({"exp": NOW + 1, "nbf": []}, {"checked": ("exp", "nbf")}, ("nbf", "number"), id="nbf-list"),
]


@pytest.mark.parametrize(("claims", "options", "expected"), TIME_CASES)
def test_check_time_claims(claims: dict[str, Any], options: dict[str, Any], expected: tuple[str, str] | None) -> None:
    leeway = options.pop("leeway", 0)
    if expected is None:
        check_time_claims(claims, NOW, leeway, **options)
        return
    with pytest.raises(TimeClaimError) as info:
        check_time_claims(claims, NOW, leeway, **options)
    assert (info.value.claim, info.value.problem) == expected


@pytest.mark.parametrize(("error", "sentence"), [
    pytest.param(TimeClaimError("exp", "missing"), "the token has no exp claim", id="missing"),
    pytest.param(TimeClaimError("nbf", "number"), "the nbf claim is not a number", id="number"),
    pytest.param(TimeClaimError("exp", "time"), "the token has expired", id="expired"),
    pytest.param(TimeClaimError("nbf", "time"), "the token is not valid yet", id="early"),
    pytest.param(TimeClaimError("iat", "time"), "the token was issued in the future", id="future"),
])
def test_time_error_wording(error: TimeClaimError, sentence: str) -> None:
    assert error.describe("the token") == sentence


@pytest.mark.parametrize(("aud", "expected"), [
    pytest.param("api", True, id="string"),
    pytest.param(["x", "api"], True, id="list"),
    pytest.param(["x"], False, id="other"),
    pytest.param(None, False, id="none"),
    pytest.param([1, {"api": 1}], False, id="not-strings"),
])
def test_meant_for(aud: object, expected: bool) -> None:
    assert meant_for({"aud": aud}, frozenset({"api"})) is expected


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)


def _containers(value: Any) -> list[Any]:
    """Every dict and list inside ``value``, itself included."""
    if isinstance(value, dict):
        return [value, *(c for member in value.values() for c in _containers(member))]
    if isinstance(value, list):
        return [value, *(c for member in value for c in _containers(member))]
    return []


@given(st.dictionaries(st.text(max_size=6), _JSON, max_size=8))
def test_copy_claims_is_equal_and_shares_no_container(claims: dict[str, Any]) -> None:
    """The app gets a copy it may change at will: no dict or list of it is the memo's."""
    copied = copy_claims(claims)
    assert copied == claims
    originals = {id(c) for c in _containers(claims)}
    assert not originals & {id(c) for c in _containers(copied)}


@given(st.one_of(st.text(), st.binary(), st.integers(), st.none(), st.lists(st.text())), st.text())
def test_equal_ascii_never_raises_and_is_equality_of_ascii_strings(claimed: Any, expected: str) -> None:
    want = isinstance(claimed, str) and claimed.isascii() and expected.isascii() and claimed == expected
    assert equal_ascii(claimed, expected) is want
    if expected.isascii():
        assert equal_ascii(expected, expected) is True


# Now and a second on either side, with no leeway or one second of it: where a shortcut that is off by
# a little would decide otherwise; and the values the shortcut must leave to the full check.
_MISSING = object()
_TIME_VALUES = st.sampled_from([_MISSING, *(int(NOW) + d for d in range(-2, 3)), NOW + 0.5, True, "1", 10**400,
                                2**53, None])


def _outcome(claims: dict[str, Any], leeway: float, required: tuple[str, ...] | None) -> tuple[str, str] | None:
    try:
        if required is None:
            check_time_claims(claims, NOW, leeway)  # the default: the shortcut may decide
        else:
            check_time_claims(claims, NOW, leeway, required=required)  # another tuple: the loop decides
    except TimeClaimError as error:
        return error.claim, error.problem
    return None


@settings(max_examples=500)
@given(st.tuples(_TIME_VALUES, _TIME_VALUES, _TIME_VALUES), st.sampled_from([0.0, 1.0]))
def test_the_usual_case_shortcut_decides_as_the_full_check(values: tuple[Any, Any, Any], leeway: float) -> None:
    """The default call decides the common case at once; an equal tuple of its own takes the full loop."""
    claims = {name: value for name, value in zip(("exp", "nbf", "iat"), values, strict=True) if value is not _MISSING}
    assert _outcome(claims, leeway, None) == _outcome(claims, leeway, tuple(["exp"]))
