"""A real identity provider for the tests: panva's ``oidc-provider`` on Node.

``tests/idp/launcher.mjs`` runs it over HTTPS on a loopback port, with mutual
TLS requested (not required) on every connection. It issues ES256 JWT access
tokens (``typ: at+jwt``) for resources ``https://api*`` and opaque ones for
``https://opaque*``, with the ``client_credentials`` grant:

========== =============================== ==========================================
client     authenticates with              its tokens
========== =============================== ==========================================
bound      its certificate (``self_signed_ bound to that certificate
           tls_client_auth``)              (``cnf.x5t#S256``, RFC 8705)
bound2     its certificate, likewise       bound to that certificate
unbound    ``client_secret_basic``         unbound bearer tokens (DPoP-bound if a
                                           DPoP proof is sent)
rs-client  ``client_secret_basic``         none: the resource server, which may
                                           introspect and revoke any token
rs-jwt     ``private_key_jwt`` (ES256; the none: a resource server like rs-client
           private JWK in                  (its public key is registered)
           :attr:`~OidcProvider.rs_jwt_key_path`)
rs-mtls    ``tls_client_auth`` (subject    none: a resource server like rs-client
           DN ``CN=rs-mtls``,
           :attr:`~OidcProvider.rs_mtls_cert`, issued by ``ca``)
web-client ``client_secret_basic``         a relying party's browser login: the
                                           authorization code flow, PKCE S256
                                           required; ES256 ID tokens, JWT access
                                           tokens for ``https://api.test``
========== =============================== ==========================================

The login and consent pages are oidc-provider's development interactions
(``/interaction/<uid>``): any login name with any password is an account, whose
e-mail is ``<name>@example.test``; :class:`tests.support.browser.Browser` fills
them in. web-client's redirect URIs are given when the provider is made
(``redirect_uris=[...]``) or later with :meth:`OidcProvider.set_redirect_uris`,
which takes effect at once, without a restart.

Which certificate a bound client holds is given when the provider is made
(``bound={"bound": alice, "bound2": mallory}``). Every request here goes to
127.0.0.1 only, verifies the provider against :attr:`OidcProvider.ca_file`
and ignores the environment (``REQUESTS_CA_BUNDLE``, proxies).

Key rotation: the provider signs with the private JWKS in ``keys.json``;
``restart(new_key=True)`` replaces it with a fresh ES256 key (or puts a new one
in front of the old with ``keep_old_key=True``) and restarts on the same port,
so the issuer stays the same; ``withdraw_key(kid)`` restarts without one key.
A client of ``extra_clients`` may register a ``jwks_uri`` instead of keys: the
provider downloads them, trusting :attr:`~OidcProvider.ca_file`'s CA. Tokens live in the provider's memory: a restart
forgets every token issued before it (they introspect as inactive).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from joserfc.jwk import ECKey

from certbound_wsgi.dev.pki import DevCA, Issued
from tests.support.procs import IN_CI, Process, require_binary, tail

__all__ = [
    "API_RESOURCE",
    "OPAQUE_RESOURCE",
    "RS_JWT_CLIENT",
    "RS_MTLS_CLIENT",
    "SECRETS",
    "WEB_CLIENT",
    "AuthorizationRequest",
    "OidcProvider",
    "decode_jwt",
    "pkce_pair",
    "require_oidc_provider",
    "x5t_s256",
]

IDP_DIR = Path(__file__).resolve().parent.parent / "idp"
LAUNCHER = IDP_DIR / "launcher.mjs"

API_RESOURCE = "https://api.test"
OPAQUE_RESOURCE = "https://opaque.test"

#: The confidential client of the browser login (authorization code flow).
WEB_CLIENT = "web-client"

#: Resource servers that may introspect and revoke any token, like rs-client, but that authenticate
#: with ``private_key_jwt`` (ES256) and with ``tls_client_auth`` (subject DN ``CN=rs-mtls``).
RS_JWT_CLIENT = "rs-jwt"
RS_MTLS_CLIENT = "rs-mtls"

#: client_secret_basic secrets of the clients that have one.
SECRETS: dict[str, str] = {
    "unbound": "unbound-secret-0123456789abcdef",
    "rs-client": "rs-client-secret-0123456789abcdef",
    WEB_CLIENT: "web-client-secret-0123456789abcdef",
}

#: What a relying party asks for at login; oidc-provider also knows ``read`` and ``write``.
LOGIN_SCOPE = "openid profile email"


def require_oidc_provider() -> str:
    """Return the path of ``node`` once oidc-provider is installed; skip, or fail in CI."""
    node = require_binary("node", "nodejs")
    if not (IDP_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
        message = "oidc-provider is not installed; run: npm ci --prefix tests/idp"
        if IN_CI:
            pytest.fail(message + " (CI=true: end-to-end tests may not skip)", pytrace=False)
        pytest.skip(message)
    return node


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(header, claims)`` of a JWS compact token, NOT verified."""
    header, payload, _signature = token.split(".")
    return json.loads(_b64url_decode(header)), json.loads(_b64url_decode(payload))


def x5t_s256(cert: Issued | str) -> str:
    """RFC 8705 thumbprint: unpadded base64url SHA-256 of the certificate's DER."""
    pem = cert.cert_pem if isinstance(cert, Issued) else cert
    der = x509.load_pem_x509_certificate(pem.encode("ascii")).public_bytes(serialization.Encoding.DER)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return base64.urlsafe_b64encode(digest.finalize()).rstrip(b"=").decode("ascii")


def pkce_pair() -> tuple[str, str]:
    """A fresh PKCE ``(code_verifier, code_challenge)``, S256 (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=")
    return verifier, challenge.decode("ascii")


@dataclass(frozen=True)
class AuthorizationRequest:
    """An authorization code request as a relying party makes it, with the secrets it keeps."""

    url: str
    redirect_uri: str
    state: str
    nonce: str
    code_verifier: str | None


def new_signing_key() -> dict[str, Any]:
    """A fresh private ES256 JWK with its thumbprint as ``kid``."""
    key = ECKey.generate_key("P-256", parameters={"alg": "ES256", "use": "sig"}, private=True, auto_kid=True)
    return dict(key.as_dict(private=True))


class OidcProvider:
    """oidc-provider on ``https://127.0.0.1:<port>``, started and stopped by the tests.

    ``directory`` holds its configuration, keys, TLS files and log (``idp.log``).
    ``ca`` issues its server certificate (a new :class:`DevCA` in ``directory``
    if not given); ``bound`` maps client ids to the certificate each holds;
    ``extra_clients`` are further launcher client specs (see launcher.mjs);
    ``redirect_uris`` are web-client's (see :meth:`set_redirect_uris`).
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        ca: DevCA | None = None,
        bound: Mapping[str, Issued] | None = None,
        extra_clients: Sequence[Mapping[str, Any]] = (),
        access_token_ttl: int = 600,
        startup_timeout: float = 30.0,
        redirect_uris: Sequence[str] = (),
        refresh_tokens: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = ca if ca is not None else DevCA(self.directory / "ca")
        self.bound: dict[str, Issued] = dict(bound or {})
        self.extra_clients = [dict(c) for c in extra_clients]
        self.redirect_uris: list[str] = list(redirect_uris)
        self.access_token_ttl = access_token_ttl
        #: Whether ``offline_access`` is a scope, which turns the refresh_token grant on.
        self.refresh_tokens = refresh_tokens
        self.startup_timeout = startup_timeout
        self.keys_path = self.directory / "keys.json"
        self.config_path = self.directory / "config.json"
        self.log = self.directory / "idp.log"
        #: rs-jwt's private ES256 JWK (JSON), made at the first start; its public part is registered.
        self.rs_jwt_key_path = self.directory / "rs-jwt.jwk.json"
        self._rs_mtls_cert: Issued | None = None
        self._server_cert: Issued | None = None
        self._proc: Process | None = None
        self._port: int | None = None
        self._http = requests.Session()
        self._http.trust_env = False  # no REQUESTS_CA_BUNDLE, no proxies: loopback only

    # ----- lifecycle -----------------------------------------------------

    def start(self) -> OidcProvider:
        """Start the provider (on the port it had before, if it ran already) and wait until it serves."""
        if self.running:
            return self
        node = require_oidc_provider()
        if self._server_cert is None:
            self._server_cert = self.ca.server("idp", hosts=("127.0.0.1", "localhost"))
        if not self.keys_path.exists():
            self._write_keys([new_signing_key()])
        if not self.rs_jwt_key_path.exists():
            self._write_private(self.rs_jwt_key_path, new_signing_key())
        if self._rs_mtls_cert is None:
            self._rs_mtls_cert = self._client_cert(RS_MTLS_CLIENT)
        self.config_path.write_text(json.dumps(self._config(), indent=2))
        offset = self.log.stat().st_size if self.log.exists() else 0
        # A client's jwks_uri is served by our stack, whose certificate comes from the same CA.
        env = {**os.environ, "NODE_EXTRA_CA_CERTS": self.ca_file}
        self._proc = Process([node, str(LAUNCHER), str(self.config_path)], self.log, env=env, cwd=IDP_DIR)
        self._port = self._wait_ready(offset)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None
        self._http.close()  # no kept-alive connection outlives the process

    def restart(self, new_key: bool = False, *, keep_old_key: bool = False) -> None:
        """Restart on the same port and issuer; with ``new_key``, sign with a fresh key from now on.

        ``keep_old_key`` keeps publishing the old key(s) after the new one (a
        graceful rotation); otherwise the JWKS holds the new key alone.
        """
        self.stop()
        if new_key:
            old = self.private_jwks()["keys"] if keep_old_key else []
            self._write_keys([new_signing_key(), *old])
        self.start()

    def withdraw_key(self, kid: str) -> None:
        """Restart without the key ``kid``: it signs nothing and is no longer in the JWKS."""
        keys = [key for key in self.private_jwks()["keys"] if key["kid"] != kid]
        if not keys:
            raise ValueError("the provider needs at least one key")
        self.stop()
        self._write_keys(keys)
        self.start()

    def __enter__(self) -> OidcProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.alive()

    def _config(self) -> dict[str, Any]:
        assert self._server_cert is not None
        clients: list[dict[str, Any]] = [
            {
                "client_id": client_id,
                "auth": "self_signed_tls_client_auth",
                "certificates": [str(cert.cert_path)],
                "bound": True,
            }
            for client_id, cert in self.bound.items()
        ]
        clients += [
            {"client_id": "unbound", "auth": "client_secret_basic", "secret": SECRETS["unbound"]},
            {
                "client_id": "rs-client",
                "auth": "client_secret_basic",
                "secret": SECRETS["rs-client"],
                "introspect": True,
            },
            {
                "client_id": RS_JWT_CLIENT,
                "auth": "private_key_jwt",
                "jwks": {"keys": [self.rs_jwt_public_jwk()]},
                "introspect": True,
            },
            {
                "client_id": RS_MTLS_CLIENT,
                "auth": "tls_client_auth",
                "subject_dn": f"CN={RS_MTLS_CLIENT}",
                "introspect": True,
            },
            {
                "client_id": WEB_CLIENT,
                "auth": "client_secret_basic",
                "secret": SECRETS[WEB_CLIENT],
                "code": True,
                "redirect_uris": self.redirect_uris,
            },
            *self.extra_clients,
        ]
        return {
            "host": "127.0.0.1",
            "port": self._port or 0,
            "tls": {
                "cert": str(self._server_cert.cert_path),
                "key": str(self._server_cert.key_path),
                "client_ca": str(self.ca.cert_path),
            },
            "keys": str(self.keys_path),
            "access_token_ttl": self.access_token_ttl,
            "refresh_tokens": self.refresh_tokens,
            "clients": clients,
        }

    def _wait_ready(self, offset: int) -> int:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            with open(self.log, "rb") as fh:
                fh.seek(offset)
                for line in fh.read().decode("utf-8", "replace").splitlines():
                    if line.startswith("READY "):
                        return int(line.split()[1])
            if not self._proc.alive():
                code = self._proc.proc.returncode
                self.stop()
                raise RuntimeError(f"oidc-provider exited with {code} before it was ready:\n{tail(self.log)}")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"oidc-provider not ready after {self.startup_timeout}s:\n{tail(self.log)}")

    def _write_keys(self, keys: list[dict[str, Any]]) -> None:
        self._write_private(self.keys_path, {"keys": keys})

    @staticmethod
    def _write_private(path: Path, value: dict[str, Any]) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(path)

    def _client_cert(self, name: str) -> Issued:
        """``CN=name`` from ``ca``, issued once per CA: providers sharing a CA share the certificate."""
        cert_path, key_path = self.ca.directory / f"{name}.pem", self.ca.directory / f"{name}.key"
        if cert_path.is_file() and key_path.is_file():
            return Issued(cert_path, key_path, cert_path.read_text())
        return self.ca.client(name)

    # ----- where it is -----------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the provider has not been started")
        return self._port

    @property
    def issuer(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> str:
        """The CA that signed the provider's TLS certificate: verify the provider with it."""
        return str(self.ca.cert_path)

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    @property
    def authorization_endpoint(self) -> str:
        return f"{self.issuer}/auth"

    @property
    def userinfo_endpoint(self) -> str:
        return f"{self.issuer}/me"

    @property
    def introspection_endpoint(self) -> str:
        return f"{self.issuer}/token/introspection"

    @property
    def revocation_endpoint(self) -> str:
        return f"{self.issuer}/token/revocation"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks"

    @property
    def discovery_url(self) -> str:
        """OpenID discovery; ``/.well-known/oauth-authorization-server`` serves the same document."""
        return f"{self.issuer}/.well-known/openid-configuration"

    # ----- keys ------------------------------------------------------------

    def private_jwks(self) -> dict[str, Any]:
        """The signing keys, private parts included, as the provider reads them at start."""
        return dict(json.loads(self.keys_path.read_text()))

    def rs_jwt_public_jwk(self) -> dict[str, Any]:
        """rs-jwt's registered public key (the JWK at :attr:`rs_jwt_key_path` without ``d``)."""
        key = ECKey.import_key(json.loads(self.rs_jwt_key_path.read_text()))
        return dict(key.as_dict(private=False))

    @property
    def rs_mtls_cert(self) -> Issued:
        """rs-mtls's client certificate (subject ``CN=rs-mtls``, from ``ca``), for ``tls_client_auth``."""
        if self._rs_mtls_cert is None:
            raise RuntimeError("the provider has not been started")
        return self._rs_mtls_cert

    @property
    def kid(self) -> str:
        """The ``kid`` of the key that signs new tokens (the first in the key file)."""
        return str(self.private_jwks()["keys"][0]["kid"])

    def jwks(self) -> dict[str, Any]:
        """The public JWKS the provider serves now."""
        return dict(self._get("/jwks").json())

    def discovery(self) -> dict[str, Any]:
        return dict(self._get("/.well-known/openid-configuration").json())

    # ----- stats -----------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Requests received since start or reset: ``tokens``, ``introspections``, ``revocations``, ``jwks``."""
        return dict(self._get("/__stats").json())

    def reset_stats(self) -> None:
        self._post("/__stats/reset").raise_for_status()

    # ----- OAuth -----------------------------------------------------------

    def token_response(
        self,
        client: str = "bound",
        cert: Issued | None = None,
        resource: str | None = API_RESOURCE,
        scope: str | None = None,
        dpop: str | None = None,
    ) -> requests.Response:
        """The raw client_credentials response; ``cert`` is presented over mutual TLS.

        A bound client defaults to the certificate it was registered with;
        pass ``resource=None`` to let the provider default it (to ``https://api.test``).
        """
        if cert is None and client in self.bound:
            cert = self.bound[client]
        data = {"grant_type": "client_credentials"}
        if resource is not None:
            data["resource"] = resource
        if scope is not None:
            data["scope"] = scope
        auth = None
        if client in SECRETS:
            auth = (client, SECRETS[client])
        else:
            data["client_id"] = client
        headers = {"DPoP": dpop} if dpop else {}
        return self._post("/token", data=data, auth=auth, cert=cert, headers=headers)

    def token(
        self,
        client: str = "bound",
        cert: Issued | None = None,
        resource: str | None = API_RESOURCE,
        scope: str | None = None,
        dpop: str | None = None,
    ) -> str:
        """A new access token from a real client_credentials request."""
        response = self.token_response(client, cert, resource, scope, dpop)
        if response.status_code != 200:
            raise AssertionError(f"token request for {client} failed: {response.status_code} {response.text}")
        return str(response.json()["access_token"])

    def introspect(self, token: str, client: str = "rs-client") -> dict[str, Any]:
        """RFC 7662 introspection of a JWT or opaque token, as ``client``."""
        response = self._post("/token/introspection", data={"token": token}, auth=(client, SECRETS[client]))
        response.raise_for_status()
        return dict(response.json())

    def revoke(self, token: str, client: str = "rs-client") -> None:
        """RFC 7009 revocation; a revoked token (JWT or opaque) introspects as inactive."""
        response = self._post("/token/revocation", data={"token": token}, auth=(client, SECRETS[client]))
        response.raise_for_status()

    # ----- the browser login: authorization code + PKCE -----------------------

    def set_redirect_uris(self, redirect_uris: Sequence[str], client: str = WEB_CLIENT) -> None:
        """Make ``redirect_uris`` the only redirect URIs of web-client, at once and for later restarts.

        A running provider takes them without a restart (tokens and login
        sessions survive); URIs it would refuse at registration raise
        :class:`ValueError`. With none, no redirect URI is accepted.
        """
        uris = list(redirect_uris)
        if self.running:
            response = self._http.put(
                f"{self.issuer}/__clients/{client}/redirect_uris", json=uris, verify=self.ca_file, timeout=10
            )
            if response.status_code != 200:
                raise ValueError(f"redirect URIs {uris} refused: {response.status_code} {response.text}")
        if client == WEB_CLIENT:
            self.redirect_uris = uris
        else:
            for spec in self.extra_clients:
                if spec.get("client_id") == client:
                    spec["redirect_uris"] = uris

    def authorization_request(
        self,
        redirect_uri: str,
        *,
        scope: str = LOGIN_SCOPE,
        client: str = WEB_CLIENT,
        pkce: bool = True,
        **params: str,
    ) -> AuthorizationRequest:
        """A code flow request with fresh ``state``, ``nonce`` and (unless ``pkce=False``) S256 PKCE.

        ``params`` are added to the query (``prompt``, ``resource``, ``login_hint``...;
        ``state=``/``nonce=`` override the fresh ones).
        """
        state = params.pop("state", None) or secrets.token_urlsafe(16)
        nonce = params.pop("nonce", None) or secrets.token_urlsafe(16)
        query = {
            "client_id": client,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": state,
            "nonce": nonce,
        }
        verifier = None
        if pkce:
            verifier, challenge = pkce_pair()
            query.update(code_challenge=challenge, code_challenge_method="S256")
        query.update(params)
        return AuthorizationRequest(
            f"{self.authorization_endpoint}?{urlencode(query)}", redirect_uri, state, nonce, verifier
        )

    def code_token_response(
        self,
        code: str,
        redirect_uri: str,
        code_verifier: str | None,
        client: str = WEB_CLIENT,
        **data: str,
    ) -> requests.Response:
        """The raw token response for an authorization code (client_secret_basic)."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, **data}
        if code_verifier is not None:
            form["code_verifier"] = code_verifier
        return self._post("/token", data=form, auth=(client, SECRETS[client]))

    # ----- HTTP ------------------------------------------------------------

    def _get(self, path: str) -> requests.Response:
        return self._http.get(self.issuer + path, verify=self.ca_file, timeout=10)

    def _post(self, path: str, *, cert: Issued | None = None, **kwargs: Any) -> requests.Response:
        return self._http.post(
            self.issuer + path, verify=self.ca_file, cert=cert.pair if cert else None, timeout=10, **kwargs
        )
