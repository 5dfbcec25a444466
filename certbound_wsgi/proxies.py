"""Trusted proxies: the peers whose forwarded values are believed.

A value forwarded in a request header (the client certificate, ``X-Forwarded-Proto``)
can be sent by anyone who reaches the worker directly. As werkzeug's ``ProxyFix``
states which forwarded values it believes, this states from whom: only a peer
address inside one of the ``trusted_proxies`` networks. The settings validate the
networks with :func:`parse_networks`, and the certificate reader, the DPoP ``htu``
check and ``check-config`` ask the same :class:`TrustedProxies`.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

__all__ = ["IPAddress", "IPNetwork", "TrustedProxies", "parse_networks"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Peers are few (the proxies themselves), but REMOTE_ADDR is whatever connected: bound the memo.
_MEMO_SIZE = 256


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """The networks of ``cidrs`` (``10.0.0.0/8``, ``::1/128``, or a bare address).

    :raises ValueError: naming the first entry that is not an IP network.
    """
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise ValueError(f"{cidr!r} is not an IP network") from None
    return tuple(networks)


class TrustedProxies:
    """Whether a peer is a trusted proxy, memoized by its address.

    :param cidrs: the ``trusted_proxies`` networks; empty trusts no peer.
    :raises ValueError: an entry is not an IP network.
    """

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks = parse_networks(cidrs)
        #: ``trusts_peer(remote_addr)``: whether the WSGI ``REMOTE_ADDR`` is a trusted proxy; never for a
        #: non-address. A memoized function rather than a method: it is asked on every request.
        self.trusts_peer = functools.lru_cache(maxsize=_MEMO_SIZE)(self._trusts_peer)

    def contains(self, address: IPAddress) -> bool:
        """Whether ``address`` lies in a trusted network (an IPv4-mapped IPv6 address counts as IPv4)."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def _trusts_peer(self, remote_addr: str) -> bool:
        try:
            address = ipaddress.ip_address(remote_addr)
        except ValueError:
            # A Unix socket has no peer address (REMOTE_ADDR is empty): nothing to trust it by.
            return False
        return self.contains(address)
