"""A refresh token is not an access token (issue 11 item 8), with a real oidc-provider behind nginx and gunicorn.

The provider issues refresh tokens here (``offline_access``, the ``refresh_token``
grant) to a code-flow client. Its introspection answer for one is active, from
the same issuer and client, and omits ``token_type``, which it sends for every
access token: the middleware refuses the answer on that alone, before ``aud``.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from tests.support import idp_fixtures
from tests.support.browser import Browser
from tests.support.dpop import DPoPKey
from tests.support.idp import API_RESOURCE, SECRETS, OidcProvider

from .conftest import Stack, StackFactory

CALLBACK = "https://127.0.0.1:9/callback"
REFRESHER = "refresher"
REFRESHER_SECRET = "refresher-secret-0123456789abcdef"
NOT_ACCESS = "the introspection answer does not say the token is an access token"


@pytest.fixture(scope="module")
def refresh_idp(pki: idp_fixtures.Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    client = {"client_id": REFRESHER, "auth": "client_secret_basic", "secret": REFRESHER_SECRET, "code": True,
              "redirect_uris": [CALLBACK], "metadata": {"grant_types": ["authorization_code", "refresh_token"]}}
    with OidcProvider(tmp_path_factory.mktemp("refresh-idp"), ca=pki.ca, extra_clients=[client],
                      refresh_tokens=True) as provider:
        yield provider


def token_response(provider: OidcProvider, dpop: DPoPKey | None = None) -> dict[str, str]:
    """The code flow with offline_access (and consent), as alice: an access token and a refresh token."""
    request = provider.authorization_request(CALLBACK, client=REFRESHER, scope="openid offline_access",
                                             prompt="consent")
    with Browser(provider.ca_file) as browser:
        location = browser.location(browser.login(request.url, "alice", stop_at=CALLBACK))
    assert location is not None
    code = parse_qs(urlsplit(location).query)["code"][0]
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK,
            "code_verifier": request.code_verifier or ""}
    headers = {"DPoP": dpop.proof("POST", provider.token_endpoint)} if dpop else {}
    with requests.Session() as session:
        session.trust_env = False
        response = session.post(provider.token_endpoint, data=form, auth=(REFRESHER, REFRESHER_SECRET),
                                headers=headers, verify=provider.ca_file, timeout=15)
    assert response.status_code == 200, response.text
    body = dict(response.json())
    assert body["refresh_token"] and body["access_token"]
    return body


@pytest.fixture(scope="module")
def stack(stacks: StackFactory, refresh_idp: OidcProvider) -> Stack:
    return stacks(refresh_idp, "gunicorn", auth_methods="introspection", audience=API_RESOURCE,
                  client_id="rs-client", client_secret=SECRETS["rs-client"], proof_of_possession_mtls="optional")


def test_the_providers_answers(refresh_idp: OidcProvider) -> None:
    """What oidc-provider says (the premise of the check): token_type for access tokens only."""
    tokens = token_response(refresh_idp)
    access, refresh = refresh_idp.introspect(tokens["access_token"]), refresh_idp.introspect(tokens["refresh_token"])
    assert access["active"] is True and access["token_type"] == "Bearer" and access["aud"] == API_RESOURCE
    assert refresh["active"] is True and "token_type" not in refresh
    assert refresh["client_id"] == access["client_id"] == REFRESHER and refresh["sub"] == access["sub"] == "alice"


def test_a_refresh_token_is_refused_and_its_access_token_passes(stack: Stack, refresh_idp: OidcProvider) -> None:
    tokens = token_response(refresh_idp)
    refused = stack.call(tokens["refresh_token"])
    assert refused.status_code == 401, refused.text
    assert refused.json() == {"error": "invalid_token", "error_description": NOT_ACCESS}
    assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]
    passed = stack.call(tokens["access_token"])
    assert passed.status_code == 200, passed.text
    assert passed.json()["claims"]["token_type"] == "Bearer"


def test_a_dpop_bound_pair(stacks: StackFactory, refresh_idp: OidcProvider) -> None:
    """With DPoP, the access token's answer says DPoP and carries cnf.jkt; the refresh token is still refused."""
    key = DPoPKey()
    tokens = token_response(refresh_idp, key)
    assert refresh_idp.introspect(tokens["access_token"])["token_type"] == "DPoP"
    dpop_stack = stacks(refresh_idp, "gunicorn", auth_methods="introspection", audience=API_RESOURCE,
                        client_id="rs-client", client_secret=SECRETS["rs-client"], proof_of_possession_mtls="optional",
                        proof_of_possession_dpop="optional", public_base_url="{nginx_url}")
    url = dpop_stack.nginx.url + "/anything"
    for token, status in ((tokens["refresh_token"], 401), (tokens["access_token"], 200)):
        with requests.Session() as session:
            session.trust_env = False
            response = session.get(url, headers={"Authorization": f"DPoP {token}",
                                                 "DPoP": key.proof("GET", url, token)},
                                   verify=dpop_stack.ca_file, timeout=15)
        assert response.status_code == status, response.text
        if status == 401:
            assert response.json()["error_description"] == NOT_ACCESS
