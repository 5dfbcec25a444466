"""Real servers for the end-to-end tests: oidc-provider, nginx (mTLS), gunicorn and uWSGI.

A *stack* is nginx rendered from the shipped configuration in front of
gunicorn or uWSGI running ``certbound_wsgi.wsgi:application`` (the echo app),
configured from ``CERTBOUND_*`` variables only, as a user deploys it: over TCP
with the proxy secret, unless a test asks for another channel. Stacks are
cached per configuration for the whole session.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet

from certbound_wsgi.dev.pki import Issued
from tests.support import idp_fixtures
from tests.support.idp import API_RESOURCE, OidcProvider
from tests.support.procs import free_port
from tests.support.servers import (
    PROXY_SECRET,
    SERVER_NAME,
    UWSGI,
    Gunicorn,
    Nginx,
    start_gunicorn,
    start_nginx,
    start_uwsgi,
)

pki = idp_fixtures.pki
idp = idp_fixtures.idp


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)


@dataclass
class Stack:
    """nginx in front of one app server; ``call`` makes a real HTTPS request through nginx."""

    nginx: Nginx
    app_server: Gunicorn | UWSGI
    ca_file: str

    def call(self, token: str | None = None, cert: Issued | None = None, path: str = "/anything",
             headers: dict[str, str] | None = None, method: str = "GET", **kwargs: Any) -> requests.Response:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        # verify= on the call: the machine's REQUESTS_CA_BUNDLE must not win.
        return requests.request(method, self.nginx.url + path, headers=sent, cert=cert.pair if cert else None,
                                verify=self.ca_file, timeout=15, **kwargs)

    def direct(self, token: str, headers: dict[str, str], *, secret: bool = False) -> requests.Response:
        """Straight to gunicorn, bypassing nginx (as an attacker on the network might); with ``secret``,
        carrying the proxy secret as nginx does (an attacker does not know it)."""
        sent = {"Authorization": f"Bearer {token}", **headers}
        if secret:
            sent["X-Certbound-Proxy-Secret"] = PROXY_SECRET
        return requests.get(f"http://127.0.0.1:{self.app_server.port}/anything", timeout=15, headers=sent)


def app_env(provider: OidcProvider, **options: str) -> dict[str, str]:
    """The application's environment; its channel from nginx is the proxy secret unless ``options``
    name ``proxy_secret`` (``proxy_secret=""``: none)."""
    env = {
        "CERTBOUND_ISSUER": provider.issuer,
        "CERTBOUND_AUDIENCE": API_RESOURCE,
        "CERTBOUND_CA_FILE": provider.ca_file,
        "CERTBOUND_PROXY_SECRET": PROXY_SECRET,
        # Short, so that the key-rotation test need not wait long.
        "CERTBOUND_REDISCOVERY_LIFETIME": "1",
    }
    env.update({f"CERTBOUND_{name.upper()}": value for name, value in options.items()})
    return env


class StackFactory:
    def __init__(self, tmp: pytest.TempPathFactory, pki: idp_fixtures.Pki) -> None:
        self._tmp = tmp
        self._pki = pki
        self._stacks: dict[tuple[Any, ...], Stack] = {}

    def __call__(self, provider: OidcProvider, upstream: str = "gunicorn", workers: int = 2, **options: str) -> Stack:
        """The stack for this configuration (started once, then cached).

        ``{nginx_url}`` in an option's value becomes the stack's public URL
        (``https://localhost:<nginx port>``, the port reserved before the app starts),
        e.g. ``redirect_uri="{nginx_url}/callback"``.

        The channel from nginx is the proxy secret (``proxy_secret`` in both), unless the options
        name ``proxy_secret`` themselves (``proxy_secret=""``: none, for tests of other channels).
        """
        options = {"proxy_secret": PROXY_SECRET, **options}
        key = (id(provider), upstream, workers, tuple(sorted(options.items())))
        if key not in self._stacks:
            nginx_port = free_port() if any("{nginx_url}" in value for value in options.values()) else None
            if nginx_port is not None:
                url = f"https://{SERVER_NAME}:{nginx_port}"
                options = {name: value.replace("{nginx_url}", url) for name, value in options.items()}
            env = app_env(provider, **options)
            logs = self._tmp.mktemp(f"{upstream}-logs")
            server: Gunicorn | UWSGI
            if upstream == "gunicorn":
                server = start_gunicorn(env, workers=workers, log_dir=logs)
                backend = f"127.0.0.1:{server.port}"
            else:
                server = start_uwsgi(env, processes=workers, log_dir=logs)
                backend = f"127.0.0.1:{server.port}"
            try:
                nginx = start_nginx(self._tmp.mktemp(f"nginx-{upstream}"), upstream, backend,  # type: ignore[arg-type]
                                    self._pki.server, port=nginx_port,
                                    proxy_secret=options["proxy_secret"] or None, address_only_trust=True)
            except BaseException:
                server.stop()
                raise
            self._stacks[key] = Stack(nginx, server, self._pki.ca_file)
        return self._stacks[key]

    def close(self) -> None:
        for stack in self._stacks.values():
            stack.nginx.stop()
            stack.app_server.stop()


@pytest.fixture(scope="session")
def stacks(tmp_path_factory: pytest.TempPathFactory, pki: idp_fixtures.Pki) -> Iterator[StackFactory]:
    factory = StackFactory(tmp_path_factory, pki)
    try:
        yield factory
    finally:
        factory.close()


def mint(provider: OidcProvider, *, header: dict[str, Any] | None = None, key: Any = None,
         **claims: Any) -> str:
    """A token signed with the IdP's own current key (or ``key``), for claims the IdP would never issue."""
    keyset = KeySet.import_key_set(provider.private_jwks())
    signing = key or keyset.keys[0]
    now = int(time.time())
    body: dict[str, Any] = {"iss": provider.issuer, "aud": API_RESOURCE, "sub": "alice", "iat": now,
                            "exp": now + 300, "jti": f"test-{time.monotonic_ns()}"}
    body.update(claims)
    hdr: dict[str, Any] = {"alg": "ES256", "typ": "at+jwt", "kid": signing.kid}
    hdr.update(header or {})
    return jwt.encode(hdr, {k: v for k, v in body.items() if v is not None}, signing, algorithms=[hdr["alg"]])


def foreign_key(kid: str = "attacker") -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": kid}, private=True)


def log_of(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
