"""Whom a client counts as: its address, reduced to what one client controls.

Shared by the connection caps (:mod:`llamaswap.connections`) and the wrong-key count
(:mod:`llamaswap.access`), which must agree on who a client is.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.interfaces import IAddress


def host_of(address: IAddress | None) -> str | None:
    """The whole IP of a client; None for a unix socket."""
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else None


def client_key(address: IAddress | None) -> str | None:
    """Whom a connection counts against: its IP (an IPv6 client: its /64), or None."""
    host = host_of(address)
    if host is None:
        return None  # a unix socket: only the total applies
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
