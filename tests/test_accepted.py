"""certbound_wsgi.accepted: a remembered acceptance answers only the same header with the same certificate,
only while the token and the keys that verified it stand; a refusal is never remembered."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import Client

from certbound_wsgi.accepted import AcceptedMemo
from certbound_wsgi.channel import UWSGI_SECRET_VAR
from certbound_wsgi.dev.echo import echo_app
from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.middleware import CertBoundMiddleware
from tests.conftest import TEST_PROXY_SECRET, ViaProxy, bearer, cert_env, make_settings
from tests.support.dpop import DPoPKey
from tests.support.refusals import Clock
from tests.support.session_options import SESSION
from tests.support.tokens import StaticDiscovery, TestIssuer


class Keys:
    """The keys' generation, as a test sets it."""

    def __init__(self) -> None:
        self.generation = 0
        self.asked = 0

    def refresh_if_due(self) -> int:
        self.asked += 1
        return self.generation


def test_recall_answers_the_same_header_and_thumbprint_only() -> None:
    clock, keys = Clock(1000.0), Keys()
    memo: AcceptedMemo[str] = AcceptedMemo(10, clock)
    memo.remember("Bearer t", "x5t-a", "alice", expires=1100.0, keys=keys, generation=0)
    assert memo.recall("Bearer t", "x5t-a") == "alice"
    assert keys.asked == 1  # a due key refresh is started from a recall too
    assert memo.recall("Bearer t", "x5t-b") is None
    assert memo.recall("Bearer t", None) is None
    assert memo.recall("Bearer  t", "x5t-a") is None
    assert memo.recall(None, "x5t-a") is None
    assert memo.recall("", "x5t-a") is None


def test_an_acceptance_ends_with_its_expiry() -> None:
    clock, keys = Clock(1000.0), Keys()
    memo: AcceptedMemo[str] = AcceptedMemo(10, clock)
    memo.remember("Bearer t", None, "alice", expires=1100.0, keys=keys, generation=0)
    clock.now = 1099.999
    assert memo.recall("Bearer t", None) == "alice"
    clock.now = 1100.0
    assert memo.recall("Bearer t", None) is None
    assert len(memo) == 0  # forgotten, not kept to be asked about again


def test_an_acceptance_ends_with_the_generation_of_its_keys() -> None:
    clock, keys = Clock(1000.0), Keys()
    memo: AcceptedMemo[str] = AcceptedMemo(10, clock)
    memo.remember("Bearer t", None, "alice", expires=2000.0, keys=keys, generation=0)
    keys.generation = 1  # a key withdrawn, or the keys too stale
    assert memo.recall("Bearer t", None) is None
    keys.generation = 0
    assert memo.recall("Bearer t", None) is None  # gone for good, until accepted again
    assert len(memo) == 0


def test_the_memo_is_bounded_oldest_first() -> None:
    clock, keys = Clock(1000.0), Keys()
    memo: AcceptedMemo[int] = AcceptedMemo(100, clock)
    for i in range(1000):
        memo.remember(f"Bearer {i}", None, i, expires=2000.0, keys=keys, generation=0)
        assert len(memo) <= 100
    assert memo.recall("Bearer 999", None) == 999
    assert memo.recall("Bearer 0", None) is None


# -- through the middleware -----------------------------------------------------------------------


def _client(issuer: TestIssuer, clock: Clock | None = None, **overrides: Any) -> tuple[Client, CertBoundMiddleware]:
    settings = make_settings(**overrides)
    kwargs: dict[str, Any] = {"clock": clock} if clock is not None else {}
    middleware = CertBoundMiddleware(echo_app, settings, discovery=StaticDiscovery(settings, issuer, **kwargs),
                                     **kwargs)
    return Client(ViaProxy(middleware), use_cookies=False), middleware  # type: ignore[arg-type]


def test_a_stolen_token_is_refused_on_every_request_after_its_owner_was_accepted(
        issuer: TestIssuer, alice: Issued, mallory: Issued, alice_token: str) -> None:
    client, middleware = _client(issuer)
    assert middleware.authenticator.accepted is not None
    assert client.get("/", headers=bearer(alice_token), environ_overrides=cert_env(alice.cert_pem)).status_code == 200
    assert client.get("/", headers=bearer(alice_token), environ_overrides=cert_env(alice.cert_pem)).status_code == 200
    assert len(middleware.authenticator.accepted) == 1
    for _ in range(3):
        stolen = client.get("/", headers=bearer(alice_token), environ_overrides=cert_env(mallory.cert_pem))
        assert stolen.status_code == 401
        assert 'error="invalid_token"' in stolen.headers["WWW-Authenticate"]
        assert client.get("/", headers=bearer(alice_token)).status_code == 401  # no certificate at all
    # alice's certificate, but not through the proxy's channel: not believed, so not alice's acceptance.
    forged = client.get("/", headers=bearer(alice_token),
                        environ_overrides={**cert_env(alice.cert_pem), UWSGI_SECRET_VAR: "wrong" + TEST_PROXY_SECRET})
    assert forged.status_code == 401
    assert len(middleware.authenticator.accepted) == 1  # refusals are never remembered


def test_only_a_token_on_its_second_use_is_remembered(issuer: TestIssuer, alice: Issued, alice_x5t: str) -> None:
    """A token used once costs the memo nothing; from its second acceptance on, it is one look-up."""
    client, middleware = _client(issuer)
    accepted = middleware.authenticator.accepted
    assert accepted is not None
    once = [issuer.token(cnf={"x5t#S256": alice_x5t}) for _ in range(5)]
    for token in once:
        assert client.get("/", headers=bearer(token), environ_overrides=cert_env(alice.cert_pem)).status_code == 200
    assert len(accepted) == 0
    assert client.get("/", headers=bearer(once[0]), environ_overrides=cert_env(alice.cert_pem)).status_code == 200
    assert len(accepted) == 1


def test_a_remembered_acceptance_still_expires_with_the_token(issuer: TestIssuer, alice: Issued,
                                                              alice_x5t: str) -> None:
    clock = Clock()
    client, _ = _client(issuer, clock)
    token = issuer.token(exp=int(clock.now) + 60, cnf={"x5t#S256": alice_x5t})
    for _ in range(2):
        assert client.get("/", headers=bearer(token), environ_overrides=cert_env(alice.cert_pem)).status_code == 200
    clock.advance(61)
    expired = client.get("/", headers=bearer(token), environ_overrides=cert_env(alice.cert_pem))
    assert expired.status_code == 401
    assert "expired" in expired.json["error_description"]


def test_a_remembered_acceptance_ends_when_its_key_is_withdrawn(issuer: TestIssuer, alice: Issued,
                                                                alice_token: str) -> None:
    clock = Clock()
    client, _ = _client(issuer, clock, rediscovery_lifetime=30)
    for _ in range(2):
        assert client.get("/", headers=bearer(alice_token),
                          environ_overrides=cert_env(alice.cert_pem)).status_code == 200
    issuer.rotate("k2")  # k1, which signed alice's token, is withdrawn at the issuer
    clock.advance(31)
    withdrawn = client.get("/", headers=bearer(alice_token), environ_overrides=cert_env(alice.cert_pem))
    assert withdrawn.status_code == 401
    assert "unknown key" in withdrawn.json["error_description"]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"bearer_token_param_type": ["header", "query"]}, id="query-too"),
        pytest.param({"bearer_token_param_type": ["header", "cookie"], "bearer_token_cookie_name": "at"}, id="cookie"),
        pytest.param({"auth_methods": ("bearer", "introspection"), "client_id": "rs",
                      "client_secret": "client-secret-0123456789abcdef"}, id="introspection"),
        pytest.param(SESSION, id="sessions"),
    ],
)
def test_no_memo_where_a_decision_depends_on_more_than_the_header(overrides: dict[str, Any],
                                                                  issuer: TestIssuer) -> None:
    _, middleware = _client(issuer, **overrides)
    assert middleware.authenticator.accepted is None


def test_a_dpop_request_is_never_remembered(issuer: TestIssuer) -> None:
    client, middleware = _client(issuer, proof_of_possession_dpop="optional", proof_of_possession_mtls="optional",
                                 public_base_url="http://localhost")
    key = DPoPKey("EC")
    token = issuer.token(cnf={"jkt": key.jkt})
    for _ in range(2):
        proof = key.proof("GET", "http://localhost/", token=token)
        response = client.get("/", headers={"Authorization": f"DPoP {token}", "DPoP": proof})
        assert response.status_code == 200
    assert middleware.authenticator.accepted is not None
    assert len(middleware.authenticator.accepted) == 0
    # The same DPoP-bound token as a bearer token: refused, though it was accepted with its proofs.
    assert client.get("/", headers=bearer(token)).status_code == 401


_CERTS = st.sampled_from(["alice", "mallory", None])
_TOKENS = st.sampled_from(["alice", "mallory", "unbound", "expired", "other-audience",
                           "tilde", "padded", "non-ascii", "too-long", "spaced"])
_HEADERS = st.sampled_from(["Bearer {}", "bearer {}", "Bearer  {}", "DPoP {}"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(st.tuples(_TOKENS, _CERTS, _HEADERS, st.booleans()), min_size=1, max_size=24),
       mtls=st.sampled_from(["strict", "optional"]))
def test_the_memo_never_changes_a_decision(requests: list[tuple[str, str | None, str, bool]], mtls: str,
                                           issuer: TestIssuer, alice: Issued, mallory: Issued,
                                           alice_x5t: str, mallory_x5t: str) -> None:
    """Differential: every sequence of requests is decided alike with the memo and without it."""
    tokens = {
        "alice": issuer.token(cnf={"x5t#S256": alice_x5t}),
        "mallory": issuer.token(cnf={"x5t#S256": mallory_x5t}),
        "unbound": issuer.token(),
        "expired": issuer.token(exp=1, cnf={"x5t#S256": alice_x5t}),
        "other-audience": issuer.token(aud="https://elsewhere.test", cnf={"x5t#S256": alice_x5t}),
    }
    # Malformed (RFC 6750 section 2.1): with the memo on, the syntax is checked only once a token is
    # refused; the answer must still be the 400 the memo-less path gives at once.
    tokens.update({"tilde": tokens["alice"] + "~", "padded": tokens["alice"] + "=", "spaced": "a b",
                   "non-ascii": tokens["alice"][:-1] + "\u00e9", "too-long": "e30." * 5000})
    pems = {"alice": alice.cert_pem, "mallory": mallory.cert_pem, None: None}
    with_memo, _ = _client(issuer, proof_of_possession_mtls=mtls)
    without, plain_mw = _client(issuer, proof_of_possession_mtls=mtls)
    plain_mw.authenticator.accepted = None
    for token, cert, header, trusted in requests:
        environ = dict(cert_env(pems[cert]))
        if not trusted:
            environ[UWSGI_SECRET_VAR] = "not-the-secret"
        kwargs = {"headers": {"Authorization": header.format(tokens[token])}, "environ_overrides": environ}
        ours, theirs = with_memo.get("/", **kwargs), without.get("/", **kwargs)
        assert ours.status_code == theirs.status_code
        assert ours.headers.get("WWW-Authenticate") == theirs.headers.get("WWW-Authenticate")
        assert ours.get_data() == theirs.get_data()
