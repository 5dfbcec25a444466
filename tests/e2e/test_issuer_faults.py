"""Key rotation at the IdP and the IdP going away, with our workers left running.

These tests own their IdP (so restarting it disturbs no other test) and a
gunicorn stack pointed at it, with ``rediscovery_lifetime=1``. The stack has
one worker, so that "what is cached" is known exactly: each worker has its own
key cache, and a worker that never saw the new key rightly answers 503 while
the IdP is down.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.idp import OidcProvider, decode_jwt, x5t_s256
from tests.support.idp_fixtures import Pki

from .conftest import Stack, StackFactory, foreign_key, mint


@pytest.fixture(scope="module")
def own_idp(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    provider = OidcProvider(tmp_path_factory.mktemp("idp-faults"), ca=pki.ca, bound={"bound": pki.alice})
    provider.start()
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture(scope="module")
def stack(stacks: StackFactory, own_idp: OidcProvider) -> Stack:
    return stacks(own_idp, "gunicorn", workers=1)


def workers_of(stack: Stack) -> set[int]:
    pid = stack.app_server.process.pid
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return {int(p) for p in fh.read().split()}


def test_key_rotation_needs_no_restart(stack: Stack, own_idp: OidcProvider, pki: Pki) -> None:
    old_token = own_idp.token("bound")
    # Warm both workers on the old key.
    for _ in range(4):
        assert stack.call(old_token, pki.alice).status_code == 200
    workers = workers_of(stack)

    own_idp.restart(new_key=True)
    new_token = own_idp.token("bound")
    assert decode_jwt(new_token)[0]["kid"] != decode_jwt(old_token)[0]["kid"]
    time.sleep(1.1)  # rediscovery_lifetime=1: the refetch on an unknown kid is allowed again
    statuses = [stack.call(new_token, pki.alice).status_code for _ in range(6)]
    assert statuses == [200] * 6
    assert workers_of(stack) == workers, "the workers were restarted"


def test_idp_down_with_unknown_kid_is_503(stack: Stack, own_idp: OidcProvider, pki: Pki) -> None:
    known = own_idp.token("bound")
    for _ in range(4):
        assert stack.call(known, pki.alice).status_code == 200
    cnf = {"x5t#S256": x5t_s256(pki.alice)}
    own_idp.stop()
    try:
        time.sleep(1.1)
        unknown = mint(own_idp, key=foreign_key("rotated-but-unreachable"), cnf=cnf)
        response = stack.call(unknown, pki.alice)
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) >= 1
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
        assert response.json()["error"] == "temporarily_unavailable"
        # What is cached still works, and what is stolen is still refused.
        assert stack.call(known, pki.alice).status_code == 200
        assert stack.call(known, pki.mallory).status_code == 401
    finally:
        own_idp.start()
    time.sleep(2.1)
    # The IdP is back: the same unknown key is now a definite 401, not a 503.
    response = stack.call(unknown, pki.alice)
    assert response.status_code == 401, response.text
    assert response.json()["error_description"] == "the token is signed with an unknown key"
