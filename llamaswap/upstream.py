"""How llamaswap connects to the servers it relays to (its children, peers).

Children listen on an IP literal (``127.0.0.1``), which needs no name resolution,
yet Twisted's standard ``Agent`` endpoint (``HostnameEndpoint``) still resolves it
in a thread-pool thread for every new connection — and llama-server closes the
connection after each streamed answer, so every stream pays that hand-off before
its first token — and it reports a refused connection (a child still loading)
only after its 0.3 s attempt delay.  IP literals therefore get a plain TCP
endpoint; host names keep ``HostnameEndpoint``; ``https`` is wrapped in TLS as
the standard agent does.  Connection factories are made quiet: upstream
connections come and go all the time, so Twisted need not log each one.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """An endpoint per upstream URI: direct TCP for IP literals, resolved names else."""

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        host = uri.host.decode("ascii", errors="replace")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self.reactor, host, uri.port, self.connect_timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self.reactor, host, uri.port, self.connect_timeout)
        else:
            endpoint = HostnameEndpoint(
                self.reactor, uri.host, uri.port, timeout=self.connect_timeout
            )
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return _Quiet(endpoint)


@implementer(IStreamClientEndpoint)
class _Quiet:
    """Connects without the factory's "Starting factory" log lines."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        protocolFactory.noisy = False  # type: ignore[attr-defined]
        return self.endpoint.connect(protocolFactory)
