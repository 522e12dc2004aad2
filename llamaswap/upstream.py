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

The connections they open are remembered per server, so the kept-alive ones can
be closed when that server is asked to exit (:meth:`UpstreamEndpoints.close_idle`).
"""

from __future__ import annotations

import weakref
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
from twisted.internet.protocol import Protocol
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
        # per server (host, port): the protocols of the connections opened to it
        self._opened: dict[tuple[bytes, int], weakref.WeakSet[IProtocol]] = {}

    def close_idle(self, url: str) -> None:
        """Close the kept-alive connections to ``url``'s server that carry no request.

        Called as a child is asked to stop: llama-server (cpp-httplib) notices
        that it is stopping only every 10 ms on an idle kept-alive connection, and
        waits for that before it exits; closed from our side, it ends at once.
        A connection still carrying a request is left to end with the child.
        """
        try:
            uri = URI.fromBytes(url.encode("ascii", errors="replace"))
        except ValueError:  # not a URL llamaswap could have connected to
            return
        for protocol in list(self._opened.pop((uri.host, uri.port), ())):
            quiescent = getattr(protocol, "state", None) == "QUIESCENT"  # HTTP11ClientProtocol
            if quiescent and isinstance(protocol, Protocol) and protocol.transport is not None:
                protocol.transport.loseConnection()

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
        return _Quiet(endpoint, self._opened.setdefault((uri.host, uri.port), weakref.WeakSet()))


@implementer(IStreamClientEndpoint)
class _Quiet:
    """Connects without the factory's "Starting factory" log lines; notes each connection."""

    def __init__(self, endpoint: IStreamClientEndpoint, opened: weakref.WeakSet[IProtocol]) -> None:
        self.endpoint = endpoint
        self.opened = opened

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        protocolFactory.noisy = False  # type: ignore[attr-defined]

        def opened(protocol: IProtocol) -> IProtocol:
            self.opened.add(protocol)
            return protocol

        return self.endpoint.connect(protocolFactory).addCallback(opened)
