"""Refuse a ``proxy`` that leads back to llamaswap's own ``--listen`` address."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Collection
from urllib.parse import urlsplit

from .objects import Config
from .reader import ConfigError


def refuse_self_proxy(config: Config, listen: Collection[str]) -> Config:
    """``config``, unless a model's or peer's ``proxy`` leads to a ``listen`` endpoint.

    Such a proxy has llamaswap relay requests to itself (and take its own ``/health``
    for a child's).  Host names other than ``localhost`` are not resolved here: the
    ``Via`` mark of :mod:`llamaswap.relay` stops a loop this check cannot see.
    """
    proxies = [(f"models.{m.id}.proxy", m.proxy) for m in config.models.values()]
    proxies += [(f"peers.{p.id}.proxy", p.proxy) for p in config.peers.values()]
    for endpoint in listen:
        bound = listen_address(endpoint)
        if bound is None:
            continue
        for key, url in proxies:
            if _leads_to(url, *bound):
                raise ConfigError(
                    config.source,
                    key,
                    f"{url} is llamaswap's own listen address (--listen {endpoint}), so "
                    "requests would be relayed back into llamaswap; point it at the model "
                    "server",
                )
    return config


def listen_address(endpoint: str) -> tuple[str, int] | None:
    """Interface ('' for every one) and port of a tcp/tcp6/ssl endpoint string, else None."""
    kind, _, rest = endpoint.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in re.split(r"(?<!\\):", rest):
        name, equals, value = part.partition("=")
        if equals:
            named[name] = value.replace("\\", "")
        else:
            positional.append(part.replace("\\", ""))
    interface = positional[1] if kind == "tcp" and len(positional) > 1 else ""
    interface = named.get("interface", interface)
    try:
        return interface, int(named.get("port", positional[0] if positional else ""))
    except ValueError:
        return None


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _addresses(host: str) -> set[IPAddress]:
    """The addresses a literal host stands for, in every spelling the resolver takes
    (``127.1``, ``2130706433``, ``0x7f.1``, ``localhost.``, ``*.localhost``); empty
    for a name (not resolved)."""
    name = host.lower().removesuffix(".")
    if name == "localhost" or name.endswith(".localhost"):
        return {ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")}
    try:
        address: IPAddress = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        if not re.fullmatch(r"[0-9a-fx.]+", name):
            return set()
        try:  # the shorthand and octal/hex forms of IPv4 that inet_aton reads
            address = ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            return set()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return {address.ipv4_mapped}
    return {address}


def _leads_to(url: str, interface: str, port: int) -> bool:
    """Would a connection to ``url`` reach a listener on ``interface:port`` here?"""
    if "${" in url:
        return False  # ${PORT} is chosen when the model starts, among ports not in use
    parts = urlsplit(url)
    try:
        target_port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    if target_port != port:
        return False
    targets = _addresses(parts.hostname or "")
    bound = _addresses(interface)
    if not interface or any(b.is_unspecified for b in bound):  # every local address
        return any(t.is_loopback or t.is_unspecified or _is_own(t) for t in targets)
    # 0.0.0.0 / :: as a destination means this machine
    return any(t.is_unspecified or t in bound for t in targets)


def _is_own(address: IPAddress) -> bool:
    """True if ``address`` belongs to this machine (only a local address can be bound)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True
