"""Several issuers: each JWT access token to the issuer it names, and to that issuer's keys only.

``issuer`` and ``issuers_allowed`` (as in Kong) are the accepted issuers. A token's
``iss`` is read once, unverified, only to pick a route; the route's validator then
verifies the signature against that issuer's own JWKS and checks that ``iss`` is
that issuer. A token that names issuer A but is signed with issuer B's key therefore
finds no key that verifies it (RFC 8725 section 3.8: validate the issuer, and use
only keys that belong to it; RFC 9068 section 4: the ``iss`` claim MUST exactly
match the issuer of the keys used).

Each route also owns the refresh of its keys (:meth:`Discovery.refresh_if_due`): when
a key that was trusted is withdrawn or too stale, the route replaces its validator, so
that no token verified with that key is remembered past the refresh.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from .cache.redis import RedisCache
from .cache.seal import Sealer
from .discovery import Discovery
from .errors import InvalidToken
from .jose import JSONError, segment_object
from .jwt_tokens import MAX_JWT_LENGTH, JWTValidator, looks_like_jwt
from .settings import Settings
from .shared_keys import SharedKeys
from .stats import Stats
from .types import Claims

__all__ = ["IssuerRoute", "IssuerRouter", "build_router", "shared_keys", "unverified_issuer"]


def unverified_issuer(token: str) -> str:
    """The ``iss`` of a compact JWS, NOT verified: it only picks whose keys may verify the token.

    :raises InvalidToken: the token is not a JWT, or names no issuer.
    """
    if len(token) > MAX_JWT_LENGTH or not looks_like_jwt(token):
        raise InvalidToken("the access token is not a JWT")
    try:
        claims = segment_object(token.split(".")[1])
    except JSONError:
        raise InvalidToken("the token's claims are not valid base64url JSON") from None
    issuer = claims.get("iss")
    if not isinstance(issuer, str):
        raise InvalidToken("the token was issued by another issuer")
    return issuer


class IssuerRoute:
    """One issuer's keys and the validator that uses them.

    :param discovery: the issuer's metadata and keys.
    :param make_validator: a new validator over ``discovery`` (with an empty memo).
    """

    def __init__(self, discovery: Discovery, make_validator: Callable[[], JWTValidator]) -> None:
        self.discovery = discovery
        self._make = make_validator
        self.validator = make_validator()
        self._generation = discovery.generation

    @property
    def generation(self) -> int:
        """The generation of the keys that :attr:`validator` verifies with."""
        return self._generation

    def validate(self, token: str) -> Claims:
        generation = self.discovery.refresh_if_due()
        if generation != self._generation:
            # A key was withdrawn, or the keys are too stale: what the old validator remembers
            # having verified with them must be verified again.
            self.validator, self._generation = self._make(), generation
        return self.validator.validate(token)


class IssuerRouter:
    """JWT access tokens to the route of the issuer they name.

    :param routes: by issuer URL; the first is the configured ``issuer``.
    """

    def __init__(self, routes: Mapping[str, IssuerRoute], memo_size: int = 10000) -> None:
        self.routes = dict(routes)
        # One issuer (the usual case): no need to read the token's iss before its memo is looked up;
        # the validator checks iss after the signature anyway.
        self._only = next(iter(self.routes.values())) if len(self.routes) == 1 else None
        # Several: the route of a token already seen, so that its iss is decoded once, not per request.
        self._route_of: dict[str, IssuerRoute] = {}
        self._memo_size = memo_size

    def validate(self, token: str) -> Claims:
        """The token's claims once it is valid for the issuer it names.

        :raises InvalidToken: invalid, or from an issuer that is not accepted.
        :raises TemporarilyUnavailable: that issuer's keys cannot be had now.
        """
        route = self._only or self._route_of.get(token)
        if route is None:
            route = self.routes.get(unverified_issuer(token))
            if route is None:
                raise InvalidToken("the token was issued by another issuer")
            claims = route.validate(token)
            if len(self._route_of) >= self._memo_size:
                self._route_of.clear()  # bounded; the next requests of live tokens refill it
            self._route_of[token] = route  # only a valid token: garbage cannot fill it
            return claims
        return route.validate(token)

    def standing(self, token: str) -> tuple[float, Discovery, int] | None:
        """How long a validated ``token`` stands: until its memo entry expires, and while its issuer's
        keys stay at the generation that verified it; ``None`` when it is not remembered."""
        route = self._only or self._route_of.get(token)
        if route is None:
            return None
        expires = route.validator.remembered_until(token)
        return None if expires is None else (expires, route.discovery, route.generation)

    def start(self) -> None:
        """Fetch every issuer's keys as the worker starts (an issuer down is not fatal)."""
        for route in self.routes.values():
            route.discovery.start()

    def memo_size(self) -> int:
        return sum(route.validator.memo_size() for route in self.routes.values())


def shared_keys(settings: Settings, client: Any, stats: Stats) -> Callable[[str], SharedKeys]:
    """Makes the Redis copy of an issuer's keys; its lock outlives one slow fetch (two timeouts)."""
    sealer = Sealer(settings.shared_secret or None, "keys")
    redis = RedisCache(client, sealer, stats, lock_ttl=2 * settings.http_timeout + 1)
    return lambda issuer: SharedKeys(redis, sealer, issuer, settings.discovery_max_staleness)


def build_router(
    settings: Settings,
    primary: Discovery,
    shared: Callable[[str], SharedKeys] | None = None,
    clock: Callable[[], float] = time.time,
    *,
    others: Mapping[str, Discovery] | None = None,
) -> IssuerRouter:
    """A route per accepted issuer; ``primary`` serves ``issuer`` (introspection and login use it too).

    :param others: the other issuers' keys, by issuer (made from ``settings`` when omitted; for tests).
    """
    routes = {}
    for issuer in settings.issuers:
        discovery = primary if issuer == settings.issuer else (others or {}).get(issuer) or Discovery(
            settings, clock=clock, shared=shared(issuer) if shared is not None else None, issuer_url=issuer
        )
        routes[issuer] = IssuerRoute(discovery, _validator_factory(settings, issuer, discovery, clock))
    return IssuerRouter(routes, settings.token_cache_size)


def _validator_factory(settings: Settings, issuer: str, discovery: Discovery,
                       clock: Callable[[], float]) -> Callable[[], JWTValidator]:
    audience = settings.audiences_of(issuer)
    return lambda: JWTValidator(
        discovery, issuer=issuer, audience=audience, leeway=settings.leeway,
        signing_algs=settings.token_signing_algs, memo_size=settings.token_cache_size, clock=clock,
    )
