"""The issuer's metadata and signing keys (OpenID Connect Discovery, RFC 8414, RFC 7517), shared and refreshed.

The keys are a managed resource, not a per-worker guess:

* fetched when the worker starts (:meth:`Discovery.start`); an issuer that is down then is not fatal;
* refreshed when due, lazily, on the request path (:meth:`Discovery.refresh_if_due`): every
  ``rediscovery_lifetime`` seconds, sooner when the JWKS's ``Cache-Control: max-age`` says so. A key
  removed at the issuer is therefore distrusted by every worker at its first request after one period;
* an unknown ``kid`` triggers one immediate refresh (at most one per :data:`UNKNOWN_KID_COOLDOWN`);
  the token is refused (401) only once the issuer has been asked since the ``kid`` was first seen,
  and while the issuer cannot be asked the answer is "unavailable" (503), never "invalid";
* with Redis, one worker fetches while the others wait for its answer there, and a sealed
  last-known-good copy lets a restarted worker serve while the issuer is down, up to
  ``discovery_max_staleness``; past that the keys are not used at all (503).

No thread runs in the background: nothing here can be broken by a fork (gunicorn ``--preload``).
The HTTP session is remade in a forked child, and no lock is held while fetching.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from . import http, metrics
from .jose import PRIVATE_MEMBERS, JWKError, PublicKey, public_key
from .settings import ASYMMETRIC_ALGS, Settings
from .shared_keys import SharedKeys, Snapshot
from .workers import threads_run

__all__ = ["Discovery", "DiscoveryError", "UnknownKey", "PublicKey"]

log = logging.getLogger("certbound_wsgi")

# A JWKS or metadata document larger than this is not a real one.
MAX_DOCUMENT = 512 * 1024
# How soon a failed fetch may be retried, whatever rediscovery_lifetime says.
RETRY_AFTER_FAILURE = 2.0
#: Seconds between two refreshes triggered by unknown ``kid`` values: a flood of made-up ones
#: costs the issuer one request per this, per worker (per deployment, with Redis).
UNKNOWN_KID_COOLDOWN = 1.0
#: The shortest refresh period a JWKS's ``max-age`` may ask for (``rediscovery_lifetime`` may be shorter).
MIN_PERIOD = 1.0
#: How often a worker waiting for another worker's fetch looks in Redis.
POLL_SECONDS = 0.02
#: Unknown ``kid`` values remembered (with when each was first seen); an attacker can fill it, no more.
MAX_UNKNOWN_KIDS = 1024
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-cache|no-store)\b", re.IGNORECASE)


class DiscoveryError(Exception):
    """The issuer's metadata or keys could not be fetched or made sense of."""


class Unreachable(DiscoveryError):
    """The issuer did not answer at all (connection refused, timeout, TLS failure)."""


class UnknownKey(Exception):
    """The issuer was asked after this ``kid`` was first seen, and has no such key."""


class Discovery:
    """Issuer metadata and JWKS for one issuer, cached per process and, with Redis, shared.

    :param settings: supplies ``issuer``, ``ssl_verify``, ``ca_file``, ``http_timeout``, ``rediscovery_lifetime``,
        ``discovery_max_staleness`` and ``token_signing_algs``.
    :param session: a :class:`requests.Session` to reuse (one is made otherwise, and remade after a fork).
    :param clock: wall-clock seconds, shared with other workers through the Redis copy; injectable for tests.
    :param shared: the copy in Redis, or ``None`` for a per-process cache only.
    :param issuer_url: the issuer, when not ``settings.issuer`` (one of ``issuers_allowed``).
    :param background: refresh a due period in a thread of its own (``None``: whenever threads run
        here, i.e. not under uWSGI without ``--enable-threads``); ``False``: in the request's thread.
    """

    def __init__(
        self,
        settings: Settings,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        *,
        shared: SharedKeys | None = None,
        issuer_url: str | None = None,
        background: bool | None = None,
    ) -> None:
        self._settings = settings
        self._issuer = issuer_url or settings.issuer
        self._session = session
        self._http = self._client()
        self._pid = os.getpid()
        self._clock = clock
        self._shared = shared
        self._lifetime = float(settings.rediscovery_lifetime)
        self._max_staleness = float(settings.discovery_max_staleness)
        self._lock = threading.Lock()
        self._inflight: threading.Event | None = None
        # A due refresh runs in a thread of its own, so that no request waits on the issuer
        # (see _revalidate); under uWSGI without threads it cannot, and runs inline instead.
        self._threads = threads_run() if background is None else background
        self._revalidating = 0  # the pid whose refresh thread is running; 0 for none
        self._metadata: dict[str, Any] | None = None
        self._keys: dict[str | None, list[PublicKey]] = {}
        self._algs: frozenset[str] = frozenset()
        self._fetched_at: float | None = None  # when the issuer was asked for the keys held now
        self._stale_at = -math.inf  # when they become too old to use
        self._next_fetch = 0.0  # when keys_for refreshes before answering (0 with rediscovery_lifetime=0)
        self._next_periodic = 0.0  # when refresh_if_due refreshes: never sooner than MIN_PERIOD
        self._next_discovery = 0.0
        self._last_attempt = -math.inf
        self._last_kid_refresh = -math.inf
        self._last_ok = False
        self._period = self._lifetime
        self._seen: dict[str, float] = {}  # when each kid was first fetched
        self._last_max_age: float | None = None
        self._unknown: dict[str | None, float] = {}
        self._stale = False
        #: Changes whenever a key that was trusted no longer is (withdrawn by the issuer, or too
        #: stale): whoever remembers what a key verified must forget it then.
        self.generation = 0

    # -- the request path ----------------------------------------------------

    @property
    def algorithms(self) -> frozenset[str]:
        """Algorithms accepted now: configured, asymmetric and advertised by the issuer."""
        return self._algs

    def start(self) -> None:
        """Fetch the keys (or adopt the shared copy) as a worker starts; failing is not fatal."""
        self.refresh()

    def refresh_if_due(self) -> int:
        """Refresh when the period is over (I/O only then), and return :attr:`generation`.

        Cheap otherwise: one clock read and three comparisons. A thread that finds another one
        already fetching carries on with the keys held now rather than waiting.
        """
        now = self._clock()
        if self._last_attempt <= now < self._next_periodic and now <= self._stale_at:
            return self.generation
        if now >= self._next_periodic or now < self._last_attempt:  # a clock set back is "due" too
            self._revalidate()
        if not self._stale and self._too_stale(now):
            with self._lock:
                if not self._stale:
                    self._stale = True
                    self.generation += 1
                    log.warning("certbound: the keys of %s are older than discovery_max_staleness; "
                                "refusing their tokens until the issuer can be reached", self._issuer)
        return self.generation

    def _revalidate(self) -> None:
        """Start a due refresh without holding up the request that noticed it.

        The keys held now keep serving meanwhile (RFC 5861's stale-while-revalidate), never past
        ``discovery_max_staleness``: an issuer that hangs costs no request its timeout.
        """
        if not self._threads:
            self.refresh(wait=False)
            return
        pid = os.getpid()
        with self._lock:
            # A pid, not a flag: after a fork the child has no thread, whatever the parent had.
            if self._revalidating == pid:
                return
            self._revalidating = pid
        threading.Thread(target=self._revalidate_now, name="certbound-keys-refresh", daemon=True).start()

    def _revalidate_now(self) -> None:
        try:
            self.refresh(wait=False)
        finally:
            with self._lock:
                self._revalidating = 0

    def keys_for(self, kid: str | None) -> list[PublicKey]:
        """The issuer's keys with this ``kid``, refreshing them when it is unknown.

        :raises UnknownKey: the issuer was asked after this ``kid`` was first seen, and has no such key.
        :raises DiscoveryError: the keys cannot be had now (the issuer is down, they are too stale,
            or an unknown ``kid`` cannot be asked about yet).
        """
        now = self._clock()
        keys = self._keys.get(kid)
        if keys and now <= self._stale_at:  # not too stale (-inf before the first fetch)
            return keys
        if keys is None:
            self._first_seen(kid, now)
        self._ask_if_due(kid, keys is None, now)
        now = self._clock()
        if self._too_stale(now):
            raise DiscoveryError("the issuer's keys cannot be fetched and the last copy is too old")
        keys = self._keys.get(kid)
        if keys:
            return keys
        if self._last_ok and self._asked_about(kid):
            raise UnknownKey(kid)
        raise DiscoveryError("the issuer's keys cannot be fetched")

    def _ask_if_due(self, kid: str | None, unknown: bool, now: float) -> None:
        """Refresh for :meth:`keys_for` when the period is over, or once per cooldown for an unknown ``kid``."""
        refreshed = True
        if now >= self._next_fetch:
            self.refresh()
        elif unknown and self._last_ok and not self._asked_about(kid) \
                and now >= self._last_kid_refresh + UNKNOWN_KID_COOLDOWN:
            # A kid the issuer has not been asked about since it appeared: perhaps a rotation.
            self._last_kid_refresh = now
            self.refresh(force=True, kid=kid)
        else:
            refreshed = False
        if refreshed and unknown and kid not in self._keys and self._last_ok and not self._asked_about(kid):
            # That refresh was one already under way (a periodic one, in its own thread) that began
            # before this kid appeared: it cannot say whether the issuer knows the kid. Ask once more.
            self.refresh(force=True, kid=kid)

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
        # After a failure, the next attempt; otherwise the end of the unknown-kid cooldown.
        until = self._last_kid_refresh + UNKNOWN_KID_COOLDOWN if self._last_ok else self._next_fetch
        wait = until - self._clock()
        # Before any unknown-kid refresh the cooldown started at -inf: nothing to wait for.
        return max(1, math.ceil(wait)) if math.isfinite(wait) else 1

    def refresh(self, force: bool = False, *, wait: bool = True, kid: str | None = None) -> None:
        """Fetch metadata and keys, unless fetched too recently. Never holds a lock while fetching.

        :param force: fetch even if the period is not over (an unknown ``kid``).
        :param wait: when another thread is fetching, wait for its result (else return at once).
        :param kid: the unknown ``kid`` that forces it: a shared copy that has it will do.
        """
        now = self._clock()
        with self._lock:
            if not force and self._last_attempt <= now < self._next_fetch:
                return
            waiting = self._inflight
            if waiting is None:
                done = self._inflight = threading.Event()
                self._last_attempt = now
        if waiting is not None:
            if wait:
                waiting.wait(2 * self._settings.http_timeout + 1)
            return
        ok = False
        try:
            self._refresh(now, force, kid)
            ok = True
        except DiscoveryError as exc:
            log.warning("certbound: cannot refresh keys of %s: %s", self._issuer, exc)
        finally:
            with self._lock:
                self._last_ok = ok
                if not ok:
                    # Retry sooner than a period, but never hammer an issuer that is down.
                    self._next_fetch = now + min(RETRY_AFTER_FAILURE, self._lifetime or RETRY_AFTER_FAILURE)
                    self._next_periodic = self._next_fetch
                self._inflight = None
            done.set()

    def keys_loaded(self) -> bool:
        """Whether signing keys are in memory (for readiness); no I/O."""
        return bool(self._keys)

    def reachable(self) -> bool:
        """Whether the issuer answered the latest fetch; fetches when one is due, as rate-limited as :meth:`refresh`."""
        self.refresh()
        return self._last_ok

    def check(self) -> tuple[dict[str, Any], list[str]]:
        """Fetch everything now (for ``check-config``); return the metadata and the key ids.

        With Redis, the shared copy is read first, so that the keys' ages are the ones every worker
        has seen; nothing is written there.
        """
        if self._shared is not None and self._fetched_at is None:
            copy = self._shared.load()
            if copy is not None:
                self._adopt(copy)
        snapshot = self._fetch(self._clock())
        self._adopt(snapshot)
        return snapshot.metadata, sorted(str(kid) for kid in self._keys)

    def report(self) -> dict[str, Any]:
        """What is held now, for ``check-config``: the keys, and ages in seconds (of the copy, and of each
        key since it was first fetched)."""
        now = self._clock()
        fetched_at = self._fetched_at
        return {
            "issuer": self._issuer,
            "jwks_uri": (self._metadata or {}).get("jwks_uri"),
            "kids": sorted(str(kid) for kid in self._keys),
            "key_ages": {str(kid): max(0.0, now - self._seen.get(str(kid), now)) for kid in self._keys},
            "algorithms": sorted(self._algs),
            "age": None if fetched_at is None else max(0.0, now - fetched_at),
            "period": self._period,
        }

    # -- the state -----------------------------------------------------------

    def _too_stale(self, now: float) -> bool:
        return self._fetched_at is None or now - self._fetched_at > self._max_staleness

    def _first_seen(self, kid: str | None, now: float) -> None:
        if kid not in self._unknown:
            if len(self._unknown) >= MAX_UNKNOWN_KIDS:
                self._unknown.pop(next(iter(self._unknown)), None)
            self._unknown[kid] = now

    def _asked_about(self, kid: str | None) -> bool:
        """Whether the keys held now were fetched after ``kid`` was first seen."""
        seen = self._unknown.get(kid)
        return self._fetched_at is not None and (seen is None or self._fetched_at >= seen)

    def _period_of(self, max_age: float | None) -> float:
        # RFC 9111 section 5.2.2.1: a shorter max-age shortens the period, down to MIN_PERIOD.
        if max_age is None:
            return self._lifetime
        return min(self._lifetime, max(max_age, MIN_PERIOD))

    def _refresh(self, now: float, force: bool, kid: str | None) -> None:
        shared = self._shared
        if shared is None:
            self._adopt(self._fetch_counted(now))
            return
        copy = shared.load()
        if copy is not None:  # the keys' ages are the deployment's, not this worker's
            self._seen = {kid: min(seen, self._seen.get(kid, seen)) for kid, seen in copy.first_seen.items()}
        if copy is not None and self._will_do(copy, now, force, kid):
            self._adopt(copy)
            return
        token = shared.lock()
        if token is False:
            awaited = self._await(shared, now if force else -math.inf)
            if isinstance(awaited, Snapshot):
                self._adopt(awaited)
                return
            token = awaited  # the other worker failed (we hold the lock now), or is slow: ask ourselves
        try:
            snapshot = self._fetch_counted(now)
            shared.save(snapshot, self._clock())  # before the lock goes: whoever waits finds it
        except DiscoveryError:
            # The issuer cannot be asked: a copy another worker made is better than none, or than ours.
            if copy is not None and self._newer(copy):
                self._adopt(copy)
            raise
        finally:
            if isinstance(token, str):
                shared.unlock(token)
        self._adopt(snapshot)

    def _will_do(self, copy: Snapshot, now: float, force: bool, kid: str | None) -> bool:
        """Whether another worker's copy is as good as a fetch of ours: newer than what we hold,
        and fresh or, for an unknown kid, having it or fetched since it was asked for."""
        if not self._newer(copy):
            return False
        return (copy.fetched_at >= now or _has_kid(copy, kid)) if force else self._fresh(copy, now)

    def _newer(self, copy: Snapshot) -> bool:
        return self._fetched_at is None or copy.fetched_at > self._fetched_at

    def _fresh(self, copy: Snapshot, now: float) -> bool:
        return copy.fetched_at <= now < copy.fetched_at + self._period_of(copy.max_age)

    def _await(self, shared: SharedKeys, since: float) -> Snapshot | str | None:
        """Another worker is fetching: its copy, once in Redis; the lock, once that worker let it go
        without a copy (its fetch failed); ``None`` after ``http_timeout`` (it is slow, or gone)."""
        deadline = time.monotonic() + self._settings.http_timeout + 0.5
        while time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            copy = shared.load()
            if copy is not None and self._newer(copy) and copy.fetched_at >= since:
                return copy
            token = shared.lock()
            if isinstance(token, str):
                copy = shared.load()  # it may have finished between the two looks
                if copy is not None and self._newer(copy) and copy.fetched_at >= since:
                    shared.unlock(token)
                    return copy
                return token
        return None

    def _adopt(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` the keys held now; a kid that was trusted and is gone bumps :attr:`generation`."""
        keys, algs = self._parse(snapshot.metadata, snapshot.jwks)
        with self._lock:
            withdrawn = any(kid not in keys for kid in self._keys)
            self._metadata = snapshot.metadata
            self._keys = keys
            self._algs = algs
            self._fetched_at = snapshot.fetched_at
            self._stale_at = snapshot.fetched_at + self._max_staleness
            self._period = self._period_of(snapshot.max_age)
            self._seen = {kid: min(seen, self._seen.get(kid, seen)) for kid, seen in snapshot.first_seen.items()}
            self._next_fetch = snapshot.fetched_at + self._period
            self._next_periodic = snapshot.fetched_at + max(self._period, MIN_PERIOD)
            if withdrawn:
                self.generation += 1
            if self._stale and not self._too_stale(self._clock()):
                self._stale = False
            self._unknown = {kid: seen for kid, seen in self._unknown.items() if kid not in keys}

    # -- fetching ------------------------------------------------------------

    def _client(self) -> http.JSONClient:
        return http.JSONClient(verify=self._settings.tls_verify, timeout=self._settings.http_timeout,
                               max_body=MAX_DOCUMENT, session=self._session)

    def _get_json(self, url: str) -> dict[str, Any]:
        if os.getpid() != self._pid:
            # A forked worker (gunicorn --preload) must not share the parent's pooled sockets.
            self._session, self._pid = None, os.getpid()
            self._http = self._client()
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
        self._last_max_age = _max_age(answer.cache_control)
        return answer.document

    def _discover(self) -> dict[str, Any]:
        issuer = self._issuer.rstrip("/")
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
            if metadata.get("issuer") != self._issuer:
                raise DiscoveryError(f"metadata names issuer {metadata.get('issuer')!r}, not the configured one")
            if not isinstance(metadata.get("jwks_uri"), str):
                raise DiscoveryError("metadata has no jwks_uri")
            return metadata
        raise DiscoveryError("; ".join(errors))

    def _fetch_counted(self, now: float) -> Snapshot:
        """:meth:`_fetch`, counted in ``certbound_key_fetches_total``."""
        try:
            snapshot = self._fetch(now)
        except DiscoveryError:
            metrics.key_fetch(False)
            raise
        metrics.key_fetch(True)  # stamped with the wall clock: ``now`` is monotonic
        return snapshot

    def _fetch(self, now: float) -> Snapshot:
        """Ask the issuer: its metadata, then its JWKS, as a :class:`Snapshot` stamped ``now``."""
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
        self._last_max_age = None
        jwks = self._get_json(metadata["jwks_uri"])
        keys, _ = self._parse(metadata, jwks)  # refuse a JWKS without a usable key before anyone adopts it
        seen = {str(kid): self._seen.get(str(kid), now) for kid in keys}
        return Snapshot(metadata, jwks, now, self._last_max_age, seen)

    def _parse(
        self, metadata: dict[str, Any], jwks: dict[str, Any]
    ) -> tuple[dict[str | None, list[PublicKey]], frozenset[str]]:
        """The public signing keys by ``kid``, and the algorithms accepted with them."""
        parsed, key_algs = _parse_jwks(jwks)
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
        return parsed, algs


def _has_kid(copy: Snapshot, kid: str | None) -> bool:
    keys = copy.jwks.get("keys")
    return kid is not None and isinstance(keys, list) and any(isinstance(k, dict) and k.get("kid") == kid for k in keys)


def _max_age(cache_control: str) -> float | None:
    """The JWKS response's freshness lifetime (RFC 9111 section 5.2.2): ``max-age``, 0 for
    ``no-cache``/``no-store``, ``None`` when it says nothing."""
    if _NO_CACHE.search(cache_control):
        return 0.0
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None


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
