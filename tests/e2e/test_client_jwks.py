"""Our own JWKS for private_key_jwt (issue 14), end to end: oidc-provider downloads our keys from us.

The IdP knows the resource server ``rs-jwks`` only by its ``jwks_uri``, which is
our stack's ``client_jwks_path`` behind nginx. Introspection and the browser
login's code exchange authenticate with assertions signed by ``client_jwk``;
``client_jwk_next`` is published from the start. Rotating (the next key becomes
the current one, a new next key is published, ``kill -HUP``) under load fails no
request: the IdP already holds the key that now signs.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc.jwk import ECKey

from certbound_wsgi.jose import PRIVATE_MEMBERS
from tests.support.browser import Browser
from tests.support.idp import OPAQUE_RESOURCE, OidcProvider
from tests.support.idp_fixtures import Pki
from tests.support.procs import free_port, wait_until
from tests.support.redis_server import RedisServer
from tests.support.servers import PROXY_SECRET, SERVER_NAME, Gunicorn, Nginx, start_gunicorn, start_nginx

from .conftest import app_env, log_of

CLIENT = "rs-jwks"
JWKS_PATH = "/.well-known/jwks.json"
WORKERS = 3
HTML = "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"


def new_key(path: Path) -> str:
    """A fresh private ES256 JWK in ``path`` (atomically replaced); its kid, the RFC 7638 thumbprint."""
    key = ECKey.generate_key("P-256", private=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(key.as_dict(private=True)))
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return key.thumbprint()


@dataclass
class World:
    idp: OidcProvider
    gunicorn: Gunicorn
    nginx: Nginx
    keys: Path
    ca_file: str

    @property
    def url(self) -> str:
        return self.nginx.url

    def call(self, token: str, path: str = "/anything") -> requests.Response:
        return requests.get(self.url + path, headers={"Authorization": f"Bearer {token}"}, verify=self.ca_file,
                            timeout=15)

    def jwks(self) -> dict[str, object]:
        response = requests.get(self.url + JWKS_PATH, verify=self.ca_file, timeout=15)
        assert response.status_code == 200
        return dict(response.json())

    def workers(self) -> set[int]:
        pid = self.gunicorn.process.pid
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return {int(p) for p in fh.read().split()}


@pytest.fixture(scope="module")
def world(pki: Pki, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    port = free_port()
    url = f"https://{SERVER_NAME}:{port}"
    keys = tmp_path_factory.mktemp("rs-keys")
    new_key(keys / "current.jwk")
    new_key(keys / "next.jwk")
    idp = OidcProvider(
        tmp_path_factory.mktemp("idp-jwks"), ca=pki.ca,
        extra_clients=[{"client_id": CLIENT, "auth": "private_key_jwt", "jwks_uri": url + JWKS_PATH,
                        "introspect": True, "code": True, "redirect_uris": [f"{url}/callback"]}],
    )
    idp.start()
    env = app_env(
        idp,
        audience=OPAQUE_RESOURCE,
        auth_methods="introspection,session,authorization_code",
        proof_of_possession_mtls="optional",
        proof_of_possession_auth_methods_validation="false",
        introspection_endpoint_auth_method="private_key_jwt",
        token_endpoint_auth_method="private_key_jwt",
        client_id=CLIENT,
        client_jwk=str(keys / "current.jwk"),
        client_jwk_next=str(keys / "next.jwk"),
        client_jwks_path=JWKS_PATH,
        cache_introspection="false",  # every request authenticates to the IdP
        redirect_uri=f"{url}/callback",
        scopes="openid",
        session_secret="client-jwks-session-secret-0123456789abcdef",
        redis_url=redis_server.url,
        cache_secret="client-jwks-cache-secret-0123456789",
    )
    logs = tmp_path_factory.mktemp("gunicorn-jwks")
    gunicorn = start_gunicorn(env, workers=WORKERS, log_dir=logs)
    try:
        nginx = start_nginx(tmp_path_factory.mktemp("nginx-jwks"), "gunicorn", gunicorn.backend, pki.server,
                            port=port, proxy_secret=PROXY_SECRET)
    except BaseException:
        gunicorn.stop()
        idp.stop()
        raise
    try:
        yield World(idp, gunicorn, nginx, keys, pki.ca_file)
    finally:
        nginx.stop()
        gunicorn.stop()
        idp.stop()


def test_the_jwks_is_public_cacheable_and_has_no_private_member(world: World) -> None:
    response = requests.get(world.url + JWKS_PATH, verify=world.ca_file, timeout=15)  # no token, no certificate
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/jwk-set+json"
    assert response.headers["Cache-Control"].startswith("public, max-age=")
    keys = response.json()["keys"]
    assert len(keys) == 2
    assert all(not PRIVATE_MEMBERS & set(key) for key in keys)


def test_introspection_authenticates_with_keys_the_idp_downloaded_from_us(world: World) -> None:
    token = world.idp.token("unbound", resource=OPAQUE_RESOURCE)
    response = world.call(token)
    assert response.status_code == 200, response.text
    assert response.json()["auth_method"] == "introspection"
    # The IdP holds no key of rs-jwks but what it fetched from our endpoint (it sends no User-Agent).
    fetched = [line for line in log_of(world.gunicorn.process.log).splitlines()
               if f'"GET {JWKS_PATH} HTTP/1.1" 200' in line and "python-requests" not in line]
    assert fetched


def test_the_code_exchange_authenticates_with_private_key_jwt(world: World) -> None:
    with Browser(world.ca_file) as browser:
        browser.session.headers["Accept"] = HTML
        start = f"{world.url}/anything?page=1"
        final = browser.login(start, username="alice")
        assert final.status_code == 200, (final.text, browser.history)
        assert final.json()["auth_method"] == "session"
        assert final.json()["claims"]["sub"] == "alice"


def test_rotating_our_key_under_load_fails_no_request(world: World, record_property: Any) -> None:
    token = world.idp.token("unbound", resource=OPAQUE_RESOURCE)
    assert world.call(token).status_code == 200
    upcoming = [key["kid"] for key in world.jwks()["keys"]][1]  # type: ignore[index]
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.append(world.call(token).status_code)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        # The next key signs from now on, and a new next key is published.
        (world.keys / "next.jwk").replace(world.keys / "current.jwk")
        newest = new_key(world.keys / "next.jwk")
        old = world.workers()
        os.kill(world.gunicorn.process.pid, signal.SIGHUP)
        assert wait_until(lambda: world.workers().isdisjoint(old) and len(world.workers()) == WORKERS, timeout=20)
        during = len(results)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    assert [key["kid"] for key in world.jwks()["keys"]] == [upcoming, newest]  # type: ignore[index]
    record_property("requests_during_rotation", len(results))
    assert len(results) > during > 10, (during, len(results))
    assert set(results) == {200}, {status: results.count(status) for status in set(results)}
