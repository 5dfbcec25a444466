"""The issuer's metadata and signing keys (OpenID Connect Discovery, RFC 8414, RFC 7517).

Keys are fetched lazily and cached. A token signed with an unknown ``kid``
triggers a refetch, at most once per ``rediscovery_lifetime``, so that key
rotation at the issuer needs no restart. Only one thread per process fetches;
the others wait for its result instead of fetching too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from . import http
from .jose import PRIVATE_MEMBERS, JWKError, PublicKey, public_key
from .settings import ASYMMETRIC_ALGS, Settings

__all__ = ["Discovery", "DiscoveryError", "UnknownKey", "PublicKey"]

log = logging.getLogger("certbound_wsgi")

# A JWKS or metadata document larger than this is not a real one.
MAX_DOCUMENT = 512 * 1024
# How soon a failed fetch may be retried, whatever rediscovery_lifetime says.
RETRY_AFTER_FAILURE = 2.0


class DiscoveryError(Exception):
    """The issuer's metadata or keys could not be fetched or made sense of."""


class Unreachable(DiscoveryError):
    """The issuer did not answer at all (connection refused, timeout, TLS failure)."""


class UnknownKey(Exception):
    """The keys were fetched, recently and successfully, and none has this ``kid``."""


class Discovery:
    """Issuer metadata and JWKS for one issuer, cached per process.

    :param settings: supplies ``issuer``, ``ssl_verify``, ``ca_file``, ``http_timeout``,
        ``rediscovery_lifetime`` and ``token_signing_algs``.
    :param session: a :class:`requests.Session` to reuse (one is made otherwise).
    :param clock: monotonic seconds; injectable for tests.
    """

    def __init__(
        self,
        settings: Settings,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._http = http.JSONClient(verify=settings.tls_verify, timeout=settings.http_timeout,
                                     max_body=MAX_DOCUMENT, session=session)
        self._clock = clock
        self._lock = threading.Lock()
        self._inflight: threading.Event | None = None
        self._metadata: dict[str, Any] | None = None
        self._keys: dict[str | None, list[PublicKey]] = {}
        self._algs: frozenset[str] = frozenset()
        self._next_fetch = 0.0
        self._next_discovery = 0.0
        self._last_ok = False

    # -- the request path ----------------------------------------------------

    @property
    def algorithms(self) -> frozenset[str]:
        """Algorithms accepted now: configured, asymmetric and advertised by the issuer."""
        return self._algs

    def keys_for(self, kid: str | None) -> list[PublicKey]:
        """The issuer's keys with this ``kid``, fetching the JWKS when it is unknown.

        :raises UnknownKey: the JWKS is fresh and has no such key.
        :raises DiscoveryError: the JWKS could not be fetched and no such key is cached.
        """
        keys = self._keys.get(kid)
        if keys:
            return keys
        self.refresh()
        keys = self._keys.get(kid)
        if keys:
            return keys
        if not self._last_ok:
            raise DiscoveryError("the issuer's keys cannot be fetched")
        raise UnknownKey(kid)

    def metadata(self, needs: str | None = None) -> dict[str, Any]:
        """The issuer's metadata, discovered on first use.

        :param needs: a member the caller needs; when the cached document lacks it, the
            issuer is asked again (at most once per ``rediscovery_lifetime``), so that a
            document fixed at the issuer is picked up without a restart.
        :raises DiscoveryError: it cannot be fetched now.
        """
        metadata = self._metadata
        lacking = needs is not None and metadata is not None and not isinstance(metadata.get(needs), str)
        if metadata is None or (lacking and self._clock() >= self._next_discovery):
            self._next_discovery = self._clock() + min(self._settings.rediscovery_lifetime, RETRY_AFTER_FAILURE)
            metadata = self._discover()
            with self._lock:
                self._metadata = metadata
        return metadata

    def retry_after(self) -> int:
        """Seconds until the next fetch may be tried, for a ``Retry-After`` header."""
        return max(1, int(self._next_fetch - self._clock() + 0.999))

    def refresh(self, force: bool = False) -> None:
        """Fetch metadata and keys, unless fetched too recently. Never holds a lock while fetching."""
        with self._lock:
            if not force and self._clock() < self._next_fetch:
                return
            waiting = self._inflight
            if waiting is None:
                done = self._inflight = threading.Event()
        if waiting is not None:
            waiting.wait(2 * self._settings.http_timeout + 1)
            return
        ok = False
        try:
            self._fetch()
            ok = True
        except DiscoveryError as exc:
            log.warning("certbound: cannot refresh keys of %s: %s", self._settings.issuer, exc)
        finally:
            with self._lock:
                self._last_ok = ok
                lifetime = self._settings.rediscovery_lifetime
                # After a failure retry sooner, but never hammer an issuer that is down.
                delay = lifetime if ok else min(RETRY_AFTER_FAILURE, lifetime or RETRY_AFTER_FAILURE)
                self._next_fetch = self._clock() + delay
                self._inflight = None
            done.set()

    def check(self) -> tuple[dict[str, Any], list[str]]:
        """Fetch everything now (for ``check-config``); return the metadata and the key ids."""
        metadata = self._fetch()
        return metadata, sorted(str(kid) for kid in self._keys)

    # -- fetching ------------------------------------------------------------

    def _get_json(self, url: str) -> dict[str, Any]:
        try:
            answer = self._http.get(url)
        except http.Unreachable as exc:
            raise Unreachable(f"{url}: {exc}") from None
        except http.TooLarge:
            raise DiscoveryError(f"{url}: document too large") from None
        if answer.status != 200:
            raise DiscoveryError(f"{url} answered {answer.status}")
        if answer.document is None:
            raise DiscoveryError(f"{url}: {answer.problem}")
        return answer.document

    def _discover(self) -> dict[str, Any]:
        issuer = self._settings.issuer.rstrip("/")
        errors = []
        # OpenID Connect Discovery 1.0 section 4, then RFC 8414 section 3.
        for path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
            try:
                metadata = self._get_json(issuer + path)
            except Unreachable:
                raise  # the other well-known path is on the same host: don't wait twice
            except DiscoveryError as exc:
                errors.append(str(exc))
                continue
            # RFC 8414 section 3.3: the issuer value MUST be identical to the one configured.
            if metadata.get("issuer") != self._settings.issuer:
                raise DiscoveryError(f"metadata names issuer {metadata.get('issuer')!r}, not the configured one")
            if not isinstance(metadata.get("jwks_uri"), str):
                raise DiscoveryError("metadata has no jwks_uri")
            return metadata
        raise DiscoveryError("; ".join(errors))

    def _fetch(self) -> dict[str, Any]:
        # Rediscover on every refresh (itself rate-limited): a document fixed at the issuer,
        # such as a corrected jwks_uri, is picked up without a restart.
        try:
            metadata = self._discover()
        except Unreachable:
            raise  # the JWKS is on the same issuer: don't wait twice
        except DiscoveryError:
            if self._metadata is None:
                raise
            metadata = self._metadata
        parsed, key_algs = _parse_jwks(self._get_json(metadata["jwks_uri"]))
        advertised = {
            alg
            for name, values in metadata.items()
            if name.endswith("_signing_alg_values_supported") and isinstance(values, list)
            for alg in values
            if isinstance(alg, str)
        } | key_algs
        algs = frozenset(self._settings.token_signing_algs) & frozenset(ASYMMETRIC_ALGS)
        if advertised & algs:
            algs &= advertised
        with self._lock:
            self._metadata = metadata
            self._keys = parsed
            self._algs = algs
        return metadata


def _parse_jwks(jwks: dict[str, Any]) -> tuple[dict[str | None, list[PublicKey]], set[str]]:
    """The usable keys of a JWKS (RFC 7517 section 5) by ``kid``, and the ``alg`` values they name."""
    keys = jwks.get("keys")
    if not isinstance(keys, list):
        raise DiscoveryError("the JWKS has no keys list")
    parsed: dict[str | None, list[PublicKey]] = {}
    key_algs: set[str] = set()
    for item in keys[:100]:
        key = _import_public(item)
        if key is not None:
            kid = item.get("kid") if isinstance(item.get("kid"), str) else None
            parsed.setdefault(kid, []).append(key)
            if isinstance(item.get("alg"), str):
                key_algs.add(item["alg"])
    if not parsed:
        raise DiscoveryError("the JWKS holds no usable public signing key")
    return parsed, key_algs


def _import_public(item: object) -> PublicKey | None:
    """A JWKS member as a public signing key (RFC 7517 section 4.2), or ``None`` for anything else.

    Private members are dropped rather than refused: the issuer's mistake must not stop every token.
    """
    if not isinstance(item, dict) or item.get("use", "sig") != "sig":
        return None
    try:
        return public_key({k: v for k, v in item.items() if k not in PRIVATE_MEMBERS})
    except JWKError:
        return None
