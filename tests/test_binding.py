"""certbound_wsgi.binding: certificate-bound access tokens (RFC 8705 section 3) in each mode."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest

from certbound_wsgi.binding import (
    CERT_MISSING,
    CLAIM_MISSING,
    THUMBPRINT_MISMATCH,
    check_dpop_mode,
    check_mtls,
    cnf_jkt,
    cnf_x5t,
)
from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.errors import DPoPError, InvalidToken
from tests.conftest import CountingApp, MakeClient, bearer, cert_env, middleware_of
from tests.support.refusals import assert_refused
from tests.support.tokens import AUDIENCE, ISSUER, TestIssuer, sign_es256

OK = (200, None)

# (mode, token bound to alice?, certificate presented) -> (status, Kong's error_description)
CASES: list[Any] = []
_EXPECTED: dict[str, dict[tuple[str, str | None], tuple[int, str | None]]] = {
    "strict": {
        ("bound", "alice"): OK,
        ("bound", "mallory"): (401, THUMBPRINT_MISMATCH),
        ("bound", None): (401, CERT_MISSING),
        ("unbound", "alice"): (401, CLAIM_MISSING),
        ("unbound", None): (401, CLAIM_MISSING),
    },
    "optional": {
        ("bound", "alice"): OK,
        ("bound", "mallory"): (401, THUMBPRINT_MISMATCH),
        ("bound", None): (401, CERT_MISSING),
        ("unbound", "alice"): OK,
        ("unbound", None): OK,
    },
    "off": {
        ("bound", "alice"): OK,
        ("bound", "mallory"): OK,
        ("bound", None): OK,
        ("unbound", "alice"): OK,
        ("unbound", None): OK,
    },
}
for _mode, _rows in _EXPECTED.items():
    for (_token, _cert), _expected in _rows.items():
        CASES.append(pytest.param(_mode, _token, _cert, *_expected, id=f"{_mode}-{_token}-token-{_cert or 'no'}-cert"))


@pytest.mark.parametrize(("mode", "token_kind", "cert", "status", "message"), CASES)
def test_modes(
    mode: str,
    token_kind: str,
    cert: str | None,
    status: int,
    message: str | None,
    issuer: TestIssuer,
    alice: Issued,
    mallory: Issued,
    alice_x5t: str,
    make_client: MakeClient,
) -> None:
    app = CountingApp()
    token = issuer.token(cnf={"x5t#S256": alice_x5t}) if token_kind == "bound" else issuer.token()
    pem = {"alice": alice.cert_pem, "mallory": mallory.cert_pem, None: None}[cert]
    response = make_client(app, proof_of_possession_mtls=mode).get("/", headers=bearer(token),
                                                                   environ_overrides=cert_env(pem))
    assert response.status_code == status
    if message is None:
        assert len(app.calls) == 1
        assert response.json is not None
        assert response.json["thumbprint"] == (None if cert is None else app.calls[0]["certbound.thumbprint"])
    else:
        assert app.calls == []
        assert_refused(response, 401, "invalid_token", message)


@pytest.mark.parametrize(
    ("cnf", "strict", "optional"),
    [
        pytest.param({"x5t#S256": 12345}, (401, THUMBPRINT_MISMATCH), (401, THUMBPRINT_MISMATCH), id="number"),
        pytest.param({"x5t#S256": ["ALICE"]}, (401, THUMBPRINT_MISMATCH), (401, THUMBPRINT_MISMATCH), id="list"),
        pytest.param({"x5t#S256": {"v": "ALICE"}}, (401, THUMBPRINT_MISMATCH), (401, THUMBPRINT_MISMATCH),
                     id="object"),
        pytest.param({"x5t#S256": True}, (401, THUMBPRINT_MISMATCH), (401, THUMBPRINT_MISMATCH), id="bool"),
        pytest.param({"x5t#S256": "ALICEé"}, (401, THUMBPRINT_MISMATCH), (401, THUMBPRINT_MISMATCH),
                     id="non-ascii-string"),
        pytest.param({"x5t#S256": ""}, (401, THUMBPRINT_MISMATCH), (401, THUMBPRINT_MISMATCH), id="empty-string"),
        pytest.param({"x5t#S256": "ALICE="}, (401, THUMBPRINT_MISMATCH), (401, THUMBPRINT_MISMATCH), id="padded"),
        pytest.param({"x5t#S256": "ALICE_UPPER"}, (401, THUMBPRINT_MISMATCH), (401, THUMBPRINT_MISMATCH),
                     id="case-differs"),
        pytest.param({"x5t#S256": "ALICE_STD_B64"}, (401, THUMBPRINT_MISMATCH), (401, THUMBPRINT_MISMATCH),
                     id="standard-base64-alphabet"),
        pytest.param({"x5t#S256": "ALICE"}, OK, OK, id="alice"),
        pytest.param({"x5t#S256": "ALICE", "x5t": "sha1"}, OK, OK, id="alice-with-other-member"),
        pytest.param({"x5t#S256": None}, (401, CLAIM_MISSING), OK, id="null-is-unbound"),
        pytest.param({"x5t": "ALICE"}, (401, CLAIM_MISSING), OK, id="sha1-member-is-not-ours"),
        pytest.param({}, (401, CLAIM_MISSING), OK, id="empty-cnf"),
        pytest.param("ALICE", (401, CLAIM_MISSING), OK, id="cnf-string"),
        pytest.param(["ALICE"], (401, CLAIM_MISSING), OK, id="cnf-list"),
    ],
)
@pytest.mark.parametrize("mode", [pytest.param("strict", id="strict"), pytest.param("optional", id="optional")])
def test_malformed_confirmations(
    cnf: Any,
    strict: tuple[int, str | None],
    optional: tuple[int, str | None],
    mode: str,
    issuer: TestIssuer,
    alice: Issued,
    alice_x5t: str,
    make_client: MakeClient,
) -> None:
    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, str) and value.startswith("ALICE"):
            variants = {
                "ALICE_UPPER": alice_x5t.upper() if alice_x5t.upper() != alice_x5t else alice_x5t.lower(),
                "ALICE_STD_B64": alice_x5t.replace("-", "+").replace("_", "/") + "=",
            }
            return variants.get(value) or alice_x5t + value[len("ALICE"):]
        return value

    status, message = strict if mode == "strict" else optional
    token = issuer.token(cnf=fill(cnf))
    response = make_client(proof_of_possession_mtls=mode).get(
        "/", headers=bearer(token), environ_overrides=cert_env(alice.cert_pem)
    )
    assert response.status_code == status
    if message:
        assert response.json == {"error": "invalid_token", "error_description": message}


@pytest.mark.parametrize("mode", [pytest.param("strict", id="strict"), pytest.param("optional", id="optional")])
def test_lone_surrogate_confirmation_is_401(
    mode: str, issuer: TestIssuer, alice: Issued, make_client: MakeClient
) -> None:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "cnf": {"x5t#S256": "\ud800"}}
    token = sign_es256(issuer.key, {"alg": "ES256", "kid": issuer.kid}, claims)
    assert "\\ud800" in base64.urlsafe_b64decode(token.split(".")[1] + "==").decode()
    response = make_client(proof_of_possession_mtls=mode).get(
        "/", headers=bearer(token), environ_overrides=cert_env(alice.cert_pem)
    )
    assert response.status_code == 401


def test_binding_is_checked_on_every_request(
    issuer: TestIssuer, alice: Issued, mallory: Issued, alice_x5t: str, make_client: MakeClient
) -> None:
    """The memo skips the signature, never the binding: a stolen token fails with every other certificate."""
    client = make_client(proof_of_possession_mtls="optional")
    token = issuer.token(cnf={"x5t#S256": alice_x5t})
    sequence = [(alice, 200), (mallory, 401), (None, 401), (alice, 200), (mallory, 401)]
    for holder, status in sequence:
        pem = holder.cert_pem if holder else None
        assert client.get("/", headers=bearer(token), environ_overrides=cert_env(pem)).status_code == status
    jwt = middleware_of(client).jwt
    assert jwt is not None and jwt.memo_size() == 1


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        pytest.param({"cnf": {"x5t#S256": "abc"}}, "abc", id="present"),
        pytest.param({"cnf": {"x5t#S256": 5}}, 5, id="non-string-returned-as-is"),
        pytest.param({"cnf": {}}, None, id="empty-cnf"),
        pytest.param({"cnf": "abc"}, None, id="cnf-not-object"),
        pytest.param({}, None, id="no-cnf"),
    ],
)
def test_cnf_x5t(claims: dict[str, Any], expected: object) -> None:
    assert cnf_x5t(claims) == expected


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        pytest.param({"cnf": {"jkt": "k1"}}, "k1", id="present"),
        pytest.param({"cnf": {"jkt": "k1", "x5t#S256": "abc"}}, "k1", id="beside-x5t"),
        pytest.param({"cnf": {"x5t#S256": "abc"}}, None, id="only-x5t"),
        pytest.param({"cnf": ["jkt"]}, None, id="cnf-not-object"),
        pytest.param({}, None, id="no-cnf"),
    ],
)
def test_cnf_jkt(claims: dict[str, Any], expected: object) -> None:
    assert cnf_jkt(claims) == expected


@pytest.mark.parametrize(
    ("mode", "claims", "thumbprint", "error"),
    [
        pytest.param("strict", {"cnf": {"x5t#S256": "abc"}}, "abc", None, id="strict-match"),
        pytest.param("strict", {"cnf": {"x5t#S256": "abc"}}, "abd", THUMBPRINT_MISMATCH, id="strict-mismatch"),
        pytest.param("strict", {"cnf": {"x5t#S256": "abc"}}, "ab", THUMBPRINT_MISMATCH, id="strict-prefix"),
        pytest.param("strict", {"cnf": {"x5t#S256": "abc"}}, None, CERT_MISSING, id="strict-no-cert"),
        pytest.param("strict", {}, "abc", CLAIM_MISSING, id="strict-unbound"),
        pytest.param("optional", {}, None, None, id="optional-unbound"),
        pytest.param("optional", {"cnf": {"x5t#S256": b"abc"}}, "abc", THUMBPRINT_MISMATCH, id="optional-bytes"),
        pytest.param("off", {"cnf": {"x5t#S256": "abc"}}, "xyz", None, id="off"),
    ],
)
def test_check_mtls(mode: str, claims: dict[str, Any], thumbprint: str | None, error: str | None) -> None:
    if error is None:
        check_mtls(mode, cnf_x5t(claims), thumbprint)  # raises on refusal
    else:
        with pytest.raises(InvalidToken) as info:
            check_mtls(mode, cnf_x5t(claims), thumbprint)
        assert info.value.description == error


@pytest.mark.parametrize(
    ("mode", "jkt", "dpop_scheme", "what", "outcome"),
    [
        pytest.param("optional", "k1", True, "token", True, id="dpop-bound-with-dpop-scheme"),
        pytest.param("strict", "k1", True, "token", True, id="strict-dpop-bound-with-dpop-scheme"),
        pytest.param("optional", None, False, "token", False, id="optional-unbound-bearer"),
        pytest.param("off", None, False, "token", False, id="off-unbound-bearer"),
        pytest.param("optional", None, True, "token", "the token is not DPoP-bound", id="dpop-scheme-unbound"),
        pytest.param("optional", "k1", False, "token", "a DPoP-bound token must be sent with the DPoP scheme",
                     id="bound-as-bearer"),
        pytest.param("off", "k1", False, "token", "a DPoP-bound token must be sent with the DPoP scheme",
                     id="bound-as-bearer-dpop-off"),
        pytest.param("strict", None, False, "token", "a DPoP-bound token and proof are required",
                     id="strict-unbound-bearer"),
        pytest.param("strict", None, False, "session", "a DPoP-bound session and proof are required",
                     id="strict-unbound-session"),
        pytest.param("off", "k1", True, "session", "the session is DPoP-bound but DPoP is off",
                     id="bound-session-dpop-off"),
    ],
)
def test_check_dpop_mode(mode: str, jkt: str | None, dpop_scheme: bool, what: str, outcome: bool | str) -> None:
    """RFC 9449 section 7: one table of rules for tokens and sessions alike."""
    if isinstance(outcome, bool):
        assert check_dpop_mode(mode, jkt, dpop_scheme=dpop_scheme, what=what) is outcome
        return
    with pytest.raises(InvalidToken if "proof are required" not in outcome else DPoPError) as info:
        check_dpop_mode(mode, jkt, dpop_scheme=dpop_scheme, what=what)
    assert info.value.description == outcome
