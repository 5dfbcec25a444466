"""An introspection answer must say the token is an access token (issue 11 item 8, RFC 7662 section 2.2).

Issuers introspect refresh tokens too, and a refresh token's answer may carry the
same ``aud`` and ``cnf`` as its access token's. The answers below are what the
issuers send (oidc-provider's as captured from tests/idp, Keycloak's and Hydra's
from their sources), with the ``aud`` and ``cnf`` this resource server accepts,
so that only the token type can tell them apart.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.introspection import is_access_token
from tests.conftest import AUDIENCE, ISSUER, CountingApp, MakeClient, cert_env, middleware_of

NOT_ACCESS = "the introspection answer does not say the token is an access token"


def answer(x5t: str, **members: Any) -> dict[str, Any]:
    """An active answer that passes every other check, bound to alice's certificate."""
    base = {"active": True, "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "client_id": "bound",
            "exp": 4_000_000_000, "iat": 1_700_000_000, "cnf": {"x5t#S256": x5t}}
    base.update(members)
    return {k: v for k, v in base.items() if v is not None}


class FixedAnswer:
    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.calls = 0

    def introspect(self, token: str) -> dict[str, Any]:
        self.calls += 1
        return dict(self.answer)


ROWS: list[Any] = [
    # oidc-provider (9.x): access tokens say Bearer or DPoP; refresh tokens say nothing.
    pytest.param({"token_type": "Bearer"}, {}, True, id="oidc-provider-access-bearer"),
    pytest.param({"token_type": "DPoP"}, {}, True, id="oidc-provider-access-dpop"),
    pytest.param({"token_type": None, "scope": "openid offline_access"}, {}, False, id="oidc-provider-refresh"),
    pytest.param({"token_type": None}, {"introspection_token_type_required": False}, True,
                 id="no-token-type-allowed-by-option"),
    # Keycloak: token_type is the token's typ, which is copied too.
    pytest.param({"token_type": "Bearer", "typ": "Bearer"}, {}, True, id="keycloak-access"),
    pytest.param({"token_type": "Refresh", "typ": "Refresh"}, {}, False, id="keycloak-refresh"),
    pytest.param({"token_type": "Offline", "typ": "Offline"}, {}, False, id="keycloak-offline"),
    pytest.param({"token_type": None, "typ": "Refresh"}, {"introspection_token_type_required": False}, False,
                 id="older-keycloak-refresh-typ-only"),
    pytest.param({"token_type": "bearer", "typ": "ID"}, {}, False, id="keycloak-id-token-typ"),
    # Ory Hydra: token_use.
    pytest.param({"token_type": "Bearer", "token_use": "access_token"}, {}, True, id="hydra-access"),
    pytest.param({"token_type": "Bearer", "token_use": "refresh_token"}, {}, False, id="hydra-refresh"),
    # Case-insensitive types (RFC 6749 section 5.1), and what is not an access token type.
    pytest.param({"token_type": "BEARER"}, {}, True, id="bearer-upper-case"),
    pytest.param({"token_type": "dpop"}, {}, True, id="dpop-lower-case"),
    pytest.param({"token_type": "refresh_token"}, {}, False, id="refresh-token"),
    pytest.param({"token_type": "N_A"}, {}, False, id="rfc8693-n-a"),
    pytest.param({"token_type": "mac"}, {}, False, id="mac"),
    pytest.param({"token_type": ""}, {}, False, id="empty"),
    pytest.param({"token_type": ["Bearer"]}, {}, False, id="list"),
    pytest.param({"token_type": 1}, {}, False, id="number"),
    pytest.param({"token_type": "refresh_token"}, {"introspection_token_type_required": False}, False,
                 id="wrong-type-refused-even-when-not-required"),
]


@pytest.mark.parametrize(("members", "overrides", "accepted"), ROWS)
def test_token_types(members: dict[str, Any], overrides: dict[str, Any], accepted: bool, make_client: MakeClient,
                     alice: Issued, alice_x5t: str) -> None:
    app = CountingApp()
    client = make_client(app, auth_methods=("introspection",), client_id="rs", client_secret="s",
                         introspection_endpoint="https://issuer.test/introspect", **overrides)
    fake = FixedAnswer(answer(alice_x5t, **members))
    introspection = middleware_of(client).introspection
    assert introspection is not None
    introspection._client = fake  # type: ignore[assignment]
    response = client.get("/anything", headers={"Authorization": "Bearer opaque-token"},
                          environ_overrides=cert_env(alice.cert_pem))
    if accepted:
        assert response.status_code == 200, response.get_data(as_text=True)
        assert len(app.calls) == 1
    else:
        assert response.status_code == 401
        assert response.json == {"error": "invalid_token", "error_description": NOT_ACCESS}
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
        assert app.calls == []
    # Cached or not, the same decision: a second request does not introspect again, and is decided alike.
    again = client.get("/anything", headers={"Authorization": "Bearer opaque-token"},
                       environ_overrides=cert_env(alice.cert_pem))
    assert again.status_code == response.status_code and fake.calls == 1


def test_inactive_answers_say_inactive() -> None:
    assert is_access_token({"active": False}) is False  # and the validator says "not active" first


@settings(max_examples=300, deadline=None)
@given(token_type=st.one_of(st.none(), st.text(max_size=12), st.integers(), st.lists(st.text(max_size=3))),
       typ=st.one_of(st.none(), st.text(max_size=12)), token_use=st.one_of(st.none(), st.text(max_size=14)),
       required=st.booleans())
def test_only_access_tokens_pass(token_type: Any, typ: Any, token_use: Any, required: bool) -> None:
    members = {k: v for k, v in {"token_type": token_type, "typ": typ, "token_use": token_use}.items()
               if v is not None}
    expected = (
        ((token_type is None and not required) or (isinstance(token_type, str)
         and token_type.lower() in ("bearer", "dpop")))
        and not (isinstance(typ, str) and typ.lower() in ("refresh", "offline", "id", "logout", "serialized-id"))
        and token_use in (None, "access_token")
    )
    assert is_access_token(members, required=required) is expected
