"""certbound_wsgi.proof_keys: a proof's key is refused by its JSON members alone, whatever they hold."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from certbound_wsgi.proof_keys import KeyRefused, thumbprint_input

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@pytest.mark.parametrize(
    ("jwk", "problem"),
    [
        pytest.param({"kty": ["EC"]}, "kty", id="kty-list"),
        pytest.param({"kty": {"EC": 1}}, "kty", id="kty-object"),
        pytest.param({"kty": None}, "kty", id="kty-null"),
        pytest.param({}, "kty", id="no-kty"),
        pytest.param({"kty": "EC", "crv": ["P-256"]}, "invalid", id="crv-list"),
        pytest.param({"kty": "OKP", "crv": {"a": 1}, "x": "A" * 43}, "invalid", id="okp-crv-object"),
    ],
)
def test_non_string_members_are_refused_not_raised(jwk: dict[str, Any], problem: str) -> None:
    with pytest.raises(KeyRefused) as refused:
        thumbprint_input(jwk, "ES256")
    assert refused.value.problem == problem


@given(kty=_JSON, crv=_JSON, x=_JSON, y=_JSON, e=_JSON, n=_JSON, alg=st.sampled_from(["ES256", "RS256", "EdDSA"]))
def test_any_json_members_give_a_thumbprint_input_or_a_refusal(
    kty: object, crv: object, x: object, y: object, e: object, n: object, alg: str
) -> None:
    jwk = {"kty": kty, "crv": crv, "x": x, "y": y, "e": e, "n": n}
    try:
        result = thumbprint_input(jwk, alg)
    except KeyRefused as refused:
        assert refused.problem in {"kty", "invalid", "mismatch", "curve", "rsa"}
    else:
        assert result.startswith("{") and result.endswith("}")
