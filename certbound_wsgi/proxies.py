"""Trusted proxies: the peers whose forwarded values are believed without the proxy secret.

A value forwarded in a request header (the client certificate, ``X-Forwarded-Proto``)
can be sent by anyone who reaches the worker directly. As werkzeug's ``ProxyFix``
states which forwarded values it believes, this states from whom: a peer address
inside one of the ``trusted_proxies`` networks (address-only trust, an explicit
opt-in), or, with the keyword ``unix``, the peer of a Unix socket (gunicorn gives
it an empty ``REMOTE_ADDR``, which no TCP peer can produce). The settings validate
the entries with :func:`parse_networks`; :class:`~certbound_wsgi.channel.ProxyChannel`
and ``check-config`` ask the same :class:`TrustedProxies`.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

__all__ = ["UNIX", "IPAddress", "IPNetwork", "TrustedProxies", "parse_networks"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The ``trusted_proxies`` keyword that trusts the peer of the worker's Unix socket.
UNIX = "unix"

# Peers are few (the proxies themselves), but REMOTE_ADDR is whatever connected: bound the memo.
_MEMO_SIZE = 256


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """The networks of ``cidrs`` (``10.0.0.0/8``, ``::1/128``, or a bare address); the keyword
    :data:`UNIX` is allowed and skipped.

    :raises ValueError: naming the first entry that is neither an IP network nor ``unix``.
    """
    networks = []
    for cidr in cidrs:
        if cidr == UNIX:
            continue
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise ValueError(f"{cidr!r} is not an IP network nor unix") from None
    return tuple(networks)


class TrustedProxies:
    """Whether a peer is a trusted proxy, memoized by its address.

    :param cidrs: the ``trusted_proxies`` networks and the keyword ``unix``; empty trusts no peer.
    :raises ValueError: an entry is neither an IP network nor ``unix``.
    """

    def __init__(self, cidrs: Iterable[str]) -> None:
        cidrs = tuple(cidrs)
        self.networks = parse_networks(cidrs)
        #: Whether the peer of a Unix socket is trusted (``unix`` in ``trusted_proxies``).
        self.unix = UNIX in cidrs
        #: ``trusts_peer(remote_addr)``: whether the WSGI ``REMOTE_ADDR`` is a trusted proxy; never for a
        #: non-address. A memoized function rather than a method: it is asked on every request.
        self.trusts_peer = functools.lru_cache(maxsize=_MEMO_SIZE)(self._trusts_peer)

    def contains(self, address: IPAddress) -> bool:
        """Whether ``address`` lies in a trusted network (an IPv4-mapped IPv6 address counts as IPv4)."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def _trusts_peer(self, remote_addr: object) -> bool:
        if remote_addr == "":
            # gunicorn: the peer of a Unix socket (accept() yields no address); no TCP peer looks like this.
            return self.unix
        if not isinstance(remote_addr, str):
            return False
        try:
            address = ipaddress.ip_address(remote_addr)
        except ValueError:
            return False
        return self.contains(address)
