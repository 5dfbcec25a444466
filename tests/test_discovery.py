"""certbound_wsgi.discovery: issuer metadata and JWKS, cached and refetched at a bounded rate."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from joserfc.jwk import ECKey, OctKey, RSAKey

from certbound_wsgi.discovery import RETRY_AFTER_FAILURE, DiscoveryError, UnknownKey
from certbound_wsgi.settings import ASYMMETRIC_ALGS
from tests.conftest import make_settings
from tests.support.tokens import ISSUER, StaticDiscovery, TestIssuer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> Clock:
    return Clock()


def discovery(issuer: TestIssuer, clock: Clock, **overrides: Any) -> StaticDiscovery:
    return StaticDiscovery(make_settings(**overrides), issuer, clock=clock)


def test_nothing_is_fetched_until_needed(issuer: TestIssuer, clock: Clock) -> None:
    d = discovery(issuer, clock)
    assert d.fetches == 0
    assert d.algorithms == frozenset()
    assert len(d.keys_for("k1")) == 1
    assert d.fetches == 1
    assert d.algorithms == {"ES256", "RS256"}


def test_known_kid_is_served_from_the_cache(issuer: TestIssuer, clock: Clock) -> None:
    d = discovery(issuer, clock)
    first = d.keys_for("k1")
    clock.now += 10_000
    assert d.keys_for("k1") == first
    assert d.fetches == 1


@pytest.mark.parametrize(
    ("lifetime", "advance", "refetched"),
    [
        pytest.param(30, 0, False, id="immediately"),
        pytest.param(30, 29.9, False, id="just-before-lifetime"),
        pytest.param(30, 30, True, id="at-lifetime"),
        pytest.param(30, 31, True, id="after-lifetime"),
        pytest.param(300, 100, False, id="longer-lifetime"),
        pytest.param(0, 0, True, id="lifetime-zero-always-refetches"),
    ],
)
def test_unknown_kid_refetches_at_most_once_per_lifetime(
    lifetime: int, advance: float, refetched: bool, issuer: TestIssuer, clock: Clock
) -> None:
    d = discovery(issuer, clock, rediscovery_lifetime=lifetime)
    d.keys_for("k1")
    with pytest.raises(UnknownKey):
        d.keys_for("unknown")
    fetches = d.fetches
    assert fetches == (1 if lifetime else 2)
    clock.now += advance
    with pytest.raises(UnknownKey):
        d.keys_for("unknown")
    assert d.fetches == fetches + (1 if refetched else 0)


def test_first_lookup_of_unknown_kid_fetches_once(issuer: TestIssuer, clock: Clock) -> None:
    d = discovery(issuer, clock)
    with pytest.raises(UnknownKey):
        d.keys_for("unknown")
    assert d.fetches == 1


def test_key_rotation_is_picked_up_at_once(issuer: TestIssuer, clock: Clock) -> None:
    # Issue 14: the new kid was refused (401) for up to rediscovery_lifetime after a rotation.
    d = discovery(issuer, clock, rediscovery_lifetime=30)
    d.keys_for("k1")
    issuer.rotate("k2")
    clock.now += 5
    assert d.keys_for("k2")[0].as_dict() == issuer.key.as_dict(private=False) | {"kid": "k2"}
    assert d.fetches == 2
    # The old kid is gone: the issuer was asked after it was last trusted.
    with pytest.raises(UnknownKey):
        d.keys_for("k1")
    assert d.fetches == 2


def test_metadata_is_fetched_once(issuer: TestIssuer, clock: Clock) -> None:
    d = discovery(issuer, clock, rediscovery_lifetime=0)
    d.keys_for("k1")
    issuer.metadata = {"issuer": "https://changed.test", "jwks_uri": ISSUER + "/jwks"}
    with pytest.raises(UnknownKey):
        d.keys_for("other")
    assert d.fetches == 2


# -- the issuer down -----------------------------------------------------------------------------------------------


def test_issuer_down_and_no_keys(issuer: TestIssuer, clock: Clock) -> None:
    issuer.down = True
    d = discovery(issuer, clock)
    with pytest.raises(DiscoveryError):
        d.keys_for("k1")
    assert d.retry_after() == RETRY_AFTER_FAILURE
    assert d.fetches == 0


def test_issuer_down_with_cached_keys_still_works(issuer: TestIssuer, clock: Clock) -> None:
    d = discovery(issuer, clock)
    keys = d.keys_for("k1")
    issuer.down = True
    clock.now += 3600
    assert d.keys_for("k1") == keys
    d.refresh(force=True)
    assert d.keys_for("k1") == keys
    assert d.algorithms == {"ES256", "RS256"}
    # An unknown kid now cannot be told apart from a rotation we could not fetch: unavailable, not invalid.
    with pytest.raises(DiscoveryError):
        d.keys_for("k2")


@pytest.mark.parametrize(
    ("advance", "recovered"),
    [
        pytest.param(1.0, False, id="within-retry-delay"),
        pytest.param(RETRY_AFTER_FAILURE, True, id="after-retry-delay"),
    ],
)
def test_failed_fetch_is_retried_soon(advance: float, recovered: bool, issuer: TestIssuer, clock: Clock) -> None:
    issuer.down = True
    d = discovery(issuer, clock, rediscovery_lifetime=300)
    with pytest.raises(DiscoveryError):
        d.keys_for("k1")
    issuer.down = False
    clock.now += advance
    if recovered:
        assert len(d.keys_for("k1")) == 1
    else:
        with pytest.raises(DiscoveryError):
            d.keys_for("k1")


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        pytest.param({"issuer": ISSUER + "/", "jwks_uri": ISSUER + "/jwks"}, "not the configured one",
                     id="issuer-trailing-slash"),
        pytest.param({"issuer": "https://evil.test", "jwks_uri": ISSUER + "/jwks"}, "not the configured one",
                     id="other-issuer"),
        pytest.param({"jwks_uri": ISSUER + "/jwks"}, "not the configured one", id="no-issuer"),
        pytest.param({"issuer": ISSUER}, "no jwks_uri", id="no-jwks-uri"),
        pytest.param({"issuer": ISSUER, "jwks_uri": ["x"]}, "no jwks_uri", id="jwks-uri-not-a-string"),
    ],
)
def test_bad_metadata_is_refused(metadata: dict[str, Any], message: str, issuer: TestIssuer, clock: Clock) -> None:
    issuer.metadata = metadata
    d = discovery(issuer, clock)
    with pytest.raises(DiscoveryError, match=message):
        d.check()
    with pytest.raises(DiscoveryError):
        d.keys_for("k1")
    assert d.fetches == 0


# -- which keys are imported ----------------------------------------------------------------------------------------

_EC = ECKey.generate_key("P-256", parameters={"kid": "ec", "alg": "ES256"}, private=True)
_RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa", "alg": "RS256"}, private=True)
_OCT = OctKey.generate_key(256, parameters={"kid": "oct"})


@pytest.mark.parametrize(
    ("keys", "usable"),
    [
        pytest.param([_EC.as_dict(private=False)], {"ec"}, id="ec-public"),
        pytest.param([_EC.as_dict(private=True)], {"ec"}, id="ec-private-parts-dropped"),
        pytest.param([_RSA.as_dict(private=True)], {"rsa"}, id="rsa-private-parts-dropped"),
        pytest.param([_OCT.as_dict(), _EC.as_dict(private=False)], {"ec"}, id="oct-ignored"),
        pytest.param([{**_OCT.as_dict(), "kty": "EC"}, _EC.as_dict(private=False)], {"ec"},
                     id="oct-disguised-as-ec-ignored"),
        pytest.param([{**_EC.as_dict(private=False), "use": "enc"}, _RSA.as_dict(private=False)], {"rsa"},
                     id="encryption-key-ignored"),
        pytest.param([{**_EC.as_dict(private=False), "kty": "XYZ"}, _RSA.as_dict(private=False)], {"rsa"},
                     id="unknown-kty-ignored"),
        pytest.param([{k: v for k, v in _EC.as_dict(private=False).items() if k != "x"}, _RSA.as_dict(private=False)],
                     {"rsa"}, id="incomplete-key-ignored"),
        pytest.param(["not a key", 5, None, _RSA.as_dict(private=False)], {"rsa"}, id="non-objects-ignored"),
        pytest.param([{**_EC.as_dict(private=False), "kid": 5}, _RSA.as_dict(private=False)], {"rsa"},
                     id="non-string-kid-ignored"),
        pytest.param([{k: v for k, v in _EC.as_dict(private=False).items() if k != "kid"}], {None},
                     id="key-without-kid"),
    ],
)
def test_only_public_asymmetric_signing_keys_are_imported(
    keys: list[Any], usable: set[str | None], issuer: TestIssuer, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(issuer, "jwks", lambda: {"keys": keys})
    d = discovery(issuer, clock)
    for kid in usable:
        found = d.keys_for(kid)
        assert len(found) == 1
        assert not found[0].is_private
        assert "d" not in found[0].as_dict()
    for kid in {"ec", "rsa", "oct", None} - usable:
        with pytest.raises(UnknownKey):
            d.keys_for(kid)


@pytest.mark.parametrize(
    "jwks",
    [
        pytest.param({"keys": [_OCT.as_dict()]}, id="only-oct"),
        pytest.param({"keys": []}, id="empty"),
        pytest.param({"keys": {"k": 1}}, id="keys-not-a-list"),
        pytest.param({}, id="no-keys"),
    ],
)
def test_jwks_without_usable_keys(
    jwks: dict[str, Any], issuer: TestIssuer, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(issuer, "jwks", lambda: jwks)
    d = discovery(issuer, clock)
    with pytest.raises(DiscoveryError):
        d.check()
    with pytest.raises(DiscoveryError):
        d.keys_for("oct")


@pytest.mark.parametrize(
    ("configured", "metadata_algs", "key_alg", "expected"),
    [
        pytest.param(ASYMMETRIC_ALGS, ["ES256", "RS256"], "ES256", {"ES256", "RS256"}, id="intersection"),
        pytest.param(("ES256",), ["ES256", "RS256"], "ES256", {"ES256"}, id="configured-narrower"),
        pytest.param(ASYMMETRIC_ALGS, [], "PS256", {"PS256"}, id="advertised-by-key-alg"),
        pytest.param(ASYMMETRIC_ALGS, ["ES256", "HS256", "none"], None, {"ES256"}, id="hs256-and-none-never"),
        pytest.param(ASYMMETRIC_ALGS, [], None, set(ASYMMETRIC_ALGS), id="nothing-advertised-keeps-configured"),
        pytest.param(("PS256",), ["ES256"], None, {"PS256"}, id="no-overlap-keeps-configured"),
        pytest.param(ASYMMETRIC_ALGS, [5, None, "ES384"], None, {"ES384"}, id="non-string-entries-ignored"),
    ],
)
def test_algorithms_are_configured_and_advertised(
    configured: tuple[str, ...],
    metadata_algs: list[Any],
    key_alg: str | None,
    expected: set[str],
    issuer: TestIssuer,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    issuer.metadata = {"issuer": ISSUER, "jwks_uri": ISSUER + "/jwks",
                       "token_endpoint_auth_signing_alg_values_supported": metadata_algs}
    jwk = issuer.key.as_dict(private=False)
    jwk.pop("alg", None)
    if key_alg:
        jwk["alg"] = key_alg
    monkeypatch.setattr(issuer, "jwks", lambda: {"keys": [jwk]})
    d = discovery(issuer, clock, token_signing_algs=configured)
    d.keys_for("k1")
    assert d.algorithms == expected


def test_check_returns_metadata_and_key_ids(issuer: TestIssuer, clock: Clock) -> None:
    metadata, kids = discovery(issuer, clock).check()
    assert metadata["issuer"] == ISSUER
    assert kids == ["k1"]


# -- concurrency ----------------------------------------------------------------------------------------------------


class SlowDiscovery(StaticDiscovery):
    """Holds every JWKS fetch long enough for the other threads to pile up behind it."""

    def _get_json(self, url: str) -> dict[str, Any]:
        if url.endswith("/jwks"):
            time.sleep(0.2)
        return super()._get_json(url)


def test_concurrent_refreshes_fetch_once(issuer: TestIssuer) -> None:
    d = SlowDiscovery(make_settings(), issuer)
    barrier = threading.Barrier(8)
    results: list[Any] = []
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(d.keys_for("k1"))
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert len(results) == 8
    assert all(len(keys) == 1 for keys in results)
    assert d.fetches == 1
